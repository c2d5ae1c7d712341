"""Trusted parameters: the runner reads norm weights and RoPE parameters from its own copy of
the checkpoint and refuses an Init that differs; pinned checkpoint files are hashed and a
mismatch is refused."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from helpers import make_checkpoint
from safetensors.numpy import load_file, save_file

from teesplit.launch import build_service
from teesplit.tee.checkpoint import IntegrityError, PinError, TrustedCheckpoint, check_pins, write_manifest
from teesplit.tee.client import GPUClient
from teesplit.tee.model import TEELlamaModel
from teesplit.tee.plans import get_plan
from teesplit.tee.verify import VerifiedPort
from teesplit.transport.local import LocalTransport


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("trusted"), "qwen2")


def _model(server_dir, runner_dir, plan="v3-fused"):
    handler, _ = build_service(server_dir, "cpu", "float32", progress=False)
    client = VerifiedPort(GPUClient(LocalTransport(handler.handle)), checkpoint=TrustedCheckpoint(runner_dir))
    return TEELlamaModel(client, get_plan(plan))


def _variant(src, dst, edit_weights=None, edit_config=None):
    shutil.copytree(src, dst)
    if edit_weights:
        w = load_file(str(dst / "model.safetensors"))
        edit_weights(w)
        save_file(w, str(dst / "model.safetensors"), metadata={"format": "pt"})
    if edit_config:
        cfg = json.loads((dst / "config.json").read_text())
        edit_config(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_matching_init_is_accepted_and_local_values_are_used(ckpt):
    model = _model(ckpt, ckpt)
    ck = TrustedCheckpoint(ckpt)
    norms = ck.norms()
    assert np.array_equal(model.final_norm, norms[-1])
    assert np.array_equal(model.input_norms, norms[0:-1:2])
    assert set(model.biases) == {"qkv"}  # qwen2: q/k/v biases, from the local file
    logits = model.forward(np.array([[1, 2, 3]]), model.new_cache())
    assert np.isfinite(logits).all()


def test_init_with_other_norm_weights_is_refused(ckpt, tmp_path):
    def bump(w):
        w["model.layers.1.post_attention_layernorm.weight"][5] += 1e-3

    other = _variant(ckpt, tmp_path / "other", edit_weights=bump)
    with pytest.raises(IntegrityError, match=r"RMSNorm weights differ .* row 3 "):
        _model(other, ckpt)


def test_init_with_other_rope_parameters_is_refused(ckpt, tmp_path):
    def theta(cfg):
        cfg.setdefault("rope_parameters", {})["rope_theta"] = 5000.0  # transformers 5 layout
        cfg["rope_theta"] = 5000.0

    other = _variant(ckpt, tmp_path / "rope", edit_config=theta)
    with pytest.raises(IntegrityError, match="configuration differs .* rope"):
        _model(other, ckpt)


def test_pins(ckpt, tmp_path):
    import hashlib

    digest = hashlib.sha256((ckpt / "model.safetensors").read_bytes()).hexdigest()
    assert check_pins(ckpt, sha256=digest) == ["model.safetensors"]
    with pytest.raises(PinError, match="refused"):
        check_pins(ckpt, sha256="0" * 64)
    with pytest.raises(PinError, match="64 hex digits"):
        check_pins(ckpt, sha256="abc")
    manifest = tmp_path / "pins.txt"
    manifest.write_text(write_manifest(ckpt))
    assert sorted(check_pins(ckpt, manifest=manifest)) == ["config.json", "model.safetensors"]
    changed = _variant(ckpt, tmp_path / "changed", edit_weights=lambda w: w["model.norm.weight"].__imul__(2))
    with pytest.raises(PinError, match="model.safetensors has sha256 .* refused"):
        check_pins(changed, manifest=manifest)
    manifest.write_text(write_manifest(ckpt).splitlines()[1] + "\n")
    with pytest.raises(PinError, match="does not pin config.json"):
        check_pins(ckpt, manifest=manifest)


def test_cli_refuses_a_mismatching_pin(ckpt):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "teesplit",
            "generate",
            "--server",
            "local",
            "--model",
            str(ckpt),
            "--prompt",
            "hi",
        ]
        + ["--weights-sha256", "1" * 64],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "but --weights-sha256 pins" in r.stderr and "refused" in r.stderr


def test_safetensors_reader_checks_each_entry(tmp_path):
    """The numpy reader both trusted-side loaders use: offsets that do not match the shape are
    refused when the file is opened; an integer buffer is refused only when asked for."""
    import struct

    from teesplit.tee.checkpoint import SafetensorsReader

    def write(name, header, payload):
        head = json.dumps(header).encode()
        (tmp_path / name).write_bytes(struct.pack("<Q", len(head)) + head + payload)
        return tmp_path / name

    ok = write(
        "ok.safetensors",
        {
            "model.x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "steps": {"dtype": "I64", "shape": [1], "data_offsets": [8, 16]},
        },
        np.arange(2, dtype=np.float32).tobytes() + bytes(8),
    )
    reader = SafetensorsReader([ok])
    np.testing.assert_array_equal(reader.get("x"), [0.0, 1.0])  # "model." may be left out
    with pytest.raises(ValueError, match="tensor steps has unsupported dtype I64"):
        reader.get("steps")
    bad = write("bad.safetensors", {"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(8))
    with pytest.raises(ValueError, match="tensor x has inconsistent offsets"):
        SafetensorsReader([bad])
    past = write("past.safetensors", {"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, bytes(8))
    with pytest.raises(ValueError, match="tensor x has inconsistent offsets"):
        SafetensorsReader([past])
