"""Continuous batching for many concurrent requests over one GPU connection (TRUSTED side).

One scheduler thread owns the model and its GPU connection. Callers (HTTP handler threads)
`submit` a prompt and read events from the returned `Request`. At every iteration the
scheduler

1. takes the requests that arrived since the last step (up to `max_batch` in flight) and
   prefills them together as one ragged batch; each gets its first token from that pass;
2. runs ONE decode forward pass over every sequence still generating, so the GPU sees one
   round trip per crossing for all of them, whatever request each row belongs to;
3. drops the rows that finished (EOS, a stop string, their token budget, or a client that
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
run would be), so a greedy request gets exactly the tokens a solo `Generator` run gives.
"""

from __future__ import annotations

import bisect
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from teesplit.protocol import ProtocolError, RemoteError
from teesplit.tee.generate import SamplingParams, _TextStream, candidates_needed, sample
from teesplit.tee.model import GPUKVCache, KVCache, TEELlamaModel
from teesplit.transport import GPUServerUnavailable


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
    prefill_passes: int = 0
    decode_steps: int = 0
    decode_rows: int = 0  # sum of rows over decode steps (mean batch = rows / steps)
    rpc: Counter = field(default_factory=Counter)
    bytes_to_gpu: int = 0
    bytes_from_gpu: int = 0
    ttft: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))
    tpot: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))


# ---- the scheduler -------------------------------------------------------------------------
class _Seq:
    """One row of a batch: its request, sampling state and text stream."""

    def __init__(self, req: Request, tokenizer: Any, eos: set[int]):
        self.req = req
        self.rng = np.random.default_rng(req.params.seed)  # same draws as a solo run
        self.stream = _TextStream(tokenizer, req.params.stop, self._emit)
        self.eos = set() if req.ignore_eos else eos
        self.pending = ""  # text produced by the current token
        self.done = False
        self.counted = False  # in Engine.active

    def _emit(self, text: str) -> None:
        self.pending += text


class _Cohort:
    """Rows sharing one KV cache (one forward pass per step)."""

    def __init__(self, seqs: list[_Seq], cache: KVCache | GPUKVCache):
        self.seqs = seqs
        self.cache = cache


class Engine:
    """The continuous-batching scheduler. `make_model` connects (and reconnects after a failure)."""

    def __init__(
        self,
        make_model: Callable[[], TEELlamaModel],
        tokenizer: Any,
        max_batch: int = 16,
        max_waiting: int = 256,
        max_recoveries: int = 3,
    ):
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.make_model = make_model
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.max_waiting = max_waiting
        self.max_recoveries = max_recoveries
        self.model: TEELlamaModel | None = None
        self.metrics = EngineMetrics()
        self.lock = threading.Lock()  # guards metrics and the counts below
        self.active = 0  # rows generating
        self.waiting = 0  # submitted, not yet prefilled
        self._queue: queue.Queue[Request] = queue.Queue()
        self._cohorts: list[_Cohort] = []
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
        """The model, connecting first if needed (scheduler thread, or before start())."""
        if self.model is None:
            try:
                self.model = self.make_model()
                self.last_error = None
            except GPUServerUnavailable as e:
                self.last_error = str(e)
                raise ServingError(f"the GPU server is unavailable: {e}", 503, "gpu_unavailable") from e
        return self.model

    # -- callers ---------------------------------------------------------------------------
    def submit(self, prompt: list[int], params: SamplingParams, ignore_eos: bool = False) -> Request:
        params.validate()
        if not prompt:
            raise ValueError("the prompt is empty")
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
                    self._prefill(new)
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

    def _take_new(self) -> list[_Seq]:
        live = sum(1 for c in self._cohorts for s in c.seqs if not s.done)
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
        eos = set(getattr(self.tokenizer, "eos_token_ids", ()))
        return [_Seq(r, self.tokenizer, set(eos)) for r in new]

    def _prefill(self, seqs: list[_Seq]) -> None:
        try:
            model = self.connect()
        except Exception as e:  # unreachable, another model, another protocol version
            self._fail(seqs, e)
            return
        for s in seqs:  # EOS ids from the server's config too, now that it is known
            if not s.req.ignore_eos:
                s.eos |= set(model.config.eos_token_ids)
        lengths = np.array([len(s.req.prompt) for s in seqs], np.int64)
        ids = np.zeros((len(seqs), int(lengths.max())), np.int64)  # right-padded
        for b, s in enumerate(seqs):
            ids[b, : len(s.req.prompt)] = s.req.prompt
        max_tokens = _session_tokens(seqs)
        m0 = model.gpu.metrics.copy()
        cohort = None
        try:
            cohort = _Cohort(seqs, model.new_cache(len(seqs), max_tokens=max_tokens))
            out = model.forward(ids, cohort.cache, n_new=lengths, top_k=_top_k(seqs))
        except Exception as e:
            if cohort is not None:
                self._close(cohort, e)
            self._fail(seqs, e)
            return
        finally:
            self._count_rpcs(model, m0)
        with self.lock:
            self.metrics.prefill_passes += 1
            self.metrics.prompt_tokens += int(lengths.sum())
            self.active += len(seqs)
        for s in seqs:
            s.counted = True
        self._sample(cohort, out)
        if model.plan.gpu_kv_cache:
            self._cohorts.append(cohort)
        elif self._cohorts:  # trusted-side cache: the new rows join the running batch
            main = self._cohorts[0]
            main.cache = main.cache.join(cohort.cache)
            main.seqs = main.seqs + cohort.seqs
        else:
            self._cohorts.append(cohort)
        self._prune()

    def _decode_step(self) -> None:
        for cohort in list(self._cohorts):
            model = self.model
            if model is None or cohort not in self._cohorts:
                continue  # the connection failed during this step: those rows have their error
            live = np.array([not s.done for s in cohort.seqs])
            ids = np.array([[s.req.tokens[-1] if not s.done else 0] for s in cohort.seqs], np.int64)
            m0 = model.gpu.metrics.copy()
            try:
                out = self._forward(cohort, ids, live.astype(np.int64))
            except Exception as e:
                self._cohorts.remove(cohort)
                self._close(cohort, e)
                self._fail([s for s in cohort.seqs if not s.done], e)
                continue
            finally:
                self._count_rpcs(model, m0)
            with self.lock:
                self.metrics.decode_steps += 1
                self.metrics.decode_rows += int(live.sum())
            self._sample(cohort, out)
        self._prune()

    def _forward(self, cohort: _Cohort, ids: np.ndarray, n_new: np.ndarray):
        """One forward pass; a GPU session the server lost is reopened and replayed."""
        model = self.model
        top_k = _top_k([s for s in cohort.seqs if not s.done])
        for attempt in range(self.max_recoveries + 1):
            fed = cohort.cache.lengths + n_new
            try:
                return model.forward(ids, cohort.cache, n_new=n_new, top_k=top_k)
            except RemoteError as e:
                if e.code != "no_session" or attempt == self.max_recoveries:
                    raise
            rows = [(s.req.prompt + s.req.tokens)[: int(n)] for s, n in zip(cohort.seqs, fed, strict=True)]
            ids = np.zeros((len(rows), int(fed.max())), np.int64)
            for b, row in enumerate(rows):
                ids[b, : len(row)] = row
            n_new = fed.astype(np.int64)
            cohort.cache = model.new_cache(len(rows), max_tokens=_session_tokens(cohort.seqs))
        raise AssertionError("unreachable")

    def _sample(self, cohort: _Cohort, out) -> None:
        """Sample each live row's next token from `out` and tell its caller."""
        now = time.perf_counter()
        compact = isinstance(out, tuple)
        for b, s in enumerate(cohort.seqs):
            if s.done:
                continue
            req, p = s.req, s.req.params
            if req.cancelled:
                self._finish(s, "cancelled")
                continue
            values, ids = (out[0][b, -1], out[1][b, -1]) if compact else (out[b, -1], None)
            token = sample(values, p, s.rng, ids)
            if req.t_first is None:
                req.t_first = now
                with self.lock:
                    self.metrics.ttft.observe(now - req.t_submit)
            if token in s.eos:
                self._finish(s, "stop")
                continue
            req.tokens.append(token)
            req.t_last = now
            with self.lock:
                self.metrics.completion_tokens += 1
            stopped = s.stream.push(token)
            req.events.put(Event("token", s.pending))
            s.pending = ""
            if stopped:
                self._finish(s, "stop")
            elif len(req.tokens) >= p.max_new_tokens:
                self._finish(s, "length")

    def _finish(self, s: _Seq, reason: str) -> None:
        s.done = True
        req = s.req
        req.finish_reason = reason
        s.stream.finish()
        with self.lock:
            self.active -= s.counted
            s.counted = False
            self.metrics.finished[reason] += 1
            if len(req.tokens) > 1 and req.t_first is not None and req.t_last is not None:
                self.metrics.tpot.observe((req.t_last - req.t_first) / (len(req.tokens) - 1))
        if s.pending:
            req.events.put(Event("token", s.pending))
            s.pending = ""
        req.events.put(Event("done", finish_reason=reason))

    def _prune(self) -> None:
        """Finished rows leave: cut out of a trusted-side cache; a GPU cohort closes when empty."""
        for cohort in list(self._cohorts):
            if all(s.done for s in cohort.seqs):
                self._cohorts.remove(cohort)
                self._close(cohort, None)
            elif isinstance(cohort.cache, KVCache) and any(s.done for s in cohort.seqs):
                keep = np.array([b for b, s in enumerate(cohort.seqs) if not s.done])
                cohort.cache = cohort.cache.select_rows(keep)
                cohort.seqs = [cohort.seqs[b] for b in keep]

    def _close(self, cohort: _Cohort, error: BaseException | None) -> None:
        if isinstance(error, GPUServerUnavailable) or self.model is None:
            return  # closing would only wait out the timeout again
        try:
            self.model.close_cache(cohort.cache)
        except (RemoteError, ProtocolError, GPUServerUnavailable):
            pass

    def _count_rpcs(self, model: TEELlamaModel, m0) -> None:
        d = model.gpu.metrics.copy() - m0
        with self.lock:
            self.metrics.rpc.update(d.rpc)
            self.metrics.bytes_to_gpu += d.bytes_to_gpu
            self.metrics.bytes_from_gpu += d.bytes_from_gpu

    def _fail(self, seqs: list[_Seq], error: BaseException) -> None:
        err = _as_serving_error(error)
        for s in seqs:
            if s.done:
                continue
            s.done = True
            with self.lock:
                self.metrics.errors[err.code] += 1
                self.active -= s.counted
                s.counted = False
            s.req.events.put(Event("error", error=err))
        if isinstance(error, GPUServerUnavailable) and self.model is not None:
            # The connection is gone and every cache with it: fail the other rows too and
            # forget the model, so the next request connects afresh.
            model, self.model = self.model, None
            self.last_error = str(error)
            cohorts, self._cohorts = self._cohorts, []
            self._fail([s for c in cohorts for s in c.seqs], error)
            try:
                model.gpu.close()
            except Exception:  # a broken socket must not stop the scheduler
                pass

    def _fail_all(self, new: list[_Seq], error: BaseException) -> None:
        seqs = [s for c in self._cohorts for s in c.seqs] + list(new)
        for cohort in self._cohorts:
            self._close(cohort, error)
        self._cohorts = []
        self._fail(seqs, error)

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


def _top_k(seqs: list[_Seq]) -> int | None:
    """Candidates to ask the GPU for: enough for every row's sampling (None: whole rows)."""
    need = [candidates_needed(s.req.params) for s in seqs]
    if not need or any(k is None for k in need):
        return None
    return max(need)


def _session_tokens(seqs: list[_Seq]) -> int:
    """Positions a cohort's rows can write: the longest prompt + budget (a finished row that
    rides along rewrites its next free slot, which lies within its own budget)."""
    return max(len(s.req.prompt) + s.req.params.max_new_tokens for s in seqs)


def _as_serving_error(e: BaseException) -> ServingError:
    if isinstance(e, ServingError):
        return e
    if isinstance(e, GPUServerUnavailable):
        return ServingError(f"the GPU server is unavailable: {e}", 503, "gpu_unavailable")
    if isinstance(e, RemoteError):
        return ServingError(f"the GPU server refused a request: {e}", 502, f"gpu_{e.code}")
    if isinstance(e, ProtocolError):
        return ServingError(f"the GPU server sent a malformed reply: {e}", 502, "gpu_protocol")
    return ServingError(f"internal error: {type(e).__name__}: {e}", 500, "internal_error")
