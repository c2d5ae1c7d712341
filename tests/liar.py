"""A lying GPU server for tests: the lies, on numpy results, and a RequestHandler wrapper that
tells one of them on a chosen call (used in-process and by tests/lying_server.py in a real
server process).

Lies (`MODES`):
- "perturb": the largest-magnitude element of a random row times (1 + 1e-3). The largest is
  chosen on purpose: a 1e-3 change of an element near zero changes nothing that matters, and
  the check's power is proportional to |δ| = 1e-3 |y_n| (see SECURITY.md).
- "swap": two rows exchanged (rows = all but the last dimension); a single-row result has its
  largest-magnitude element exchanged with another element of a different value.
- "scale": the whole result times 1.001.
- "replay": the reply to an earlier call of the same operation and shape.
- "stale": (K/V-cache operations of v3-fused) a result from an out-of-date cache: AttnScores
  computed as if the new key had not been written (its slot keeps its old content, zeros for
  a fresh slot), AttnOut with the newest value slot holding the previous position's value.
"""

from __future__ import annotations

import numpy as np

MODES = ("perturb", "swap", "scale", "replay", "stale")
# Lies on ring elements (the private plans' ring steps, int64 modulo 2^64): one element plus 1,
# one element with bit 63 flipped (an error of 2^63, the hardest for a check over Z_2^64), two
# rows exchanged, an earlier reply replayed. A step replies with one or two products; the lie
# goes into one of them, chosen at random (`LyingHandler.lied_index`).
RING_MODES = ("add1", "bit63", "swap", "replay")


def ring_lie(
    mode: str, y: np.ndarray, rng: np.random.Generator, previous: np.ndarray | None = None
) -> np.ndarray:
    """A lying copy of the honest ring result y (int64, rows = all but the last dimension)."""
    y = np.array(y, dtype=np.int64, copy=True)
    rows = y.reshape(-1, y.shape[-1])
    r, n = int(rng.integers(rows.shape[0])), int(rng.integers(rows.shape[1]))
    if mode == "add1":
        rows[r, n : n + 1] += 1  # an array add: wraps modulo 2^64 silently
    elif mode == "bit63":
        rows[r, n] ^= np.int64(-(2**63))
    elif mode == "swap":
        if rows.shape[0] < 2:
            raise ValueError("swap needs two rows")
        a, b = rng.choice(rows.shape[0], 2, replace=False)
        rows[[a, b]] = rows[[b, a]]
    elif mode == "replay":
        if previous is None or previous.shape != y.shape:
            raise ValueError("replay needs an earlier reply of the same shape")
        return np.array(previous, dtype=np.int64, copy=True)
    else:
        raise ValueError(f"unknown ring lie {mode!r}")
    return y


def lie(mode: str, y: np.ndarray, rng: np.random.Generator, previous: np.ndarray | None = None) -> np.ndarray:
    """A lying copy of the honest result y (modes perturb, swap, scale, replay)."""
    y = np.array(y, dtype=np.float32, copy=True)
    rows = y.reshape(-1, y.shape[-1])
    if mode == "perturb":
        r = int(rng.integers(rows.shape[0]))
        n = int(np.argmax(np.abs(rows[r])))
        rows[r, n] *= np.float32(1 + 1e-3)
    elif mode == "swap":
        if rows.shape[0] >= 2:
            a, b = rng.choice(rows.shape[0], 2, replace=False)
            rows[[a, b]] = rows[[b, a]]
        else:
            row = rows[0]
            a = int(np.argmax(np.abs(row)))
            others = np.flatnonzero(row != row[a])
            b = int(rng.choice(others))
            row[[a, b]] = row[[b, a]]
    elif mode == "scale":
        y *= np.float32(1.001)
    elif mode == "replay":
        if previous is None or previous.shape != y.shape:
            raise ValueError("replay needs an earlier reply of the same shape")
        return np.array(previous, dtype=np.float32, copy=True)
    else:
        raise ValueError(f"unknown lie {mode!r}")
    return y


class LyingHandler:
    """Wraps a RequestHandler: on the `nth` request of operation `op` (counting from 1), the
    service's result is replaced by a lie. Everything else is honest. op "Ring" counts every
    ring step of the private plans (they share the service's `ring_step`)."""

    def __init__(self, handler, mode: str, op: str, nth: int, seed: int = 0):
        import torch

        self.handler, self.mode, self.op, self.nth = handler, mode, op, nth
        self.rng = np.random.default_rng(seed)
        self.count = 0
        self.told = False
        self.history: list[np.ndarray] = []  # earlier replies of this operation
        service = handler.service
        name = {"QKV": "qkv", "GateUp": "gate_up", "Linear": "linear", "LMHead": "lm_head"}
        name |= {"AttnScores": "attn_scores", "AttnOut": "attn_out", "Embedding": "embedding"}
        name |= {"Matmul": "matmul", "Ring": "ring_step"}
        self.lied_index = None  # which product of a ring step's reply carries the lie
        method = name[op]
        honest = getattr(service, method)
        liar = self

        def lying(*args, **kwargs):
            liar.count += 1
            if liar.mode == "stale" and liar.count == liar.nth:
                out = liar._stale(service, method, honest, args)
            else:
                out = honest(*args, **kwargs)
            if method == "ring_step":  # ring elements: exact int64 lies
                parts = list(out) if isinstance(out, tuple) else [out]
                if liar.count == liar.nth:
                    i = liar.lied_index = int(liar.rng.integers(len(parts)))
                    y_lie = ring_lie(liar.mode, parts[i], liar.rng, liar._earlier(parts[i]))
                    liar.told = not np.array_equal(y_lie, parts[i])
                    liar.history += parts
                    parts[i] = y_lie
                    return tuple(parts) if isinstance(out, tuple) else y_lie
                liar.history += parts
                return out
            numpy_out = isinstance(out, np.ndarray)  # a float32 CPU server's results are numpy
            y = np.array(out, np.float32) if numpy_out else out.detach().float().cpu().numpy()
            if liar.count == liar.nth and liar.mode != "stale":
                y_lie = lie(liar.mode, y, liar.rng, liar._earlier(y))
                out = y_lie if numpy_out else torch.from_numpy(y_lie).to(out.dtype)
                liar.told = not np.array_equal(y_lie, y)
            liar.history.append(y)
            return out

        setattr(service, method, lying)
        self.handle = handler.handle
        self.service = service

    def _earlier(self, y: np.ndarray) -> np.ndarray | None:
        """The latest earlier reply of y's shape that differs from y; else rows of an earlier
        reply with y's last dimension (another token's embedding row, say) that differ."""
        for old in reversed(self.history):
            if old.shape == y.shape and not np.array_equal(old, y):
                return old
        rows = y.reshape(-1, y.shape[-1])
        for old in reversed(self.history):
            if old.shape[-1] == y.shape[-1]:
                for row in old.reshape(-1, old.shape[-1]):
                    if not np.array_equal(row, rows[0]):
                        return np.broadcast_to(row, y.shape)
        return None

    def _stale(self, service, method, honest, args):
        """AttnScores: the new key is not written (its slot keeps what it held); AttnOut: the
        newest value slot holds the previous position's value. `told` only if that changed the
        result (in layer 0 a repeated token has the same value at both positions)."""
        if method == "attn_scores":
            import torch

            session, layer, q, _k, pos = args[:5]
            p0 = int(pos[0])
            kv = session.kv
            old = kv[0, layer, :, :, p0].clone() if kv is not None and kv.shape[4] > p0 else None
            out = honest(*args)  # the honest write and scores; then the scores without the write
            kv = session.kv
            B, H, T, S = out.shape
            new = kv[0, layer, :, :, p0].clone()
            kv[0, layer, :, :, p0] = 0.0 if old is None else old
            keys = kv[0, layer, :, :, :S]  # (B, Hkv, S, D)
            Hkv, D = keys.shape[1], keys.shape[3]
            qt = torch.from_numpy(np.array(q)).to(keys.dtype).reshape(B, Hkv, (H // Hkv) * T, D)
            stale = torch.matmul(qt, keys.transpose(-1, -2)).view(B, H, T, S)
            kv[0, layer, :, :, p0] = new
            self.told = not torch.equal(stale, torch.as_tensor(out))
            return stale.numpy() if isinstance(out, np.ndarray) else stale
        if method == "attn_out":
            session, layer = args[:2]
            S = int(session.v_len[layer].max())
            kv = session.kv
            new = kv[1, layer, :, :, S - 1].clone()
            kv[1, layer, :, :, S - 1] = kv[1, layer, :, :, S - 2]
            self.told = not bool((kv[1, layer, :, :, S - 1] == new).all())
            try:
                return honest(*args)
            finally:
                kv[1, layer, :, :, S - 1] = new
        raise ValueError(f"no stale lie for {method}")
