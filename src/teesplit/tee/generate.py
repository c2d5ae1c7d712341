"""Prefill, token-by-token decode, sampling and stop conditions (TRUSTED side).

The prompt, the sampling state and the generated text never leave this side except as the
token ids and activations the chosen plan sends to the GPU.

A generation survives a GPU server that restarts under it: the client resends a request that
got no reply (`GPUClient.retries`), and when the server answers that it no longer knows the
session (its KV cache is gone: "no_session"), the generator opens a new session and replays
each row's tokens so far (prompt + generated) as one prefill, then goes on. Greedy output is
the same tokens as an uninterrupted run. A server that stays unreachable ends the generation
with GPUServerUnavailable.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from teesplit.protocol import ProtocolError, RemoteError
from teesplit.tee.model import TEELlamaModel
from teesplit.transport import GPUServerUnavailable


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 means no top-k filtering
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def validate(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError("max_new_tokens must be >= 0")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p must be in (0, 1]")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")


def sample(
    logits: np.ndarray, params: SamplingParams, rng: np.random.Generator | None, ids: np.ndarray | None = None
) -> int:
    """One token id from a row of logits: greedy, or temperature -> top-k -> top-p.

    With `ids`, `logits` are only the candidates' values (a top-k reply from the GPU) and
    `ids` their token ids; candidates are put in id order so a seeded draw picks the same
    token as it would from the full row."""
    if ids is not None:
        order = np.argsort(ids, kind="stable")
        logits, ids = logits[order], ids[order]
    if params.temperature == 0:
        j = int(np.argmax(logits))
        return int(ids[j]) if ids is not None else j
    z = logits.astype(np.float64) / params.temperature
    if 0 < params.top_k < z.size:
        kth = np.partition(z, -params.top_k)[-params.top_k]
        z = np.where(z < kth, -np.inf, z)
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    if params.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        cum = np.cumsum(probs[order])
        # Keep the smallest prefix whose mass reaches top_p (always at least one token).
        keep = order[: int(np.searchsorted(cum, params.top_p)) + 1]
        kept = np.zeros_like(probs)
        kept[keep] = probs[keep]
        probs = kept / kept.sum()
    j = int(min(np.searchsorted(np.cumsum(probs), rng.random(), side="right"), probs.size - 1))
    return int(ids[j]) if ids is not None else j


def candidates_needed(params: SamplingParams) -> int | None:
    """How many top logits sampling can use (None: the whole row, for plain temperature/top-p)."""
    if params.temperature == 0:
        return 1
    if 0 < params.top_k <= 1024:
        return params.top_k
    return None


@dataclass
class GenerationResult:
    prompt_tokens: list[int]
    tokens: list[int]
    text: str
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    stats: dict[str, Any] = field(default_factory=dict)


class Generator:
    def __init__(
        self,
        model: TEELlamaModel,
        tokenizer: Any | None = None,
        eos_token_ids: set[int] | None = None,
        compact_logits: bool = True,
        max_recoveries: int = 3,
        prefill_chunk: int | None = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        ids = set(model.config.eos_token_ids)
        if tokenizer is not None:
            ids |= set(tokenizer.eos_token_ids)
        self.eos_token_ids = ids if eos_token_ids is None else set(eos_token_ids)
        # Ask the GPU for only the top-k logits when sampling cannot use more (greedy, top-k).
        self.compact_logits = compact_logits
        self.max_recoveries = max_recoveries  # lost GPU sessions rebuilt per generation
        self.prefill_chunk = prefill_chunk  # prompt tokens per forward pass (None: the whole prompt)

    def generate(
        self, prompt_ids: list[int], params: SamplingParams, on_text: Callable[[str], None] | None = None
    ) -> GenerationResult:
        """Generate from `prompt_ids`; `on_text` receives each new piece of text as it is final."""
        return self.generate_batch([prompt_ids], params, [on_text])[0]

    def generate_batch(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        on_text: list[Callable[[str], None] | None] | None = None,
    ) -> list[GenerationResult]:
        """Generate for several prompts as one batch: one round trip per crossing for all rows."""
        params.validate()
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("the prompt is empty")
        B = len(prompts)
        lengths = np.array([len(p) for p in prompts], np.int64)
        ids = np.zeros((B, int(lengths.max())), np.int64)  # right-padded; padding is never attended
        for b, p in enumerate(prompts):
            ids[b, : len(p)] = p
        k = candidates_needed(params) if self.compact_logits else None
        rngs = [np.random.default_rng(params.seed) for _ in range(B)]  # same seed: same draws as solo
        streams = [_TextStream(self.tokenizer, params.stop, f) for f in (on_text or [None] * B)]
        tokens: list[list[int]] = [[] for _ in range(B)]
        finish = ["length"] * B
        active = np.ones(B, bool)
        steps = 0  # decode forward passes
        gpu = self.model.gpu
        retried0 = getattr(gpu, "retried", 0)
        # Opening and closing a GPU session are one round trip each, outside the measured phases.
        run = _Run(self, int(lengths.max()) + params.max_new_tokens + 1, k, prompts, tokens)
        m0, t0 = gpu.metrics.copy(), time.perf_counter()
        try:
            out = run.forward(ids, lengths)
            m1, t1 = gpu.metrics.copy(), time.perf_counter()
            while True:
                nxt = np.zeros((B, 1), np.int64)
                for b in np.flatnonzero(active):
                    if len(tokens[b]) == params.max_new_tokens:
                        active[b] = False
                        continue
                    row = (out[0][b, -1], out[1][b, -1]) if k else (out[b, -1], None)
                    token = sample(row[0], params, rngs[b], row[1])
                    if token in self.eos_token_ids:
                        finish[b], active[b] = "stop", False
                        continue
                    tokens[b].append(token)
                    nxt[b, 0] = token
                    if streams[b].push(token):
                        finish[b], active[b] = "stop", False
                    elif len(tokens[b]) == params.max_new_tokens:
                        active[b] = False
                if not active.any():
                    break
                # Finished rows ride along without advancing: their slot is rewritten each step.
                out = run.forward(nxt, active.astype(np.int64))
                steps += 1
            for st in streams:
                st.finish()
            m2, t2 = gpu.metrics.copy(), time.perf_counter()
        except GPUServerUnavailable:
            run.reachable = False  # closing the session would only wait out the tries again
            raise
        finally:
            run.close()
        shared = {
            "plan": self.model.plan.name,
            "decode_plan": self.model.decode_plan.name,  # another one: K/V handed over after prefill
            "batch": B,
            "recoveries": run.recoveries,
            "retries": getattr(gpu, "retried", 0) - retried0,
            **(m2 - m0).summary(t2 - t0),
            "prefill": (m1 - m0).summary(t1 - t0),
            "decode": {**(m2 - m1).summary(t2 - t1), "steps": steps},
        }
        return [
            GenerationResult(
                list(p),
                tokens[b],
                streams[b].text,
                finish[b],
                {
                    **shared,
                    "prompt_tokens": list(p),
                    "tokens": tokens[b],
                    "text": streams[b].text,
                    "finish_reason": finish[b],
                },
            )
            for b, p in enumerate(prompts)
        ]


class _Run:
    """The KV cache of one generation, and how to rebuild it when the GPU session is lost."""

    def __init__(
        self,
        gen: Generator,
        max_tokens: int,
        top_k: int | None,
        prompts: list[list[int]],
        tokens: list[list[int]],
    ):
        self.model, self.max_recoveries, self.chunk = gen.model, gen.max_recoveries, gen.prefill_chunk
        self.max_tokens, self.top_k = max_tokens, top_k
        self.prompts, self.tokens = prompts, tokens  # tokens: the generated ids, appended by the loop
        self.cache = self.model.new_cache(len(prompts), max_tokens=max_tokens)
        self.recoveries = 0
        self.reachable = True

    def forward(self, ids: np.ndarray, n_new: np.ndarray):
        """model.prefill (in chunks of prefill_chunk tokens; a decode step is one token); if the
        server lost the session (it restarted or expired it), open a new one, replay every row's
        tokens fed so far plus these new ones, and return that result."""
        while True:
            fed = self.cache.lengths + n_new  # each row's tokens once this step is done
            try:
                out = self.model.prefill(ids, self.cache, n_new, self.chunk, self.top_k)
                self.cache = self.model.for_decode(self.cache)  # a plan per phase: see TEELlamaModel
                return out
            except RemoteError as e:
                if e.code != "no_session" or self.recoveries >= self.max_recoveries:
                    raise
            self.recoveries += 1
            rows = [(list(p) + t)[: int(n)] for p, t, n in zip(self.prompts, self.tokens, fed, strict=True)]
            ids = np.zeros((len(rows), int(fed.max())), np.int64)
            for b, row in enumerate(rows):
                ids[b, : len(row)] = row
            n_new = fed.astype(np.int64)
            self.cache = self.model.new_cache(len(rows), max_tokens=self.max_tokens)

    def close(self) -> None:
        """Close the GPU session, if any; a failure here must not lose a finished generation."""
        if not self.reachable:
            return
        try:
            self.model.close_cache(self.cache)
        except (RemoteError, ProtocolError, GPUServerUnavailable):
            pass


class _TextStream:
    """Detokenizes incrementally, cuts at the first stop string and holds back any text that
    could still turn out to be the start of one."""

    def __init__(self, tokenizer: Any | None, stop: tuple[str, ...], on_text: Callable[[str], None] | None):
        self.decoder = tokenizer.stream_decoder() if tokenizer is not None else None
        self.stop = stop
        self.on_text = on_text
        self.text = ""  # everything decoded so far, cut at a stop string once one is found
        self.sent = 0  # characters already handed to on_text
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.stopped = False

    def push(self, token: int) -> bool:
        """Add one token; True when a stop string has been reached."""
        if self.decoder is None:
            return False
        self.text += self.decoder.add(token)
        for s in self.stop:
            cut = self.text.find(s, max(0, self.sent - len(s)))
            if cut >= 0:
                self.stopped = True
                self.text = self.text[:cut]
                self._emit(len(self.text))
                return True
        self._emit(len(self.text) - self.hold)
        return False

    def finish(self) -> None:
        """End of generation: release held-back text (unless a stop string already cut it)."""
        if self.decoder is not None and not self.stopped:
            self.text += self.decoder.flush()
            self._emit(len(self.text))

    def _emit(self, upto: int) -> None:
        if upto > self.sent and self.on_text is not None:
            self.on_text(self.text[self.sent : upto])
        self.sent = max(self.sent, upto)


def generate_pipelined(
    generators: list[Generator], prompts: list[list[int]], params: SamplingParams
) -> list[GenerationResult]:
    """Split the prompts into one micro-batch per generator and run them concurrently.

    Each generator has its own connection (its own DEALER socket), so while the GPU server
    works on one micro-batch's request the trusted side computes the other's next step; numpy
    and ZeroMQ release the GIL for that work."""
    n = min(len(generators), len(prompts))
    bounds = np.linspace(0, len(prompts), n + 1).astype(int)
    chunks = [prompts[bounds[i] : bounds[i + 1]] for i in range(n)]
    results: list[list[GenerationResult] | None] = [None] * n
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            results[i] = generators[i].generate_batch(chunks[i], params)
        except BaseException as e:  # re-raised in the caller's thread below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,), name=f"micro-batch-{i}") for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return [r for chunk in results for r in chunk]
