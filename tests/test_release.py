"""No double residency (issue 15 item 3): experts only programs serve leave MLX, come back
from the safetensors when MLX needs them, and nothing the user sees changes."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm import load as stock_load
from mlx_lm.models.switch_layers import SwitchGLU

import npumoe_mlx
from npumoe_mlx import cli
from npumoe_mlx.backends import Program
from npumoe_mlx.planning.cost import CostModel
from npumoe_mlx.planning.plan import PlanLimits
from npumoe_mlx.planning.residency import model_resident, plan_resident, program_only
from npumoe_mlx.runtime import release
from npumoe_mlx.runtime.executor import offload_stats, summarize
from npumoe_mlx.runtime.experts import installed_blocks
from npumoe_mlx.tools.tiny import make_tiny_model

from conftest import PROMPT, build, greedy

# Programs win every call of 2+ tokens; decode (1 token) would stay on MLX (first_offload_tokens=2).
EAGER = CostModel("onnx", 1e-9, 1e15, 1e15, 0.0, 1.0, 1.0, first_offload_tokens=2, source="test: programs win")
MLX_WINS = CostModel("onnx", 1.0, 1e9, 1e15, 0.0, 1e-9, 1e15, source="test: MLX wins every call")
RELOADED = "released experts"


def _build(path, limits=None, cost=EAGER):
    build(path, cost=cost, limits=limits)
    return path


def _records(model):
    return [release.record_of(m) for m in installed_blocks(model)]


@pytest.fixture(scope="module", params=["f32", "q4", "q8"])
def model(request, tmp_path_factory):
    """A tiny qwen3_moe with an onnx bundle whose every expert is on programs (decode from 1 token on
    programs only if released)."""
    q = request.param
    path = make_tiny_model(tmp_path_factory.mktemp("rl") / q, "qwen3_moe", seed=1,
                           q_bits=None if q == "f32" else int(q[1:]))
    return _build(path)


@pytest.fixture(scope="module")
def cold(tmp_path_factory):
    """float32, one program group per layer at most: the other experts stay on MLX (cold)."""
    path = make_tiny_model(tmp_path_factory.mktemp("rl") / "cold", "qwen3_moe", seed=3)
    return _build(path, limits=PlanLimits.for_backend("onnx", max_programs=2, max_group=2))


def test_tokens_equal_mlx_lm_with_experts_released(model, capsys):
    stock, tok = stock_load(str(model))
    want = greedy(stock, tok)
    ours, tok2 = npumoe_mlx.load(str(model), offload="onnx", quiet=True)
    recs = _records(ours)
    assert recs and all(r is not None and r.nbytes > 0 and r.twin is None for r in recs)  # every expert released
    assert greedy(ours, tok2) == want
    # every call, decode included, ran on programs: MLX never needed the released weights
    st = offload_stats(ours)
    assert all(s.offloaded == s.calls > 16 for s in st)
    assert all(r is not None for r in _records(ours)) and RELOADED not in capsys.readouterr().err


def test_mlx_memory_drops_by_the_released_bytes(model):
    mx.clear_cache()
    base = mx.get_active_memory()
    kept, _ = npumoe_mlx.load(str(model), offload="onnx", quiet=True, keep_mlx_experts=True)
    assert all(r is None for r in _records(kept))
    with_copy = mx.get_active_memory() - base
    del kept
    mx.clear_cache()
    base = mx.get_active_memory()
    ours, _ = npumoe_mlx.load(str(model), offload="onnx", quiet=True)
    without = mx.get_active_memory() - base
    gone = release.released_bytes(ours)
    experts = sum(int(v.nbytes) for m in installed_blocks(ours) for _, v in tree_flatten(m.parameters()))
    assert gone == experts  # every expert array of every layer
    assert with_copy - without >= 0.95 * gone
    res = model_resident(ours)
    assert res["released"] == gone and all(u["mlx"] == 0 for u in res["units"].values())


@pytest.fixture(scope="module")
def cold_q4(tmp_path_factory):
    path = make_tiny_model(tmp_path_factory.mktemp("rl") / "coldq4", "qwen3_moe", seed=3, q_bits=4)
    return _build(path, limits=PlanLimits.for_backend("onnx", max_programs=2, max_group=2))


@pytest.mark.parametrize("which", ["cold", "cold_q4"])
def test_cold_experts_run_on_their_compact_copy(which, request, capsys):
    cold = request.getfixturevalue(which)
    stock, tok = stock_load(str(cold))
    want = greedy(stock, tok)
    ours, tok2 = npumoe_mlx.load(str(cold), offload="onnx", quiet=True)
    recs = _records(ours)
    assert all(r is not None and r.twin is not None and 0 < len(r.ids) < r.resident.size for r in recs)
    for r in recs:  # the twin holds the cold experts' rows, nothing else
        assert r.twin["gate_proj"]["weight"].shape[0] == int(r.resident.sum())
    assert greedy(ours, tok2) == want
    s = summarize(offload_stats(ours))
    assert s["spill_pct"] > 0  # cold pairs ran on MLX ...
    assert all(r is not None for r in _records(ours)) and RELOADED not in capsys.readouterr().err  # ... on the twin


def test_decode_below_min_tokens_would_need_mlx_so_it_runs_on_programs(cold):
    """Calls below the plan's min_tokens used to go to stock MLX with every expert: released
    layers must not (that would read the released weights back, or worse)."""
    ours, tok = npumoe_mlx.load(str(cold), offload="onnx", quiet=True)
    ex = [b.executor for b in installed_blocks(ours)]
    assert all(e.plan.min_tokens >= 2 for e in ex)
    blk = installed_blocks(ours)[0]
    D = blk["gate_proj"]["weight"].shape[-1]
    x = mx.random.normal((1, D), key=mx.random.key(0))  # one token: decode
    rec = release.record_of(blk)
    inds = mx.array([[rec.ids[0], int(np.nonzero(rec.resident)[0][0])]], dtype=mx.uint32)  # released + cold
    before = ex[0].stats.offloaded
    y = blk(x, inds)
    assert ex[0].stats.offloaded == before + 1 and release.record_of(blk) is rec
    release.reload(blk, quiet=True)
    want = SwitchGLU.__call__(blk, x, inds)
    assert np.allclose(np.array(y), np.array(want), rtol=1e-5, atol=1e-6)


def test_program_fault_reloads_the_layer_and_tokens_stay_right(cold, capsys):
    stock, tok = stock_load(str(cold))
    want = greedy(stock, tok)
    ours, tok2 = npumoe_mlx.load(str(cold), offload="onnx", quiet=True)
    ex = installed_blocks(ours)[0].executor

    class Broken(Program):
        def __init__(self, p):
            self.p, self.tiers = p, p.tiers

        def run(self, x, tier=None):
            raise RuntimeError("device lost")

    ex.programs[0] = Broken(ex.programs[0])
    capsys.readouterr()
    assert greedy(ours, tok2) == want
    err = capsys.readouterr().err
    assert "layer 0: program failed" in err
    assert [l for l in err.splitlines() if RELOADED in l] == [
        l for l in err.splitlines() if l.startswith("[npumoe] layer 0: reloaded ")]
    assert len([l for l in err.splitlines() if RELOADED in l]) == 1
    recs = _records(ours)
    assert recs[0] is None and recs[1] is not None  # only the faulty layer came back to MLX


def test_remove_restores_the_exact_original_weights(cold):
    stock, _ = stock_load(str(cold))
    want = {k: np.array(v) for k, v in tree_flatten(stock.parameters())}
    ours, _ = npumoe_mlx.load(str(cold), offload="onnx", quiet=True)
    recs = _records(ours)
    assert all(r is not None for r in recs)
    mx.clear_cache()
    low = mx.get_active_memory()
    assert npumoe_mlx.remove(ours) == 2
    assert mx.get_active_memory() >= low + 0.95 * sum(r.nbytes for r in recs)  # read back by remove()
    assert not installed_blocks(ours)
    assert all(type(m) is SwitchGLU for _, m in ours.named_modules() if isinstance(m, SwitchGLU))
    got = {k: np.array(v) for k, v in tree_flatten(ours.parameters())}
    assert got.keys() == want.keys()
    assert [k for k in want if not (got[k].dtype == want[k].dtype and np.array_equal(got[k], want[k]))] == []


def test_gradient_through_a_released_model_equals_stock(cold):
    stock, tok = stock_load(str(cold))
    ours, _ = npumoe_mlx.load(str(cold), offload="onnx", quiet=True)
    assert all(r is not None for r in _records(ours))
    ids = mx.array(tok.encode(PROMPT))[None]
    loss = lambda m, ids: nn.losses.cross_entropy(m(ids[:, :-1]), ids[:, 1:]).mean()
    ls, gs = nn.value_and_grad(stock, loss)(stock, ids)
    lo, go = nn.value_and_grad(ours, loss)(ours, ids)
    gs, go = dict(tree_flatten(gs)), dict(tree_flatten(go))
    assert gs.keys() == go.keys() and abs(lo.item() - ls.item()) <= 1e-5 * abs(ls.item())
    bad = [k for k in gs if float(mx.abs(go[k] - gs[k]).max()) > 1e-5 * float(mx.abs(gs[k]).max()) + 1e-9]
    assert bad == []
    assert np.allclose(np.array(ours(ids)), np.array(stock(ids)), rtol=1e-4, atol=1e-5)


def test_overflow_past_the_top_tier_reruns_the_ladder_instead_of_spilling(tmp_path, capsys):
    path = make_tiny_model(tmp_path / "m", "qwen3_moe", seed=1, skew=2.0)
    tight = PlanLimits.for_backend("onnx", max_tiers=1)
    tight.capacities = [16]
    _build(path, limits=tight)
    stock, tok = stock_load(str(path))
    want = greedy(stock, tok)
    ours, tok2 = npumoe_mlx.load(str(path), offload="onnx", quiet=True)
    assert all(r is not None for r in _records(ours))
    for b in installed_blocks(ours):  # from now on MLX looks cheaper for everything: auto would spill
        b.executor.cost = MLX_WINS
    assert greedy(ours, tok2) == want
    s = summarize(offload_stats(ours))
    assert s["overflow_pct"] > 0 and s["spill_pct"] == 0  # past the top tier, yet nothing went to MLX
    assert all(r is not None for r in _records(ours)) and RELOADED not in capsys.readouterr().err
    spill, _ = npumoe_mlx.load(str(path), offload="onnx", quiet=True, overflow="spill")
    assert all(r is None for r in _records(spill))  # spill runs overflow on MLX: copies kept


def test_lazy_load_releases_without_reading_the_experts_twice(cold):
    stock, tok = stock_load(str(cold))
    want = greedy(stock, tok)
    ours, tok2 = npumoe_mlx.load(str(cold), offload="onnx", quiet=True, lazy=True)
    assert all(r is not None for r in _records(ours))
    assert greedy(ours, tok2) == want


# --- the decision -------------------------------------------------------------------------


def test_release_follows_the_cost_of_decode_on_programs_and_the_memory_budget(cold, capsys):
    from mlx_lm.utils import load

    from npumoe_mlx.bundle import bundle as bundles
    from npumoe_mlx.runtime.experts import find_expert_blocks

    b = bundles.read(cold / "npumoe-onnx")
    slow = MLX_WINS
    lp = b.plan.layers[0]
    assert program_only(lp, EAGER)[0] and not program_only(lp, slow)[0]
    model, _, config = load(str(cold), return_config=True)
    blocks = {x.layer: x for x in find_expert_blocks(model, config)}
    fast = plan_resident(b.plan, model, blocks, EAGER, keep_mlx_experts=False)
    assert sorted(fast["release"]) == [0, 1] and fast["released"] > 0
    assert fast["total"] == fast["mlx"] + fast["programs"]
    assert plan_resident(b.plan, model, blocks, slow, keep_mlx_experts=False)["release"] == {}
    tight = plan_resident(b.plan, model, blocks, slow, keep_mlx_experts=False, budget=fast["total"])
    assert sorted(tight["release"]) == [0, 1] and "memory budget" in tight["units"][0]["mlx_copy"]
    half = plan_resident(b.plan, model, blocks, slow, keep_mlx_experts=False, budget=fast["total"] + 1
                         + min(fast["units"][l]["programs"] for l in (0, 1)))
    assert len(half["release"]) == 1  # just enough to fit
    assert plan_resident(b.plan, model, blocks, EAGER, keep_mlx_experts=True)["release"] == {}
    # `npumoe plan` says it per layer
    assert cli.main(["plan", "--model", str(cold)]) == 0
    out = capsys.readouterr().out
    assert "MLX releases" in out and out.count("MLX copy of program experts released: decode on programs") == 2
    assert cli.main(["plan", "--model", str(cold), "--keep-mlx-experts"]) == 0
    assert out.count("kept (--keep-mlx-experts)") == 0 and capsys.readouterr().out.count("kept (--keep-mlx-experts)") == 2


def test_compare_reports_resident_bytes_per_unit(cold, tmp_path):
    from npumoe_mlx.tools import compare as cmp

    runs = {}
    for keep in (False, True):
        out = tmp_path / str(keep)
        runs[keep] = cmp.compare(str(cold), prompt_tokens=(40,), max_tokens=3, backend="onnx", out_dir=out,
                                 prefill_step=64, check_logits=False, log=lambda m: None, keep_mlx_experts=keep)
        assert runs[keep]["token_agreement"] == 1.0 and runs[keep]["keep_mlx_experts"] is keep
        assert "## Resident weights per unit" in (out / "compare.md").read_text()
    rel, kept = runs[False]["resident"], runs[True]["resident"]
    assert kept["offload"]["released"] == 0 and kept["offload"]["mlx"] == kept["stock"]["mlx"]
    assert rel["offload"]["released"] > 0 and rel["offload"]["programs"] == kept["offload"]["programs"] > 0
    assert rel["offload"]["mlx"] == rel["stock"]["mlx"] - rel["offload"]["released"]
    assert {int(k) for k in rel["offload"]["units"]} == {0, 1}


def test_generate_stats_say_which_experts_mlx_does_not_hold(cold, capsys):
    rc = cli.main(["generate", "--model", str(cold), "--prompt", "hi", "--max-tokens", "3", "--stats"])
    out = capsys.readouterr().out
    assert rc == 0 and "MoE layer calls stayed on MLX" not in out
    line = [l for l in out.splitlines() if l.startswith("MLX does not hold ")]
    assert len(line) == 1 and " experts of 2 layers (" in line[0] and "decode included" in line[0]
    rc = cli.main(["generate", "--model", str(cold), "--prompt", "hi", "--max-tokens", "3", "--stats",
                   "--keep-mlx-experts"])
    assert rc == 0 and "MLX does not hold" not in capsys.readouterr().out


def test_install_checks_the_files_bytes_before_releasing(cold, capsys):
    """A model built elsewhere is checked byte for byte against its safetensors: a block whose
    arrays differ (here a cold expert's row, which no program checks) keeps MLX's copy."""
    stock, tok = stock_load(str(cold))
    want = greedy(stock, tok)
    ours, _ = stock_load(str(cold))
    assert npumoe_mlx.install(ours, offload="onnx", model_path=str(cold), quiet=True) == "onnx"
    assert all(r is not None for r in _records(ours)) and greedy(ours, tok) == want
    edited, _ = stock_load(str(cold))
    lp = bundles_plan(cold).layers[1]
    blk = dict(edited.named_modules())[lp.path]
    w = blk.gate_proj.weight
    blk.gate_proj.weight = w.at[lp.cold[0]].add(1.0)  # a cold expert's row only
    capsys.readouterr()
    npumoe_mlx.install(edited, offload="onnx", model_path=str(cold))
    recs = _records(edited)
    assert recs[0] is not None and recs[1] is None
    err = capsys.readouterr().err
    assert f"layer 1: keeping MLX's copy of its offloaded experts: {lp.path}.gate_proj.weight differs from the model's safetensors" in err


def bundles_plan(path):
    from npumoe_mlx.bundle import bundle as bundles

    return bundles.read(path / "npumoe-onnx").plan
