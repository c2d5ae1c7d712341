"""Model configuration shared by both sides of the trust boundary.

`ModelConfig` is built from a Hugging Face ``config.json`` and validated here once, so the
trusted runner and the GPU server agree on every shape. numpy-free, torch-free.
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from teesplit.errors import UsageError

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2")
LAYER_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")

# ---- the one map from the model's parts to Hugging Face checkpoint tensor names -------------
# Both sides read checkpoints by these names (and the benchmark writes its synthetic one by
# them). They leave out the "model." prefix most checkpoints carry; the readers accept both.
EMBED_TOKENS = "embed_tokens.weight"
FINAL_NORM = "norm.weight"
LM_HEAD_WEIGHT = "lm_head.weight"  # without the prefix in every checkpoint
LAYER_NORMS = ("input_layernorm", "post_attention_layernorm")  # before attention, before the MLP


def linear_tensor(layer: int, module: str, part: str = "weight") -> str:
    """The name of a layer's Linear weight (or bias), e.g. layers.3.self_attn.q_proj.weight."""
    parent = "self_attn" if module in _ATTENTION_MODULES else "mlp"
    return f"layers.{layer}.{parent}.{module}.{part}"


def norm_tensor(layer: int, which: str) -> str:
    """The name of a layer's RMSNorm weight; `which` is one of LAYER_NORMS."""
    return f"layers.{layer}.{which}.weight"


SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")


class ConfigError(UsageError):
    """The checkpoint's configuration is missing something or describes an unsupported model."""


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: dict[str, Any] = field(default_factory=dict)  # normalized: rope_type, rope_theta, ...
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def has_bias(self, module: str) -> bool:
        """Whether the checkpoint holds a bias for this Linear (Qwen2's q/k/v, attention_bias, mlp_bias)."""
        if module in ("q_proj", "k_proj", "v_proj"):
            return self.qkv_bias
        return self.o_bias if module == "o_proj" else self.mlp_bias

    @functools.cached_property
    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(out_features, in_features) of every per-layer Linear, by module name (made once:
        both sides look it up on every Linear call)."""
        E, F = self.hidden_size, self.intermediate_size
        return {
            "q_proj": (self.q_dim, E),
            "k_proj": (self.kv_dim, E),
            "v_proj": (self.kv_dim, E),
            "o_proj": (E, self.q_dim),
            "gate_proj": (F, E),
            "up_proj": (F, E),
            "down_proj": (E, F),
        }

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Rebuild from `to_dict` output (e.g. an Init reply); unknown keys are ignored."""
        names = set(cls.__dataclass_fields__)
        kw = {k: v for k, v in d.items() if k in names}
        kw["eos_token_ids"] = tuple(kw.get("eos_token_ids", ()))
        kw["rope"] = dict(kw.get("rope", {}))
        cfg = cls(**kw)
        cfg.validate()
        return cfg

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        """Build from the contents of a Hugging Face ``config.json``."""
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_FAMILIES:
            raise ConfigError(
                f"unsupported model_type {model_type!r}: teesplit supports {', '.join(SUPPORTED_FAMILIES)}"
            )
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"unsupported hidden_act {act!r}: only 'silu' is supported")
        try:
            E = int(hf["hidden_size"])
            H = int(hf["num_attention_heads"])
            Hkv = int(hf.get("num_key_value_heads") or H)
            head_dim = int(hf.get("head_dim") or E // H)
            if model_type == "qwen2":
                qkv_bias, o_bias = True, False
            else:
                qkv_bias = o_bias = bool(hf.get("attention_bias", False))
            sliding_window = None
            if model_type == "mistral":
                sliding_window = hf.get("sliding_window")
            elif model_type == "qwen2" and hf.get("use_sliding_window", False):
                # transformers applies Qwen2's window only to layers >= max_window_layers; not modelled.
                raise ConfigError("Qwen2 with use_sliding_window=true is not supported")
            eos = hf.get("eos_token_id")
            eos_ids = tuple(
                int(e) for e in (eos if isinstance(eos, list) else [eos] if eos is not None else [])
            )
            cfg = cls(
                model_type=model_type,
                vocab_size=int(hf["vocab_size"]),
                hidden_size=E,
                intermediate_size=int(hf["intermediate_size"]),
                num_layers=int(hf["num_hidden_layers"]),
                num_heads=H,
                num_kv_heads=Hkv,
                head_dim=head_dim,
                rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
                rope=normalize_rope(hf),
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                qkv_bias=qkv_bias,
                o_bias=o_bias,
                mlp_bias=bool(hf.get("mlp_bias", False)),
                sliding_window=int(sliding_window) if sliding_window else None,
                bos_token_id=hf.get("bos_token_id"),
                eos_token_ids=eos_ids,
            )
        except KeyError as e:
            raise ConfigError(f"config.json lacks required field {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise ConfigError(f"config.json has a malformed field: {e}") from None
        cfg.validate()
        return cfg

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelConfig:
        p = Path(path) / "config.json"
        if not p.is_file():
            raise ConfigError(f"{p} not found: a model directory needs a Hugging Face config.json")
        return cls.from_hf(json.loads(p.read_text()))

    def validate(self) -> None:
        positive = (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "max_position_embeddings",
        )
        for name in positive:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if not self.rms_norm_eps > 0:
            raise ConfigError(f"rms_norm_eps must be positive, got {self.rms_norm_eps}")
        rope_type = self.rope.get("rope_type")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(
                f"unsupported rope_type {rope_type!r}: supported are {', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        if rope_type != "default" and "factor" not in self.rope:
            raise ConfigError(f"rope_type {rope_type!r} needs a 'factor'")


def normalize_rope(hf: dict[str, Any]) -> dict[str, Any]:
    """One flat dict of RoPE parameters, whether the checkpoint uses the transformers 5
    ``rope_parameters`` layout or the older ``rope_theta`` + ``rope_scaling`` fields."""
    rope = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
    rope.setdefault(
        "rope_theta", hf.get("rope_theta", (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0))
    )
    rope["rope_type"] = rope.get("rope_type", rope.pop("type", "default"))
    rope.pop("type", None)
    if rope.get("partial_rotary_factor", 1.0) != 1.0 or hf.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConfigError("partial rotary embeddings are not supported")
    if rope["rope_type"] in ("llama3", "yarn"):
        rope.setdefault("original_max_position_embeddings", hf.get("max_position_embeddings", 2048))
    rope["rope_theta"] = float(rope["rope_theta"])
    return rope
