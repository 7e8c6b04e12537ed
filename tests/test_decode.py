"""Decode on released layers: the small-call path, the measured decode cost in `tune`, and
the release rule that follows it."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.switch_layers import SwitchGLU

import npumoe_mlx
from npumoe_mlx.backends import Program, load_backend
from npumoe_mlx.build import tune
from npumoe_mlx.build.build import build as build_bundle
from npumoe_mlx.planning import tiers
from npumoe_mlx.planning.cost import CostModel
from npumoe_mlx.planning.plan import GroupPlan, LayerPlan, PlanLimits
from npumoe_mlx.planning.residency import program_only, releases
from npumoe_mlx.runtime import release
from npumoe_mlx.runtime.executor import OffloadExecutor
from npumoe_mlx.runtime.experts import installed_blocks
from npumoe_mlx.tools.tiny import make_tiny_model

EAGER = CostModel("onnx", 1e-9, 1e15, 1e15, 0.0, 1.0, 1.0, first_offload_tokens=2, source="test: programs win")


class _Prog(Program):
    """A stand-in program: tiers only (slot planning never runs it)."""

    def __init__(self, tiers):
        self.tiers = tuple(tiers)


def _executor(groups, E=16, k=4):
    lp = LayerPlan(0, "x", E, k, 8, 8, [GroupPlan(g, [8, 32]) for g in groups], [], min_tokens=2)
    return OffloadExecutor(lp, [_Prog([1, 2, 4, 8, 16, 32]) for _ in groups], EAGER)


def test_small_slots_match_the_general_path_at_the_small_tiers():
    """Same calls (group, capacity) as decide_call + plan_slots give a released call, every
    taken pair in a slot of its own expert's rows, reading its own token's row."""
    groups = [[0, 1], [2], [3, 4, 5], [6]]  # 7..15 have no program (cold)
    ex = _executor(groups)
    rng = np.random.default_rng(0)
    for n in (1, 2, 3, 5, 8):
        flat = np.concatenate([rng.choice(16, 4, replace=False) for _ in range(n)])  # (n*4,) pairs
        counts = np.bincount(flat, minlength=16)
        s = ex._small_slots(flat, counts, 4)
        d = ex._decide(counts, released=True)
        want = tiers.plan_slots(np.argsort(flat, kind="stable"), counts, 4, [np.asarray(g) for g in groups],
                                [list(g.tiers) for g in ex.plan.groups],
                                caps=[c[:r] for c, r in zip(d.caps, d.rounds)])
        assert [(gi, c) for gi, _, c, _ in s.calls] == [(gi, c) for gi, _, c, _ in want.calls]
        assert (s.slots, s.padded) == (want.slots, want.padded)
        assert np.array_equal(s.loc < 0, want.loc < 0)  # the same pairs left for MLX (cold experts)
        rows = np.concatenate([src for *_, src in s.calls])
        expert_of_slot = np.concatenate([np.repeat(ids, c) for _, ids, c, _ in s.calls])
        taken = np.nonzero(s.loc >= 0)[0]
        assert np.array_equal(expert_of_slot[s.loc[taken]], flat[taken])
        assert np.array_equal(rows[s.loc[taken]], taken // 4)
        assert len(set(s.loc[taken].tolist())) == taken.size


def test_small_slots_give_way_to_the_ladder_past_the_top_small_tier():
    ex = _executor([[0], [1]], E=4, k=1)
    counts = np.array([33, 0, 0, 0])  # 33 pairs on expert 0: over the 32-row top
    assert ex._small_slots(np.zeros(33, np.int64), counts, 1) is None


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    path = make_tiny_model(tmp_path_factory.mktemp("dec") / "m", "qwen3_moe", seed=5)
    build_bundle(str(path), "onnx", corpus=["qa"], tokens=256, chunk_size=128, cost=EAGER,
                 limits=PlanLimits.for_backend("onnx", max_programs=3, max_group=2), log=lambda m: None)
    return path


def test_decode_on_a_released_layer_takes_the_small_path_and_equals_mlx(released, monkeypatch):
    from mlx_lm import load as stock_load

    model, _ = npumoe_mlx.load(str(released), offload="onnx", quiet=True)
    stock, _ = stock_load(str(released))
    blk, ref = installed_blocks(model)[0], stock.model.layers[0].mlp.switch_mlp
    ex, rec = blk.executor, release.record_of(blk)
    assert rec is not None and ex.plan.min_tokens >= 2
    monkeypatch.setattr(ex, "_decide", lambda *a, **k: pytest.fail("a decode call ran the cost model"))
    D = blk["gate_proj"]["weight"].shape[-1]
    cold = int(np.nonzero(rec.resident)[0][0])
    for seed, inds in enumerate(([rec.ids[0], rec.ids[-1]], [rec.ids[-1], cold], [cold, rec.ids[0]])):
        x = mx.random.normal((1, 1, D), key=mx.random.key(seed))  # one token: decode
        ii = mx.array([[inds]], dtype=mx.uint32)  # (1, 1, k)
        before = ex.stats.program_calls
        got = np.array(blk(x, ii))
        assert ex.stats.program_calls > before  # programs ran (a cold pair on MLX's compact copy)
        want = np.array(SwitchGLU.__call__(ref, x, ii))
        assert got.shape == want.shape == (1, 1, 2, D) and np.allclose(got, want, rtol=1e-5, atol=1e-6)
    assert release.record_of(blk) is rec  # MLX never read the released experts back


def _layer(k=4, sizes=(1, 1, 1, 1)):
    return LayerPlan(0, "x", 16, k, 64, 64, [GroupPlan(list(range(i * 4, i * 4 + g)), [8]) for i, g in
                                             enumerate(sizes)], [], min_tokens=2)


def test_release_rule_follows_the_measured_decode_step_not_the_per_call_terms():
    """Per-call terms say programs win (EAGER); a decode step measured in mlx_lm's loop where
    programs lose keeps MLX's copy, and one where they win releases it."""
    lp = _layer()
    assert program_only(lp, EAGER)[0]
    lose = CostModel(**{**EAGER.to_dict(), "decode_k": 4, "decode_program_s": 2e-3, "decode_mlx_s": 1e-3})
    win = CostModel(**{**EAGER.to_dict(), "decode_k": 4, "decode_program_s": 1e-3, "decode_mlx_s": 2e-3})
    ok, why = program_only(lp, lose)
    assert not ok and "measured in mlx_lm's loop" in why and "2.00 ms > MLX 1.00 ms" in why
    assert program_only(lp, win)[0]
    tie = CostModel(**{**EAGER.to_dict(), "decode_k": 4, "decode_program_s": 1.04e-3, "decode_mlx_s": 1e-3})
    assert program_only(lp, tie)[0]  # within the measurement's noise: the memory wins
    worse = CostModel(**{**EAGER.to_dict(), "decode_k": 4, "decode_program_s": 1.06e-3, "decode_mlx_s": 1e-3})
    assert not program_only(lp, worse)[0]

    class Plan:
        backend, layers = "onnx", [lp]

    assert releases(Plan, lose) == {} and releases(Plan, win) == {0: lp.groups[0].experts + lp.groups[1].experts
                                                                  + lp.groups[2].experts + lp.groups[3].experts}
    # measured at another top_k: scaled per pair (8 pairs cost twice the 4-pair step on each side)
    assert "programs 2.00 ms, MLX 4.00 ms" in program_only(_layer(k=8), win)[1]


def test_release_rule_prices_the_plans_larger_groups_on_top_of_the_measured_step():
    """The measurement runs 1-expert programs; a plan whose decode calls hit 4-expert groups
    computes 4 rows per call: that extra (cost model) can tip the rule to keeping MLX's copy."""
    per_row = CostModel("onnx", 0.0, 6 * 64 * 64 / 1e-4, 1e15, 0.0, 0.0, 1e9,  # 0.1 ms per program row
                        decode_k=4, decode_program_s=1.0e-3, decode_mlx_s=1.2e-3)
    assert program_only(_layer(sizes=(1, 1, 1, 1)), per_row)[0]
    assert not program_only(_layer(sizes=(4, 4, 4, 4)), per_row)[0]  # +4 x 0.3 ms
    # priced on average, not at worst: one 4-expert group among 12 lone experts (a pair lands
    # there 1 time in 4) adds 4 x 1/4 x 0.3 ms: released; at worst (+1.2 ms) it was kept
    mixed = LayerPlan(0, "x", 16, 4, 64, 64, [GroupPlan([0, 1, 2, 3], [8])] + [GroupPlan([e], [8]) for e in range(4, 16)],
                      [], min_tokens=2)
    near = CostModel(**{**per_row.to_dict(), "decode_mlx_s": 1.25e-3})  # 1.30 <= 1.05 x 1.25; worst case 2.20
    ok, why = program_only(mixed, near)
    assert ok and "programs 1.30 ms" in why, why
    heavy = CostModel(**{**per_row.to_dict(), "decode_mlx_s": 1.0e-3})  # 1.30 > 1.05 x 1.00
    assert not program_only(mixed, heavy)[0]


def test_tune_measures_a_decode_step_on_both_sides_and_the_cost_model_keeps_it(tmp_path):
    be = load_backend("onnx")
    raw = tune.measure_decode(be, 64, 64, 2, None, repeats=1, steps=2, layers=2)
    assert raw["k"] == 2 and raw["program_s"] > 0 and raw["mlx_s"] > 0
    assert sorted(raw["by_workers"]) == ["1", "2"] and raw["program_s"] == raw["by_workers"][str(raw["workers"])]
    full = tune.measure("onnx", 64, 64, None, groups=(1,), tiers=(16,), pairs=(16,), repeats=1, top_k=2)
    cost = tune.fit(full)
    assert cost.decode_k == 2 and cost.decode_program_s == full["decode"]["program_s"] > 0
    assert cost.decode_workers == full["decode"]["workers"] in (1, 2)
    cost.save(str(tmp_path / "c.json"))
    again = CostModel.load(str(tmp_path / "c.json"))
    assert (again.decode_k, again.decode_program_s, again.decode_mlx_s) == (2, cost.decode_program_s, cost.decode_mlx_s)
    assert CostModel.from_dict({k: v for k, v in cost.to_dict().items() if not k.startswith("decode_")}).decode_k == 0


class _Dynamic(_Prog):
    """A stand-in dynamic program (one session, any row count)."""

    dynamic = True

    def add_tiers(self, tiers):
        self.tiers = tuple(sorted(set(self.tiers) | set(tiers)))


def test_released_calls_on_dynamic_programs_round_loads_to_8_rows_not_to_the_top_tier():
    """A 512-token call on a plan calibrated at 256 tokens: a load of 52 on ladder
    [24, 32, 40, 48, 256] ran a 256-row call (204 rows of padding); dynamic programs take 56."""
    lp = LayerPlan(0, "x", 4, 1, 8, 8, [GroupPlan([0], [24, 32, 40, 48, 256]), GroupPlan([1], [8, 256])], [],
                   min_tokens=2)
    dyn = [_Dynamic([1, 2, 4, 8, 16, 24, 32, 40, 48, 256]), _Dynamic([1, 2, 4, 8, 256])]
    ex = OffloadExecutor(lp, dyn, EAGER)
    counts = np.array([52, 300, 0, 0])
    d = ex._decide(counts, released=True)
    assert [c[:r] for c, r in zip(d.caps, d.rounds)] == [[56], [256, 48]]
    assert 56 in dyn[0].tiers and 48 in dyn[1].tiers  # the sessions serve those row counts now
    static = OffloadExecutor(lp, [_Prog([1, 2, 4, 8, 16, 24, 32, 40, 48, 256]), _Prog([1, 2, 4, 8, 256])], EAGER)
    d = static._decide(counts, released=True)
    assert [c[:r] for c, r in zip(d.caps, d.rounds)] == [[256], [256, 256]]  # static programs keep their tiers


def test_small_calls_run_as_many_at_once_as_tune_chose_for_decode(released, monkeypatch):
    """Decode calls take ``decode_workers`` (tune timed them in the decode loop); larger calls ``workers``."""
    from npumoe_mlx.runtime import executor

    model, _ = npumoe_mlx.load(str(released), offload="onnx", quiet=True)
    blk = installed_blocks(model)[0]
    ex = blk.executor
    ex.cost = CostModel(**{**ex.cost.to_dict(), "workers": 1, "decode_workers": 2})
    seen = []
    real = executor.run_calls
    monkeypatch.setattr(executor, "run_calls", lambda *a, **kw: seen.append(a[-1]) or real(*a, **kw))
    D = blk["gate_proj"]["weight"].shape[-1]
    ids = release.record_of(blk).ids
    blk(mx.random.normal((1, 1, D)), mx.array([[[ids[0], ids[-1]]]], dtype=mx.uint32))  # decode
    blk(mx.random.normal((1, 40, D)), mx.array([[[ids[0], ids[-1]]] * 40], dtype=mx.uint32).reshape(1, 40, 2))  # 80 pairs
    assert seen == [2, 1]
