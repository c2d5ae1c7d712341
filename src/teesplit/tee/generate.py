"""`teesplit generate`: a batch of prompts through the one decode loop, with its numbers (TRUSTED side).

`Generator` drives a `decode.Batch` (prefill, then one decode step per token for every row)
and reports the seed's numbers per phase: RPCs by operation, bytes each way, and time split
into trusted compute, GPU compute and transport. The decode loop (sampling, stop rules, replay
after a lost GPU session) is tee/decode.py, shared with the API's continuous batching.

A generation survives a GPU server that restarts under it: the port resends a request that
got no reply (`GPUClient.retries`), and a lost session is rebuilt by replay (tee/decode.py).
A server that stays unreachable ends the generation with GPUServerUnavailable.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from teesplit.tee.decode import Batch, Row, SamplingParams, candidates_needed, eos_ids, sample
from teesplit.tee.model import TEELlamaModel
from teesplit.transport import GPUServerUnavailable

__all__ = [
    "GenerationResult",
    "Generator",
    "SamplingParams",
    "candidates_needed",
    "generate_pipelined",
    "sample",
]


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
        prefill_chunk: int | str | None = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_ids(model, tokenizer) if eos_token_ids is None else set(eos_token_ids)
        # Ask the GPU for only the top-k logits when sampling cannot use more (greedy, top-k).
        self.compact_logits = compact_logits
        self.max_recoveries = max_recoveries  # lost GPU sessions rebuilt per generation
        self.prefill_chunk = prefill_chunk  # prompt tokens per forward pass (None: one pass; "auto")

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
        rows = [
            Row(p, params, self.tokenizer, self.eos_token_ids, f)
            for p, f in zip(prompts, on_text or [None] * len(prompts), strict=True)
        ]
        gpu = self.model.gpu
        retried0 = getattr(gpu, "retried", 0)
        # Opening and closing a GPU session are one round trip each, outside the measured phases.
        batch = Batch(self.model, rows, self.compact_logits, self.max_recoveries, self.prefill_chunk)
        steps = 0  # decode forward passes
        reachable = True
        m0, t0 = gpu.metrics.copy(), time.perf_counter()
        try:
            batch.prefill()
            m1, t1 = gpu.metrics.copy(), time.perf_counter()
            while batch.live:
                batch.step()
                steps += 1
            m2, t2 = gpu.metrics.copy(), time.perf_counter()
        except GPUServerUnavailable:
            reachable = False
            raise
        finally:
            batch.close(reachable)
        shared = {
            "plan": self.model.plan.name,
            "decode_plan": self.model.decode_plan.name,  # another one: K/V handed over after prefill
            "batch": len(rows),
            "recoveries": batch.recoveries,
            "retries": getattr(gpu, "retried", 0) - retried0,
            **(m2 - m0).summary(t2 - t0),
            "prefill": (m1 - m0).summary(t1 - t0),
            "decode": {**(m2 - m1).summary(t2 - t1), "steps": steps},
        }
        return [
            GenerationResult(
                list(r.prompt),
                r.tokens,
                r.stream.text,
                r.finish_reason,
                {
                    **shared,
                    "prompt_tokens": list(r.prompt),
                    "tokens": r.tokens,
                    "text": r.stream.text,
                    "finish_reason": r.finish_reason,
                },
            )
            for r in rows
        ]


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
