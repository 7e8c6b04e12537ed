"""Tier rule, per-call decisions and planner decisions: each test fails if its decision is wrong."""

from dataclasses import replace

import numpy as np
import pytest

from npumoe_mlx.backends.registry import chip_cost, default_cost
from npumoe_mlx.planning.cost import CostModel, flops_per_row
from npumoe_mlx.planning.plan import NEVER, GroupPlan, LayerPlan, PlanLimits, make_plan, plan_layer
from npumoe_mlx.planning.profiles import LayerCounts, Profile
from npumoe_mlx.planning.tiers import CallContext, choose_ladder, decide_call, ladder_cover, ladder_rounds, plan_slots, tier_for
from npumoe_mlx.runtime.experts import ExpertBlock

from conftest import zipf_layer

D, H = 64, 32
F = flops_per_row(D, H)


def _cost(**kw) -> CostModel:
    """Round numbers: a program row costs row_s, MLX a pair F/mlx_flops."""
    base = dict(backend="onnx", dispatch_s=0.0, program_flops=F, copy_bps=1e30, sync_s=0.0,
                mlx_fixed_s=0.0, mlx_flops=F)  # 1 s per program row, 1 s per MLX pair
    base.update(kw)
    return CostModel(**base)


def test_one_rule_scalar_and_vectorised():
    tiers = [8, 24, 64]
    assert [tier_for(x, tiers) for x in (1, 8, 9, 64, 65, 500)] == [8, 8, 24, 64, 64, 64]
    assert ladder_rounds(np.array([150, 3]), tiers) == [64, 64, 24]  # top tier twice, then the rest
    rng = np.random.default_rng(0)
    peaks = rng.integers(0, 300, 200)
    rounds, rows = ladder_cover(peaks, tiers)
    for p, r, n in zip(peaks, rounds, rows):
        caps = ladder_rounds(np.array([p]), tiers)
        assert (len(caps), sum(caps)) == (r, n)


def test_ladder_top_is_headroom_for_the_largest_call():
    samples = np.array([10, 12, 30, 31, 60])
    t = choose_ladder(samples, list(range(8, 4097, 8)), 3, None, top=2048)
    assert t[-1] == 2048 and len(t) <= 3
    assert choose_ladder(samples, list(range(8, 4097, 8)), 3)[-1] == 64  # no headroom asked: the largest sample


def test_sides_overlap_not_summed():
    """Programs 10 s, MLX side 9 s, MLX alone 15 s: offload (max 10 < 15); a sum (19) would not."""
    cost = _cost()
    counts = np.array([10, 9, 0, 0])  # expert 0 resident (tier 10), expert 1 cold
    cold = np.array([False, True, True, True])
    d = decide_call(counts, CallContext([np.array([0])], [[10]], cold, cost, D, H))
    assert (d.program_s, d.mlx_side_s, d.mlx_only_s) == pytest.approx((10, 9, 19))
    assert d.offload and d.offload_s == pytest.approx(10)


def test_overflow_modes_and_auto_rounds():
    counts = np.array([30, 0])
    cold = np.array([False, True])
    g, t = [np.array([0])], [[8]]
    cheap = _cost(program_flops=2 * F)  # a program row costs half an MLX pair: rerunning 8-row rounds pays
    assert decide_call(counts, CallContext(g, t, cold, cheap, D, H, "rerun")).rounds == [4]
    assert decide_call(counts, CallContext(g, t, cold, cheap, D, H, "spill")).rounds == [1]
    assert decide_call(counts, CallContext(g, t, cold, cheap, D, H, "auto")).rounds == [4]
    dear = _cost(program_flops=2 * F, dispatch_s=10.0)  # 3 extra rounds (42 s) cost more than 22 pairs on MLX
    d = decide_call(counts, CallContext(g, t, cold, dear, D, H, "auto"))
    assert d.rounds == [1] and d.offload and d.mlx_side_s == pytest.approx(22)


def test_two_tier_cover_within_call_budget():
    counts = np.array([300, 0, 0])
    cold = np.array([False, True, True])
    g, t = [np.array([0])], [[64, 256, 512]]
    fast = _cost(program_flops=2 * F)  # "rerun": every pair on programs (no rebalancing with MLX)
    assert decide_call(counts, CallContext(g, t, cold, fast, D, H, "rerun")).caps == [[512]]  # no budget: next tier up
    d = decide_call(counts, CallContext(g, t, cold, fast, D, H, "rerun", max_calls=2))
    assert d.caps == [[256, 64]] and d.rounds == [2]
    assert decide_call(counts, CallContext(g, t, cold, _cost(dispatch_s=1e6), D, H, "rerun", max_calls=2)).caps == [[512]]  # does not pay
    # slots follow the decision: 320 rows, every pair placed once
    order = np.arange(300)
    s = plan_slots(order, counts, 1, g, t, caps=[c[:r] for c, r in zip(d.caps, d.rounds)])
    assert (s.slots, s.padded, len(s.calls)) == (320, 20, 2) and (s.loc >= 0).all()


def test_rebalance_moves_worst_groups_to_mlx_when_programs_finish_last():
    """Group 1 pads 1 pair to 64 rows: on MLX it costs 1 s instead of 32 s (rows at 0.5 s)."""
    counts = np.array([60, 1, 0])
    cold = np.array([False, False, True])
    d = decide_call(counts, CallContext([np.array([0]), np.array([1])], [[64], [64]], cold, _cost(program_flops=2 * F), D, H))
    assert d.rounds == [1, 0] and d.offload
    assert d.program_s == pytest.approx(32) and d.mlx_side_s == pytest.approx(1)


def test_rebalance_trims_a_busy_group_to_a_smaller_tier():
    """One group, programs twice MLX's speed: 300 pairs at tier 512 take 256 s; cut to its
    256 tier (128 s) the other 44 pairs finish on MLX meanwhile (44 s): the call ends at 128 s."""
    counts = np.array([300, 0])
    cold = np.array([False, True])
    d = decide_call(counts, CallContext([np.array([0])], [[64, 256, 512]], cold, _cost(program_flops=2 * F), D, H))
    assert d.caps == [[256]] and d.rounds == [1]
    assert (d.program_s, d.mlx_side_s) == pytest.approx((128, 44))
    # a resident group with no pair this call is left alone
    counts = np.array([300, 0, 0])
    d = decide_call(counts, CallContext([np.array([0]), np.array([1])], [[64, 256, 512], [64]], np.array([False, False, True]),
                    _cost(program_flops=2 * F), D, H))
    assert d.caps[0] == [256] and d.caps[1] == []


def test_padded_round_cut_when_mlx_finishes_last():
    """Expert 0 (tiers 8/16) has 9 pairs, cold expert 1 has 30: MLX ends the call (1 s fixed
    + 30 s) and the 16-row round pads 7 rows for free. Cut to 8 rows, its 9th pair makes MLX
    end 1 s later: taken when that is within MLX's fixed cost (1 s), not when it is 0.5 s,
    and not when the 8 padded rows cost less energy than the pair on MLX."""
    counts = np.array([9, 30])
    cold = np.array([False, True])
    g, t = [np.array([0])], [[8, 16]]
    d = decide_call(counts, CallContext(g, t, cold, _cost(mlx_fixed_s=1.0), D, H))
    assert d.caps == [[8]] and d.rounds == [1] and d.offload
    assert (d.program_s, d.mlx_side_s) == pytest.approx((8, 32))
    s = plan_slots(np.arange(39), counts, 1, g, t, caps=[c[:r] for c, r in zip(d.caps, d.rounds)])
    assert (s.slots, s.padded) == (8, 0) and (s.loc >= 0).sum() == 8  # the 9th pair runs on MLX
    d = decide_call(counts, CallContext(g, t, cold, _cost(mlx_fixed_s=0.5), D, H))
    assert d.caps == [[16]] and (d.program_s, d.mlx_side_s) == pytest.approx((16, 30.5))
    assert decide_call(counts, CallContext(g, t, cold, _cost(mlx_fixed_s=1.0), D, H, "rerun")).caps == [[16]]
    # energy: 8 rows at 0.1 J save less than 1 pair on MLX costs (1 J); at 0.2 J they save more
    frugal = _cost(mlx_fixed_s=1.0, program_j_per_flop=0.1 / F, mlx_j_per_flop=1.0 / F)
    assert decide_call(counts, CallContext(g, t, cold, frugal, D, H)).caps == [[16]]
    assert decide_call(counts, CallContext(g, t, cold, _cost(mlx_fixed_s=1.0, program_j_per_flop=0.2 / F,
                                                   mlx_j_per_flop=1.0 / F), D, H)).caps == [[8]]


def test_energy_objective_decides_on_joules():
    """Programs slower (11 s vs MLX alone 10 s) but 10x more frugal: energy offloads (within
    1.2x of the least time), time does not; 20 s would be past 1.2x: MLX alone."""
    cost = _cost(program_flops=F / 1.1, mlx_flops=F, program_j_per_flop=0.1 / F, mlx_j_per_flop=1.0 / F)
    counts = np.array([10, 0])
    cold = np.array([False, True])
    g, t = [np.array([0])], [[10]]
    assert not decide_call(counts, CallContext(g, t, cold, cost, D, H, objective="time")).offload
    e = decide_call(counts, CallContext(g, t, cold, cost, D, H, objective="energy"))
    assert e.offload and e.offload_j == pytest.approx(1.0) and e.mlx_only_j == pytest.approx(10.0)
    assert e.offload_s == pytest.approx(11.0)
    slow = _cost(program_flops=F / 2, mlx_flops=F, program_j_per_flop=0.1 / F, mlx_j_per_flop=1.0 / F)
    assert not decide_call(counts, CallContext(g, t, cold, slow, D, H, objective="energy")).offload


def _block(layer, D, H, E=8, k=2):
    """An expert block's description: the shapes the planner reads."""
    return ExpertBlock(layer, f"p{layer}", "SwitchGLU", E, k, D, H, "swiglu", False, None, "float32")


def test_concurrent_partition_uses_a_slower_unit():
    """Programs at half MLX's speed: "only where they beat MLX" keeps everything on MLX;
    running both at once puts about a third of the work on programs and shortens the call."""
    cost = _cost(program_flops=F / 2, dispatch_s=0.01, mlx_fixed_s=0.01)
    lp = plan_layer(zipf_layer(), D, H, cost, PlanLimits.for_backend("onnx", max_group=1), call_sizes=[128])
    assert lp.groups and lp.cold, (lp.groups, lp.cold)
    share = sum(np.asarray(zipf_layer().counts)[g.experts].sum() for g in lp.groups) / sum(zipf_layer().counts)
    assert 0.15 < share < 0.5, share
    counts = np.asarray(zipf_layer(seed=1).chunks[0]["counts"])
    p = lp.predicted(cost, 128, counts)
    assert p["offload_s"] < 0.85 * p["mlx_s"]


def test_energy_plan_puts_more_on_the_frugal_unit_within_its_time_bound():
    """Programs 1.5x slower but 10x cheaper per FLOP: the energy plan spends less energy than
    the time plan, within 1.2x of its time (or, energy_bound="gpu", of MLX alone's time, with
    more experts resident)."""
    cost = _cost(program_flops=F / 1.5, dispatch_s=0.01, mlx_fixed_s=0.01,
                 program_j_per_flop=0.1 / F, mlx_j_per_flop=1.0 / F)
    prof = zipf_layer(E=16, calls=60)
    lim = PlanLimits.for_backend("onnx", max_group=1)
    res = {}
    for obj, bound in (("time", "time"), ("energy", "time"), ("energy", "gpu")):
        lp = plan_layer(prof, D, H, cost, lim, call_sizes=[128], objective=obj, energy_bound=bound)
        ds = [lp.decide(cost, np.asarray(c["counts"])) for c in zipf_layer(E=16, calls=20, seed=5).chunks]
        res[obj, bound] = (len(lp.cold), np.mean([d.offload_s if d.offload else d.mlx_only_s for d in ds]),
                           np.mean([d.offload_j if d.offload else d.mlx_only_j for d in ds]),
                           np.mean([d.mlx_only_s for d in ds]))
    (cold_t, t_t, j_t, gpu), (cold_e, t_e, j_e, _), (cold_g, t_g, j_g, _) = res.values()
    assert t_t < 0.7 * gpu, res  # the two units at once beat MLX alone
    assert j_e < 0.98 * j_t and t_e <= 1.2 * t_t, res  # a tight bound leaves little room ...
    assert cold_g < cold_t and j_g < 0.7 * j_t and t_g <= 1.2 * gpu, res  # ... 1.2x of MLX alone leaves more


def test_program_budget_is_respected_hottest_first():
    prof = Profile(None, "", "", 0, 128, [replace(zipf_layer(E=8), layer=l) for l in range(3)])
    shapes = {l: _block(l, D, H) for l in range(3)}
    eager = CostModel("onnx", 1e-9, 1e15, 1e15, 0.0, 1.0, 1.0, first_offload_tokens=1)
    lim = PlanLimits.for_backend("onnx", max_group=1, max_programs=4)
    plan = make_plan(prof, shapes, eager, lim)
    assert plan.num_programs == 4
    free = make_plan(prof, shapes, eager, PlanLimits.for_backend("onnx", max_group=1))
    assert free.num_programs > 4
    for lp in plan.layers:  # what is kept is each layer's hottest groups; the rest went cold
        assert sorted([e for g in lp.groups for e in g.experts] + lp.cold) == list(range(8))
        if lp.groups:
            assert lp.groups[0].experts == free.layers[lp.layer].groups[0].experts


def test_min_tokens_keeps_decode_on_mlx():
    """A 5 ms dispatch never pays for a 1-token call: min_tokens > 1, and a decode call stays on MLX."""
    cost = CostModel("onnx", 5e-3, 1e13, 1e12, 1e-4, 1e-4, 1e10)
    lp = plan_layer(zipf_layer(), 512, 1024, cost, PlanLimits.for_backend("onnx"), call_sizes=[128])
    assert 1 < lp.min_tokens < NEVER
    counts = np.zeros(8)
    counts[:2] = 1
    assert not lp.decide(cost, counts).offload


def test_decode_stays_on_mlx_even_when_programs_look_free():
    """Programs far cheaper than MLX per call still leave 1-token calls (decode) on MLX: the
    host sync stalls mlx_lm's pipelined loop, which the per-call model does not see."""
    from npumoe_mlx.planning.plan import plan_shared

    cost = _cost(program_flops=F * 1e6)  # a program row a million times cheaper than an MLX pair
    assert cost.first_offload_tokens == 2 == CostModel.from_dict({k: v for k, v in cost.to_dict().items()
                                                                   if k != "first_offload_tokens"}).first_offload_tokens
    lp = plan_layer(zipf_layer(), 512, 1024, cost, PlanLimits.for_backend("onnx"), call_sizes=[128])
    assert lp.groups and lp.min_tokens == 2
    assert plan_layer(zipf_layer(), 512, 1024, _cost(program_flops=F * 1e6, first_offload_tokens=1),
                      PlanLimits.for_backend("onnx"), call_sizes=[128]).min_tokens == 1  # asked for: decode too
    sp = plan_shared(LayerCounts(0, "p", 8, 2, [0] * 8, [{"tokens": 128}]), "p", D, H, _cost(program_flops=F * 1e6, mlx_dense_flops=F),
                     PlanLimits.for_backend("onnx"))
    assert sp is not None and sp.min_tokens == 2


def test_chip_cost_energy_per_flop_and_call():
    from npumoe_mlx.planning.chips import chip_profile

    c = chip_profile("m2-max")
    cost = chip_cost("m2-max", "coreml", 2048, 768)
    assert cost.program_flops == pytest.approx(c.ane_tflops * 1e12) and cost.mlx_flops == pytest.approx(c.gpu_tflops * 1e12)
    assert cost.program_j_per_flop == pytest.approx(c.ane_power_w / (c.ane_tflops * 1e12))
    assert cost.mlx_j_per_flop == pytest.approx(c.gpu_power_w / (c.gpu_tflops * 1e12))
    assert cost.program_j_per_call == pytest.approx(c.ane_power_w * c.ane_dispatch_s)
    # the default Core ML weight format (int8-channel): one byte per weight + one fp16 scale per row
    assert cost.expert_s == pytest.approx((3 * 2048 * 768 + 2 * (2 * 768 + 2048)) / (c.ane_bw_gbs * 1e9))
    fp16 = chip_cost("m2-max", "coreml", 2048, 768, weight_format=None)  # MLX bits (16): fp16 bytes
    assert fp16.expert_s == pytest.approx(3 * 2048 * 768 * 2 / (c.ane_bw_gbs * 1e9))
    assert cost.mlx_j(100, 2048, 768) == pytest.approx(cost.mlx_j_per_call + 100 * flops_per_row(2048, 768) * cost.mlx_j_per_flop)
    with pytest.raises(ValueError, match="coreml"):
        chip_cost("m2-max", "onnx")
    assert not default_cost("onnx").has_energy and default_cost("coreml").has_energy


def test_old_plans_still_load():
    """Plans written before objective / max_calls / call_ratio existed load with the old behaviour."""
    from npumoe_mlx.planning.plan import Plan

    lp = LayerPlan(0, "p", 4, 2, D, H, [GroupPlan([0, 1], [8, 16])], [2, 3], min_tokens=4)
    d = Plan("onnx", PlanLimits.for_backend("onnx"), [lp]).to_dict()
    for k in ("objective", "max_calls"):
        del d["layers"][0][k]
    del d["limits"]["call_ratio"]
    back = Plan.from_dict(d)
    assert back.layers[0].objective == "time" and back.layers[0].max_calls == 0


def test_a_group_moved_to_mlx_comes_back_as_part_of_a_round():
    """Programs at half MLX's speed, 4 experts of 10 pairs, two resident: both on programs end the
    call at 40 s, moving one to MLX at 30 s. The best split is between the two: the moved group
    runs again and the other one's round is cut to its 4-row tier (28 s); stopping at whole groups
    (30 s) wastes the programs' idle time."""
    cost = _cost(program_flops=F / 2)  # a program row costs 2 s, an MLX pair 1 s
    counts = np.array([10, 10, 10, 10])
    cold = np.array([False, False, True, True])
    d = decide_call(counts, CallContext([np.array([0]), np.array([1])], [[10], [4, 10]], cold, cost, D, H))
    assert d.offload and d.offload_s == pytest.approx(28.0), (d.rounds, d.caps, d.program_s, d.mlx_side_s)
    assert d.rounds == [1, 1] and d.caps[0] == [10] and d.caps[1] == [4]
    s = plan_slots(np.argsort(np.repeat(np.arange(4), 10), kind="stable"), counts, 1,
                   [[0], [1]], [[10], [4, 10]], caps=[d.caps[0][:1], d.caps[1][:1]])
    assert [c[2] for c in s.calls] == [10, 4] and (s.loc >= 0).sum() == 14  # the other 6 pairs of expert 1: MLX
    # a cut round that would be padded stays on MLX instead (expert 1 has 3 pairs, its cut tier is 4)
    d = decide_call(np.array([10, 3, 10, 10]), CallContext([np.array([0]), np.array([1])], [[10], [4, 10]], cold, cost, D, H))
    assert d.caps[1] != [4] or d.rounds[1] == 0


def test_the_marginal_group_gets_tiers_to_balance_the_two_units():
    """8 experts, top-2, 2048-token calls, programs at a third of MLX's speed: the best split puts
    a quarter of the pairs (two experts' worth minus a bit) on programs. The plan's coldest
    resident group gets tiers below its load for that cut round, and the calls land within 3% of
    the continuous optimum (whole experts only: ~8% above it)."""
    cost = _cost(program_flops=F / 3, dispatch_s=0.5, mlx_fixed_s=0.5, sync_s=0.5)
    prof = zipf_layer(E=8, k=2, calls=48, n=2048, seed=3, skew=0.3)
    lp = plan_layer(prof, D, H, cost, PlanLimits.for_backend("coreml"), call_sizes=[2048])
    calls = [np.asarray(c["counts"]) for c in zipf_layer(E=8, k=2, calls=16, n=2048, seed=4, skew=0.3).chunks]
    last = lp.groups[-1]
    assert min(last.tiers) < min(int(c[last.experts].min()) for c in calls), last.tiers
    ds = [lp.decide(cost, c) for c in calls]
    made = np.mean([d.offload_s for d in ds])
    pairs = 2048 * 2  # continuous optimum: x pairs at 3 s on programs, the rest at 1 s on MLX, both at once
    x = (pairs + cost.mlx_fixed_s - cost.sync_s - cost.dispatch_s) / 4
    best = cost.mlx_fixed_s + pairs - x
    assert made <= 1.03 * best, (made / best, [g.tiers for g in lp.groups])
    assert any(d.caps[-1][-1] < last.tiers[-1] and d.rounds[-1] for d in ds)  # cut rounds were used


def test_energy_takes_back_as_much_as_its_time_bound_allows():
    """Programs at half MLX's speed and a tenth of its joules per pair, within 1.2x MLX alone's time
    (48 s): three resident groups take 60 s; moving one whole to MLX ends at 40 s with 22 J, but
    running it and cutting another group's round to 4 rows ends at 48 s with 18.4 J (the time
    objective ends at 28 s with 27.4 J)."""
    cost = _cost(program_flops=F / 2, program_j_per_flop=0.1 / F, mlx_j_per_flop=1.0 / F)
    counts = np.array([10, 10, 10, 10])
    cold = np.array([False, False, False, True])
    groups, ladders = [np.array([0]), np.array([1]), np.array([2])], [[10], [4, 10], [10]]
    d = decide_call(counts, CallContext(groups, ladders, cold, cost, D, H, objective="energy", energy_bound="gpu"))
    assert d.offload and d.offload_s == pytest.approx(48.0) and d.offload_j == pytest.approx(18.4), (d.caps, d.rounds)
    assert d.rounds == [1, 1, 1] and d.caps[1] == [4]
    t = decide_call(counts, CallContext(groups, ladders, cold, cost, D, H))  # time: two groups to MLX, one cut back: 28 s
    assert t.offload_s == pytest.approx(28.0) and t.offload_j == pytest.approx(27.4) and t.caps[1] == [4]


def test_energy_packs_rounds_below_loads_into_the_frugal_units_time():
    """Three resident experts of 10 pairs, ladders [8, 16]; programs 2 s and 0.1 J per row, MLX 1 s
    and 1 J per pair, bound 1.2x MLX alone (36 s). Moving whole groups leaves one 16-row round
    (32 s, 6 rows padded; 21.6 J) and no smaller round fits beside it; two rounds of 8 (below the
    loads: no padding, the rest on MLX) end at 32 s with 15.6 J, the least of every choice."""
    cost = _cost(program_flops=F / 2, program_j_per_flop=0.1 / F, mlx_j_per_flop=1.0 / F)
    counts = np.array([10, 10, 10])
    cold = np.zeros(3, bool)
    groups, ladders = [np.array([i]) for i in range(3)], [[8, 16]] * 3
    d = decide_call(counts, CallContext(groups, ladders, cold, cost, D, H, objective="energy", energy_bound="gpu"))
    best = None  # every choice per group: nothing, one round of 8, one of 16
    for rows in np.array(np.meshgrid(*[[0, 8, 16]] * 3)).T.reshape(-1, 3):
        t, served = 2.0 * rows.sum(), np.minimum(rows, 10).sum()
        j = 0.1 * rows.sum() + (30 - served)
        if max(t, 30 - served) <= 36 and (best is None or j < best):
            best = j
    assert best == pytest.approx(15.6)
    assert d.offload and d.offload_j == pytest.approx(best) and d.offload_s <= 36 + 1e-9, (d.caps, d.rounds)
    assert sorted(c[0] for c, r in zip(d.caps, d.rounds) if r) == [8, 8]
    t = decide_call(counts, CallContext(groups, ladders, cold, cost, D, H))  # the time objective does not pack
    assert t.offload_j > best


def test_the_executor_decides_with_the_plans_energy_slack():
    """The executor and replay run one decision: an energy plan's slack (below 1.2 when its fastest
    calls are slower than the time plan's) bounds the executor's calls as it bounds replay's."""
    from npumoe_mlx.runtime.executor import OffloadExecutor

    cost = _cost(program_flops=F / 2, program_j_per_flop=0.1 / F, mlx_j_per_flop=1.0 / F)
    counts = np.array([10, 10, 10])
    lp = LayerPlan(0, "p", 3, 1, D, H, [GroupPlan([i], [8, 16]) for i in range(3)], [], objective="energy",
                   energy_bound="gpu")
    ex = OffloadExecutor(lp, [object()] * 3, cost)
    assert ex._decide(counts).offload_j == pytest.approx(15.6)  # two rounds of 8 within 1.2 x 30 s
    tight = replace(lp, slack=1.0)  # within 30 s: one round of 8 and one of 6 rows would not fit a tier
    d, e = tight.decide(cost, counts), OffloadExecutor(tight, [object()] * 3, cost)._decide(counts)
    assert d.offload_s <= 30 + 1e-9 and (e.offload_s, e.offload_j, e.caps, e.rounds) == (d.offload_s, d.offload_j,
                                                                                         d.caps, d.rounds)
    assert d.offload_j > 15.6
