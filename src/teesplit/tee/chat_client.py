"""`teesplit chat --api URL`: the terminal chat as a client of a remote `teesplit api`.

The conversation lives here; each turn sends the whole history to POST /v1/chat/completions
and prints the streamed answer. The same loop as the local chat (tee/chat.py `run_chat`)
drives it. Over HTTPS the connection is checked either against a CA file, or against the one
certificate an attestation pinned (`teesplit chat --attest POLICY`: nothing is sent but the
attestation request until the quote, the policy and the binding all passed).

When the history outgrows the model's context (the server answers 400
context_length_exceeded), the oldest exchange is dropped and the turn is sent again.
"""

from __future__ import annotations

import http.client
import json
import ssl
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from teesplit.errors import UsageError
from teesplit.protocol import RemoteError
from teesplit.tee import attest_client as ac
from teesplit.tee.tls import client_context

MAX_EVENT_BYTES = 1 << 20


class RemoteChatSession:
    """The history and the numbers of one conversation with a remote API."""

    def __init__(
        self,
        url: str,
        *,
        ssl_context: ssl.SSLContext | None = None,
        api_key: str | None = None,
        max_tokens: int = 256,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        system: str | None = None,
        timeout: float = 600.0,
    ):
        u = urllib.parse.urlsplit(url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise UsageError(f"--api {url}: give http(s)://HOST:PORT")
        self.url = url
        self.https = u.scheme == "https"
        self.host, self.port = u.hostname, u.port or (443 if self.https else 80)
        prefix = u.path.rstrip("/")
        self.prefix = prefix[: -len("/v1")] if prefix.endswith("/v1") else prefix
        self.ssl_context = ssl_context or (ssl.create_default_context() if self.https else None)
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.sampling: dict[str, Any] = {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p}
        if top_k:
            self.sampling["top_k"] = top_k
        if seed is not None:
            self.sampling["seed"] = seed
        self.system = system
        self.timeout = timeout
        self.messages: list[dict[str, str]] = []
        self.last = None  # the local chat's per-turn runner stats; a remote API has none
        self.turns = self.tokens = 0
        self.seconds = 0.0
        self.model = self._model_id()

    # -- HTTP ------------------------------------------------------------------------------
    def _connection(self) -> http.client.HTTPConnection:
        if self.https:
            return http.client.HTTPSConnection(
                self.host, self.port, context=self.ssl_context, timeout=self.timeout
            )
        return http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)

    def _request(self, method: str, path: str, body: Any = None):
        """(connection, response): the caller reads the body and closes the connection."""
        conn = self._connection()
        try:
            data = None if body is None else json.dumps(body).encode()
            conn.request(method, self.prefix + path, body=data, headers=self.headers)
            return conn, conn.getresponse()
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            raise RemoteError("unreachable", f"cannot reach the API at {self.url}: {e}") from None

    @staticmethod
    def _error(status: int, raw: bytes) -> RemoteError:
        try:
            err = json.loads(raw)["error"]
            return RemoteError(str(err.get("code") or status), str(err.get("message")))
        except (ValueError, KeyError, TypeError):
            return RemoteError(str(status), raw[:200].decode(errors="replace"))

    def _model_id(self) -> str:
        """The one model the API serves (and a check of the key before the first prompt)."""
        conn, r = self._request("GET", "/v1/models")
        try:
            raw = r.read(MAX_EVENT_BYTES)
        finally:
            conn.close()
        if r.status != 200:
            raise self._error(r.status, raw)
        try:
            return json.loads(raw)["data"][0]["id"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise RemoteError("bad_reply", f"{self.url}/v1/models lists no model") from None

    # -- the conversation ------------------------------------------------------------------
    def reset(self) -> None:
        self.messages = []

    def ask(self, user: str, on_text: Callable[[str], Any]) -> str:
        history = self.messages + [{"role": "user", "content": user}]
        sampling = dict(self.sampling)
        started = time.perf_counter()
        while True:
            msgs = ([{"role": "system", "content": self.system}] if self.system else []) + history
            body = {"model": self.model, "messages": msgs, "stream": True, **sampling}
            body["stream_options"] = {"include_usage": True}
            conn, r = self._request("POST", "/v1/chat/completions", body)
            try:
                if r.status == 200:
                    text, completion_tokens = self._read_stream(r, on_text)
                    break
                err = self._error(r.status, r.read(MAX_EVENT_BYTES))
            finally:
                conn.close()
            if err.code != "context_length_exceeded":
                raise err
            if len(history) > 2:  # drop the oldest exchange, as the local chat does
                history = history[2:]
            elif "max_tokens" in sampling:  # alone and still too long: let the server use the room left
                del sampling["max_tokens"]
            else:
                raise ValueError(f"the message is too long for the model's context: {err.remote_message}")
        self.messages = history + [{"role": "assistant", "content": text}]
        self.turns += 1
        self.tokens += completion_tokens
        self.seconds += time.perf_counter() - started
        return text

    def _read_stream(self, r: http.client.HTTPResponse, on_text: Callable[[str], Any]) -> tuple[str, int]:
        pieces: list[str] = []
        completion_tokens = 0
        try:
            while True:
                line = r.readline(MAX_EVENT_BYTES)
                if not line:
                    raise RemoteError("stream_ended", "the API closed the stream before [DONE]")
                line = line.strip()
                if not line.startswith(b"data: "):
                    continue
                payload = line[len(b"data: ") :]
                if payload == b"[DONE]":
                    return "".join(pieces), completion_tokens
                event = json.loads(payload)
                if "error" in event:
                    e = event["error"]
                    raise RemoteError(str(e.get("code")), str(e.get("message")))
                if event.get("usage"):
                    completion_tokens = int(event["usage"].get("completion_tokens", 0))
                for choice in event.get("choices", []):
                    piece = (choice.get("delta") or {}).get("content") or ""
                    if piece:
                        pieces.append(piece)
                        on_text(piece)
        except (OSError, http.client.HTTPException, ValueError) as e:
            raise RemoteError("stream_broken", f"the stream from {self.url} broke: {e}") from None

    def totals(self) -> str:
        rate = f", {self.tokens / self.seconds:.1f} tok/s as seen here" if self.seconds else ""
        return (
            f"session: {self.turns} turn(s), {len(self.messages) // 2} in the history, "
            f"{self.tokens} tokens generated by {self.url} (model {self.model}){rate}"
        )


def connect(
    url: str,
    *,
    api_key: str | None = None,
    ca_file: str | None = None,
    attest_policy: str | None = None,
    collateral_file: str | None = None,
    pccs_url: str = ac.INTEL_PCS_URL,
    log: Callable[[str], Any] = print,
    **sampling: Any,
) -> RemoteChatSession:
    """A session with the API at `url`. With `attest_policy`, attest first (the verdict goes to
    `log`; AttestationFailed when it fails) and pin the attested certificate."""
    context = client_context(ca_file) if url.startswith("https") else None
    if attest_policy:
        try:
            att = ac.attest(
                url,
                ac.Policy.load(attest_policy),
                collateral_json=Path(collateral_file).read_text() if collateral_file else None,
                pccs_url=pccs_url,
                api_key=api_key,
                ca_file=ca_file,
            )
        except ac.AttestationFailed as e:
            log(ac.format_verdict(e.verdict, e.outcome, str(e)))
            log("not chatting with an endpoint that failed its attestation")
            raise
        log(ac.format_verdict(att.verdict, ac.Outcome.VERIFIED))
        context = att.ssl_context()  # from here on, the attested certificate and no other
    return RemoteChatSession(url, ssl_context=context, api_key=api_key, **sampling)
