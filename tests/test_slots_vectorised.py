"""``tiers.plan_slots`` (numpy over every slot of a call) does exactly what the per-group loop it
replaced did (``slots_reference.py``): every pair's slot, every program call's token rows and
the padding, on random layers, loads and decisions."""

import numpy as np
import pytest
from slots_reference import plan_slots as reference_slots  # tests/ is on sys.path under pytest

from npumoe_mlx.backends.registry import default_cost
from npumoe_mlx.planning.tiers import CallContext, decide_call, plan_slots

D, H = 64, 32


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
        d = decide_call(counts, CallContext(groups, ladders, cold, cost, D, H, str(rng.choice(["auto", "rerun", "spill"]))))
        caps = [c[:r] for c, r in zip(d.caps, d.rounds)]
        rounds = [int(rng.integers(1, 4)) for _ in groups]
        for args in ((groups, ladders, None, caps), (groups, ladders, None, None), (groups, ladders, rounds, None),
                     (groups, (8, 24), None, None)):
            want = reference_slots(order, counts, k, *args[:2], *args[2:])
            got = plan_slots(order, counts, k, *args[:2], *args[2:])
            assert _same_slots(got, want)
            placed = got.loc[got.loc >= 0]
            assert np.unique(placed).size == placed.size  # no slot holds two pairs
