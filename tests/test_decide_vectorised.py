"""``tiers.decide_call`` and ``tiers.plan_slots`` (numpy over groups) do exactly what the
per-group code they replaced did (``decide_reference.py``): rounds, caps, the offload choice and
every predicted second and joule bit for bit, and every pair's slot, on random layers, loads,
cost models and modes."""

import numpy as np
import pytest
from decide_reference import decide_call as reference  # tests/ is on sys.path under pytest
from decide_reference import plan_slots as reference_slots

from npumoe_mlx.cost import CostModel, chip_cost, default_cost, flops_per_row
from npumoe_mlx.tiers import CallDecider, decide_call, plan_slots

D, H = 64, 32


def _costs(rng):
    F = flops_per_row(D, H)
    yield default_cost("onnx")
    yield default_cost("coreml")  # energy terms
    yield chip_cost("m4-max", "coreml", D, H)  # weights streamed while computing (roofline)
    yield CostModel("onnx", 0.0, F, 1e30, 0.0, 0.0, F)  # round numbers: exact ties everywhere
    yield CostModel("onnx", 2.0, F, 1e30, 1.0, 3.0, F / 2, expert_s=1.0, program_j_per_flop=1 / F,
                    program_j_per_call=1.0, mlx_j_per_flop=3 / F, mlx_j_per_call=2.0)
    for _ in range(3):  # random scales around the defaults
        yield CostModel("onnx", *(rng.uniform(0.2, 5.0, 6) * [5e-5, 6e10, 5e9, 5e-5, 1e-4, 2e9]),
                        expert_s=float(rng.choice([0.0, rng.uniform(0, 1e-4)])),
                        weights_overlap=bool(rng.integers(2)),
                        **({} if rng.integers(2) else dict(program_j_per_flop=rng.uniform(1e-13, 1e-11),
                                                            program_j_per_call=rng.uniform(0, 1e-3),
                                                            mlx_j_per_flop=rng.uniform(1e-12, 1e-10),
                                                            mlx_j_per_call=rng.uniform(0, 1e-3))))


def _layer(rng):
    """Random groups (sizes 1..8, some experts cold) with ascending ladders of 1..12 tiers."""
    E = int(rng.integers(2, 65))
    perm = rng.permutation(E)
    n_cold = int(rng.integers(0, E // 3 + 1))
    groups, i = [], n_cold
    while i < E:
        g = int(rng.integers(1, 9))
        groups.append(np.sort(perm[i : i + g]))
        i += g
    step = int(rng.choice([8, 32]))
    grid = np.arange(step, step * 64 + 1, step)
    ladders = [sorted(int(t) for t in rng.choice(grid, int(rng.integers(1, 13)), replace=False)) for _ in groups]
    cold = np.zeros(E, bool)
    cold[perm[:n_cold]] = True
    return E, groups, ladders, cold


def _counts(rng, E):
    tokens, k = int(rng.integers(1, 2049)), int(rng.integers(1, min(E, 8) + 1))
    p = rng.dirichlet(np.full(E, float(rng.choice([0.1, 1.0, 10.0]))))
    counts = rng.multinomial(tokens * k, p)
    if rng.integers(4) == 0:  # the planner's float loads (np.ceil(share * n * k))
        counts = np.ceil(p * tokens * k)
    if rng.integers(8) == 0:
        counts = np.zeros(E, np.int64)
    return counts.astype(rng.choice([np.int32, np.int64])) if counts.dtype.kind == "i" else counts


@pytest.mark.parametrize("seed", range(3))
def test_vectorised_decision_equals_the_per_group_rule(seed):
    rng = np.random.default_rng(seed)
    checked = offloaded = changed = 0
    for cost in _costs(rng):
        for _ in range(4):
            E, groups, ladders, cold = _layer(rng)
            dec = CallDecider(groups, ladders, cold, cost, D, H)
            for _ in range(5):
                counts = _counts(rng, E)
                for overflow in ("auto", "rerun", "spill", "drop"):
                    objective = str(rng.choice(["time", "energy"]))
                    max_calls = int(rng.choice([0, 0, int(rng.integers(1, 3 * len(groups) + 2))]))
                    bound = str(rng.choice(["time", "gpu"]))
                    args = (cold, cost, D, H, overflow, objective, max_calls, bound)
                    want = reference(counts, groups, ladders, *args)
                    assert decide_call(counts, groups, ladders, *args) == want, (seed, overflow, objective, max_calls)
                    assert dec.decide(counts, overflow, objective, max_calls, bound) == want
                    checked += 1
                    offloaded += want.offload
                    changed += want.rounds != [len(c) or 1 for c in want.caps]
    # the cases exercise both answers and the rules that change rounds
    assert checked == 8 * 4 * 5 * 4 and 0 < offloaded < checked and changed > 0


def test_unsorted_ladder_is_read_ascending():
    """Plans hold ascending ladders; one given out of order decides as its sorted self."""
    counts = np.array([30, 5, 0])
    cold = np.array([False, False, True])
    groups = [np.array([0]), np.array([1])]
    cost = default_cost("onnx")
    a = decide_call(counts, groups, [[64, 8, 32], [16, 8]], cold, cost, D, H)
    b = decide_call(counts, groups, [[8, 32, 64], [8, 16]], cold, cost, D, H)
    assert a == b and a.caps == [[32], [8]]


def _same_slots(a, b) -> bool:
    return (a.padded, a.slots, a.loc.tolist(), len(a.calls)) == (b.padded, b.slots, b.loc.tolist(), len(b.calls)) and all(
        (ga, ca, ia.tolist(), sa.tolist()) == (gb, cb, ib.tolist(), sb.tolist())
        for (ga, ia, ca, sa), (gb, ib, cb, sb) in zip(a.calls, b.calls))


@pytest.mark.parametrize("seed", range(3))
def test_vectorised_slots_equal_the_per_group_loop(seed):
    """Every pair's slot, every program call's token rows and the padding, for the decision's caps,
    for ladders run as ``ladder_rounds`` runs them (with and without a round limit), one ladder for all."""
    rng = np.random.default_rng(seed)
    cost = default_cost("onnx")
    for _ in range(25):
        E, groups, ladders, cold = _layer(rng)
        k = int(rng.integers(1, min(E, 4) + 1))
        tokens = int(rng.integers(1, 400))
        inds = np.stack([rng.choice(E, k, replace=False, p=rng.dirichlet(np.ones(E))) for _ in range(tokens)])
        flat = inds.reshape(-1)
        order = np.argsort(flat, kind=str(rng.choice(["stable", "quicksort"]))).astype(rng.choice([np.int64, np.uint32]))
        counts = np.bincount(flat, minlength=E).astype(np.int32)
        d = decide_call(counts, groups, ladders, cold, cost, D, H, str(rng.choice(["auto", "rerun", "spill"])))
        caps = [c[:r] for c, r in zip(d.caps, d.rounds)]
        rounds = [int(rng.integers(1, 4)) for _ in groups]
        for args in ((groups, ladders, None, caps), (groups, ladders, None, None), (groups, ladders, rounds, None),
                     (groups, (8, 24), None, None)):
            want = reference_slots(order, counts, k, *args[:2], *args[2:])
            got = plan_slots(order, counts, k, *args[:2], *args[2:])
            assert _same_slots(got, want)
            placed = got.loc[got.loc >= 0]
            assert np.unique(placed).size == placed.size  # no slot holds two pairs
