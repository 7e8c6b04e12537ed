"""Issue 23: tiers that fit the workloads people run. Calls smaller than the plan was sized for
(a prompt cache's remainder) are priced on a cover near their loads and never pad badly; batched
and chat-like calls in calibration and replay; re-planning while serving."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import mlx.core as mx
import numpy as np
import pytest

import npumoe_mlx
from npumoe_mlx.build import build as build_bundle
from npumoe_mlx.cost import CostModel
from npumoe_mlx.experts import installed_blocks
from npumoe_mlx.plan import GroupPlan, LayerPlan, PlanLimits, below_ladder_tiers
from npumoe_mlx.tiers import small_ladders, undersized
from npumoe_mlx.tools.tiny import make_tiny_model
from npumoe_mlx.workloads import prompt_of_tokens

EAGER = CostModel("onnx", 1e-9, 1e15, 1e15, 0.0, 1.0, 1.0, first_offload_tokens=1, source="test: offload everything")


def _cost(program_speedup: float) -> CostModel:
    """Programs ``program_speedup`` x MLX's FLOP/s, small fixed costs, one set of cores (overlap 0)."""
    return CostModel("onnx", 1e-6, 1e9 * program_speedup, 1e15, 1e-6, 1e-6, 1e9, overlap=0.0,
                     first_offload_tokens=1, source="test")


def test_small_call_is_priced_on_a_cover_near_its_loads():
    # one group of 4 experts sized for big calls (bottom tier 64); a 14-pair call
    lp = LayerPlan(0, "p", 4, 2, 64, 128, [GroupPlan([0, 1, 2, 3], [64, 128])], [], min_tokens=1)
    counts = np.array([4, 3, 4, 3])
    assert undersized(counts, [np.arange(4)], [[64, 128]])
    assert not undersized(np.array([70, 3, 4, 3]), [np.arange(4)], [[64, 128]])
    assert small_ladders([[64, 128]], [1, 2, 4, 8, 64, 256]) == [[1, 2, 4, 8, 64, 128]]
    # programs 3x MLX's speed: the bottom-tier cover (256 rows for 14 pairs, 95% padding) costs more
    # than MLX, so the call stays on MLX ...
    slow = _cost(3.0)
    d = lp.decide(slow, counts)
    assert not d.offload and d.caps == [[64]]
    # ... the decode tiers cover it at 4 rows (16 slots, 12.5% padding): programs win
    d = lp.decide(slow, counts, extra_tiers=[1, 2, 4, 8])
    assert d.offload and d.caps == [[4]]
    # priced, not a threshold: programs 100x faster make even the padded bottom tier worth it
    assert lp.decide(_cost(100.0), counts).offload
    # the onnx grid (decode tiers, multiples of 8) holds the same closest cover
    assert lp.decide(_cost(100.0), counts, extra_tiers=below_ladder_tiers(PlanLimits.for_backend("onnx"))).caps == [[4]]
    # Core ML packages run only the built ladders: no extra tiers
    assert below_ladder_tiers(PlanLimits.for_backend("coreml")) == []


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("small")
    path = make_tiny_model(root / "m", "qwen3_moe", seed=1, num_experts=16, skew=1.0)
    out = build_bundle(str(path), "onnx", str(root / "b"), corpus=["qa", "code"], tokens=1024, chunk_size=512,
                       cost=EAGER, log=lambda m: None)
    return path, out


@pytest.mark.parametrize("keep", [True, False], ids=["kept", "released"])
def test_prompt_cache_remainders_pad_at_most_half_and_tokens_match(tiny, keep):
    """After a 300-token prompt in the cache, remainders of 1..15 tokens run programs (the cost model
    says so: EAGER) at <= 50% padding in every layer (before: 95% at the ladders' bottom tiers), and
    the logits are stock mlx_lm's."""
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.utils import load as mlx_load

    path, out = tiny
    model, tok = npumoe_mlx.load(str(path), offload="onnx", bundle=str(out), quiet=True, keep_mlx_experts=keep)
    stock, _ = mlx_load(str(path))
    head = mx.array(prompt_of_tokens(tok, 300, seed=3))[None]
    for n in (1, 5, 11, 15):
        caches = make_prompt_cache(model), make_prompt_cache(stock)
        mx.eval(model(head, cache=caches[0]), stock(head, cache=caches[1]))
        for m in installed_blocks(model):
            m.executor.stats.__init__(m.executor.plan.layer)
        tail = mx.array(prompt_of_tokens(tok, n, seed=4))[None]
        y, want = model(tail, cache=caches[0]), stock(tail, cache=caches[1])
        assert mx.allclose(y, want, atol=1e-4, rtol=1e-4).item()
        assert (mx.argmax(y, -1) == mx.argmax(want, -1)).all().item()
        for m in installed_blocks(model):
            st = m.executor.stats
            assert st.offloaded == 1, (n, st)
            assert st.padded <= 0.5 * st.slots, (n, st.layer, st.padded, st.slots)
