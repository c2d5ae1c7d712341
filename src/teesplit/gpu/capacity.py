"""How much one peer may make the GPU server hold (UNTRUSTED side): the default message size
derived from the model, and the accounting of replies that a connection has not read.

Anyone who reaches the server's port is a peer. Without these bounds one peer could make the
server allocate without limit: huge frames, results of any size, replies it never reads. Each
bound below is per connection (or per identity, for sessions: gpu/service.SessionLimits), and
each refusal names the flag that raises it.

- A request frame is at most `--max-message-mb` (ZeroMQ drops a larger one unread, the shm
  reader refuses it from the region header), and so is a result (refused before the product).
  The default is derived from the model and the session limits: `default_max_message_bytes`.
- A connection has at most `--max-inflight` requests queued (ZeroMQ's receive high-water mark),
  and its replies that ZeroMQ still holds because the peer does not read them are counted
  (`UnreadReplies`): past `--max-unread-mb` its next request is refused, uncomputed, with a
  short error. So a connection that never reads makes the server hold at most
  --max-unread-mb plus one reply, plus 64 replies of small frames (under 36 MiB), plus its
  --max-inflight requests; the default --max-unread-mb is twice the message size.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

from teesplit.config import ModelConfig

MIB = 1 << 20
# The v3 placement (Matmul, AttnScores) sends the attention scores of a prefill, H x T x S
# floats: quadratic in the prompt. The default message size covers prefills of up to this many
# tokens per request; a longer one needs a larger --max-message-mb.
PREFILL_ATTENTION_TOKENS = 2048
MIN_MESSAGE_BYTES = 64 * MIB
# Replies up to this size are not tracked: ZeroMQ's send high-water mark (64 messages) bounds
# how many of them wait for a peer. (pyzmq copies frames under 64 KiB into ZeroMQ, and a copied
# frame's tracker is done at once, so a reply of small frames is never counted in bytes: with at
# most 9 frames it holds under 576 KiB.)
TRACK_ABOVE = 64 << 10


def default_max_message_bytes(config: ModelConfig, max_session_tokens: int, max_batch: int) -> int:
    """The largest tensor (float32) a legitimate request or reply of this model carries, under
    the server's session limits, rounded up to a MiB and at least MIN_MESSAGE_BYTES:

    - activations of a forward pass over `max_session_tokens` token rows (a full session's
      prefill, or a batch with that many tokens), at the widest Linear (E, q|k|v, gate|up);
    - logits of a decode step of `max_batch` rows (the LM head reads each row's last token);
    - a decode step's attention scores, `max_batch` rows against `max_session_tokens` positions;
    - a prefill's attention scores for PREFILL_ATTENTION_TOKENS tokens (v3 placement)."""
    c = config
    width = max(c.hidden_size, c.q_dim + 2 * c.kv_dim, 2 * c.intermediate_size, c.q_dim)
    prefill_t = min(max_session_tokens, PREFILL_ATTENTION_TOKENS)
    largest = max(
        max_session_tokens * width,
        max_batch * c.vocab_size,
        max_batch * c.num_heads * max_session_tokens,
        c.num_heads * prefill_t * prefill_t,
    )
    return max(MIN_MESSAGE_BYTES, math.ceil(4 * largest / MIB) * MIB)


class UnreadReplies:
    """Per connection: the large replies ZeroMQ still holds (sent zero-copy; the peer has not
    read them yet), as (tracker, bytes). A reply's tracker is done once ZeroMQ let go of its
    frames: written to the kernel, or dropped with a connection that went away."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._peers: dict[bytes, deque[tuple[Any, int]]] = {}

    def held(self, peer: bytes) -> int:
        """Bytes of `peer`'s replies still held (done ones forgotten first)."""
        q = self._peers.get(peer)
        if not q:
            return 0
        while q and q[0][0].done:
            q.popleft()
        if not q:
            del self._peers[peer]
            return 0
        return sum(n for _, n in q)

    def over(self, peer: bytes) -> int | None:
        """The held bytes when they reach the cap (the next request is refused), else None."""
        if peer not in self._peers:  # the common case: nothing large outstanding
            return None
        n = self.held(peer)
        return n if n >= self.max_bytes else None

    def add(self, peer: bytes, tracker: Any, nbytes: int) -> None:
        if tracker is not None and not tracker.done:
            self._peers.setdefault(peer, deque()).append((tracker, nbytes))

    def sweep(self) -> None:
        """Forget every done reply (peers that left, or finally read)."""
        for peer in list(self._peers):
            self.held(peer)

    def total(self) -> int:
        return sum(self.held(p) for p in list(self._peers))
