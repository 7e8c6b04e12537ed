"""`npumoe selftest`: the ten-minute check a Mac user runs first.

It builds one expert group at a real shape (Qwen3-30B-A3B: D=2048, H=768, G=8, 4-bit
source weights, tiers 64/256) in every weight format, checks each saved program's
numbers in the numpy MIL interpreter against the 4-bit experts it came from, checks
placement, and counts the host copies per offloaded row. On a Mac (macOS 15+) it then
answers what only a Mac can (the check list in shared/reference/coreml-evidence.md,
steps 1-10): per-op placement from MLComputePlan, median ``predict`` time under
CPU_AND_NE vs CPU_ONLY vs CPU_AND_GPU (equal NE and CPU times mean the program is not
on the ANE, whatever the plan says), ``predict`` alone vs the whole program call (the
host copies), RSS after loading every tier function vs the package bytes, MLX
``gather_qmm`` at the same shape (the ANE/GPU ratio), powermetrics energy (root only),
and on an Ultra two models from two threads. Its JSON is also that Mac's measured
profile: ``npumoe chips --file REPORT`` and ``--cost REPORT`` read it as they are.
Off a Mac the steps that need one are listed in ``needs_mac``.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from ane_kernels.coreml import INPUT_NAME, OUTPUT_NAME, function_name
from ane_kernels.formats import TOLERANCE, WEIGHT_FORMATS, expert_bytes
from ane_kernels.spec import ProgramSpec, random_spec, reference_ffn

from ..backends.coreml import placement_problems
from ..hints import one_line

KIND = "npumoe-selftest"
FORMAT = 1  # also the chips-file format: the report is a chips file (chips.load_chips)
COMPUTE_UNITS = ("CPU_AND_NE", "CPU_ONLY", "CPU_AND_GPU")
NOT_ON_ANE = 0.8  # CPU_AND_NE taking >= this fraction of CPU_ONLY's time: not on the ANE

def copy_bytes(D: int) -> dict:
    """Host bytes per offloaded row on the Core ML path: priced (the registry's Core ML cost
    model, ``copy_bytes`` per element) against counted (one layer call through the real
    executor with every host pass counted, Core ML's bridge faked as coremltools moves arrays:
    npumoe_mlx.tools.copies). Bytes per element do not depend on the shape, so the count runs small."""
    from ..backends.registry import default_cost
    from ..tools.copies import count_copies

    cost = default_cost("coreml")
    priced = cost.copy_bytes
    c = count_copies("coreml")
    fed = {str(dt) for p in c.programs for m in p.models.values() for _, dt in m.seen}
    return {
        "priced_bytes_per_row": int(round(priced * D)),
        "counted_bytes_per_row": int(round(c.bytes_per_element * D)),
        "priced_bytes_per_element": priced,
        "counted_bytes_per_element": c.bytes_per_element,
        # the executor's finish per routed pair (MLX on the CPU: numpy's take; on a GPU: 0)
        "priced_bytes_per_pair_element": cost.host_bytes_per_pair,
        "counted_bytes_per_pair_element": c.bytes_per_pair_element,
        "predict_input_dtype": ", ".join(sorted(fed)),
        "method": "one offloaded layer call through OffloadExecutor -> dispatch.run_calls -> CoreMLProgram with "
                  "dispatch.COUNTER on, Core ML's bridge faked from coremltools' source (npumoe_mlx.tools.copies)",
    }


# ---- the shape and the experts ------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    G: int
    D: int
    H: int
    tiers: tuple
    bits: int = 4
    group_size: int = 64


REAL = Shape(8, 2048, 768, (64, 256))  # Qwen3-30B-A3B experts, a G=8 group, mlx-community q4 g64
QUICK = Shape(2, 128, 64, (32, 64), 4, 32)  # for tests: seconds, same code path


def expert_spec(shape: Shape, seed: int = 0) -> ProgramSpec:
    """A group of 4-bit experts at `shape` (random weights quantized as mx.quantize does)."""
    return random_spec(G=shape.G, D=shape.D, H=shape.H, tiers=shape.tiers, bits=shape.bits,
                       group_size=shape.group_size, seed=seed)


def model_spec(model: str, G: int, tiers: Sequence[int]) -> ProgramSpec:
    """The first G experts of the first offloadable MoE layer of a local model (its own weights)."""
    from mlx_lm import utils as mlx_utils

    from ..bundle.checks import explain_load_errors, resolve_model
    from ..build.programs import spec_from_switch_glu, switch_glu_layers

    local = resolve_model(model, need_tokenizer=False)
    with explain_load_errors(model):
        m, _ = mlx_utils.load_model(local, lazy=True)
    layers = switch_glu_layers(m)
    if not layers:
        raise ValueError(f"{model}: no supported MoE expert blocks to test")
    layer = min(layers)
    _, module = layers[layer]
    E = module.gate_proj["weight"].shape[0]
    return spec_from_switch_glu(module, layer=layer, expert_ids=range(min(G, E)), tiers=tiers)


def check_formats(spec: ProgramSpec, workdir: Path, log=print) -> Dict[str, dict]:
    """Build every weight format (ane_kernels.formats) through the Core ML backend's builder,
    which measures each saved program's max relative error against the 4-bit source experts in
    the numpy MIL interpreter and refuses a format past its own tolerance; then run every tier
    (verify_package: ||y - ref|| / ||ref|| per function, non-finite outputs raise)."""
    from ane_kernels.coreml import _dir_bytes
    from ane_kernels.milrun import verify_package

    from ..backends.coreml import Backend

    out = {}
    for fmt in WEIGHT_FORMATS:
        t0, tol = time.perf_counter(), TOLERANCE[fmt]
        if fmt == "blockwise" and not spec.quantized:
            out[fmt] = {"built": False, "skipped": "the experts are not quantized", "max_rel_err": None, "bytes": None}
            log(f"  {fmt}: skipped ({out[fmt]['skipped']})")
            continue
        try:
            entry = Backend.build(spec, workdir / fmt, weight_format=fmt)
            pkg = workdir / fmt / entry["package"]
            v = verify_package(pkg, spec, tol=tol)
        except Exception as e:  # one format failing must not hide the others
            out[fmt] = {"built": False, "error": one_line(e, typed=True),
                        "max_rel_err": None, "bytes": None, "tol": tol, "ok": False}
            log(f"  {fmt}: FAILED ({out[fmt]['error']})")
            continue
        err = entry["max_rel_err"]
        out[fmt] = {
            "built": True, "max_rel_err": err, "tol": tol, "ok": err <= tol, "bytes": _dir_bytes(pkg),
            "expert_bytes": expert_bytes(fmt, spec.D, spec.H),  # what one expert streams and holds (cost model)
            "layout": entry["layout"], "rel_err": {fn: r["rel_err"] for fn, r in v["functions"].items()},
            "ops_per_function": {fn: r["ops"] for fn, r in v["functions"].items()},
            "package": str(pkg), "seconds": time.perf_counter() - t0,
        }
        log(f"  {fmt}: {out[fmt]['bytes'] / 1e6:.2f} MB, max rel err {err:.2e} (tol {tol:g}), "
            f"{out[fmt]['expert_bytes'] / 1e6:.2f} MB per expert streamed, {out[fmt]['seconds']:.1f}s")
    return out


# ---- a compute plan modelled on public MLComputePlan dumps (off a Mac) -------------------


def modelled_plan(pkg, cpu_op: Optional[tuple] = None):
    """A compute plan for the saved package `pkg` as MLComputePlan reports one on a Mac
    (coreml-evidence.md Q1): opset-prefixed names ("ios18.conv"), bare "const", no usage for
    const and constexpr ops, every other op on the Neural Engine, except `cpu_op` =
    (function, index among that function's convs), which prefers the CPU."""
    from coremltools.models import compute_device as cd
    from coremltools.models import compute_plan as cp

    from ane_kernels.milrun import load_package

    class _Dev:
        def __init__(self):  # the real classes wrap a proxy that exists only on macOS
            pass

    ne = type("MLNeuralEngineComputeDevice", (_Dev, cd.MLNeuralEngineComputeDevice), {})()
    cpu = type("MLCPUComputeDevice", (_Dev, cd.MLCPUComputeDevice), {})()
    prog = load_package(pkg)
    usage, functions = {}, {}
    for fn, f in prog.functions.items():
        ops, convs = [], 0
        for op in f.operations:
            name = op.op_type if op.op_type == "const" else f"ios18.{op.op_type}"
            o = cp.MLModelStructureProgramOperation(inputs={}, operator_name=name, outputs=[], blocks=[], __proxy__=None)
            ops.append(o)
            if op.op_type == "const" or op.op_type.startswith("constexpr_"):
                continue
            on_cpu = op.op_type == "conv" and cpu_op == (fn, convs)
            convs += op.op_type == "conv"
            usage[id(o)] = cp.MLComputePlanDeviceUsage(preferred_compute_device=cpu if on_cpu else ne,
                                                       supported_compute_devices=[cpu, ne])
        functions[fn] = cp.MLModelStructureProgramFunction(
            inputs=[], block=cp.MLModelStructureProgramBlock(inputs=[], operations=ops, output_names=[]))

    class Plan:
        model_structure = cp.MLModelStructure(neuralnetwork=None, program=cp.MLModelStructureProgram(functions),
                                              pipeline=None)

        def get_compute_device_usage_for_mlprogram_operation(self, op):
            return usage.get(id(op))

        def get_estimated_cost_for_mlprogram_operation(self, op):
            return None if id(op) not in usage else cp.MLComputePlanCost(weight=0.0)

    return Plan()


def check_placement_modelled(pkg, functions: Sequence[str]) -> dict:
    """The placement check run on modelled plans: one with the smallest tier's first conv
    preferring the CPU (must be refused, naming it), one all on the NE (must pass)."""
    small = functions[0]
    refused = placement_problems(modelled_plan(pkg, cpu_op=(small, 0)), functions)
    clean = placement_problems(modelled_plan(pkg), functions)
    return {
        "checked": True, "plan": "modelled on public MLComputePlan dumps (not this machine's)",
        "result": "refused" if refused else "passed",
        "problems": [str(p) for p in refused],
        "control": "passed" if not clean else "refused: " + "; ".join(map(str, clean)),
        "functions": list(functions),
    }


# ---- Mac measurements --------------------------------------------------------------------


def ane_verdict(ne_s: float, cpu_s: float) -> dict:
    """On the ANE only if CPU_AND_NE is clearly faster than CPU_ONLY: equal times mean Core ML
    ran it on the CPU, whatever the plan says (failed ANE compiles fall back silently)."""
    ratio = ne_s / cpu_s
    on = ratio < NOT_ON_ANE
    what = "on the ANE" if on else "NOT on the ANE"
    return {"on_ane": on, "ne_over_cpu": ratio,
            "verdict": f"{what}: CPU_AND_NE {ne_s * 1e3:.3f} ms vs CPU_ONLY {cpu_s * 1e3:.3f} ms "
                       f"({ratio:.2f}x; < {NOT_ON_ANE} means the NE did the work)"}


def fit_dispatch(tiers: Sequence[int], seconds: Sequence[float], G: int, D: int, H: int) -> dict:
    """t(C) = dispatch + G*C*6DH / rate, from the median times of the tiers (least squares)."""
    from ..planning.cost import flops_per_row

    C, t = np.asarray(tiers, float), np.asarray(seconds, float)
    slope, icpt = np.polyfit(C, t, 1) if len(C) > 1 else (t[0] / C[0], 0.0)
    rate = G * flops_per_row(D, H) / slope if slope > 0 else G * C[-1] * flops_per_row(D, H) / t[-1]
    return {"dispatch_s": float(icpt) if icpt > 0 else None, "tflops": float(rate) / 1e12}


def _rss_bytes() -> int:
    """This process's resident set size (ps; macOS has no /proc)."""
    out = subprocess.run(["ps", "-o", "rss=", "-p", str(os.getpid())], capture_output=True, text=True, check=True)
    return int(out.stdout.strip()) * 1024


def _rss_probe(mlc: str, functions: List[str], shape: List[int]) -> None:
    """Run in a fresh process: RSS before, after loading every tier function (CPU_AND_NE), after one predict each."""
    import coremltools as ct

    before = _rss_bytes()
    models = [ct.models.CompiledMLModel(mlc, compute_units=ct.ComputeUnit.CPU_AND_NE, function_name=f)
              for f in functions]
    loaded = _rss_bytes()
    G, D = shape
    for f, m in zip(functions, models):
        m.predict({INPUT_NAME: np.zeros((G, D, int(f[1:])), np.float32)})  # (G, D, C)
    print(json.dumps({"before": before, "loaded": loaded, "predicted": _rss_bytes()}))


def _memory_probe(mlc: str, functions: List[str], G: int, D: int, package_bytes: int) -> dict:
    """Step 7 in a fresh process (nothing else loaded): RSS growth from loading every tier
    function and predicting once each, against the package's bytes on disk. About 1x: one
    copy of the weights as stored; about 4x for 4-bit weights: decompressed to fp16; about
    the number of functions: a copy per function."""
    probe = subprocess.run(
        [sys.executable, "-c", "import sys, json; from npumoe_mlx.cli.selftest import _rss_probe; "
                               "_rss_probe(sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]))",
         mlc, json.dumps(functions), json.dumps([G, D])], capture_output=True, text=True, timeout=600)
    if probe.returncode != 0:
        return {"error": (probe.stderr.strip().splitlines() or ["failed"])[-1]}
    r = json.loads(probe.stdout.strip().splitlines()[-1])
    return {**r, "package_bytes": package_bytes, "loaded_over_package": (r["predicted"] - r["before"]) / package_bytes}


def backend_load(pkg, cache) -> dict:
    """Evidence step 6: does the project's own loader (backends/coreml.py, placement check on)
    take this package on this Mac? Refused with `-> unknown` constexpr ops is the Q1 bug."""
    from ..backends.coreml import Backend

    try:
        prog = Backend(cache=str(cache)).load(Path(pkg))
    except Exception as e:
        return {"result": "refused", "error": one_line(e, typed=True)}
    return {"result": "loaded", "tiers": list(prog.tiers)}


def _median_s(fn, repeats: int) -> float:
    from ..build.tune import median_s

    return median_s(fn, repeats)


def measure_format(fmt: str, info: dict, spec: ProgramSpec, workdir: Path, repeats: int, log=print) -> dict:
    """Steps 2-5 and 7 of the evidence check list for one built format, on this Mac."""
    import coremltools as ct
    from coremltools.models.compute_plan import MLComputePlan

    from ane_kernels.milrun import rel_err

    from ..backends.coreml import CoreMLProgram
    from ..runtime.dispatch import run_calls

    G, D, H = spec.G, spec.D, spec.H
    fns = [function_name(t) for t in spec.tiers]
    t0 = time.perf_counter()
    mlc = ct.models.utils.compile_model(info["package"], str(workdir / f"{fmt}.mlmodelc"))
    out = {"compile_s": time.perf_counter() - t0}
    plan = MLComputePlan.load_from_path(path=str(mlc), compute_units=ct.ComputeUnit.CPU_AND_NE)
    problems = placement_problems(plan, fns)
    out["placement"] = {"checked": True, "plan": "MLComputePlan (CPU_AND_NE)",
                        "result": "refused" if problems else "ane",
                        "problems": [str(p) for p in problems],
                        "functions_without_usage": sorted({p.function for p in problems if p.preferred == "unknown"})}
    rng = np.random.default_rng(0)
    top = max(spec.tiers)
    x = rng.standard_normal((G, top, D)).astype(np.float32)
    ref = reference_ffn(spec, x.astype(np.float64))
    times, errs, models = {}, {}, {}
    for cu in COMPUTE_UNITS:
        times[cu], errs[cu] = {}, {}
        for tier, fn in zip(spec.tiers, fns):
            t0 = time.perf_counter()
            m = ct.models.CompiledMLModel(str(mlc), compute_units=getattr(ct.ComputeUnit, cu), function_name=fn)
            load_s = time.perf_counter() - t0
            xt = np.ascontiguousarray(x[:, :tier].transpose(0, 2, 1))  # programs take (G, D, C)
            y = m.predict({INPUT_NAME: xt})[OUTPUT_NAME]
            errs[cu][fn] = rel_err(np.asarray(y).transpose(0, 2, 1), ref[:, :tier])
            times[cu][fn] = {"median_s": _median_s(lambda: m.predict({INPUT_NAME: xt}), repeats), "load_s": load_s}
            if cu == "CPU_AND_NE":
                models[tier] = m
        log(f"    {fmt} {cu}: " + ", ".join(f"{fn} {v['median_s'] * 1e3:.3f} ms" for fn, v in times[cu].items()))
    fn_top = fns[-1]
    out["predict"] = times
    out["rel_err_on_device"] = errs
    out["verdict"] = ane_verdict(times["CPU_AND_NE"][fn_top]["median_s"], times["CPU_ONLY"][fn_top]["median_s"])
    out["fit"] = fit_dispatch(spec.tiers, [times["CPU_AND_NE"][f]["median_s"] for f in fns], G, D, H)
    # step 5: predict alone vs the whole program call the executor makes (gather in, write out)
    prog = CoreMLProgram(fmt, models, G, D, Path(mlc), functions=dict(zip(spec.tiers, fns)))
    x2, calls = x.reshape(G * top, D), [(0, np.arange(G), top, np.arange(G * top))]
    outs = np.empty((G * top, D), np.float32)
    run_s = _median_s(lambda: run_calls([prog], calls, x2, outs), repeats)
    predict_s = times["CPU_AND_NE"][fn_top]["median_s"]
    out["program_call"] = {"tier": top, "predict_s": predict_s, "run_s": run_s,
                           "program_run_s": _median_s(lambda: prog.run(x, top), repeats),
                           "overhead_s": run_s - predict_s, "overhead_per_row_s": (run_s - predict_s) / (G * top)}
    out["memory"] = _memory_probe(str(mlc), fns, G, D, info["bytes"])  # step 7
    out["backend_load"] = backend_load(info["package"], workdir / "cache")  # step 6
    xt = np.ascontiguousarray(x.transpose(0, 2, 1))
    out["_run_ne"] = lambda: models[top].predict({INPUT_NAME: xt})  # for power / Ultra
    return out


def measure_mlx(shape: Shape, C: int, repeats: int) -> dict:
    """Step 8: MLX's SwitchGLU (gather_qmm at q4) on the same G experts x C rows each."""
    import mlx.core as mx

    from ..planning.cost import flops_per_row
    from ..build.tune import _module

    G, D, H = shape.G, shape.D, shape.H
    m = _module(D, H, G, {"bits": shape.bits, "group_size": shape.group_size} if shape.bits < 16 else None)
    m.set_dtype(mx.float16)  # fp16 scales and activations, as mlx-community q4 models run
    x = mx.random.normal((G * C, D)).astype(mx.float16)
    inds = mx.repeat(mx.arange(G), C).reshape(-1, 1).astype(mx.uint32)  # expert-sorted rows
    mx.eval(x, inds)
    run = lambda: mx.eval(m(x, inds))  # noqa: E731
    t = _median_s(run, repeats)
    return {"rows": G * C, "median_s": t, "tflops": G * C * flops_per_row(D, H) / t / 1e12,
            "device": str(mx.default_device()), "_run": run}


def joules_per_row(watts: Optional[dict], rails: Sequence[str], seconds: float, rows: int) -> Optional[float]:
    """Energy per row of one call from the mean W of `rails` (the unit and the CPU that feeds it)."""
    if not watts or any(watts.get(r) is None for r in rails):
        return None
    return sum(watts[r] for r in rails) * seconds / rows


def measure_power(run_ne, ne_s: float, run_mlx, mlx_s: float, rows: int, min_s: float = 2.0) -> dict:
    """Step 9: mean W per rail (ANE, GPU and the CPU beside them) under each side, and joules per
    row with the CPU rail counted (the host copies run there); root only."""
    from ..planning.power import active_power, power_sampler

    sampler, why = power_sampler()
    if sampler is None:
        return {"skipped": why}
    ne_w, mlx_w = active_power(sampler, run_ne, min_s), active_power(sampler, run_mlx, min_s)
    ne_j, mlx_j = joules_per_row(ne_w, ("ane", "cpu"), ne_s, rows), joules_per_row(mlx_w, ("gpu", "cpu"), mlx_s, rows)
    return {"programs_w": ne_w, "mlx_w": mlx_w, "programs_j_per_row": ne_j, "mlx_j_per_row": mlx_j,
            "energy_ratio": ne_j / mlx_j if ne_j and mlx_j else None}


def measure_two_models(mlc: str, fn: str, x: np.ndarray, n: int = 20) -> dict:
    """Step 10 (Ultra): one model alone vs two models from two threads: calls per second.
    About 2x means Core ML uses the second die's ANE; about 1x means it does not."""
    import coremltools as ct

    models = [ct.models.CompiledMLModel(mlc, compute_units=ct.ComputeUnit.CPU_AND_NE, function_name=fn)
              for _ in range(2)]
    for m in models:
        m.predict({INPUT_NAME: x})

    def loop(m):
        for _ in range(n):
            m.predict({INPUT_NAME: x})

    t0 = time.perf_counter()
    loop(models[0])
    one = n / (time.perf_counter() - t0)
    threads = [threading.Thread(target=loop, args=(m,)) for m in models]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    two = 2 * n / (time.perf_counter() - t0)
    return {"one_model_calls_per_s": one, "two_models_calls_per_s": two, "speedup": two / one,
            "second_ane": two / one >= 1.6}


# ---- the report as a chip profile and a cost model ---------------------------------------


def measured_profile(base, measured: Dict[str, Optional[float]], how: Dict[str, str], where: str) -> dict:
    """A chips-file entry (chips.profile_entry) for this Mac: `base` (the table's profile of this
    chip) with every measured field replaced, its source saying where and how it was measured."""
    from ..planning.chips import FIELDS, profile_entry

    entry = profile_entry(base)
    for f, v in measured.items():
        if f not in FIELDS:
            raise ValueError(f"unknown chip field {f!r}")
        if v is not None and v > 0:
            entry[f] = {"value": float(v), "source": f"measured by npumoe selftest on {where}", "note": how[f]}
    for f in FIELDS:
        if f not in measured or measured[f] is None or measured[f] <= 0:
            entry[f]["note"] = ("not measured by selftest; the table's value. " + entry[f].get("note", "")).strip()
    return entry


def measured_cost(profile_name: str, entry: dict, D: int, H: int, weight_format: str, copy: Optional[dict]) -> dict:
    """The cost model `--chip` would predict with this measured profile, the weights priced at
    the bytes `weight_format` streams (formats.expert_bytes); host copies priced so the model
    reproduces the measured overhead of a whole program call (step 5)."""
    from ..backends.registry import chip_cost
    from ..planning.chips import FIELDS, ChipProfile

    prof = ChipProfile(name=profile_name, sources={f: entry[f]["source"] for f in FIELDS},
                       **{f: entry[f]["value"] for f in FIELDS})
    cost = chip_cost(prof, "coreml", D, H, weight_format=weight_format)
    cost.source = f"npumoe selftest: measured profile of {profile_name} (weights {weight_format})"
    if copy and copy.get("overhead_s", 0) > 0:
        cost.copy_bps = copy["rows"] * D * cost.host_bytes_per_element / copy["overhead_s"]  # the bytes it prices
        cost.source += f"; copy_bps from predict vs program call ({copy['rows']} rows)"
    return cost.to_dict()


# ---- the run ------------------------------------------------------------------------------


NEEDS_MAC = [
    "placement: MLComputePlan per function on this machine's compiled package (step 2)",
    "predict timing CPU_AND_NE vs CPU_ONLY vs CPU_AND_GPU, and the on-ANE verdict (steps 3-4)",
    "predict alone vs the whole program call: the host copy overhead (step 5)",
    "RSS after loading every tier function vs the package bytes (step 7)",
    "MLX gather_qmm on the GPU at the same shape: the ANE/GPU ratio (step 8)",
    "powermetrics energy: ANE, GPU and CPU rails (step 9, needs sudo)",
    "two models from two threads on an Ultra: the second ANE (step 10)",
    "the measured chip profile and cost model (the report's chips and cost sections)",
]


def check_writable(path) -> None:
    """Fail before any work if `path` cannot be written (one line)."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"--json {path}: is a folder; give a file path")
    d = p.parent if str(p.parent) else Path(".")
    if not d.is_dir():
        raise ValueError(f"--json {path}: folder {d} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-selftest-")
    except OSError as e:
        raise ValueError(f"--json {path}: cannot write in {d} ({e.strerror or e})") from None
    os.close(fd)
    os.unlink(tmp)
    if p.exists() and not os.access(p, os.W_OK):
        raise ValueError(f"--json {path}: the file is not writable")


def platform_info() -> dict:
    from ..backends.coreml import macos_version
    from ..planning.chips import detect_chip

    info = {"system": platform.system(), "machine": platform.machine(), "python": platform.python_version(),
            "host": platform.node(), "on_mac": sys.platform == "darwin",
            "macos": ".".join(map(str, macos_version())) or None, "chip": detect_chip()}
    for mod in ("coremltools", "mlx.core", "mlx_lm"):
        try:
            info[mod.split(".")[0]] = __import__(mod, fromlist=["__version__"]).__version__
        except Exception:
            info[mod.split(".")[0]] = None
    if hasattr(os, "getloadavg"):
        info["load"] = list(os.getloadavg())
    return info


def run_mac(report: dict, spec: ProgramSpec, shape: Shape, workdir: Path, repeats: int, log=print) -> None:
    """Steps that need a Mac; fills report["mac"], ["placement"], and the chips/cost sections."""
    from ..planning.chips import chip_profile, load_chips

    mac = report["mac"] = {"formats": {}}
    runs = {}
    for fmt, info in report["formats"].items():
        if not info["built"]:
            continue
        log(f"  {fmt}: compile, placement, timing by compute unit, memory")
        try:
            r = measure_format(fmt, info, spec, workdir, repeats, log)
        except Exception as e:
            mac["formats"][fmt] = {"error": one_line(e, typed=True)}
            log(f"    {fmt}: FAILED ({mac['formats'][fmt]['error']})")
            continue
        runs[fmt] = r.pop("_run_ne")
        mac["formats"][fmt] = r
        log(f"    {r['verdict']['verdict']}; placement {r['placement']['result']}")
    done = {f: r for f, r in mac["formats"].items() if "verdict" in r}
    if not done:
        report["skipped"]["profile"] = "no format ran on this Mac"
        return
    # the format the profile describes: the fastest under CPU_AND_NE among those on the ANE
    on = {f: r for f, r in done.items() if r["verdict"]["on_ane"]} or done
    top = function_name(max(spec.tiers))
    best = min(on, key=lambda f: on[f]["predict"]["CPU_AND_NE"][top]["median_s"])
    report["placement"] = {**done[best]["placement"], "format": best,
                           "by_format": {f: r["placement"]["result"] for f, r in done.items()}}
    log(f"  MLX gather_qmm at G={shape.G} x {max(spec.tiers)} rows")
    mlx = measure_mlx(shape, max(spec.tiers), repeats)
    run_mlx = mlx.pop("_run")
    mac["mlx"] = mlx
    mac["ane_over_gpu"] = done[best]["fit"]["tflops"] / mlx["tflops"]
    top_s = done[best]["predict"]["CPU_AND_NE"][top]["median_s"]
    mac["power"] = measure_power(runs[best], top_s, run_mlx, mlx["median_s"], mlx["rows"])
    if "skipped" in mac["power"]:
        report["skipped"]["power"] = mac["power"]["skipped"]
    chip = report["platform"]["chip"]
    if chip and chip.endswith("-ultra"):
        x = np.zeros((shape.G, shape.D, max(spec.tiers)), np.float32)  # (G, D, C)
        mac["two_models"] = measure_two_models(str(workdir / f"{best}.mlmodelc"), top, x)
    else:
        report["skipped"]["two_models"] = f"not an Ultra ({chip or 'unknown chip'}): one ANE"
    if chip not in load_chips():
        report["skipped"]["profile"] = (f"this chip ({chip or 'not detected'}) has no entry in the chip table "
                                        "to start the profile from")
        return
    pw = (mac["power"].get("programs_w") or {}), (mac["power"].get("mlx_w") or {})
    where = f"{report['platform']['host']} ({chip}, macOS {report['platform']['macos']}, {time.strftime('%Y-%m-%d')})"
    r = done[best]
    measured = {"ane_tflops": r["fit"]["tflops"], "ane_dispatch_s": r["fit"]["dispatch_s"],
                "gpu_tflops": mlx["tflops"], "ane_power_w": pw[0].get("ane"), "gpu_power_w": pw[1].get("gpu")}
    how = {"ane_tflops": f"{best} weights, G={shape.G} D={shape.D} H={shape.H}, CPU_AND_NE, slope of the median "
                         f"predict time over tiers {list(spec.tiers)}; {r['verdict']['verdict']}",
           "ane_dispatch_s": "intercept of that fit",
           "gpu_tflops": f"MLX SwitchGLU ({f'gather_qmm q{shape.bits}' if shape.bits < 16 else 'gather_mm fp16'}) "
                         f"on {mlx['rows']} rows, {mlx['device']}",
           "ane_power_w": "powermetrics ane rail under the programs", "gpu_power_w": "powermetrics gpu rail under MLX"}
    entry = measured_profile(chip_profile(chip), measured, how, where)
    report["chips"] = {chip: entry}
    pc = r["program_call"]
    copy = {"rows": shape.G * pc["tier"], "overhead_s": pc["overhead_s"]}
    report["cost"] = measured_cost(chip, entry, shape.D, shape.H, best, copy)


def mac_summary(report: dict) -> List[str]:
    """The outcomes a Mac user reads first (docs/selftest.md says what each means)."""
    mac, lines = report.get("mac") or {}, []
    for fmt, r in (mac.get("formats") or {}).items():
        if "error" in r:
            lines.append(f"{fmt}: failed on this Mac: {r['error']}")
            continue
        pc, mem = r["program_call"], r.get("memory") or {}
        lines.append(f"{fmt}: {r['verdict']['verdict']}; placement {r['placement']['result']}"
                     + (f" ({'; '.join(r['placement']['problems'][:3])})" if r["placement"]["problems"] else ""))
        lines.append(f"{fmt}: predict {pc['predict_s'] * 1e3:.3f} ms vs the whole program call "
                     f"{pc['run_s'] * 1e3:.3f} ms at {pc['tier']} rows per expert (host copies and Python)")
        bl = r.get("backend_load") or {}
        if bl:
            lines.append(f"{fmt}: npumoe's Core ML loader {bl['result']}" + (f": {bl['error']}" if "error" in bl else ""))
        if "loaded_over_package" in mem:
            lines.append(f"{fmt}: RSS grew {mem['loaded_over_package']:.2f}x the package bytes loading every tier")
    if "mlx" in mac:
        lines.append(f"ANE/GPU at this shape: {mac['ane_over_gpu']:.2f} (MLX {mac['mlx']['tflops']:.2f} TFLOP/s "
                     f"on {mac['mlx']['device']})")
    pw = mac.get("power") or {}
    if pw.get("energy_ratio"):
        lines.append(f"energy per row, programs (ANE+CPU) / MLX (GPU+CPU): {pw['energy_ratio']:.2f}")
    if "two_models" in mac:
        t = mac["two_models"]
        lines.append(f"two models from two threads: {t['speedup']:.2f}x one model "
                     f"({'a second ANE works' if t['second_ane'] else 'one ANE only'})")
    for step, why in report.get("skipped", {}).items():
        lines.append(f"skipped {step}: {why}")
    return lines


def selftest(shape: Shape = REAL, workdir=None, repeats: int = 20, log=print, model: Optional[str] = None) -> dict:
    """The whole check; returns the report (what ``--json`` writes). `model`: test that local
    model's own experts (its first MoE layer, `shape.G` of them, its D and H) instead."""
    from ..backends.coreml import macos_version

    t0 = time.perf_counter()
    experts = "random, quantized as mx.quantize does"
    if model:
        spec = model_spec(model, shape.G, shape.tiers)
        q = next((w for w in (spec.gate, spec.up, spec.down) if hasattr(w, "bits")), None)
        shape = Shape(spec.G, spec.D, spec.H, spec.tiers, q.bits if q else 16, q.group_size if q else 0)
        experts = f"{model}: layer {spec.layer} experts {list(spec.expert_ids)} ({spec.weight_format})"
    else:
        spec = expert_spec(shape)
    report = {"kind": KIND, "format": FORMAT, "platform": platform_info(),
              "shape": {"G": shape.G, "D": shape.D, "H": shape.H, "tiers": list(shape.tiers), "bits": shape.bits,
                        "group_size": shape.group_size, "experts": experts},
              "skipped": {}}
    log(f"npumoe selftest: G={shape.G} D={shape.D} H={shape.H} q{shape.bits}g{shape.group_size} "
        f"tiers {list(shape.tiers)} on {report['platform']['system']} {report['platform']['machine']} ({experts})")
    with tempfile.TemporaryDirectory(prefix="npumoe-selftest-") as tmp:
        work = Path(workdir) if workdir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        log("weight formats (built, then run in the numpy MIL interpreter against the 4-bit experts):")
        report["formats"] = check_formats(spec, work, log)
        report["copies"] = copy_bytes(shape.D)
        c = report["copies"]
        log(f"host copies per offloaded row: counted {c['counted_bytes_per_row']} B "
            f"({c['counted_bytes_per_element']:.2f} B/element), priced {c['priced_bytes_per_row']} B "
            f"({c['priced_bytes_per_element']:g} B/element, the registry's Core ML cost model)")
        built = [f for f, i in report["formats"].items() if i["built"]]
        fns = [function_name(t) for t in spec.tiers]
        if built:
            report["placement"] = check_placement_modelled(report["formats"][built[0]]["package"], fns)
        else:
            report["placement"] = {"checked": False, "result": "no format built"}
        on_mac = report["platform"]["on_mac"]
        if on_mac and macos_version() >= (15, 0):
            log("on this Mac:")
            report["needs_mac"] = []
            run_mac(report, spec, shape, work, repeats, log)
            for line in mac_summary(report):
                log(f"  {line}")
        else:
            why = ("Core ML programs need macOS 15 (iOS18 opset); this is macOS "
                   + ".".join(map(str, macos_version()))) if on_mac else f"Core ML runs only on macOS (this is {sys.platform})"
            report["needs_mac"] = list(NEEDS_MAC)
            report["skipped"]["mac"] = why
            p = report["placement"]
            if p["checked"]:
                log(f"placement check on a modelled plan: {p['result']} ({'; '.join(p['problems'])}); "
                    f"all-NE control {p['control']}")
            log(f"needs a Mac ({why}):")
            for item in NEEDS_MAC:
                log(f"  - {item}")
        if not workdir:  # the packages went with the temporary folder
            for info in report["formats"].values():
                info.pop("package", None)
    report["seconds"] = time.perf_counter() - t0
    return report


def _jsonable(o):
    if isinstance(o, dict):
        return {str(k): _jsonable(v) for k, v in o.items() if not callable(v)}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    return o


def write_report(path, report: dict) -> None:
    from ..atomic import write_json

    write_json(path, _jsonable(report))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="npumoe selftest",
        description="Check the Core ML path on this machine in minutes: every weight format built and checked at "
                    "a real expert shape; on a Mac also placement, speed by compute unit, copies, memory, "
                    "MLX's GPU at the same shape and energy. Run it first on a Mac.")
    p.add_argument("--json", metavar="PATH", help="Write the report here (also a chips file and a cost model: "
                                                  "`npumoe chips --file PATH`, `--cost PATH`).")
    p.add_argument("--quick", action="store_true",
                   help=f"A tiny shape (G={QUICK.G} D={QUICK.D} H={QUICK.H}) instead of Qwen3-30B-A3B's: for tests.")
    p.add_argument("--model", metavar="PATH", help="Test a local MLX model's own experts (first MoE layer, G of "
                                                   "them, its D and H) instead of random 4-bit ones.")
    p.add_argument("--repeats", type=int, default=20, help="Timed predict calls per median (Mac).")
    p.add_argument("--keep", metavar="DIR", help="Keep the built packages in DIR.")
    args = p.parse_args(argv)
    from ..build.args import at_least

    at_least("--repeats", args.repeats, 1, "timed calls per median")
    if args.json:
        check_writable(args.json)
    report = selftest(QUICK if args.quick else REAL, workdir=args.keep, repeats=args.repeats, model=args.model)
    bad = [f for f, i in report["formats"].items() if not i.get("skipped") and not (i["built"] and i["ok"])]
    if args.json:
        write_report(args.json, report)
        print(f"wrote {args.json}")
    if bad:
        print(f"npumoe selftest: format(s) failing: {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    from ..log import console

    console()  # `[npumoe] ...` lines, as the npumoe command shows them
    sys.exit(main())
