"""Helpers for the API tests: a chat-capable small random checkpoint, `teesplit api` processes
and a raw HTTP / server-sent-events client (http.client, no third-party code in between)."""

from __future__ import annotations

import http.client
import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from helpers import make_checkpoint


def make_chat_checkpoint(path: Path, tokenizer_dir: Path, **overrides) -> Path:
    """A random Llama checkpoint with SmolLM2's vocabulary, tokenizer and chat template."""
    cfg = {"vocab_size": 49152, "max_position_embeddings": 2048, **overrides}
    make_checkpoint(path, "llama", **cfg)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, path / name)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class APIProcess:
    """`python -m teesplit api ...` in a child process; its stderr goes to a log file."""

    def __init__(self, model_dir: Path, server: str, log_path: Path, extra: list[str] | None = None):
        self.port = free_port()
        self.log_path = log_path
        cmd = [
            sys.executable,
            "-m",
            "teesplit",
            "api",
            "--server",
            server,
            "--model",
            str(model_dir),
            "--port",
            str(self.port),
            "--served-model-name",
            "tiny",
            *(extra or []),
        ]
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, stderr=self.log, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 300
        while True:
            try:
                if request(self.port, "GET", "/v1/models")[0] == 200:
                    return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"teesplit api did not start: {log_path.read_text()[-2000:]}")
            time.sleep(0.2)

    def stop(self) -> int:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        return self.proc.returncode


def request(
    port: int, method: str, path: str, body: Any = None, raw: bytes | None = None, timeout: float = 300
):
    """One HTTP request: (status, parsed JSON or text)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        text = r.read().decode()
        if r.getheader("Content-Type", "").startswith("application/json"):
            return r.status, json.loads(text)
        return r.status, text
    finally:
        conn.close()


def stream(port: int, path: str, body: dict, on_event=None, timeout: float = 300) -> tuple[int, list[Any]]:
    """A streaming request: (status, events); each event is a parsed JSON object or "[DONE]"."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", path, body=json.dumps({**body, "stream": True}).encode())
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


def metrics(port: int) -> dict[str, float]:
    """The /metrics samples as {'name{labels}': value}."""
    status, text = request(port, "GET", "/metrics")
    assert status == 200
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out
