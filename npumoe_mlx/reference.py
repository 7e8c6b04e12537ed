"""The reference static-tier executor, in MLX only.

It computes ``experts(x, inds)`` the way the compiled programs do: sort the
(token, expert) pairs by expert, count them, pad each *group* of experts to a
static token capacity taken from a tier ladder, run one batched matmul chain per
group, and gather the rows back into pair order. Loads above the top tier run the
ladder again on the remainder, so nothing is ever dropped. It is the semantic
model every backend must reproduce, and the MLX fallback.
"""

from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np

from .experts import SwitchGLU

DEFAULT_TIERS = (32, 64, 128, 256, 512)


def tier_for(load: int, tiers: Sequence[int]) -> int:
    """Smallest tier >= load, or the top tier when the load overflows it."""
    for t in tiers:
        if t >= load:
            return t
    return tiers[-1]


def contiguous_groups(num_experts: int, group_size: int) -> List[Tuple[int, ...]]:
    return [
        tuple(range(s, min(s + group_size, num_experts)))
        for s in range(0, num_experts, group_size)
    ]


@dataclass
class Slots:
    """Where each routed pair sits in the padded program inputs of one call.

    ``calls`` lists (group_index, expert_ids, capacity, src_tokens (G*C,)) per
    program call; ``loc`` maps every pair (in ``inds.reshape(-1)`` order) to its
    row in the concatenation of all calls' outputs, or -1 if no call took it.
    """

    calls: list = field(default_factory=list)
    loc: np.ndarray = None
    padded: int = 0
    slots: int = 0


def plan_slots(
    order: np.ndarray,
    counts: np.ndarray,
    k: int,
    groups: Sequence[Sequence[int]],
    tiers: Sequence,
    max_rounds: Optional[Sequence[int]] = None,
) -> Slots:
    """Vectorised slot assignment from the sorted order and the per-expert counts.

    order: (P,) pair indices sorted by expert; counts: (E,) pairs per expert.
    tiers: one ladder for all groups, or one ladder per group. ``max_rounds[i]``
    caps how often group i's ladder runs; pairs left over (and pairs of experts
    in no group) keep ``loc == -1`` for the caller to run elsewhere.
    A Python loop runs over groups and overflow rounds only, never over tokens.
    """
    starts = np.cumsum(counts) - counts  # (E,) first sorted position of each expert
    out = Slots(loc=np.full(order.shape[0], -1, dtype=np.int64))
    offset = 0
    per_group = len(tiers) > 0 and not np.isscalar(tiers[0])
    for gi, ids in enumerate(groups):
        ladder = tiers[gi] if per_group else tiers
        rounds = max_rounds[gi] if max_rounds is not None else None
        ids = np.asarray(ids)
        n = counts[ids]  # (G,)
        done = np.zeros_like(n)
        while (n - done).max(initial=0) > 0 and (rounds is None or rounds > 0):
            if rounds is not None:
                rounds -= 1
            left = n - done
            cap = tier_for(int(left.max()), ladder)
            col = np.arange(cap)
            take = np.minimum(left, cap)  # (G,)
            valid = col[None, :] < take[:, None]  # (G, C)
            pos = starts[ids][:, None] + done[:, None] + col[None, :]  # (G, C)
            pos = np.where(valid, pos, 0)
            src = np.where(valid, order[pos] // k, 0)  # (G, C) token rows
            slot = offset + np.arange(ids.size * cap).reshape(ids.size, cap)
            out.loc[order[pos[valid]]] = slot[valid]
            out.calls.append((gi, ids, cap, src.reshape(-1)))
            out.padded += int((~valid).sum())
            out.slots += valid.size
            offset += ids.size * cap
            done = done + take
    return out


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
