"""GPUComputeService: the seed's V3.0 operations on the UNTRUSTED side. No sockets here.

Every method takes and returns numpy arrays (as decoded from the wire) and validates its
arguments against the model before touching torch: requests come from a peer we do not
trust. Computation runs in the service's compute dtype on its device; results go back in
the dtype the request's activations arrived in.
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import ml_dtypes
import numpy as np
import torch
import torch.nn.functional as F

from teesplit.gpu.weights import Weights
from teesplit.protocol import DTYPES, FLOAT_DTYPES, ProtocolError

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def to_torch(x: np.ndarray, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """numpy (possibly read-only, possibly bfloat16) -> torch on `device`."""
    if x.dtype == ml_dtypes.bfloat16:
        x = x.view(np.int16)
        with warnings.catch_warnings():  # read-only wire buffers: we never write into inputs
            warnings.simplefilter("ignore", UserWarning)
            t = torch.from_numpy(x).view(torch.bfloat16)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            t = torch.from_numpy(x)
    return t.to(device=device, dtype=dtype or t.dtype)


def to_numpy(t: torch.Tensor, dtype_name: str) -> np.ndarray:
    t = t.to(TORCH_DTYPES[dtype_name]).cpu()
    if dtype_name == "bfloat16":
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def _bad(message: str, code: str = "bad_tensor") -> ProtocolError:
    return ProtocolError(message, code)


class GPUComputeService:
    def __init__(
        self, weights: Weights, device: torch.device, dtype: torch.dtype, max_elements: int = 1 << 28
    ):
        self.w = weights
        self.config = weights.config
        self.device = device
        self.dtype = dtype
        self.max_elements = max_elements  # cap on any result the peer can make us allocate

    # ---- helpers -------------------------------------------------------------------------
    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _activation(self, x: np.ndarray, last_dim: int, what: str) -> tuple[torch.Tensor, str]:
        name = _float_dtype(x, what)
        if x.ndim != 3 or x.shape[-1] != last_dim:
            raise _bad(f"{what}: expected shape (B, T, {last_dim}), got {x.shape}")
        if x.shape[0] * x.shape[1] == 0:
            raise _bad(f"{what}: empty batch")
        return to_torch(x, self.device, self.dtype), name

    def _check_result_size(self, shape: tuple[int, ...], what: str) -> None:
        n = int(np.prod(shape, dtype=object))
        if n > self.max_elements:
            raise _bad(f"{what}: result of {n} elements exceeds the limit {self.max_elements}", "too_large")

    def timed(self, fn, *args, **kwargs) -> tuple[Any, float]:
        """Run one operation; return its result and the compute time including device copies."""
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        self._sync()
        return out, time.perf_counter() - t0

    # ---- the seed's operations -------------------------------------------------------------
    def init(self) -> tuple[dict[str, Any], list[np.ndarray]]:
        """Model config, RoPE parameters and the stacked RMSNorm weights (2L+1, E)."""
        result = {"config": self.config.to_dict(), "rope": dict(self.config.rope)}
        return result, [self.w.norm_stack().numpy()]

    def embedding(self, ids: np.ndarray, dtype: str = "float32") -> np.ndarray:
        if ids.dtype != DTYPES["int64"] or ids.ndim != 2 or ids.size == 0:
            raise _bad(f"Embedding: ids must be non-empty int64 (B, T), got {ids.dtype}{ids.shape}")
        if dtype not in FLOAT_DTYPES:
            raise _bad(f"Embedding: dtype must be one of {FLOAT_DTYPES}", "bad_args")
        V = self.config.vocab_size
        if ids.min() < 0 or ids.max() >= V:
            raise _bad(f"Embedding: token ids must lie in [0, {V})", "bad_args")
        self._check_result_size((*ids.shape, self.config.hidden_size), "Embedding")
        out = F.embedding(to_torch(ids, self.device), self.w.embed)
        return to_numpy(out, dtype)

    def linear(self, layer: int, module: str, x: np.ndarray) -> np.ndarray:
        if not 0 <= layer < self.config.num_layers:
            raise _bad(f"Linear: layer {layer} out of range [0, {self.config.num_layers})", "bad_args")
        shapes = self.config.linear_shapes
        if module not in shapes:
            raise _bad(f"Linear: unknown module {module!r}; known: {', '.join(shapes)}", "bad_args")
        n_out, n_in = shapes[module]
        xt, name = self._activation(x, n_in, f"Linear {module}")
        self._check_result_size((*x.shape[:2], n_out), "Linear")
        lw = self.w.layers[layer]
        return to_numpy(F.linear(xt, lw.weight[module], lw.bias.get(module)), name)

    def matmul(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        name = _float_dtype(a, "Matmul a")
        if _float_dtype(b, "Matmul b") != name:
            raise _bad(f"Matmul: operands differ in dtype ({a.dtype} vs {b.dtype})")
        if not 2 <= a.ndim == b.ndim <= 4:
            raise _bad(f"Matmul: operands must have equal rank 2..4, got {a.shape} and {b.shape}")
        if a.shape[:-2] != b.shape[:-2] or a.shape[-1] != b.shape[-2]:
            raise _bad(f"Matmul: shapes {a.shape} and {b.shape} do not multiply")
        self._check_result_size((*a.shape[:-1], b.shape[-1]), "Matmul")
        out = torch.matmul(to_torch(a, self.device, self.dtype), to_torch(b, self.device, self.dtype))
        return to_numpy(out, name)

    def lm_head(self, x: np.ndarray) -> np.ndarray:
        xt, name = self._activation(x, self.config.hidden_size, "LMHead")
        self._check_result_size((*x.shape[:2], self.config.vocab_size), "LMHead")
        return to_numpy(F.linear(xt, self.w.lm_head), name)


def _float_dtype(x: np.ndarray, what: str) -> str:
    for name in FLOAT_DTYPES:
        if x.dtype == DTYPES[name]:
            return name
    raise _bad(f"{what}: dtype {x.dtype} is not a float wire dtype {FLOAT_DTYPES}")
