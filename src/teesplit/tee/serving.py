"""Continuous batching for many concurrent requests over one GPU connection (TRUSTED side).

One scheduler thread owns the model and its GPU connection. Callers (HTTP handler threads)
`submit` a prompt and read events from the returned `Request`. At every iteration the
scheduler

1. takes the requests that arrived since the last step (up to `max_batch` in flight) and
   starts their prefill together, as one ragged batch;
2. runs ONE chunk (`prefill_chunk` prompt tokens) of one prefilling batch, in turn; a batch
   whose last chunk ran samples its rows' first tokens and joins the decoding rows. So a long
   prompt's prefill is spread over many iterations, and the other users' decode steps go on
   between its chunks: they wait at most one chunk, never the whole prompt;
3. runs ONE decode forward pass over every sequence still generating, so the GPU sees one
   round trip per crossing for all of them, whatever request each row belongs to;
4. drops the rows that finished (EOS, a stop string, their token budget, or a client that
   went away).

How rows join and leave depends on where the plan keeps the KV cache:

- trusted-side cache (v3, v2, v2-fused, v2-merged): the cache is numpy arrays here, so the
  newly prefilled rows are appended to the running batch and finished rows are cut out of
  it. Every decode step is one forward pass over exactly the live rows.
- GPU-side cache (v3-fused, v3-merged): the K/V live in a server session opened for a fixed
  batch, which cannot be merged with another session. Requests prefilled together share one
  session (a "cohort"); each step runs one decode pass per cohort, in turn, so no stream
  waits for another to finish; a finished row rides along in its cohort (no new tokens)
  until the cohort is empty. A cohort whose session the server lost is rebuilt by replay.

Each row samples with its own request's parameters and random generator (seeded as a solo
run would be), so a greedy request gets exactly the tokens a solo `Generator` run gives: the
rows, their sampling, stop rules and replay are the one decode loop's (tee/decode.py); this
module only decides which rows run together, and turns their tokens into events.
"""

from __future__ import annotations

import bisect
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any

from teesplit.errors import UsageError
from teesplit.protocol import ProtocolError, RemoteError
from teesplit.tee.assemble import ModelMismatch
from teesplit.tee.checkpoint import IntegrityError
from teesplit.tee.decode import Batch, Row, SamplingParams, eos_ids
from teesplit.tee.model import TEELlamaModel
from teesplit.transport import GPUServerUnavailable, LinkRefused

# --prefill-chunk auto in the API: between two chunks every other row gets its decode step, so
# this bounds the pause a long prompt puts on the other streams (BENCHMARKS.md: a 1,024-token
# prompt paused a stream 4.1 s in one pass, 2.4 s in chunks of 512, 0.86 s in chunks of 128).
API_PREFILL_CHUNK = 512


class ServingError(Exception):
    """A request that could not be served; `status` is the HTTP status it maps to."""

    def __init__(self, message: str, status: int = 500, code: str = "internal_error"):
        super().__init__(message)
        self.status = status
        self.code = code


# ---- requests and their events -------------------------------------------------------------
@dataclass
class Event:
    kind: str  # "token" (text may be ""), "done" or "error"
    text: str = ""
    finish_reason: str | None = None
    error: ServingError | None = None


class Request:
    """One generation in flight: the caller reads `events` until a "done" or "error" event."""

    def __init__(self, prompt: list[int], params: SamplingParams, ignore_eos: bool = False):
        self.prompt = list(prompt)
        self.params = params
        self.ignore_eos = ignore_eos  # generate the whole budget (benchmarks)
        self.events: queue.Queue[Event] = queue.Queue()
        self.tokens: list[int] = []
        self.finish_reason: str | None = None
        self.t_submit = time.perf_counter()
        self.t_first: float | None = None  # first token sampled
        self.t_last: float | None = None  # last token sampled
        self.t_tokens: list[float] = []  # when each token was added
        self.ended = False  # its last event ("done" or "error") is out
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        """The caller went away: the scheduler drops this row at its next step."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def wait(self, timeout: float | None = None) -> Event:
        return self.events.get(timeout=timeout)


# ---- metrics -------------------------------------------------------------------------------
class Histogram:
    """A Prometheus histogram: cumulative buckets, sum and count."""

    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, v: float) -> None:
        i = bisect.bisect_left(self.buckets, v)
        if i < len(self.counts):
            self.counts[i] += 1
        self.sum += v
        self.count += 1

    def cumulative(self) -> list[tuple[float, int]]:
        out, acc = [], 0
        for b, c in zip(self.buckets, self.counts, strict=True):
            acc += c
            out.append((b, acc))
        return out


LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass
class EngineMetrics:
    """Counters the scheduler keeps; read under `Engine.lock`."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    finished: Counter = field(default_factory=Counter)  # finish reason -> requests
    errors: Counter = field(default_factory=Counter)  # error code -> requests
    prefill_passes: int = 0  # prefills done (each one batch of requests)
    prefill_chunks: int = 0  # forward passes of prefills (a long prompt takes several)
    decode_steps: int = 0
    decode_rows: int = 0  # sum of rows over decode steps (mean batch = rows / steps)
    rpc: Counter = field(default_factory=Counter)
    bytes_to_gpu: int = 0
    bytes_from_gpu: int = 0
    ttft: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))
    tpot: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))


# ---- the scheduler -------------------------------------------------------------------------
class _Seq(Row):
    """One request's row: its tokens become events for the caller, and metrics."""

    def __init__(self, engine: Engine, req: Request, eos: set[int]):
        super().__init__(
            req.prompt, req.params, engine.tokenizer, set() if req.ignore_eos else eos, self._emit
        )
        self.engine = engine
        self.req = req
        self.tokens = req.tokens  # the caller reads them (usage counts)
        self.pending = ""  # text produced by the current token
        self.counted = False  # in Engine.active

    def _emit(self, text: str) -> None:
        self.pending += text

    @property
    def cancelled(self) -> bool:
        return self.req.cancelled

    def on_sample(self) -> None:
        req = self.req
        if req.t_first is None:
            req.t_first = time.perf_counter()
            with self.engine.lock:
                self.engine.metrics.ttft.observe(req.t_first - req.t_submit)

    def on_token(self, token: int) -> None:
        self.req.t_last = time.perf_counter()
        self.req.t_tokens.append(self.req.t_last)
        with self.engine.lock:
            self.engine.metrics.completion_tokens += 1
        self.req.events.put(Event("token", self.pending))
        self.pending = ""

    def on_finish(self, reason: str) -> None:
        req, engine = self.req, self.engine
        req.finish_reason = reason
        with engine.lock:
            engine.active -= self.counted
            self.counted = False
            engine.metrics.finished[reason] += 1
            if len(req.tokens) > 1 and req.t_first is not None and req.t_last is not None:
                engine.metrics.tpot.observe((req.t_last - req.t_first) / (len(req.tokens) - 1))
        if self.pending:
            req.events.put(Event("token", self.pending))
            self.pending = ""
        req.ended = True
        req.events.put(Event("done", finish_reason=reason))

    def fail(self, error: ServingError) -> None:
        """The row ends with an error event (its batch failed), counted once."""
        if self.done:
            return
        self.finish_reason = "error"
        with self.engine.lock:
            self.engine.metrics.errors[error.code] += 1
            self.engine.active -= self.counted
            self.counted = False
        self.req.ended = True
        self.req.events.put(Event("error", error=error))


class Engine:
    """The continuous-batching scheduler. `make_model` connects (and reconnects after a failure)."""

    def __init__(
        self,
        make_model: Callable[[], TEELlamaModel],
        tokenizer: Any,
        max_batch: int = 16,
        max_waiting: int = 256,
        max_recoveries: int = 3,
        prefill_chunk: int | str | None = None,
    ):
        if max_batch < 1:
            raise UsageError("max_batch must be >= 1")
        self.make_model = make_model
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.max_waiting = max_waiting
        self.max_recoveries = max_recoveries
        # A long prompt's memory bounded by chunk x context, and the other rows' pause by one
        # chunk: "auto" is API_PREFILL_CHUNK whatever the placement (a stream waits for a chunk).
        self.prefill_chunk = API_PREFILL_CHUNK if prefill_chunk == "auto" else prefill_chunk
        self.model: TEELlamaModel | None = None
        self.metrics = EngineMetrics()
        self.lock = threading.Lock()  # guards metrics and the counts below
        self.active = 0  # rows generating
        self.waiting = 0  # submitted, not yet prefilled
        self._queue: queue.Queue[Request] = queue.Queue()
        self._cohorts: list[Batch] = []  # each: rows sharing one KV cache
        self._prefilling: list[tuple[Batch, Generator[None, None, None]]] = []  # in turn, a chunk each
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_error: str | None = None  # why the GPU server is not usable, if it is not

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="teesplit-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def connect(self) -> TEELlamaModel:
        """The model, connecting first if needed (scheduler thread, or before start()). A
        failure is raised as the ServingError its requests get (its cause attached)."""
        if self.model is None:
            try:
                self.model = self.make_model()
                self.last_error = None
            except Exception as e:
                err = _as_serving_error(e)
                if err.status == 503:
                    self.last_error = str(e)
                raise err from e
        return self.model

    # -- callers ---------------------------------------------------------------------------
    def submit(self, prompt: list[int], params: SamplingParams, ignore_eos: bool = False) -> Request:
        params.validate()
        if not prompt:
            raise UsageError("the prompt is empty")
        with self.lock:
            if self.waiting >= self.max_waiting:
                raise ServingError(
                    f"the server is busy: {self.waiting} requests are waiting; retry later", 429, "busy"
                )
            self.waiting += 1
        req = Request(prompt, params, ignore_eos)
        self._queue.put(req)
        return req

    # -- the scheduler thread ----------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            new = self._take_new()
            try:
                if new:
                    self._start_prefill(new)
                if self._prefilling:
                    self._prefill_chunk()
                if self._cohorts:
                    self._decode_step()
            except Exception as e:  # never let one bad step kill the scheduler
                self._fail_all(new, e)
        shutdown = ServingError("the API server is shutting down", 503, "shutting_down")
        self._fail_all([], shutdown)
        while True:  # requests that never started
            try:
                req = self._queue.get_nowait()
            except queue.Empty:
                break
            req.events.put(Event("error", error=shutdown))

    def _take_new(self) -> list[Request]:
        live = sum(1 for c in self._cohorts for r in c.rows if not r.done)
        live += sum(len(b.rows) for b, _ in self._prefilling)
        new: list[Request] = []
        block = live == 0
        while live + len(new) < self.max_batch:
            try:
                req = self._queue.get(timeout=0.1) if block and not new else self._queue.get_nowait()
            except queue.Empty:
                break
            with self.lock:
                self.waiting -= 1
            if not req.cancelled:
                new.append(req)
        return new

    def _start_prefill(self, reqs: list[Request]) -> None:
        """The new requests become one batch, queued to prefill a chunk at a time."""
        try:
            model = self.connect()
        except Exception as e:  # unreachable, another model, another protocol version
            self._fail(reqs, e)
            return
        eos = eos_ids(model, self.tokenizer)
        seqs = [_Seq(self, r, eos) for r in reqs]
        m0 = model.gpu.metrics.copy()
        try:
            batch = Batch(model, seqs, max_recoveries=self.max_recoveries, prefill_chunk=self.prefill_chunk)
        except Exception as e:  # opening its GPU session failed
            self._fail(seqs, e)
            return
        finally:
            self._count_rpcs(model, m0)
        with self.lock:
            self.active += len(seqs)
        for s in seqs:
            s.counted = True
        self._prefilling.append((batch, batch.prefill_steps()))

    def _prefill_chunk(self) -> None:
        """One chunk of the first prefilling batch; it goes to the back of the line unless that
        was its last chunk, when it joins the decoding rows."""
        batch, steps = self._prefilling.pop(0)
        if all(r.cancelled for r in batch.rows):  # every caller went away: no more chunks
            for r in batch.rows:
                r.finish("cancelled")
            self._close(batch, None)
            return
        model = batch.model
        m0 = model.gpu.metrics.copy()
        try:
            next(steps)
        except StopIteration:  # its rows have their first tokens
            pass
        except Exception as e:
            self._close(batch, e)
            self._fail(batch.rows, e)
            return
        else:
            self._prefilling.append((batch, steps))
            return
        finally:
            with self.lock:
                self.metrics.prefill_chunks += 1
            self._count_rpcs(model, m0)
        with self.lock:
            self.metrics.prefill_passes += 1
            self.metrics.prompt_tokens += sum(len(r.prompt) for r in batch.rows)
        if model is not self.model:  # the connection failed meanwhile: its rows have their error
            return
        if model.plan.gpu_kv_cache or not self._cohorts:
            self._cohorts.append(batch)
        else:  # trusted-side cache: the new rows join the running batch
            self._cohorts[0].join(batch)
        self._prune()

    def _decode_step(self) -> None:
        for batch in list(self._cohorts):
            model = self.model
            if model is None or batch not in self._cohorts:
                continue  # the connection failed during this step: those rows have their error
            live = sum(not r.done for r in batch.rows)
            m0 = model.gpu.metrics.copy()
            try:
                batch.step()
            except Exception as e:
                self._cohorts.remove(batch)
                self._close(batch, e)
                self._fail(batch.rows, e)
                continue
            finally:
                self._count_rpcs(model, m0)
            with self.lock:
                self.metrics.decode_steps += 1
                self.metrics.decode_rows += live
        self._prune()

    def _prune(self) -> None:
        """Finished rows leave: cut out of a trusted-side cache; a GPU cohort closes when empty."""
        for batch in list(self._cohorts):
            if not batch.live:
                self._cohorts.remove(batch)
                self._close(batch, None)
            else:
                batch.prune()

    def _close(self, batch: Batch, error: BaseException | None) -> None:
        if self.model is not None:
            batch.close(reachable=not isinstance(error, GPUServerUnavailable))

    def _count_rpcs(self, model: TEELlamaModel, m0) -> None:
        d = model.gpu.metrics.copy() - m0
        with self.lock:
            self.metrics.rpc.update(d.rpc)
            self.metrics.bytes_to_gpu += d.bytes_to_gpu
            self.metrics.bytes_from_gpu += d.bytes_from_gpu

    def _fail(self, rows: list, error: BaseException) -> None:
        """End these rows (requests not yet prefilled, or rows) with `error`'s event."""
        err = _as_serving_error(error)
        for r in rows:
            if isinstance(r, _Seq):
                r.fail(err)
            elif not r.ended:  # a request that never became a row
                r.ended = True
                with self.lock:
                    self.metrics.errors[err.code] += 1
                r.events.put(Event("error", error=err))
        if isinstance(error, GPUServerUnavailable | IntegrityError) and self.model is not None:
            # The connection is gone and every cache with it (or the server lied, and its
            # session state cannot be trusted): fail the other rows too and forget the model,
            # so the next request connects afresh.
            model, self.model = self.model, None
            self.last_error = str(error)
            cohorts, self._cohorts = self._cohorts, []
            cohorts += [b for b, _ in self._prefilling]
            self._prefilling = []
            self._fail([r for c in cohorts for r in c.rows], error)
            try:
                model.gpu.close()
            except Exception:  # a broken socket must not stop the scheduler
                pass

    def _fail_all(self, new: list[Request], error: BaseException) -> None:
        batches = self._cohorts + [b for b, _ in self._prefilling]
        rows = [r for c in batches for r in c.rows] + list(new)  # rows first: they end requests once
        for batch in batches:
            self._close(batch, error)
        self._cohorts, self._prefilling = [], []
        self._fail(rows, error)

    def snapshot(self) -> dict[str, Any]:
        """A consistent copy of the metrics for /metrics and /stats."""
        with self.lock:
            m = self.metrics
            return {
                "prompt_tokens": m.prompt_tokens,
                "completion_tokens": m.completion_tokens,
                "finished": dict(m.finished),
                "errors": dict(m.errors),
                "prefill_passes": m.prefill_passes,
                "prefill_chunks": m.prefill_chunks,
                "decode_steps": m.decode_steps,
                "decode_rows": m.decode_rows,
                "rpc": dict(m.rpc),
                "bytes_to_gpu": m.bytes_to_gpu,
                "bytes_from_gpu": m.bytes_from_gpu,
                "ttft": (m.ttft.cumulative(), m.ttft.sum, m.ttft.count),
                "tpot": (m.tpot.cumulative(), m.tpot.sum, m.tpot.count),
                "active": self.active,
                "waiting": self.waiting,
            }


def _as_serving_error(e: BaseException) -> ServingError:
    if isinstance(e, ServingError):
        return e
    if isinstance(e, GPUServerUnavailable):
        return ServingError(f"the GPU server is unavailable: {e}", 503, "gpu_unavailable")
    if isinstance(e, LinkRefused):
        return ServingError(f"the GPU server refused this runner's link: {e}", 503, "gpu_link_refused")
    if isinstance(e, IntegrityError):
        return ServingError(f"the GPU server's result failed its integrity check: {e}", 502, "integrity")
    if isinstance(e, ModelMismatch):
        return ServingError(str(e), 502, "model_mismatch")
    if isinstance(e, RemoteError):
        return ServingError(f"the GPU server refused a request: {e}", 502, f"gpu_{e.code}")
    if isinstance(e, ProtocolError):
        return ServingError(f"the GPU server sent a malformed reply: {e}", 502, "gpu_protocol")
    return ServingError(f"internal error: {type(e).__name__}: {e}", 500, "internal_error")
