"""The OpenAI-compatible API (tee/api.py) end to end: a real `teesplit serve` process, a real
`teesplit api` process, real HTTP. Concurrent streams get their solo greedy tokens; every
field is validated; an unreachable or dying GPU server is a 503, never a hang."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time

import pytest
from apihelpers import APIProcess, make_chat_checkpoint, metrics, request, stream
from helpers import local_model

from teesplit.launch import free_tcp_address, start_server, stop_server
from teesplit.tee.generate import Generator, SamplingParams
from teesplit.tee.tokenizer import Tokenizer

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, smollm2_dir):
    return make_chat_checkpoint(tmp_path_factory.mktemp("api") / "tiny", smollm2_dir)


@pytest.fixture(scope="module")
def gpu(ckpt, tmp_path_factory):
    address = f"ipc://{tmp_path_factory.mktemp('ipc')}/gpu.sock"
    proc = start_server(ckpt, address, ["--device", "cpu", "--dtype", "float32", "--threads", "1"])
    yield address
    stop_server(proc)


@pytest.fixture(scope="module")
def api(ckpt, gpu, tmp_path_factory):
    p = APIProcess(ckpt, gpu, tmp_path_factory.mktemp("log") / "api.log", ["--max-batch", "16"])
    yield p.port
    assert p.stop() == 0, "the API exits cleanly on SIGTERM"


@pytest.fixture(scope="module")
def solo(ckpt):
    """Solo greedy runs with the GPU service in-process: the reference for every request."""
    tok = Tokenizer.from_dir(ckpt)
    gen = Generator(local_model(ckpt, "v2-merged"), tok)

    def run(messages, max_tokens, stop=()):
        ids = tok.apply_chat_template(messages)
        return gen.generate(ids, SamplingParams(max_new_tokens=max_tokens, stop=tuple(stop)))

    return run


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


@pytest.mark.slow
def test_models(api):
    assert request(api, "GET", "/v1/models") == (
        200,
        {"object": "list", "data": [request(api, "GET", "/v1/models/tiny")[1]]},
    )
    assert request(api, "GET", "/v1/models/tiny")[1]["id"] == "tiny"
    status, body = request(api, "GET", "/v1/models/other")
    assert status == 404 and body["error"]["code"] == "model_not_found"


@pytest.mark.slow
def test_chat_completion_is_the_solo_greedy_run(api, solo):
    want = solo(_user("Tell me about the sea."), 10)
    status, body = request(
        api,
        "POST",
        CHAT,
        {"model": "tiny", "messages": _user("Tell me about the sea."), "max_tokens": 10, "temperature": 0},
    )
    assert status == 200, body
    assert body["object"] == "chat.completion" and body["model"] == "tiny"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": want.text}
    assert body["choices"][0]["finish_reason"] == want.finish_reason
    assert body["usage"] == {
        "prompt_tokens": len(want.prompt_tokens),
        "completion_tokens": len(want.tokens),
        "total_tokens": len(want.prompt_tokens) + len(want.tokens),
    }


@pytest.mark.slow
def test_stop_string_cuts_the_answer(api, solo):
    full = solo(_user("Count with me."), 12)
    cut = full.text[3:8]  # a piece of the greedy answer: generation stops where it appears
    want = solo(_user("Count with me."), 12, stop=[cut])
    assert want.finish_reason == "stop" and cut not in want.text
    status, body = request(
        api,
        "POST",
        CHAT,
        {
            "model": "tiny",
            "messages": _user("Count with me."),
            "max_tokens": 12,
            "temperature": 0,
            "stop": cut,
        },
    )
    assert status == 200
    assert body["choices"][0]["message"]["content"] == want.text
    assert body["choices"][0]["finish_reason"] == "stop"


def test_completions_with_text_and_token_ids(api, ckpt):
    tok = Tokenizer.from_dir(ckpt)
    ids = tok.encode("Once upon a time")
    want = Generator(local_model(ckpt, "v2-merged"), tok).generate(ids, SamplingParams(max_new_tokens=6))
    for prompt in ("Once upon a time", ids, [ids]):
        status, body = request(
            api, "POST", COMPLETIONS, {"model": "tiny", "prompt": prompt, "max_tokens": 6, "temperature": 0}
        )
        assert status == 200, body
        assert body["object"] == "text_completion" and body["choices"][0]["text"] == want.text
        assert body["usage"]["prompt_tokens"] == len(ids)
    status, events = stream(
        api, COMPLETIONS, {"model": "tiny", "prompt": ids, "max_tokens": 6, "temperature": 0, "seed": 1}
    )
    assert status == 200 and events[-1] == "[DONE]"
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == want.text


@pytest.mark.slow
def test_concurrent_streams_each_get_their_solo_greedy_tokens(api, solo):
    """10 streaming clients at once over one GPU connection (continuous batching): each gets
    exactly the text and token count of a solo greedy run of its prompt."""
    n = 10
    topics = [
        "the sea",
        "a cat",
        "rain",
        "numbers",
        "the moon",
        "bread",
        "trains",
        "music",
        "ice",
        "a forest",
    ]
    jobs = [(_user(f"Write about {t}." + " Please." * i), 6 + 2 * i) for i, t in enumerate(topics[:n])]
    wants = [solo(m, k) for m, k in jobs]
    before = metrics(api)
    results: list = [None] * n
    gate = threading.Barrier(n)

    def client(i: int) -> None:
        messages, k = jobs[i]
        gate.wait()
        results[i] = stream(
            api,
            CHAT,
            {
                "model": "tiny",
                "messages": messages,
                "max_tokens": k,
                "temperature": 0,
                "stream_options": {"include_usage": True},
            },
        )

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    for want, (status, events) in zip(wants, results, strict=True):
        assert status == 200, events
        assert events[-1] == "[DONE]"
        assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        chunks = [e for e in events[1:-1] if e["choices"]]
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
        assert text == want.text
        assert all(c["object"] == "chat.completion.chunk" and c["id"] == events[0]["id"] for c in chunks)
        assert chunks[-1]["choices"][0] == {
            "index": 0,
            "delta": {},
            "finish_reason": want.finish_reason,
            "logprobs": None,
        }
        assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
        usage = events[-2]["usage"]
        assert events[-2]["choices"] == [] and usage["completion_tokens"] == len(want.tokens)
        assert usage["prompt_tokens"] == len(want.prompt_tokens)
    after = metrics(api)

    def delta(name):
        return after.get(name, 0) - before.get(name, 0)

    assert delta("teesplit_completion_tokens_total") == sum(len(w.tokens) for w in wants)
    steps, rows = delta("teesplit_decode_steps_total"), delta("teesplit_decode_rows_total")
    assert rows > steps, f"the requests must share decode passes ({rows} rows in {steps} passes)"
    # v2-merged: 2L + 1 round trips per forward pass, whatever the batch
    rpcs = sum(v for k, v in after.items() if k.startswith("teesplit_gpu_rpcs_total")) - sum(
        v for k, v in before.items() if k.startswith("teesplit_gpu_rpcs_total")
    )
    assert rpcs == 5 * (steps + delta("teesplit_prefill_passes_total"))


BAD = [
    ({"messages": _user("hi")}, 400, "model"),
    ({"model": "nope", "messages": _user("hi")}, 404, "model"),
    ({"model": "tiny"}, 400, "messages"),
    ({"model": "tiny", "messages": []}, 400, "messages"),
    ({"model": "tiny", "messages": "hi"}, 400, "messages"),
    ({"model": "tiny", "messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role"),
    ({"model": "tiny", "messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    (
        {"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        400,
        "messages[0].content",
    ),
    (
        {"model": "tiny", "messages": [{"role": "user", "content": "x", "tool_calls": []}]},
        400,
        "messages[0].tool_calls",
    ),
    ({"model": "tiny", "messages": _user("hi"), "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "tiny", "messages": _user("hi"), "max_tokens": -3}, 400, "max_tokens"),
    ({"model": "tiny", "messages": _user("hi"), "max_tokens": "5"}, 400, "max_tokens"),
    ({"model": "tiny", "messages": _user("hi"), "max_tokens": 2.5}, 400, "max_tokens"),
    ({"model": "tiny", "messages": _user("hi"), "max_tokens": True}, 400, "max_tokens"),
    ({"model": "tiny", "messages": _user("hi"), "max_tokens": 2048}, 400, "max_tokens"),
    ({"model": "tiny", "messages": _user("hi"), "max_completion_tokens": 0}, 400, "max_completion_tokens"),
    ({"model": "tiny", "messages": _user("hi"), "temperature": -0.1}, 400, "temperature"),
    ({"model": "tiny", "messages": _user("hi"), "temperature": 2.5}, 400, "temperature"),
    ({"model": "tiny", "messages": _user("hi"), "temperature": "hot"}, 400, "temperature"),
    ({"model": "tiny", "messages": _user("hi"), "top_p": 1.5}, 400, "top_p"),
    ({"model": "tiny", "messages": _user("hi"), "top_k": -1}, 400, "top_k"),
    ({"model": "tiny", "messages": _user("hi"), "seed": -1}, 400, "seed"),
    ({"model": "tiny", "messages": _user("hi"), "seed": "x"}, 400, "seed"),
    ({"model": "tiny", "messages": _user("hi"), "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"model": "tiny", "messages": _user("hi"), "stop": [""]}, 400, "stop"),
    ({"model": "tiny", "messages": _user("hi"), "stop": 3}, 400, "stop"),
    ({"model": "tiny", "messages": _user("hi"), "n": 2}, 400, "n"),
    ({"model": "tiny", "messages": _user("hi"), "stream": "yes"}, 400, "stream"),
    ({"model": "tiny", "messages": _user("hi"), "logprobs": True}, 400, "logprobs"),
    ({"model": "tiny", "messages": _user("hi"), "presence_penalty": 1}, 400, "presence_penalty"),
    ({"model": "tiny", "messages": _user("hi"), "logit_bias": {"5": 1}}, 400, "logit_bias"),
    ({"model": "tiny", "messages": _user("hi"), "tools": []}, 400, "tools"),
    (
        {"model": "tiny", "messages": _user("hi"), "stream_options": {"include_usage": True}},
        400,
        "stream_options",
    ),
    (
        {"model": "tiny", "messages": _user("hi"), "response_format": {"type": "json_object"}},
        400,
        "response_format",
    ),
]
BAD_COMPLETIONS = [
    ({"model": "tiny"}, 400, "prompt"),
    ({"model": "tiny", "prompt": ""}, 400, "prompt"),
    ({"model": "tiny", "prompt": []}, 400, "prompt"),
    ({"model": "tiny", "prompt": [1, 99999999]}, 400, "prompt"),
    ({"model": "tiny", "prompt": ["a", "b"]}, 400, "prompt"),
    ({"model": "tiny", "prompt": "a", "echo": True}, 400, "echo"),
    ({"model": "tiny", "prompt": "a", "suffix": "z"}, 400, "suffix"),
    ({"model": "tiny", "prompt": "a", "max_tokens": 2048}, 400, "max_tokens"),
]


@pytest.mark.parametrize(
    "path, body, status, param", [(CHAT, *b) for b in BAD] + [(COMPLETIONS, *b) for b in BAD_COMPLETIONS]
)
def test_bad_requests_get_openai_shaped_errors(api, path, body, status, param):
    got, reply = request(api, "POST", path, body)
    assert got == status, reply
    err = reply["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param and err["type"] == "invalid_request_error"


def test_malformed_http_requests(api):
    for raw in (b"{bad", b"[1, 2]", b"\xff\xfe", b"", b'{"model": "tiny", "messages": NaN}'):
        status, reply = request(api, "POST", CHAT, raw=raw)
        assert status == 400 and reply["error"]["type"] == "invalid_request_error", raw
    assert request(api, "POST", CHAT, raw=b'{"model": "tiny", "temperature": NaN, "messages": []}')[0] == 400
    status, reply = request(api, "GET", "/v1/nothing")
    assert status == 404 and reply["error"]["code"] == "unknown_url"
    assert request(api, "POST", "/v1/embeddings", {"model": "tiny"})[0] == 404
    assert request(api, "PUT", CHAT, {"model": "tiny"})[0] == 405
    # a declared body over the limit is refused without reading it
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", api, timeout=30)
    conn.putrequest("POST", CHAT)
    conn.putheader("Content-Length", str(64 << 20))
    conn.endheaders()
    r = conn.getresponse()
    assert r.status == 413
    conn.close()
    # the server still answers
    assert request(api, "POST", CHAT, {"model": "tiny", "messages": _user("hi"), "max_tokens": 2})[0] == 200


def test_metrics_are_prometheus_text(api):
    request(api, "POST", CHAT, {"model": "tiny", "messages": _user("hi"), "max_tokens": 3, "temperature": 0})
    request(api, "POST", CHAT, {"model": "tiny", "messages": []})
    status, text = request(api, "GET", "/metrics")
    assert status == 200
    m = metrics(api)
    for name in (
        "teesplit_time_to_first_token_seconds_count",
        "teesplit_time_per_output_token_seconds_count",
        "teesplit_completion_tokens_total",
        "teesplit_prompt_tokens_total",
        "teesplit_gpu_rpcs_per_token",
        'teesplit_gpu_bytes_per_token{direction="to_gpu"}',
        'teesplit_gpu_bytes_total{direction="from_gpu"}',
        'teesplit_http_errors_total{status="400"}',
        'teesplit_info{model="tiny",plan="v2-merged"}',
    ):
        assert m.get(name, 0) > 0, name
    assert m['teesplit_http_requests_total{endpoint="/v1/chat/completions",status="200"}'] >= 1
    assert (
        m['teesplit_time_to_first_token_seconds_bucket{le="+Inf"}']
        == m["teesplit_time_to_first_token_seconds_count"]
    )
    rpcs = sum(v for k, v in m.items() if k.startswith("teesplit_gpu_rpcs_total"))
    assert m["teesplit_gpu_rpcs_per_token"] == pytest.approx(rpcs / m["teesplit_completion_tokens_total"])
    assert "# TYPE teesplit_time_to_first_token_seconds histogram" in text


@pytest.mark.slow
def test_unreachable_gpu_server_is_a_503(ckpt, tmp_path):
    p = APIProcess(ckpt, free_tcp_address(), tmp_path / "api.log", ["--timeout", "1", "--retries", "0"])
    try:
        body = {"model": "tiny", "messages": _user("hi"), "max_tokens": 3}
        for send in (lambda: request(p.port, "POST", CHAT, body), lambda: stream(p.port, CHAT, body)):
            status, reply = send()
            reply = reply[0] if isinstance(reply, list) else reply
            assert status == 503, reply
            assert reply["error"]["code"] == "gpu_unavailable" and "no reply" in reply["error"]["message"]
        assert request(p.port, "GET", "/health")[0] == 503
        assert metrics(p.port)["teesplit_gpu_up"] == 0
    finally:
        assert p.stop() == 0


@pytest.mark.slow
def test_gpu_server_dying_mid_stream_ends_it_with_an_error_then_recovers(ckpt, tmp_path):
    """With the default timeouts (60 s a reply, 2 retries): the stream's error event and the
    next request's 503 come within seconds (the connect timeout), not after the retries."""
    address = free_tcp_address()
    gpu = start_server(ckpt, address, ["--device", "cpu", "--threads", "1"])
    p = APIProcess(ckpt, address, tmp_path / "api.log")
    try:
        killed = threading.Event()
        at = []

        def kill_on_first_token(event):
            if not killed.is_set() and isinstance(event, dict) and event.get("choices"):
                if event["choices"][0]["delta"].get("content"):
                    gpu.kill()
                    gpu.wait()
                    at.append(time.monotonic())
                    killed.set()

        body = {"model": "tiny", "messages": _user("Go on forever."), "max_tokens": 1900, "temperature": 0}
        status, events = stream(p.port, CHAT, body, on_event=kill_on_first_token, timeout=120)
        error_s = time.monotonic() - at[0]
        assert status == 200 and killed.is_set()
        assert "[DONE]" not in events
        assert events[-1]["error"]["code"] == "gpu_unavailable", events[-1]
        t0 = time.monotonic()
        assert request(p.port, "POST", CHAT, {**body, "max_tokens": 3})[0] == 503
        refused_s = time.monotonic() - t0
        print(f"GPU server killed: error event after {error_s:.1f} s, next 503 in {refused_s:.1f} s")
        assert error_s < 15 and refused_s < 15  # 120 s and 180 s before the connect check
        # a new server at the same address: the API reconnects on the next request
        gpu = start_server(ckpt, address, ["--device", "cpu", "--threads", "1"])
        status, reply = request(p.port, "POST", CHAT, {**body, "max_tokens": 3})
        assert status == 200 and reply["usage"]["completion_tokens"] == 3
        assert metrics(p.port)['teesplit_generation_errors_total{code="gpu_unavailable"}'] >= 2
    finally:
        p.stop()
        stop_server(gpu)


def test_a_client_that_leaves_frees_its_row(api):
    import json
    import socket

    before = metrics(api).get('teesplit_requests_finished_total{reason="cancelled"}', 0)
    body = json.dumps(
        {"model": "tiny", "messages": _user("Talk."), "max_tokens": 1900, "stream": True}
    ).encode()
    with socket.create_connection(("127.0.0.1", api), timeout=60) as sock:
        head = f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        sock.sendall(head + body)
        got = b""
        while b"data: " not in got:
            got += sock.recv(4096)
        assert got.startswith(b"HTTP/1.1 200")
    for _ in range(600):
        if metrics(api).get('teesplit_requests_finished_total{reason="cancelled"}', 0) > before:
            break
        threading.Event().wait(0.1)
    assert metrics(api)['teesplit_requests_finished_total{reason="cancelled"}'] == before + 1
    assert metrics(api)["teesplit_requests_running"] == 0


@pytest.mark.slow
def test_api_with_the_gpu_service_in_process(ckpt, solo, tmp_path):
    """--server local: the TDX passthrough deployment, one process."""
    p = APIProcess(ckpt, "local", tmp_path / "api.log", ["--device", "cpu", "--dtype", "float32"])
    try:
        want = solo(_user("Hello"), 5)
        status, body = request(
            p.port,
            "POST",
            CHAT,
            {"model": "tiny", "messages": _user("Hello"), "max_tokens": 5, "temperature": 0},
        )
        assert status == 200 and body["choices"][0]["message"]["content"] == want.text
    finally:
        assert p.stop() == 0


# ---- under abuse -----------------------------------------------------------------------------------
def _raw_post(port: int, path: str, body: bytes, timeout: float = 60) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        return r.status, json.loads(r.read())
    finally:
        conn.close()


def test_a_burst_of_64_connections_gets_no_reset(api):
    """http.server listens with a backlog of 5; the API with 128 (--backlog)."""
    gate, results = threading.Barrier(64), [None] * 64
    body = json.dumps({"model": "tiny", "prompt": "Hi", "max_tokens": 1}).encode()

    def client(i: int) -> None:
        gate.wait()
        try:
            results[i] = _raw_post(api, COMPLETIONS, body)[0]
        except OSError as e:  # a reset, a refused connection
            results[i] = repr(e)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert all(r in (200, 429) for r in results), results  # 429: past this client's limit


def test_metric_labels_come_from_a_fixed_set(api):
    before = len(request(api, "GET", "/metrics")[1])
    for i in range(300):
        assert request(api, "GET", f"/nope-{i}")[0] == 404
        assert request(api, "POST", f"{COMPLETIONS}-{i}", {})[0] == 404
        assert request(api, "GET", f"/v1/models/x{i}")[0] == 404
    text = request(api, "GET", "/metrics")[1]
    assert "nope" not in text and "completions-" not in text and "/v1/models/x" not in text
    assert 'endpoint="other",status="404"' in text
    assert len(text) - before < 2000


def test_deep_json_and_lone_surrogates_get_400_in_openai_shape(api):
    for raw in (
        b"[" * 100_000 + b"]" * 100_000,
        b'{"model": "tiny", "prompt": "\\ud800 hi", "max_tokens": 2}',
    ):
        status, body = _raw_post(api, COMPLETIONS, raw)
        assert status == 400 and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert request(api, "GET", "/health")[0] == 200


def test_prompts_are_bounded_in_bytes_before_tokenizing(api):
    t0 = time.monotonic()
    status, body = request(api, "POST", COMPLETIONS, {"model": "tiny", "prompt": "word " * 700_000})
    elapsed = time.monotonic() - t0
    assert status == 400 and body["error"]["code"] == "context_length_exceeded"
    assert "bytes" in body["error"]["message"]
    assert elapsed < 10  # 3.5 MB would take seconds to tokenize; it is refused on its length


def test_requests_on_a_kept_alive_connection_are_fast(api):
    conn = http.client.HTTPConnection("127.0.0.1", api, timeout=30)
    times = []
    try:
        for _ in range(30):
            t0 = time.perf_counter()
            conn.request("GET", "/v1/models")
            r = conn.getresponse()
            r.read()
            times.append(time.perf_counter() - t0)
            assert r.status == 200
    finally:
        conn.close()
    median = sorted(times)[len(times) // 2]
    print(f"kept-alive GET /v1/models: median {median * 1000:.1f} ms")
    assert median < 0.025  # 42 ms with Nagle and delayed ACKs (no TCP_NODELAY)


def _running(port: int) -> float:
    return metrics(port).get("teesplit_requests_running", 0)


def test_a_non_streaming_client_that_leaves_frees_its_row(api):
    cancelled = 'teesplit_requests_finished_total{reason="cancelled"}'
    before = metrics(api).get(cancelled, 0)
    body = json.dumps({"model": "tiny", "messages": _user("Talk."), "max_tokens": 1900, "ignore_eos": True})
    with socket.create_connection(("127.0.0.1", api), timeout=60) as sock:
        head = f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        sock.sendall(head + body.encode())
        deadline = time.monotonic() + 60
        while _running(api) < 1:
            assert time.monotonic() < deadline, "the request never started"
            time.sleep(0.1)
    left = time.monotonic()  # the client closed its connection
    while _running(api) > 0 or metrics(api).get(cancelled, 0) <= before:
        assert time.monotonic() - left < 15, "the row of a client that left is still decoding"
        time.sleep(0.1)


@pytest.mark.slow
def test_huge_prompts_do_not_starve_a_running_stream(api):
    """Clients looping prompts just under the byte bound (each is tokenized, then refused for
    its token count) while a stream decodes: tokenizing releases the GIL, so the stream's
    tokens keep flowing."""
    body = {"model": "tiny", "messages": _user("Tell me a story."), "max_tokens": 40, "ignore_eos": True}
    t0 = time.monotonic()
    assert stream(api, CHAT, body)[0] == 200
    quiet = time.monotonic() - t0
    stop = threading.Event()
    refused = [0]
    text = "lorem ipsum dolor sit amet " * 5000  # 135 kB: under 2048 x 81 bytes, over 2048 tokens

    def abuse() -> None:
        while not stop.is_set():
            status, reply = request(api, "POST", COMPLETIONS, {"model": "tiny", "prompt": text})
            assert status == 400 and reply["error"]["code"] == "context_length_exceeded", reply
            refused[0] += 1

    abusers = [threading.Thread(target=abuse) for _ in range(2)]
    for t in abusers:
        t.start()
    try:
        time.sleep(1)
        t0 = time.monotonic()
        status, events = stream(api, CHAT, body, timeout=300)
        busy = time.monotonic() - t0
    finally:
        stop.set()
        for t in abusers:
            t.join(120)
    print(f"a 40-token stream: {quiet:.1f} s quiet, {busy:.1f} s beside {refused[0]} huge prompts")
    assert status == 200 and "[DONE]" in events
    assert refused[0] >= 2
    assert busy < 5 * quiet + 20


def test_each_client_has_its_own_limit(ckpt, gpu, tmp_path):
    keys = ["key-alice-0123456789", "key-bob-0123456789ab"]
    extra = ["--max-per-client", "1", "--api-key", keys[0], "--api-key", keys[1]]
    p = APIProcess(ckpt, gpu, tmp_path / "api.log", extra)
    try:
        long = {"model": "tiny", "messages": _user("Go on."), "max_tokens": 1900, "ignore_eos": True}
        started = threading.Event()
        done: list = []

        def hold() -> None:
            done.append(stream(p.port, CHAT, long, on_event=lambda _e: started.set(), api_key=keys[0]))

        holder = threading.Thread(target=hold)
        holder.start()
        assert started.wait(120)
        short = {"model": "tiny", "messages": _user("Hi"), "max_tokens": 2}
        status, body = request(p.port, "POST", CHAT, short, api_key=keys[0])
        assert status == 429 and "--max-per-client" in body["error"]["message"]
        assert request(p.port, "POST", CHAT, short, api_key=keys[1])[0] == 200
    finally:
        assert p.stop() == 0
        holder.join(60)


@pytest.mark.slow
def test_the_readme_curl_example_works_as_written(smollm2_dir, tmp_path):
    """`teesplit api --model default` serves the model id "smollm2", as the README's examples use."""
    from teesplit.launch import free_tcp_port, start_api

    address = f"ipc://{tmp_path}/gpu.sock"
    gpu = start_server(smollm2_dir, address, ["--device", "cpu", "--threads", "1"])
    port = free_tcp_port()
    api = start_api(["--server", address, "--model", "default", "--cache-dir", str(smollm2_dir.parent)], port)
    try:
        assert [m["id"] for m in request(port, "GET", "/v1/models")[1]["data"]] == ["smollm2"]
        body = {
            "model": "smollm2",
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 32,
            "temperature": 0,
        }
        status, reply = request(port, "POST", CHAT, body)
        assert status == 200 and reply["model"] == "smollm2" and reply["choices"][0]["message"]["content"]
    finally:
        stop_server(api)
        stop_server(gpu)
