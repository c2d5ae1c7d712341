"""Plans: which operations run on which side, and what that costs in round trips (TRUSTED side).

| plan     | trusted side does                         | GPU does                             | RT/layer |
|----------|-------------------------------------------|--------------------------------------|----------|
| v3       | RMSNorm, RoPE, Softmax, SiLU, residual,   | Embedding, each Linear, QKᵀ and PV,  | 9        |
|          | repeat_kv                                 | LMHead                               |          |
| v2       | as v3, plus the attention matmuls         | Embedding, each Linear, LMHead       | 7        |
| v3-fused | as v3                                     | q|k|v, QKᵀ with a K/V cache, PV with | 5        |
|          |                                           | o_proj, gate|up, down                |          |
| v2-fused | as v2 (grouped attention: no repeat_kv)   | q|k|v, o_proj, gate|up, down         | 4        |

`v3` is the seed's V3.0 exactly (both attention operands are sent with every Matmul); `v2`
is the seed's V2.1 placement. The fused plans keep the placement and cross the boundary
less: one call for q, k and v together, one for gate and up together, and in `v3-fused` a
GPU-side session keeps the rotated K and V so decode uploads only the new token's q and k.
Every plan adds one Embedding and one LMHead call per forward pass.

The merged plans go further. RMSNorm(x) = (r x) ⊙ w, where only the row scale
r = 1 / rms(x) is non-linear. The trusted side computes r and applies it; the GPU applies the
gain w (a diagonal, linear map) inside the product that follows and returns W (w ⊙ x)
unscaled, which the trusted side multiplies by r (and adds the bias to). The GPU can then
compute the Linear after a norm in the same round trip as the Linear before it, on the
residual the trusted side sends along: down_proj with the next layer's q|k|v, o_proj with
gate|up, the embedding with layer 0's q|k|v and the last down_proj with the LM head. The
trusted side still does every residual add, RMSNorm's statistic and scaling, RoPE, softmax
and SiLU; the GPU sees nothing it did not see before (the residual it receives is the
normalized input it always received, times 1/r).

| v3-merged | as v3 | QKᵀ (+ v from pending), PV + o_proj + gate|up, down + next q|k|v | 3 (3L + 1) |
| v2-merged | as v2 | o_proj + gate|up, down + next q|k|v                              | 2 (2L + 1) |

A model can run its prefill and its decode with different plans (TEELlamaModel's
`decode_plan`, chosen per phase by `--plan auto`): a long prompt prefilled in v2 placement
sends no scores or probabilities across, and when decode keeps K/V in a GPU session
(v3-fused, v3-merged) the rotated K and V go up once afterwards (WriteKV, one round trip per
layer). The reverse move, a GPU session's K/V back to the trusted side, is not offered.

The private plans keep v2-fused's placement and round trips but the GPU sees only masked
data (tee/private.py): the embedding is looked up in the trusted side and every Linear and
the LM head get a one-time-padded (private-otp) or secret-shared (private-2party, two
servers in parallel) fixed-point input, 4L + 1 round trips per token.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Plan:
    name: str
    attention_on_gpu: bool  # QKᵀ and PV on the GPU (v3 placement) or in the trusted side (v2)
    fused: bool  # q|k|v and gate|up in one call each
    gpu_kv_cache: bool  # rotated K and V live in a GPU-server session
    rpcs_per_layer: int  # round trips per layer per forward pass
    summary: str
    merged: bool = False  # a Linear after a norm rides with the Linear before it (see below)
    private: bool = False  # masked data on the GPU, embedding in the trusted side (tee/private.py)

    def rpcs_per_forward(self, num_layers: int) -> int:
        """Round trips for one forward pass (one decode token): the layers, plus Embedding and
        LMHead (which the merged plans fold into the first and last layer's calls)."""
        return self.rpcs_per_layer * num_layers + (1 if self.merged or self.private else 2)


PLANS: dict[str, Plan] = {
    "v3": Plan(
        "v3",
        True,
        False,
        False,
        9,
        "seed V3.0: q,k,v,o,gate,up,down Linear calls plus QKᵀ and PV Matmul calls",
    ),
    "v2": Plan(
        "v2",
        False,
        False,
        False,
        7,
        "seed V2.1: q,k,v,o,gate,up,down Linear calls; attention in the trusted side",
    ),
    "v3-fused": Plan(
        "v3-fused",
        True,
        True,
        True,
        5,
        "v3 placement: q|k|v, QKᵀ against a GPU-side K/V cache, PV + o_proj, gate|up, down",
    ),
    "v2-fused": Plan(
        "v2-fused",
        False,
        True,
        False,
        4,
        "v2 placement: q|k|v, o_proj, gate|up, down; attention in the trusted side",
    ),
    "v3-merged": Plan(
        "v3-merged",
        True,
        True,
        True,
        3,
        "v3 placement: QKᵀ, PV + o_proj + gate|up, down + next q|k|v",
        merged=True,
    ),
    "v2-merged": Plan(
        "v2-merged", False, True, False, 2, "v2 placement: o_proj + gate|up, down + next q|k|v", merged=True
    ),
}


# Kept apart from PLANS: they need the local checkpoint and their own client (tee/private.py),
# so `--plan auto` and the benchmark's plan sweep do not pick them up by accident.
PRIVATE_PLANS: dict[str, Plan] = {
    "private-otp": Plan(
        "private-otp",
        False,
        True,
        False,
        4,
        "v2-fused placement, one server: one-time-padded ring inputs, unblinding precomputed",
        private=True,
    ),
    "private-2party": Plan(
        "private-2party",
        False,
        True,
        False,
        4,
        "v2-fused placement, two non-colluding servers: additive shares of every Linear input",
        private=True,
    ),
}


def get_plan(name: str) -> Plan:
    plan = PLANS.get(name) or PRIVATE_PLANS.get(name)
    if plan is None:
        raise ValueError(f"unknown plan {name!r}; available: {', '.join([*PLANS, *PRIVATE_PLANS])}")
    return plan
