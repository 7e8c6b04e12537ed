"""Tier ladders and slot planning: the one home of static-tier arithmetic.

A resident group of G experts runs as program calls of a fixed token capacity C
(a *tier*), each expert's rows padded to C. One rule, used by the planner, both
executors and replay alike: a round runs at the smallest tier >= the largest load
left in the group, or at the top tier when that load is larger; what is left goes
round again, as many rounds as the call's decision allows, then to MLX. Nothing
here drops a pair.

- ``tier_for``, ``ladder_rounds``, ``ladder_cover``: the rule (one call, many calls);
- ``choose_ladder``: a group's tiers from calibrated loads (planner);
- ``decide_call``: per layer call, programs or MLX, and each group's rounds
  (executor and replay, fed the same counts), numpy over groups; ``CallDecider``
  keeps a layer's arrays for many calls (the executor's);
- ``plan_slots``: where each routed pair sits in the padded program inputs.
"""

import itertools
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import numpy as np

from .cost import CostModel, flops_per_row

OVERFLOW_MODES = ("auto", "rerun", "spill", "drop")


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
    rows = np.maximum(rounds - 1, 0) * t[-1] + np.where(peak > 0, t[np.minimum(np.searchsorted(t, last), t.size - 1)], 0)
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
        return [int(caps[0])] if top is None else [int(caps[min(np.searchsorted(caps, top), caps.size - 1)])]
    o = np.argsort(samples, kind="stable")
    samples, w = samples[o], w[o]
    hi = int(caps[min(np.searchsorted(caps, samples[-1]), caps.size - 1)])
    forced = None
    if top is not None:
        forced = int(caps[min(np.searchsorted(caps, top), caps.size - 1)])
        if forced > hi:
            max_tiers -= 1  # one tier is the headroom; the DP places the rest
        else:
            forced = None
    if max_tiers < 1:
        return [forced]
    # Candidate tiers: the smallest capacity >= each sample (others never help).
    cand = np.unique(caps[np.minimum(np.searchsorted(caps, samples), caps.size - 1)])
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

    @property
    def offload_s(self) -> float:
        return max(self.program_s, self.mlx_side_s)


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
    A layer deciding many calls keeps a ``CallDecider`` (the executor does).
    """
    return CallDecider(groups, ladders, cold, cost, D, H).decide(counts, overflow, objective, max_calls, energy_bound,
                                                                 slack)


_NO_TIER = 1 << 31  # ladder padding: above every load, small enough that rows x D x 8 bytes fit int64
_ZERO = np.zeros(1, np.uint8)  # the load of a padded expert slot (keeps the counts' dtype)


class CallDecider:
    """``decide_call`` for one layer, numpy over its groups: the arrays that do not change
    from call to call are built once.

    ``idx`` (g, Gmax) each group's experts (-1 pads: a zero count); ``ladder`` (g, 1 + L)
    each group's tiers, ascending, after a 0 (a round cut to nothing: its pairs to MLX) and
    padded with _NO_TIER; ``ps``/``pj`` (g, 1 + L) seconds and joules of one program call at
    each, as ``CostModel.program_s``/``program_j`` compute them. A call's rounds are column
    indices into ``ladder`` (``_Rounds``), so every sum adds the same floats in the same
    order as the per-group rule did, and its decisions are the same to the bit.
    """

    def __init__(self, groups, ladders, cold: np.ndarray, cost: CostModel, D: int, H: int):
        self.cost, self.D, self.H = cost, D, H
        self.cold = np.asarray(cold, bool)
        self.any_cold = bool(self.cold.any())
        self.n = len(groups)
        self.rows = np.arange(self.n)
        self.G = np.array([len(ids) for ids in groups], np.int64)
        width = np.arange(max(int(self.G.max(initial=0)), 1))
        self.idx = np.full((self.n, width.size), -1)
        self.idx[width < self.G[:, None]] = np.concatenate(
            [np.asarray(ids, np.int64).reshape(-1) for ids in groups] + [np.zeros(0, np.int64)])
        ladder, self.nlad = _padded(ladders)
        if ((np.diff(ladder, axis=1) <= 0) & (np.arange(1, ladder.shape[1]) < self.nlad[:, None])).any():
            ladder, self.nlad = _padded([sorted(set(int(t) for t in l)) for l in ladders])
        self.ladder = np.hstack([np.zeros((self.n, 1), np.int64), ladder])
        self.tiers = ladder  # (g, L) without the 0 column
        self.top = self.ladder[self.rows, self.nlad]  # each group's top tier
        self.top1 = np.maximum(self.top, 1)
        self.last_tier = np.maximum(self.nlad - 1, 0)  # index of the top tier in ``tiers``
        G, fpr = self.G[:, None], flops_per_row(D, H)
        zero = np.zeros((self.n, 1))
        self.ps = np.hstack([zero, np.broadcast_to(cost.programs_s(G, 1, ladder, D, H), ladder.shape)])
        self.pj = np.hstack([zero, cost.program_j_per_call + G * ladder * fpr * cost.program_j_per_flop])
        self.mlx_a = fpr / cost.mlx_flops  # MLX seconds per pair, as mlx_s: fixed + (pairs * fpr) / flops
        self.row_s = cost.row_s(D, H)

    def mlx_s(self, pairs):
        c = self.cost
        return np.where(pairs > 0, c.mlx_fixed_s + pairs * flops_per_row(self.D, self.H) / c.mlx_flops, 0.0)

    def mlx_j(self, pairs):
        c = self.cost
        return np.where(pairs > 0, c.mlx_j_per_call + pairs * flops_per_row(self.D, self.H) * c.mlx_j_per_flop, 0.0)

    def decide(self, counts: np.ndarray, overflow: str = "auto", objective: str = "time", max_calls: int = 0,
               energy_bound: str = "time", slack: float = 1.2) -> CallDecision:
        """``decide_call`` for this call's per-expert counts (E,)."""
        cost = self.cost
        r = _Rounds(self, np.asarray(counts))
        if overflow == "rerun":
            r.run = np.maximum(r.ncap, 1)
        elif overflow in ("spill", "drop"):
            r.run = np.ones_like(r.ncap)
        else:  # auto: rounds past the first where they cost less than the remainder on MLX
            r.run = np.maximum(r.ncap, 1)
            many = r.ncap > 1
            if many.any():
                extra = _prefix(self.ps[self.rows[:, None], r.col[:, 1:]])[self.rows, np.maximum(r.ncap - 1, 0)]
                first = self.ladder[self.rows, r.col[:, 0]]
                remainder = np.maximum(r.load - first[:, None], 0).sum(axis=1).astype(np.int64)
                r.run = np.where(many & ~(extra < self.mlx_s(remainder)), 1, r.run)
        if max_calls > 0:
            _split_rounds(r, max_calls - int(r.run[r.ncap > 0].sum()))
        if not (objective == "energy" and cost.has_energy):
            if overflow == "auto":
                _rebalance(r)
                _trim_padding(r)
            d = _tally(r)
            d.offload = d.program_calls > 0 and d.offload_s < d.mlx_only_s
            return d
        # energy: MLX alone, or the plan with just enough of the time-balancing moves to end
        # within ``slack`` x the least time (``energy_bound="time"``) or x MLX alone's ("gpu")
        static = _tally(r)
        fast = r.copy()
        if overflow == "auto":
            _rebalance(fast)
        timed = _tally(fast)
        runs = [c for c in (static, timed) if c.program_calls > 0]
        ref = min([c.offload_s for c in runs] + [timed.mlx_only_s]) if energy_bound == "time" else timed.mlx_only_s
        last = []
        if overflow == "auto" and static.program_calls and static.offload_s > slack * ref:
            _rebalance(r, target=slack * ref)
            last.append(_tally(r))
        alone = CallDecision(False, [0] * self.n, r.caps(), 0.0, timed.mlx_only_s, timed.mlx_only_s,
                             timed.mlx_only_j, timed.mlx_only_j)
        opts = runs + [alone] + last
        ok = [c for c in opts if c.offload_s <= slack * ref + 1e-12] or [min(opts, key=lambda c: c.offload_s)]
        d = min(ok, key=lambda c: (c.offload_j, c.offload_s))
        d.offload = d is not alone and d.program_calls > 0
        return d


def _padded(ladders) -> Tuple[np.ndarray, np.ndarray]:
    """Ladders as (g, L) padded with _NO_TIER, and their lengths (g,)."""
    n = np.array([len(t) for t in ladders], np.int64)
    col = np.arange(max(int(n.max(initial=0)), 1))
    out = np.full((n.size, col.size), _NO_TIER)
    out[col < n[:, None]] = np.fromiter(itertools.chain.from_iterable(ladders), np.int64)
    return out, n


def _prefix(a: np.ndarray) -> np.ndarray:
    """(g, R) -> (g, 1 + R): 0, then running sums left to right (the order Python's ``sum`` adds in)."""
    out = np.zeros((a.shape[0], a.shape[1] + 1), a.dtype)
    a.cumsum(axis=1, out=out[:, 1:])
    return out


def _seq_sum(a: np.ndarray):
    """Left-to-right sum of a 1-D array (Python's ``sum``; numpy's is pairwise)."""
    return float(a.cumsum()[-1]) if a.size else 0


class _Rounds:
    """One call's rounds: ``col`` (g, R) column of each group's ladder per round (0 past
    ``ncap``, its number of rounds), ``run`` (g,) how many of them run on programs;
    ``load`` (g, Gmax) the group's per-expert counts."""

    def __init__(self, d: CallDecider, counts: np.ndarray):
        self.d, self.counts = d, counts
        self.pairs = int(counts.sum())
        self.load = np.concatenate((counts, _ZERO))[d.idx]  # (g, Gmax)
        # ladder_rounds for all groups at once: the top tier while the peak exceeds it, then the smallest that fits
        peak = self.load.max(axis=1)
        if peak.dtype.kind == "f":
            peak = np.ceil(peak)
        peak = peak.astype(np.int64)
        self.ncap = np.where(peak > 0, (peak - 1) // d.top1 + 1, 0)
        last = peak - (self.ncap - 1) * d.top
        fit = np.minimum((d.tiers < last[:, None]).sum(axis=1), d.last_tier) + 1
        k = np.arange(max(int(self.ncap.max()) if d.n else 0, 2))
        self.col = np.where(k < self.ncap[:, None] - 1, d.nlad[:, None], np.where(k == self.ncap[:, None] - 1, fit[:, None], 0))
        self.run = np.zeros(d.n, np.int64)
        self.sums_ = None

    def copy(self) -> "_Rounds":
        new = object.__new__(_Rounds)
        new.__dict__.update(self.__dict__)
        new.col, new.ncap, new.run, new.sums_ = self.col.copy(), self.ncap.copy(), self.run.copy(), None
        return new

    def caps(self) -> List[List[int]]:
        vals = self.d.ladder[self.d.rows[:, None], self.col].tolist()
        return [row[:n] for row, n in zip(vals, self.ncap.tolist())]

    def sums(self):
        """Of the rounds that run, per group: (their count (g,), running seconds (g, 1+R),
        running rows per expert (g, 1+R), seconds (g,), rows per expert (g,), pairs served (g,)).
        Kept until the rounds change: whoever changes them sets ``self.sums_ = None`` (and
        may write into the old arrays only then)."""
        if self.sums_ is None:
            d = self.d
            n = np.minimum(self.run, self.ncap)
            cum_t = _prefix(d.ps[d.rows[:, None], self.col])
            cum_rows = _prefix(d.ladder[d.rows[:, None], self.col])
            rows = cum_rows[d.rows, n]
            served = np.minimum(self.load, rows[:, None]).sum(axis=1).astype(np.int64)
            self.sums_ = n, cum_t, cum_rows, cum_t[d.rows, n], rows, served
        return self.sums_


def _tally(r: _Rounds) -> CallDecision:
    """Predicted time and energy of a call run with these rounds (offload left False)."""
    d = r.d
    cost, D, H = d.cost, d.D, d.H
    n, _, _, _, rows, _ = r.sums()
    on = np.arange(r.col.shape[1]) < n[:, None]  # (g, R) the rounds that run, in call order
    left = int(r.counts[d.cold].sum()) if d.any_cold else 0
    left += int(np.maximum(r.load - rows[:, None], 0).sum(axis=1).astype(np.int64).sum())
    g, col = on.nonzero()[0], r.col[on]
    return CallDecision(False, r.run.tolist(), r.caps(), cost.sync_s + _seq_sum(d.ps[g, col]),
                        cost.mlx_s(left, D, H), cost.mlx_s(r.pairs, D, H),
                        _seq_sum(d.pj[g, col]) + cost.mlx_j(left, D, H), cost.mlx_j(r.pairs, D, H), int(n.sum()))


def _rebalance(r: _Rounds, trims: int = 4, target: float = 0.0) -> None:
    """In place, while the programs side would finish last: rounds = 0 for groups that end
    the call sooner on MLX (worst seconds per pair first), then a busy group's last round
    cut to a smaller tier of its ladder, the rest of its pairs to MLX (``trims`` times).
    With ``target`` > 0, stop as soon as the call ends within it (the energy objective
    keeps as much work on the frugal unit as its time bound allows)."""
    d = r.d
    cost = d.cost
    _, _, _, t, _, served = r.sums()
    prog = cost.sync_s + _seq_sum(t)
    left = r.pairs - int(served.sum())
    if prog <= cost.mlx_s(left, d.D, d.H):  # MLX finishes last: moving work there cannot end the call sooner
        return
    span = max(prog, cost.mlx_s(left, d.D, d.H))
    busy = served.nonzero()[0]
    order = busy[np.lexsort((busy, -t[busy] / served[busy]))]  # worst seconds per pair first
    # moving the first j of them: the programs side and the MLX side, added up as a loop would
    progs = np.subtract.accumulate(np.concatenate([[prog], t[order]]))
    lefts = left + np.concatenate([[0], served[order].cumsum()])
    new = np.maximum(progs[1:], d.mlx_s(lefts[1:]))  # the span after moving j + 1
    before = np.concatenate([[span], new])  # the span after moving j
    stop = (before[:-1] <= target) | (new >= before[:-1])
    j = int(np.argmax(stop)) if stop.any() else order.size
    if j:
        r.run[order[:j]] = 0
        r.sums_ = None
    prog, left, span = float(progs[j]), int(lefts[j]), float(before[j])
    if j < order.size and span <= target:
        return
    if j:
        n_all, cum_t, cum_rows, t, _, served = r.sums()  # the moved groups: nothing runs, nothing served
    else:
        n_all, cum_t, cum_rows = r.sums()[:3]
    for _ in range(trims):
        if prog <= cost.mlx_s(left, d.D, d.H) or span <= target:
            return
        cand = ((r.run > 0) & (r.ncap > 0)).nonzero()[0]
        cand = cand[np.argsort(-t[cand], kind="stable")][:4]
        n = n_all[cand]
        c = d.ladder[cand, 1:]  # (c, L): a new last round at each smaller tier
        ok = c < d.ladder[cand, r.col[cand, n - 1]][:, None]
        nt = cum_t[cand, n - 1][:, None] + d.ps[cand, 1:]
        ns = np.minimum(r.load[cand][:, :, None], (cum_rows[cand, n - 1][:, None] + c)[:, None, :])
        ns = ns.sum(axis=1).astype(np.int64)
        new = np.maximum(prog - t[cand][:, None] + nt, d.mlx_s(left + served[cand][:, None] - ns))
        ok &= new < span - 1e-12
        if not ok.any():
            return
        i, k = np.unravel_index(int(np.argmin(np.where(ok, new, np.inf))), ok.shape)
        gi, m = cand[i], n[i]
        span = float(new[i, k])
        prog, left = prog - t[gi] + float(nt[i, k]), left + int(served[gi]) - int(ns[i, k])
        r.col[gi, m - 1], r.col[gi, m:] = k + 1, 0
        r.ncap[gi] = r.run[gi] = m
        r.sums_ = None  # the arrays below are ours now: kept in step with the cut round
        t[gi], served[gi], cum_t[gi, m], cum_rows[gi, m] = nt[i, k], ns[i, k], nt[i, k], cum_rows[gi, m - 1] + c[i, k]


def _trim_padding(r: _Rounds, slack: Optional[float] = None) -> None:
    """In place, when MLX finishes last: cut padded rounds while the call ends within
    ``slack`` seconds of its makespan (default MLX's fixed cost per call, the model's
    smallest term) and, with a cost model that has energy, each cut spends no more joules.

    The programs' padded rows then cost no time, yet they are wasted work: a group's last
    round goes to MLX, or down to a smaller tier of its ladder (the rest of its pairs to
    MLX), the most padded rows saved per second added first. Small calls of flat routing
    pad most (a 128-token OLMoE call gives an expert ~16 pairs; Core ML tiers are
    multiples of 32 rows).
    """
    d = r.d
    cost = d.cost
    n, cum_t, cum_rows, t, rows, served = r.sums()
    rows = d.G * rows  # program rows of each group
    prog = cost.sync_s + _seq_sum(t)
    left = r.pairs - int(served.sum())
    span = cost.mlx_s(left, d.D, d.H)
    if prog > span:  # programs finish last: _rebalance's case
        return
    limit = span + (cost.mlx_fixed_s if slack is None else slack)
    energy = cost.has_energy
    while True:
        # every group's options in one (g, 1 + L) array, in the rule's order: its last round
        # to MLX (column 0), then at each smaller tier of its ladder
        m = np.maximum(n - 1, 0)
        size = cum_rows[d.rows, m][:, None] + d.ladder  # rows per expert after
        nt = cum_t[d.rows, m][:, None] + d.ps
        ns = np.minimum(r.load[:, :, None], size[:, None, :]).sum(axis=1).astype(np.int64)
        saved = (rows - served)[:, None] - (d.G[:, None] * size - ns)
        moved = left + served[:, None] - ns  # the MLX side's pairs after
        new = np.maximum(prog - t[:, None] + nt, d.mlx_s(moved))
        ok = (d.ladder < d.ladder[d.rows, r.col[d.rows, m]][:, None]) & (n > 0)[:, None] & (saved > 0)
        ok &= ~(new > limit + 1e-15)
        if energy:
            cum_j = _prefix(d.pj[d.rows[:, None], r.col])
            after = (cum_j[d.rows, m][:, None] + d.pj) + d.mlx_j(moved)
            ok &= ~(after > (cum_j[d.rows, n] + cost.mlx_j(left, d.D, d.H))[:, None])
        if not ok.any():
            return
        score = np.where(ok, saved / np.maximum(new - span, 1e-12), -np.inf)
        gi, k = np.unravel_index(int(np.argmax(score)), score.shape)
        span = float(new[gi, k])
        prog, left = prog - t[gi] + float(nt[gi, k]), left + int(served[gi]) - int(ns[gi, k])
        if k == 0:  # the last round to MLX; its caps stay
            r.run[gi] = n[gi] - 1
        else:  # the last round at a smaller tier; its caps end there
            r.col[gi, n[gi] - 1], r.col[gi, n[gi]:] = k, 0
            r.ncap[gi] = r.run[gi] = n[gi]
        r.sums_ = None
        n, cum_t, cum_rows, t, rows, served = r.sums()
        rows = d.G * rows


def _split_rounds(r: _Rounds, budget: int) -> None:
    """In place: groups served by one round get two smaller ones where that saves most rows."""
    if budget <= 0:
        return
    d = r.d
    cost = d.cost
    g = ((r.ncap == 1) & (r.run == 1)).nonzero()[0]  # groups served by one round
    if not g.size:
        return
    peak = r.load[g].max(axis=1).astype(np.int64)  # int(), as the per-group rule took it
    C = d.ladder[g, r.col[g, 0]]
    c1 = d.tiers[g]  # (g, L): a first round below the cap and the peak, then the tier that fits the rest
    rest = peak[:, None] - c1
    at = np.minimum((c1[:, None, :] < rest[:, :, None]).sum(axis=2), d.last_tier[g, None])
    c2 = c1[np.arange(g.size)[:, None], at]
    saved = np.where((c1 < np.minimum(C, peak)[:, None]) & (rest <= c2), C[:, None] - c1 - c2, 0)
    k = saved.shape[1] - 1 - np.argmax(saved[:, ::-1], axis=1)  # the largest saving; ties: the larger first round
    best = saved[np.arange(g.size), k]
    G = d.G[g]
    keep = ((best >= 1) & (best * G * d.row_s > cost.dispatch_s + G * cost.expert_s)).nonzero()[0]
    keep = keep[np.lexsort((g[keep], -(G[keep] * best[keep])))][:budget]
    gs = g[keep]
    r.col[gs, 0], r.col[gs, 1] = k[keep] + 1, at[keep, k[keep]] + 1
    r.ncap[gs] = r.run[gs] = 2
    r.sums_ = None


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
