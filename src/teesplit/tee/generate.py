"""Prefill, token-by-token decode, sampling and stop conditions (TRUSTED side).

The prompt, the sampling state and the generated text never leave this side except as the
token ids and activations the chosen plan sends to the GPU.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from teesplit.tee.model import TEELlamaModel


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


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """One token id from a (V,) row of logits: greedy, or temperature -> top-k -> top-p."""
    if params.temperature == 0:
        return int(np.argmax(logits))
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
    return int(min(np.searchsorted(np.cumsum(probs), rng.random(), side="right"), probs.size - 1))


@dataclass
class GenerationResult:
    prompt_tokens: list[int]
    tokens: list[int]
    text: str
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    stats: dict[str, Any] = field(default_factory=dict)


class Generator:
    def __init__(
        self, model: TEELlamaModel, tokenizer: Any | None = None, eos_token_ids: set[int] | None = None
    ):
        self.model = model
        self.tokenizer = tokenizer
        ids = set(model.config.eos_token_ids)
        if tokenizer is not None:
            ids |= set(tokenizer.eos_token_ids)
        self.eos_token_ids = ids if eos_token_ids is None else set(eos_token_ids)

    def generate(
        self, prompt_ids: list[int], params: SamplingParams, on_text: Callable[[str], None] | None = None
    ) -> GenerationResult:
        """Generate from `prompt_ids`; `on_text` receives each new piece of text as it is final."""
        params.validate()
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        gpu = self.model.gpu
        rng = np.random.default_rng(params.seed)
        cache = self.model.new_cache(batch=1)
        stream = _TextStream(self.tokenizer, params.stop, on_text)
        tokens: list[int] = []
        finish = "length"
        steps = 0  # decode forward passes

        m0, t0 = gpu.metrics.copy(), time.perf_counter()
        logits = self.model.forward(np.asarray([prompt_ids], dtype=np.int64), cache)
        m1, t1 = gpu.metrics.copy(), time.perf_counter()
        while len(tokens) < params.max_new_tokens:
            token = sample(logits[0, -1], params, rng)
            if token in self.eos_token_ids:
                finish = "stop"
                break
            tokens.append(token)
            if stream.push(token):
                finish = "stop"
                break
            if len(tokens) == params.max_new_tokens:
                break
            logits = self.model.forward(np.asarray([[token]], dtype=np.int64), cache)
            steps += 1
        stream.finish()
        m2, t2 = gpu.metrics.copy(), time.perf_counter()

        prefill, decode = (m1 - m0).summary(t1 - t0), (m2 - m1).summary(t2 - t1)
        stats = {
            "plan": self.model.plan.name,
            "prompt_tokens": list(prompt_ids),
            "tokens": tokens,
            "text": stream.text,
            "finish_reason": finish,
            **(m2 - m0).summary(t2 - t0),
            "prefill": prefill,
            "decode": {**decode, "steps": steps},
        }
        return GenerationResult(list(prompt_ids), tokens, stream.text, finish, stats)


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
