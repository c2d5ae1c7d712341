"""The one decode loop: prefill, sampling, stop rules and replay (TRUSTED side).

`teesplit generate` (tee/generate.py) and the API's continuous batching (tee/serving.py) both
drive a `Batch`: rows that share one KV cache and one forward pass per step. What a row is and
how it ends is written once, here:

- prefill: the rows' prompts, right-padded into one (B, T) batch (each row has its own
  positions; padding sits after a row's real tokens, where the causal mask hides it), and the
  first token of each row sampled from its last real position;
- a decode step: ONE forward pass over every row, feeding each live row its last token; a
  finished row rides along without advancing (its slot is rewritten each step);
- sampling: greedy, or temperature -> top-k -> top-p, each row with its own parameters and a
  random generator seeded as a solo run of it would be; when every row can make do with the
  top-k logits (greedy, top-k), only those cross back from the GPU;
- a row ends at EOS ("stop"), at a stop string ("stop"; the text is cut before it and held
  back while it could still be the start of one), at its token budget ("length"), or when its
  caller went away ("cancelled");
- replay: when the GPU server answers that it no longer knows the KV cache's session (it
  restarted or expired it: "no_session"), a new session is opened and every row's tokens so
  far (prompt and generated) are fed again as one prefill; greedy output is the same tokens
  as an uninterrupted run. At most `max_recoveries` times per batch.

The prompt, the sampling state and the generated text never leave this side except as the
token ids and activations the chosen plan sends to the GPU.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

import numpy as np

from teesplit.errors import UsageError
from teesplit.protocol import ProtocolError, RemoteError
from teesplit.tee.model import KVCache, TEELlamaModel, run_steps
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
            raise UsageError("max_new_tokens must be >= 0")
        if self.temperature < 0:
            raise UsageError("temperature must be >= 0")
        if self.top_k < 0:
            raise UsageError("top_k must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise UsageError("top_p must be in (0, 1]")
        if any(not s for s in self.stop):
            raise UsageError("stop strings must be non-empty")


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


def eos_ids(model: TEELlamaModel, tokenizer: Any | None) -> set[int]:
    """End-of-sequence ids: the model config's and the tokenizer's."""
    ids = set(model.config.eos_token_ids)
    if tokenizer is not None:
        ids |= set(tokenizer.eos_token_ids)
    return ids


class TextStream:
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


class Row:
    """One sequence of a batch: its prompt, sampling state, tokens and text so far.

    The hooks (`on_sample`, `on_token`, `on_finish`) do nothing here; the API's scheduler
    overrides them to stream events and count metrics."""

    def __init__(
        self,
        prompt: list[int],
        params: SamplingParams,
        tokenizer: Any | None,
        eos: set[int],
        on_text: Callable[[str], None] | None = None,
    ):
        self.prompt = list(prompt)
        self.params = params
        self.eos = eos
        self.rng = np.random.default_rng(params.seed)  # same seed: the same draws as a solo run
        self.stream = TextStream(tokenizer, params.stop, on_text)
        self.tokens: list[int] = []
        self.finish_reason: str | None = None  # "stop", "length" or "cancelled" once done

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def cancelled(self) -> bool:
        """The caller went away: the row ends at the next step."""
        return False

    def finish(self, reason: str) -> None:
        self.finish_reason = reason
        self.stream.finish()
        self.on_finish(reason)

    def on_sample(self) -> None:
        """A token was sampled for this row (before the EOS check)."""

    def on_token(self, token: int) -> None:
        """A token was added (its text, if any is final, went to the stream's on_text)."""

    def on_finish(self, reason: str) -> None:
        """The row ended."""


def session_tokens(rows: list[Row]) -> int:
    """Positions a batch's rows can write: the longest prompt + budget (a finished row that
    rides along rewrites its next free slot, which lies within its own budget)."""
    return max(len(r.prompt) + r.params.max_new_tokens for r in rows)


def padded(seqs: list[list[int]], lengths: np.ndarray) -> np.ndarray:
    """Right-padded ids (B, max length): the padding is never attended."""
    ids = np.zeros((len(seqs), int(lengths.max())), np.int64)
    for b, seq in enumerate(seqs):
        ids[b, : int(lengths[b])] = seq[: int(lengths[b])]
    return ids


class Batch:
    """Rows sharing one KV cache: one forward pass per step for all of them."""

    def __init__(
        self,
        model: TEELlamaModel,
        rows: list[Row],
        compact_logits: bool = True,
        max_recoveries: int = 3,
        prefill_chunk: int | str | None = None,
    ):
        if not rows or any(len(r.prompt) == 0 for r in rows):
            raise UsageError("the prompt is empty")
        self.model = model
        self.rows = rows
        self.compact_logits = compact_logits  # top-k logits only, when sampling can do with them
        self.max_recoveries = max_recoveries
        self.prefill_chunk = prefill_chunk  # prompt tokens per forward pass (None: one pass; "auto")
        self.recoveries = 0  # lost GPU sessions rebuilt
        self.cache = model.new_cache(len(rows), max_tokens=session_tokens(rows))

    @property
    def live(self) -> bool:
        return any(not r.done for r in self.rows)

    def prefill(self) -> None:
        """Feed every row its prompt and sample its first token."""
        run_steps(self.prefill_steps())

    def prefill_steps(self) -> Generator[None, None, None]:
        """prefill, yielding after each chunk of prefill_chunk tokens but the last: the API's
        scheduler runs the other rows' decode steps there, so a long prompt does not stall them
        for its whole prefill."""
        lengths = np.array([len(r.prompt) for r in self.rows], np.int64)
        out = yield from self._forward_steps(padded([r.prompt for r in self.rows], lengths), lengths)
        self._sample(out)

    def step(self) -> None:
        """One decode step: each live row's last token in, its next token sampled."""
        live = np.array([not r.done for r in self.rows])
        ids = np.array([[r.tokens[-1] if not r.done else 0] for r in self.rows], np.int64)
        self._sample(run_steps(self._forward_steps(ids, live.astype(np.int64))))

    def _top_k(self) -> int | None:
        """Candidates to ask the GPU for: enough for every live row's sampling (None: whole rows)."""
        if not self.compact_logits:
            return None
        need = [candidates_needed(r.params) for r in self.rows if not r.done]
        if not need or any(k is None for k in need):
            return None
        return max(need)

    def _forward_steps(self, ids: np.ndarray, n_new: np.ndarray) -> Generator[None, None, Any]:
        """model.prefill_steps (chunks of prefill_chunk tokens; a decode step is one token); if
        the server lost the session (it restarted or expired it), open a new one, replay every
        row's tokens fed so far plus these new ones, and return that result."""
        top_k = self._top_k()
        while True:
            fed = self.cache.lengths + n_new  # each row's tokens once this step is done
            try:
                out = yield from self.model.prefill_steps(ids, self.cache, n_new, self.prefill_chunk, top_k)
                self.cache = self.model.for_decode(self.cache)  # a plan per phase: see TEELlamaModel
                return out
            except RemoteError as e:
                if e.code != "no_session" or self.recoveries >= self.max_recoveries:
                    raise
            self.recoveries += 1
            ids = padded([r.prompt + r.tokens for r in self.rows], fed)
            n_new = fed.astype(np.int64)
            self.cache = self.model.new_cache(len(self.rows), max_tokens=session_tokens(self.rows))

    def _sample(self, out) -> None:
        """Sample each live row's next token from `out`, and end the rows that are done."""
        compact = isinstance(out, tuple)
        for b, row in enumerate(self.rows):
            if row.done:
                continue
            if row.cancelled:
                row.finish("cancelled")
                continue
            p = row.params
            if len(row.tokens) >= p.max_new_tokens:  # a budget of 0
                row.finish("length")
                continue
            values, ids = (out[0][b, -1], out[1][b, -1]) if compact else (out[b, -1], None)
            token = sample(values, p, row.rng, ids)
            row.on_sample()
            if token in row.eos:
                row.finish("stop")
                continue
            row.tokens.append(token)
            stopped = row.stream.push(token)
            row.on_token(token)
            if stopped:
                row.finish("stop")
            elif len(row.tokens) >= p.max_new_tokens:
                row.finish("length")

    # ---- rows joining and leaving (a trusted-side KV cache only) --------------------------
    def join(self, other: Batch) -> None:
        """Take `other`'s rows into this batch (its cache must be the trusted side's)."""
        if not isinstance(self.cache, KVCache) or not isinstance(other.cache, KVCache):
            raise ValueError("only batches with a trusted-side KV cache can be joined")
        self.cache = self.cache.join(other.cache)
        self.rows = self.rows + other.rows

    def prune(self) -> None:
        """Cut finished rows out of a trusted-side cache (a GPU session's rows ride along)."""
        if isinstance(self.cache, KVCache) and any(r.done for r in self.rows) and self.live:
            keep = np.array([b for b, r in enumerate(self.rows) if not r.done])
            self.cache = self.cache.select_rows(keep)
            self.rows = [self.rows[b] for b in keep]

    def close(self, reachable: bool = True) -> None:
        """Close the GPU session, if any; a failure here must not lose a finished generation.
        After the server was unreachable, closing would only wait out the tries again: skipped."""
        if not reachable:
            return
        try:
            self.model.close_cache(self.cache)
        except (RemoteError, ProtocolError, GPUServerUnavailable):
            pass
