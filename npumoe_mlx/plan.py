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
Deterministic: the same inputs give the same plan.
"""

import json
import sys
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ane_kernels.coreml import max_group as coreml_max_group
from ane_kernels.formats import expert_bytes as format_expert_bytes
from ane_kernels.limits import DEFAULT_LIMITS

from .atomic import write_json
from .backends import registry
from .cost import CostModel
from .experts import ExpertBlock
from .profiles import LayerCounts, Profile
from .workloads import BATCH_SEQS, GENERATION_SIZES
from .tiers import CallDecision, choose_ladder, decide_call, ladder_cover, ladder_rounds, small_ladders, undersized

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

    def decide(self, cost: CostModel, counts: np.ndarray, overflow: str = "auto",
               extra_tiers: Sequence[int] = ()) -> CallDecision:
        """The executor's decision for a call with these per-expert counts (E,). ``extra_tiers``: row
        counts the programs also run below their ladders (decode tiers; a dynamic program's grid),
        used as the executor uses them, for a call smaller than the plan was sized for."""
        cold = np.zeros(self.num_experts, bool)
        cold[list(self.cold)] = True
        groups = [np.asarray(g.experts) for g in self.groups]
        ladders = [g.tiers for g in self.groups]
        if len(extra_tiers) and undersized(np.asarray(counts), groups, ladders):
            ladders = small_ladders(ladders, extra_tiers)
        return decide_call(counts, groups, ladders, cold, cost, self.D, self.H, overflow,
                           self.objective, self.max_calls, self.energy_bound, self.slack)


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
        if d.get("format") != PLAN_FORMAT:
            raise ValueError(f"plan format {d.get('format')} is not {PLAN_FORMAT}")
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
    (``workloads.GENERATION_SIZES``)."""
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
    and whose MLX side costs tm (S,) s / jm J (fixed costs added here, and ``finish`` (S,) s,
    the host passes over an offloaded call's pairs: ``CostModel.finish_s``), both at once."""
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
) -> LayerPlan:
    """Groups = a cut of the popularity ranking into runs of 1, 2, 4, ... experts.

    Experts are ranked by calibrated popularity; a DP over the ranking picks, for
    every prefix, the cut with the least program time (runs of similar load pad
    little: hot experts tend to get small groups, lukewarm ones larger groups, as
    dispatch and padding costs dictate). Programs and MLX run at the same time, so the plan takes the prefix
    whose calls finish soonest (sync + max of the two sides), or with
    ``objective="energy"`` spend the least energy within 1.2x of that: the estimate moves
    whole groups, the calls pack rounds, so a few larger residencies are checked on
    calibrated calls (``_energy_residency``).
    """
    E = lp_profile.num_experts
    k = lp_profile.top_k or 1
    counts = np.asarray(lp_profile.counts, float)
    rank = sorted(range(E), key=lambda e: (-counts[e], e))  # hot first, ties by id
    samples, call = call_loads(lp_profile, call_sizes)  # (S, E), (S,)
    ranked = samples[:, rank]
    caps = np.asarray(limits.capacities)
    max_g = group_cap(E, D, H, quant, limits)
    if max_g == 0:  # no program of this shape builds
        return LayerPlan(lp_profile.layer, path or lp_profile.path, E, k, D, H, [], list(range(E)))
    sizes = sorted({g for g in (1, 2, 4, 8, 16, 32, 64, 128, max_g) if g <= max_g})
    # Headroom: no expert gets more pairs than a call has tokens, so a top tier at the
    # largest call size never overflows on calls of that size, whatever the domain.
    top = max(call_sizes) if call_sizes else call.max()
    if any(ch.get("call") for ch in lp_profile.chunks):  # batched prefill: up to BATCH_SEQS prompts of a step
        top = max(top, call.max(), max(BATCH_SEQS) * top)  # each (pad tokens of one id may load one expert)
    top = int(min(top, caps[-1]))

    # best[j]: the least program time of the ranking's first j experts, cut into runs
    best = np.full(E + 1, np.inf)
    best[0] = 0.0
    choice = [0] * (E + 1)  # start of the last run
    run_cost = {}  # (i, j) -> (t_prog, t_mlx, j_prog, j_mlx), each (S,)
    for j in range(1, E + 1):
        for G in sizes:
            i = j - G
            if i < 0:
                break
            run_cost[(i, j)] = _group_costs(ranked[:, i:j], caps, cost, D, H)
            c = best[i] + float(run_cost[(i, j)][0].sum())
            if c < best[j] - 1e-15:
                best[j], choice[j] = c, i

    def runs_of(m):  # the best cut of the first m experts
        out, j = [], m
        while j > 0:
            out.append((choice[j], j))
            j = choice[j]
        return out[::-1]

    # The first m experts of the ranking on programs, the rest on MLX, both at once:
    # m for the least makespan, or the least energy within 1.2x of it.
    pair_s, pair_j = cost.mlx_rate(D, H)
    mlx_t, mlx_j = ranked * pair_s, ranked * pair_j  # (S, E) seconds and joules per expert on MLX
    tail_t = np.concatenate([np.cumsum(mlx_t[:, ::-1], 1)[:, ::-1], np.zeros((len(ranked), 1))], 1)  # (S, E+1)
    tail_j = np.concatenate([np.cumsum(mlx_j[:, ::-1], 1)[:, ::-1], np.zeros((len(ranked), 1))], 1)
    alone_t, alone_j = split_cost(np.zeros(len(ranked)), tail_t[:, 0], np.zeros(len(ranked)), tail_j[:, 0], cost)
    fin = cost.finish_s(ranked.sum(1), D)  # (S,) an offloaded call's host passes over its pairs
    energy = objective == "energy" and cost.has_energy
    cands = []  # (m, mean makespan, mean energy, mean makespan of the time-balanced calls[, whole groups only,
    #           and on the smaller calls])
    small = call < call.max()
    pending = []  # energy: per residency, what its calls can do; evaluated against the fastest of all
    tcands = []  # the time objective's candidates (energy: its plan is what the time bound is relative to)
    for m in range(E + 1):
        runs = runs_of(m)
        tp, tm, jp, jm = _run_costs(runs, run_cost, len(ranked))  # (S, R) each
        st_t, st_j = split_cost(tp.sum(1), tail_t[:, m], jp.sum(1), tail_j[:, m], cost, fin)  # the plan as it is
        # Each call moves its worst-used groups to MLX while that ends it sooner (decide_call):
        # try moving the k worst (by calibrated seconds per MLX second), per sample the best k.
        worst = np.argsort(-(tp.sum(0) / np.maximum(tm.sum(0), 1e-30)), kind="stable")
        z = np.zeros((len(ranked), 1))
        ctp, ctm, cjp, cjm = (np.concatenate([z, np.cumsum(a[:, worst], 1)], 1) for a in (tp, tm, jp, jm))
        prog = tp.sum(1, keepdims=True) - ctp  # (S, R+1)
        side = tail_t[:, m : m + 1] + ctm
        span = cost.call_s(prog, side, idle=1e-15, finish_s=fin[:, None])
        kb = span.argmin(1)
        rows = np.arange(len(ranked))
        whole_t = np.minimum(span[rows, kb], alone_t)  # whole groups only
        cut = None  # energy: the last run's round cut to the most pairs that end within the time bound
        if runs:  # the last run may also run one smaller round (decide_call's take-back): the two units
            # balance between whole groups
            i, j = runs[-1]

            def cut_round(limit=None, runs=runs, tp=tp, m=m, i=i, j=j):
                c, t_c = _partial_last(runs, tp, tail_t[:, m], ranked, caps, cost, D, H, limit)
                back = np.maximum(ranked[:, i:j] - c[:, None], 0).sum(1)  # its pairs past the round, on MLX
                return t_c, cost.programs_j(j - i, 1, c, D, H) * (c > 0), back

            part_t, part_j, back = cut_round()
            kb = np.where(part_t < span[rows, kb], span.shape[1], kb)
            span = np.concatenate([span, part_t[:, None]], 1)
            cjp = np.concatenate([cjp, (jp[:, -1] - part_j)[:, None]], 1)
            cjm = np.concatenate([cjm, cost.mlx_work_j(back, D, H)[:, None]], 1)
            side = np.concatenate([side, (tail_t[:, m] + cost.mlx_work_s(back, D, H))[:, None]], 1)
            if energy:
                cut = cut_round
        tb_t = np.minimum(span[rows, kb], alone_t)
        tb_j = np.where(span[rows, kb] < alone_t,
                        cost.call_j(jp.sum(1) - cjp[rows, kb] + tail_j[:, m], cjm[rows, kb], side[rows, kb]), alone_j)
        tcands.append((m, float(tb_t.mean()), float(tb_j.mean()), float(tb_t.mean()), float(whole_t.mean()),
                       float(whole_t[small].mean()) if small.any() else 0.0))
        if not energy:
            continue
        pending.append((m, st_t, st_j, tb_t, tb_j, cut, jp.sum(1) - (jp[:, -1] if runs else 0), tail_j[:, m],
                        tail_t[:, m]))
    # energy, per call as decide_call: the least energy of (as planned, balanced just enough to end
    # within the bound (interpolated), fully balanced, MLX alone, the last run's round cut to the
    # most pairs within the bound) within the bound: 1.2x the least time any residency gives that
    # call (``energy_bound="time"``), or 1.2x MLX alone's
    if pending:
        fastest = np.min([p[3] for p in pending], 0)
    for m, st_t, st_j, tb_t, tb_j, cut, j_rest, t_j, t_t in pending:
        rows = np.arange(len(ranked))
        lim = 1.2 * (np.minimum(fastest, alone_t) if energy_bound == "time" else alone_t)
        frac = np.clip((st_t - lim) / np.maximum(st_t - tb_t, 1e-30), 0, 1)
        part_t, part_j = np.where(st_t > lim, np.maximum(lim, tb_t), st_t), st_j + frac * (tb_j - st_j)
        opts_t, opts_j = [st_t, part_t, tb_t, alone_t], [st_j, part_j, tb_j, alone_j]
        if cut is not None:
            c_t, c_j, back = cut(lim)
            opts_t.append(c_t)
            opts_j.append(cost.call_j(j_rest + c_j + t_j, cost.mlx_work_j(back, D, H), t_t + back))
        opts_t, opts_j = np.stack(opts_t), np.stack(opts_j)  # (4 or 5, S)
        j_ok = np.where(opts_t <= lim + 1e-15, opts_j, np.inf)
        pick = np.where(np.isfinite(j_ok).any(0), j_ok.argmin(0), opts_t.argmin(0))
        cands.append((m, float(opts_t[pick, rows].mean()), float(opts_j[pick, rows].mean()), float(tb_t.mean())))
    # time: the residency that balances the largest calls with a cut round, unless it predicts smaller
    # calls slower than the whole-group residency does (their extra groups would pad them)
    m0, m1 = min(tcands, key=lambda c: c[4]), min(tcands, key=lambda c: c[1])
    m_time = (m1 if m1[5] <= m0[5] else m0)[0]
    m = m_time
    if energy:
        best_t = min(c[3] for c in cands)
        bound = 1.2 * (best_t if energy_bound == "time" else float(alone_t.mean())) + 1e-15
        m = min((c for c in cands if c[1] <= bound), key=lambda c: (c[2], c[1]), default=cands[0])[0]

    def resident_groups(m, energy=energy):  # the first m experts of the ranking cut into runs, each with its ladder
        groups = []
        runs = runs_of(m)
        balance = np.zeros(0)
        if runs:  # the calls where the last run ends them soonest (energy: does most within its time bound)
            # partly on programs: size tiers for those rounds
            tp = _run_costs(runs, run_cost, len(ranked))[0]
            limit = None
            if energy:
                limit = 1.2 * (np.minimum(fastest, alone_t) if energy_bound == "time" else alone_t)
            part_c, part_t = _partial_last(runs, tp, tail_t[:, m], ranked, caps, cost, D, H)
            balance = part_c[(part_t < np.inf) & (part_c > 0)]
            if limit is not None:  # and the time-optimal cuts: the plan's fastest, which the bound is relative to
                part_c, part_t = _partial_last(runs, tp, tail_t[:, m], ranked, caps, cost, D, H, limit)
                balance = np.concatenate([balance, part_c[(part_t < np.inf) & (part_c > 0)]])
        for i, j in runs:  # hottest run first
            if ranked[:, i:j].max() > 0:
                peaks = _spread(ranked[:, i:j].max(1), top)
                if (i, j) == runs[-1] and balance.size:
                    peaks = np.concatenate([peaks, _spread(balance, top)])
                tiers = choose_ladder(peaks, limits.capacities, limits.max_tiers, None, top)
                groups.append(GroupPlan(sorted(rank[i:j]), tiers))
        return groups

    groups = resident_groups(m)
    if energy:  # the estimates above move whole groups; the calls pack rounds (tiers._pack_energy), which
        # can use more resident experts: check a few residencies on the calls themselves
        groups, slack = _energy_residency(m, int((counts > 0).sum()), groups, resident_groups,
                                          resident_groups(m_time, False), samples, E, k, D, H, cost, limits,
                                          energy_bound)
    resident = {e for g in groups for e in g.experts}
    groups += tail_groups([e for e in rank if e not in resident and counts[e] == 0], cost, D, H, limits, sizes, top)
    resident = {e for g in groups for e in g.experts}
    cold = [e for e in range(E) if e not in resident]
    lp = LayerPlan(lp_profile.layer, path or lp_profile.path, E, k, D, H, groups, sorted(cold),
                   objective=objective, energy_bound=energy_bound, slack=slack if energy else 1.2)
    lp.max_calls = int(limits.call_ratio * len(groups) + 1e-9)
    lp.min_tokens = _min_tokens(lp, cost, counts)
    if lp.min_tokens == NEVER:
        lp.groups, lp.cold = [], list(range(E))
    return lp


ENERGY_PROBES = 32  # calibrated calls _energy_residency replays per candidate residency
ENERGY_PARTS = 8  # parts of them whose least time ratio sets the energy plan's slack


def _energy_residency(m: int, seen: int, groups: List[GroupPlan], resident_groups, time_groups: List[GroupPlan],
                      samples: np.ndarray, E: int, k: int, D: int, H: int, cost: CostModel, limits: PlanLimits,
                      energy_bound: str):
    """The energy objective's residency and per-call slack, checked on calibrated calls (samples
    (S, E)) through the executor's own decisions: the estimated best ``m`` experts on programs, and
    more, up to all ``seen`` (calibrated) ones. Each call packs the rounds that spend least within
    its time bound (``tiers._pack_energy``), so a resident group costs nothing on calls it would not
    pay on, and more resident experts give the packing more ways to fill the frugal unit's time.

    A call's bound is slack x the fastest this plan's own decisions give it; with
    ``energy_bound="time"`` the target is 1.2x the time objective's plan (``time_groups``), whose
    calls may end sooner, so each candidate's slack is 1.2 x (the time plan's time / its own
    fastest time), the least of that ratio over ENERGY_PARTS parts of the probe, at most 1.2.
    The least mean joules wins; ties within 0.1% keep fewer programs. Returns (groups, slack)."""
    probe = samples[np.linspace(0, len(samples) - 1, min(ENERGY_PROBES, len(samples))).round().astype(int)]

    def layer(gs, objective, slack=1.2):
        ids = {e for g in gs for e in g.experts}
        return LayerPlan(0, "", E, k, D, H, gs, [e for e in range(E) if e not in ids], objective=objective,
                         energy_bound=energy_bound, max_calls=int(limits.call_ratio * len(gs) + 1e-9), slack=slack)

    def part_s(lp):  # seconds of these calls as the executor runs them, summed per part of the probe
        s = [d.offload_s if d.offload else d.mlx_only_s for d in (lp.decide(cost, c) for c in probe)]
        return np.array([p.sum() for p in np.array_split(np.asarray(s), ENERGY_PARTS)])

    ref = part_s(layer(time_groups, "time"))
    tried = []  # (joules, programs, groups, slack)
    for cand in [m] + sorted({m + (seen - m) * q // 4 for q in (1, 2, 3, 4)} - {m}):
        gs = groups if cand == m else resident_groups(cand)
        # the least ratio over parts of the calibration, not the mean: calls the plan never saw
        # drift (the mean alone let 4 of 112 held-out chip replays end at 1.200-1.217x)
        slack = 1.2 * min(1.0, float((ref / part_s(layer(gs, "time"))).min())) if energy_bound == "time" else 1.2
        ds = [layer(gs, "energy", slack).decide(cost, c) for c in probe]
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
    to MLX, as ``decide_call`` says per call).
    """
    if not unseen:
        return []
    caps = np.asarray(limits.capacities)
    on_mlx = (1.0 - cost.overlap) * cost.mlx_s(1, D, H)
    fits = [G for G in sizes if cost.program_s(G, int(caps[0]), D, H) < on_mlx]
    if not fits:
        return []
    G = max(fits)
    ladder, c = [], int(caps[0])
    while c < top and len(ladder) < limits.max_tiers - 1:
        ladder.append(int(caps[min(np.searchsorted(caps, c), caps.size - 1)]))
        c *= 4
    ladder = sorted(set(ladder + [int(caps[min(np.searchsorted(caps, top), caps.size - 1)])]))
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
    log = log or (lambda m: print(f"[npumoe] {m}", file=sys.stderr))
    layers = []
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
    _apply_budget(layers, limits.max_programs, limits.backend)
    return Plan(limits.backend, limits, layers)


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


def _print_resident(plan: Plan, cost: CostModel, local, keep: bool, model=None, blocks=None) -> None:
    """Resident bytes per unit (MLX, programs), in all and per layer (the model read lazily: shapes only)."""
    from mlx_lm import utils as mlx_utils

    from . import experts
    from .residency import default_memory_budget, describe, plan_resident, size

    if model is None:
        model, _, config = mlx_utils.load(str(local), lazy=True, return_config=True)
        blocks = {b.layer: b for b in experts.find_expert_blocks(model, config) if b.supported}
    res = plan_resident(plan, model, blocks, cost, keep_mlx_experts=keep, budget=default_memory_budget())
    print(describe(res))
    for layer, u in sorted(res["units"].items()):
        print(f"  layer {layer}: MLX {size(u['mlx'])}, programs {size(u['programs'])}; MLX copy of program experts "
              f"{u['mlx_copy']}")


def main(argv=None) -> int:
    """`npumoe plan`: the plan for a model from its profile (calibrated now if none given)."""
    import argparse
    import os

    from mlx_lm import utils as mlx_utils

    from . import experts
    from .calibrate import calibrate
    from .workloads import corpus_documents

    p = argparse.ArgumentParser(prog="npumoe plan", description="Print the offload plan of a model.")
    p.add_argument("--model", required=True)
    p.add_argument("--backend", choices=registry.names(bundles=True), default=registry.DEFAULT)
    p.add_argument("--profile", help="Profile JSON (default: <model>/npumoe-profile.json, else calibrate now).")
    p.add_argument("--from-stats", metavar="FILE",
                   help="Plan for the per-call loads `npumoe generate --stats FILE` saved (your own workload).")
    p.add_argument("--cost", help="Cost model JSON (default: the backend's parametric costs).")
    p.add_argument("--chip", help="Plan with the predicted costs of this Apple chip (coreml; see `npumoe chips`).")
    p.add_argument("--objective", choices=("time", "energy"), default="time")
    p.add_argument("--tokens", type=int, default=2048, help="Calibration tokens when calibrating now.")
    p.add_argument("--json", metavar="PATH", help="Also write the plan as JSON.")
    p.add_argument("--bundle", help="Bundle whose plan to print (default: the model's, as generate finds it).")
    p.add_argument("--keep-mlx-experts", action="store_true",
                   help="Count MLX's copy of program-only experts as kept (as generate --keep-mlx-experts).")
    p.add_argument("--corpus", nargs="+", action="extend", metavar="NAME_OR_FILE",
                   help="With --from-stats: calibration corpora, as `npumoe build --corpus` (default: the three built-ins).")
    p.add_argument("--chunk-size", type=int, default=2048, help="With --from-stats: as `npumoe build --chunk-size`.")
    for flag in ("--max-tiers", "--max-group", "--max-programs", "--max-capacity"):
        p.add_argument(flag, type=int, help=f"With --from-stats: as `npumoe build {flag}`.")
    args = p.parse_args(argv)
    from . import bundle as bundles
    from .args import at_least, choose_cost
    from .checks import resolve_model
    from .outputs import check_file

    if args.json:
        check_file(args.json, "--json")

    at_least("--tokens", args.tokens, 1, "calibration tokens")
    local = resolve_model(args.model)
    found = bundles.locate_bundle(local, args.backend, args.bundle)
    if args.from_stats:
        return _preview_from_stats(args, local, found)
    if (found / "manifest.json").exists() and not (args.profile or args.cost or args.chip):
        b = bundles.read(found, local, args.model)
        plan = b.plan  # the plan generate runs
        print(f"plan of the {args.backend} bundle {found} (the one generate uses):")
        print(format_plan(plan, verbose=True))
        _print_resident(plan, b.cost, local, args.keep_mlx_experts)
        if args.json:
            plan.save(args.json)
            print(f"wrote {args.json}")
        return 0
    if args.bundle:
        raise ValueError(f"{found}: not an npumoe bundle (no manifest.json)")
    why = (f"not the plan of the {args.backend} bundle {found}" if (found / "manifest.json").exists()
           else f"no {args.backend} bundle for {args.model}")
    print(f"{why}: computing a plan from "
          f"{'the profile ' + args.profile if args.profile else 'a calibration'} and "
          f"{'the costs in ' + args.cost if args.cost else 'parametric costs'} (`npumoe build` measures "
          f"this machine's costs, so its plan may differ)")
    model, tokenizer, config = mlx_utils.load(str(local), return_config=True)
    blocks = {b.layer: b for b in experts.find_expert_blocks(model, config) if b.supported}
    if not blocks:
        raise ValueError(f"{args.model}: no supported MoE expert blocks; it runs on stock MLX")
    prof_path = args.profile or os.path.join(local, "npumoe-profile.json")
    if os.path.exists(prof_path):
        profile = Profile.load(prof_path)
    else:
        docs, desc = corpus_documents(["long-context", "qa", "code"], args.tokens, 0)
        profile = calibrate(model, tokenizer, config, docs, max_tokens=args.tokens, model_path=local, description=desc)
    b0 = next(iter(blocks.values()))
    cost = choose_cost(args.backend, args.cost, args.chip, D=b0.dims, H=b0.hidden, bits=(b0.quant or {}).get("bits", 16))
    routed = {l: replace(b, shared=[]) for l, b in blocks.items()}  # routed experts only (build also plans shared ones)
    plan = make_plan(profile, routed, cost, PlanLimits.for_backend(args.backend), objective=args.objective)
    return _show(plan, cost, local, args, model, blocks)


def _show(plan, cost, local, args, model, blocks) -> int:
    print(format_plan(plan, verbose=True))
    _print_resident(plan, cost, local, args.keep_mlx_experts, model, blocks)
    if args.json:
        plan.save(args.json)
        print(f"wrote {args.json}")
    return 0


def _preview_from_stats(args, local, found) -> int:
    """`plan --from-stats`: what `build --from-stats` builds, by the same path (build.plan_model)
    with the same inputs: its calibration, the saved workload, the bundle's costs, the flags' limits."""
    from mlx_lm import utils as mlx_utils

    from . import experts
    from .args import limits_from_flags, load_cost
    from .build import plan_model, workload_cost
    from .backends.registry import default_cost

    workload = Profile.load(args.from_stats)  # a bad file fails before the model loads
    limits = limits_from_flags(args.backend, args.max_tiers, args.max_group, args.max_programs, args.max_capacity)
    cost, costs = (load_cost(args.cost), f"the costs in {args.cost}") if args.cost else (None, f"--chip {args.chip}")
    if cost is None and not args.chip:
        cost, costs = workload_cost(found), f"the costs of the bundle {found}"
        if cost is None:
            cost, costs = default_cost(args.backend), "parametric costs"
            print(f"note: no {args.backend} bundle with costs at {found}: `npumoe build --from-stats` would measure "
                  f"this machine's costs first, so its plan may differ from this one")
    model, tokenizer, config = mlx_utils.load(str(local), return_config=True)
    blocks = {b.layer: b for b in experts.find_expert_blocks(model, config) if b.supported}
    if not blocks:
        raise ValueError(f"{args.model}: no supported MoE expert blocks; it runs on stock MLX")
    _, cost, plan = plan_model(model, tokenizer, config, blocks, args.backend, corpus=args.corpus or
                               ("long-context", "qa", "code"), tokens=args.tokens, chunk_size=args.chunk_size,
                               cost=cost, chip=args.chip, tune=False, objective=args.objective, limits=limits,
                               workload=workload, log=lambda m: None)
    print(f"plan for the workload saved in {args.from_stats}, as `npumoe build --model {args.model} --from-stats "
          f"{args.from_stats}` builds it (calibration + that workload, {costs}):")
    return _show(plan, cost, local, args, model, blocks)
