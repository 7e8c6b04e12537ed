"""The slot plan as it was before it was vectorised (``tiers.plan_slots`` at commit 3947fd8,
Python over groups and rounds): the reference ``test_slots_vectorised.py`` holds the vectorised
one to. Not used by the package."""

from typing import Optional, Sequence

import numpy as np

from npumoe_mlx.planning.tiers import Slots, ladder_rounds


def plan_slots(
    order: np.ndarray,
    counts: np.ndarray,
    k: int,
    groups: Sequence[Sequence[int]],
    tiers: Sequence,
    max_rounds: Optional[Sequence[int]] = None,
    caps: Optional[Sequence[Sequence[int]]] = None,
) -> Slots:
    """Vectorised slot assignment from the sorted order and the per-expert counts.

    order: (P,) pair indices sorted by expert; counts: (E,) pairs per expert.
    tiers: one ladder for all groups, or one ladder per group. ``max_rounds[i]``
    caps how often group i's ladder runs; pairs left over (and pairs of experts
    in no group) keep ``loc == -1`` for the caller to run elsewhere. ``caps[i]``,
    when given, are group i's rounds as ``decide_call`` chose them.
    A Python loop runs over groups and ladder rounds only, never over tokens.
    """
    starts = np.cumsum(counts) - counts  # (E,) first sorted position of each expert
    out = Slots(loc=np.full(order.shape[0], -1, dtype=np.int64))
    offset = 0
    per_group = len(tiers) > 0 and not np.isscalar(tiers[0])
    for gi, ids in enumerate(groups):
        ladder = tiers[gi] if per_group else tiers
        ids = np.asarray(ids)
        n = counts[ids]  # (G,)
        done = np.zeros_like(n)
        rounds = caps[gi] if caps is not None else ladder_rounds(n, ladder, max_rounds[gi] if max_rounds is not None else None)
        for cap in rounds:
            left = n - done
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
