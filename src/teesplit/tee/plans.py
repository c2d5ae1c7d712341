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

The private plans keep v2-merged's placement and round trips, 2L + 1 per token, but the GPU
sees only masked data (tee/private.py): the embedding is looked up in the trusted side, and
every merged call gets one-time-padded (private-otp) or secret-shared (private-2party, two
servers; the second one's shares multiplied ahead) fixed-point inputs, multiplied by integer
weights (teesplit/quant.py).
Every GPU operation of a merged call is linear (products, the norm gain as a diagonal, the
residual add), so it computes on masked values and on shares alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from teesplit.errors import UsageError

Placement = Literal["gpu", "trusted"]  # where QKᵀ and PV run
Crossing = Literal["seed", "fused", "merged"]  # how the calls of a layer are grouped
Privacy = Literal["otp", "2party"]


@dataclass(frozen=True)
class Plan:
    """A plan, described by what it is; everything else (round trips, whether K/V live in a GPU
    session, how many servers) follows from these fields. Adding a plan is one entry in PLANS
    (and the model code for a new combination, if any)."""

    name: str
    attention: Placement
    crossing: Crossing
    summary: str
    private: Privacy | None = None  # the GPU sees only masked data (tee/private.py)

    @property
    def attention_on_gpu(self) -> bool:
        return self.attention == "gpu"

    @property
    def fused(self) -> bool:
        """q|k|v and gate|up in one call each."""
        return self.crossing != "seed"

    @property
    def merged(self) -> bool:
        """A Linear after a norm rides with the Linear before it (see the module docstring)."""
        return self.crossing == "merged"

    @property
    def gpu_kv_cache(self) -> bool:
        """Rotated K and V live in a GPU-server session: GPU attention with fused calls."""
        return self.attention_on_gpu and self.fused and self.private is None

    @property
    def embedding_on_gpu(self) -> bool:
        """The private plans look the embedding up in the trusted side: no token id crosses."""
        return self.private is None

    @property
    def servers(self) -> int:
        return 2 if self.private == "2party" else 1

    @property
    def rpcs_per_layer(self) -> int:
        """Round trips per layer per forward pass."""
        attention = 1 if self.attention_on_gpu else 0  # QKᵀ (PV rides with o_proj, or is a 2nd Matmul)
        if self.crossing == "seed":  # q, k, v, o, gate, up, down separately; QKᵀ and PV apart
            return 7 + 2 * attention
        if self.crossing == "fused":  # q|k|v, o, gate|up, down
            return 4 + attention
        return 2 + attention  # o + gate|up, down + next q|k|v

    def rpcs_per_forward(self, num_layers: int) -> int:
        """Round trips for one forward pass (one decode token): the layers, plus the embedding
        and the LM head, which the merged plans fold into the first and last layer's calls and
        the private plans do not send (the embedding is looked up in the trusted side)."""
        extra = 1 if self.merged else 1 + self.embedding_on_gpu
        return self.rpcs_per_layer * num_layers + extra


PLANS: dict[str, Plan] = {
    p.name: p
    for p in (
        Plan(
            "v3", "gpu", "seed", "seed V3.0: q,k,v,o,gate,up,down Linear calls plus QKᵀ and PV Matmul calls"
        ),
        Plan(
            "v2",
            "trusted",
            "seed",
            "seed V2.1: q,k,v,o,gate,up,down Linear calls; attention in the trusted side",
        ),
        Plan(
            "v3-fused",
            "gpu",
            "fused",
            "v3 placement: q|k|v, QKᵀ against a GPU-side K/V cache, PV + o_proj, gate|up, down",
        ),
        Plan(
            "v2-fused",
            "trusted",
            "fused",
            "v2 placement: q|k|v, o_proj, gate|up, down; attention in the trusted side",
        ),
        Plan("v3-merged", "gpu", "merged", "v3 placement: QKᵀ, PV + o_proj + gate|up, down + next q|k|v"),
        Plan("v2-merged", "trusted", "merged", "v2 placement: o_proj + gate|up, down + next q|k|v"),
    )
}


# Kept apart from PLANS: they need the local checkpoint and their own port (tee/private.py),
# so `--plan auto` and the benchmark's plan sweep do not pick them up by accident.
PRIVATE_PLANS: dict[str, Plan] = {
    p.name: p
    for p in (
        Plan(
            "private-otp",
            "trusted",
            "merged",
            "v2-merged crossings, one server: one-time-padded ring inputs, unblinding precomputed",
            private="otp",
        ),
        Plan(
            "private-2party",
            "trusted",
            "merged",
            "v2-merged crossings, two non-colluding servers: additive shares of every input",
            private="2party",
        ),
    )
}


def get_plan(name: str) -> Plan:
    plan = PLANS.get(name) or PRIVATE_PLANS.get(name)
    if plan is None:
        raise UsageError(f"unknown plan {name!r}; available: {', '.join([*PLANS, *PRIVATE_PLANS])}")
    return plan


# `--prefill-chunk auto`: prompt tokens per forward pass by where the prefill's attention runs
# (BENCHMARKS.md, "Long prompts and contexts", SmolLM2 at 2,048 tokens, CPU time of both sides).
# v3 placement: the chunk's scores and probabilities cross the link, so smaller chunks are
# faster (v3-merged: 11.7 s at 256, 13.9 at 512, 26.6 in one pass) and bound both sides' memory
# by chunk x context. v2 placement: nothing quadratic crosses and the trusted side's attention
# is blockwise, so a chunk only bounds the activations, and fewer chunks cost less (v2-merged,
# three alternating rounds: 8.62 s at 512, 8.26 at 1,024, 7.87 in one pass).
PREFILL_CHUNKS = {"gpu": 256, "trusted": 2048}


def prefill_chunk(plan: Plan, chunk: int | str | None) -> int | None:
    """`--prefill-chunk` for a prefill in `plan`: "auto" by its attention placement; 0 or None:
    the whole prompt in one pass."""
    if chunk == "auto":
        return PREFILL_CHUNKS[plan.attention]
    return chunk or None
