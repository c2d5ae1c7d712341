"""teesplit.models and teesplit.convert: model lookup, the GGUF cache, and the conversion itself."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from teesplit import convert
from teesplit.config import ModelConfig
from teesplit.models import (
    DEFAULT_MODEL,
    ConversionError,
    ModelNotFound,
    cache_root,
    default_gguf_path,
    gguf_cache_dir,
    resolve_model,
)


def test_default_gguf_path_exists():
    path = default_gguf_path()
    assert path.is_file() and path.suffix == ".gguf" and convert.is_gguf_file(path)


def test_converted_config(smollm2_dir):
    cfg = ModelConfig.from_dir(smollm2_dir)
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads) == (30, 576, 9, 3)
    assert cfg.tie_word_embeddings
    assert cfg.model_type == "llama" and cfg.head_dim == 64 and cfg.vocab_size == 49152


def test_converted_special_ids(smollm2_dir):
    hf = json.loads((smollm2_dir / "config.json").read_text())
    vocab = json.loads((smollm2_dir / "tokenizer.json").read_text())["added_tokens"]
    ids = {t["content"]: t["id"] for t in vocab}
    assert hf["bos_token_id"] == ids["<|im_start|>"] == 1
    assert hf["eos_token_id"] == ids["<|im_end|>"] == 2
    assert ModelConfig.from_dir(smollm2_dir).eos_token_ids == (2,)


def test_converted_dir_layout(smollm2_dir):
    names = {p.name for p in smollm2_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert "<|im_start|>" in (smollm2_dir / "chat_template.jinja").read_text()
    assert "quantization_config" not in json.loads((smollm2_dir / "config.json").read_text())


def test_cache_name_and_no_temp_left(smollm2_dir):
    gguf = default_gguf_path()
    digest = hashlib.sha256(gguf.read_bytes()).hexdigest()
    assert smollm2_dir.name == f"{gguf.stem}-{digest[:16]}"
    assert smollm2_dir == gguf_cache_dir(gguf, smollm2_dir.parent)
    assert [p.name for p in smollm2_dir.parent.iterdir()] == [smollm2_dir.name]


@pytest.mark.slow
def test_weights_equal_transformers_gguf_load(smollm2_dir):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file

    gguf = default_gguf_path()
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    ).state_dict()
    saved = load_file(smollm2_dir / "model.safetensors")
    assert set(saved) <= set(ref)
    assert set(ref) - set(saved) <= {"lm_head.weight"}  # tied to the embedding, not stored twice
    for name, tensor in saved.items():
        assert tensor.dtype == torch.float32, name
        assert torch.equal(tensor, ref[name]), name


def test_resolve_default_reuses_cache(smollm2_dir):
    messages: list[str] = []
    assert resolve_model(DEFAULT_MODEL, smollm2_dir.parent, progress=messages.append) == smollm2_dir
    assert messages == []  # already converted: nothing printed, nothing run


def test_resolve_model_dir_is_itself(smollm2_dir):
    assert resolve_model(str(smollm2_dir)) == smollm2_dir


def test_resolve_missing_path(tmp_path):
    missing = tmp_path / "nope.gguf"
    with pytest.raises(ModelNotFound, match="nope.gguf") as info:
        resolve_model(str(missing), tmp_path)
    assert isinstance(info.value, FileNotFoundError)
    assert "config.json" in str(info.value) and "default" in str(info.value)


@pytest.mark.parametrize("name", ["notes.txt", "fake.gguf"])
def test_resolve_non_model_file(tmp_path, name):
    path = tmp_path / name
    path.write_text("not a model")
    with pytest.raises(ModelNotFound, match="GGUF"):
        resolve_model(str(path), tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_resolve_dir_without_config(tmp_path):
    with pytest.raises(ModelNotFound, match="config.json"):
        resolve_model(str(tmp_path))


def test_cache_root_default():
    assert cache_root() == Path.home() / ".cache" / "teesplit"
    assert cache_root(Path("~/x")) == Path.home() / "x"


def _fake_gguf(path: Path) -> Path:
    path.write_bytes(convert.GGUF_MAGIC + b"\x03\x00\x00\x00" + b"garbage" * 10)
    return path


@pytest.mark.slow
def test_subprocess_conversion_failure_is_clean(tmp_path):
    pytest.importorskip("transformers")
    gguf = _fake_gguf(tmp_path / "broken.gguf")
    cache = tmp_path / "cache"
    messages: list[str] = []
    with pytest.raises(ConversionError, match="broken.gguf"):
        resolve_model(str(gguf), cache, progress=messages.append)
    assert len(messages) == 1 and messages[0].startswith("converting ") and "(one time)" in messages[0]
    assert list(cache.iterdir()) == []  # neither a result nor a temp dir


def test_crash_leaves_nothing(tmp_path, monkeypatch):
    def boom(gguf_path, dest):
        (dest / "config.json").write_text("{}")  # partially written
        raise ConversionError("simulated crash")

    monkeypatch.setattr(convert, "_convert_into", boom)
    out = tmp_path / "cache" / "m"
    with pytest.raises(ConversionError, match="simulated"):
        convert.convert_gguf(_fake_gguf(tmp_path / "m.gguf"), out)
    assert list((tmp_path / "cache").iterdir()) == []


def test_lost_race_keeps_winner(tmp_path, monkeypatch):
    out = tmp_path / "cache" / "m"

    def racing(gguf_path, dest):
        (dest / "config.json").write_text('{"who": "loser"}')
        out.mkdir()  # another converter publishes while we work
        (out / "config.json").write_text('{"who": "winner"}')

    monkeypatch.setattr(convert, "_convert_into", racing)
    assert convert.convert_gguf(_fake_gguf(tmp_path / "m.gguf"), out) == out
    assert json.loads((out / "config.json").read_text()) == {"who": "winner"}
    assert [p.name for p in out.parent.iterdir()] == ["m"]


def test_convert_main_reports_errors(tmp_path, capsys):
    assert convert.main([str(tmp_path / "missing.gguf"), str(tmp_path / "out")]) == 1
    assert "not a GGUF file" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
