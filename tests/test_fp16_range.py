"""fp16 range (issue 21, item 5): calibration records each layer's largest |gate|, |up| and
|down output|; the planner keeps a layer past an fp16 backend's safe range on MLX, naming it."""

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest

from ane_kernels.coreml import FP16_SATURATION
from npumoe_mlx.backends.coreml import FP16_RANGE_LIMIT
from npumoe_mlx.build import calibrate as cal
from npumoe_mlx.build import workloads
from npumoe_mlx.planning.cost import CostModel
from npumoe_mlx.planning.plan import NEVER, PlanLimits, make_plan
from npumoe_mlx.planning.profiles import Profile
from npumoe_mlx.runtime import experts
from npumoe_mlx.tools.tiny import make_tiny_model

SCALE = 1e5  # layer 1's up projection, scaled: its |up| passes fp16's range


@pytest.fixture(scope="module")
def scaled(tmp_path_factory):
    path = make_tiny_model(tmp_path_factory.mktemp("fp16") / "m", "qwen3_moe", seed=3, num_experts=16)
    model, tok, config = mlx_lm.load(str(path), return_config=True)
    up = model.model.layers[1].mlp.switch_mlp.up_proj
    up.weight = up.weight * SCALE
    mx.eval(model.parameters())
    docs = [workloads.long_context(200, 0), workloads.code_like(150, 1)]
    prof = cal.calibrate(model, tok, config, docs, chunk_size=128, max_tokens=400)
    return model, config, prof


def _eager(backend):
    return CostModel(backend, 1e-9, 1e15, 1e15, 0.0, 1.0, 1.0, first_offload_tokens=1)


def test_calibration_records_each_layers_range(scaled, tmp_path):
    _, _, prof = scaled
    r0, r1 = (l.max_abs for l in sorted(prof.layers, key=lambda l: l.layer))
    assert set(r0) == set(r1) == {"gate", "up", "down"}
    assert 0 < r0["up"] < FP16_RANGE_LIMIT < r1["up"]  # only the scaled layer passes
    assert r1["gate"] == pytest.approx(r0["gate"], rel=10) and r1["up"] > 1000 * r0["up"]
    prof.save(tmp_path / "p.json")  # stored in the profile
    assert [l.max_abs for l in Profile.load(tmp_path / "p.json").layers] == [r0, r1]


def test_range_matches_a_direct_computation():
    """On a call small enough to be sampled whole, the recorded values are the FFN's own."""
    from mlx_lm.models.switch_layers import SwitchGLU

    mx.random.seed(0)
    glu = SwitchGLU(32, 16, 4)
    mx.eval(glu.parameters())
    x = mx.random.normal((20, 32)) * 3
    inds = mx.array(np.random.default_rng(0).integers(0, 4, (20, 2)).astype(np.uint32))
    got = np.array(cal.ffn_max_abs(glu, x, inds))
    xn, idx = np.array(x, np.float64), np.array(inds)
    wg, wu, wd = (np.array(glu[n].weight, np.float64) for n in ("gate_proj", "up_proj", "down_proj"))
    g = np.einsum("nd,nkhd->nkh", xn, wg[idx])
    u = np.einsum("nd,nkhd->nkh", xn, wu[idx])
    h = g / (1 + np.exp(-g)) * u
    y = np.einsum("nkh,nkdh->nkd", h, wd[idx])
    np.testing.assert_allclose(got, [np.abs(g).max(), np.abs(u).max(), np.abs(y).max()], rtol=1e-4)


def test_planner_keeps_the_saturating_layer_on_mlx_for_coreml(scaled):
    model, config, prof = scaled
    blocks = {b.layer: b for b in experts.find_expert_blocks(model, config)}
    lines = []
    plan = make_plan(prof, blocks, _eager("coreml"), PlanLimits.for_backend("coreml"), log=lines.append)
    l0, l1 = sorted(plan.layers, key=lambda l: l.layer)
    assert l0.groups and not l1.groups and l1.min_tokens == NEVER and l1.cold == list(range(16))
    value = max(l.max_abs["up"] for l in prof.layers)
    assert lines == [f"layer 1 stays on MLX: its experts' |up| reached {value:.0f} on the calibration corpus, "
                     f"past {FP16_RANGE_LIMIT:.0f} (fp16 on the Neural Engine saturates near {FP16_SATURATION:.0f})"]
    # onnx computes in fp32: the same profile plans both layers, silently
    lines.clear()
    on = make_plan(prof, blocks, _eager("onnx"), PlanLimits.for_backend("onnx"), log=lines.append)
    assert all(l.groups for l in on.layers) and lines == []


def test_profile_rejects_a_bad_range():
    good = {"format": 1, "kind": "npumoe-profile", "model_fingerprint": None, "model_type": "", "corpus": "",
            "tokens": 1, "chunk_size": 1, "layers": [{"layer": 0, "path": "p", "num_experts": 2, "top_k": 1,
                                                       "counts": [1, 0], "max_abs": {"up": 3.0}}]}
    assert Profile.from_dict(good).layers[0].max_abs == {"up": 3.0}
    good["layers"][0]["max_abs"] = {"up": -1}
    with pytest.raises(ValueError, match="max_abs"):
        Profile.from_dict(good)
