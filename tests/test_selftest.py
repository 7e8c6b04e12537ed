"""`npumoe selftest`: the report off a Mac (formats built and checked, placement on a modelled
plan, copies counted, what needs a Mac), its decisions, and the measured profile it writes
on a Mac read back through `npumoe chips --file` and `--cost`."""

import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ane_kernels.formats import TOLERANCE, WEIGHT_FORMATS, expert_bytes
from npumoe_mlx import cli
from npumoe_mlx.backends import coreml as backend
from npumoe_mlx.cli import selftest
from npumoe_mlx.build.args import load_cost
from npumoe_mlx.planning import chips
from npumoe_mlx.planning.chips import FIELDS, chip_profile, load_chips

OFF_MAC = pytest.mark.skipif(sys.platform == "darwin", reason="checks the off-macOS report (a Mac runs the Mac steps)")
ON_MAC = pytest.mark.skipif(sys.platform != "darwin", reason="Core ML predict, MLComputePlan and powermetrics run only on macOS")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One `npumoe selftest --quick --json` run, through the CLI, its packages kept."""
    d = tmp_path_factory.mktemp("selftest")
    out = d / "report.json"
    rc = cli.main(["selftest", "--quick", "--json", str(out), "--keep", str(d / "pkgs")])
    return rc, out, json.loads(out.read_text()), d / "pkgs"


@OFF_MAC
def test_off_mac_report_has_real_format_numbers_placement_copies_and_needs_mac(quick):
    rc, _, r, _ = quick
    assert rc == 0
    assert r["kind"] == "npumoe-selftest" and r["platform"]["system"] == "Linux" and r["platform"]["on_mac"] is False
    assert list(r["formats"]) == list(WEIGHT_FORMATS)
    D, H = r["shape"]["D"], r["shape"]["H"]
    for name, f in r["formats"].items():
        assert f["built"] is True and f["ok"] is True, name
        # a measured error against the 4-bit experts (the builder's): rounding shows, under the format's own tolerance
        assert f["tol"] == TOLERANCE[name]
        assert 1e-5 < f["max_rel_err"] <= TOLERANCE[name], (name, f["max_rel_err"])
        assert set(f["rel_err"]) == {"c32", "c64"}  # every tier ran in the interpreter
        assert f["bytes"] > 0 and f["expert_bytes"] == expert_bytes(name, D, H)
    # lossy formats show more error than fp16 rounding alone
    errs = {n: f["max_rel_err"] for n, f in r["formats"].items()}
    assert errs["palette"] > errs["int8-channel"] > errs["fp16"]
    # 4-bit codes + fp16 scales/offsets, and 4-bit palettes, against fp16 weights: under half the bytes on disk
    for small in ("blockwise", "palette"):
        assert r["formats"][small]["bytes"] < 0.5 * r["formats"]["fp16"]["bytes"], small
    p = r["placement"]
    assert p["checked"] is True and p["result"] == "refused" and p["control"] == "passed"
    assert p["problems"] == ["function c32: op ios18.conv prefers CPU (supported: CPU, NeuralEngine)"]
    c = r["copies"]
    assert c["priced_bytes_per_row"] == 40 * D  # the registry's Core ML cost model: channels-first path
    # a Mac's finish (MLX on the GPU takes the pair rows): none per routed pair, priced and counted
    assert c["priced_bytes_per_pair_element"] == 0 and c["counted_bytes_per_pair_element"] == 0
    assert abs(c["counted_bytes_per_row"] - c["priced_bytes_per_row"]) <= 0.1 * c["counted_bytes_per_row"]
    assert c["predict_input_dtype"] == "float32"
    steps = " ".join(r["needs_mac"])
    for what in ("MLComputePlan", "CPU_AND_NE vs CPU_ONLY vs CPU_AND_GPU", "program call", "RSS", "gather_qmm",
                 "powermetrics", "Ultra", "chip profile"):
        assert what in steps, what
    assert "linux" in r["skipped"]["mac"]
    assert "chips" not in r and "cost" not in r  # nothing measured here, so no profile claims


@OFF_MAC
def test_off_mac_report_is_not_taken_for_a_cost_model_or_chips_file(quick):
    _, out, _, _ = quick
    with pytest.raises(ValueError, match="not a cost model"):
        load_cost(str(out))
    with pytest.raises(ValueError, match="'chips' must be a non-empty object"):
        load_chips(str(out))


def test_default_shape_is_qwen3_and_quick_is_only_for_tests(monkeypatch, tmp_path):
    assert selftest.REAL == selftest.Shape(8, 2048, 768, (64, 256), 4, 64)
    seen = []
    monkeypatch.setattr(selftest, "selftest", lambda shape, **kw: seen.append(shape) or {"formats": {}})
    assert selftest.main([]) == 0
    assert selftest.main(["--quick"]) == 0
    assert seen == [selftest.REAL, selftest.QUICK]


def test_output_path_is_checked_before_any_work(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(selftest, "selftest", lambda *a, **k: pytest.fail("ran before checking --json"))
    assert cli.main(["selftest", "--json", str(tmp_path / "missing" / "r.json")]) == 1
    err = capsys.readouterr().err
    assert "does not exist" in err and len(err.strip().splitlines()) == 1
    assert cli.main(["selftest", "--json", str(tmp_path)]) == 1
    assert "is a folder" in capsys.readouterr().err
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            assert cli.main(["selftest", "--json", str(ro / "r.json")]) == 1
            assert "cannot write" in capsys.readouterr().err
        finally:
            ro.chmod(0o700)
    assert list(tmp_path.iterdir()) in ([], [tmp_path / "ro"])  # nothing half-written


def test_failing_format_is_reported_and_exits_nonzero(monkeypatch, tmp_path, capsys):
    real = backend.Backend.build

    def build(spec, out, weight_format=None, **kw):
        if weight_format == "fp16":
            raise RuntimeError("builder refused fp16")
        return real(spec, out, weight_format=weight_format, **kw)

    monkeypatch.setattr(backend.Backend, "build", staticmethod(build))
    out = tmp_path / "r.json"
    assert selftest.main(["--quick", "--json", str(out)]) == 1
    r = json.loads(out.read_text())
    assert r["formats"]["fp16"] == {"built": False, "error": "RuntimeError: builder refused fp16",
                                    "max_rel_err": None, "bytes": None, "tol": TOLERANCE["fp16"], "ok": False}
    assert r["formats"]["blockwise"]["built"] is True
    assert "fp16" in capsys.readouterr().err


# ---- the placement check on modelled compute plans ---------------------------------------


@pytest.fixture(scope="module")
def pkg(quick):
    (p,) = (quick[3] / "blockwise").glob("*.mlpackage")
    return p


def test_placement_skips_prefixed_constexpr_ops_and_passes_an_all_ne_plan(pkg):
    plan = selftest.modelled_plan(pkg)
    names = [op.operator_name for op in plan.model_structure.program.functions["c32"].block.operations]
    assert "ios18.constexpr_blockwise_shift_scale" in names and "ios18.conv" in names and "const" in names
    # constexpr ops have no usage, as on a Mac: the old check (startswith("constexpr_")) reported them
    ops = plan.model_structure.program.functions["c32"].block.operations
    assert all(plan.get_compute_device_usage_for_mlprogram_operation(o) is None
               for o in ops if "constexpr_" in o.operator_name)
    assert backend.placement_problems(plan, ["c32", "c64"]) == []


def test_placement_refuses_a_cpu_conv_naming_function_op_and_devices(pkg):
    plan = selftest.modelled_plan(pkg, cpu_op=("c64", 1))  # the down-projection conv of c64
    (p,) = backend.placement_problems(plan, ["c32", "c64"])
    assert (p.function, p.op, p.preferred, p.supported) == ("c64", "ios18.conv", "CPU", ("CPU", "NeuralEngine"))
    assert p.weight == 0.0  # MLComputePlan's cost weight, read through the plan
    assert backend.placement_problems(plan, ["c32"]) == []  # only the functions asked for


def test_placement_reports_ops_without_usage_and_functions_missing_from_the_plan(pkg):
    base = selftest.modelled_plan(pkg)

    class NoUsageForSilu:
        model_structure = base.model_structure

        def get_compute_device_usage_for_mlprogram_operation(self, op):
            return None if op.operator_name == "ios18.silu" else base.get_compute_device_usage_for_mlprogram_operation(op)

        def get_estimated_cost_for_mlprogram_operation(self, op):
            return None

    probs = backend.placement_problems(NoUsageForSilu(), ["c32", "c128"])
    assert [str(p) for p in probs] == [
        "function c32: op ios18.silu prefers unknown (supported: none reported)",
        "function c128: not in the compute plan",
    ]


# ---- copies -------------------------------------------------------------------------------


def test_counted_copies_follow_the_code_path(monkeypatch):
    D = 256
    today = selftest.copy_bytes(D)
    assert today["predict_input_dtype"] == "float32"
    assert abs(today["counted_bytes_per_row"] - 40 * D) <= 0.1 * 40 * D
    assert today["counted_bytes_per_pair_element"] == today["priced_bytes_per_pair_element"] == 0  # a Mac's finish
    # the old host astype(float16) before predict: coremltools casts it back, two passes more, the count follows
    from npumoe_mlx.backends.coreml import CoreMLProgram

    from npumoe_mlx.runtime import dispatch

    def fp16_run(self, x, tier):
        x16 = np.asarray(x, np.float16)
        dispatch.moved(6 * x16.size)  # the cast: fp32 read, fp16 written
        out = self.model(tier).predict({"x": x16})
        return np.asarray(out["y"], dtype=np.float32)

    monkeypatch.setattr(CoreMLProgram, "_run", fp16_run)
    old = selftest.copy_bytes(D)
    assert old["predict_input_dtype"] == "float16"
    assert old["counted_bytes_per_element"] == pytest.approx(today["counted_bytes_per_element"] + 12, abs=0.5)
    assert old["priced_bytes_per_row"] == today["priced_bytes_per_row"]  # the price does not follow by itself


def test_priced_copies_are_the_registrys_core_ml_cost_model(monkeypatch):
    from npumoe_mlx.backends import registry

    assert selftest.copy_bytes(2048)["priced_bytes_per_row"] == 2048 * registry.default_cost("coreml").copy_bytes
    monkeypatch.setattr(backend, "HOST_BYTES_PER_ELEMENT", 52)
    from npumoe_mlx.runtime import dispatch

    # the program module's bytes plus the executor's finish on a Mac (the buffer's copy to MLX, 8)
    assert selftest.copy_bytes(2048)["priced_bytes_per_row"] == 2048 * (52 + dispatch.finish_bytes(on_host=False)[0])


# ---- Mac measurements as decisions, and the report as a chip profile / cost model ---------


def test_equal_ne_and_cpu_times_mean_not_on_the_ane():
    assert selftest.ane_verdict(1.0e-3, 1.02e-3)["on_ane"] is False
    assert "NOT on the ANE" in selftest.ane_verdict(1.0e-3, 1.02e-3)["verdict"]
    assert selftest.ane_verdict(0.9e-3, 1.0e-3)["on_ane"] is False
    v = selftest.ane_verdict(0.25e-3, 1.0e-3)
    assert v["on_ane"] is True and v["ne_over_cpu"] == pytest.approx(0.25)


def test_dispatch_and_rate_are_recovered_from_two_tiers():
    G, D, H, disp, rate = 8, 2048, 768, 0.3e-3, 5e12
    t = [disp + G * C * 6 * D * H / rate for C in (64, 256)]
    fit = selftest.fit_dispatch((64, 256), t, G, D, H)
    assert fit["dispatch_s"] == pytest.approx(disp) and fit["tflops"] == pytest.approx(5.0)
    # a non-positive intercept is not a dispatch time: left unmeasured
    assert selftest.fit_dispatch((64, 256), [1e-3, 5e-3], G, D, H)["dispatch_s"] is None


def _mac_report(quick, tmp_path):
    """The quick report with the sections a Mac run adds, from given measurements."""
    r = dict(quick[2])
    base = chip_profile("m4-max")
    measured = {"ane_tflops": 3.25, "ane_dispatch_s": 2.1e-4, "gpu_tflops": 9.5, "ane_power_w": None,
                "gpu_power_w": None}
    how = {f: f"how {f}" for f in measured}
    entry = selftest.measured_profile(base, measured, how, "test-mac (m4-max)")
    r["chips"] = {"m4-max": entry}
    copy = {"rows": 2048, "overhead_s": 4e-3}
    r["cost"] = selftest.measured_cost("m4-max", entry, 2048, 768, "int8-channel", copy)
    path = tmp_path / "mac.json"
    selftest.write_report(path, r)
    return path, base


def test_measured_profile_loads_as_chips_file(quick, tmp_path, capsys):
    path, base = _mac_report(quick, tmp_path)
    prof = load_chips(str(path))["m4-max"]  # what `npumoe chips --file` reads
    assert prof.ane_tflops == 3.25 and prof.gpu_tflops == 9.5 and prof.ane_dispatch_s == 2.1e-4
    assert "npumoe selftest on test-mac" in prof.sources["ane_tflops"] and prof.notes["ane_tflops"] == "how ane_tflops"
    # not measured: the table's number and source, saying so
    assert prof.ane_power_w == base.ane_power_w and prof.sources["ane_power_w"] == base.sources["ane_power_w"]
    assert prof.notes["ane_power_w"].startswith("not measured by selftest")
    assert chips.main(["--file", str(path), "--chip", "m4-max"]) == 0
    assert "- ane_tflops = 3.25 TFLOP/s: measured by npumoe selftest" in capsys.readouterr().out
    assert cli.main(["chips", "--file", str(path)]) == 0


def test_measured_cost_loads_through_cost_flag(quick, tmp_path):
    path, base = _mac_report(quick, tmp_path)
    cost = load_cost(str(path))  # what plan/build --cost read
    from npumoe_mlx.cli.replay import cost_for

    assert cost_for("coreml", None, str(path)) == cost  # replay --cost
    assert cost.backend == "coreml"
    assert cost.program_flops == pytest.approx(3.25e12) and cost.mlx_flops == pytest.approx(9.5e12)
    assert cost.dispatch_s == pytest.approx(2.1e-4)
    assert cost.expert_s == pytest.approx(expert_bytes("int8-channel", 2048, 768) / (base.ane_bw_gbs * 1e9))
    # copies priced so the model reproduces the measured overhead of the whole program call
    from npumoe_mlx.backends.registry import default_cost

    assert cost.copy_bps == pytest.approx(2048 * 2048 * default_cost("coreml").copy_bytes / 4e-3)
    free = dataclasses.replace(cost, copy_bps=float("inf"))
    copy_s = cost.programs_s(8, 1, 256, 2048, 768) - free.programs_s(8, 1, 256, 2048, 768)
    assert copy_s == pytest.approx(4e-3)
    assert "selftest" in cost.source


@ON_MAC
def test_selftest_on_this_mac(tmp_path):
    out = tmp_path / "r.json"
    rc = selftest.main(["--quick", "--repeats", "3", "--json", str(out)])
    r = json.loads(out.read_text())
    assert rc == 0 and r["platform"]["on_mac"] is True
    if "mac" in r.get("skipped", {}):
        pytest.skip(r["skipped"]["mac"])
    assert r["needs_mac"] == []
    assert r["placement"]["plan"].startswith("MLComputePlan")
    for fmt, m in r["mac"]["formats"].items():
        assert "error" not in m, (fmt, m)
        assert set(m["predict"]) == set(selftest.COMPUTE_UNITS)
        assert m["verdict"]["verdict"]
        assert max(m["rel_err_on_device"]["CPU_ONLY"].values()) < TOLERANCE[fmt]
    assert r["mac"]["mlx"]["tflops"] > 0
    if r["platform"]["chip"]:
        assert load_chips(str(out))[r["platform"]["chip"]].ane_tflops > 0
        assert load_cost(str(out)).backend == "coreml"


# ---- the Mac steps end to end, Core ML modelled (runs anywhere) ---------------------------


class _Compiled:
    """Stands in for ct.models.CompiledMLModel: runs the package in the numpy MIL interpreter,
    then sleeps as long as this (format, compute unit) takes: ms = a + b * rows."""

    MS = {  # format -> compute unit -> (a, b): blockwise runs on the NE; fp16 runs at CPU speed under CPU_AND_NE;
        # int8-channel and palette on the NE, slower than blockwise
        "blockwise": {"CPU_AND_NE": (20.0, 0.1), "CPU_ONLY": (20.0, 1.0), "CPU_AND_GPU": (20.0, 0.5)},
        "fp16": {"CPU_AND_NE": (5.0, 0.1), "CPU_ONLY": (5.0, 0.1), "CPU_AND_GPU": (5.0, 0.05)},
        "int8-channel": {"CPU_AND_NE": (25.0, 0.1), "CPU_ONLY": (25.0, 1.0), "CPU_AND_GPU": (25.0, 0.5)},
        "palette": {"CPU_AND_NE": (25.0, 0.1), "CPU_ONLY": (25.0, 1.0), "CPU_AND_GPU": (25.0, 0.5)},
    }
    packages, outputs = {}, {}

    def __init__(self, path, compute_units=None, function_name=None):
        from ane_kernels.milrun import load_package

        self.pkg = self.packages[str(path)]
        self.prog, self.fn = load_package(self.pkg), function_name
        self.a, self.b = self.MS[self.pkg.parent.name][compute_units.name]  # <workdir>/<format>/<name>.mlpackage

    def predict(self, feeds):
        from ane_kernels.milrun import run_function

        key = (self.pkg, self.fn, hash(feeds["x"].tobytes()))
        if key not in self.outputs:  # the interpreter once per input: the sleeps below set the times
            (self.outputs[key],) = run_function(self.prog, self.fn, {"x": feeds["x"]}).values()
        y = self.outputs[key]
        G, _, C = feeds["x"].shape  # (G, D, C)
        time.sleep((self.a + self.b * G * C) / 1e3)
        return {"y": np.asarray(y, np.float32)}


def test_mac_steps_with_core_ml_modelled(monkeypatch, tmp_path, capsys):
    import coremltools as ct
    from coremltools.models import compute_plan

    from npumoe_mlx.backends import coreml as backend

    def compile_model(pkg, dest):
        _Compiled.packages[str(dest)] = Path(pkg)
        return str(dest)

    def load_plan(path, compute_units):  # the fp16 package's down conv prefers the CPU
        pkg = _Compiled.packages[str(path)]
        return selftest.modelled_plan(pkg, cpu_op=("c64", 1) if pkg.parent.name == "fp16" else None)

    monkeypatch.setattr(backend, "macos_version", lambda: (15, 1))
    monkeypatch.setattr(selftest, "platform_info", lambda: {"system": "Darwin", "machine": "arm64", "on_mac": True,
                                                            "host": "fake-mac", "macos": "15.1", "chip": "m2-ultra"})
    monkeypatch.setattr(ct.models.utils, "compile_model", compile_model)
    monkeypatch.setattr(ct.models, "CompiledMLModel", _Compiled)
    monkeypatch.setattr(compute_plan.MLComputePlan, "load_from_path", staticmethod(load_plan))
    monkeypatch.setattr(selftest, "_memory_probe", lambda mlc, fns, G, D, n: {"package_bytes": n, "loaded_over_package": 1.0})
    out = tmp_path / "mac.json"
    assert selftest.main(["--quick", "--repeats", "3", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "fp16: NOT on the ANE" in printed and "blockwise: on the ANE" in printed and "two models from two threads" in printed
    r = json.loads(out.read_text())
    assert r["needs_mac"] == [] and "mac" not in r["skipped"]
    m = r["mac"]["formats"]
    assert m["blockwise"]["verdict"]["on_ane"] is True
    assert m["fp16"]["verdict"]["on_ane"] is False and "NOT on the ANE" in m["fp16"]["verdict"]["verdict"]
    assert m["fp16"]["placement"]["problems"] == ["function c64: op ios18.conv prefers CPU (supported: CPU, NeuralEngine)"]
    for fmt in m:  # Core ML's output (here: the interpreter's) against the 4-bit experts, every unit
        assert max(m[fmt]["rel_err_on_device"]["CPU_AND_NE"].values()) < TOLERANCE[fmt]
        pc = m[fmt]["program_call"]
        # off macOS the real loader refuses whatever the models say: the step ran and said why
        assert m[fmt]["backend_load"]["result"] == "refused" and "only on macOS" in m[fmt]["backend_load"]["error"]
        assert pc["tier"] == 64 and pc["overhead_s"] == pytest.approx(pc["run_s"] - pc["predict_s"])
    # fp16 is faster under CPU_AND_NE but not on the ANE: the profile describes blockwise
    top = lambda f: m[f]["predict"]["CPU_AND_NE"]["c64"]["median_s"]  # noqa: E731
    assert top("fp16") < top("blockwise")
    assert r["placement"]["format"] == "blockwise" and r["placement"]["result"] == "ane"
    assert r["placement"]["by_format"] == {"blockwise": "ane", "fp16": "refused", "int8-channel": "ane", "palette": "ane"}
    assert r["mac"]["ane_over_gpu"] > 0 and r["mac"]["mlx"]["rows"] == 2 * 64
    assert "powermetrics" in r["skipped"]["power"]
    assert r["mac"]["two_models"]["two_models_calls_per_s"] > 0  # an Ultra: the two-thread check ran
    prof = load_chips(str(out))["m2-ultra"]
    assert prof.ane_tflops == pytest.approx(m["blockwise"]["fit"]["tflops"])
    assert prof.gpu_tflops == pytest.approx(r["mac"]["mlx"]["tflops"])
    assert "fake-mac" in prof.sources["ane_tflops"] and "NOT" not in prof.notes["ane_tflops"]
    cost = load_cost(str(out))
    assert cost.program_flops == pytest.approx(prof.ane_tflops * 1e12)
    # the profiled format's bytes streamed (blockwise: decompressed to fp16 on the NE, formats.expert_bytes)
    assert cost.expert_s == pytest.approx(expert_bytes("blockwise", 128, 64) / (prof.ane_bw_gbs * 1e9))


@pytest.mark.parametrize("q_bits", [4, None])
def test_model_flag_checks_that_models_own_experts(tmp_path, q_bits):
    from npumoe_mlx.tools.tiny import make_tiny_model

    path = make_tiny_model(tmp_path / "m", "qwen3_moe", q_bits=q_bits)
    out = tmp_path / "r.json"
    assert selftest.main(["--quick", "--model", str(path), "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    cfg = json.loads((path / "config.json").read_text())
    assert (r["shape"]["D"], r["shape"]["H"]) == (cfg["hidden_size"], cfg["moe_intermediate_size"])
    assert r["shape"]["bits"] == (q_bits or 16) and str(path) in r["shape"]["experts"]
    for fmt in ("fp16", "int8-channel", "palette"):
        assert r["formats"][fmt]["built"] and r["formats"][fmt]["max_rel_err"] <= TOLERANCE[fmt], fmt
    if q_bits:
        assert r["formats"]["blockwise"]["built"] and r["formats"]["blockwise"]["max_rel_err"] < TOLERANCE["blockwise"]
    else:  # float experts: nothing to keep compressed
        assert r["formats"]["blockwise"]["skipped"] == "the experts are not quantized"


def test_energy_per_row_counts_the_cpu_rail_beside_the_unit():
    w = {"ane": 2.0, "cpu": 3.0, "gpu": 0.1, "combined": 5.1}
    assert selftest.joules_per_row(w, ("ane", "cpu"), 0.01, 100) == pytest.approx(5.0 * 0.01 / 100)
    assert selftest.joules_per_row({"ane": 2.0}, ("ane", "cpu"), 0.01, 100) is None  # no CPU rail: no number
    assert selftest.joules_per_row(None, ("gpu", "cpu"), 0.01, 100) is None
