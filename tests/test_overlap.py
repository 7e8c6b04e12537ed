"""Programs and MLX on shared cores: the cost model's ``overlap`` term and the decisions it drives.

Measured on this 2-core machine (benchmarks/profile_layer.py, OLMoE dims, 512 tokens): the
executor starts the MLX spill, then the programs, and the call took programs + spill, not
the larger of the two, so the plan's 6 cold experts (3% of pairs) doubled the call.
"""

import numpy as np

from npumoe_mlx.backends.registry import default_cost
from npumoe_mlx.build.tune import fit_overlap
from npumoe_mlx.planning.cost import CostModel
from npumoe_mlx.planning.plan import PlanLimits, plan_layer
from npumoe_mlx.planning.profiles import LayerCounts
from npumoe_mlx.planning.tiers import CallContext, decide_call
from npumoe_mlx.tools.bench_layer import popularity, route

D, H = 2048, 1024  # OLMoE's expert dims (costs only: nothing is computed)
QUANT = {"mode": "affine", "bits": 4, "group_size": 64}


def _cost(overlap: float) -> CostModel:
    # the terms `tune` fitted on this machine at OLMoE dims (q4), but for the overlap
    return CostModel("onnx", 1.2e-5, 2.7e10, 4.3e8, 8e-5, 1.6e-4, 7.5e8, expert_s=0.005, overlap=overlap)


def _profile(E=64, k=8, tokens=512):
    rng = np.random.default_rng(0)
    p = popularity(E, 1.0, rng)
    chunks = [{"tokens": tokens, "counts": np.bincount(route(tokens, k, p, rng).ravel(), minlength=E).tolist()}
              for _ in range(2)]
    return LayerCounts(0, "mlp.experts", E, k, np.sum([c["counts"] for c in chunks], 0).tolist(), chunks)


def test_makespan_hides_the_shorter_side_by_the_overlap():
    assert _cost(1.0).makespan(2.0, 0.5) == 2.0  # separate units: the longer side
    assert _cost(0.0).makespan(2.0, 0.5) == 2.5  # shared cores: one after the other
    assert _cost(0.5).makespan(0.5, 2.0) == 2.25
    np.testing.assert_allclose(_cost(0.0).makespan(np.array([1.0, 0.0]), np.array([0.5, 3.0])), [1.5, 3.0])


def test_plan_keeps_every_seen_expert_on_programs_when_cores_are_shared():
    """The wrong decision (MLX 'runs beside' the programs on the same cores) leaves cold experts."""
    prof = _profile()
    shared = plan_layer(prof, D, H, _cost(0.0), PlanLimits.for_backend("onnx"), QUANT)
    separate = plan_layer(prof, D, H, _cost(1.0), PlanLimits.for_backend("onnx"), QUANT)
    assert shared.cold == [] and sum(len(g.experts) for g in shared.groups) == 64
    assert len(separate.cold) > 0  # a concurrent unit earns the tail: the term decides, not the data


def test_call_on_shared_cores_costs_both_sides_and_keeps_groups_on_programs():
    E = 16
    groups = [np.array([e]) for e in range(E - 2)]
    ladders = [[8, 16, 32, 64, 128]] * len(groups)
    cold = np.zeros(E, bool)
    cold[[14, 15]] = True
    counts = np.array([100, 60, 40, 30, 20, 20, 16, 12, 10, 8, 8, 6, 4, 2, 3, 1])
    d0 = decide_call(counts, CallContext(groups, ladders, cold, _cost(0.0), D, H))
    d1 = decide_call(counts, CallContext(groups, ladders, cold, _cost(1.0), D, H))
    assert d0.offload and d1.offload
    assert np.isclose(d0.offload_s, d0.program_s + d0.mlx_side_s)
    assert np.isclose(d1.offload_s, max(d1.program_s, d1.mlx_side_s))
    # on shared cores no group moves to MLX (MLX's ~5 ms per pair here only adds);
    # separate units balance the two sides by moving the worst-used groups over
    assert all(r >= 1 for r in d0.rounds)
    assert any(r == 0 for r in d1.rounds)


def test_fit_overlap_from_timings():
    assert fit_overlap({"program_s": 1.0, "mlx_s": 0.5, "both_s": 1.5}) == 0.0  # one after the other
    assert fit_overlap({"program_s": 1.0, "mlx_s": 0.5, "both_s": 1.0}) == 1.0  # fully hidden
    assert np.isclose(fit_overlap({"program_s": 1.0, "mlx_s": 0.5, "both_s": 1.25}), 0.5)
    assert fit_overlap({"program_s": 1.0, "mlx_s": 0.5, "both_s": 1.9}) == 0.0  # contention: clipped
    assert fit_overlap(None) == 1.0
    # rounds: the median round's estimate, so one lucky round does not fake an overlap
    assert fit_overlap({"program_s": [1.0, 1.0, 1.0], "mlx_s": [0.5, 0.5, 0.5], "both_s": [1.5, 1.0, 1.5]}) == 0.0


def test_cost_models_saved_before_overlap_keep_their_decisions():
    d = _cost(0.0).to_dict()
    del d["overlap"]
    assert CostModel.from_dict(d).overlap == 1.0
    del d["workers"]
    assert CostModel.from_dict(d).workers == 1  # one program call at a time, as before
    assert default_cost("onnx").overlap == 0.0  # CPU programs and MLX CPU share the cores
    assert default_cost("coreml").overlap == 1.0  # ANE and GPU are separate units


def test_tune_measures_the_overlap():
    from npumoe_mlx.build.tune import fit, measure

    raw = measure("onnx", 64, 32, None, tiers=(16, 64), pairs=(16, 64), repeats=1)
    o = raw["overlap"]
    assert all(len(o[k]) >= 5 and min(o[k]) > 0 for k in ("program_s", "mlx_s", "both_s"))
    assert 0.0 <= fit(raw).overlap <= 1.0
    assert fit(raw).overlap == fit_overlap(o)
    assert raw["workers"] in (1, 2) and fit(raw).workers == raw["workers"]  # the faster of 1 or 2 in flight


def _unseen_profile(E=32, k=4):
    counts = np.zeros(E, int)
    counts[:24] = np.arange(24, 0, -1) * 8  # experts 24..31: calibration never routed to them
    return LayerCounts(0, "mlp.experts", E, k, counts.tolist(), [{"tokens": 512, "counts": counts.tolist()}])


def test_tail_programs_for_unseen_experts_when_a_pair_costs_more_on_mlx():
    prof = _unseen_profile()
    limits = PlanLimits.for_backend("onnx")
    lp = plan_layer(prof, D, H, _cost(0.0), limits, QUANT)
    assert lp.cold == []  # the unseen experts got tail programs
    tails = [g for g in lp.groups if set(g.experts) <= set(range(24, 32))]
    # one smallest-tier call of a 1-expert program (~8.7 ms here) beats a pair on MLX (~17 ms);
    # a 2-expert program computes both experts' rows (~17.4 ms): one expert per tail
    assert [len(g.experts) for g in tails] == [1] * 8 and all(g.tiers[0] == 8 for g in tails)
    counts = np.zeros(32)
    counts[:24] = np.asarray(prof.counts[:24]) / 4
    counts[30] = 3
    d = lp.decide(_cost(0.0), counts)
    gi = next(i for i, g in enumerate(lp.groups) if g.experts == [30])
    assert d.offload and d.rounds[gi] == 1 and d.caps[gi] == [8]  # its 3 pairs run on the tail program
    # cheap program calls: one tail program holds 8 unseen experts
    cheap = CostModel("onnx", 1.2e-5, 1e12, 4.3e8, 8e-5, 1.6e-4, 7.5e8, expert_s=0.0, overlap=0.0)
    lp = plan_layer(prof, D, H, cheap, limits, QUANT)
    assert [g.experts for g in lp.groups if 30 in g.experts] == [list(range(24, 32))]


def test_no_tail_when_mlx_runs_beside_the_programs():
    lp = plan_layer(_unseen_profile(), D, H, _cost(1.0), PlanLimits.for_backend("onnx"), QUANT)
    assert set(range(24, 32)) <= set(lp.cold)  # MLX on its own unit hides a stray pair: no tail
