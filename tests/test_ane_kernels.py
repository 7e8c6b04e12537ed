"""ane_kernels: spec/reference, Core ML builder x ANE checks x numpy verifier, ONNX graphs."""

import sys
from pathlib import Path

import numpy as np
import pytest

from ane_kernels.coreml import build_package, build_program, read_metadata
from ane_kernels.limits import LimitError, Limits, check_program, check_spec
from ane_kernels.milrun import UnsupportedOp, rel_err, run_function, verify_package
from ane_kernels.onnx import build_onnx, make_dynamic, op_counts, save_onnx, weights_path
from ane_kernels.spec import (
    AffineWeight,
    ProgramSpec,
    pack_bits,
    quantize_affine,
    random_spec,
    reference_ffn,
)

ACTS = ("swiglu", "swiglu_oai", "geglu")
FORMATS = (None, 4, 8)


def _spec(act, bits, **kw):
    kw = {"G": 3, "D": 64, "H": 32, "tiers": (32, 64), **kw}
    return random_spec(activation=act, bits=bits, bias=(act == "swiglu_oai"), seed=7, **kw)


# ---- spec ----


@pytest.mark.parametrize("bits", (2, 4, 8))
def test_unpack_matches_mlx_dequantize(bits):
    mx = pytest.importorskip("mlx.core")
    w = mx.random.normal((16, 128), key=mx.random.key(bits))
    q, s, b = mx.quantize(w, 64, bits)
    aw = AffineWeight(np.array(q)[None], np.array(s)[None], np.array(b)[None], bits, 64)
    ref = np.array(mx.dequantize(q, s, b, 64, bits))
    np.testing.assert_allclose(aw.dequantize()[0], ref, rtol=0, atol=1e-6)
    codes = aw.unpack()
    assert codes.max() < 2**bits
    np.testing.assert_array_equal(pack_bits(codes, bits), aw.packed)


def test_spec_validates_shapes_and_activation():
    s = random_spec()
    with pytest.raises(ValueError, match="up weight"):
        ProgramSpec(0, (0, 1), (32,), 64, 32, "swiglu", s.gate, s.gate[:, :16], s.down)
    with pytest.raises(ValueError, match="unknown activation 'relu2'"):
        ProgramSpec(0, (0, 1), (32,), 64, 32, "relu2", s.gate, s.up, s.down)


# ---- Core ML: build, check, save, load back, execute with numpy ----


def _weight_bin(pkg):
    return pkg / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"


@pytest.mark.parametrize("bits", FORMATS, ids=("float", "q4", "q8"))
@pytest.mark.parametrize("act", ACTS)
def test_coreml_build_verify(tmp_path, act, bits):
    spec = _spec(act, bits, tiers=(32, 64, 128) if bits == 4 else (32, 64))
    b = build_package(spec, tmp_path / "p.mlpackage")
    assert b.problems == []
    assert set(b.functions) == {f"c{t}" for t in spec.tiers}
    # one copy of the weights for all tier functions (Core ML const dedup)
    wbin = _weight_bin(b.path).stat().st_size
    assert b.weight_bytes <= wbin < 1.15 * b.weight_bytes + 4096, (wbin, b.weight_bytes)
    if bits:  # stays compressed: codes take bits/16 of the fp16 size
        fp16 = 2 * spec.G * 3 * spec.D * spec.H
        assert wbin < fp16 * (bits / 16 + 0.15)
    r = verify_package(b.path, spec, x_scale=3.0)
    assert r["ok"], r
    assert set(r["functions"]) == set(b.functions)
    assert r["max_rel_err"] < 1e-2
    assert read_metadata(b.path)["expert_ids"] == list(spec.expert_ids)


@pytest.mark.parametrize("act", ("swiglu_oai", "geglu_exact"))
def test_coreml_matmul_layout(tmp_path, act):
    spec = _spec(act, 4, tiers=(32,))
    b = build_package(spec, tmp_path / "m.mlpackage", layout="matmul")
    assert verify_package(b.path, spec, x_scale=3.0)["max_rel_err"] < 1e-2


def test_coreml_rebuild_replaces_atomically(tmp_path):
    out = tmp_path / "p.mlpackage"
    build_package(_spec("swiglu", None, tiers=(32,)), out)
    spec2 = _spec("swiglu", 4, tiers=(32, 64))
    build_package(spec2, out)
    assert read_metadata(out)["weight_format"] == "q4g32"
    assert [p.name for p in tmp_path.iterdir()] == ["p.mlpackage"]  # no temp leftovers
    assert verify_package(out, spec2)["ok"]


def test_degenerate_quant_groups(tmp_path):
    """Constant groups (scale ~ 0, offset -bias/scale not finite in fp16) still build exactly."""
    spec = _spec("swiglu", None, tiers=(32,))
    gate = spec.gate.copy()
    gate[0, :4, :32] = 0.25  # whole groups constant
    q = lambda w: quantize_affine(w, 4, 32)
    spec = ProgramSpec(0, (0, 1, 2), (32,), 64, 32, "swiglu", q(gate), q(spec.up), q(spec.down))
    b = build_package(spec, tmp_path / "d.mlpackage")
    assert verify_package(b.path, spec)["max_rel_err"] < 1e-2


# ---- ANE limits ----


def test_limit_axis_names_op_and_axis(tmp_path):
    spec = random_spec(G=1, D=20000, H=32, tiers=(32,))
    with pytest.raises(LimitError) as e:
        build_package(spec, tmp_path / "big.mlpackage")
    msg = str(e.value)
    assert "size 20000 > 16384" in msg and "axis" in msg and "op '" in msg
    assert not (tmp_path / "big.mlpackage").exists()
    # the same program passes on a chip with 65536-wide axes
    assert check_program(build_program(spec, 32), Limits(max_axis=65536)) == []


def test_limit_tier_multiple(tmp_path):
    spec = random_spec(tiers=(32, 48))
    with pytest.raises(LimitError, match="tier capacity 48 is not a multiple of 32"):
        build_package(spec, tmp_path / "t.mlpackage")
    assert check_spec(spec, Limits(tier_multiple=16)) == []


def test_limit_fp32_ops_and_weight_bytes():
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    @mb.program(input_specs=[mb.TensorSpec((4, 32), dtype=types.fp16)], opset_version=ct.target.iOS18)
    def prog(x):
        y = mb.cast(x=x, dtype="fp32", name="to32")
        y = mb.softplus(x=y, name="sp")
        return mb.mul(x=y, y=np.ones((4, 32), np.float32), name="m")

    problems = "\n".join(check_program(prog))
    assert "cast op 'to32' to fp32" in problems
    assert "op 'sp' of type 'softplus' is not on the ANE op list" in problems
    assert "'to32' is fp32" in problems
    spec = random_spec(tiers=(32,))
    tight = Limits(max_weight_bytes=1000, max_ops=3)
    problems = "\n".join(check_program(build_program(spec, 32), tight))
    assert "bytes of constants > max 1000" in problems and "ops > max 3" in problems


# ---- milrun ----


def test_milrun_refuses_unknown_op():
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    @mb.program(input_specs=[mb.TensorSpec((2, 32), dtype=types.fp16)], opset_version=ct.target.iOS18)
    def prog(x):
        return mb.softplus(x=mb.silu(x=x), name="sp")

    with pytest.raises(UnsupportedOp, match="'softplus'"):
        run_function(prog, "main", {"x": np.ones((2, 32), np.float16)})


def test_milrun_program_in_memory_matches_reference():
    spec = _spec("swiglu", 8, tiers=(32,))
    x = np.random.default_rng(1).standard_normal((3, 32, 64)).astype(np.float16)
    (y,) = run_function(build_program(spec, 32), "main", {"x": x.transpose(0, 2, 1)}).values()
    assert y.dtype == np.float16 and y.shape == (3, 64, 32)  # channels first in and out: (G, D, C)
    assert rel_err(y.transpose(0, 2, 1), reference_ffn(spec, x)) < 1e-2


# ---- ONNX ----


@pytest.mark.parametrize("bits", (None, 4, 8), ids=("float", "q4", "q8"))
@pytest.mark.parametrize("act", ACTS + ("geglu_exact",))
def test_onnx_matches_reference(act, bits):
    import onnxruntime as ort

    spec = _spec(act, bits, tiers=(32, 64))
    rng = np.random.default_rng(3)
    for tier in spec.tiers:
        model = build_onnx(spec, tier)
        if bits == 4:
            assert sum(n.op_type == "MatMulNBits" for n in model.graph.node) == 2 * spec.G
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        x = (rng.standard_normal((spec.G, tier, spec.D)) * 3).astype(np.float32)
        (y,) = sess.run(None, {"x": x})
        assert y.shape == x.shape
        assert rel_err(y, reference_ffn(spec, x)) < 1e-5


@pytest.mark.parametrize("bits", (None, 4))
def test_onnx_save_one_graph_per_tier_shared_weights(tmp_path, bits):
    import onnxruntime as ort

    spec = _spec("swiglu_oai", bits, tiers=(32, 64, 128))
    paths = save_onnx(spec, tmp_path)
    assert sorted(paths) == [32, 64, 128]
    wfile = weights_path(tmp_path, spec.name)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted([p.name for p in paths.values()] + [wfile.name])  # no temp leftovers
    # one copy of the weights on disk for all tiers; graphs themselves are small
    raw = 4 * 3 * spec.G * spec.D * spec.H if bits is None else spec.weight_bytes
    assert 0.8 * raw < wfile.stat().st_size < 1.2 * raw
    assert all(p.stat().st_size < 16384 for p in paths.values())
    x = np.random.default_rng(0).standard_normal((spec.G, 128, spec.D)).astype(np.float32)
    for tier, p in paths.items():
        sess = ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
        (y,) = sess.run(None, {"x": x[:, :tier]})
        assert rel_err(y, reference_ffn(spec, x[:, :tier])) < 1e-5
    # rebuilding in place replaces the files
    assert save_onnx(spec, tmp_path) == paths and len(list(tmp_path.iterdir())) == 4


def _half_scales(spec, dtype="float16"):
    """The spec with scales and biases rounded to float16 or bfloat16 (scaled down into
    float16's subnormal range, where only bfloat16 is exact), as MLX fp16/bf16 models store them."""
    def r(a):
        if dtype == "float16":
            return a.astype(np.float16).astype(np.float32)
        a = (a * np.float32(1e-3)).astype(np.float32)
        return (a.view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32)

    for name in ("gate", "up", "down"):
        w = getattr(spec, name)
        setattr(spec, name, AffineWeight(w.packed, r(w.scales), r(w.biases), w.bits, w.group_size))
    return spec


@pytest.mark.parametrize("bits", (2, 4, 8))
def test_onnx_quantized_fast_kernel_exact(bits):
    """Every quantized format runs 4-bit MatMulNBits WITHOUT zero points (the fast kernel)
    plus the exact correction, and matches the dequantized reference to float32 rounding."""
    import onnxruntime as ort

    spec = _spec("swiglu", bits, G=2, D=128, H=32, group_size=32)
    model = build_onnx(spec, 16)
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 2 * spec.G
    for n in nbits:
        attrs = {a.name: a.i for a in n.attribute}
        assert len(n.input) == 3 and attrs["bits"] == 4  # no zero points
        assert attrs["K"] == (2 if bits == 8 else 1) * (spec.D if attrs["N"] == 2 * spec.H else spec.H)
    assert not any(i.data_type == 1 and np.prod(i.dims) >= spec.H * spec.D for i in model.graph.initializer)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = (np.random.default_rng(bits).standard_normal((spec.G, 16, spec.D)) * 3).astype(np.float32)
    (y,) = sess.run(None, {"x": x})
    assert rel_err(y, reference_ffn(spec, x)) < 3e-6


@pytest.mark.parametrize("dtype", ("float16", "bfloat16"))
@pytest.mark.parametrize("bits", (4, 8))
def test_onnx_weight_file_is_the_quantized_bytes(tmp_path, bits, dtype):
    """On disk: codes packed (8-bit too), 16-bit scales/biases kept 16-bit (cast at
    load), so the shared weight file is ~1.0x the MLX quantized bytes, <= 1.1x in all."""
    import onnxruntime as ort

    spec = _half_scales(_spec("swiglu", bits, G=2, D=256, H=128, group_size=64, tiers=(8, 32)), dtype)
    mlx_bytes = sum(w.packed.nbytes + 2 * 2 * w.scales.size for w in (spec.gate, spec.up, spec.down))
    paths = save_onnx(spec, tmp_path)
    total = sum(p.stat().st_size for p in tmp_path.iterdir())
    assert weights_path(tmp_path, spec.name).stat().st_size <= 1.01 * mlx_bytes
    assert total <= 1.1 * mlx_bytes
    x = np.random.default_rng(0).standard_normal((spec.G, 8, spec.D)).astype(np.float32)
    (y,) = ort.InferenceSession(str(paths[8]), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    assert rel_err(y, reference_ffn(spec, x)) < 3e-6


def test_onnx_dynamic_graph_serves_every_tier():
    """The graph does not depend on C: one symbolic-row graph runs any row count."""
    import onnxruntime as ort

    spec = _spec("swiglu_oai", 4, tiers=(8, 32))
    dyn = build_onnx(spec, None)
    assert dyn.graph.input[0].type.tensor_type.shape.dim[1].dim_param == "C"
    made = make_dynamic(build_onnx(spec, 32))
    assert made.graph.input[0].type.tensor_type.shape == dyn.graph.input[0].type.tensor_type.shape
    assert op_counts(made) == op_counts(dyn)
    sess = ort.InferenceSession(dyn.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    for rows in (1, 8, 33):
        x = rng.standard_normal((spec.G, rows, spec.D)).astype(np.float32)
        (y,) = sess.run(None, {"x": x})
        assert rel_err(y, reference_ffn(spec, x)) < 3e-6


@pytest.mark.skipif(sys.platform == "darwin", reason="on macOS a missing Core ML native module is a real fault and is shown")
def test_coreml_build_off_macos_prints_no_native_proxy_noise(tmp_path):
    """Issue 24: a successful Core ML build on Linux printed 8 `Failed to load _MLModelProxy: No module
    named 'coremltools.libcoremlpython'` lines (coremltools' import-time warnings)."""
    import subprocess

    code = ("import sys; from ane_kernels.coreml import build_package; from ane_kernels.spec import random_spec; "
            "b = build_package(random_spec(D=64, H=32, G=2, tiers=(32,), seed=0), sys.argv[1]); print(b.problems)")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "p.mlpackage")], capture_output=True, text=True,
                       cwd=Path(__file__).parents[1], timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]" and (tmp_path / "p.mlpackage").is_dir()
    assert "Failed to load" not in r.stderr and "libcoremlpython" not in r.stderr, r.stderr
