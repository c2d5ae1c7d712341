"""An OpenAI-compatible HTTP API on the trusted side (TRUSTED side).

Clients talk to the enclave; the enclave talks to the GPU. The prompt and the answer are in
the clear only here. Endpoints:

    GET  /v1/models                  the one model served
    GET  /v1/models/{id}
    POST /v1/chat/completions        messages -> chat template -> generation
    POST /v1/completions             prompt (text or token ids) -> generation
    GET  /metrics                    Prometheus text format
    GET  /health                     200 when the GPU server answered the last time it was asked
    GET  /v1/attestation?nonce=HEX   a TEE quote bound to the TLS certificate (tee/attestation.py)

Both POST endpoints take `stream: true` (server-sent events, one chunk per generated token
that completes text). Beyond OpenAI's fields, `top_k` and `ignore_eos` (as in vLLM) are
accepted. Every field of a request is validated: a bad request gets 400 with an
OpenAI-shaped error ({"error": {"message", "type", "param", "code"}}), an unknown path or
model 404, an unreachable GPU server 503. Requests share one GPU connection through the
continuous-batching `Engine` (tee/serving.py). Standard library only (http.server).

The front door: with a certificate (tee/tls.py) the API speaks only HTTPS, the TLS ending in
this process; with API keys (tee/apikeys.py) every endpoint but /health (and /metrics when
left open) needs `Authorization: Bearer KEY`, else 401 in OpenAI's error shape.

Under abuse, every cost is bounded before it is paid: a body is at most MAX_BODY_BYTES; a
prompt is at most `max_prompt_bytes` (the context length times the most bytes one token
decodes to: longer text cannot fit) before it is tokenized; tokenizing releases Python's
global lock (tee/tokenizer.py) and at most TOKENIZE_AT_ONCE requests tokenize at once, so the
scheduler keeps decoding; a client (its API key, else its address) has at most
`max_per_client` generations in flight (429 past that); JSON nested too deep or strings that
are not valid Unicode get 400; metric labels come from a fixed set (an unknown path is
"other"); the listen backlog is `backlog`; accepted sockets have TCP_NODELAY; a client that
disconnects, streaming or not, frees its row at the scheduler's next step; and a failure
inside a handler is answered 500 in OpenAI's error shape, never by a closed connection.
"""

from __future__ import annotations

import json
import math
import queue
import select
import socket
import sys
import threading
import time
import traceback
import urllib.parse
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from teesplit.tee.apikeys import APIKeys
from teesplit.tee.attestation import AttestationService, EvidenceError, parse_nonce
from teesplit.tee.generate import SamplingParams
from teesplit.tee.serving import Engine, Request, ServingError
from teesplit.tee.tls import ServedCertificate, TLSHTTPServer
from teesplit.tee.tokenizer import ChatTemplateError, Tokenizer

MAX_BODY_BYTES = 4 << 20
MAX_STOP = 4
ROLES = ("system", "developer", "user", "assistant")
TOKENIZE_AT_ONCE = 2  # requests tokenizing at the same time (each releases the GIL while it does)
DEFAULT_BACKLOG = 128
DEFAULT_MAX_PER_CLIENT = 16  # the CLI passes its --max-batch
# The only values of the `endpoint` label of the HTTP metrics: anything else counts as "other".
ENDPOINTS = frozenset(
    {
        "/v1/models",
        "/v1/models/{id}",
        "/v1/chat/completions",
        "/v1/completions",
        "/metrics",
        "/health",
        "/v1/attestation",
    }
)
_POLLRDHUP = getattr(select, "POLLRDHUP", 0)  # Linux: the peer closed its end

COMMON_FIELDS = {
    "model",
    "stream",
    "stream_options",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "stop",
    "n",
    "user",
    "presence_penalty",
    "frequency_penalty",
    "logprobs",
    "logit_bias",
    "ignore_eos",  # an extension (as in vLLM): generate max_tokens whatever the model says
}
CHAT_FIELDS = COMMON_FIELDS | {"messages", "max_completion_tokens", "top_logprobs", "response_format"}
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt", "echo", "suffix", "best_of"}


class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type_: str | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type_ or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param, code)


def from_serving(e: ServingError) -> APIError:
    return APIError(e.status, str(e), None, e.code)


# ---- request validation --------------------------------------------------------------------
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, int | float) and not isinstance(v, bool)) and math.isfinite(v)


def _number(body: dict, name: str, lo: float, hi: float, default: float) -> float:
    v = body.get(name)
    if v is None:
        return default
    if not _is_number(v) or not lo <= v <= hi:
        raise bad(f"'{name}' must be a number between {lo:g} and {hi:g}, got {v!r}", name)
    return float(v)


def _optional_int(body: dict, name: str, lo: int, hi: int) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if not _is_int(v) or not lo <= v <= hi:
        raise bad(f"'{name}' must be an integer between {lo} and {hi}, got {v!r}", name)
    return v


class Parsed:
    """A validated generation request."""

    def __init__(
        self, prompt: list[int], params: SamplingParams, stream: bool, include_usage: bool, ignore_eos: bool
    ):
        self.ignore_eos = ignore_eos
        self.prompt = prompt
        self.params = params
        self.stream = stream
        self.include_usage = include_usage


class Validator:
    """Turns a request body into prompt ids and sampling parameters, or raises APIError(400/404)."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        model_id: str,
        context: int,
        vocab_size: int,
        max_prompt_bytes: int | None = None,
    ):
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.context = context
        self.vocab_size = vocab_size
        self.max_prompt_bytes = max_prompt_bytes  # None: unchecked before tokenizing

    def _check_prompt_bytes(self, texts: list[str], param: str) -> None:
        """Refuse text that cannot fit the context, before paying for its tokenization."""
        limit = self.max_prompt_bytes
        if limit is None:
            return
        n = 0
        for t in texts:
            n += len(t)  # characters first: never more than the bytes, and free to count
        if n > limit or sum(len(t.encode("utf-8")) for t in texts) > limit:
            raise bad(
                f"the prompt is longer than this model's context of {self.context} tokens can hold: at most "
                f"{limit} bytes of text (each token is at most {limit // self.context} bytes)",
                param,
                "context_length_exceeded",
            )

    def chat(self, body: Any) -> Parsed:
        body = self._common(body, CHAT_FIELDS)
        messages = self._messages(body.get("messages"))
        if body.get("top_logprobs") is not None:
            raise bad("'top_logprobs' is not supported", "top_logprobs", "unsupported_parameter")
        fmt = body.get("response_format")
        if fmt is not None and fmt != {"type": "text"}:
            raise bad("only response_format {'type': 'text'} is supported", "response_format")
        self._check_prompt_bytes([m["content"] for m in messages], "messages")
        try:
            prompt = self.tokenizer.apply_chat_template(messages)
        except ChatTemplateError as e:
            raise bad(str(e), "messages") from None
        mt, mct = body.get("max_tokens"), body.get("max_completion_tokens")
        if mt is not None and mct is not None and mt != mct:
            raise bad("give 'max_tokens' or 'max_completion_tokens', not both", "max_completion_tokens")
        name = "max_completion_tokens" if mct is not None else "max_tokens"
        return self._finish(body, prompt, "messages", name)

    def completion(self, body: Any) -> Parsed:
        body = self._common(body, COMPLETION_FIELDS)
        if body.get("echo") not in (None, False):
            raise bad("'echo' is not supported", "echo", "unsupported_parameter")
        if body.get("suffix") not in (None, ""):
            raise bad("'suffix' is not supported", "suffix", "unsupported_parameter")
        if body.get("best_of") not in (None, 1):
            raise bad("only 'best_of' 1 is supported", "best_of", "unsupported_parameter")
        prompt = self._prompt(body.get("prompt"))
        return self._finish(body, prompt, "prompt", "max_tokens")

    # -- parts -----------------------------------------------------------------------------
    def _common(self, body: Any, allowed: set[str]) -> dict:
        if not isinstance(body, dict):
            raise bad("the request body must be a JSON object")
        unknown = sorted(set(body) - allowed)
        if unknown:
            raise bad(
                f"Unrecognized request argument supplied: {unknown[0]}", unknown[0], "unknown_parameter"
            )
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise bad("'model' is required and must be a string", "model")
        if model != self.model_id:
            raise APIError(
                404,
                f"The model '{model}' does not exist; this server serves '{self.model_id}'",
                "model",
                "model_not_found",
            )
        for flag in ("stream", "logprobs", "ignore_eos"):
            if body.get(flag) is not None and not isinstance(body[flag], bool):
                raise bad(f"'{flag}' must be a boolean", flag)
        if body.get("logprobs"):
            raise bad("'logprobs' is not supported", "logprobs", "unsupported_parameter")
        if body.get("n") is not None and (not _is_int(body["n"]) or body["n"] != 1):
            raise bad("only 'n' 1 is supported", "n", "unsupported_parameter")
        for name in ("presence_penalty", "frequency_penalty"):
            if _number(body, name, -2.0, 2.0, 0.0) != 0.0:
                raise bad(f"'{name}' is not supported (only 0)", name, "unsupported_parameter")
        bias = body.get("logit_bias")
        if bias is not None and (not isinstance(bias, dict) or bias):
            raise bad("'logit_bias' is not supported", "logit_bias", "unsupported_parameter")
        if body.get("user") is not None and not isinstance(body["user"], str):
            raise bad("'user' must be a string", "user")
        opts = body.get("stream_options")
        if opts is not None:
            if not body.get("stream"):
                raise bad("'stream_options' is only allowed with 'stream': true", "stream_options")
            if not isinstance(opts, dict) or set(opts) - {"include_usage"}:
                raise bad("'stream_options' may only hold 'include_usage'", "stream_options")
            if not isinstance(opts.get("include_usage", False), bool):
                raise bad("'stream_options.include_usage' must be a boolean", "stream_options")
        return body

    def _messages(self, messages: Any) -> list[dict[str, str]]:
        if not isinstance(messages, list) or not messages:
            raise bad("'messages' must be a non-empty array", "messages")
        out = []
        for i, m in enumerate(messages):
            where = f"messages[{i}]"
            if not isinstance(m, dict):
                raise bad(f"{where} must be an object", where)
            unknown = sorted(set(m) - {"role", "content", "name"})
            if unknown:
                raise bad(f"{where}: unsupported field '{unknown[0]}'", f"{where}.{unknown[0]}")
            role = m.get("role")
            if role not in ROLES:
                raise bad(f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}", f"{where}.role")
            if m.get("name") is not None and not isinstance(m["name"], str):
                raise bad(f"{where}.name must be a string", f"{where}.name")
            out.append(
                {"role": "system" if role == "developer" else role, "content": self._content(m, where)}
            )
        return out

    @staticmethod
    def _content(m: dict, where: str) -> str:
        content = m.get("content")
        if isinstance(content, str):
            return content
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                if (
                    not isinstance(part, dict)
                    or part.get("type") != "text"
                    or not isinstance(part.get("text"), str)
                ):
                    raise bad(
                        f"{where}.content[{j}] must be a text part (only text is supported)",
                        f"{where}.content",
                    )
                parts.append(part["text"])
            return "".join(parts)
        raise bad(f"{where}.content must be a string or an array of text parts", f"{where}.content")

    def _prompt(self, prompt: Any) -> list[int]:
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, str):
            if not prompt:
                raise bad("'prompt' is empty", "prompt")
            self._check_prompt_bytes([prompt], "prompt")
            return self.tokenizer.encode(prompt)
        if isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
            if len(prompt) > self.context:
                raise bad(
                    f"the prompt has {len(prompt)} tokens; this model's context is {self.context} tokens",
                    "prompt",
                    "context_length_exceeded",
                )
            if not all(0 <= t < self.vocab_size for t in prompt):
                raise bad(f"'prompt' token ids must lie in [0, {self.vocab_size})", "prompt")
            return list(prompt)
        raise bad(
            "'prompt' must be a non-empty string or array of token ids (one prompt per request)", "prompt"
        )

    def _finish(self, body: dict, prompt: list[int], prompt_param: str, max_name: str) -> Parsed:
        if not prompt:
            raise bad("the prompt has no tokens", prompt_param)
        room = self.context - len(prompt)
        if room < 1:
            raise bad(
                f"the prompt has {len(prompt)} tokens; this model's context is {self.context} tokens",
                prompt_param,
                "context_length_exceeded",
            )
        max_tokens = _optional_int(body, max_name, 1, 1 << 31)
        if max_tokens is not None and max_tokens > room:
            raise bad(
                f"this model's context is {self.context} tokens; the prompt has {len(prompt)}, so "
                f"'{max_name}' may be at most {room}, got {max_tokens}",
                max_name,
                "context_length_exceeded",
            )
        temperature = _number(body, "temperature", 0.0, 2.0, 1.0)
        top_p = _number(body, "top_p", 0.0, 1.0, 1.0)
        if top_p == 0.0:  # the smallest nucleus is the top token alone
            temperature, top_p = 0.0, 1.0
        top_k = _optional_int(body, "top_k", 0, self.vocab_size) or 0
        seed = _optional_int(body, "seed", 0, (1 << 63) - 1)
        stop = body.get("stop")
        if stop is None:
            stop = []
        elif isinstance(stop, str):
            stop = [stop]
        if (
            not isinstance(stop, list)
            or len(stop) > MAX_STOP
            or not all(isinstance(s, str) and s for s in stop)
        ):
            raise bad(f"'stop' must be a non-empty string or an array of up to {MAX_STOP} of them", "stop")
        params = SamplingParams(
            max_new_tokens=room if max_tokens is None else max_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            stop=tuple(stop),
        )
        opts = body.get("stream_options") or {}
        return Parsed(
            prompt,
            params,
            bool(body.get("stream")),
            bool(opts.get("include_usage")),
            bool(body.get("ignore_eos")),
        )


# ---- the server ----------------------------------------------------------------------------
class APIServer:
    """The HTTP front of an Engine. `serve_forever()` blocks; `shutdown()` from another thread."""

    def __init__(
        self,
        engine: Engine,
        tokenizer: Tokenizer,
        model_id: str,
        context: int,
        vocab_size: int,
        plan: str,
        host: str = "127.0.0.1",
        port: int = 8000,
        request_timeout_s: float = 3600.0,
        log=None,
        tls: ServedCertificate | None = None,
        api_keys: APIKeys | None = None,
        metrics_open: bool = False,
        attestation: AttestationService | None = None,
        backlog: int = DEFAULT_BACKLOG,
        max_per_client: int = DEFAULT_MAX_PER_CLIENT,
    ):
        """`tls`: serve HTTPS with this certificate. `api_keys`: require one of them.
        `attestation`: answer GET /v1/attestation (None: the endpoint is off, 404). `backlog`:
        connections the kernel queues before accepting. `max_per_client`: generations one client
        (API key, else address) may have in flight."""
        self.engine = engine
        token_bytes = getattr(tokenizer, "max_token_bytes", None)
        max_prompt_bytes = context * token_bytes() if token_bytes is not None else None
        self.validator = Validator(tokenizer, model_id, context, vocab_size, max_prompt_bytes)
        self.max_per_client = max_per_client
        self._in_flight: dict[str, int] = {}  # client -> generations in flight
        self.tokenizing = threading.BoundedSemaphore(TOKENIZE_AT_ONCE)
        self.model_id = model_id
        self.plan = plan
        self.created = int(time.time())
        self.request_timeout_s = request_timeout_s
        self.log = log
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}  # (endpoint, status) -> count
        self.tls = tls
        self.api_keys = api_keys or APIKeys()
        self.open_paths = {"/health", "/metrics"} if metrics_open else {"/health"}
        self.attestation = attestation
        if tls is not None:
            self.httpd = TLSHTTPServer((host, port), _make_handler(self), tls.context, log)
        else:
            self.httpd = ThreadingHTTPServer((host, port), _make_handler(self))
        self.httpd.daemon_threads = True
        # http.server listens with a backlog of 5: a burst of connections past it is reset.
        # Listening again on the bound socket only changes the backlog.
        self.httpd.socket.listen(max(1, backlog))

    @property
    def address(self) -> tuple[str, int]:
        return self.httpd.server_address[:2]

    def serve_forever(self) -> None:
        self.httpd.serve_forever(poll_interval=0.2)

    def shutdown(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def count(self, endpoint: str, status: int) -> None:
        if endpoint not in ENDPOINTS:  # labels from a fixed set: no client can grow /metrics
            endpoint = "other"
        with self.lock:
            self.requests[(endpoint, status)] = self.requests.get((endpoint, status), 0) + 1

    def admit(self, client: str) -> None:
        """Count one more generation of `client` in flight, or APIError 429 past its limit."""
        with self.lock:
            n = self._in_flight.get(client, 0)
            if n >= self.max_per_client:
                raise APIError(
                    429,
                    f"this client already has {n} requests in flight, the server's limit per client "
                    f"(teesplit api --max-per-client); wait for one to finish",
                    None,
                    "too_many_requests",
                    "rate_limit_exceeded",
                )
            self._in_flight[client] = n + 1

    def release(self, client: str) -> None:
        with self.lock:
            n = self._in_flight.get(client, 0) - 1
            if n > 0:
                self._in_flight[client] = n
            else:
                self._in_flight.pop(client, None)

    def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [self.model_card()]}

    def model_card(self) -> dict[str, Any]:
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "teesplit"}

    def metrics_text(self) -> str:
        return render_metrics(self)

    def authorize(self, path: str, authorization: str | None) -> None:
        """APIError 401 unless `path` is open or the header carries a configured key."""
        if not self.api_keys or path in self.open_paths:
            return
        why = self.api_keys.check(authorization)
        if why == "missing":
            raise APIError(
                401,
                "You didn't provide an API key. Send it as 'Authorization: Bearer KEY'.",
                None,
                "missing_api_key",
            )
        if why is not None:  # the presented key is never echoed: it may be someone's real key
            raise APIError(401, "Incorrect API key provided.", None, "invalid_api_key")

    def evidence(self, query: str) -> dict[str, Any]:
        if self.attestation is None:
            raise APIError(
                404, "attestation is turned off on this server (--attestation none)", None, "unknown_url"
            )
        nonce_text = urllib.parse.parse_qs(query).get("nonce", [None])[0]
        try:
            nonce = parse_nonce(nonce_text)
        except ValueError as e:
            raise bad(str(e), "nonce") from None
        try:
            return self.attestation.evidence(nonce)
        except EvidenceError as e:
            raise APIError(
                501, f"attestation is not available: {e}", None, "attestation_unavailable"
            ) from None


def _make_handler(api: APIServer) -> type[BaseHTTPRequestHandler]:
    class Handler(_Handler):
        server_api = api

    return Handler


class _Handler(BaseHTTPRequestHandler):
    server_api: APIServer
    protocol_version = "HTTP/1.1"
    server_version = "teesplit-api"
    # A connection that sends nothing (or reads nothing of a stream) for this long is dropped,
    # so idle or stalled clients do not hold a thread forever.
    timeout = 300

    def setup(self) -> None:
        # Small answers on a kept-alive connection must not wait for Nagle and delayed ACKs
        # (42 ms a request without this; TLS sockets too: setsockopt reaches the TCP socket).
        try:
            self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        super().setup()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        if self.server_api.log is not None:
            self.server_api.log(f"{self.address_string()} {format % args}")

    def _guarded(self, method) -> None:
        """A failure in a handler is a 500 in OpenAI's shape (its traceback to stderr), never a
        connection closed without an answer."""
        try:
            method()
        except Exception:
            traceback.print_exc(file=sys.stderr)
            self.close_connection = True
            err = APIError(500, "internal error in the API server", None, "internal_error")
            try:
                self._error(err, "other")
            except Exception:  # the answer could not be written either: the connection closes
                pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._guarded(self._get)

    def do_POST(self) -> None:  # noqa: N802
        self._guarded(self._post)

    def client_key(self) -> str:
        """Whom the per-client limit counts: the API key when keys are configured, else the address."""
        if self.server_api.api_keys:
            return "key:" + (self.headers.get("Authorization") or "")
        return "addr:" + self.client_address[0]

    def client_gone(self) -> bool:
        """Whether the client closed its end (or reset it) while its answer is computed."""
        try:
            p = select.poll()
            p.register(self.connection, select.POLLIN | _POLLRDHUP)
            events = p.poll(0)
        except (OSError, ValueError):  # closed already
            return True
        return any(ev & (_POLLRDHUP | select.POLLHUP | select.POLLERR) for _, ev in events)

    # -- routing ---------------------------------------------------------------------------
    def _get(self) -> None:
        path, _, query = self.path.partition("?")
        path = path.rstrip("/")
        api = self.server_api
        try:
            api.authorize(path, self.headers.get("Authorization"))
            if path == "/v1/models":
                self._json(200, api.models(), path)
            elif path.startswith("/v1/models/"):
                name = path[len("/v1/models/") :]
                if name != api.model_id:
                    raise APIError(404, f"The model '{name}' does not exist", "model", "model_not_found")
                self._json(200, api.model_card(), "/v1/models/{id}")
            elif path == "/metrics":
                self._send(200, api.metrics_text().encode(), "text/plain; version=0.0.4; charset=utf-8", path)
            elif path == "/health":
                up = api.engine.model is not None
                body = {"status": "ok" if up else "gpu_unavailable", "detail": api.engine.last_error}
                self._json(200 if up else 503, body, path)
            elif path == "/v1/attestation":
                self._json(200, api.evidence(query), path)
            else:
                raise APIError(404, f"Unknown request URL: GET {self.path}", None, "unknown_url")
        except APIError as e:
            self._error(e, path)

    def _post(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        api = self.server_api
        try:
            try:
                api.authorize(path, self.headers.get("Authorization"))
            except APIError:
                self._discard_body()
                raise
            if path == "/v1/chat/completions":
                parse, kind = api.validator.chat, "chat"
            elif path == "/v1/completions":
                parse, kind = api.validator.completion, "text"
            else:
                self._discard_body()
                raise APIError(404, f"Unknown request URL: POST {self.path}", None, "unknown_url")
            body = self._read_json()
            client = self.client_key()
            api.admit(client)
            try:
                with api.tokenizing:  # a bounded pool: tokenizing releases the GIL, not the CPU
                    parsed = parse(body)
                del body
                try:
                    req = api.engine.submit(parsed.prompt, parsed.params, parsed.ignore_eos)
                except ServingError as e:
                    raise from_serving(e) from None
                try:
                    self._answer(req, parsed, kind, path)
                finally:
                    req.cancel()  # no-op when it finished; frees the row when the client left
            finally:
                api.release(client)
        except APIError as e:
            self._error(e, path)

    def _not_allowed(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        self._discard_body()
        self._error(APIError(405, f"Method {self.command} is not allowed for {self.path}"), path)

    do_PUT = do_DELETE = do_PATCH = _not_allowed

    # -- bodies ----------------------------------------------------------------------------
    def _content_length(self) -> int:
        raw = self.headers.get("Content-Length")
        if raw is None:
            if self.headers.get("Transfer-Encoding"):
                self.close_connection = True
                raise APIError(411, "send the body with a Content-Length (chunked bodies are not supported)")
            return 0
        try:
            n = int(raw)
        except ValueError:
            self.close_connection = True
            raise bad("bad Content-Length header") from None
        if n < 0:
            self.close_connection = True
            raise bad("bad Content-Length header")
        return n

    def _discard_body(self) -> None:
        try:
            n = self._content_length()
        except APIError:
            return
        if n > MAX_BODY_BYTES:
            self.close_connection = True
        elif n:
            self.rfile.read(n)

    def _read_json(self) -> Any:
        n = self._content_length()
        if n > MAX_BODY_BYTES:
            self.close_connection = True
            raise APIError(413, f"the request body is larger than {MAX_BODY_BYTES} bytes")
        raw = self.rfile.read(n)
        if len(raw) != n:
            self.close_connection = True
            raise bad("the request body ended early")
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise bad(f"the request body is not valid JSON: {e}") from None
        except RecursionError:
            raise bad("the request body is nested too deeply") from None
        _check_unicode(body)
        return body

    # -- replies ---------------------------------------------------------------------------
    def _send(self, status: int, body: bytes, ctype: str, endpoint: str) -> None:
        self.server_api.count(endpoint, status)
        self.send_response(status)
        if status == 401:
            self.send_header("WWW-Authenticate", 'Bearer realm="teesplit"')
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        try:
            self.wfile.write(body)
        except OSError:  # the client left (reset, broken pipe, timed out)
            self.close_connection = True

    def _json(self, status: int, obj: Any, endpoint: str) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json", endpoint)

    def _error(self, e: APIError, endpoint: str) -> None:
        self._json(e.status, e.body(), endpoint)  # count() keeps the label in ENDPOINTS

    def _next_event(self, req: Request):
        deadline = time.monotonic() + self.server_api.request_timeout_s
        while True:
            try:
                return req.wait(timeout=0.5)
            except queue.Empty:
                if self.client_gone():  # e.g. waiting for a prefill: free the row at the next step
                    req.cancel()
                if not self.server_api.engine.alive:
                    raise APIError(503, "the scheduler stopped", None, "shutting_down") from None
                if time.monotonic() > deadline:
                    raise APIError(504, "the generation took too long", None, "timeout") from None

    def _answer(self, req: Request, parsed: Parsed, kind: str, endpoint: str) -> None:
        api = self.server_api
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        event = self._next_event(req)  # the first event decides the status: 200, or an error
        if event.kind == "error":
            raise from_serving(event.error)
        if not parsed.stream:
            text = []
            while event.kind == "token":
                text.append(event.text)
                if self.client_gone():  # nobody will read the answer: free the row now
                    req.cancel()
                    self.close_connection = True
                    return
                event = self._next_event(req)
            if event.kind == "error":
                raise from_serving(event.error)
            choice: dict[str, Any] = {"index": 0, "finish_reason": event.finish_reason, "logprobs": None}
            if kind == "chat":
                choice["message"] = {"role": "assistant", "content": "".join(text)}
            else:
                choice["text"] = "".join(text)
            body = {
                "id": rid,
                "object": "chat.completion" if kind == "chat" else "text_completion",
                "created": created,
                "model": api.model_id,
                "choices": [choice],
                "usage": _usage(req),
            }
            self._json(200, body, endpoint)
            return
        self._stream(req, event, parsed, kind, rid, created, endpoint)

    def _stream(self, req, event, parsed: Parsed, kind: str, rid: str, created: int, endpoint: str) -> None:
        api = self.server_api
        api.count(endpoint, 200)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")  # the stream ends when the connection does
        self.end_headers()
        self.close_connection = True
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

        def chunk(delta: dict | str | None, finish: str | None) -> dict:
            c: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
            if kind == "chat":
                c["delta"] = delta or {}
            else:
                c["text"] = delta or ""
            return {"id": rid, "object": obj, "created": created, "model": api.model_id, "choices": [c]}

        try:
            if kind == "chat":
                self._sse(chunk({"role": "assistant", "content": ""}, None))
            while event.kind == "token":
                if event.text:
                    self._sse(chunk({"content": event.text} if kind == "chat" else event.text, None))
                event = self._next_event(req)
            if event.kind == "error":  # counted in teesplit_generation_errors_total
                self._sse(from_serving(event.error).body())
                return
            self._sse(chunk(None, event.finish_reason))
            if parsed.include_usage:
                self._sse(
                    {
                        "id": rid,
                        "object": obj,
                        "created": created,
                        "model": api.model_id,
                        "choices": [],
                        "usage": _usage(req),
                    }
                )
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except APIError as e:  # a scheduler that stopped or a timeout, mid-stream
            try:
                self._sse(e.body())
            except OSError:
                pass
        except OSError:  # the client left (reset, broken pipe, timed out): free its row
            req.cancel()

    def _sse(self, obj: Any) -> None:
        self.wfile.write(b"data: " + json.dumps(obj).encode() + b"\n\n")
        self.wfile.flush()


def _check_unicode(obj: Any) -> None:
    """400 for a string that is not valid Unicode: JSON's escapes can spell a lone surrogate
    ("\\ud800"), which Python keeps in a str but nothing downstream (the tokenizer, the
    reply's encoder) can take."""
    stack = [obj]
    while stack:
        o = stack.pop()
        if isinstance(o, str):
            try:
                o.encode("utf-8")
            except UnicodeEncodeError:
                why = "the request body holds a string that is not valid Unicode (a lone surrogate)"
                raise bad(why) from None
        elif isinstance(o, dict):
            stack.extend(o.keys())
            stack.extend(o.values())
        elif isinstance(o, list):
            stack.extend(o)


def _usage(req: Request) -> dict[str, int]:
    n = len(req.tokens)
    return {"prompt_tokens": len(req.prompt), "completion_tokens": n, "total_tokens": len(req.prompt) + n}


# ---- /metrics ------------------------------------------------------------------------------
def _label(v: Any) -> str:
    return str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render_metrics(api: APIServer) -> str:
    """Prometheus text exposition format (version 0.0.4)."""
    s = api.engine.snapshot()
    lines: list[str] = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[dict[str, Any], float]]) -> None:
        lines.append(f"# HELP {name} {help_}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            lab = ",".join(f'{k}="{_label(v)}"' for k, v in labels.items())
            lines.append(f"{name}{{{lab}}} {_num(value)}" if lab else f"{name} {_num(value)}")

    def histogram(name: str, help_: str, h) -> None:
        buckets, total, count = h
        lines.append(f"# HELP {name} {help_}")
        lines.append(f"# TYPE {name} histogram")
        for le, c in buckets:
            lines.append(f'{name}_bucket{{le="{_num(le)}"}} {c}')
        lines.append(f'{name}_bucket{{le="+Inf"}} {count}')
        lines.append(f"{name}_sum {_num(total)}")
        lines.append(f"{name}_count {count}")

    metric(
        "teesplit_info",
        "gauge",
        "The model and plan served.",
        [({"model": api.model_id, "plan": api.plan}, 1)],
    )
    metric(
        "teesplit_gpu_up",
        "gauge",
        "1 when connected to the GPU server.",
        [({}, int(api.engine.model is not None))],
    )
    with api.lock:
        reqs = sorted(api.requests.items())
    metric(
        "teesplit_http_requests_total",
        "counter",
        "HTTP requests by endpoint and status code (errors are the statuses >= 400).",
        [({"endpoint": e, "status": st}, n) for (e, st), n in reqs],
    )
    metric(
        "teesplit_http_errors_total",
        "counter",
        "HTTP requests answered with an error, by status code.",
        _by_status(reqs),
    )
    metric(
        "teesplit_generation_errors_total",
        "counter",
        "Generations that failed after they were accepted, by error code.",
        [({"code": k}, v) for k, v in sorted(s["errors"].items())],
    )
    metric(
        "teesplit_requests_finished_total",
        "counter",
        "Generations that finished, by reason (stop, length, cancelled).",
        [({"reason": k}, v) for k, v in sorted(s["finished"].items())],
    )
    metric("teesplit_prompt_tokens_total", "counter", "Prompt tokens prefilled.", [({}, s["prompt_tokens"])])
    metric("teesplit_completion_tokens_total", "counter", "Tokens generated.", [({}, s["completion_tokens"])])
    metric("teesplit_requests_running", "gauge", "Sequences in the running batch.", [({}, s["active"])])
    metric("teesplit_requests_waiting", "gauge", "Requests waiting to be prefilled.", [({}, s["waiting"])])
    metric("teesplit_prefill_passes_total", "counter", "Prefills done.", [({}, s["prefill_passes"])])
    chunks = [({}, s["prefill_chunks"])]
    metric("teesplit_prefill_chunks_total", "counter", "Prefill forward passes (chunks).", chunks)
    metric("teesplit_decode_steps_total", "counter", "Decode forward passes.", [({}, s["decode_steps"])])
    metric(
        "teesplit_decode_rows_total",
        "counter",
        "Rows over all decode passes (divided by the passes: the mean batch).",
        [({}, s["decode_rows"])],
    )
    histogram(
        "teesplit_time_to_first_token_seconds", "From a request's arrival to its first token.", s["ttft"]
    )
    histogram(
        "teesplit_time_per_output_token_seconds",
        "Per request: (last token - first token) / (tokens - 1).",
        s["tpot"],
    )
    rpc_total = sum(s["rpc"].values())
    metric(
        "teesplit_gpu_rpcs_total",
        "counter",
        "Round trips to the GPU server, by operation.",
        [({"op": k}, v) for k, v in sorted(s["rpc"].items())],
    )
    metric(
        "teesplit_gpu_bytes_total",
        "counter",
        "Bytes sent to and received from the GPU server.",
        [({"direction": "to_gpu"}, s["bytes_to_gpu"]), ({"direction": "from_gpu"}, s["bytes_from_gpu"])],
    )
    n = s["completion_tokens"]
    metric(
        "teesplit_gpu_rpcs_per_token",
        "gauge",
        "Round trips (prefill and decode) per generated token, since start.",
        [({}, rpc_total / n if n else 0.0)],
    )
    metric(
        "teesplit_gpu_bytes_per_token",
        "gauge",
        "Bytes (prefill and decode) per generated token, since start.",
        [
            ({"direction": "to_gpu"}, s["bytes_to_gpu"] / n if n else 0.0),
            ({"direction": "from_gpu"}, s["bytes_from_gpu"] / n if n else 0.0),
        ],
    )
    return "\n".join(lines) + "\n"


def _by_status(reqs: list) -> list[tuple[dict[str, Any], float]]:
    errors: dict[int, int] = {}
    for (_, status), n in reqs:
        if status >= 400:
            errors[status] = errors.get(status, 0) + n
    return [({"status": st}, n) for st, n in sorted(errors.items())]


def _num(v: float) -> str:
    if isinstance(v, int):
        return str(v)
    if math.isnan(v):
        return "NaN"
    return repr(float(v))
