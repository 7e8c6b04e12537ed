"""Calibration on the host BLAS (build/host_ffn.py): the expert FFN computed with numpy equals
stock MLX's, a calibration on it counts the same pairs, and the decisions of when it (and
onnxruntime for the linears) is used."""

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import numpy as np
import pytest
from mlx_lm.models.gemma4_text import GeGLU
from mlx_lm.models.gpt_oss import SwigluOAI
from mlx_lm.models.switch_layers import SwitchGLU

from ane_kernels.spec import AffineWeight, unpack_bits
import npumoe_mlx
from npumoe_mlx.build import calibrate as cal
from npumoe_mlx.build import host_ffn, workloads
from npumoe_mlx.runtime import dense, experts
from npumoe_mlx.tools.tiny import make_tiny_model


def _glu(kind: str) -> SwitchGLU:
    mx.random.seed(1)
    act = {"swiglu_oai": SwigluOAI(), "geglu": GeGLU()}.get(kind)
    glu = SwitchGLU(64, 32, 6, bias=kind == "swiglu_oai", **({"activation": act} if act else {}))
    if kind == "q4":
        nn.quantize(glu, group_size=32, bits=4)
    mx.eval(glu.parameters())
    return glu


@pytest.mark.parametrize("kind", ["f32", "q4", "swiglu_oai", "geglu"])
def test_experts_ffn_equals_stock(kind):
    glu = _glu(kind)
    x = mx.random.normal((2, 30, 64), key=mx.random.key(2)) * 2
    inds = mx.array(np.random.default_rng(3).integers(0, 5, (2, 30, 2)).astype(np.uint32))  # expert 5 unused
    y, max_abs = host_ffn.experts_ffn(glu, x, inds, sample=range(60))
    want = glu(x, inds)
    assert y.shape == want.shape == (2, 30, 2, 64) and y.dtype == x.dtype
    np.testing.assert_allclose(np.array(y), np.array(want), rtol=1e-4, atol=1e-5)
    if kind != "swiglu_oai":  # calibration's MLX range of the same sample (it has no bias term)
        np.testing.assert_allclose(max_abs, np.array(cal.ffn_max_abs(glu, x.reshape(60, 64), inds.reshape(60, 2))),
                                   rtol=1e-4)


def test_range_is_over_the_sampled_tokens_only():
    glu = _glu("f32")
    x = mx.concatenate([mx.ones((1, 64)) * 100, mx.random.normal((9, 64), key=mx.random.key(0))])  # token 0: huge
    inds = mx.array(np.random.default_rng(0).integers(0, 6, (10, 2)).astype(np.uint32))
    _, all_ = host_ffn.experts_ffn(glu, x, inds, sample=range(10))
    _, rest = host_ffn.experts_ffn(glu, x, inds, sample=range(1, 10))
    _, none = host_ffn.experts_ffn(glu, x, inds, sample=())
    assert (all_ > 10 * rest).all() and (none == 0).all()


def test_unsupported_block_says_why():
    glu = _glu("f32")
    glu.activation = nn.GELU()
    assert "unsupported SwitchGLU activation GELU" in host_ffn.supported(glu)
    assert host_ffn.supported(_glu("q4")) is None


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dequantize_fast_path_equals_unpack(bits, dtype):
    rng = np.random.default_rng(bits)
    packed = rng.integers(0, 2**32, (3, 5, 64 * bits // 32), dtype=np.uint64).astype(np.uint32)
    s, b = rng.random((3, 5, 2), dtype=np.float32), rng.standard_normal((3, 5, 2), dtype=np.float32)
    got = AffineWeight(packed, s, b, bits, 32).dequantize(dtype)
    q = unpack_bits(packed, bits).reshape(3, 5, 2, 32).astype(dtype)
    want = (q * s[..., None].astype(dtype) + b[..., None].astype(dtype)).reshape(3, 5, 64)
    assert got.dtype == dtype and np.array_equal(got, want)


@pytest.fixture(scope="module")
def q4_model(tmp_path_factory):
    path = make_tiny_model(tmp_path_factory.mktemp("host") / "m", "qwen3_moe", q_bits=4, seed=5, num_experts=16)
    model, tok, config = mlx_lm.load(str(path), return_config=True)
    docs = [workloads.long_context(200, 0), workloads.code_like(150, 1)]
    return model, tok, config, docs


def test_host_calibration_counts_what_mlx_counts(q4_model):
    model, tok, config, docs = q4_model
    kw = dict(chunk_size=128, max_tokens=500, batched=True)
    on_mlx = cal.calibrate(model, tok, config, docs, host=False, **kw)
    on_host = cal.calibrate(model, tok, config, docs, host=True, **kw)
    for a, b in zip(on_mlx.layers, on_host.layers):
        assert a.counts == b.counts and a.chunks == b.chunks
        assert b.max_abs == pytest.approx(a.max_abs, rel=1e-4)
    assert not experts.installed_blocks(model) and not dense.installed(model)


def test_host_is_the_default_when_mlx_runs_on_the_cpu(q4_model, monkeypatch):
    model, tok, config, docs = q4_model
    calls = []
    real = host_ffn.experts_ffn
    monkeypatch.setattr(host_ffn, "experts_ffn", lambda *a: calls.append(1) or real(*a))
    cal.calibrate(model, tok, config, docs[:1], chunk_size=128, max_tokens=100)
    assert calls and host_ffn.wanted()  # this machine: MLX on the CPU
    calls.clear()
    monkeypatch.setattr(host_ffn, "wanted", lambda: False)  # e.g. a Mac GPU
    cal.calibrate(model, tok, config, docs[:1], chunk_size=128, max_tokens=100)
    assert not calls


def test_linears_on_onnxruntime_only_when_worth_it(q4_model, monkeypatch):
    model, tok, config, docs = q4_model
    seen = []
    real = dense.install

    def spy(m, **kw):
        out = real(m, **kw)
        seen.append((kw, len(dense.installed(m))))
        return out

    monkeypatch.setattr(dense, "install", spy)
    kw = dict(chunk_size=128, max_tokens=300, host=True)
    base = cal.calibrate(model, tok, config, docs, **kw)
    assert not seen  # a tiny model: MLX spends far less than DENSE_WORTH_S on its linears
    monkeypatch.setattr(cal, "DENSE_WORTH_S", 0.0)
    got = cal.calibrate(model, tok, config, docs, **kw)
    assert seen and seen[0][0]["heads"] is False and seen[0][1] > 0  # the attention's linears ran on onnxruntime
    assert [l.counts for l in got.layers] == [l.counts for l in base.layers]
    assert not dense.installed(model) and not experts.installed_blocks(model)  # removed with the recorders



def test_linears_go_to_onnxruntime_by_mlxs_measured_rate(q4_model, monkeypatch):
    """The decision uses the rate MLX's nn.Linear runs at here (timed), not a constant: a 6e9
    constant kept a 4-layer Qwen3-30B-A3B's linears on MLX (41.6 s calibration, 11.9 s with them
    on onnxruntime) because x @ W.T runs at 2.4-2.5 GFLOP/s here."""
    model, tok, config, docs = q4_model
    rate = cal.mlx_linear_flops()
    assert cal.SLOW_FLOPS < rate < 1e13, rate  # MLX's CPU linears, measured
    seen = []
    monkeypatch.setattr(dense, "install", lambda m, **kw: seen.append(kw))
    monkeypatch.setattr(cal, "SLOW_FLOPS", 1.0)  # past the cheap bound (seconds at the slowest rate): the timed rate decides
    for measured, installs in ((1e30, False), (1.0, True)):
        monkeypatch.setattr(cal, "mlx_linear_flops", lambda: measured)
        seen.clear()
        assert cal._dense_linears(model, 300) is installs and bool(seen) is installs


def test_linears_stay_on_mlx_without_onnxruntime(q4_model, monkeypatch, capsys):
    model, tok, config, docs = q4_model

    def refuse(m, **kw):
        raise dense.DenseError("no dynamic provider here")

    monkeypatch.setattr(dense, "install", refuse)
    monkeypatch.setattr(cal, "DENSE_WORTH_S", 0.0)
    prof = cal.calibrate(model, tok, config, docs, chunk_size=128, max_tokens=300, host=True)
    assert prof.tokens == 300
    assert "[npumoe] calibration's linears stay on MLX (no dynamic provider here)\n" in capsys.readouterr().err


@pytest.mark.parametrize("choice,on_host", [("auto", True), ("numpy", True), ("mlx", False)])
def test_calibrate_with_flag_picks_what_computes_the_ffns(tmp_path, monkeypatch, capsys, choice, on_host):
    """`--calibrate-with` on `npumoe calibrate`, `npumoe build` and `npumoe convert` (auto: numpy here, where MLX runs on
    the CPU); mlx gives the counts generation's own FFNs give, bit for bit."""
    from conftest import run_cli

    path = make_tiny_model(tmp_path / "m", "qwen3_moe", seed=3)
    calls = []
    real = host_ffn.experts_ffn
    monkeypatch.setattr(host_ffn, "experts_ffn", lambda *a: calls.append(1) or real(*a))
    rc, out, err = run_cli(capsys, "calibrate", "--model", path, "--tokens", "64", "--calibrate-with", choice,
                           "--out", tmp_path / "p.json")
    assert rc == 0 and (tmp_path / "p.json").is_file(), err
    assert bool(calls) == on_host
    calls.clear()
    rc, out, err = run_cli(capsys, "build", "--model", path, "--out", tmp_path / "b", "--no-tune", "--tokens", "32",
                           "--calibrate-with", choice)
    assert rc == 0 and (tmp_path / "b" / "manifest.json").is_file(), err
    assert bool(calls) == on_host
    calls.clear()
    rc, out, err = run_cli(capsys, "convert", "--hf-path", path, "--tokens", "32", "--no-tune", "--calibrate-with", choice)
    assert rc == 0 and "generate with: npumoe generate" in out, err
    assert bool(calls) == on_host


def test_calibrate_with_refuses_other_values(capsys):
    from conftest import run_cli

    with pytest.raises(SystemExit) as e:
        run_cli(capsys, "calibrate", "--model", "x", "--calibrate-with", "gpu")
    assert e.value.code == 2 and "invalid choice: 'gpu' (choose from 'auto', 'numpy', 'mlx')" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"^--calibrate-with must be one of auto, numpy, mlx, got 'gpu'$"):
        npumoe_mlx.convert("x", calibrate_with="gpu")
