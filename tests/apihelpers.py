"""Helpers for the API tests: a chat-capable small random checkpoint, `teesplit api` processes
and a raw HTTP / server-sent-events client (http.client, no third-party code in between)."""

from __future__ import annotations

import http.client
import json
import shutil
import ssl
from pathlib import Path
from typing import Any

from helpers import make_checkpoint

from teesplit.launch import free_tcp_port, start_api, stop_server


def make_chat_checkpoint(path: Path, tokenizer_dir: Path, **overrides) -> Path:
    """A random Llama checkpoint with SmolLM2's vocabulary, tokenizer and chat template."""
    cfg = {"vocab_size": 49152, "max_position_embeddings": 2048, **overrides}
    make_checkpoint(path, "llama", **cfg)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, path / name)
    return path


class APIProcess:
    """`python -m teesplit api ...` in a child process; its stderr goes to a log file. With
    `tls_context` it serves HTTPS (the context checks its certificate)."""

    def __init__(
        self,
        model_dir: Path,
        server: str,
        log_path: Path,
        extra: list[str] | None = None,
        tls_context: ssl.SSLContext | None = None,
        env: dict[str, str] | None = None,
    ):
        self.port = free_tcp_port()
        self.log_path = log_path
        args = ["--server", server, "--model", str(model_dir), "--served-model-name", "tiny", *(extra or [])]
        self.log = open(log_path, "w")
        try:
            self.proc = start_api(args, self.port, stderr=self.log, env=env, tls_context=tls_context)
        except RuntimeError as e:
            self.log.close()
            raise RuntimeError(f"{e}: {log_path.read_text()[-2000:]}") from None

    def stop(self) -> int:
        stop_server(self.proc, grace_s=30)
        self.log.close()
        return self.proc.returncode


def _connection(port: int, timeout: float, context: ssl.SSLContext | None) -> http.client.HTTPConnection:
    if context is not None:
        return http.client.HTTPSConnection("127.0.0.1", port, timeout=timeout, context=context)
    return http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)


def request(
    port: int,
    method: str,
    path: str,
    body: Any = None,
    raw: bytes | None = None,
    timeout: float = 300,
    context: ssl.SSLContext | None = None,
    api_key: str | None = None,
):
    """One HTTP request (HTTPS with `context`): (status, parsed JSON or text)."""
    conn = _connection(port, timeout, context)
    try:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        headers = {"Content-Type": "application/json"}
        if api_key is not None:
            headers["Authorization"] = f"Bearer {api_key}"
        conn.request(method, path, body=data, headers=headers)
        r = conn.getresponse()
        text = r.read().decode()
        if r.getheader("Content-Type", "").startswith("application/json"):
            return r.status, json.loads(text)
        return r.status, text
    finally:
        conn.close()


def stream(
    port: int,
    path: str,
    body: dict,
    on_event=None,
    timeout: float = 300,
    context: ssl.SSLContext | None = None,
    api_key: str | None = None,
) -> tuple[int, list[Any]]:
    """A streaming request: (status, events); each event is a parsed JSON object or "[DONE]"."""
    conn = _connection(port, timeout, context)
    try:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key is not None else {}
        conn.request("POST", path, body=json.dumps({**body, "stream": True}).encode(), headers=headers)
        r = conn.getresponse()
        if r.status != 200:
            return r.status, [json.loads(r.read())]
        assert r.getheader("Content-Type", "").startswith("text/event-stream")
        events = []
        while True:
            line = r.readline()
            if not line:
                return r.status, events  # the server closed the stream
            line = line.decode().rstrip("\r\n")
            if not line:
                continue
            assert line.startswith("data: "), line
            payload = line[len("data: ") :]
            event = payload if payload == "[DONE]" else json.loads(payload)
            events.append(event)
            if on_event is not None:
                on_event(event)
    finally:
        conn.close()


def metrics(port: int, context: ssl.SSLContext | None = None, api_key: str | None = None) -> dict[str, float]:
    """The /metrics samples as {'name{labels}': value}."""
    status, text = request(port, "GET", "/metrics", context=context, api_key=api_key)
    assert status == 200
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out
