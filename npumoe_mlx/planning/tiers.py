"""Tier ladders and slot planning: the one home of static-tier arithmetic.

A resident group of G experts runs as program calls of a fixed token capacity C
(a *tier*), each expert's rows padded to C. One rule, used by the planner, both
executors and replay alike: a round runs at the smallest tier >= the largest load
left in the group, or at the top tier when that load is larger; what is left goes
round again, as many rounds as the call's decision allows, then to MLX. Nothing
here drops a pair.

- ``snap``: the smallest allowed capacity >= a load (the one capacity-rounding rule);
- ``tier_for``, ``ladder_rounds``, ``ladder_cover``: the rule (one call, many calls);
- ``choose_ladder``, ``tail_ladder``: a group's tiers from calibrated loads, or without any (planner);
- ``decide_call``: per layer call, programs or MLX, and each group's rounds, from the call's
  counts and its layer's ``CallContext`` (executor, replay and planner alike through
  ``plan.LayerPlan.decide``), Python over groups (a few hundred us at ~60 groups);
- ``plan_slots``: where each routed pair sits in the padded program inputs (numpy over
  every slot of a call at once).
"""

from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

from .cost import CostModel

OVERFLOW_MODES = ("auto", "rerun", "spill", "drop")


def snap(caps, x):
    """The smallest of ``caps`` (ascending) >= x, or the largest when x passes them all; x a
    scalar or an array (same shape out). Every capacity rounding goes through here, so a
    load and the tier that holds it agree everywhere (``tier_for`` is its scalar loop)."""
    caps = np.asarray(caps)
    return caps[np.minimum(np.searchsorted(caps, x), caps.size - 1)]


def tier_for(load: int, tiers: Sequence[int]) -> int:
    """Smallest tier >= load, or the top tier when the load overflows it (the rest goes round again)."""
    for t in tiers:
        if t >= load:
            return int(t)
    return int(tiers[-1])


def ladder_rounds(loads: np.ndarray, tiers: Sequence[int], max_rounds: Optional[int] = None) -> List[int]:
    """Capacities of the rounds that serve per-expert loads ``loads`` (G,), at most ``max_rounds``."""
    caps, left = [], np.ceil(np.asarray(loads, float))
    while left.max(initial=0) > 0 and (max_rounds is None or len(caps) < max_rounds):
        c = tier_for(left.max(), tiers)
        caps.append(c)
        left = np.maximum(left - c, 0)
    return caps


def ladder_cover(peak: np.ndarray, tiers: Sequence[int]) -> Tuple[np.ndarray, np.ndarray]:
    """``ladder_rounds`` for many calls at once: peak (S,) group max-loads -> (rounds (S,), rows per expert (S,))."""
    t = np.asarray(sorted(tiers), float)
    peak = np.ceil(np.asarray(peak, float))
    rounds = np.where(peak > 0, np.maximum(np.ceil(peak / t[-1]), 1), 0)
    last = peak - np.maximum(rounds - 1, 0) * t[-1]
    rows = np.maximum(rounds - 1, 0) * t[-1] + np.where(peak > 0, snap(t, last), 0)
    return rounds, rows


def choose_ladder(
    samples: np.ndarray,
    capacities: Sequence[int],
    max_tiers: int,
    weights: Optional[np.ndarray] = None,
    top: Optional[int] = None,
) -> List[int]:
    """Up to ``max_tiers`` capacities minimising sum_i w_i * (tier(s_i) - s_i) over samples.

    samples: group max-loads (one per calibrated call); weights default to 1. The
    top tier covers the largest sample, or is ``top`` (headroom for loads that
    calibration never saw) when given and larger. 1-D DP over candidate tiers.
    """
    samples = np.asarray(samples, float)
    w = np.ones_like(samples) if weights is None else np.asarray(weights, float)
    keep = samples > 0
    samples, w = samples[keep], w[keep]
    caps = np.asarray(capacities)
    if samples.size == 0:
        return [int(caps[0])] if top is None else [int(snap(caps, top))]
    o = np.argsort(samples, kind="stable")
    samples, w = samples[o], w[o]
    hi = int(snap(caps, samples[-1]))
    forced = None
    if top is not None:
        forced = int(snap(caps, top))
        if forced > hi:
            max_tiers -= 1  # one tier is the headroom; the DP places the rest
        else:
            forced = None
    if max_tiers < 1:
        return [forced]
    # Candidate tiers: the smallest capacity >= each sample (others never help).
    cand = np.unique(snap(caps, samples))
    cand = cand[cand <= hi]
    m = cand.size
    # samples in (cand[i-1], cand[j]] are served by cand[j]: sum w*(cand[j] - s)
    lo = np.searchsorted(samples, np.concatenate([[-np.inf], cand]), side="right")
    pw = np.concatenate([[0.0], np.cumsum(w)])
    pws = np.concatenate([[0.0], np.cumsum(w * samples)])

    def seg(a, b, c):  # samples [a, b) served at capacity c
        return c * (pw[b] - pw[a]) - (pws[b] - pws[a])

    T = min(max_tiers, m)
    best = np.full((T + 1, m), np.inf)
    back = np.zeros((T + 1, m), dtype=int)
    for j in range(m):
        best[1, j] = seg(lo[0], lo[j + 1], cand[j])
    for t in range(2, T + 1):
        for j in range(1, m):
            i = np.arange(j)
            c = best[t - 1, :j] + seg(lo[i + 1], lo[j + 1], cand[j])
            i_best = int(np.argmin(c))
            if c[i_best] < best[t, j] - 1e-9:
                best[t, j], back[t, j] = c[i_best], i_best
    t = int(np.argmin(best[1:, m - 1])) + 1  # fewest tiers on ties
    tiers, j = [], m - 1
    while t >= 1:
        tiers.append(int(cand[j]))
        j = back[t, j]
        t -= 1
    if forced is not None:
        tiers.append(forced)
    return sorted(set(tiers))


def tail_ladder(capacities: Sequence[int], top: int, max_tiers: int) -> List[int]:
    """A ladder for loads calibration never saw (``plan.tail_groups``): the smallest capacity,
    then x4 steps up to ``top`` (the largest call), at most ``max_tiers``. Nothing says where
    such loads fall, so the steps are geometric: a load pads at most ~4x, in few tiers."""
    caps = np.asarray(capacities)
    ladder, c = [], int(caps[0])
    while c < top and len(ladder) < max_tiers - 1:
        ladder.append(int(snap(caps, c)))
        c *= 4
    return sorted(set(ladder + [int(snap(caps, top))]))


DECODE_TIERS = (1, 2, 4, 8, 16, 32)  # row counts the installer adds to every program below its ladder


def small_ladders(ladders: Sequence[Sequence[int]], extra: Sequence[int]) -> List[List[int]]:
    """Each ladder plus the ``extra`` row counts its program also runs that lie below its bottom
    tier (the decode tiers; on a dynamic program every multiple of 8). A call smaller than the plan
    was sized for then covers its loads at a tier near them instead of the bottom tier, and the
    cost model (which prices every padded row as program time) decides it on that cover."""
    return [sorted(set(t) | {int(c) for c in extra if c < min(t)}) for t in ladders]


def undersized(counts: np.ndarray, groups: Sequence[np.ndarray], ladders: Sequence[Sequence[int]]) -> bool:
    """True when some group's busiest expert is below its ladder's bottom tier: the plan was not
    sized for a call this small, and its cover would pad (counts (E,))."""
    return any(0 < int(counts[ids].max(initial=0)) < t[0] for ids, t in zip(groups, ladders))


def contiguous_groups(num_experts: int, group_size: int) -> List[Tuple[int, ...]]:
    return [tuple(range(s, min(s + group_size, num_experts))) for s in range(0, num_experts, group_size)]


# --- the per-call decision ---------------------------------------------------


@dataclass
class CallDecision:
    """What one layer call does, decided from its per-expert counts alone.

    ``caps[i]`` are group i's ladder rounds (all of them); ``rounds[i]`` how many
    run on its program; pairs past them, and cold experts' pairs, go to MLX.
    """

    offload: bool
    rounds: List[int]
    caps: List[List[int]]
    program_s: float = 0.0  # predicted, programs side (sync included)
    mlx_side_s: float = 0.0  # predicted, MLX side running at the same time
    mlx_only_s: float = 0.0  # predicted, the whole call on MLX
    offload_j: float = 0.0  # predicted energy, both sides (0 when the cost model has none)
    mlx_only_j: float = 0.0
    program_calls: int = 0
    overlap: float = 1.0  # the cost model's: how much of the shorter side hides under the longer

    @property
    def offload_s(self) -> float:
        a, b = self.program_s, self.mlx_side_s
        return max(a, b) + (1.0 - self.overlap) * min(a, b)


@dataclass
class CallContext:
    """What every call of one layer is decided against: its groups, their ladders, its cold
    experts, the cost model and the plan's rules. Built once per layer (``plan.call_context``),
    so the decision and its helpers take the call's counts and this, not a dozen positions."""

    groups: Sequence[np.ndarray]  # resident groups' expert ids, each (G,)
    ladders: Sequence[Sequence[int]]  # each group's tiers, ascending
    cold: np.ndarray  # (E,) bool: experts that stay on MLX
    cost: CostModel
    D: int
    H: int
    overflow: str = "auto"  # OVERFLOW_MODES: what runs pairs past a group's top tier
    objective: str = "time"  # what a call minimises: "time" or "energy"
    max_calls: int = 0  # program calls per layer call that tier splits may use (0: no splits)
    energy_bound: str = "time"  # energy: within slack x the least time ("time") or MLX alone's ("gpu")
    slack: float = 1.2
    # per group, the row counts its program also runs besides its ladder (decode tiers, a dynamic
    # program's grid), asked for only when a call needs them (the executor's dynamic programs
    # register them then); None: the ladders only
    extra: Optional[Callable[[], Sequence[Sequence[int]]]] = None

    @cached_property
    def under(self) -> List[List[int]]:
        """Ladders for a call smaller than the plan was sized for (``undersized``): each plus the
        row counts below it that its program runs (``small_ladders``), once per context."""
        return [small_ladders([t], e)[0] for t, e in zip(self.ladders, self._extra())]

    @cached_property
    def whole(self) -> List[List[int]]:
        """Every row count each program runs: a released layer's ladders (MLX holds none of its
        experts, so a call takes the cover nearest its loads), once per context."""
        return [sorted(set(t) | set(e)) for t, e in zip(self.ladders, self._extra())]

    def _extra(self) -> Sequence[Sequence[int]]:
        return self.extra() if self.extra is not None else [()] * len(self.ladders)


@dataclass
class _Sides:
    """One call's running balance while whole groups move to MLX (``_rebalance``): per group its
    program seconds ``t`` and pairs ``served``; the programs side ``prog`` s, the pairs ``left``
    for MLX and the call's makespan ``span`` s."""

    t: List[float]
    served: List[int]
    prog: float
    left: int
    span: float


def decide_call(counts: np.ndarray, ctx: CallContext) -> CallDecision:
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
    groups, cost, D, H, overflow = ctx.groups, ctx.cost, ctx.D, ctx.H, ctx.overflow
    caps = [ladder_rounds(counts[ids], tiers) for ids, tiers in zip(groups, ctx.ladders)]
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
    if ctx.max_calls > 0:
        _split_rounds(ctx, counts, caps, rounds, ctx.max_calls - sum(r for cs, r in zip(caps, rounds) if cs))
    energy = ctx.objective == "energy" and cost.has_energy
    if not energy:
        if overflow == "auto":
            _rebalance(ctx, counts, caps, rounds)
            _trim_padding(ctx, counts, caps, rounds)
        d = _tally(ctx, counts, caps, rounds)
        d.offload = d.program_calls > 0 and d.offload_s < d.mlx_only_s
        return d
    # energy: MLX alone, or the plan with just enough of the time-balancing moves to end
    # within ``slack`` x the least time (``energy_bound="time"``) or x MLX alone's ("gpu")
    slack = ctx.slack
    static = _tally(ctx, counts, [list(c) for c in caps], list(rounds))
    fast_caps, fast_rounds = [list(c) for c in caps], list(rounds)
    if overflow == "auto":
        _rebalance(ctx, counts, fast_caps, fast_rounds)
    timed = _tally(ctx, counts, fast_caps, fast_rounds)
    alone = CallDecision(False, [0] * len(groups), caps, 0.0, timed.mlx_only_s, timed.mlx_only_s,
                         timed.mlx_only_j, timed.mlx_only_j)
    runs = [c for c in (static, timed) if c.program_calls > 0]
    ref = min([c.offload_s for c in runs] + [alone.offload_s]) if ctx.energy_bound == "time" else alone.offload_s
    opts = runs + [alone]
    if overflow == "auto" and static.program_calls and static.offload_s > slack * ref:
        _rebalance(ctx, counts, caps, rounds, target=slack * ref)
        opts.append(_tally(ctx, counts, caps, rounds))
    if overflow == "auto":
        packed = _pack_energy(ctx, counts, slack * ref)
        if packed is not None:
            opts.append(packed)
    ok = [c for c in opts if c.offload_s <= slack * ref + 1e-12] or [min(opts, key=lambda c: c.offload_s)]
    d = min(ok, key=lambda c: (c.offload_j, c.offload_s))
    d.offload = d is not alone and d.program_calls > 0
    return d


PACK_BINS = 512  # time resolution of ``_pack_energy``'s knapsack (a bin is 1/512 of the programs' budget)


def _pack_energy(ctx: CallContext, counts: np.ndarray, target: float, bins: int = PACK_BINS) -> Optional[CallDecision]:
    """The energy objective's rounds: per group one round at any tier of its ladder (its pairs past
    it to MLX), its full rounds, or nothing, chosen together for the least joules with both sides
    ending within ``target`` seconds. None if no choice with a program call does, or if no group
    has a tier below its load (decode-sized calls: whole groups only, as ``_rebalance`` moves them).

    The frugal unit's time is the scarce resource: moving whole groups to MLX until the call fits
    (``_rebalance``) leaves up to a group's worth of it idle, and a round at the next tier up pads.
    A multiple-choice knapsack over the programs' time (``bins`` steps, each option's time rounded
    up) finds the rounds that save the most joules: rounds below a group's load carry no padding,
    and the rest of the budget takes part of another group.
    """
    groups, ladders, cost, D, H = ctx.groups, ctx.ladders, ctx.cost, ctx.D, ctx.H
    budget = target - cost.sync_s
    covers = [ladder_rounds(counts[ids], tiers) for ids, tiers in zip(groups, ladders)]
    if budget <= 0 or not any(cs and tiers[0] < cs[0] for cs, tiers in zip(covers, ladders)):
        return None
    per_pair = cost.mlx_rate(D, H)[1]  # joules a pair costs on MLX, saved when a program serves it
    step = budget / bins
    at = np.arange(bins + 1)
    dp = np.zeros(bins + 1)  # most joules saved within k bins of program time
    picks, options, spent = [], [], []  # per group: option chosen at each budget (bins + 1,), options, their bins
    for ids, tiers, full in zip(groups, ladders, covers):
        load, G = counts[ids], len(ids)
        one = np.asarray([c for c in tiers if full and c < full[0]], float)  # one round below the full cover
        t = np.concatenate([[0.0], [sum(cost.program_s(G, c, D, H) for c in full)] if full else [],
                            cost.programs_s(G, 1, one, D, H)])
        served = np.concatenate([[0.0], [np.minimum(load, sum(full)).sum()] if full else [],
                                 np.minimum(load[:, None], one[None, :]).sum(0)])
        joules = np.concatenate([[0.0], [sum(cost.program_j(G, c, D, H) for c in full)] if full else [],
                                 cost.programs_j(G, 1, one, D, H)])
        ks = np.ceil(t / step - 1e-9).astype(np.int64)  # (O,)
        idx = at[None, :] - ks[:, None]  # (O, bins + 1)
        cand = np.where(idx >= 0, dp[np.maximum(idx, 0)] + (served * per_pair - joules)[:, None], -np.inf)
        pick = cand.argmax(0)
        dp = cand[pick, at]
        picks.append(pick)
        options.append([([], 0)] + ([(full, len(full))] if full else []) + [([int(c)], 1) for c in one])
        spent.append(ks)
    k = int(np.argmax(dp))
    caps, rounds = [], []
    for gi in range(len(groups) - 1, -1, -1):  # walk the choices back
        o = int(picks[gi][k])
        cs, r = options[gi][o]
        caps.append(cs if cs else covers[gi])
        rounds.append(r)
        k -= int(spent[gi][o])
    caps, rounds = caps[::-1], rounds[::-1]
    if not any(rounds):
        return None
    d = _tally(ctx, counts, caps, rounds)
    return d if d.offload_s <= target + 1e-12 else None


def _tally(ctx: CallContext, counts: np.ndarray, caps, rounds) -> CallDecision:
    """Predicted time and energy of a call run with these rounds (offload left False)."""
    groups, cold, cost, D, H = ctx.groups, ctx.cold, ctx.cost, ctx.D, ctx.H
    run = [(len(ids), c) for ids, cs, r in zip(groups, caps, rounds) for c in cs[:r]]
    left = int(counts[cold].sum()) if np.any(cold) else 0
    for ids, cs, r in zip(groups, caps, rounds):
        left += int(np.maximum(counts[ids] - sum(cs[:r]), 0).sum())
    pairs = int(counts.sum())
    prog = cost.sync_s + cost.finish_s(pairs, D) + sum(cost.program_s(G, c, D, H) for G, c in run)
    return CallDecision(False, rounds, caps, prog,
                        cost.mlx_s(left, D, H), cost.mlx_s(pairs, D, H),
                        sum(cost.program_j(G, c, D, H) for G, c in run) + cost.mlx_j(left, D, H), cost.mlx_j(pairs, D, H),
                        len(run), cost.overlap)


def _rebalance(ctx: CallContext, counts: np.ndarray, caps, rounds, trims: int = 4, target: float = 0.0) -> None:
    """In place, while the programs side would finish last: rounds = 0 for groups that end
    the call sooner on MLX (worst seconds per pair first), then a busy group's last round
    cut to a smaller tier of its ladder, the rest of its pairs to MLX (``trims`` times).
    With ``target`` > 0, stop as soon as the call ends within it (the energy objective
    keeps as much work on the frugal unit as its time bound allows)."""
    groups, ladders, cost, D, H = ctx.groups, ctx.ladders, ctx.cost, ctx.D, ctx.H
    t = [sum(cost.program_s(len(ids), c, D, H) for c in cs[:r]) for ids, cs, r in zip(groups, caps, rounds)]
    served = [int(np.minimum(counts[ids], sum(cs[:r])).sum()) for ids, cs, r in zip(groups, caps, rounds)]
    prog = cost.sync_s + sum(t)
    left = int(counts.sum()) - sum(served)
    span = float(cost.makespan(prog, cost.mlx_s(left, D, H)))
    moved = {}  # group -> (rounds, time, served) before it moved to MLX
    for gi in sorted((g for g in range(len(groups)) if served[g]), key=lambda g: (-t[g] / served[g], g)):
        if span <= target:
            break
        new = float(cost.makespan(prog - t[gi], cost.mlx_s(left + served[gi], D, H)))
        if new >= span:
            break
        moved[gi] = (rounds[gi], t[gi], served[gi])
        prog, left, span = prog - t[gi], left + served[gi], new
        rounds[gi], t[gi], served[gi] = 0, 0.0, 0
    if moved:
        _take_back(ctx, counts, caps, rounds, _Sides(t, served, prog, left, span), moved, target)
        prog, left = cost.sync_s + sum(t), int(counts.sum()) - sum(served)
        span = float(cost.makespan(prog, cost.mlx_s(left, D, H)))
    if span <= target:
        return
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
                new = float(cost.makespan(prog - t[gi] + nt, cost.mlx_s(left + served[gi] - ns, D, H)))
                if new < span - 1e-12 and (best is None or new < best[0]):
                    best = (new, gi, new_caps, nt, ns)
        if best is None:
            return
        span, gi, new_caps, nt, ns = best
        prog, left = prog - t[gi] + nt, left + served[gi] - ns
        caps[gi], rounds[gi], t[gi], served[gi] = new_caps, len(new_caps), nt, ns


def _take_back(ctx: CallContext, counts: np.ndarray, caps, rounds, sides: _Sides, moved: dict,
               target: float = 0.0) -> None:
    """In place, after whole groups moved to MLX: the programs side may end the call sooner with
    part of a group back. Either the last group moved runs one round at a smaller tier of its
    ladder, or it runs as before and a running group's last round is cut to a smaller tier
    instead, whichever ends the call soonest (if sooner than now); with ``target`` > 0 (the
    energy objective), whichever puts the most pairs back on programs within it. The ANE's best
    share of a layer is rarely whole groups (Mixtral has 8 experts); the plan gives its marginal
    group tiers for these rounds (plan.py ``_partial_last``). ``sides``: the balance after the
    moves; its ``t`` and ``served`` are updated with ``caps`` and ``rounds``."""
    groups, ladders, cost, D, H = ctx.groups, ctx.ladders, ctx.cost, ctx.D, ctx.H
    t, served, prog, left, span = sides.t, sides.served, sides.prog, sides.left, sides.span
    gm = list(moved)[-1]
    r_m, t_m, s_m = moved[gm]
    best = None  # (score, [(group, caps, rounds, time, served), ...])

    def better(new, back, best):
        """Sooner than now (time), or within the target with more pairs back (energy)."""
        if target > 0:
            return new <= target + 1e-12 and (best is None or (-back, new) < best[0])
        return new < span - 1e-12 and (best is None or (new,) < best[0])
    for c in ladders[gm]:
        if c >= caps[gm][0]:
            break
        nt, ns = cost.program_s(len(groups[gm]), c, D, H), int(np.minimum(counts[groups[gm]], c).sum())
        if ns < len(groups[gm]) * c:  # only full rounds: a padded one would rather stay on MLX
            break
        new = float(cost.makespan(prog + nt, cost.mlx_s(left - ns, D, H)))
        if better(new, ns, best):
            best = ((-ns, new) if target > 0 else (new,), [(gm, [c], 1, nt, ns)])
    running = [g for g in range(len(groups)) if rounds[g] and caps[g] and g != gm]
    # the busiest running groups, and the plan's last (coldest) group, whose ladder has the cut tiers
    for gk in sorted(set(sorted(running, key=lambda g: -t[g])[:4]) | ({len(groups) - 1} & set(running))):
        ids, cs = groups[gk], caps[gk][: rounds[gk]]
        for c in ladders[gk]:
            if c >= cs[-1]:
                break
            new_caps = cs[:-1] + [c]
            nt = sum(cost.program_s(len(ids), x, D, H) for x in new_caps)
            ns = int(np.minimum(counts[ids], sum(new_caps)).sum())
            if ns - int(np.minimum(counts[ids], sum(cs[:-1])).sum()) < len(ids) * c:
                break
            new = float(cost.makespan(prog + t_m - t[gk] + nt, cost.mlx_s(left - s_m + served[gk] - ns, D, H)))
            back = s_m - served[gk] + ns
            if better(new, back, best):
                best = ((-back, new) if target > 0 else (new,),
                        [(gm, caps[gm], r_m, t_m, s_m), (gk, new_caps, len(new_caps), nt, ns)])
    for gi, cs, r, nt, ns in (best[1] if best else []):
        caps[gi], rounds[gi], t[gi], served[gi] = cs, r, nt, ns


def _trim_padding(ctx: CallContext, counts: np.ndarray, caps, rounds, slack: Optional[float] = None) -> None:
    """In place, when MLX finishes last: cut padded rounds while the call ends within
    ``slack`` seconds of its makespan (default MLX's fixed cost per call, the model's
    smallest term) and, with a cost model that has energy, each cut spends no more joules.

    The programs' padded rows then cost no time, yet they are wasted work: a group's last
    round goes to MLX, or down to a smaller tier of its ladder (the rest of its pairs to
    MLX), the most padded rows saved per second added first. Small calls of flat routing
    pad most (a 128-token OLMoE call gives an expert ~16 pairs; Core ML tiers are
    multiples of 32 rows).
    """
    groups, ladders, cost, D, H = ctx.groups, ctx.ladders, ctx.cost, ctx.D, ctx.H
    t = [sum(cost.program_s(len(ids), c, D, H) for c in cs[:r]) for ids, cs, r in zip(groups, caps, rounds)]
    served = [int(np.minimum(counts[ids], sum(cs[:r])).sum()) for ids, cs, r in zip(groups, caps, rounds)]
    rows = [len(ids) * sum(cs[:r]) for ids, cs, r in zip(groups, caps, rounds)]
    prog = cost.sync_s + sum(t)
    left = int(counts.sum()) - sum(served)
    if prog > cost.mlx_s(left, D, H):  # programs finish last: _rebalance's case
        return
    span = float(cost.makespan(prog, cost.mlx_s(left, D, H)))
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
                new = float(cost.makespan(prog - t[gi] + nt, cost.mlx_s(left + served[gi] - ns, D, H)))
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


def _split_rounds(ctx: CallContext, counts: np.ndarray, caps, rounds, budget: int) -> None:
    """In place: groups served by one round get two smaller ones where that saves most rows."""
    if budget <= 0:
        return
    groups, ladders, cost, D, H = ctx.groups, ctx.ladders, ctx.cost, ctx.D, ctx.H
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


# --- slots -------------------------------------------------------------------


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
    caps: Optional[Sequence[Sequence[int]]] = None,
) -> Slots:
    """Vectorised slot assignment from the sorted order and the per-expert counts.

    order: (P,) pair indices sorted by expert; counts: (E,) pairs per expert.
    tiers: one ladder for all groups, or one ladder per group. ``max_rounds[i]``
    caps how often group i's ladder runs; pairs left over (and pairs of experts
    in no group) keep ``loc == -1`` for the caller to run elsewhere. ``caps[i]``,
    when given, are group i's rounds as ``decide_call`` chose them.
    Every slot of every program call at once (numpy); a Python loop lists the calls only.
    """
    starts = np.cumsum(counts) - counts  # (E,) first sorted position of each expert
    out = Slots(loc=np.full(order.shape[0], -1, dtype=np.int64))
    ids = [np.asarray(g) for g in groups]
    if caps is None:
        per_group = len(tiers) > 0 and not np.isscalar(tiers[0])
        caps = [ladder_rounds(counts[g], tiers[gi] if per_group else tiers,
                              max_rounds[gi] if max_rounds is not None else None) for gi, g in enumerate(ids)]
    cg, cc, cd = [], [], []  # per program call: group, capacity, rows per expert of the group's earlier rounds
    for gi, cs in enumerate(caps):
        done = 0
        for c in cs:
            cg.append(gi), cc.append(int(c)), cd.append(done)
            done += int(c)
    if not cg:
        return out
    G = np.array([g.size for g in ids], np.int64)
    cg, cc, cd = np.array(cg), np.array(cc, np.int64), np.array(cd, np.int64)
    size = G[cg] * cc  # (J,) slots of each call
    off = np.cumsum(size) - size
    call = np.repeat(np.arange(cg.size), size)  # (S,) each slot's call
    w = np.arange(call.size) - off[call]
    e, col = np.divmod(w, cc[call])  # expert (within its group) and column of each slot
    expert = np.concatenate(ids + [np.zeros(0, np.int64)]).astype(np.int64)[(np.cumsum(G) - G)[cg][call] + e]
    valid = cd[call] + col < counts[expert]  # (S,) the expert still has a pair for this slot
    pos = np.where(valid, starts[expert] + cd[call] + col, 0)
    src = np.where(valid, order[pos] // k, 0)  # (S,) token rows
    out.loc[order[pos[valid]]] = np.arange(call.size)[valid]
    out.calls = [(gi, ids[gi], c, src[o : o + n]) for gi, c, o, n in zip(cg.tolist(), cc.tolist(), off.tolist(), size.tolist())]
    out.padded = int(call.size - valid.sum())
    out.slots = int(call.size)
    return out
