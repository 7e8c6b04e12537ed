"""The planner's named steps (plan.py: rank_experts, cut_ranking, price_residency,
choose_residency, size_ladders), its one decision path (plan.decide, LayerPlan.offloads) and the
tier helpers they share (tiers.snap, tiers.tail_ladder): each step checked on cases small
enough to know the right answer, so a wrong decision inside plan_layer shows up here."""

from itertools import product

import numpy as np
import pytest

from npumoe_mlx.build.workloads import BATCH_SEQS
from npumoe_mlx.planning.cost import CostModel, flops_per_row
from npumoe_mlx.planning.plan import (Candidate, GroupPlan, LayerPlan, PlanLimits, Ranking, _energy_estimate, call_context,
                             choose_residency, cut_ranking, decide, energy_limit, plan_layer, price_residency,
                             rank_experts, size_ladders)
from npumoe_mlx.planning.profiles import LayerCounts
from npumoe_mlx.planning.tiers import CallContext, decide_call, ladder_rounds, snap, tail_ladder, tier_for

D, H = 64, 32
F = flops_per_row(D, H)


def _cost(**kw) -> CostModel:
    """Round numbers: a program row costs 1 s, an MLX pair 1 s (as test_tiers)."""
    base = dict(backend="onnx", dispatch_s=0.0, program_flops=F, copy_bps=1e30, sync_s=0.0, mlx_fixed_s=0.0,
                mlx_flops=F)
    base.update(kw)
    return CostModel(**base)


def _layer(calls, E=None, k=1, seq=True):
    """A layer profile from explicit per-call counts (each call its own sequence)."""
    calls = [list(map(int, c)) for c in calls]
    E = E or len(calls[0])
    chunks = [{"tokens": max(sum(c) // k, 1), "counts": c, **({"seq": i} if seq else {})} for i, c in enumerate(calls)]
    return LayerCounts(0, "p", E, k, np.sum(calls, 0).tolist(), chunks)


def _ranking(samples, caps=tuple(range(8, 4097, 8)), top=64, call=64) -> Ranking:
    """A ranking of exactly these calibrated calls (S, E) (rank_experts redraws few calls)."""
    s = np.asarray(samples, float)
    counts = s.sum(0)
    rank = sorted(range(s.shape[1]), key=lambda e: (-counts[e], e))
    return Ranking(rank, counts, s, s[:, rank], np.full(len(s), float(call)), np.asarray(caps), top)


# --- tiers.snap, tiers.tail_ladder -------------------------------------------------


def test_snap_is_the_smallest_capacity_that_holds_the_load_or_the_top():
    caps = [8, 16, 32, 64]
    assert [int(snap(caps, x)) for x in (1, 8, 9, 16, 33, 64, 65, 10_000)] == [8, 8, 16, 16, 64, 64, 64, 64]
    assert snap(caps, np.array([[0, 17], [64, 99]])).tolist() == [[8, 32], [64, 64]]
    for x in range(0, 80):  # the vectorised rule and the scalar one (tier_for) agree everywhere
        assert int(snap(caps, x)) == tier_for(x, caps)


def test_tail_ladder_steps_by_four_up_to_the_largest_call():
    caps = list(range(8, 4097, 8))
    assert tail_ladder(caps, 2048, 12) == [8, 32, 128, 512, 2048]
    assert tail_ladder(caps, 100, 12) == [8, 32, 104]  # the top snapped to a capacity >= the largest call
    assert tail_ladder(caps, 2048, 3) == [8, 32, 2048]  # at most max_tiers, the top always kept
    assert tail_ladder([32, 64, 96, 128], 8, 12) == [32]  # a call below the smallest capacity: one tier


# --- rank_experts --------------------------------------------------------------------


def test_rank_experts_hot_first_ties_by_id_and_top_is_the_largest_call():
    lp = _layer([[5, 9, 0, 9], [5, 9, 1, 9]])
    r = rank_experts(lp, PlanLimits.for_backend("onnx"), [128, 512])
    assert r.rank == [1, 3, 0, 2]  # 18, 18 (ties: lower id first), 10, 1
    assert np.array_equal(r.ranked, r.samples[:, [1, 3, 0, 2]])  # the calibrated calls, columns hot first
    assert r.top == 512
    assert rank_experts(lp, PlanLimits.for_backend("onnx", capacities=[8, 64, 256]), [128, 512]).top == 256  # capped


def test_rank_experts_gives_batched_calls_headroom_for_every_prompt():
    lp = _layer([[5, 9, 0, 9]] * 4)
    lp.chunks.append({"tokens": 64, "counts": [60, 60, 4, 4], "call": True})  # a recorded batched prefill
    r = rank_experts(lp, PlanLimits.for_backend("onnx"), [64])
    assert r.top == min(max(BATCH_SEQS) * 64, max(PlanLimits.for_backend("onnx").capacities))


# --- cut_ranking ---------------------------------------------------------------------


def _compositions(n, sizes):
    if n == 0:
        yield []
    for g in sizes:
        if g <= n:
            for rest in _compositions(n - g, sizes):
                yield [g] + rest


@pytest.mark.parametrize("dispatch_s", [0.0, 3.0, 50.0])
def test_cut_ranking_finds_the_cheapest_cut_of_every_prefix(dispatch_s):
    """The DP's cut of each prefix costs no more program time than any other cut into allowed
    group sizes (brute force over every composition)."""
    rng = np.random.default_rng(1)
    lp = _layer(rng.poisson([30, 22, 12, 9, 4, 2], size=(12, 6)))
    limits = PlanLimits.for_backend("onnx")
    cost = _cost(dispatch_s=dispatch_s)
    r = rank_experts(lp, limits, None)
    cuts = cut_ranking(r, [1, 2, 4], cost, D, H)
    for m in range(1, 7):
        runs = cuts.runs(m)
        assert runs[0][0] == 0 and runs[-1][1] == m and all(a[1] == b[0] for a, b in zip(runs, runs[1:]))
        got = sum(float(cuts.run_cost[run][0].sum()) for run in runs)
        for comp in _compositions(m, [1, 2, 4]):
            bounds = np.cumsum([0] + comp)
            other = sum(float(cuts.run_cost[(int(a), int(b))][0].sum()) for a, b in zip(bounds, bounds[1:]))
            assert got <= other + 1e-9, (m, runs, comp)
    if dispatch_s == 50.0:  # dispatch dominates: as few program calls as the sizes allow
        assert [j - i for i, j in cuts.runs(4)] == [4]


@pytest.mark.parametrize("cap", [1, 2, 3])
def test_cut_ranking_under_a_cap_is_the_cheapest_cut_with_that_many_runs(cap):
    """With ``max_runs``, each prefix's cut has at most that many runs and costs no more than
    any other such cut; a prefix the runs cannot hold gets the longest one they can."""
    rng = np.random.default_rng(2)
    lp = _layer(rng.poisson([30, 22, 12, 9, 4, 2], size=(12, 6)))
    r = rank_experts(lp, PlanLimits.for_backend("onnx"), None)
    cuts = cut_ranking(r, [1, 2, 4], _cost(dispatch_s=3.0), D, H, max_runs=cap)
    free = cut_ranking(r, [1, 2, 4], _cost(dispatch_s=3.0), D, H)
    for m in range(1, 7):
        comps = [c for c in _compositions(m, [1, 2, 4]) if len(c) <= cap]
        runs = cuts.runs(m)
        assert len(runs) <= cap and cuts.feasible(m) == bool(comps)
        if not comps:
            held = max(n for n in range(m) if any(len(c) <= cap for c in _compositions(n, [1, 2, 4])) or n == 0)
            assert runs == cuts.runs(held)
            continue
        assert runs[0][0] == 0 and runs[-1][1] == m
        got = sum(float(cuts.run_cost[run][0].sum()) for run in runs)
        for comp in comps:
            bounds = np.cumsum([0] + comp)
            other = sum(float(cuts.run_cost[(int(a), int(b))][0].sum()) for a, b in zip(bounds, bounds[1:]))
            assert got <= other + 1e-9, (m, runs, comp)
        if len(free.runs(m)) <= cap:  # the cap does not bind: the same cost as the free cut
            assert got == pytest.approx(sum(float(free.run_cost[run][0].sum()) for run in free.runs(m)))


def test_cut_ranking_prices_the_rest_on_mlx():
    r = _ranking([[8, 4, 2, 1], [6, 2, 2, 0]])
    cuts = cut_ranking(r, [1, 2], _cost(mlx_fixed_s=0.5), D, H)
    assert cuts.tail_t[:, 0].tolist() == [15.0, 10.0]  # 1 s per MLX pair
    assert cuts.tail_t[:, 2].tolist() == [3.0, 2.0] and cuts.tail_t[:, 4].tolist() == [0.0, 0.0]
    assert cuts.alone_t.tolist() == [15.5, 10.5]  # with MLX's fixed cost


# --- price_residency, choose_residency ----------------------------------------------


def test_price_residency_runs_the_two_units_at_once():
    """Four equal experts, programs as fast as MLX: two on programs, two on MLX end a call in
    half the time of either alone; the estimate says so and ranks it best."""
    r = _ranking([[16, 16, 16, 16]] * 4, caps=[8, 16, 32, 64])
    cost = _cost()
    cuts = cut_ranking(r, [1, 2, 4], cost, D, H)
    cands = [price_residency(r, cuts, m, cost, D, H, False) for m in range(5)]
    assert [c.m for c in cands] == [0, 1, 2, 3, 4]
    assert [c.time_s for c in cands] == [64.0, 48.0, 32.0, 32.0, 32.0]  # 3, 4: groups move back to MLX per call
    assert cands[2].whole_s == 32.0 and cands[0].whole_small_s == 0.0  # one call size: no smaller calls
    assert choose_residency(cands, cuts, cost, D, H) == (2, 2)  # ties: the fewest programs
    assert all(c.calls is None for c in cands)  # per-call prices are kept for the energy objective only
    assert price_residency(r, cuts, 2, cost, D, H, True).calls.balanced_s.shape == (4,)


def test_choose_residency_keeps_the_whole_group_plan_when_cut_rounds_pad_small_calls():
    """Time: the least balanced time wins unless it makes the smaller calls slower than the
    whole-group residency does; then the whole-group one is kept."""
    cuts = None  # the time objective reads the candidates only
    c0 = Candidate(0, 10.0, 0.0, 10.0, whole_s=10.0, whole_small_s=5.0)
    c1 = Candidate(1, 8.0, 0.0, 8.0, whole_s=9.0, whole_small_s=4.0)  # best balanced, and no worse on small calls
    c2 = Candidate(2, 9.0, 0.0, 9.0, whole_s=7.0, whole_small_s=4.5)  # best whole-group residency
    assert choose_residency([c0, c1, c2], cuts, _cost(), D, H) == (1, 1)
    c1.whole_small_s = 4.6  # now it pads the small calls more than c2
    assert choose_residency([c0, c1, c2], cuts, _cost(), D, H) == (2, 2)


def test_choose_residency_energy_takes_the_least_joules_within_its_bound():
    """Programs 10x cheaper per FLOP at 1.5x the time: the energy choice puts more experts on
    programs than the time choice, and its calls end within 1.2x of the fastest."""
    rng = np.random.default_rng(3)
    r = _ranking(rng.poisson([40, 30, 20, 20, 10, 10, 5, 5], size=(20, 8)))
    cost = _cost(program_flops=F / 1.5, dispatch_s=0.01, mlx_fixed_s=0.01, program_j_per_flop=0.1 / F,
                 mlx_j_per_flop=1.0 / F)
    cuts = cut_ranking(r, [1], cost, D, H)
    cands = [price_residency(r, cuts, m, cost, D, H, True) for m in range(9)]
    m_time = choose_residency(cands, cuts, cost, D, H)[0]
    for bound in ("time", "gpu"):
        m, mt = choose_residency(cands, cuts, cost, D, H, bound)
        assert mt == m_time and m >= m_time
        lim = energy_limit(cands, cuts, bound)
        est = {c.m: _energy_estimate(c, cuts, lim, cost, D, H) for c in cands}
        ref = min(c.balanced_s for c in cands) if bound == "time" else float(cuts.alone_t.mean())
        ok = [e for e in est.values() if e.time_s <= 1.2 * ref + 1e-15]
        assert est[m] in ok and est[m].energy_j == min(e.energy_j for e in ok)
    assert choose_residency(cands, cuts, cost, D, H, "gpu")[0] == 4 > m_time == 2  # MLX alone's bound: more on programs


def test_choose_residency_energy_never_leaves_its_time_bound():
    """The most frugal residency is not taken when its calls end past 1.2x the fastest: here
    m=2 spends 1 J in 8 s, m=1 5 J in 5 s, so the bound is 6 s and m=1 wins."""
    from npumoe_mlx.planning.plan import CallPrices, Cuts

    one = lambda x: np.array([float(x)])  # noqa: E731  (one calibrated call)
    cuts = Cuts([0, 0, 1], {}, np.zeros((1, 3)), np.zeros((1, 3)), one(10), one(10))
    cands = [Candidate(m, t, j, t, t, 0.0, CallPrices(one(t), one(j), one(t), one(j)))
             for m, t, j in ((0, 10, 10), (1, 5, 5), (2, 8, 1))]
    assert choose_residency(cands, cuts, _cost(), D, H, "time") == (1, 1)
    assert choose_residency(cands, cuts, _cost(), D, H, "gpu") == (2, 1)  # 1.2x MLX alone's 10 s: 8 s fits


# --- size_ladders ----------------------------------------------------------------------


def test_size_ladders_cover_the_first_m_experts_with_headroom_at_the_top():
    rng = np.random.default_rng(4)
    lp = _layer(rng.poisson([60, 40, 20, 10, 5, 2], size=(30, 6)))
    limits = PlanLimits.for_backend("onnx")
    cost = _cost(dispatch_s=2.0)
    r = rank_experts(lp, limits, [256])
    cuts = cut_ranking(r, [1, 2, 4], cost, D, H)
    for m in range(7):
        groups = size_ladders(r, cuts, m, cost, D, H, limits.max_tiers)
        assert sorted(e for g in groups for e in g.experts) == sorted(r.rank[:m])
        for g in groups:
            assert g.tiers == sorted(set(g.tiers)) and len(g.tiers) <= limits.max_tiers
            assert g.tiers[-1] == int(snap(r.caps, 256))  # headroom: the largest call never overflows
            loads = r.samples[:, g.experts].max(1)
            assert all(len(ladder_rounds([x], g.tiers)) <= 1 for x in loads)  # calibrated calls: one round
    two = size_ladders(r, cuts, 2, cost, D, H, 1)
    assert all(g.tiers == [int(snap(r.caps, 256))] for g in two)  # one tier: the headroom only


# --- the one decision path -------------------------------------------------------------


def test_offloads_is_the_one_gate():
    lp = LayerPlan(0, "p", 4, 1, D, H, [GroupPlan([0, 1], [8, 16])], [2, 3], min_tokens=32)
    assert [lp.offloads(n) for n in (1, 31, 32, 4096)] == [False, False, True, True]
    assert lp.offloads(1, released=True)  # MLX holds none of the program experts: every call
    assert not LayerPlan(0, "p", 4, 1, D, H, [], [0, 1, 2, 3], min_tokens=1).offloads(4096, released=True)


def test_decide_small_calls_use_the_tiers_below_the_ladder():
    """A call smaller than the plan was sized for covers its loads with the row counts the
    programs run below their ladders, when the caller says which; otherwise the bottom tier."""
    lp = LayerPlan(0, "p", 2, 1, D, H, [GroupPlan([0, 1], [64, 256])], [], min_tokens=1)
    counts = np.array([5, 3])
    cheap = _cost(mlx_flops=F / 100)  # MLX 100x slower: programs always pay
    plain = decide(call_context(lp, cheap), counts)
    small = decide(call_context(lp, cheap, extra_tiers=[1, 2, 4, 8, 16, 32]), counts)
    per_group = decide(call_context(lp, cheap, extra_tiers=[[1, 2, 4, 8]]), counts)
    assert [c[:r] for c, r in zip(plain.caps, plain.rounds)] == [[64]]
    assert [c[:r] for c, r in zip(small.caps, small.rounds)] == [[8]] == [c[:r] for c, r in zip(per_group.caps,
                                                                                           per_group.rounds)]
    assert lp.decide(cheap, counts, extra_tiers=[1, 2, 4, 8]).caps == small.caps  # LayerPlan.decide: the same path
    big = np.array([100, 40])  # not undersized: the ladder as planned, the extra tiers unused
    assert decide(call_context(lp, cheap, extra_tiers=[1, 2, 4, 8]), big).caps == decide(call_context(lp, cheap), big).caps


def test_decide_released_runs_every_pair_on_programs():
    """A released layer: programs even where MLX would be faster, the ladder rerun past its top,
    at every row count its programs run (drop stays drop)."""
    lp = LayerPlan(0, "p", 2, 1, D, H, [GroupPlan([0, 1], [8, 16])], [], min_tokens=1, objective="energy")
    dear = _cost(program_flops=F / 100)  # programs 100x slower than MLX
    counts = np.array([40, 5])
    assert not decide(call_context(lp, dear), counts).offload
    d = decide(call_context(lp, dear, extra_tiers=[[1, 2, 4, 8, 16, 24]]), counts, released=True)
    assert d.offload and sum(d.caps[0][: d.rounds[0]]) >= 40  # rerun: every pair served
    assert d.caps[0][: d.rounds[0]] == [24, 16]  # the programs' 24-row count too, above the ladder
    dropped = decide(call_context(lp, dear, "drop", [[1, 2, 4, 8, 16, 24]]), counts, released=True)
    assert dropped.rounds == [1]


def test_executor_replay_and_plan_decide_alike():
    """The executor's decision (its programs' small tiers) equals plan.decide's with the same
    per-group row counts, call for call: one path."""
    from npumoe_mlx.backends import Program
    from npumoe_mlx.runtime.executor import OffloadExecutor

    class _Prog(Program):
        def __init__(self, tiers):
            self.tiers = tuple(tiers)

    rng = np.random.default_rng(5)
    prof = _layer(rng.poisson([30, 20, 10, 8, 4, 2, 1, 1], size=(16, 8)))
    cost = _cost(program_flops=F / 2, dispatch_s=0.5, mlx_fixed_s=0.5)
    lp = plan_layer(prof, D, H, cost, PlanLimits.for_backend("onnx", max_group=2), call_sizes=[64])
    assert lp.groups
    progs = [_Prog([1, 2, 4, 8]) for _ in lp.groups]
    small = [sorted({t for t in p.tiers if t < g.tiers[0]} | set(g.tiers)) for p, g in zip(progs, lp.groups)]
    for ov in ("auto", "rerun", "spill"):
        ex = OffloadExecutor(lp, progs, cost, overflow=ov)
        ctx = call_context(lp, cost, ov, small)
        for counts in list(rng.poisson(3, size=(6, 8))) + list(rng.poisson(20, size=(6, 8))):
            for rel in (False, True):
                a, b = ex._decide(counts, rel), decide(ctx, counts, rel)
                assert (a.offload, a.caps, a.rounds, a.offload_s, a.offload_j) == \
                       (b.offload, b.caps, b.rounds, b.offload_s, b.offload_j)


def test_call_context_is_what_decide_call_reads():
    """decide_call on a hand-built CallContext and on a plan's context agree."""
    lp = LayerPlan(0, "p", 4, 1, D, H, [GroupPlan([0, 1], [8, 16]), GroupPlan([2], [8])], [3], min_tokens=1,
                   max_calls=3)
    ctx = CallContext([np.array([0, 1]), np.array([2])], [[8, 16], [8]], np.array([False, False, False, True]),
                      _cost(), D, H, max_calls=3)
    for counts in product([0, 5, 12], [3, 9], [0, 8], [1, 30]):
        a, b = decide_call(np.array(counts), ctx), decide(call_context(lp, _cost()), np.array(counts))
        assert (a.offload, a.caps, a.rounds, a.offload_s) == (b.offload, b.caps, b.rounds, b.offload_s)


# --- the program budget ---------------------------------------------------------------


def test_a_plan_over_the_program_budget_groups_experts_instead_of_leaving_them_on_mlx():
    """Uniform routing plans one program per expert; over the budget, the layers get fewer,
    larger groups (layer_run_caps) rather than the coldest groups' experts sent to MLX
    (_apply_budget alone), and their calibrated calls are predicted faster that way."""
    from copy import deepcopy
    from dataclasses import replace

    from conftest import zipf_layer
    from npumoe_mlx.cli.replay import replay_calls
    from npumoe_mlx.planning.plan import _apply_budget, make_plan
    from npumoe_mlx.planning.profiles import Profile
    from npumoe_mlx.runtime.experts import ExpertBlock

    E, k, L, n = 64, 8, 4, 512
    # onnx at Qwen3-30B-A3B dims as tune measured it here (the full-scale build's cost line)
    cost = CostModel("onnx", 0.022e-3, 165.4e9, 10e9, 0.14e-3, 0.06e-3, 2.3e9, expert_s=0.549e-3, overlap=0.32)
    layers = [replace(zipf_layer(E=E, k=k, calls=12, n=n, seed=l, skew=0.0), layer=l, path=f"l{l}") for l in range(L)]
    prof = Profile(None, "qwen3_moe", "uniform", 12 * n, n, layers)
    blocks = {l: ExpertBlock(l, f"l{l}", "SwitchGLU", E, k, dims=2048, hidden=768, activation="swiglu", bias=False,
                             quant=None, dtype="float32") for l in range(L)}
    free = make_plan(prof, blocks, cost, PlanLimits.for_backend("onnx"))
    assert free.num_programs == L * E  # within the default budget: a program per expert
    plan = make_plan(prof, blocks, cost, PlanLimits.for_backend("onnx", max_programs=160))
    assert plan.num_programs <= 160 and all(not lp.cold and len(lp.groups) == 40 for lp in plan.layers)
    dropped = deepcopy(free)
    _apply_budget(dropped.layers, 160, "onnx")
    assert all(len(lp.cold) == 24 for lp in dropped.layers)  # what the budget alone did

    def predicted(p):
        return sum(replay_calls(lp, cost, np.array([c["counts"] for c in lc.chunks]), n).predicted_s
                   for lp, lc in zip(p.layers, layers))

    assert predicted(plan) < 0.5 * predicted(dropped)


def test_layer_run_caps_share_the_budget_by_water_filling():
    from npumoe_mlx.planning.plan import SharedPlan, layer_run_caps

    def lp(groups, tiers=(8, 16)):
        return LayerPlan(0, "p", 64, 2, D, H, [GroupPlan([g], list(tiers)) for g in range(groups)], [])

    assert layer_run_caps([lp(10), lp(20)], 30, "onnx") == {}  # fits
    # 100 programs: layer 0 needs 10 (kept), the other two share the 90 left
    assert layer_run_caps([lp(10), lp(60), lp(80)], 100, "onnx") == {1: 45, 2: 45}
    with_shared = [lp(10), lp(60)]
    with_shared[0].shared = [SharedPlan("s", H, [8, 16], 8)] * 4  # shared experts keep theirs first
    assert layer_run_caps(with_shared, 50, "onnx") == {1: 36}
    # a budget whose shares hold no group: none capped (the hottest groups take it, _apply_budget)
    assert layer_run_caps([lp(4)] * 48, 40, "onnx") == {}
    # Core ML (a program per tier) keeps the hottest groups first
    assert layer_run_caps([lp(10), lp(60)], 100, "coreml") == {}
