"""The runner's own copy of the checkpoint: trusted parameters and pinned files (TRUSTED side).

The seed takes the RMSNorm weights and RoPE parameters from the GPU server's Init reply: a
lying server could then change the model's non-linear half at will. Given a local copy of the
checkpoint, the runner reads them itself and refuses an Init whose values differ
(`check_init`). The files can be pinned by hash (`--weights-sha256` for a single-file
checkpoint, or a sha256sum-style manifest for any), and a mismatching file is refused before
anything is read from it. `--verify` fingerprints the GPU's weights from this copy.

numpy only: safetensors files are read by a small reader over a memory map (no torch, and
bfloat16 through ml_dtypes), so only the tensors asked for are paged in.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import re
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from teesplit.config import (
    EMBED_TOKENS,
    FINAL_NORM,
    LAYER_NORMS,
    LM_HEAD_WEIGHT,
    ModelConfig,
    linear_tensor,
    norm_tensor,
)
from teesplit.errors import UsageError

_ST_DTYPES = {
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F64": np.dtype(np.float64),
}
COMPUTE_DTYPES = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
}
MAX_HEADER_BYTES = 100 << 20


class IntegrityError(Exception):
    """The GPU server's reply (or Init) does not match what the trusted side knows to be right."""


class PinError(UsageError):
    """A checkpoint file does not match its pinned hash, or the pin cannot be checked."""


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        return [model_dir / s for s in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return sorted(model_dir.glob("*.safetensors"))


def write_manifest(model_dir: Path) -> str:
    """sha256sum-style lines ("HEX  NAME") for config.json and every weight file."""
    files = [model_dir / "config.json", *weight_files(model_dir)]
    return "".join(f"{sha256_file(f)}  {f.relative_to(model_dir)}\n" for f in files)


def check_pins(model_dir: Path, sha256: str | None = None, manifest: Path | None = None) -> list[str]:
    """Hash the pinned files; raise PinError on any mismatch. Returns the names checked."""
    files = weight_files(model_dir)
    checked = []
    if sha256 is not None:
        want = sha256.strip().lower()
        if not re.fullmatch(r"[0-9a-f]{64}", want):
            raise PinError(f"--weights-sha256 must be 64 hex digits, got {sha256!r}")
        if len(files) != 1:
            raise PinError(
                f"--weights-sha256 pins a single-file checkpoint; {model_dir} has {len(files)} weight files: "
                "use --weights-manifest FILE (`teesplit manifest --model DIR` writes one)"
            )
        got = sha256_file(files[0])
        if got != want:
            raise PinError(f"{files[0]} has sha256 {got}, but --weights-sha256 pins {want}: refused")
        checked.append(files[0].name)
    if manifest is not None:
        entries = {}
        for n, line in enumerate(Path(manifest).read_text().splitlines(), 1):
            if not line.strip():
                continue
            m = re.fullmatch(r"([0-9a-fA-F]{64}) [ *](.+)", line.strip())
            if m is None:
                raise PinError(f"{manifest}:{n}: expected 'SHA256  FILE' (sha256sum format)")
            entries[m.group(2)] = m.group(1).lower()
        needed = {"config.json", *(str(f.relative_to(model_dir)) for f in files)}
        missing = sorted(needed - set(entries))
        if missing:
            raise PinError(f"{manifest} does not pin {', '.join(missing)}: every weight file and config.json")
        for name, want in sorted(entries.items()):
            path = model_dir / name
            if not path.resolve().is_relative_to(model_dir.resolve()) or not path.is_file():
                raise PinError(f"{manifest} pins {name}, which is not a file in {model_dir}")
            got = sha256_file(path)
            if got != want:
                raise PinError(f"{path} has sha256 {got}, but {manifest} pins {want}: refused")
            checked.append(name)
    return checked


class SafetensorsReader:
    """Tensors of one or more .safetensors files by name, memory-mapped, numpy only. Each
    entry's dtype, shape and offsets are checked against its file when the reader is made."""

    def __init__(self, files: list[Path]):
        self._tensors: dict[str, np.ndarray | ValueError] = {}
        self._maps: list[np.memmap] = []
        for path in files:
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                if n > MAX_HEADER_BYTES:
                    raise ValueError(f"{path}: safetensors header of {n} bytes is implausible")
                header = json.loads(f.read(n))
            data = np.memmap(path, np.uint8, "r", offset=8 + n)
            self._maps.append(data)
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                dtype = _ST_DTYPES.get(info.get("dtype"))
                if dtype is None:  # an integer buffer, say: refused only if asked for
                    self._tensors[name] = ValueError(
                        f"{path}: tensor {name} has unsupported dtype {info.get('dtype')}"
                    )
                    continue
                begin, end = info["data_offsets"]
                shape = tuple(info["shape"])
                if not 0 <= begin <= end <= data.size or end - begin != math.prod(shape) * dtype.itemsize:
                    raise ValueError(f"{path}: tensor {name} has inconsistent offsets")
                self._tensors[name] = data[begin:end].view(dtype).reshape(shape)

    def names(self) -> list[str]:
        return list(self._tensors)

    def release(self) -> None:
        """Unmap the pages read so far from this process (they stay in the kernel's page cache;
        a later read maps them again): after reading every weight once, the files would
        otherwise count in full in the runner's resident memory."""
        for data in self._maps:
            mm = getattr(data, "_mmap", None)
            if mm is not None and hasattr(mm, "madvise"):
                try:
                    mm.madvise(mmap.MADV_DONTNEED)
                except (OSError, ValueError):  # not supported here: the pages stay mapped
                    pass

    def has(self, name: str) -> bool:
        return name in self._tensors or f"model.{name}" in self._tensors

    def get(self, name: str) -> np.ndarray:
        """The tensor as stored (float32, float16 or bfloat16), a read-only view of the file;
        `name` may leave out the "model." prefix."""
        key = name if name in self._tensors else f"model.{name}"
        if key not in self._tensors:
            raise KeyError(f"checkpoint lacks {name}")
        t = self._tensors[key]
        if isinstance(t, ValueError):
            raise t
        return t


class TrustedCheckpoint:
    """The runner's local checkpoint: config (with RoPE parameters), norms, biases, weights."""

    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        self.config = ModelConfig.from_dir(self.dir)
        files = weight_files(self.dir)
        if not files:
            raise FileNotFoundError(f"no *.safetensors files in {self.dir}: the runner has no local weights")
        self.reader = SafetensorsReader(files)

    def release(self) -> None:
        """Unmap the weight pages read so far (SafetensorsReader.release)."""
        self.reader.release()

    @staticmethod
    def available(model_dir: str | Path) -> bool:
        return bool(weight_files(Path(model_dir)))

    def tensor(self, name: str, dtype: np.dtype | str = np.float32) -> np.ndarray:
        """A tensor as the GPU server holds it: stored values rounded to `dtype` (its compute
        dtype), returned in float32 (exact: every compute dtype widens exactly). Read-only: a
        view of the file when it stores float32 and `dtype` is float32 (no copy of the weights)."""
        t = self.reader.get(name)
        return np.asarray(t.astype(np.dtype(dtype), copy=False).astype(np.float32, copy=False))

    def norms(self) -> np.ndarray:
        """(2L+1, E) float32: input and post-attention norm for each layer, then the final norm,
        as the server keeps them (float32 whatever its compute dtype)."""
        L = self.config.num_layers
        rows = []
        for i in range(L):
            rows += [self.tensor(norm_tensor(i, which)) for which in LAYER_NORMS]
        rows.append(self.tensor(FINAL_NORM))
        return np.stack(rows)

    def linear(self, layer: int, module: str, dtype) -> tuple[np.ndarray, np.ndarray | None]:
        """(weight (N, K), bias (N,) or None), rounded to the compute dtype, float32."""
        return self.tensor(linear_tensor(layer, module), dtype), self.linear_bias(layer, module, dtype)

    def embed(self, dtype) -> np.ndarray:
        return self.tensor(EMBED_TOKENS, dtype)

    def lm_head(self, dtype) -> np.ndarray:
        if self.config.tie_word_embeddings or not self.reader.has(LM_HEAD_WEIGHT):
            return self.embed(dtype)
        return self.tensor(LM_HEAD_WEIGHT, dtype)

    def biases(self, dtype) -> dict[str, np.ndarray]:
        """The per-layer bias stacks the server's Init lists (merged plans): qkv, o, gate_up, down."""
        c, out = self.config, {}
        groups = {
            "qkv": ("q_proj", "k_proj", "v_proj"),
            "o": ("o_proj",),
            "gate_up": ("gate_proj", "up_proj"),
            "down": ("down_proj",),
        }
        for name, modules in groups.items():
            rows = []
            for i in range(c.num_layers):
                parts = [self.linear_bias(i, m, dtype) for m in modules]
                if any(p is None for p in parts):
                    break
                rows.append(np.concatenate(parts))
            if len(rows) == c.num_layers:
                out[name] = np.stack(rows)
        return out

    def linear_bias(self, layer: int, module: str, dtype) -> np.ndarray | None:
        name = linear_tensor(layer, module, "bias")
        return self.tensor(name, dtype) if self.reader.has(name) else None

    def check_init(self, config: ModelConfig, norms: np.ndarray, biases: dict[str, np.ndarray], dtype: str):
        """Raise IntegrityError unless the server's Init equals this checkpoint's values."""
        mine = self.config
        if config != mine:
            fields = [k for k, v in mine.to_dict().items() if config.to_dict().get(k) != v]
            raise IntegrityError(
                f"Init: the GPU server's model configuration differs from the local checkpoint in "
                f"{', '.join(fields)} (local {self.dir}); refused"
            )
        local = self.norms()
        if norms.shape != local.shape or not np.array_equal(norms, local):
            bad = int(np.argmax(np.any(norms != local, axis=1))) if norms.shape == local.shape else -1
            raise IntegrityError(
                f"Init: the GPU server's RMSNorm weights differ from the local checkpoint {self.dir} "
                f"(first differing row {bad} of the (2L+1, E) stack); refused"
            )
        local_b = self.biases(COMPUTE_DTYPES[dtype])
        if set(local_b) != set(biases) or any(not np.array_equal(biases[k], local_b[k]) for k in local_b):
            raise IntegrityError(f"Init: the GPU server's biases differ from the local checkpoint {self.dir}")
