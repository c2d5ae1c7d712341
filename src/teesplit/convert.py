"""One-time GGUF -> Hugging Face model directory conversion (neither side: a setup tool).

Both sides of the trust boundary read a plain Hugging Face directory (config.json,
model.safetensors, tokenizer.json, tokenizer_config.json, chat_template.jinja). This module
produces it from a GGUF file with transformers, which dequantizes every tensor to float32.

torch and transformers are imported lazily inside the functions, so importing this module
stays cheap; the trusted runner still never calls it in-process (`teesplit.models` runs it as
``python -m teesplit.convert GGUF OUT_DIR`` in a subprocess instead).

The result appears atomically: everything is written into a temporary sibling directory that
is renamed onto ``out_dir`` only once complete, so a crash or a concurrent converter never
leaves a half-written cache behind.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

GGUF_MAGIC = b"GGUF"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
TMP_PREFIX = ".tmp-"  # temporary siblings start with this, so a cache scan can skip them


class ConversionError(RuntimeError):
    """The GGUF file could not be converted into a Hugging Face model directory."""


def is_gguf_file(path: Path) -> bool:
    """True when `path` is a regular file that starts with the GGUF magic bytes."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Convert `gguf_path` into a Hugging Face model directory at `out_dir` and return it.

    Returns at once when `out_dir` already holds a converted model (e.g. a concurrent
    converter won the race).
    """
    gguf_path, out_dir = Path(gguf_path).resolve(), Path(out_dir)
    if _is_model_dir(out_dir):
        return out_dir
    if not is_gguf_file(gguf_path):
        raise ConversionError(f"{gguf_path} is not a GGUF file (missing or lacks the 'GGUF' magic bytes)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{out_dir.name}-", dir=out_dir.parent))
    # mkdtemp makes it 0700; the published cache must stay readable by a GPU server run as another user.
    tmp.chmod(0o755)
    try:
        _convert_into(gguf_path, tmp)
        _publish(tmp, out_dir)
    finally:
        # Only non-empty after a failure or a lost race; the winner's directory is complete.
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file()


def _publish(tmp: Path, out_dir: Path) -> None:
    """Rename `tmp` onto `out_dir`; tolerate another converter having published first."""
    try:
        os.rename(tmp, out_dir)  # atomic on POSIX; replaces only a missing or empty directory
    except OSError as e:
        if _is_model_dir(out_dir):
            return  # a concurrent converter finished first; its result is equivalent
        raise ConversionError(
            f"cannot create {out_dir}: {e.strerror or e}. Remove it or choose another output directory."
        ) from e


def _convert_into(gguf_path: Path, dest: Path) -> None:
    tokenizer = _load_tokenizer(gguf_path)
    model = _load_model(gguf_path)
    _reconcile_special_ids(model, tokenizer)
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    _ensure_chat_template(tokenizer, dest)
    _check_complete(dest)


def _import_transformers() -> Any:
    try:
        import torch  # noqa: F401
        import transformers
    except ImportError as e:
        raise ConversionError(
            f"converting a GGUF file needs torch, transformers and gguf ({e}); "
            "install them with `pip install 'teesplit[convert]'`"
        ) from e
    return transformers


def _load_model(gguf_path: Path) -> Any:
    import torch

    transformers = _import_transformers()
    kwargs: dict[str, Any] = {"gguf_file": gguf_path.name, "dtype": torch.float32}
    # transformers >= 5 keeps GGUF weights packed behind a quantizer that refuses to
    # save_pretrained; asking for dequantization up front yields a plain float32 model.
    # Older versions always dequantize and have no GgufConfig.
    gguf_config = getattr(transformers, "GgufConfig", None)
    if gguf_config is not None:
        kwargs["quantization_config"] = gguf_config(dequantize=True)
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), **kwargs)
    except Exception as e:  # transformers raises many types here; the cause stays chained
        raise ConversionError(f"transformers could not load {gguf_path}: {e}") from e
    if getattr(model, "hf_quantizer", None) is not None:
        raise ConversionError(
            f"transformers {transformers.__version__} kept {gguf_path.name} quantized, "
            "so it cannot save float32 weights; try another transformers version"
        )
    return model


def _load_tokenizer(gguf_path: Path) -> Any:
    transformers = _import_transformers()
    try:
        return transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    except Exception as e:
        raise ConversionError(f"transformers could not read the tokenizer of {gguf_path}: {e}") from e


def _reconcile_special_ids(model: Any, tokenizer: Any) -> None:
    """Make config.json's bos/eos ids agree with the tokenizer the GGUF ships.

    The tokenizer's ids come straight from the GGUF's ``tokenizer.ggml.*_token_id`` metadata;
    the model config may lack them, and generation stops on config's eos ids.
    """
    for cfg in (model.config, getattr(model, "generation_config", None)):
        if cfg is None:
            continue
        if tokenizer.bos_token_id is not None and getattr(cfg, "bos_token_id", None) is None:
            cfg.bos_token_id = tokenizer.bos_token_id
        eos = tokenizer.eos_token_id
        if eos is None:
            continue
        have = getattr(cfg, "eos_token_id", None)
        if have is None:
            cfg.eos_token_id = eos
        elif eos not in (have if isinstance(have, list) else [have]):
            cfg.eos_token_id = (have if isinstance(have, list) else [have]) + [eos]


def _ensure_chat_template(tokenizer: Any, dest: Path) -> None:
    """Write the template where the trusted tokenizer looks, whatever this transformers did."""
    template = getattr(tokenizer, "chat_template", None)
    target = dest / CHAT_TEMPLATE_FILE
    if isinstance(template, str) and not target.exists() and not _template_in_config(dest):
        target.write_text(template, encoding="utf-8")
    elif template is None:
        print(f"note: {dest.name} has no chat template; only plain completion will work", file=sys.stderr)


def _template_in_config(dest: Path) -> bool:
    path = dest / "tokenizer_config.json"
    return path.is_file() and bool(json.loads(path.read_text(encoding="utf-8")).get("chat_template"))


def _check_complete(dest: Path) -> None:
    required = ("config.json", "tokenizer.json", "tokenizer_config.json")
    missing = [name for name in required if not (dest / name).is_file()]
    if not any(dest.glob("*.safetensors")):
        missing.append("*.safetensors")
    if missing:
        raise ConversionError(
            f"conversion wrote no {', '.join(missing)}; is transformers too old for this GGUF?"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m teesplit.convert",
        description="Convert a GGUF file into a Hugging Face model directory (float32 safetensors).",
    )
    parser.add_argument("gguf", type=Path, help="the .gguf file to convert")
    parser.add_argument("out_dir", type=Path, help="directory to create (written atomically)")
    args = parser.parse_args(argv)
    try:
        out = convert_gguf(args.gguf, args.out_dir)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
