"""The reference static-tier executor, in MLX only.

It computes ``experts(x, inds)`` the way the compiled programs do: sort the
(token, expert) pairs by expert, count them, pad each *group* of experts to a
static token capacity taken from a tier ladder (``tiers.py``), run one batched
matmul chain per group, and gather the rows back into pair order. Loads above the
top tier run the ladder again on the remainder, so nothing is ever dropped. It is the semantic
model every backend must reproduce, and the MLX fallback.
"""

from dataclasses import dataclass
from typing import Tuple

import mlx.core as mx
import numpy as np

from .experts import SwitchGLU
from ..planning.tiers import Slots, contiguous_groups, plan_slots, tier_for  # noqa: F401 (re-exported)

DEFAULT_TIERS = (32, 64, 128, 256, 512)


def route(inds: mx.array, num_experts: int):
    """Sort pairs by expert and count them: the one host sync of a layer call."""
    flat = inds.reshape(-1)
    order = mx.argsort(flat)
    counts = mx.zeros((num_experts,), mx.int32).at[flat].add(1)
    mx.eval(order, counts)
    return np.array(order), np.array(counts)


def group_ffn(experts: SwitchGLU, xg: mx.array, ids: mx.array) -> mx.array:
    """xg: (G, C, D), ids: (G,) -> (G, C, D): each row through its own expert."""
    up = experts.up_proj(xg, ids)
    gate = experts.gate_proj(xg, ids)
    return experts.down_proj(experts.activation(up, gate), ids)


@dataclass
class StaticTierReference:
    """Executor: ``executor(experts, x (..., D), inds (..., k)) -> (..., k, D)``."""

    tiers: Tuple[int, ...] = DEFAULT_TIERS
    group_size: int = 4
    calls: int = 0
    padded: int = 0
    slots: int = 0

    def __call__(self, experts: SwitchGLU, x: mx.array, inds: mx.array) -> mx.array:
        k = inds.shape[-1]
        D = x.shape[-1]
        num_experts = experts.gate_proj.weight.shape[0]
        x_flat = x.reshape(-1, D)  # (N, D)
        order, counts = route(inds, num_experts)
        groups = contiguous_groups(num_experts, self.group_size)
        s = plan_slots(order, counts, k, groups, self.tiers)
        outs = []
        for _, ids, cap, src in s.calls:
            xg = x_flat[mx.array(src, dtype=mx.int32)].reshape(len(ids), cap, D)
            outs.append(group_ffn(experts, xg, mx.array(ids, dtype=mx.uint32)).reshape(-1, D))
        y = mx.concatenate(outs, axis=0)[mx.array(s.loc, dtype=mx.int32)]  # (P, D) in pair order
        self.calls += len(s.calls)
        self.padded += s.padded
        self.slots += s.slots
        return y.reshape(*inds.shape, D).astype(x.dtype)
