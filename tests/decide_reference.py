"""The per-call decision and slot plan as they were before they were vectorised
(``tiers.decide_call`` and ``tiers.plan_slots`` at commit 3947fd8, Python over groups): the
reference ``test_decide_vectorised.py`` holds the vectorised ones to. Not used by the package."""

from typing import Optional, Sequence

import numpy as np

from npumoe_mlx.cost import CostModel
from npumoe_mlx.tiers import CallDecision, Slots, ladder_rounds, tier_for


def decide_call(
    counts: np.ndarray,
    groups: Sequence[np.ndarray],
    ladders: Sequence[Sequence[int]],
    cold: np.ndarray,
    cost: CostModel,
    D: int,
    H: int,
    overflow: str = "auto",
    objective: str = "time",
    max_calls: int = 0,
    energy_bound: str = "time",
    slack: float = 1.2,
) -> CallDecision:
    """Programs or MLX for this call (counts (E,)), and each group's rounds.

    The two sides run at the same time, so the call costs sync + max(programs, MLX
    side); it is offloaded when that beats MLX alone. Extra rounds past the top
    tier run only where they beat sending the remainder to MLX (``auto``).
    ``objective="energy"`` takes the least joules among the plan as it is, the
    time-balanced call and MLX alone, within ``slack`` x the least of their times
    (``energy_bound="time"``) or of MLX alone's time (``"gpu"``).
    Both sides run at once, so when this call's programs would finish last, the
    groups that use them worst (seconds per pair) move to MLX while that shortens
    the call (time objective, ``auto``: ``rerun``/``spill`` keep every group on programs);
    when MLX finishes last, padded rounds are cut where the call still ends within MLX's
    fixed cost of its makespan, for no extra joules (``_trim_padding``).
    ``max_calls`` > 0 lets a group cover its load with two smaller tiers instead
    of the next tier up (e.g. 256 + 64 for 300 rather than 512) where the padding
    saved pays for the extra call, the largest savings first, while the layer call
    stays within ``max_calls`` program calls.
    """
    counts = np.asarray(counts)
    caps = [ladder_rounds(counts[ids], tiers) for ids, tiers in zip(groups, ladders)]
    rounds = []
    for ids, cs in zip(groups, caps):
        if len(cs) <= 1 or overflow == "rerun":
            rounds.append(max(len(cs), 1))
        elif overflow in ("spill", "drop"):
            rounds.append(1)
        else:
            extra = sum(cost.program_s(len(ids), c, D, H) for c in cs[1:])
            remainder = int(np.maximum(counts[ids] - cs[0], 0).sum())
            rounds.append(len(cs) if extra < cost.mlx_s(remainder, D, H) else 1)
    if max_calls > 0:
        _split_rounds(counts, groups, ladders, caps, rounds, cost, D, H, max_calls - sum(
            r for cs, r in zip(caps, rounds) if cs))
    energy = objective == "energy" and cost.has_energy
    if not energy:
        if overflow == "auto":
            _rebalance(counts, groups, ladders, caps, rounds, cost, D, H)
            _trim_padding(counts, groups, ladders, caps, rounds, cost, D, H)
        d = _tally(counts, groups, cold, caps, rounds, cost, D, H)
        d.offload = d.program_calls > 0 and d.offload_s < d.mlx_only_s
        return d
    # energy: MLX alone, or the plan with just enough of the time-balancing moves to end
    # within ``slack`` x the least time (``energy_bound="time"``) or x MLX alone's ("gpu")
    static = _tally(counts, groups, cold, [list(c) for c in caps], list(rounds), cost, D, H)
    fast_caps, fast_rounds = [list(c) for c in caps], list(rounds)
    if overflow == "auto":
        _rebalance(counts, groups, ladders, fast_caps, fast_rounds, cost, D, H)
    timed = _tally(counts, groups, cold, fast_caps, fast_rounds, cost, D, H)
    alone = CallDecision(False, [0] * len(groups), caps, 0.0, timed.mlx_only_s, timed.mlx_only_s,
                         timed.mlx_only_j, timed.mlx_only_j)
    runs = [c for c in (static, timed) if c.program_calls > 0]
    ref = min([c.offload_s for c in runs] + [alone.offload_s]) if energy_bound == "time" else alone.offload_s
    opts = runs + [alone]
    if overflow == "auto" and static.program_calls and static.offload_s > slack * ref:
        _rebalance(counts, groups, ladders, caps, rounds, cost, D, H, target=slack * ref)
        opts.append(_tally(counts, groups, cold, caps, rounds, cost, D, H))
    ok = [c for c in opts if c.offload_s <= slack * ref + 1e-12] or [min(opts, key=lambda c: c.offload_s)]
    d = min(ok, key=lambda c: (c.offload_j, c.offload_s))
    d.offload = d is not alone and d.program_calls > 0
    return d


def _tally(counts, groups, cold, caps, rounds, cost: CostModel, D: int, H: int) -> CallDecision:
    """Predicted time and energy of a call run with these rounds (offload left False)."""
    run = [(len(ids), c) for ids, cs, r in zip(groups, caps, rounds) for c in cs[:r]]
    left = int(counts[cold].sum()) if np.any(cold) else 0
    for ids, cs, r in zip(groups, caps, rounds):
        left += int(np.maximum(counts[ids] - sum(cs[:r]), 0).sum())
    pairs = int(counts.sum())
    return CallDecision(False, rounds, caps, cost.sync_s + sum(cost.program_s(G, c, D, H) for G, c in run),
                        cost.mlx_s(left, D, H), cost.mlx_s(pairs, D, H),
                        sum(cost.program_j(G, c, D, H) for G, c in run) + cost.mlx_j(left, D, H), cost.mlx_j(pairs, D, H),
                        len(run))


def _rebalance(counts, groups, ladders, caps, rounds, cost: CostModel, D: int, H: int, trims: int = 4,
               target: float = 0.0) -> None:
    """In place, while the programs side would finish last: rounds = 0 for groups that end
    the call sooner on MLX (worst seconds per pair first), then a busy group's last round
    cut to a smaller tier of its ladder, the rest of its pairs to MLX (``trims`` times).
    With ``target`` > 0, stop as soon as the call ends within it (the energy objective
    keeps as much work on the frugal unit as its time bound allows)."""
    t = [sum(cost.program_s(len(ids), c, D, H) for c in cs[:r]) for ids, cs, r in zip(groups, caps, rounds)]
    served = [int(np.minimum(counts[ids], sum(cs[:r])).sum()) for ids, cs, r in zip(groups, caps, rounds)]
    prog = cost.sync_s + sum(t)
    left = int(counts.sum()) - sum(served)
    span = max(prog, cost.mlx_s(left, D, H))
    for gi in sorted((g for g in range(len(groups)) if served[g]), key=lambda g: (-t[g] / served[g], g)):
        if span <= target:
            return
        new = max(prog - t[gi], cost.mlx_s(left + served[gi], D, H))
        if new >= span:
            break
        prog, left, span = prog - t[gi], left + served[gi], new
        rounds[gi], t[gi], served[gi] = 0, 0.0, 0
    for _ in range(trims):
        if prog <= cost.mlx_s(left, D, H) or span <= target:
            return
        best = None  # (span, group, caps, time, served)
        for gi in sorted((g for g in range(len(groups)) if rounds[g] and caps[g]), key=lambda g: -t[g])[:4]:
            ids, cs = groups[gi], caps[gi][: rounds[gi]]
            for c in ladders[gi]:
                if c >= cs[-1]:
                    break
                new_caps = cs[:-1] + [c]
                nt = sum(cost.program_s(len(ids), x, D, H) for x in new_caps)
                ns = int(np.minimum(counts[ids], sum(new_caps)).sum())
                new = max(prog - t[gi] + nt, cost.mlx_s(left + served[gi] - ns, D, H))
                if new < span - 1e-12 and (best is None or new < best[0]):
                    best = (new, gi, new_caps, nt, ns)
        if best is None:
            return
        span, gi, new_caps, nt, ns = best
        prog, left = prog - t[gi] + nt, left + served[gi] - ns
        caps[gi], rounds[gi], t[gi], served[gi] = new_caps, len(new_caps), nt, ns


def _trim_padding(counts, groups, ladders, caps, rounds, cost: CostModel, D: int, H: int,
                  slack: Optional[float] = None) -> None:
    """In place, when MLX finishes last: cut padded rounds while the call ends within
    ``slack`` seconds of its makespan (default MLX's fixed cost per call, the model's
    smallest term) and, with a cost model that has energy, each cut spends no more joules.

    The programs' padded rows then cost no time, yet they are wasted work: a group's last
    round goes to MLX, or down to a smaller tier of its ladder (the rest of its pairs to
    MLX), the most padded rows saved per second added first. Small calls of flat routing
    pad most (a 128-token OLMoE call gives an expert ~16 pairs; Core ML tiers are
    multiples of 32 rows).
    """
    t = [sum(cost.program_s(len(ids), c, D, H) for c in cs[:r]) for ids, cs, r in zip(groups, caps, rounds)]
    served = [int(np.minimum(counts[ids], sum(cs[:r])).sum()) for ids, cs, r in zip(groups, caps, rounds)]
    rows = [len(ids) * sum(cs[:r]) for ids, cs, r in zip(groups, caps, rounds)]
    prog = cost.sync_s + sum(t)
    left = int(counts.sum()) - sum(served)
    span = cost.mlx_s(left, D, H)
    if prog > span:  # programs finish last: _rebalance's case
        return
    limit = span + (cost.mlx_fixed_s if slack is None else slack)
    while True:
        best = None  # (score, span, group, caps, rounds, time, served, rows)
        for gi, (ids, cs, r) in enumerate(zip(groups, caps, rounds)):
            run = cs[:r]
            if not run:
                continue
            opts = [(list(cs), r - 1)] + [(run[:-1] + [c], r) for c in ladders[gi] if c < run[-1]]
            for new_caps, nr in opts:
                nrun = new_caps[:nr]
                nrows = len(ids) * sum(nrun)
                ns = int(np.minimum(counts[ids], sum(nrun)).sum())
                saved = (rows[gi] - served[gi]) - (nrows - ns)
                if saved <= 0:
                    continue
                nt = sum(cost.program_s(len(ids), c, D, H) for c in nrun)
                new = max(prog - t[gi] + nt, cost.mlx_s(left + served[gi] - ns, D, H))
                if new > limit + 1e-15:
                    continue
                if cost.has_energy:  # joules of the group's rounds + the MLX side, after vs before
                    after = sum(cost.program_j(len(ids), c, D, H) for c in nrun) + cost.mlx_j(left + served[gi] - ns, D, H)
                    if after > sum(cost.program_j(len(ids), c, D, H) for c in run) + cost.mlx_j(left, D, H):
                        continue
                score = saved / max(new - span, 1e-12)
                if best is None or score > best[0]:
                    best = (score, new, gi, new_caps, nr, nt, ns, nrows)
        if best is None:
            return
        _, span, gi, new_caps, nr, nt, ns, nrows = best
        prog, left = prog - t[gi] + nt, left + served[gi] - ns
        caps[gi], rounds[gi], t[gi], served[gi], rows[gi] = new_caps, nr, nt, ns, nrows


def _split_rounds(counts, groups, ladders, caps, rounds, cost: CostModel, D: int, H: int, budget: int) -> None:
    """In place: groups served by one round get two smaller ones where that saves most rows."""
    if budget <= 0:
        return
    row_s = cost.row_s(D, H)
    best = []  # (rows saved, group, new caps)
    for gi, (ids, tiers, cs, r) in enumerate(zip(groups, ladders, caps, rounds)):
        if len(cs) != 1 or r != 1:
            continue
        peak, C, G = int(counts[ids].max()), cs[0], len(ids)
        top = (0, None)
        for c1 in tiers:
            if c1 >= min(C, peak):
                break
            c2 = tier_for(peak - c1, tiers)
            if peak - c1 <= c2 and C - c1 - c2 >= max(top[0], 1):  # ties: the larger first round
                top = (C - c1 - c2, [c1, c2])
        if top[1] is not None and G * top[0] * row_s > cost.dispatch_s + G * cost.expert_s:
            best.append((G * top[0], gi, top[1]))
    for _, gi, new in sorted(best, key=lambda t: (-t[0], t[1]))[:budget]:
        caps[gi], rounds[gi] = new, 2


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
