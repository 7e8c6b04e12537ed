"""Offloaded models under what mlx-lm users do to a model (issue 13): new weights,
quantize, dtype changes, gradients and LoRA, compile and vmap, deepcopy and pickle,
half precision on MLX's CPU. Each against stock mlx_lm on a real onnx bundle."""

import copy
import os
import pickle

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm import load as stock_load
from mlx_lm.models.switch_layers import SwitchLinear
from mlx_lm.tuner.trainer import default_loss
from mlx_lm.tuner.utils import linear_to_lora_layers

import npumoe_mlx
from npumoe_mlx.runtime import guard
from npumoe_mlx.runtime.executor import offload_stats
from npumoe_mlx.runtime.experts import installed_blocks, stock_experts
from npumoe_mlx.tools.tiny import make_tiny_model

from conftest import build, greedy

# Programs always win: every call, decode included, goes through the programs.
PROMPT = "The quick brown fox jumps over the lazy dog. " * 2
CHANGED = "expert weights changed since the programs were built"


@pytest.fixture(scope="module", params=["qwen3_moe", "qwen2_moe"])  # qwen2_moe: + shared experts
def tiny(request, tmp_path_factory):
    path = make_tiny_model(tmp_path_factory.mktemp("wf") / "m", request.param, seed=2)
    build(path, tokens=128, chunk_size=64)
    return path


def _ours(path, offload="onnx"):
    return npumoe_mlx.load(str(path), offload=offload, quiet=True)


def _ids(tok):
    return mx.array(tok.encode(PROMPT))[None]


def _offloaded(model) -> int:
    return sum(s.offloaded for s in offload_stats(model))


def _changed_notices(err: str):
    return [l for l in err.splitlines() if CHANGED in l]


def _close(a, b, rtol=1e-5, atol=1e-9):
    """Within rtol of b's largest magnitude (atol: for gradients that are rounding noise)."""
    a, b = np.array(a), np.array(b)
    return a.shape == b.shape and float(np.abs(a - b).max()) <= rtol * float(np.abs(b).max()) + atol


# --- 1. programs are tied to the weights they were built from -------------------


def _scaled_experts(model):
    """New expert weights (routed and shared) for ``model.update`` / ``load_weights``."""
    return [(k, v * 1.5) for k, v in tree_flatten(model.parameters()) if "expert" in k or "switch_mlp" in k]


def _update(m, new):
    m.update(tree_unflatten(new))


def _load_weights(m, new):
    m.load_weights(new, strict=False)


def _quantize(m, new):
    nn.quantize(m, group_size=32, bits=4)


def _dtype_round_trip(m, new):
    m.set_dtype(mx.float16)
    m.set_dtype(mx.float32)


def _add_bias(m, new):
    """A new parameter key (a bias) on every routed and shared expert projection."""
    for path, mod in m.named_modules():
        if isinstance(mod, SwitchLinear) or (".shared_expert." in path and isinstance(mod, nn.Linear)):
            mod.bias = mx.full(mod.weight.shape[:-1], 0.1)


@pytest.mark.parametrize("change", [_update, _load_weights, _quantize, _dtype_round_trip, _add_bias],
                         ids=["update", "load_weights", "quantize", "set_dtype", "new_bias"])
def test_weight_change_runs_on_mlx_with_one_notice(tiny, change, capsys):
    stock, tok = stock_load(str(tiny))
    ours, _ = _ours(tiny)
    ids = _ids(tok)
    ours(ids)  # programs ran on the weights they were built from
    assert _offloaded(ours) > 0 and capsys.readouterr().err == ""
    new = _scaled_experts(stock)
    change(stock, new)
    change(ours, new)
    before = _offloaded(ours)
    want = stock(ids)
    assert np.array_equal(np.array(ours(ids)), np.array(want))  # stock MLX with the new weights
    assert np.array_equal(np.array(ours(ids)), np.array(want))
    assert _offloaded(ours) == before  # no program ran on stale weights
    notices = _changed_notices(capsys.readouterr().err)
    assert len(notices) == 1, notices
    assert notices[0].startswith("[npumoe] layer 0 (model.layers.0.mlp.")
    assert notices[0].endswith(f"rebuild the programs with `npumoe build --model {tiny} --backend onnx --force`")
    assert all(s.fallback == CHANGED for s in offload_stats(ours))


def test_reference_executor_follows_weight_changes(tiny, capsys):
    stock, tok = stock_load(str(tiny))
    ours, _ = _ours(tiny, offload="mlx")
    ids = _ids(tok)
    ours(ids)
    new = _scaled_experts(stock)
    for m in (stock, ours):
        _update(m, new)
    assert _close(ours(ids), stock(ids))
    for m in (stock, ours):
        nn.quantize(m, group_size=32, bits=4)
    assert _close(ours(ids), stock(ids))
    assert capsys.readouterr().err == ""  # nothing baked in, nothing to rebuild


# --- 2. gradients --------------------------------------------------------------------


def _loss(model, ids):
    return nn.losses.cross_entropy(model(ids[:, :-1]), ids[:, 1:]).mean()


def test_value_and_grad_equals_stock_every_parameter(tiny, capsys):
    stock, tok = stock_load(str(tiny))
    ours, _ = _ours(tiny)
    ids = _ids(tok)
    ls, gs = nn.value_and_grad(stock, _loss)(stock, ids)
    before = _offloaded(ours)
    lo, go = nn.value_and_grad(ours, _loss)(ours, ids)
    assert _offloaded(ours) > before  # the forward ran on the programs
    assert _close(lo, ls)
    gs, go = dict(tree_flatten(gs)), dict(tree_flatten(go))
    assert gs.keys() == go.keys()
    experts = [k for k in gs if "switch_mlp" in k]
    assert experts and all(float(mx.abs(gs[k]).max()) > 0 for k in experts)
    bad = [k for k in gs if not _close(go[k], gs[k])]
    assert bad == []
    # the same weights after the transform: programs keep running, no notice
    before = _offloaded(ours)
    assert _close(ours(ids), stock(ids), 1e-4)
    assert _offloaded(ours) > before and _changed_notices(capsys.readouterr().err) == []


def test_grad_and_vjp_wrt_input_of_an_offloaded_block(tiny):
    ours, tok = _ours(tiny)
    blk = installed_blocks(ours)[0]
    D = blk.gate_proj.weight.shape[-1]
    x = mx.random.normal((5, D), key=mx.random.key(1))
    inds = mx.array([[0, 1], [2, 3], [1, 2], [0, 3], [3, 1]], dtype=mx.uint32)
    cot = mx.random.normal((5, 2, D), key=mx.random.key(2))
    want = mx.grad(lambda x: (stock_experts(blk, x, inds) * cot).sum())(x)
    before = _offloaded(ours)
    got = mx.grad(lambda x: (blk(x, inds) * cot).sum())(x)
    assert _offloaded(ours) > before and _close(got, want)
    (_, ), (vjp_x, ) = mx.vjp(lambda x: blk(x, inds), [x], [cot])
    assert _close(vjp_x, want)


def test_jvp_like_stock_never_a_silent_zero(tiny):
    """Forward-mode derivatives: MLX has none for gather_mm (the same error as stock);
    a shared expert's (plain matmuls) equals stock's."""
    ours, _ = _ours(tiny)
    blk = installed_blocks(ours)[0]
    D = blk.gate_proj.weight.shape[-1]
    x = mx.random.normal((8, D), key=mx.random.key(4))
    t = mx.random.normal((8, D), key=mx.random.key(5))
    inds = mx.array(np.arange(16).reshape(8, 2) % 4, dtype=mx.uint32)
    with pytest.raises(ValueError) as want:
        mx.jvp(lambda x: stock_experts(blk, x, inds), [x], [t])
    with pytest.raises(ValueError) as got:
        mx.jvp(lambda x: blk(x, inds), [x], [t])
    assert str(got.value) == str(want.value)
    for _, mlp in ours.named_modules():
        if hasattr(mlp, "stock_class"):
            before = mlp.executor.stats.offloaded
            (_,), (got,) = mx.jvp(mlp, [x], [t])
            (_,), (want,) = mx.jvp(lambda x: mlp.stock_class.__call__(mlp, x), [x], [t])
            assert mlp.executor.stats.offloaded > before and _close(got, want)


def test_lora_step_with_mlx_lm_tuner_equals_stock(tiny, capsys):
    """One optimizer step of mlx_lm's LoRA recipe: the last layer's experts get adapters
    (they run on MLX from then on), the first layer's frozen experts keep their programs."""
    ids = _ids(stock_load(str(tiny))[1])
    batch = mx.concatenate([ids, ids[:, ::-1]], axis=0)[:, :24]
    lengths = mx.array([[0, 23], [0, 23]])
    runs = {}
    for name in ("stock", "ours"):
        model = stock_load(str(tiny))[0] if name == "stock" else _ours(tiny)[0]
        model.freeze()
        mx.random.seed(5)
        linear_to_lora_layers(model, 1, {"rank": 4, "scale": 10.0, "dropout": 0.0})
        trainable = dict(tree_flatten(model.trainable_parameters()))
        assert trainable and all("lora" in k for k in trainable)
        # non-zero adapters, so that the step's gradients reach every LoRA weight
        model.update(tree_unflatten([(k, v + 0.01) for k, v in trainable.items() if "lora_b" in k]))
        opt = optim.SGD(learning_rate=0.5)  # Adam would turn rounding-noise gradients into full steps
        before = _offloaded(model) if name == "ours" else 0
        (loss, ntoks), grad = nn.value_and_grad(model, default_loss)(model, batch, lengths)
        opt.update(model, grad)
        mx.eval(model.parameters(), opt.state)
        if name == "ours":
            st = offload_stats(model)
            assert st[0].offloaded > 0 and sum(s.offloaded for s in st) > before  # layer 0 ran programs
        runs[name] = (loss, dict(tree_flatten(grad)), dict(tree_flatten(model.trainable_parameters())))
    (ls, gs, ps), (lo, go, po) = runs["stock"], runs["ours"]
    assert _close(lo, ls)
    assert gs.keys() == go.keys() and [k for k in gs if not _close(go[k], gs[k])] == []
    assert [k for k in ps if not _close(po[k], ps[k])] == []
    assert len(_changed_notices(capsys.readouterr().err)) == 1  # the adapters changed layer 1's experts


# --- compile and vmap ----------------------------------------------------------------


def test_compile_forward_equals_stock(tiny):
    stock, tok = stock_load(str(tiny))
    ours, _ = _ours(tiny)
    ids = _ids(tok)
    want = mx.compile(stock)(ids)
    got = mx.compile(ours)
    assert _close(got(ids), want) and _close(got(ids), want)
    assert _close(ours(ids), want, 1e-4)  # and the model still runs its programs outside it
    assert _offloaded(ours) > 0


def test_compile_with_the_state_as_inputs_keeps_the_programs(tiny, capsys):
    """Inside the trace the weights are placeholders (not a weight change); afterwards the
    state holds new arrays over the same memory: the programs keep running, no notice."""
    stock, tok = stock_load(str(tiny))
    ours, _ = _ours(tiny)
    ids = _ids(tok)
    fwd = mx.compile(lambda ids: ours(ids), inputs=ours.state, outputs=ours.state)
    assert _close(fwd(ids), stock(ids))
    before = _offloaded(ours)
    assert _close(ours(ids), stock(ids), 1e-4)
    assert _offloaded(ours) > before and _changed_notices(capsys.readouterr().err) == []


def test_compiled_training_step_with_state_inputs(tiny, capsys):
    """mlx_lm's trainer compiles its step with the model state as inputs and outputs."""
    ids = _ids(stock_load(str(tiny))[1])
    out = {}
    for name in ("stock", "ours"):
        model = stock_load(str(tiny))[0] if name == "stock" else _ours(tiny)[0]
        opt = optim.SGD(learning_rate=1e-1)
        state = [model.state, opt.state]
        step = mx.compile(lambda ids: _step(model, opt, ids), inputs=state, outputs=state)
        losses = [step(ids).item() for _ in range(2)]
        out[name] = (losses, model(ids))
    assert np.allclose(out["ours"][0], out["stock"][0], rtol=1e-5)
    assert _close(out["ours"][1], out["stock"][1], 1e-4)
    assert len(_changed_notices(capsys.readouterr().err)) == 1  # training changed the experts


def _step(model, opt, ids):
    loss, grad = nn.value_and_grad(model, _loss)(model, ids)
    opt.update(model, grad)
    return loss


def test_vmap_of_an_offloaded_block_behaves_like_stock(tiny):
    """MLX cannot vmap SwitchGLU's gather_mm: the offloaded block says the same, not
    "[eval] Attempting to eval an array during function transformations"."""
    ours, _ = _ours(tiny)
    blk = installed_blocks(ours)[0]
    D = blk.gate_proj.weight.shape[-1]
    x = mx.random.normal((3, 4, D), key=mx.random.key(3))
    inds = mx.array(np.random.default_rng(0).integers(0, 4, (3, 4, 2)), dtype=mx.uint32)
    with pytest.raises(ValueError) as want:
        mx.vmap(lambda x, i: stock_experts(blk, x, i))(x, inds)
    with pytest.raises(ValueError) as got:
        mx.vmap(lambda x, i: blk(x, i))(x, inds)
    assert str(got.value) == str(want.value) == "[Primitive::vmap] Not implemented for GatherMM."
    # vmap over the tokens of a dense shared expert works, and equals stock
    shared = [m for _, m in ours.named_modules() if type(m).__name__.startswith("Offloaded") and hasattr(m, "stock_class")]
    assert bool(shared) == (ours.model_type == "qwen2_moe")  # its shared experts are offloaded
    for mlp in shared:
        want = mx.vmap(lambda x: mlp.stock_class.__call__(mlp, x))(x)
        assert _close(mx.vmap(mlp)(x), want)


# --- 3. copies ------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copy_after_a_call_generates_the_same_tokens(tiny, how):
    stock, tok = stock_load(str(tiny))
    want = greedy(stock, tok, PROMPT, 8)
    ours, _ = _ours(tiny)
    assert greedy(ours, tok, PROMPT, 8) == want  # sessions are open now
    twin = copy.deepcopy(ours) if how == "deepcopy" else pickle.loads(pickle.dumps(ours))
    before = _offloaded(twin)
    assert greedy(twin, tok, PROMPT, 8) == want
    assert _offloaded(twin) > before  # the copy reopened its programs
    assert greedy(ours, tok, PROMPT, 8) == want
    assert dict(tree_flatten(twin.parameters())).keys() == dict(tree_flatten(ours.parameters())).keys()


@pytest.mark.parametrize("backend", ["onnx", "mlx"])
def test_programs_copy_and_pickle_after_a_run(backend):
    from mlx_lm.models.switch_layers import SwitchGLU

    from npumoe_mlx.backends import load_backend
    from npumoe_mlx.build.programs import spec_from_switch_glu

    spec = spec_from_switch_glu(SwitchGLU(32, 16, 4), layer=0, expert_ids=[0, 1], tiers=[4, 8])
    p = load_backend(backend).load(spec)  # onnx: graphs in memory, no files
    x = np.random.default_rng(0).random((2, 4, 32), np.float32)
    want = p.run(x, 4).copy()
    for twin in (copy.deepcopy(p), pickle.loads(pickle.dumps(p))):
        assert getattr(twin, "sessions", {}) == {}  # handles are reopened, never copied
        assert np.allclose(twin.run(x, 4), want, rtol=1e-6, atol=1e-7)


def test_coreml_program_copies_reopen_their_models(monkeypatch, tmp_path):
    """Core ML runs only on macOS: the reopen path is checked with a stand-in model class."""
    import coremltools as ct

    from npumoe_mlx.backends.coreml import CoreMLProgram

    opened = []

    class Compiled:
        def __init__(self, path, compute_units, function_name):
            opened.append((path, compute_units, function_name))

        def predict(self, feeds):
            return {"y": next(iter(feeds.values())) * 2}

    monkeypatch.setattr(ct.models, "CompiledMLModel", Compiled)
    monkeypatch.setattr("npumoe_mlx.backends.coreml.OUTPUT_NAME", "y")
    p = CoreMLProgram("L0_e0-1", {16: object()}, 2, 8, tmp_path / "p.mlmodelc", functions={16: "c16"})
    twin = pickle.loads(pickle.dumps(p))
    assert twin.models == {} and twin.tiers == (16,)
    x = np.ones((2, 16, 8), np.float32)
    assert np.array_equal(twin.run(x, 16), x * 2)
    assert opened == [(str(tmp_path / "p.mlmodelc"), ct.ComputeUnit.CPU_AND_NE, "c16")]


# --- 4. half precision on MLX's CPU -------------------------------------------------


@pytest.mark.parametrize("offload", ["onnx", "mlx"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_on_cpu_gets_one_clear_line(tiny, offload, dtype):
    ours, tok = _ours(tiny, offload)
    ours.set_dtype(getattr(mx, dtype))
    blk = installed_blocks(ours)[0]
    path = [p for p, m in ours.named_modules() if m is blk][0]
    with pytest.raises(ValueError) as e:
        ours(_ids(tok))
    assert str(e.value) == (
        f"layer 0 ({path}): {dtype} expert weights need MLX's GPU (Metal); on CPU use a float32 or quantized "
        "model: model.set_dtype(mx.float32) or nn.quantize(model), or convert it with "
        "`mlx_lm.convert --dtype float32` or `mlx_lm.convert -q`"
    )
    nn.quantize(ours, group_size=32, bits=4)  # quantized half weights run on CPU
    mx.eval(ours(_ids(tok)))


def test_half_precision_on_gpu_is_left_to_mlx(tiny, monkeypatch):
    ours, tok = _ours(tiny)
    ours.set_dtype(mx.float16)
    gpu = type("Device", (), {"type": mx.DeviceType.gpu})()
    monkeypatch.setattr(guard.mx, "default_device", lambda: gpu)
    blk = installed_blocks(ours)[0]
    assert guard.cpu_half_error("b", (blk.gate_proj, blk.up_proj, blk.down_proj)) is None
    ours(_ids(tok))  # builds the graph; MLX's GPU would run it
