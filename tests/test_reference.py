"""The reference static-tier executor equals stock SwitchGLU, whatever the routing."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.models.activations import SwigluOAI
from mlx_lm.models.switch_layers import SwitchGLU

from npumoe_mlx.runtime.reference import StaticTierReference, contiguous_groups, plan_slots, tier_for

D, H, E = 64, 32, 8


def _switch(kind: str) -> SwitchGLU:
    mx.random.seed(1)
    if kind == "oai":
        m = SwitchGLU(D, H, E, activation=SwigluOAI(), bias=True)
        for lin in (m.gate_proj, m.up_proj, m.down_proj):
            lin.bias = mx.random.normal(lin.bias.shape) * 0.1
    else:
        m = SwitchGLU(D, H, E)
    if kind in ("q4", "q8"):
        nn.quantize(m, group_size=32, bits=int(kind[1]))
    mx.eval(m.parameters())
    return m


def _inds(n: int, k: int, pattern: str, rng) -> np.ndarray:
    if pattern == "uniform":
        return np.stack([rng.choice(E, k, replace=False) for _ in range(n)])
    if pattern == "uneven":  # expert 0 takes most, experts 5-7 none
        p = np.array([0.7, 0.1, 0.1, 0.05, 0.05, 0, 0, 0])
        return np.stack([rng.choice(E, k, replace=False, p=p) for _ in range(n)])
    if pattern == "one":  # every token on expert 3 (k=1)
        return np.full((n, k), 3)
    raise ValueError(pattern)


@pytest.mark.parametrize("kind", ["float", "q4", "q8", "oai"])
@pytest.mark.parametrize(
    "n,k,pattern",
    [(1, 2, "uniform"), (7, 2, "uneven"), (130, 2, "uniform"), (300, 2, "uneven"), (200, 1, "one")],
)
def test_reference_equals_stock(kind, n, k, pattern):
    m = _switch(kind)
    rng = np.random.default_rng(n)
    x = mx.random.normal((n, D), key=mx.random.key(n))
    inds = mx.array(_inds(n, k, pattern, rng).astype(np.uint32))
    want = m(x, inds)
    ex = StaticTierReference(tiers=(32, 64), group_size=4)
    got = ex(m, x, inds)
    assert got.shape == want.shape == (n, k, D)
    assert got.dtype == x.dtype
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-5, atol=1e-5)
    # every pair got exactly one slot; the rest is padding
    assert ex.slots - ex.padded == n * k


def test_batched_leading_dims_and_dtype():
    m = _switch("q4")
    x = mx.random.normal((2, 5, D)).astype(mx.float16)
    inds = mx.random.randint(0, E, (2, 5, 2)).astype(mx.uint32)
    got = StaticTierReference()(m, x, inds)
    assert got.shape == (2, 5, 2, D) and got.dtype == mx.float16


def test_tiers_and_overflow_rounds():
    assert tier_for(1, (32, 64)) == 32
    assert tier_for(33, (32, 64)) == 64
    assert tier_for(500, (32, 64)) == 64
    # 100 pairs on expert 0 with top tier 32: rounds of 32, 32, 32, 32 (last pads 28)
    order = np.arange(100)
    counts = np.zeros(E, dtype=np.int64)
    counts[0] = 100
    s = plan_slots(order, counts, 1, contiguous_groups(E, 4), (32,))
    assert len(s.calls) == 4
    assert s.slots - s.padded == 100
    assert sorted(s.loc.tolist()) == sorted(set(s.loc.tolist()))  # no slot used twice
