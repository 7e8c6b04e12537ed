"""Profile + target limits + cost model -> Plan: groups, tier ladders, residency, thresholds.

Per MoE layer:
- experts are ranked by calibrated popularity and cut into groups of similar load
  (capacity is set by a group's busiest expert, so similar loads pad little);
- each group gets a tier ladder (``tiers.choose_ladder``) over the calibrated loads of
  the calls the user's prefill makes (``call_loads``), its top tier the largest call;
- programs and MLX run at the same time: the most popular experts get programs up to
  the point where calls finish soonest (``objective="time"``: sync + max of the two
  sides) or spend least energy within 1.2x of that (``"energy"``); the rest are
  "cold" and run on MLX, as do calls smaller than ``min_tokens`` (decode, typically).
``plan_layer`` runs these as named steps (``rank_experts``, ``cut_ranking``,
``price_residency``, ``choose_residency``, ``size_ladders``); ``decide`` is the one path from
a plan to a call's decision (``tiers.decide_call``) for the planner, the executor and replay.
Deterministic: the same inputs give the same plan.
"""

import json
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ane_kernels.coreml import max_group as coreml_max_group
from ane_kernels.formats import expert_bytes as format_expert_bytes
from ane_kernels.limits import DEFAULT_LIMITS

from ..atomic import write_json
from ..backends import registry
from . import schema
from ..log import get as _get_log
from ..runtime.experts import ExpertBlock
from .cost import CostModel
from .profiles import BATCH_SEQS, GENERATION_SIZES, LayerCounts, Profile
from .tiers import (CallContext, CallDecision, choose_ladder, decide_call, ladder_cover, ladder_rounds, tail_ladder,
                    undersized)

_log = _get_log(__name__)

PLAN_FORMAT = 1
NEVER = 1 << 30  # min_tokens of a layer that always stays on MLX


@dataclass
class PlanLimits:
    """What the target accepts (each backend's in ``backends/registry.py``; the ANE's from ane-constraints.md)."""

    backend: str
    capacities: List[int]  # allowed tiers (token capacities), ascending
    max_tiers: int = 12  # tiers per group (functions of one package)
    max_group: int = 16  # experts per program
    max_program_bytes: int = 1 << 30  # baked weights per program
    max_programs: int = 120  # compiled programs per process, whole model (program_units; backend's PROGRAM_BUDGET)
    call_ratio: float = 1.2  # program calls per layer call (x resident groups) that tier splits may reach
    max_axis: Optional[int] = None  # coreml: per-axis size limit; caps G at what the builder accepts
    weight_format: Optional[str] = None  # coreml: how programs store weights (ane_kernels/formats.py)

    @classmethod
    def for_backend(cls, backend: str, **overrides) -> "PlanLimits":
        limits = dict(registry.get(backend).limits)  # each backend's, with the reason, in backends/registry.py
        limits.setdefault("max_programs", registry.program_budget(backend)[0])  # compiled programs per process
        base = cls(backend, list(limits.pop("capacities")), **limits)
        for k, v in overrides.items():
            if v is not None:
                setattr(base, k, v)
        return base


def fp16_unsafe(lp: LayerCounts, backend: str) -> Optional[Tuple[str, float, float]]:
    """(which value, its calibrated max |value|, the backend's limit) when ``lp``'s expert FFN
    reaches past the fp16 range ``backend`` computes in (its FP16_RANGE_LIMIT; None: not fp16),
    else None."""
    limit = registry.fp16_range_limit(backend)
    if limit is None or not lp.max_abs:
        return None
    name, value = max(lp.max_abs.items(), key=lambda kv: kv[1])
    return (name, value, float(limit)) if value >= limit else None


def program_units(tiers: Sequence[int], backend: str) -> int:
    """Compiled programs one planned program (a group or a shared expert) costs on ``backend``."""
    return len(tiers) if registry.program_budget(backend)[1] else 1


def below_ladder_tiers(limits: PlanLimits) -> List[int]:
    """Row counts a backend's programs run besides their ladders (``LayerPlan.decide``'s
    ``extra_tiers``, as the executor has them): an onnx program is one dynamic session, so it runs
    every row count up to 32 and every multiple of 8 (executor ``EXACT_ROWS``, ``ROW_STEP``); Core
    ML packages only the functions built (their ladders)."""
    if registry.get(limits.backend).dynamic_rows:
        return sorted(set(range(1, 33)) | {c for c in limits.capacities if c % 8 == 0})
    return []


@dataclass
class GroupPlan:
    experts: List[int]
    tiers: List[int]


@dataclass
class SharedPlan:
    """A shared expert (dense gated MLP beside the routed ones): one program, G = 1."""

    path: str
    H: int
    tiers: List[int]
    min_tokens: int = NEVER  # calls with fewer tokens run on MLX


@dataclass
class LayerPlan:
    layer: int
    path: str
    num_experts: int
    top_k: int
    D: int
    H: int
    groups: List[GroupPlan] = field(default_factory=list)  # resident groups
    cold: List[int] = field(default_factory=list)  # experts that stay on MLX
    min_tokens: int = NEVER  # calls with fewer tokens run on MLX
    shared: List[SharedPlan] = field(default_factory=list)  # offloaded shared experts
    objective: str = "time"  # what a call's offload decision minimises: "time" or "energy"
    max_calls: int = 0  # program calls per layer call that tier splits may use (0: no splits)
    energy_bound: str = "time"  # energy objective: within 1.2x of the least time ("time") or of MLX alone ("gpu")
    # energy objective: a call ends within slack x the least time this plan's decisions give it; below 1.2 when
    # this plan's fastest calls are slower than the time objective's plan (_energy_residency), so both hold 1.2x
    slack: float = 1.2

    def predicted(self, cost: CostModel, tokens: int, counts: Optional[np.ndarray] = None) -> dict:
        """Predicted seconds of one call on the plan's path and on MLX alone."""
        pairs = tokens * self.top_k
        if counts is None:
            counts = np.full(self.num_experts, pairs / self.num_experts)
        d = self.decide(cost, counts)
        return {"offload_s": d.offload_s, "mlx_s": d.mlx_only_s}

    def offloads(self, tokens: int, released: bool = False) -> bool:
        """Whether a call of ``tokens`` tokens is decided at all, or stays on MLX without a sync: the
        plan's gate (executor and replay). A released layer (MLX holds none of its program experts)
        offloads every call."""
        return bool(self.groups) and (released or tokens >= self.min_tokens)

    def decide(self, cost: CostModel, counts: np.ndarray, overflow: str = "auto",
               extra_tiers: Sequence[int] = ()) -> CallDecision:
        """The executor's decision for a call with these per-expert counts (E,) (``call_context`` and
        ``decide``; build the context once to decide many calls)."""
        return decide(call_context(self, cost, overflow, extra_tiers), counts)


def call_context(lp: LayerPlan, cost: CostModel, overflow: str = "auto", extra_tiers=(), groups=None,
                 cold=None) -> CallContext:
    """``lp``'s ``tiers.CallContext``, built once per layer and ladder set. ``extra_tiers``: row counts
    the programs also run besides their ladders (decode tiers; a dynamic program's grid), one list
    for every group, one per group, or a function giving one per group when a call first needs
    them. ``groups`` (G,) id arrays and ``cold`` (E,) mask: the caller's, when it keeps them."""
    if groups is None:
        groups = [np.asarray(g.experts) for g in lp.groups]
    if cold is None:
        cold = np.zeros(lp.num_experts, bool)
        cold[list(lp.cold)] = True
    extra = None
    if callable(extra_tiers):
        extra = extra_tiers
    elif len(extra_tiers) and np.isscalar(extra_tiers[0]):  # one list for every group
        extra = lambda: [extra_tiers] * len(lp.groups)  # noqa: E731
    elif len(extra_tiers):
        extra = lambda: extra_tiers  # noqa: E731
    return CallContext(groups, [g.tiers for g in lp.groups], cold, cost, lp.D, lp.H, overflow, lp.objective,
                       lp.max_calls, lp.energy_bound, lp.slack, extra)


def decide(ctx: CallContext, counts: np.ndarray, released: bool = False) -> CallDecision:
    """The one path from a plan to ``tiers.decide_call`` (``LayerPlan.decide``, the executor,
    replay). A call smaller than the plan was sized for covers its loads with the row counts its
    programs run below their ladders (``ctx.under``), not at the bottom tiers (a 40-token call on a
    2048-token plan padded 92% there). A ``released`` layer (MLX holds none of its program experts)
    must run every pair on programs: every row count its programs run, rounds past the top tier
    (or dropped, if asked), for the least time."""
    if released:
        d = decide_call(counts, replace(ctx, ladders=ctx.whole, overflow="drop" if ctx.overflow == "drop" else "rerun",
                                        objective="time", energy_bound="time", slack=1.2))
        d.offload = d.program_calls > 0
        return d
    if ctx.extra is not None and undersized(np.asarray(counts), ctx.groups, ctx.ladders):
        ctx = replace(ctx, ladders=ctx.under)
    return decide_call(counts, ctx)


@dataclass
class Plan:
    backend: str
    limits: PlanLimits
    layers: List[LayerPlan]
    format: int = PLAN_FORMAT

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        """A plan from its JSON (``to_dict``'s), checked first by type, shape and range (schema.py):
        a bad field is a one-line ``SchemaError`` (a ValueError) naming it, e.g.
        ``layers[0].groups[1].tiers[2] is "16" (a string), but it must be an integer``."""
        if isinstance(d, dict) and d.get("format") != PLAN_FORMAT:
            raise schema.SchemaError(f"plan format {d.get('format')} is not {PLAN_FORMAT}")
        schema.check_plan(d, cls)
        if d["backend"] not in registry.REGISTRY:
            raise schema.SchemaError(f'backend is "{d["backend"]}", but it must be one of {", ".join(registry.names())}')
        layers = [
            LayerPlan(**{
                **lp,
                "groups": [GroupPlan(**g) for g in lp["groups"]],
                "shared": [SharedPlan(**sp) for sp in lp.get("shared", [])],
            })
            for lp in d["layers"]
        ]
        return cls(d["backend"], PlanLimits(**d["limits"]), layers, d["format"])

    def save(self, path) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path) -> "Plan":
        with open(path) as f:
            return cls.from_dict(json.load(f))

    @property
    def num_programs(self) -> int:
        return sum(len(lp.groups) + len(lp.shared) for lp in self.layers)

    @property
    def compiled_programs(self) -> int:
        """What the process compiles and holds (a Core ML tier function each): the budget's unit."""
        return sum(program_units(p.tiers, self.backend) for lp in self.layers for p in lp.groups + lp.shared)


def call_loads(layer_profile: LayerCounts, sizes: Optional[Sequence[int]] = None, draws: int = 16):
    """(S, E) per-expert loads of plausible prefill calls, and (S,) the calls' sizes.

    A profile that records per-block counts with their sequence (``"seq"``, as
    ``calibrate`` and ``replay`` write) gives real calls of every size in ``sizes``:
    consecutive blocks of one sequence, summed, never crossing a sequence.
    Each size class then weighs the same in tokens. Otherwise (or when that
    gives few calls) each recorded call is redrawn ``draws`` times: a multinomial
    over its pairs with its own expert shares, so ladders see how loads scatter.
    Seeded: the same profile gives the same samples.
    """
    chunks = [ch for ch in layer_profile.chunks if ch["tokens"] > 0]
    whole = [ch for ch in chunks if ch.get("call")]  # recorded whole calls (batched prefill): as they are
    if whole:
        chunks = [ch for ch in chunks if not ch.get("call")]
        rows, call = call_loads(replace(layer_profile, chunks=chunks), sizes, draws) if chunks else (None, None)
        w = np.asarray([ch["counts"] for ch in whole], float), np.asarray([ch["tokens"] for ch in whole], float)
        return (w if rows is None else (np.concatenate([rows, w[0]]), np.concatenate([call, w[1]])))
    if sizes and chunks and all("seq" in ch for ch in chunks):
        rows, call = _block_calls(chunks, sizes)
        if len(rows) >= 64:
            return np.asarray(rows, float), np.asarray(call, float)
        if rows:
            chunks = [{"tokens": t, "counts": r} for r, t in zip(rows, call)]
    rng = np.random.default_rng(0)
    k = max(layer_profile.top_k or 1, 1)
    rows, call = [], []
    for ch in chunks:
        c = np.asarray(ch["counts"], float)
        if c.sum() == 0:
            continue
        rows.append(rng.multinomial(int(c.sum()), c / c.sum(), size=draws).astype(float))
        call += [ch["tokens"]] * draws
    if not rows:  # a profile without per-call records: one call of the whole corpus
        c = np.asarray(layer_profile.counts, float)
        return c[None], np.asarray([max(c.sum() / k, 1.0)])
    return np.concatenate(rows), np.asarray(call, float)


def prefill_call_sizes(layer_profile: LayerCounts, step: int) -> List[int]:
    """The call sizes generation makes on the calibrated documents: a prefill's ``step``-token
    chunks, each document's remainder (in whole blocks; smaller ones are too few tokens to size
    for), and the chat requests and prompt-cache remainders below the step
    (``profiles.GENERATION_SIZES``)."""
    per_seq: Dict[int, int] = {}
    block = 0
    for ch in layer_profile.chunks:
        if ch.get("call"):  # a recorded whole call (batched prefill) is its own size
            continue
        per_seq[ch["seq"]] = per_seq.get(ch["seq"], 0) + ch["tokens"]
        block = max(block, ch["tokens"])
    # chat requests and prompt-cache remainders, in whole blocks too (smaller calls: tiers.small_ladders)
    sizes = {int(step)} | {n for n in GENERATION_SIZES if n < step and n % max(block, 1) == 0}
    for t in per_seq.values():
        rest = (t % step) // max(block, 1) * block
        if rest > 0:
            sizes.add(rest)
    return sorted(sizes)


MIN_CALLS = 8  # fewer real calls of a size than this: add calls of consecutive blocks across documents


def _block_calls(chunks: List[dict], sizes: Sequence[int]):
    """Calls of each size made of consecutive blocks of one sequence (full calls only).

    A size that the corpus's documents are too short to give ``MIN_CALLS`` of also
    gets calls of consecutive blocks across documents (a stream of the corpus).
    """
    seqs: Dict[int, List[dict]] = {}
    for ch in chunks:
        seqs.setdefault(ch["seq"], []).append(ch)
    rows, call = [], []
    for n in sorted(set(int(x) for x in sizes)):
        before = len(rows)
        for blocks in seqs.values():
            acc, t = None, 0
            for ch in blocks:
                c = np.asarray(ch["counts"], float)
                acc, t = (c.copy(), ch["tokens"]) if acc is None else (acc + c, t + ch["tokens"])
                if t >= n:
                    if t == n:
                        rows.append(acc)
                        call.append(n)
                    acc, t = None, 0
        if len(rows) - before < MIN_CALLS:  # the stream: blocks of every document in order
            acc, t = None, 0
            for ch in chunks:
                c = np.asarray(ch["counts"], float)
                acc, t = (c.copy(), ch["tokens"]) if acc is None else (acc + c, t + ch["tokens"])
                if t >= n:
                    rows.append(acc * (n / t))
                    call.append(n)
                    acc, t = None, 0
    return rows, call


def _expert_bytes(D: int, H: int, quant: Optional[dict], weight_format: Optional[str] = None) -> int:
    if weight_format:  # Core ML: what the chosen format holds
        return format_expert_bytes(weight_format, D, H)
    bits = quant["bits"] if quant else 32
    return 3 * D * H * bits // 8


def group_cap(E: int, D: int, H: int, quant: Optional[dict], limits: PlanLimits) -> int:
    """The most experts one program of this layer may hold: the group limit, the weight bytes
    per program (in the chosen weight format) and, for Core ML, what the builder accepts
    (0: not even one expert builds, e.g. D past the per-axis limit; the layer stays on MLX)."""
    if axis_group_cap(D, H, quant, limits) == 0:
        return 0
    return max(1, min(limits.max_group, E, axis_group_cap(D, H, quant, limits),
                      limits.max_program_bytes // max(_expert_bytes(D, H, quant, limits.weight_format), 1)))


def axis_group_cap(D: int, H: int, quant: Optional[dict], limits: PlanLimits) -> int:
    """Most experts per program the builder accepts under the per-axis limit (conv, or
    matmul past G*D; H split into chunks): ane_kernels.coreml.max_group. No limit: E."""
    if not limits.max_axis:
        return 1 << 30
    return coreml_max_group(D, H, DEFAULT_LIMITS.override(max_axis=limits.max_axis), (quant or {}).get("group_size", 64))


def _group_costs(loads: np.ndarray, caps: np.ndarray, cost: CostModel, D: int, H: int):
    """Per sample, one candidate group's (program s, MLX s, program J, MLX J): each (S,).

    loads: (S, G). Programs are costed at the ideal capacity per sample (the
    smallest allowed one >= the group's max load, top-tier rounds beyond it);
    the real ladder is chosen afterwards. MLX costs leave out its fixed cost
    (paid once per layer call, whatever the number of cold experts).
    """
    G = loads.shape[1]
    peak = loads.max(1)  # (S,)
    rounds, rows = ladder_cover(peak, caps)
    pairs = loads.sum(1)
    return (cost.programs_s(G, rounds, rows, D, H), cost.mlx_work_s(pairs, D, H),
            cost.programs_j(G, rounds, rows, D, H), cost.mlx_work_j(pairs, D, H))


def split_cost(tp: np.ndarray, tm: np.ndarray, jp: np.ndarray, jm: np.ndarray, cost: CostModel, finish=0.0):
    """Per sample (makespan s, energy J) of calls whose programs side costs tp (S,) s / jp J
    and whose MLX side costs tm (S,) s / jm J (fixed costs added here), both at once."""
    return cost.call_s(tp, tm, finish_s=finish), cost.call_j(jp, jm, tm)


def _run_costs(runs, run_cost: dict, S: int):
    """(t_prog, t_mlx, j_prog, j_mlx) of each run, each (S, R)."""
    return tuple(np.stack([run_cost[r][x] for r in runs], 1) if runs else np.zeros((S, 0)) for x in range(4))


def _partial_last(runs, tp: np.ndarray, tail: np.ndarray, ranked: np.ndarray, caps: np.ndarray, cost: CostModel,
                  D: int, H: int, limit: Optional[np.ndarray] = None):
    """Per sample, the capacity (S,) at which the last run's one round ends the call soonest with
    the other runs on programs and the rest of its pairs on MLX, and that makespan (S,) (inf if
    no capacity below its peak does). decide_call makes this move when a group moved whole to
    MLX leaves the programs side idle: the ANE's share of a layer is rarely a whole number of
    experts (Mixtral has 8), so the marginal group gets tiers for it (plan_layer). With ``limit``
    (S,) (the energy objective's time bound), the largest capacity that ends the call within it."""
    S = len(ranked)
    if not runs:
        return np.zeros(S), np.full(S, np.inf)
    i, j = runs[-1]
    loads = ranked[:, i:j]  # (S, G)
    cand = caps[caps <= loads.min(1).max()]  # (K,)
    if cand.size == 0:
        return np.zeros(S), np.full(S, np.inf)
    prog = (cost.sync_s + cost.finish_s(ranked.sum(1), D)[:, None] + tp[:, :-1].sum(1)[:, None]
            + cost.programs_s(j - i, 1, cand[None, :], D, H))  # (S, K)
    left = np.maximum(loads[:, :, None] - cand[None, None, :], 0).sum(1)  # (S, K) pairs back on MLX
    mlx = cost.mlx_fixed_s + tail[:, None] + cost.mlx_work_s(left, D, H)
    span = cost.makespan(prog, mlx)
    span = np.where(cand[None, :] <= loads.min(1, keepdims=True), span, np.inf)  # full rounds only, as decide_call
    k = span.argmin(1)
    if limit is not None:  # the most pairs on programs within the bound (capacities ascend)
        ok = span <= limit[:, None] + 1e-15
        k = np.where(ok.any(1), ok.shape[1] - 1 - np.argmax(ok[:, ::-1], 1), k)
    return cand[k].astype(float), span[np.arange(S), k]


SPREAD = (0.85, 0.9, 0.95, 1.0, 1.05, 1.1, 1.15)


def _spread(peaks: np.ndarray, top: int) -> np.ndarray:
    """Calibrated group max-loads, each also scaled by +-5..15% (never past ``top``, the
    largest call): the ladder then fits where loads of unseen calls fall, not exactly
    the calibrated values (every padded row costs the same whatever the call size,
    so samples are unweighted)."""
    return np.minimum(np.concatenate([peaks * f for f in SPREAD]), top)


@dataclass
class Ranking:
    """One layer's experts, hot first, and the calibrated calls every later step prices."""

    rank: List[int]  # expert ids, hottest first (ties by id)
    counts: np.ndarray  # (E,) calibrated pairs per expert
    samples: np.ndarray  # (S, E) per-expert loads of the calibrated calls
    ranked: np.ndarray  # (S, E) the same, columns in rank order
    call: np.ndarray  # (S,) the calls' sizes in tokens
    caps: np.ndarray  # (C,) the allowed capacities, ascending
    top: int  # every ladder's top tier: headroom for the largest call (a capacity at most)


def rank_experts(lp_profile: LayerCounts, limits: PlanLimits, call_sizes: Optional[Sequence[int]] = None) -> Ranking:
    """Experts by calibrated popularity, hot first: a group's capacity is set by its busiest
    expert, so groups cut from neighbours in this order have similar loads and pad little.
    The top tier is headroom: no expert gets more pairs than a call has tokens, so a top tier at
    the largest call size never overflows on calls of that size, whatever the domain."""
    counts = np.asarray(lp_profile.counts, float)
    rank = sorted(range(lp_profile.num_experts), key=lambda e: (-counts[e], e))  # hot first, ties by id
    samples, call = call_loads(lp_profile, call_sizes)  # (S, E), (S,)
    caps = np.asarray(limits.capacities)
    top = max(call_sizes) if call_sizes else call.max()
    if any(ch.get("call") for ch in lp_profile.chunks):  # batched prefill: up to BATCH_SEQS prompts of a step
        top = max(top, call.max(), max(BATCH_SEQS) * top)  # each (pad tokens of one id may load one expert)
    return Ranking(rank, counts, samples, samples[:, rank], call, caps, int(min(top, caps[-1])))


@dataclass
class Cuts:
    """Every prefix of the ranking cut into runs (groups) with the least program time, and what
    each run and the rest of the ranking cost per calibrated call."""

    choice: List[int]  # start of the last run of the best cut of each prefix (E + 1,)
    run_cost: dict  # (i, j) -> (program s, MLX s, program J, MLX J) of ranking[i:j], each (S,)
    tail_t: np.ndarray  # (S, E + 1) seconds of the ranking's experts from m on, on MLX (work only)
    tail_j: np.ndarray  # (S, E + 1) their joules
    alone_t: np.ndarray  # (S,) the whole call on MLX alone, fixed cost included
    alone_j: np.ndarray  # (S,)
    capped: Optional[List[List[Tuple[int, int]]]] = None  # with a cap on runs: each prefix's cut (E + 1,)

    def runs(self, m: int) -> List[Tuple[int, int]]:
        """The best cut of the first m experts, hottest run first (with a cap on runs, of as many
        of them as the cap's runs can hold)."""
        if self.capped is not None:
            return list(self.capped[m])
        out, j = [], m
        while j > 0:
            out.append((self.choice[j], j))
            j = self.choice[j]
        return out[::-1]

    def feasible(self, m: int) -> bool:
        """Whether the first m experts can all be cut into runs (always, without a cap)."""
        return self.capped is None or (sum(j - i for i, j in self.capped[m]) == m)

    def costs(self, runs) -> Tuple[np.ndarray, ...]:
        """(program s, MLX s, program J, MLX J) of each run, each (S, R)."""
        return _run_costs(runs, self.run_cost, len(self.alone_t))


def cut_ranking(r: Ranking, sizes: Sequence[int], cost: CostModel, D: int, H: int,
                max_runs: Optional[int] = None) -> Cuts:
    """A DP over the ranking: for every prefix, the cut into runs of ``sizes`` experts with the
    least program time. Runs of similar load pad little, so hot experts tend to get small
    groups and lukewarm ones larger groups, as dispatch and padding costs dictate; the rest of
    the ranking is priced on MLX for the residency choice that follows. ``max_runs``: at most
    that many runs per cut (the layer's share of the program budget, ``layer_run_caps``)."""
    E = r.ranked.shape[1]
    best = np.full(E + 1, np.inf)
    best[0] = 0.0
    choice = [0] * (E + 1)
    run_cost = {}
    for j in range(1, E + 1):
        for G in sizes:
            i = j - G
            if i < 0:
                break
            run_cost[(i, j)] = _group_costs(r.ranked[:, i:j], r.caps, cost, D, H)
            c = best[i] + float(run_cost[(i, j)][0].sum())
            if c < best[j] - 1e-15:
                best[j], choice[j] = c, i
    pair_s, pair_j = cost.mlx_rate(D, H)
    mlx_t, mlx_j = r.ranked * pair_s, r.ranked * pair_j  # (S, E) seconds and joules per expert on MLX
    tail_t = np.concatenate([np.cumsum(mlx_t[:, ::-1], 1)[:, ::-1], np.zeros((len(r.ranked), 1))], 1)  # (S, E+1)
    tail_j = np.concatenate([np.cumsum(mlx_j[:, ::-1], 1)[:, ::-1], np.zeros((len(r.ranked), 1))], 1)
    none = np.zeros(len(r.ranked))
    alone_t, alone_j = split_cost(none, tail_t[:, 0], none, tail_j[:, 0], cost)
    capped = None if max_runs is None else _capped_cuts(run_cost, E, max_runs)
    return Cuts(choice, run_cost, tail_t, tail_j, alone_t, alone_j, capped)


def _capped_cuts(run_cost: dict, E: int, max_runs: int) -> List[List[Tuple[int, int]]]:
    """For each prefix m, the least-program-time cut with at most ``max_runs`` runs; a prefix
    that many runs cannot hold gets the cut of the longest prefix they can."""
    K = max(int(max_runs), 0)
    best = np.full((K + 1, E + 1), np.inf)  # best[k, j]: least time of the first j experts in k runs
    best[0, 0] = 0.0
    start = np.zeros((K + 1, E + 1), int)
    runs = [(i, j, float(c[0].sum())) for (i, j), c in run_cost.items()]  # in cut_ranking's order
    for k in range(1, K + 1):
        for i, j, c in runs:
            t = best[k - 1, i] + c
            if t < best[k, j] - 1e-15:
                best[k, j], start[k, j] = t, i
    out, last = [], []
    for m in range(E + 1):
        k = int(best[:, m].argmin())
        if not np.isfinite(best[k, m]):
            out.append(last)  # more experts than the runs hold: the longest prefix they do
            continue
        cut, j = [], m
        while k > 0:
            cut.append((int(start[k, j]), j))
            j, k = int(start[k, j]), k - 1
        out.append(last := cut[::-1])
    return out


@dataclass
class CallPrices:
    """One residency's per-call (S,) predictions that the energy objective weighs against a time
    bound only known once every residency is priced."""

    static_s: np.ndarray  # as planned: every run's rounds
    static_j: np.ndarray
    balanced_s: np.ndarray  # time-balanced, as decide_call balances (see ``Candidate``)
    balanced_j: np.ndarray
    cut: Optional[Callable] = None  # limit (S,) -> (s, J of the cut round, pairs back on MLX): the last run's round
    rest_j: Optional[np.ndarray] = None  # program J of every run but the last


@dataclass
class Candidate:
    """One residency: the ranking's first ``m`` experts on programs (cut as ``Cuts.runs(m)``), the
    rest on MLX, both at once; means over the calibrated calls."""

    m: int
    time_s: float  # makespan of its calls as decided (time: time-balanced; energy: least J within the bound)
    energy_j: float  # their joules
    balanced_s: float  # makespan of the time-balanced calls (worst-used groups to MLX, the last round cut)
    whole_s: float = 0.0  # time-balanced with whole groups only
    whole_small_s: float = 0.0  # the same on the calls smaller than the largest (0: one size)
    calls: Optional[CallPrices] = None  # energy objective only


def price_residency(r: Ranking, cuts: Cuts, m: int, cost: CostModel, D: int, H: int, energy: bool) -> Candidate:
    """The first ``m`` experts on programs, priced per calibrated call as the executor decides
    it: each call moves its worst-used groups to MLX while that ends it sooner, and the last
    run may run one smaller round (decide_call's take-back), so the two units balance between
    whole groups. ``energy``: keep the per-call prices the energy choice needs."""
    runs = cuts.runs(m)
    S = len(r.ranked)
    tp, tm, jp, jm = cuts.costs(runs)  # (S, R) each
    tail_t, tail_j = cuts.tail_t[:, m], cuts.tail_j[:, m]
    fin = cost.finish_s(r.ranked.sum(1), D)  # (S,) an offloaded call's host passes over its pairs
    # try moving the k worst runs (by calibrated seconds per MLX second), per sample the best k
    worst = np.argsort(-(tp.sum(0) / np.maximum(tm.sum(0), 1e-30)), kind="stable")
    z = np.zeros((S, 1))
    ctp, ctm, cjp, cjm = (np.concatenate([z, np.cumsum(a[:, worst], 1)], 1) for a in (tp, tm, jp, jm))
    prog = tp.sum(1, keepdims=True) - ctp  # (S, R+1)
    side = tail_t[:, None] + ctm
    span = cost.call_s(prog, side, idle=1e-15, finish_s=fin[:, None])
    kb = span.argmin(1)
    rows = np.arange(S)
    whole_t = np.minimum(span[rows, kb], cuts.alone_t)  # whole groups only
    cut = None
    if runs:
        i, j = runs[-1]

        def cut_round(limit=None):
            c, t_c = _partial_last(runs, tp, tail_t, r.ranked, r.caps, cost, D, H, limit)
            back = np.maximum(r.ranked[:, i:j] - c[:, None], 0).sum(1)  # its pairs past the round, on MLX
            return t_c, cost.programs_j(j - i, 1, c, D, H) * (c > 0), back

        part_t, part_j, back = cut_round()
        kb = np.where(part_t < span[rows, kb], span.shape[1], kb)
        span = np.concatenate([span, part_t[:, None]], 1)
        cjp = np.concatenate([cjp, (jp[:, -1] - part_j)[:, None]], 1)
        cjm = np.concatenate([cjm, cost.mlx_work_j(back, D, H)[:, None]], 1)
        side = np.concatenate([side, (tail_t + cost.mlx_work_s(back, D, H))[:, None]], 1)
        if energy:
            cut = cut_round
    tb_t = np.minimum(span[rows, kb], cuts.alone_t)
    tb_j = np.where(span[rows, kb] < cuts.alone_t,
                    cost.call_j(jp.sum(1) - cjp[rows, kb] + tail_j, cjm[rows, kb], side[rows, kb]), cuts.alone_j)
    small = r.call < r.call.max()
    c = Candidate(m, float(tb_t.mean()), float(tb_j.mean()), float(tb_t.mean()), float(whole_t.mean()),
                  float(whole_t[small].mean()) if small.any() else 0.0)
    if energy:
        st_t, st_j = split_cost(tp.sum(1), tail_t, jp.sum(1), tail_j, cost, fin)  # the plan as it is
        c.calls = CallPrices(st_t, st_j, tb_t, tb_j, cut, jp.sum(1) - (jp[:, -1] if runs else 0))
    return c


def energy_limit(cands: List[Candidate], cuts: Cuts, energy_bound: str) -> np.ndarray:
    """Per call (S,), the energy objective's time bound: 1.2x the least time any residency gives
    that call (``energy_bound="time"``), or 1.2x MLX alone's."""
    fastest = np.min([c.calls.balanced_s for c in cands], 0)
    return 1.2 * (np.minimum(fastest, cuts.alone_t) if energy_bound == "time" else cuts.alone_t)


def _energy_estimate(c: Candidate, cuts: Cuts, lim: np.ndarray, cost: CostModel, D: int, H: int) -> Candidate:
    """``c`` decided per call as decide_call's energy objective does: the least joules of (as
    planned, balanced just enough to end within the bound (interpolated), fully balanced, MLX
    alone, the last run's round cut to the most pairs within the bound) that ends within ``lim``."""
    p, m = c.calls, c.m
    rows = np.arange(len(lim))
    st_t, st_j, tb_t, tb_j = p.static_s, p.static_j, p.balanced_s, p.balanced_j
    frac = np.clip((st_t - lim) / np.maximum(st_t - tb_t, 1e-30), 0, 1)
    part_t, part_j = np.where(st_t > lim, np.maximum(lim, tb_t), st_t), st_j + frac * (tb_j - st_j)
    opts_t, opts_j = [st_t, part_t, tb_t, cuts.alone_t], [st_j, part_j, tb_j, cuts.alone_j]
    if p.cut is not None:
        c_t, c_j, back = p.cut(lim)
        opts_t.append(c_t)
        opts_j.append(cost.call_j(p.rest_j + c_j + cuts.tail_j[:, m], cost.mlx_work_j(back, D, H),
                                  cuts.tail_t[:, m] + cost.mlx_work_s(back, D, H)))  # MLX seconds (call_j: > 0 gates its fixed J)
    opts_t, opts_j = np.stack(opts_t), np.stack(opts_j)  # (4 or 5, S)
    j_ok = np.where(opts_t <= lim + 1e-15, opts_j, np.inf)
    pick = np.where(np.isfinite(j_ok).any(0), j_ok.argmin(0), opts_t.argmin(0))
    return Candidate(m, float(opts_t[pick, rows].mean()), float(opts_j[pick, rows].mean()), float(tb_t.mean()))


def choose_residency(cands: List[Candidate], cuts: Cuts, cost: CostModel, D: int, H: int,
                     energy_bound: Optional[str] = None) -> Tuple[int, int]:
    """(m, m for the time objective): how many of the ranking's experts get programs.

    Time: the residency that balances the largest calls with a cut round, unless it predicts
    smaller calls slower than the whole-group residency does (their extra groups would pad
    them). Energy (``energy_bound`` given): the least joules among residencies whose calls end
    within 1.2x of the fastest (``"time"``) or of MLX alone (``"gpu"``), each call decided as
    decide_call does (``_energy_estimate``)."""
    m0, m1 = min(cands, key=lambda c: c.whole_s), min(cands, key=lambda c: c.time_s)
    m_time = (m1 if m1.whole_small_s <= m0.whole_small_s else m0).m
    if energy_bound is None:
        return m_time, m_time
    lim = energy_limit(cands, cuts, energy_bound)
    est = [_energy_estimate(c, cuts, lim, cost, D, H) for c in cands]
    best_t = min(c.balanced_s for c in est)
    bound = 1.2 * (best_t if energy_bound == "time" else float(cuts.alone_t.mean())) + 1e-15
    return min((c for c in est if c.time_s <= bound), key=lambda c: (c.energy_j, c.time_s), default=est[0]).m, m_time


def size_ladders(r: Ranking, cuts: Cuts, m: int, cost: CostModel, D: int, H: int, max_tiers: int,
                 limit: Optional[np.ndarray] = None) -> List[GroupPlan]:
    """The first ``m`` experts of the ranking cut into runs, each with its tier ladder over its
    calibrated max-loads (spread +-15%, ``_spread``). The last run also gets tiers for the
    rounds that end the calls where it runs partly on programs soonest (``_partial_last``):
    the programs' best share of a layer is rarely whole groups. ``limit`` (S,) (energy: the
    time bound): also the cuts that do the most within it, and the time-optimal ones."""
    groups = []
    runs = cuts.runs(m)
    balance = np.zeros(0)
    if runs:
        tp = cuts.costs(runs)[0]
        tail = cuts.tail_t[:, m]
        part_c, part_t = _partial_last(runs, tp, tail, r.ranked, r.caps, cost, D, H)
        balance = part_c[(part_t < np.inf) & (part_c > 0)]
        if limit is not None:
            part_c, part_t = _partial_last(runs, tp, tail, r.ranked, r.caps, cost, D, H, limit)
            balance = np.concatenate([balance, part_c[(part_t < np.inf) & (part_c > 0)]])
    for i, j in runs:  # hottest run first
        if r.ranked[:, i:j].max() > 0:
            peaks = _spread(r.ranked[:, i:j].max(1), r.top)
            if (i, j) == runs[-1] and balance.size:
                peaks = np.concatenate([peaks, _spread(balance, r.top)])
            tiers = choose_ladder(peaks, r.caps.tolist(), max_tiers, None, r.top)
            groups.append(GroupPlan(sorted(r.rank[i:j]), tiers))
    return groups


def plan_layer(
    lp_profile: LayerCounts,
    D: int,
    H: int,
    cost: CostModel,
    limits: PlanLimits,
    quant: Optional[dict] = None,
    path: str = "",
    call_sizes: Optional[Sequence[int]] = None,
    objective: str = "time",
    energy_bound: str = "time",
    max_runs: Optional[int] = None,
) -> LayerPlan:
    """Groups = a cut of the popularity ranking into runs of 1, 2, 4, ... experts (at most
    ``max_runs`` of them: the layer's share of the program budget).

    Steps: rank the experts (``rank_experts``), cut every prefix of the ranking into runs with
    the least program time (``cut_ranking``), price each prefix on programs with the rest on MLX,
    both at once (``price_residency``), choose how many experts get programs (``choose_residency``:
    the calls that finish soonest, or with ``objective="energy"`` the least energy within 1.2x
    of that; the estimate moves whole groups, the calls pack rounds, so a few larger residencies
    are checked on calibrated calls, ``_energy_residency``), size each group's ladder
    (``size_ladders``), give never-routed experts tail programs (``tail_groups``) and find the
    smallest call worth offloading (``_min_tokens``).
    """
    E = lp_profile.num_experts
    k = lp_profile.top_k or 1
    r = rank_experts(lp_profile, limits, call_sizes)
    base = LayerPlan(lp_profile.layer, path or lp_profile.path, E, k, D, H, [], list(range(E)))
    max_g = group_cap(E, D, H, quant, limits)
    if max_g == 0:  # no program of this shape builds
        return base
    sizes = sorted({g for g in (1, 2, 4, 8, 16, 32, 64, 128, max_g) if g <= max_g})
    cuts = cut_ranking(r, sizes, cost, D, H, max_runs)
    energy = objective == "energy" and cost.has_energy
    cands = [price_residency(r, cuts, m, cost, D, H, energy) for m in range(E + 1) if cuts.feasible(m)]
    m, m_time = choose_residency(cands, cuts, cost, D, H, energy_bound if energy else None)
    limit = energy_limit(cands, cuts, energy_bound) if energy else None
    groups = size_ladders(r, cuts, m, cost, D, H, limits.max_tiers, limit)
    slack = 1.2
    if energy:  # the estimates above move whole groups; the calls pack rounds (tiers._pack_energy), which
        # can use more resident experts: check a few residencies on the calls themselves
        groups, slack = _energy_residency(
            m, int((r.counts > 0).sum()), groups, lambda n: size_ladders(r, cuts, n, cost, D, H, limits.max_tiers, limit),
            size_ladders(r, cuts, m_time, cost, D, H, limits.max_tiers), r.samples,
            replace(base, energy_bound=energy_bound), cost, limits.call_ratio)
    resident = {e for g in groups for e in g.experts}
    groups += tail_groups([e for e in r.rank if e not in resident and r.counts[e] == 0], cost, D, H, limits, sizes,
                          r.top)
    resident = {e for g in groups for e in g.experts}
    lp = replace(base, groups=groups, cold=sorted(e for e in range(E) if e not in resident), objective=objective,
                 energy_bound=energy_bound, slack=slack, max_calls=int(limits.call_ratio * len(groups) + 1e-9))
    lp.min_tokens = _min_tokens(lp, cost, r.counts)
    if lp.min_tokens == NEVER:
        lp.groups, lp.cold = [], list(range(E))
    return lp


ENERGY_PROBES = 32  # calibrated calls _energy_residency replays per candidate residency
ENERGY_PARTS = 8  # parts of them whose least time ratio sets the energy plan's slack


def _energy_residency(m: int, seen: int, groups: List[GroupPlan], resident_groups, time_groups: List[GroupPlan],
                      samples: np.ndarray, base: LayerPlan, cost: CostModel, call_ratio: float):
    """The energy objective's residency and per-call slack, checked on calibrated calls (samples
    (S, E)) through the executor's own decisions: the estimated best ``m`` experts on programs, and
    more, up to all ``seen`` (calibrated) ones (``resident_groups(n)``: the first n experts' groups).
    Each call packs the rounds that spend least within its time bound (``tiers._pack_energy``), so
    a resident group costs nothing on calls it would not pay on, and more resident experts give
    the packing more ways to fill the frugal unit's time.

    A call's bound is slack x the fastest this plan's own decisions give it; with
    ``energy_bound="time"`` (``base``'s) the target is 1.2x the time objective's plan
    (``time_groups``), whose calls may end sooner, so each candidate's slack is 1.2 x (the time
    plan's time / its own fastest time), the least of that ratio over ENERGY_PARTS parts of the
    probe, at most 1.2. The least mean joules wins; ties within 0.1% keep fewer programs.
    Returns (groups, slack)."""
    probe = samples[np.linspace(0, len(samples) - 1, min(ENERGY_PROBES, len(samples))).round().astype(int)]
    E = base.num_experts

    def layer(gs, objective, slack=1.2):
        ids = {e for g in gs for e in g.experts}
        return replace(base, groups=gs, cold=[e for e in range(E) if e not in ids], objective=objective,
                       max_calls=int(call_ratio * len(gs) + 1e-9), slack=slack)

    def part_s(lp):  # seconds of these calls as the executor runs them, summed per part of the probe
        ctx = call_context(lp, cost)
        s = [d.offload_s if d.offload else d.mlx_only_s for d in (decide(ctx, c) for c in probe)]
        return np.array([p.sum() for p in np.array_split(np.asarray(s), ENERGY_PARTS)])

    ref = part_s(layer(time_groups, "time"))
    tried = []  # (joules, programs, groups, slack)
    for cand in [m] + sorted({m + (seen - m) * q // 4 for q in (1, 2, 3, 4)} - {m}):
        gs = groups if cand == m else resident_groups(cand)
        # the least ratio over parts of the calibration, not the mean: calls the plan never saw
        # drift (the mean alone let 4 of 112 held-out chip replays end at 1.200-1.217x)
        slack = 1.2 * min(1.0, float((ref / part_s(layer(gs, "time"))).min())) if base.energy_bound == "time" else 1.2
        ctx = call_context(layer(gs, "energy", slack), cost)
        ds = [decide(ctx, c) for c in probe]
        tried.append((float(np.mean([d.offload_j if d.offload else d.mlx_only_j for d in ds])), len(gs), gs, slack))
    least = min(x[0] for x in tried)
    best = min((x for x in tried if x[0] <= least * (1 + 1e-3)), key=lambda x: x[1])
    return best[2], best[3]


def tail_groups(unseen: List[int], cost: CostModel, D: int, H: int, limits: PlanLimits,
                sizes: Sequence[int], top: int) -> List[GroupPlan]:
    """Tail programs for the experts calibration never routed to (``unseen``, coldest first).

    Calibration says nothing of their loads, so the rule is the marginal one: a pair that
    lands on one costs ``(1 - overlap) * mlx_s(1)`` more on MLX (hidden when MLX runs on
    its own unit) or one smallest-tier call of its tail program, which computes every
    expert of the program. The tail takes the largest program size in ``sizes`` whose call
    is cheaper; none (no tail) when even one expert's is not. Ladder: the smallest
    capacity, then x4 steps up to ``top`` (a pair that finds many more goes round again or
    to MLX, as ``decide_call`` says per call: ``tiers.tail_ladder``).
    """
    if not unseen:
        return []
    caps = np.asarray(limits.capacities)
    on_mlx = (1.0 - cost.overlap) * cost.mlx_s(1, D, H)
    fits = [G for G in sizes if cost.program_s(G, int(caps[0]), D, H) < on_mlx]
    if not fits:
        return []
    G = max(fits)
    ladder = tail_ladder(limits.capacities, top, limits.max_tiers)
    return [GroupPlan(sorted(unseen[i : i + G]), ladder) for i in range(0, len(unseen), G)]


def _min_tokens(lp: LayerPlan, cost: CostModel, counts: np.ndarray) -> int:
    """Smallest power-of-two call size where the plan beats MLX (in its objective) on calibrated shares."""
    if not lp.groups:
        return NEVER
    share = counts / max(counts.sum(), 1)
    n = max(cost.first_offload_tokens, 1)
    while n <= 1 << 16:
        if lp.decide(cost, np.ceil(share * n * lp.top_k)).offload:
            return n
        n *= 2
    return NEVER


def plan_shared(lp_profile: LayerCounts, path: str, D: int, H: int, cost: CostModel, limits: PlanLimits) -> Optional[SharedPlan]:
    """A shared expert sees every token of a call: its ladder covers the calibrated call
    sizes, and it is offloaded from the smallest call size where a program beats MLX."""
    sizes = np.asarray([ch["tokens"] for ch in lp_profile.chunks if ch["tokens"] > 0], float)
    if sizes.size == 0 or axis_group_cap(D, H, None, limits) == 0:
        return None
    tiers = choose_ladder(sizes, limits.capacities, limits.max_tiers, 1.0 / sizes)
    n = max(cost.first_offload_tokens, 1)
    while n <= 1 << 16:
        prog = cost.sync_s + sum(cost.program_s(1, c, D, H) for c in ladder_rounds(np.array([n]), tiers))
        if prog < cost.mlx_dense_s(n, D, H):
            return SharedPlan(path, H, tiers, n)
        n *= 2
    return None


def make_plan(
    profile: Profile,
    blocks: Dict[int, ExpertBlock],
    cost: CostModel,
    limits: PlanLimits,
    call_sizes: Optional[Sequence[int]] = None,
    objective: str = "time",
    energy_bound: str = "time",
    log: Callable[[str], None] = None,
) -> Plan:
    """A plan for every layer of ``profile``; ``blocks``: layer -> the model's expert block
    (D = ``dims``, H = ``hidden``, ``path``, ``quant``; each of its ``shared`` experts is
    offloaded where a program pays, so pass only those that compute a plain SwiGLU MLP);
    call_sizes: the prefill call sizes to size ladders for (default: the calibrated calls).
    A layer whose calibrated range passes an fp16 backend's limit stays on MLX (one ``log`` line)."""
    log = log or _log.warning
    layers, inputs = [], []  # inputs: what each layer was planned from (a re-plan under a cap reuses it)
    for lp in sorted(profile.layers, key=lambda x: x.layer):
        unsafe = fp16_unsafe(lp, limits.backend)
        if unsafe is not None:
            b = blocks.get(lp.layer)
            if b is None:
                raise ValueError(f"profile names layer {lp.layer} that the model has no expert block for")
            name, value, limit = unsafe
            log(f"layer {lp.layer} stays on MLX: its experts' |{name}| reached {value:.0f} on the calibration corpus, "
                f"past {limit:.0f} (fp16 on the Neural Engine saturates near {2 * limit:.0f})")
            layers.append(LayerPlan(lp.layer, b.path, lp.num_experts, lp.top_k, b.dims, b.hidden,
                                    cold=list(range(lp.num_experts)), min_tokens=NEVER))
            inputs.append(None)
            continue
        sizes = call_sizes
        if sizes is None and profile.chunk_size and lp.chunks and all("seq" in ch for ch in lp.chunks):
            sizes = prefill_call_sizes(lp, profile.chunk_size)
        b = blocks.get(lp.layer)
        if b is None:
            raise ValueError(f"profile names layer {lp.layer} that the model has no expert block for")
        plan = plan_layer(lp, b.dims, b.hidden, cost, limits, b.quant, b.path, sizes, objective, energy_bound)
        for s in b.shared:
            sp = plan_shared(lp, s.path, b.dims, s.hidden, cost, limits)
            if sp is not None:
                plan.shared.append(sp)
        layers.append(plan)
        inputs.append((lp, b, sizes))
    sized = layers  # the energy objective's bound is the time plan's: both are capped alike, by the time plan
    if objective != "time" and any(inputs) and _caps_apply(limits.backend):
        sized = [lp if i is None else plan_layer(i[0], i[1].dims, i[1].hidden, cost, limits, i[1].quant, i[1].path,
                                                   i[2], "time", energy_bound) for lp, i in zip(layers, inputs)]
    for li, cap in layer_run_caps(sized, limits.max_programs, limits.backend).items():
        lp, b, sizes = inputs[li]  # over its share of the budget: fewer, larger groups, not experts on MLX
        shared = layers[li].shared
        layers[li] = plan_layer(lp, b.dims, b.hidden, cost, limits, b.quant, b.path, sizes, objective, energy_bound,
                                max_runs=cap)
        layers[li].shared = shared
    _apply_budget(layers, limits.max_programs, limits.backend)
    return Plan(limits.backend, limits, layers)


def layer_run_caps(layers: List[LayerPlan], max_programs: int, backend: str) -> Dict[int, int]:
    """{layer index: most groups} for the layers over their share of the program budget when the
    whole model's plan is over it: shared experts keep theirs, then each layer gets an equal share,
    a layer needing less handing the rest on (water-filling); a layer's cap in groups is its share
    over its units per group. Empty when the plan fits, when some layer's share holds no group, or
    when ``_caps_apply`` says no: then ``_apply_budget``'s hottest groups first.
    Without this, ``_apply_budget`` would send the coldest groups' experts to MLX: a 48-layer
    Qwen3-30B-A3B calibrated on 2048 tokens kept 42 of each layer's 128 experts there."""
    if not _caps_apply(backend):
        return {}
    units = [sum(program_units(g.tiers, backend) for g in lp.groups) for lp in layers]
    left = max_programs - sum(program_units(sp.tiers, backend) for lp in layers for sp in lp.shared)
    if sum(units) <= left:
        return {}
    caps, order = {}, sorted((u, li) for li, u in enumerate(units) if u > 0)
    for n, (u, li) in enumerate(order):
        share = max(left, 0) // (len(order) - n)
        if u <= share:
            left -= u
            continue
        per_group = u / len(layers[li].groups)
        caps[li] = int(share // per_group)
        if caps[li] == 0:  # too small a budget to spread over every layer: the hottest groups take it
            return {}
        left -= int(caps[li] * per_group)
    return caps


def _caps_apply(backend: str) -> bool:
    """Whether ``layer_run_caps`` re-plans layers over their share: for backends with a program per
    group (onnx, mlx). Not for Core ML, where each tier is a program: capping its 3-layer trace
    replays sped up the time objective (M1 0.78 -> 0.54 of all-GPU) but padded OLMoE book's
    128-token calls 28.1% (27.0% uncapped) and broke the energy plans' 1.2x bound in two cases."""
    return not registry.program_budget(backend)[1]


def _apply_budget(layers: List[LayerPlan], max_programs: int, backend: str) -> None:
    """Keep at most ``max_programs`` compiled programs over the whole model (``program_units``:
    on Core ML each tier function is one): shared experts (every token) first, then the
    hottest (first) groups of each layer, layer by layer; a program that does not fit what is
    left goes (its experts to MLX) and smaller ones after it may still fit."""
    order = []  # (rank within layer, layer, layer index, program)
    for li, lp in enumerate(layers):
        order += [(-1, lp.layer, li, sp) for sp in lp.shared]
        order += [(gi, lp.layer, li, g) for gi, g in enumerate(lp.groups)]
    order.sort(key=lambda t: (t[0], t[1]))
    keep, left = set(), max_programs
    for *_, p in order:
        n = program_units(p.tiers, backend)
        if n <= left:
            keep.add(id(p))
            left -= n
    for lp in layers:
        lp.shared = [sp for sp in lp.shared if id(sp) in keep]
        dropped = [g for g in lp.groups if id(g) not in keep]
        if dropped:
            lp.groups = [g for g in lp.groups if id(g) in keep]
            lp.cold = sorted(lp.cold + [e for g in dropped for e in g.experts])
            if not lp.groups:
                lp.min_tokens = NEVER


def format_plan(plan: Plan, verbose: bool = False) -> str:
    """One line per layer; ``verbose`` lists every group with its ladder."""
    lines = [f"plan for backend {plan.backend}: {len(plan.layers)} MoE layers, {plan.num_programs} programs"]
    for lp in plan.layers:
        if not lp.groups and not lp.shared:
            lines.append(f"  layer {lp.layer}: stays on MLX")
            continue
        if verbose:
            groups = "; ".join(f"{g.experts} tiers {g.tiers}" for g in lp.groups)
            cold = f", cold {lp.cold}" if lp.cold else ""
        else:
            sizes = sorted({len(g.experts) for g in lp.groups})
            tiers = [t for g in lp.groups for t in g.tiers] or [0]
            groups = (f"{len(lp.groups)} groups of {'/'.join(map(str, sizes))} experts, "
                      f"tiers {min(tiers)}..{max(tiers)}")
            cold = f", {len(lp.cold)} cold experts on MLX" if lp.cold else ""
        shared = "".join(f"; shared expert tiers {sp.tiers} from {sp.min_tokens} tokens" for sp in lp.shared)
        lines.append(f"  layer {lp.layer}: offload from {lp.min_tokens} tokens; {groups}{cold}{shared}")
    return "\n".join(lines)
