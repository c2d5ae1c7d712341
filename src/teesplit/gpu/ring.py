"""Exact linear maps over the ring Z_2^64 for the private plans (UNTRUSTED side).

The trusted side sends a Linear's input as fixed-point integers masked by a uniformly random
ring element (x - r mod 2^64, or one additive share of x); the server multiplies it by the
layer's weights in fixed point, W_q = round(W * 2^RING_WEIGHT_FRAC_BITS), modulo 2^64, and
returns the ring element without interpreting it. The trusted side unmasks and decodes.

Both sides must quantize the float32 weights identically, so this works only on a server
that keeps float32 weights (`--dtype float32`). On the CPU the product is a numpy int64
matmul, which wraps modulo 2^64; torch has no int64 matmul on CUDA, so there each input is
split into four 16-bit limbs and each weight into a low 16-bit and a signed high part, and
the seven limb products that survive modulo 2^64 are computed in float64, where they are
exact (each is below 2^(32 + log2 n) < 2^53), then recombined in int64.
"""

from __future__ import annotations

import numpy as np
import torch

from teesplit.protocol import RING_WEIGHT_FRAC_BITS

_LIMB = 16
_MASK = (1 << _LIMB) - 1


def fixed_point_weights(w: torch.Tensor) -> torch.Tensor:
    """round(W * 2^RING_WEIGHT_FRAC_BITS) as int64, bit-identical to the trusted side's numpy."""
    return torch.round(w.double() * float(2**RING_WEIGHT_FRAC_BITS)).to(torch.int64)


class RingWeights:
    """One site's fixed-point weights (N, in), laid out for the device's product."""

    def __init__(self, w: torch.Tensor):
        q = fixed_point_weights(w)
        self.shape = tuple(q.shape)
        if q.device.type == "cpu":
            self.numpy = q.numpy()  # (N, in), rows contiguous: numpy's integer loops run fastest
            self.limbs = None
        else:
            self.numpy = None
            self.limbs = ((q & _MASK).double().T.contiguous(), (q >> _LIMB).double().T.contiguous())
        self.nbytes = q.numel() * 8 * (1 if self.limbs is None else 2)

    def matmul(self, x: np.ndarray) -> np.ndarray:
        """x (R, in) int64 -> x @ W_qᵀ mod 2^64, (R, N) int64."""
        if self.numpy is not None:  # numpy integer products wrap modulo 2^64
            return np.einsum("rn,Nn->rN", x, self.numpy) if len(x) <= 2 else x @ self.numpy.T
        return limb_matmul(torch.from_numpy(x).to(self.limbs[0].device), self.limbs).cpu().numpy()


def limb_matmul(x: torch.Tensor, limbs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """x (R, in) int64 times the weights given as (low, high) float64 limbs (in, N), mod 2^64."""
    xs = [((x >> (_LIMB * b)) & _MASK).double() for b in range(4)]  # unsigned 16-bit limbs
    out = None
    for a, w in enumerate(limbs):
        for b in range(4 - a):  # limb pairs with a + b >= 4 vanish modulo 2^64
            term = torch.matmul(xs[b], w).to(torch.int64)  # exact: |term| < 2^53
            term = torch.bitwise_left_shift(term, _LIMB * (a + b))
            out = term if out is None else out + term  # int64 addition wraps modulo 2^64
    return out
