"""Property test: any token count, routing and tier ladder through the executor equals SwitchGLU.

Random token counts (1..300), routings (uniform, all tokens on one expert, a few
experts only so the rest get zero tokens), groups with cold experts, sorted tier
ladders and overflow modes, with mlx and onnx programs built in memory: the
offloaded result equals stock SwitchGLU and the reference executor within 1e-5.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import mlx.core as mx
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mlx_lm.models.switch_layers import SwitchGLU

from npumoe_mlx.backends import load_backend
from npumoe_mlx.build.programs import spec_from_switch_glu
from npumoe_mlx.planning.plan import GroupPlan, LayerPlan
from npumoe_mlx.runtime.executor import OffloadExecutor
from npumoe_mlx.runtime.reference import StaticTierReference

from conftest import EAGER

E, D, H = 8, 32, 48
mx.random.seed(0)
GLU = SwitchGLU(D, H, E)
mx.eval(GLU.parameters())
BACKENDS = {name: load_backend(name) for name in ("mlx", "onnx")}


@st.composite
def cases(draw):
    n = draw(st.integers(1, 300))
    k = draw(st.integers(1, 3))
    routing = draw(st.sampled_from(["uniform", "one-expert", "few-experts"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if routing == "one-expert":  # every token's first choice is the same expert
        e = draw(st.integers(0, E - 1))
        rest = [i for i in range(E) if i != e]
        inds = np.array([[e, *rng.choice(rest, size=k - 1, replace=False)] for _ in range(n)])
    else:  # uniform, or a few experts only: the others get zero tokens
        pool = np.arange(E) if routing == "uniform" else rng.choice(E, size=k + 1, replace=False)
        inds = np.stack([rng.choice(pool, size=k, replace=False) for _ in range(n)])
    perm = [int(e) for e in draw(st.permutations(range(E)))]
    n_resident = draw(st.integers(1, E))
    cuts = sorted(draw(st.lists(st.integers(1, n_resident - 1), max_size=3, unique=True))) if n_resident > 1 else []
    bounds = [0, *cuts, n_resident]
    ladders = st.lists(st.integers(1, 64), min_size=1, max_size=4, unique=True).map(sorted)
    groups = [GroupPlan(sorted(perm[a:b]), draw(ladders)) for a, b in zip(bounds, bounds[1:])]
    cold = sorted(perm[n_resident:])
    return dict(
        n=n, inds=inds, groups=groups, cold=cold, flat=draw(st.booleans()),
        overflow=draw(st.sampled_from(["auto", "rerun", "spill"])), backend=draw(st.sampled_from(list(BACKENDS))),
        x=rng.standard_normal((n, D)).astype(np.float32),
    )


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_executor_equals_switch_glu(case):
    k = case["inds"].shape[1]
    assert all(len(set(r)) == k for r in case["inds"].tolist())  # top-k experts are distinct
    lp = LayerPlan(0, "p", E, k, D, H, groups=case["groups"], cold=case["cold"], min_tokens=1)
    be = BACKENDS[case["backend"]]
    programs = [be.load(spec_from_switch_glu(GLU, layer=0, expert_ids=g.experts, tiers=g.tiers)) for g in lp.groups]
    warnings = []
    ex = OffloadExecutor(lp, programs, EAGER, overflow=case["overflow"], warn=warnings.append)
    x, inds = mx.array(case["x"]), mx.array(case["inds"].astype(np.uint32))
    if not case["flat"]:  # (1, N, D) like most families; olmoe passes (N, D)
        x, inds = x[None], inds[None]
    got = ex(GLU, x, inds)
    want = GLU(x, inds)
    ref = StaticTierReference(tiers=tuple(case["groups"][0].tiers))(GLU, x, inds)
    assert got.shape == want.shape == (*inds.shape, D) and got.dtype == x.dtype
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.array(got), np.array(ref), rtol=1e-5, atol=1e-5)
    s = ex.stats
    assert warnings == [] and s.fallback == "" and s.dropped == 0
    cold_pairs = int(np.isin(case["inds"], case["cold"]).sum())
    if cold_pairs == case["n"] * k:  # no pair for any program: the cost model keeps it on MLX
        assert s.offloaded == 0
        return
    assert s.offloaded == 1 and s.pairs == case["n"] * k
    if case["overflow"] == "rerun":  # every resident pair ran on a program, however far past the top tier
        assert s.spilled == cold_pairs
    else:
        assert s.spilled >= cold_pairs
