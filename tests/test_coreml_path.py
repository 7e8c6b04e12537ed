"""The Core ML path off macOS: placement check on fake compute plans, weight formats,
channels-first programs, H chunks, and planner caps that match what the builder accepts."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from ane_kernels import formats
from ane_kernels.coreml import build_package, build_program, choose_layout, h_chunks, max_group, read_metadata
from ane_kernels.limits import DEFAULT_LIMITS, Limits, check_program
from ane_kernels.milrun import format_error, load_package, max_rel_err, rel_err, run_function
from ane_kernels.spec import AffineWeight, ProgramSpec, random_spec, reference_ffn
from npumoe_mlx.backends import BackendError, backend_class
from npumoe_mlx.backends import coreml as cm

SHAPES = json.loads(Path("/work/shared/reference/model-shapes.json").read_text()) if Path(
    "/work/shared/reference/model-shapes.json").exists() else {}


# ---- placement: fakes modelled on public MLComputePlan dumps ----
# Names carry the opset ("ios18.conv"; only "const" is bare) and constexpr ops get no
# device usage (a public cpuAndNE dump: "ios18.constexpr_blockwise_shift_scale ... (unknown)").


class MLCPUComputeDevice:
    pass


class MLGPUComputeDevice:
    pass


class MLNeuralEngineComputeDevice:
    pass


class Usage:
    def __init__(self, preferred, supported):
        self.preferred_compute_device = preferred
        self.supported_compute_devices = supported


class Op:
    def __init__(self, name):
        self.operator_name = name


class Plan:
    """A fake MLComputePlan: `devices` maps (function, op index) -> Usage or None."""

    def __init__(self, functions, usage):
        self._usage = usage
        self.ops = {fn: [Op(n) for n in names] for fn, names in functions.items()}
        blocks = {fn: type("F", (), {"block": type("B", (), {"operations": ops})()})() for fn, ops in self.ops.items()}
        self.model_structure = type("S", (), {"program": type("P", (), {"functions": blocks})()})()

    def get_compute_device_usage_for_mlprogram_operation(self, op):
        for fn, ops in self.ops.items():
            if op in ops:
                return self._usage(fn, op)
        raise KeyError(op)


NE, CPU, GPU = MLNeuralEngineComputeDevice(), MLCPUComputeDevice(), MLGPUComputeDevice()
OPS = ["const", "ios18.constexpr_blockwise_shift_scale", "ios18.reshape", "ios18.conv", "ios18.silu",
       "ios18.mul", "ios18.constexpr_blockwise_shift_scale", "ios18.conv", "ios18.reshape"]


def _plan(functions=("c32", "c64"), bad=None, unknown=None):
    def usage(fn, op):
        if op.operator_name == "const" or op.operator_name.startswith("ios18.constexpr_"):
            return None  # what MLComputePlan reports for them
        i = plan.ops[fn].index(op)
        if (fn, i) == unknown:
            return None
        if (fn, i) == bad:
            return Usage(CPU, [CPU, GPU, NE])
        return Usage(NE, [CPU, NE])

    plan = Plan({fn: OPS for fn in functions}, usage)
    return plan


def test_placement_accepts_an_all_ne_plan_with_prefixed_names_and_constexpr_ops():
    plan = _plan()
    assert cm.placement_problems(plan, ["c32", "c64"]) == []
    cm.require_ane(plan, "p.mlmodelc", ["c32", "c64"])  # no raise
    assert cm.op_kind("ios18.constexpr_lut_to_dense") == "constexpr_lut_to_dense" and cm.op_kind("const") == "const"


def test_placement_refuses_a_conv_on_the_cpu_and_names_it():
    plan = _plan(bad=("c64", 3))
    with pytest.raises(BackendError) as e:
        cm.require_ane(plan, "p.mlmodelc", ["c32", "c64"])
    msg = str(e.value)
    assert "1 op(s) would not run on the Neural Engine" in msg
    assert "function c64: op ios18.conv prefers CPU (supported: CPU, GPU, NeuralEngine)" in msg
    assert "c32" not in msg and "\n" not in msg


def test_placement_refuses_unknown_usage_of_a_compute_op():
    plan = _plan(unknown=("c32", 4))
    (p,) = cm.placement_problems(plan, ["c32", "c64"])
    assert (p.function, p.op, p.preferred, p.supported) == ("c32", "ios18.silu", "unknown", ())
    assert str(p) == "function c32: op ios18.silu prefers unknown (supported: none reported)"
    (m,) = cm.placement_problems(plan, ["c128"])  # a function the plan lacks
    assert (m.function, m.op) == ("c128", None) and str(m) == "function c128: not in the compute plan"


def test_placement_per_function_plans_when_the_default_one_covers_only_its_function(monkeypatch):
    """A plan loaded without a function name may give usage only for the default function:
    the check then loads one plan per function (where coremltools can), else refuses naming it."""
    import coremltools.models.compute_plan as cp

    def default_only(fn, op):
        if fn != "c32" or op.operator_name == "const" or op.operator_name.startswith("ios18.constexpr_"):
            return None
        return Usage(NE, [CPU, NE])

    loads = []

    class PerFunction:
        @classmethod
        def load_from_path(cls, path, compute_units, function_name=None):
            loads.append(function_name)
            if function_name is None:
                return Plan({fn: OPS for fn in ("c32", "c64")}, default_only)
            return Plan({function_name: OPS}, lambda fn, op: default_only("c32", op))

    class DefaultOnly:
        @classmethod
        def load_from_path(cls, path, compute_units):
            return Plan({fn: OPS for fn in ("c32", "c64")}, default_only)

    me = type("B", (), {"compute_units": "CPU_AND_NE", "_function_plan": cm.Backend._function_plan})()
    assert cm.covers(default_only and Plan({"c32": OPS}, default_only), "c32")
    monkeypatch.setattr(cp, "MLComputePlan", PerFunction)
    cm.Backend._require_ane(me, Path("p.mlmodelc"), ["c32", "c64"])
    assert loads == [None, "c64"]  # the default plan, then one for the function it missed
    monkeypatch.setattr(cp, "MLComputePlan", DefaultOnly)
    with pytest.raises(BackendError, match=r"function c64: op ios18.reshape prefers unknown"):
        cm.Backend._require_ane(me, Path("p.mlmodelc"), ["c32", "c64"])


def test_available_refuses_macos_before_15(monkeypatch):
    monkeypatch.setattr(cm.sys, "platform", "darwin")
    monkeypatch.setattr(cm.platform, "mac_ver", lambda: ("14.6.1", ("", "", ""), "arm64"))
    assert not cm.available()
    with pytest.raises(BackendError) as e:
        cm.Backend()
    assert str(e.value) == ("Core ML expert programs need macOS 15 or later (their iOS18 opset); "
                            "this is macOS 14.6.1")
    monkeypatch.setattr(cm.platform, "mac_ver", lambda: ("15.1", ("", "", ""), "arm64"))
    assert cm.available() and cm.unavailable_reason() == ""


# ---- weight formats ----


def _q4spec(G=2, D=128, H=64, tiers=(32,), seed=3, **kw):
    return random_spec(G=G, D=D, H=H, tiers=tiers, bits=4, group_size=32, seed=seed, **kw)


def _ops(pkg):
    return [op.op_type for op in next(iter(load_package(pkg).functions.values())).operations]


@pytest.mark.parametrize("fmt", formats.WEIGHT_FORMATS)
def test_each_format_builds_runs_in_milrun_and_stays_within_its_tolerance(tmp_path, fmt):
    spec = _q4spec(activation="swiglu_oai", bias=True)
    entry = backend_class("coreml").build(spec, tmp_path, weight_format=fmt)
    assert entry["weight_format"] == fmt and entry["source_format"] == "q4g32"
    assert 0 <= entry["max_rel_err"] <= formats.TOLERANCE[fmt]
    ops = _ops(tmp_path / entry["package"])
    want = {"blockwise": "constexpr_blockwise_shift_scale", "int8-channel": "constexpr_blockwise_shift_scale",
            "palette": "constexpr_lut_to_dense", "fp16": None}[fmt]
    assert (want in ops) if want else not any(o.startswith("constexpr_") for o in ops)
    prog, _ = backend_class("coreml").checker(entry, tmp_path)
    x = np.random.default_rng(4).standard_normal((2, 20, 128)).astype(np.float32)
    assert max_rel_err(prog.run(x, 32), reference_ffn(spec, x)) <= formats.TOLERANCE[fmt]


def test_formats_store_what_they_say(tmp_path):
    """int8 keeps one int8 code + one scale per row; palette 4-bit codes + LUTs; fp16 two bytes."""
    spec = _q4spec(G=2, D=256, H=128)
    sizes = {}
    for fmt in formats.WEIGHT_FORMATS:
        b = build_package(ProgramSpec(**{**spec.__dict__, "storage": fmt}), tmp_path / f"{fmt}.mlpackage")
        sizes[fmt] = b.weight_bytes
    n = 2 * 3 * 256 * 128  # weights; small shape constants add < 1 KB
    assert 2 * n <= sizes["fp16"] < 2 * n + 1024
    assert n <= sizes["int8-channel"] < 1.05 * n
    assert n // 2 <= sizes["palette"] < 0.6 * n
    assert n // 2 <= sizes["blockwise"] < 0.65 * n  # the MLX codes + fp16 scale and offset per 32
    # the cost model prices what the NE streams: per expert, in each format
    assert formats.expert_bytes("int8-channel", 256, 128) == 3 * 256 * 128 + 2 * (2 * 128 + 256)
    assert formats.expert_bytes("palette", 256, 128) < formats.expert_bytes("int8-channel", 256, 128)
    assert formats.expert_bytes("blockwise", 256, 128) == formats.expert_bytes("fp16", 256, 128) == 2 * 3 * 256 * 128
    assert formats.expert_bytes(None, 256, 128, bits=4) == 3 * 256 * 128 // 2


def test_palette_is_nearest_centroid_per_group_of_rows():
    w = np.random.default_rng(0).standard_normal((64, 96)).astype(np.float32)
    idx, lut = formats.palettize(w, 4, 16)
    assert idx.shape == w.shape and lut.shape == (4, 16) and idx.max() <= 15
    for g in range(4):
        c = lut[g].astype(np.float64)
        rows = w[16 * g : 16 * (g + 1)]
        assert (np.abs(rows[..., None] - c).argmin(-1) == idx[16 * g : 16 * (g + 1)]).all()
    rec = lut.astype(np.float32).repeat(16, 0)[np.arange(64)[:, None], idx]
    assert np.sqrt(np.mean((rec - w) ** 2)) < 0.15  # 16 k-means centroids over a standard normal (~0.1)


def test_a_format_past_its_tolerance_is_refused_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(formats.TOLERANCE, "palette", 1e-6)
    spec = _q4spec()
    with pytest.raises(cm.FormatError) as e:
        backend_class("coreml").build(spec, tmp_path, weight_format="palette")
    msg = str(e.value)
    assert msg.startswith("layer 0 (layer0_e0-1): weight format palette is off the model's experts by ")
    assert "> its tolerance 1e-06; choose another --weight-format" in msg and "\n" not in msg
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_default_format_follows_the_ne_guidance(tmp_path):
    assert formats.DEFAULT_FORMAT == "int8-channel"
    entry = backend_class("coreml").build(_q4spec(), tmp_path)
    assert entry["weight_format"] == "int8-channel"
    with pytest.raises(ValueError, match="unknown weight format 'q4'"):
        backend_class("coreml").build(_q4spec(), tmp_path, weight_format="q4")


def test_chip_cost_prices_the_format_bytes():
    from npumoe_mlx.backends.registry import chip_cost

    D, H = 2048, 768
    by = {f: chip_cost("m2-max", "coreml", D, H, 4, weight_format=f).expert_s for f in formats.WEIGHT_FORMATS}
    old = chip_cost("m2-max", "coreml", D, H, 4, weight_format=None).expert_s  # MLX's 4 bits, as before
    assert chip_cost("m2-max", "coreml", D, H, 4).expert_s == by[formats.DEFAULT_FORMAT]
    assert by["palette"] < by["int8-channel"] < by["fp16"] == by["blockwise"]
    assert by["palette"] == pytest.approx(old, rel=0.01) and by["fp16"] == pytest.approx(4 * old)


# ---- channels-first programs, the Program contract ----


def test_programs_take_channels_first_and_have_no_transposes(tmp_path):
    spec = _q4spec(tiers=(32, 64))
    for layout in ("conv", "matmul"):
        prog = build_program(spec, 64, layout)
        func = prog.functions["main"]
        assert tuple(func.inputs["x"].shape) == (2, 128, 64) and tuple(func.outputs[0].shape) == (2, 128, 64)
        assert "transpose" not in [op.op_type for op in func.operations]
    entry = backend_class("coreml").build(spec, tmp_path)
    prog, _ = backend_class("coreml").checker(entry, tmp_path)
    assert prog.input_layout == "GDC" and prog.native_shape(64) == (2, 128, 64)
    x = np.random.default_rng(1).standard_normal((2, 64, 128)).astype(np.float32)
    y = prog.run(x, 64)  # generic callers: (G, C, D), transposed on the host
    yn = prog.run_layout(np.ascontiguousarray(x.transpose(0, 2, 1)), 64)  # the declared layout
    assert y.shape == (2, 64, 128) and np.array_equal(y, yn.transpose(0, 2, 1))
    assert rel_err(y, reference_ffn(spec, x)) < 1e-2
    y5 = prog.run(x[:, :5], 64)  # short inputs padded to the tier
    assert np.allclose(y5, y[:, :5], atol=1e-2)
    with pytest.raises(ValueError, match=r"wants \(2, 128, 32\) at tier 32"):
        prog.run_layout(x[:, :32], 32)
    from npumoe_mlx.build.verify import Pinned

    pinned = Pinned(prog, [tmp_path / entry["package"] / "Manifest.json"])  # what a loaded bundle hands out
    assert pinned.input_layout == "GDC"
    assert np.array_equal(pinned.run_layout(np.ascontiguousarray(x.transpose(0, 2, 1)), 64), yn)


# ---- limits: H chunks, layout choice, planner caps ----


def test_h_chunks_split_mixtral_and_fall_on_quant_groups():
    sh = {"D": 4096, "H": 14336}
    spec = random_spec(G=1, D=64, H=64, tiers=(32,))  # shape fields only are read
    spec.D, spec.H = sh["D"], sh["H"]
    assert h_chunks(spec, "conv") == [(0, 7168), (7168, 14336)]  # 2 x 14336 <= 16384 per conv
    assert h_chunks(spec, "conv", Limits(max_axis=65536)) == [(0, 14336)]
    spec.expert_ids = (0, 1, 2)
    cks = h_chunks(spec, "conv")
    assert all(3 * 2 * (b - a) <= 16384 and a % 32 == 0 for a, b in cks) and cks[-1][1] == 14336  # float: 32-aligned


def test_layout_choice_and_group_caps_match_the_builder():
    assert choose_layout(8, 2048, 768) == "conv"
    assert choose_layout(16, 2048, 768) == "matmul"  # G*D = 32768 > 16384
    assert choose_layout(4, 2880, 2880) == "conv"  # 2H split into chunks
    assert choose_layout(6, 2880, 2880) == "matmul"
    assert choose_layout(1, 20000, 32) is None and max_group(20000, 32) == 0
    assert max_group(2048, 768) == DEFAULT_LIMITS.max_axis
    # what the builder accepts: G*D past the limit in conv is refused, matmul passes
    spec = random_spec(G=3, D=64, H=32, tiers=(32,))
    tight = Limits(max_axis=128)
    assert choose_layout(3, 64, 32, tight) == "matmul"
    assert any("axis" in p for p in check_program(build_program(spec, 32, "conv", tight), tight))
    assert check_program(build_program(spec, 32, "matmul", tight), tight) == []


def test_planner_caps_groups_by_the_format_bytes_the_builder_refuses_past():
    """Mixtral-8x7B, 4-bit MLX weights: int8-channel holds 176 MB per expert, so a 1 GiB program
    takes at most 6 experts; the old cap (4-bit bytes, 88 MB) allowed all 8 (1.4 GB: refused)."""
    from npumoe_mlx.planning.plan import PlanLimits, group_cap

    q = {"bits": 4, "group_size": 64}
    lim = PlanLimits.for_backend("coreml")
    assert lim.max_axis == DEFAULT_LIMITS.max_axis and lim.weight_format == formats.DEFAULT_FORMAT == "int8-channel"
    G = group_cap(8, 4096, 14336, q, lim)
    assert G == 6 and G * formats.expert_bytes("int8-channel", 4096, 14336) <= DEFAULT_LIMITS.max_weight_bytes
    lim.weight_format = "palette"
    assert group_cap(8, 4096, 14336, q, lim) == 8
    assert group_cap(8, 20000, 32, q, lim) == 0  # D past the axis: no program builds
    onnx = PlanLimits.for_backend("onnx")
    assert onnx.max_axis is None and group_cap(128, 2048, 768, q, onnx) == onnx.max_group
    assert group_cap(8, 20000, 32, q, onnx) >= 1  # onnx graphs have no axis limit


def test_a_layer_whose_experts_cannot_build_stays_on_mlx():
    """D = 20000 > 16384: neither layout fits, so the planner plans no program for the layer."""
    from npumoe_mlx.backends.registry import default_cost
    from npumoe_mlx.planning.plan import PlanLimits, plan_layer
    from npumoe_mlx.planning.profiles import LayerCounts

    E, k = 4, 2
    counts = [400, 300, 200, 100]
    lp = LayerCounts(layer=0, path="m.layers.0.mlp", num_experts=E, top_k=k, counts=counts,
                     chunks=[{"tokens": 512, "counts": [c // 2 for c in counts]}] * 2)
    fast = default_cost("coreml")
    fast.dispatch_s, fast.program_flops = 1e-9, 1e18
    plan = plan_layer(lp, 20000, 32, fast, PlanLimits.for_backend("coreml"))
    assert plan.groups == [] and plan.cold == [0, 1, 2, 3]
    ok = plan_layer(lp, 2000, 32, fast, PlanLimits.for_backend("coreml"))
    assert ok.groups  # the same layer at a buildable D gets programs


# ---- real model shapes: build, then run on a few rows in milrun ----


def _random_q4(G, out, inp, rng):
    """Random MLX-style 4-bit affine weights (codes drawn directly: quantizing floats is slow)."""
    s = (rng.uniform(0.5, 1.5, (G, out, inp // 64)) / (8 * np.sqrt(inp))).astype(np.float32)
    return AffineWeight(rng.integers(0, 2**32, (G, out, inp // 8), dtype=np.uint32), s, -7.5 * s, 4, 64)


# model -> the weight format its group is built in. The group is the planner's largest
# (plan.group_cap) under a 128 MB program budget instead of the default 1 GiB: at the full cap
# gpt-oss-20b (G=16) took 185 s and 4.6 GB here (build + interpreter), past a CI test's budget.
REAL = {"qwen3-30b-a3b": "int8-channel", "gpt-oss-20b": "int8-channel", "mixtral-8x7b": "blockwise"}
TEST_PROGRAM_BYTES = 128 << 20


@pytest.mark.skipif(not SHAPES, reason="needs /work/shared/reference/model-shapes.json")
@pytest.mark.parametrize("model", list(REAL))
def test_real_shape_builds_at_the_planner_group_cap(model, tmp_path):
    from npumoe_mlx.planning.plan import PlanLimits, group_cap

    sh = SHAPES[model]
    D, H, E = sh["hidden"], sh["expert_intermediate"], sh["experts"]
    lim = PlanLimits.for_backend("coreml", max_program_bytes=TEST_PROGRAM_BYTES)
    lim.weight_format = REAL[model]
    G = group_cap(E, D, H, {"bits": 4, "group_size": 64}, lim)
    assert G == {"qwen3-30b-a3b": 16, "gpt-oss-20b": 5, "mixtral-8x7b": 1}[model]
    rng = np.random.default_rng(0)
    oai = model == "gpt-oss-20b"
    bias = (lambda n: rng.normal(0, 0.1, (G, n)).astype(np.float32)) if oai else (lambda n: None)
    spec = ProgramSpec(0, tuple(range(G)), (min(lim.capacities),), D, H, "swiglu_oai" if oai else "swiglu",
                       _random_q4(G, H, D, rng), _random_q4(G, H, D, rng), _random_q4(G, D, H, rng),
                       bias(H), bias(H), bias(D))
    entry = backend_class("coreml").build(spec, tmp_path, weight_format=REAL[model])  # ANE checks + format error
    assert entry["max_rel_err"] <= formats.TOLERANCE[REAL[model]]
    meta = read_metadata(tmp_path / entry["package"])
    # Qwen3 G=16: G*D = 32768 -> matmul; gpt-oss G=5: conv, 2H = 5760 split so G*2Hc <= 16384;
    # Mixtral: 2H = 28672 > 16384, two 7168-wide chunks in one program
    want = {"qwen3-30b-a3b": ("matmul", 1), "gpt-oss-20b": ("conv", 2), "mixtral-8x7b": ("conv", 2)}[model]
    assert (meta["layout"], len(meta["h_chunks"])) == want == (choose_layout(G, D, H), len(meta["h_chunks"]))
    x = rng.standard_normal((G, 3, D)).astype(np.float32)
    prog, _ = backend_class("coreml").checker(entry, tmp_path)
    tol = 1e-2 if REAL[model] == "blockwise" else formats.TOLERANCE[REAL[model]]
    assert max_rel_err(prog.run(x, 32), reference_ffn(spec, x, dtype=np.float32)) < tol


# ---- the build choice end to end ----


def test_weight_format_is_refused_for_onnx_in_one_line():
    from npumoe_mlx.build.build import check_weight_format
    from npumoe_mlx.build.build import main as build_main

    assert check_weight_format("coreml", None) == formats.DEFAULT_FORMAT
    assert check_weight_format("onnx", None) is None
    with pytest.raises(ValueError) as e:
        build_main(["--model", "/nonexistent", "--backend", "onnx", "--weight-format", "palette"])
    assert str(e.value) == ("--weight-format sets how Core ML programs store weights; the onnx backend keeps the "
                            "model's own weights (drop --weight-format or use --backend coreml)")


def test_coreml_bundle_records_the_format_and_its_error(tmp_path):
    """`npumoe build --backend coreml --weight-format palette` on a tiny 4-bit model: every
    program stores palettized weights, is checked against the model on stock MLX within the
    palette's tolerance, and the manifest / plan say which format and what error."""
    tiny = pytest.importorskip("npumoe_mlx.tools.tiny")
    from npumoe_mlx.build.build import build

    from dataclasses import replace

    from npumoe_mlx.backends.registry import default_cost

    model = tiny.make_tiny_model(tmp_path / "m", "qwen3_moe", q_bits=4)
    fast = replace(default_cost("coreml"), dispatch_s=1e-9, program_flops=1e16, mlx_flops=1e6, mlx_fixed_s=1.0)
    from npumoe_mlx.planning.plan import PlanLimits

    out = build(str(model), "coreml", str(tmp_path / "b"), tokens=64, chunk_size=64, cost=fast,
                limits=PlanLimits.for_backend("coreml", max_programs=3), memory_budget=None,
                weight_format="palette", log=lambda *_: None)
    manifest = json.loads((out / "manifest.json").read_text())
    progs = [p["program"] for p in manifest["programs"]]
    assert progs and all(p["weight_format"] == "palette" and p["source_format"] == "q4g32" for p in progs)
    assert all(0 < p["max_rel_err"] <= formats.TOLERANCE["palette"] for p in progs)
    assert json.loads((out / "plan.json").read_text())["limits"]["weight_format"] == "palette"
    pkg = out / manifest["programs"][0]["dir"] / progs[0]["package"]
    assert "constexpr_lut_to_dense" in _ops(pkg)
