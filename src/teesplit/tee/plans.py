"""Plans: which operations run on which side, and what that costs in round trips (TRUSTED side).

| plan | trusted side does                                  | GPU does                                   |
|------|----------------------------------------------------|--------------------------------------------|
| v3   | RMSNorm, RoPE, Softmax, SiLU, residuals, repeat_kv | Embedding, each Linear, QKᵀ and PV, LMHead |
| v2   | as v3, plus the attention matmuls                  | Embedding, each Linear, LMHead             |

`v3` is the seed's V3.0 exactly (both attention operands are sent with every Matmul);
`v2` is the seed's V2.1 placement.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Plan:
    name: str
    attention_on_gpu: bool  # QKᵀ and PV as Matmul RPCs (v3) or in the trusted side (v2)
    rpcs_per_layer: int  # round trips per layer per forward pass
    summary: str

    def rpcs_per_forward(self, num_layers: int) -> int:
        """Round trips for one forward pass (one decode token): Embedding + layers + LMHead."""
        return self.rpcs_per_layer * num_layers + 2


PLANS: dict[str, Plan] = {
    "v3": Plan("v3", True, 9, "seed V3.0: q,k,v,o,gate,up,down Linear calls plus QKᵀ and PV Matmul calls"),
    "v2": Plan("v2", False, 7, "seed V2.1: q,k,v,o,gate,up,down Linear calls; attention in the trusted side"),
}


def get_plan(name: str) -> Plan:
    try:
        return PLANS[name]
    except KeyError:
        raise ValueError(f"unknown plan {name!r}; available: {', '.join(PLANS)}") from None
