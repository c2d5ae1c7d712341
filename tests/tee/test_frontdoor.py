"""The API's front door end to end (tee/frontdoor.py, tls.py, apikeys.py, attestation.py,
attest_client.py, chat_client.py): real `teesplit serve` and `teesplit api` processes, real
sockets, the official `openai` client and curl over HTTPS, right, wrong and missing keys,
plain HTTP to the TLS port (the API stays up after each), attestation evidence from a
directory laid out like configfs-tsm, `teesplit attest` and `teesplit chat --api`."""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import shutil
import ssl
import subprocess
import sys

import pytest
from apihelpers import APIProcess, make_chat_checkpoint, metrics, request
from helpers import TESTS, local_model
from teefake import FakeTEEDevice

from teesplit.cli import main
from teesplit.launch import start_server, stop_server
from teesplit.tee import tls
from teesplit.tee.attest_client import Attested, Outcome, Verdict
from teesplit.tee.attestation import report_data_for
from teesplit.tee.frontdoor import FrontDoorSettings, build
from teesplit.tee.generate import Generator, SamplingParams
from teesplit.tee.tokenizer import Tokenizer

pytest.importorskip("cryptography")
from tlshelpers import make_ca_and_leaf  # noqa: E402

FX = TESTS / "fixtures" / "tdx"
MRTD = "91eb2b44d141d4ece09f0c75c2c53d247a3c68edd7fafe8a3520c942a604a407de03ae6dc5f87f27428b2538873118b7"
K1, K2, K3 = "key-one-0123456789abcdef", "key-two-0123456789abcdef", "key-env-0123456789abcdef"
CHAT = "/v1/chat/completions"
QUESTION = [{"role": "user", "content": "Tell me about the sea."}]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, smollm2_dir):
    return make_chat_checkpoint(tmp_path_factory.mktemp("frontdoor") / "tiny", smollm2_dir)


@pytest.fixture(scope="module")
def gpu(ckpt, tmp_path_factory):
    address = f"ipc://{tmp_path_factory.mktemp('ipc')}/gpu.sock"
    proc = start_server(ckpt, address, ["--device", "cpu", "--dtype", "float32", "--threads", "1"])
    yield address
    stop_server(proc)


@pytest.fixture(scope="module")
def solo(ckpt):
    tok = Tokenizer.from_dir(ckpt)
    gen = Generator(local_model(ckpt, "v2-merged"), tok)
    return lambda messages, n: gen.generate(
        tok.apply_chat_template(messages), SamplingParams(max_new_tokens=n)
    )


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_ca_and_leaf(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def ca_api(ckpt, gpu, certs, tmp_path_factory):
    """HTTPS with a CA-issued certificate; keys from --api-key, a file and the environment;
    /metrics open; attestation off."""
    ca, chain, key = certs
    d = tmp_path_factory.mktemp("ca-api")
    (d / "keys").write_text(f"# test keys\n{K2}\n")
    extra = [
        "--tls-cert",
        str(chain),
        "--tls-key",
        str(key),
        "--api-key",
        K1,
        "--api-key-file",
        str(d / "keys"),
    ]
    extra += ["--metrics-open", "--attestation", "none", "--access-log"]
    env = {**os.environ, "TEESPLIT_API_KEY": K3}
    p = APIProcess(ckpt, gpu, d / "api.log", extra, tls_context=tls.client_context(ca), env=env)
    p.context = tls.client_context(ca)
    yield p
    assert p.stop() == 0


@pytest.fixture(scope="module")
def tee_dir(tmp_path_factory):
    """A configfs-tsm report entry whose 'kernel' answers with the real fixture quote (which
    binds nothing of ours) and records every report data it was given."""
    dev = FakeTEEDevice(
        tmp_path_factory.mktemp("tsm") / "teesplit-api", lambda _rd: (FX / "tdx_quote").read_bytes()
    )
    yield dev
    dev.close()


@pytest.fixture(scope="module")
def tee_api(ckpt, gpu, tee_dir, tmp_path_factory):
    """HTTPS with a self-signed key made in memory, one key, attestation through configfs-tsm."""
    d = tmp_path_factory.mktemp("tee-api")
    extra = ["--tls-self-signed", "--api-key", K1, "--tsm-report", str(tee_dir.dir), "--access-log"]
    p = APIProcess(ckpt, gpu, d / "api.log", extra, tls_context=tls.client_context(verify=False))
    p.cert_der = ssl.PEM_cert_to_DER_cert(ssl.get_server_certificate(("127.0.0.1", p.port)))
    yield p
    assert p.stop() == 0


def _url(api) -> str:
    return f"https://localhost:{api.port}"


def _up(api, context) -> None:
    """The API still serves: /health without a key, a generation with one."""
    assert request(api.port, "GET", "/health", context=context)[0] == 200
    body = {"model": "tiny", "messages": QUESTION, "max_tokens": 2, "temperature": 0}
    status, answer = request(api.port, "POST", CHAT, body, context=context, api_key=K1)
    assert status == 200, answer


# ---- HTTPS and keys with the openai client ----------------------------------------------------
@pytest.mark.slow
def test_openai_client_over_https_with_a_ca_bundle(ca_api, certs, solo):
    openai = pytest.importorskip("openai")
    ca = certs[0]
    want = solo(QUESTION, 10)
    http_client = openai.DefaultHttpxClient(verify=ssl.create_default_context(cafile=str(ca)))
    client = openai.OpenAI(base_url=f"{_url(ca_api)}/v1", api_key=K1, http_client=http_client, max_retries=0)
    assert [m.id for m in client.models.list()] == ["tiny"]
    r = client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=10, temperature=0)
    assert r.choices[0].message.content == want.text
    pieces = [
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(
            model="tiny", messages=QUESTION, max_tokens=10, temperature=0, stream=True
        )
        if c.choices
    ]
    assert "".join(pieces) == want.text and len([p for p in pieces if p]) > 1, "streamed over TLS"
    for key in (K2, K3):  # from --api-key-file and from TEESPLIT_API_KEY
        other = openai.OpenAI(
            base_url=f"{_url(ca_api)}/v1", api_key=key, http_client=http_client, max_retries=0
        )
        assert [m.id for m in other.models.list()] == ["tiny"]


def test_openai_client_with_a_wrong_or_no_key_gets_401(ca_api, certs):
    openai = pytest.importorskip("openai")
    http_client = openai.DefaultHttpxClient(verify=ssl.create_default_context(cafile=str(certs[0])))
    wrong = openai.OpenAI(
        base_url=f"{_url(ca_api)}/v1", api_key="wrong-key-0123456789", http_client=http_client, max_retries=0
    )
    with pytest.raises(openai.AuthenticationError) as e:
        wrong.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=2)
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    _up(ca_api, ca_api.context)
    status, body = request(
        ca_api.port, "POST", CHAT, {"model": "tiny", "messages": QUESTION}, context=ca_api.context
    )
    assert status == 401 and body["error"]["code"] == "missing_api_key"
    assert body["error"]["type"] == "invalid_request_error" and body["error"]["param"] is None
    _up(ca_api, ca_api.context)


def test_keep_alive_over_tls(ca_api):
    conn = http.client.HTTPSConnection("localhost", ca_api.port, context=ca_api.context, timeout=60)
    try:
        conn.connect()
        sock = conn.sock
        for _ in range(3):
            conn.request("GET", "/v1/models", headers={"Authorization": f"Bearer {K1}"})
            r = conn.getresponse()
            assert r.status == 200 and json.loads(r.read())["data"][0]["id"] == "tiny"
        assert conn.sock is sock, "one TLS connection carried every request"
    finally:
        conn.close()


def test_health_is_open_and_metrics_open_when_asked(ca_api, tee_api):
    assert request(ca_api.port, "GET", "/health", context=ca_api.context)[0] == 200
    assert request(ca_api.port, "GET", "/metrics", context=ca_api.context)[0] == 200  # --metrics-open
    ctx = tls.pinned_client_context(tee_api.cert_der)
    status, body = request(tee_api.port, "GET", "/metrics", context=ctx)
    assert status == 401 and body["error"]["code"] == "missing_api_key"  # the default
    assert (
        "teesplit_http_requests_total" in request(tee_api.port, "GET", "/metrics", context=ctx, api_key=K1)[1]
    )
    assert request(tee_api.port, "GET", "/health", context=ctx)[0] == 200


# ---- curl -------------------------------------------------------------------------------------
def _curl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["curl", "-sS", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(shutil.which("curl") is None, reason="no curl")
def test_curl_over_https(ca_api, certs, solo):
    ca = str(certs[0])
    url = f"{_url(ca_api)}{CHAT}"
    want = solo(QUESTION, 10)
    body = json.dumps({"model": "tiny", "messages": QUESTION, "max_tokens": 10, "temperature": 0})
    r = _curl("--cacert", ca, "-H", f"Authorization: Bearer {K1}", url, "-d", body)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["choices"][0]["message"]["content"] == want.text
    r = _curl(
        "-N", "--cacert", ca, "-H", f"Authorization: Bearer {K2}", url, "-d", body[:-1] + ', "stream": true}'
    )
    assert r.returncode == 0, r.stderr  # the stream ends with close_notify: no truncation error
    events = [line[len("data: ") :] for line in r.stdout.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    text = "".join(
        json.loads(e)["choices"][0]["delta"].get("content") or ""
        for e in events[:-1]
        if json.loads(e)["choices"]
    )
    assert text == want.text


@pytest.mark.skipif(shutil.which("curl") is None, reason="no curl")
def test_curl_wrong_key_no_key_and_plain_http(ca_api, certs):
    ca = str(certs[0])
    url = f"{_url(ca_api)}{CHAT}"
    body = json.dumps({"model": "tiny", "messages": QUESTION, "max_tokens": 2})
    for headers in (
        [],
        ["-H", "Authorization: Bearer not-the-key-0123456789"],
        ["-H", "Authorization: Basic xyz"],
    ):
        r = _curl("--cacert", ca, *headers, "-w", "\n%{http_code}", url, "-d", body)
        payload, code = r.stdout.rsplit("\n", 1)
        assert code == "401" and json.loads(payload)["error"]["code"] in (
            "missing_api_key",
            "invalid_api_key",
        )
        _up(ca_api, ca_api.context)
    r = _curl("-w", "\n%{http_code}", f"http://localhost:{ca_api.port}/v1/models")  # plain HTTP, TLS port
    payload, code = r.stdout.rsplit("\n", 1)
    assert code == "400" and json.loads(payload)["error"]["code"] == "https_required"
    _up(ca_api, ca_api.context)
    r = _curl(f"https://localhost:{ca_api.port}/health")  # no CA given: curl refuses the certificate
    assert r.returncode == 60
    _up(ca_api, ca_api.context)


@pytest.mark.skipif(shutil.which("curl") is None, reason="no curl")
def test_curl_trusts_the_self_signed_certificate_or_its_printed_pin(tee_api, tmp_path):
    """What the API prints at start is what a client pins: the certificate's fingerprint and the
    public-key pin curl takes; the certificate itself works as a CA bundle."""
    fingerprint, pin = tls.fingerprint(tee_api.cert_der), tls.spki_pin(tls.spki_of(tee_api.cert_der))
    log = tee_api.log_path.read_text()
    assert f"TLS certificate sha256 fingerprint: {fingerprint}" in log
    assert f"public key pin (curl --pinnedpubkey): {pin}" in log
    pem = tmp_path / "enclave.pem"
    pem.write_text(ssl.DER_cert_to_PEM_cert(tee_api.cert_der))
    models = f"https://localhost:{tee_api.port}/v1/models"
    r = _curl("--cacert", str(pem), "-H", f"Authorization: Bearer {K1}", models)
    assert r.returncode == 0 and json.loads(r.stdout)["data"][0]["id"] == "tiny", r.stderr
    r = _curl("-k", "--pinnedpubkey", pin, "-H", f"Authorization: Bearer {K1}", models)
    assert r.returncode == 0 and json.loads(r.stdout)["data"][0]["id"] == "tiny", r.stderr
    wrong = "sha256//" + base64.b64encode(bytes(32)).decode()
    r = _curl("-k", "--pinnedpubkey", wrong, models)
    assert r.returncode == 90, r.stderr  # CURLE_SSL_PINNEDPUBKEYNOTMATCH: nothing was sent


def test_keys_never_reach_the_log(ca_api, tee_api):
    request(ca_api.port, "GET", "/v1/models", context=ca_api.context, api_key="wrong-secret-0123456789")
    for api in (ca_api, tee_api):
        log = api.log_path.read_text()
        assert '"GET /v1/models HTTP/1.1" 200' in log or "GET /health" in log  # the access log runs
        for secret in (K1, K2, K3, "wrong-secret-0123456789"):
            assert secret not in log


# ---- pinning ----------------------------------------------------------------------------------
def test_pinned_clients_talk_to_the_attested_certificate_only(ca_api, tee_api):
    pytest.importorskip("openai")
    ca_der = ssl.PEM_cert_to_DER_cert(ssl.get_server_certificate(("127.0.0.1", ca_api.port)))
    good = Attested(_url(ca_api), Verdict(), ca_der)
    assert [m.id for m in good.openai_client(api_key=K1, max_retries=0).models.list()] == ["tiny"]
    with good.httpx_client(api_key=K1) as c:
        assert c.get("/v1/models").json()["data"][0]["id"] == "tiny"
    import openai

    wrong = Attested(_url(ca_api), Verdict(), tee_api.cert_der)  # another enclave's certificate
    with pytest.raises(openai.APIConnectionError):
        wrong.openai_client(api_key=K1, max_retries=0).models.list()


# ---- attestation ------------------------------------------------------------------------------
def test_attestation_evidence_binds_the_served_certificate(tee_api, tee_dir):
    nonce = bytes(range(16, 48))
    conn = http.client.HTTPSConnection(
        "127.0.0.1", tee_api.port, context=tls.client_context(verify=False), timeout=60
    )
    try:
        conn.connect()
        peer = conn.sock.getpeercert(binary_form=True)
        conn.request("GET", f"/v1/attestation?nonce={nonce.hex()}", headers={"Authorization": f"Bearer {K1}"})
        r = conn.getresponse()
        ev = json.loads(r.read())
    finally:
        conn.close()
    assert r.status == 200, ev
    want = hashlib.sha512(b"teesplit-tls-attestation-v1" + tls.spki_of(peer) + nonce).digest()
    assert want == report_data_for(tls.spki_of(peer), nonce)
    assert tee_dir.inputs[-1] == want, "the API asked the TEE to bind its certificate and the nonce"
    assert ev["report_data"] == want.hex() and ev["nonce"] == nonce.hex() and ev["tee"] == "tdx"
    assert ssl.PEM_cert_to_DER_cert(ev["certificate"]) == peer == tee_api.cert_der
    assert base64.b64decode(ev["quote"]) == (FX / "tdx_quote").read_bytes()
    ctx = tls.pinned_client_context(tee_api.cert_der)
    assert request(tee_api.port, "GET", "/v1/attestation?nonce=00", context=ctx, api_key=K1)[0] == 400
    assert request(tee_api.port, "GET", f"/v1/attestation?nonce={nonce.hex()}", context=ctx)[0] == 401


def test_attestation_off_or_unavailable(ca_api, ckpt, gpu, tmp_path):
    status, body = request(
        ca_api.port, "GET", "/v1/attestation?nonce=" + "00" * 16, context=ca_api.context, api_key=K1
    )
    assert status == 404  # --attestation none
    log = tmp_path / "api.log"
    no_tee = [
        "--tls-self-signed",
        "--tsm-report",
        str(tmp_path / "none" / "entry"),
        "--gramine-attestation",
        str(tmp_path),
    ]
    p = APIProcess(ckpt, gpu, log, no_tee, tls_context=tls.client_context(verify=False))
    try:
        status, body = request(
            p.port, "GET", "/v1/attestation?nonce=" + "00" * 16, context=tls.client_context(verify=False)
        )
        assert status == 501 and "does not exist" in body["error"]["message"]
        assert body["error"]["code"] == "attestation_unavailable"
    finally:
        p.stop()
    warnings = [
        line for line in log.read_text().splitlines() if line.startswith("warning: GET /v1/attestation")
    ]
    assert len(warnings) == 1 and "configfs-tsm" in warnings[0]


def _run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "teesplit", *args], capture_output=True, text=True, timeout=300, input=stdin
    )


@pytest.mark.slow
def test_teesplit_attest_against_the_api(tee_api, tmp_path):
    """The fixture quote is genuine and its MRTD matches, but it binds nothing of ours: the live
    check gets past the signature, collateral, TCB and policy, and refuses at the binding."""
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"mrtd": [MRTD]}))
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"mrtd": ["00" * 48]}))
    live = [f"https://127.0.0.1:{tee_api.port}", "--collateral", str(FX / "tdx_quote_collateral.json")]
    at = ["--at", "2025-06-20T00:00:00Z"]

    r = _run("attest", *live, "--policy", str(good), "--api-key", K1, *at)
    assert r.returncode == Outcome.BINDING_MISMATCH, r.stdout + r.stderr
    assert r.stdout.startswith("verdict: REFUSED: binding mismatch") and f"mrtd: {MRTD}" in r.stdout
    assert "TCB status UpToDate" in r.stdout and "(NOT attested: do not pin)" in r.stdout
    assert tls.fingerprint(tee_api.cert_der) in r.stdout

    r = _run("attest", *live, "--policy", str(other), "--api-key", K1, *at)
    assert r.returncode == Outcome.POLICY_MISMATCH, r.stdout + r.stderr

    r = _run("attest", *live, "--policy", str(good), *at)  # no key: the evidence is not given
    assert r.returncode == Outcome.FETCH_FAILED and "401" in r.stdout

    r = _run(
        "attest", live[0], "--policy", str(good), "--api-key", K1, "--pccs-url", "http://127.0.0.1:9", *at
    )
    assert r.returncode == Outcome.FETCH_FAILED and "cannot get collateral" in r.stdout

    r = _run("attest", *live, "--policy", str(good), "--api-key", K1)  # now: the collateral expired
    assert r.returncode == Outcome.INVALID_EVIDENCE and "expired" in r.stdout.lower()
    _up(tee_api, tls.pinned_client_context(tee_api.cert_der))


# ---- teesplit chat as a client ----------------------------------------------------------------
def test_chat_client_over_https(ca_api, certs, solo):
    want = solo([{"role": "user", "content": "Hello there"}], 8)
    r = _run(
        "chat", "--api", _url(ca_api), "--ca-cert", str(certs[0]), "--api-key", K1, "--max-new-tokens", "8",
        stdin="Hello there\n/stats\n/quit\n",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert f"assistant> {want.text}\n" in r.stdout
    assert f"session: 1 turn(s), 1 in the history, {len(want.tokens)} tokens generated" in r.stdout


@pytest.mark.slow
def test_chat_client_refuses_a_wrong_key_and_a_failed_attestation(ca_api, tee_api, certs, tmp_path):
    r = _run(
        "chat",
        "--api",
        _url(ca_api),
        "--ca-cert",
        str(certs[0]),
        "--api-key",
        "nope-0123456789abcdef",
        stdin="Hi\n",
    )
    assert r.returncode == 2 and "Incorrect API key" in r.stderr  # before the first prompt
    before = metrics(tee_api.port, tls.pinned_client_context(tee_api.cert_der), K1)
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"mrtd": [MRTD]}))
    r = _run(
        "chat", "--api", f"https://127.0.0.1:{tee_api.port}", "--api-key", K1, "--attest", str(policy),
        "--collateral", str(FX / "tdx_quote_collateral.json"), stdin="Secret prompt\n",
    )  # fmt: skip
    assert r.returncode == Outcome.INVALID_EVIDENCE and "not chatting" in r.stderr and "you>" not in r.stdout
    after = metrics(tee_api.port, tls.pinned_client_context(tee_api.cert_der), K1)
    chat = [k for k in after if k.startswith("teesplit_http_requests_total") and CHAT in k]
    assert all(after[k] == before.get(k, 0) for k in chat), "no prompt was sent"


# ---- the whole picture: client -> HTTPS -> API (runner) -> CurveZMQ -> GPU server --------------
@pytest.mark.slow
def test_api_over_https_reaches_a_curve_gpu_server(ckpt, solo, tmp_path):
    from teesplit.launch import free_tcp_address
    from teesplit.transport.curve import CurveClient, generate_keys

    (tmp_path / "allowed").mkdir()
    server = generate_keys(tmp_path, "server")
    runner = generate_keys(tmp_path / "allowed", "runner")
    address = free_tcp_address()
    extra = ["--device", "cpu", "--threads", "1", "--curve-secret", str(server[1])]
    extra += ["--allow-keys", str(tmp_path / "allowed")]
    gpu = start_server(ckpt, address, extra, curve=CurveClient.from_files(runner[1], server[0]))
    try:
        args = ["--tls-self-signed", "--api-key", K1, "--attestation", "none"]
        args += ["--curve-secret", str(runner[1]), "--server-key", str(server[0])]
        ctx = tls.client_context(verify=False)
        api = APIProcess(ckpt, address, tmp_path / "api.log", args, tls_context=ctx)
        try:
            body = {"model": "tiny", "messages": QUESTION, "max_tokens": 6, "temperature": 0}
            status, answer = request(api.port, "POST", CHAT, body, context=ctx, api_key=K1)
            assert status == 200, answer
            assert answer["choices"][0]["message"]["content"] == solo(QUESTION, 6).text
        finally:
            assert api.stop() == 0
    finally:
        stop_server(gpu)


# ---- settings refused at start ----------------------------------------------------------------
@pytest.mark.parametrize(
    "args, error",
    [
        (["--host", "0.0.0.0"], "refusing to listen on 0.0.0.0 without TLS"),
        (["--tls-cert", "x.pem"], "go together"),
        (["--tls-self-signed", "--tls-cert", "a", "--tls-key", "b"], "not both"),
        (["--attestation", "tdx"], "binds the TLS certificate"),
        (["--tls-name", "x"], "--tls-self-signed"),
        (["--api-key", "short"], "at least 16"),
    ],
)
def test_bad_front_door_settings_are_refused_at_start(args, error, capsys):
    assert main(["api", "--model", "/nonexistent", *args]) == 2
    assert error in capsys.readouterr().err


def test_insecure_allows_plain_http_on_any_address_with_a_warning():
    warnings = []
    door = build(FrontDoorSettings(host="0.0.0.0", insecure=True, attestation="none"), warnings.append)
    assert door.tls is None and not door.api_keys and door.attestation is None
    assert any("no API key configured" in w for w in warnings)
