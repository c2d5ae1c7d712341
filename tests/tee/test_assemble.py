"""The one assembly (tee/assemble.py): every entry point gets every protection. The runner flags
of `teesplit generate` work the same in `teesplit api`, tested through real HTTP against real
`teesplit serve` processes: CURVE keys, --verify against a lying server, the private plans,
weight pins; and the settings are checked before anything connects."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from apihelpers import APIProcess, make_chat_checkpoint, metrics, request, stream
from helpers import TESTS, local_model

from teesplit.errors import UsageError
from teesplit.launch import free_tcp_address, start_server, stop_server, wait_serving
from teesplit.tee.assemble import Assembly, RunnerSettings
from teesplit.tee.generate import Generator, SamplingParams
from teesplit.tee.tokenizer import Tokenizer
from teesplit.transport.curve import CurveClient, generate_keys

CHAT = "/v1/chat/completions"
CPU = ["--device", "cpu", "--dtype", "float32", "--threads", "1"]
QUESTION = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, smollm2_dir):
    return make_chat_checkpoint(tmp_path_factory.mktemp("assemble") / "tiny", smollm2_dir)


def _solo(ckpt, plan: str, max_tokens: int) -> tuple[list[int], str]:
    """A solo greedy run with the GPU service in this process, built by the same assembly."""
    tok = Tokenizer.from_dir(ckpt)
    gen = Generator(local_model(ckpt, plan), tok, eos_token_ids=set())
    r = gen.generate(tok.apply_chat_template(QUESTION), SamplingParams(max_new_tokens=max_tokens))
    return r.tokens, r.text


def _ask(port: int, max_tokens: int = 6, ignore_eos: bool = True) -> tuple[int, dict]:
    body = {"model": "tiny", "messages": QUESTION, "max_tokens": max_tokens, "temperature": 0}
    return request(port, "POST", CHAT, {**body, "ignore_eos": ignore_eos})


# ---- settings are checked before anything connects -------------------------------------------
@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(plan="private-2party"), "two non-colluding GPU servers"),
        (dict(plan="v2-fused", servers=("a", "b")), "talks to one GPU server"),
        (dict(plan="private-otp", wire_dtype="float16"), "fixed-point ring elements"),
        (dict(plan="v2-merged", verify=True), "--verify supports"),
        (dict(plan="v3-fused", verify=True, wire_dtype="bfloat16"), "float32 on the wire"),
        (dict(curve_secret="x"), "CURVE needs both"),
        (dict(servers=("shm://a",), curve_secret="x", server_key="y"), "shm:// never leaves this host"),
        (dict(plan="v7"), "unknown plan"),
        (dict(weights_sha256="0" * 64), "but --weights-sha256 pins"),
    ],
)
def test_settings_that_cannot_work_are_refused_before_connecting(ckpt, settings, message):
    with pytest.raises(UsageError, match=message):
        Assembly(RunnerSettings(ckpt, **{"servers": ("tcp://127.0.0.1:1",), **settings}, log=lambda m: None))


def test_a_tokenizer_only_directory_runs_unchecked_with_a_warning(ckpt, tmp_path):
    for name in ("config.json", "tokenizer.json"):
        (tmp_path / name).write_bytes((ckpt / name).read_bytes())
    said = []
    Assembly(RunnerSettings(tmp_path, log=said.append))
    assert said and "unchecked" in said[0]
    with pytest.raises(UsageError, match="holds no weights"):
        Assembly(RunnerSettings(tmp_path, verify=True, log=said.append))


# ---- the API gets every protection generate has ----------------------------------------------
@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    root = tmp_path_factory.mktemp("keys")
    (root / "allowed").mkdir()
    return {
        "server": generate_keys(root, "server"),
        "runner": generate_keys(root / "allowed", "runner"),
        "stranger": generate_keys(root / "strangers", "stranger"),
        "allowed": root / "allowed",
    }


@pytest.mark.slow
def test_the_api_speaks_curve_and_a_stranger_gets_503_naming_why(ckpt, keys, tmp_path):
    address = free_tcp_address()
    extra = [*CPU, "--curve-secret", str(keys["server"][1]), "--allow-keys", str(keys["allowed"])]
    proc = start_server(
        ckpt, address, extra, curve=CurveClient.from_files(keys["runner"][1], keys["server"][0])
    )
    try:
        cases = {
            "runner": (
                ["--curve-secret", str(keys["runner"][1]), "--server-key", str(keys["server"][0])],
                None,
            ),
            "stranger": (
                ["--curve-secret", str(keys["stranger"][1]), "--server-key", str(keys["server"][0])],
                "refused this runner's public key",
            ),
            "no key": ([], "requires CURVE"),
        }
        for who, (flags, refusal) in cases.items():
            api = APIProcess(ckpt, address, tmp_path / f"api-{who}.log", flags)
            try:
                status, body = _ask(api.port)
                if refusal is None:
                    assert status == 200, body
                else:
                    assert status == 503, (who, body)
                    assert body["error"]["code"] == "gpu_link_refused" and refusal in body["error"]["message"]
                    status, body = _ask(api.port)  # the API stays up and says it again
                    assert status == 503 and refusal in body["error"]["message"]
                    assert request(api.port, "GET", "/v1/models")[0] == 200
            finally:
                assert api.stop() == 0
    finally:
        stop_server(proc)


@pytest.mark.slow
def test_the_api_under_verify_stops_at_a_lie_and_streams_nothing_computed_from_it(ckpt, tmp_path):
    """The server lies once, in the second decode step (GateUp of layer 0: two GateUp calls per
    forward pass of this 2-layer model); the stream ends with an error event naming the failed
    check, after only tokens an honest server gives."""
    honest_tokens, honest_text = _solo(ckpt, "v3-fused", 6)
    address = free_tcp_address()
    script = TESTS / "lying_server.py"
    liar = subprocess.Popen(
        [sys.executable, str(script), str(ckpt), address, "perturb", "GateUp", "5"], stderr=subprocess.DEVNULL
    )
    try:
        wait_serving(liar, address, 120.0)
        api = APIProcess(ckpt, address, tmp_path / "api.log", ["--plan", "v3-fused", "--verify"])
        try:
            body = {
                "model": "tiny",
                "messages": QUESTION,
                "max_tokens": 6,
                "temperature": 0,
                "ignore_eos": True,
            }
            status, events = stream(api.port, CHAT, body)
            assert status == 200
            assert events[-1] != "[DONE]" and events[-1]["error"]["code"] == "integrity", events[-1]
            assert "GateUp of layer 0" in events[-1]["error"]["message"]
            assert "fails its Freivalds check" in events[-1]["error"]["message"]
            text = "".join(
                e["choices"][0]["delta"].get("content", "") for e in events[:-1] if e.get("choices")
            )
            assert honest_text.startswith(text) and len(text) < len(honest_text)
            assert metrics(api.port)['teesplit_generation_errors_total{code="integrity"}'] == 1
            assert request(api.port, "GET", "/v1/models")[0] == 200  # still up
        finally:
            assert api.stop() == 0
    finally:
        stop_server(liar)


@pytest.mark.slow
def test_private_2party_through_the_api_is_the_solo_run(ckpt, tmp_path):
    a, b = free_tcp_address(), free_tcp_address()
    servers = [start_server(ckpt, addr, CPU) for addr in (a, b)]
    try:
        api = APIProcess(ckpt, a, tmp_path / "api.log", ["--server", b, "--plan", "private-2party"])
        try:
            status, body = _ask(api.port, 6, ignore_eos=False)
            assert status == 200, body
            # the same plan, run solo from the command line against the same two servers
            r = subprocess.run(
                [
                    sys.executable, "-m", "teesplit", "generate", "--model", str(ckpt), "--server", a,
                    "--server", b, "--plan", "private-2party", "--chat", "--prompt", QUESTION[0]["content"],
                    "--max-new-tokens", "6", "--stats-json", str(tmp_path / "solo.json"),
                ],
                capture_output=True, text=True, timeout=600,
            )  # fmt: skip
            assert r.returncode == 0, r.stderr
            solo = json.loads((tmp_path / "solo.json").read_text())
            assert body["choices"][0]["message"]["content"] == solo["text"]
            assert body["usage"]["completion_tokens"] == len(solo["tokens"])
        finally:
            assert api.stop() == 0
    finally:
        for p in servers:
            stop_server(p)


@pytest.mark.parametrize("command", ["generate", "api", "chat"])
@pytest.mark.parametrize(
    "flags, message",
    [
        (["--weights-sha256", "0" * 64], "but --weights-sha256 pins"),
        (["--plan", "private-2party"], "two non-colluding GPU servers"),
        (["--verify", "--plan", "v2-merged"], "--verify supports"),
        (["--curve-secret", "x.key_secret"], "CURVE needs both"),
    ],
)
@pytest.mark.slow
def test_every_runner_flag_is_checked_the_same_by_generate_api_and_chat(ckpt, command, flags, message):
    extra = {"generate": ["--prompt", "hi"], "api": ["--port", "0"], "chat": []}[command]
    r = subprocess.run(
        [sys.executable, "-m", "teesplit", command, "--model", str(ckpt), "--server", "tcp://127.0.0.1:1"]
        + flags
        + extra,
        capture_output=True,
        text=True,
        timeout=120,
        input="",
    )
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
