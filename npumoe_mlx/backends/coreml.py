"""The coreml backend: multifunction .mlpackage programs on the Apple Neural Engine.

macOS only (coremltools builds and saves programs anywhere, but Core ML itself runs
only on macOS). Each package is compiled once to .mlmodelc in a stable cache folder
(``coreml/`` under the cache root, paths.py: `$NPUMOE_CACHE`, else ~/.cache/npumoe): compiling takes seconds to minutes
for large programs and Core ML caches the ANE compilation per compiled-model path.
Each tier function is loaded with compute units CPU_AND_NE (never ALL, which may pick
the GPU). On macOS 14.4+ `MLComputePlan` must show every compute op preferring the
Neural Engine, else loading raises with the ops that would silently fall back.

``build`` writes one package, ``<name>.mlpackage`` with a function per tier, and runs
anywhere coremltools does; ``checker`` runs a fresh package in the numpy MIL
interpreter (``ane_kernels.milrun``), so builds are checked off macOS too.
"""

import hashlib
import os
import platform
import shutil
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from ane_kernels.coreml import (FP16_SATURATION, INPUT_LAYOUT, INPUT_NAME, OUTPUT_NAME, build_package,
                                choose_layout, function_name, read_metadata)
from ane_kernels.formats import DEFAULT_FORMAT, TOLERANCE as FORMAT_TOLERANCE, check_format
from ane_kernels.limits import DEFAULT_LIMITS
from ane_kernels.milrun import format_error
from ane_kernels.spec import AffineWeight, ProgramSpec

from ..bundle.fingerprint import update_sampled
from ..bundle.paths import cache_root
from . import BackendError, Program, member, same_program

OFF_MACOS = "Core ML programs can be built here but run only on macOS"
# Compiled programs one process may hold (the planner's budget, whole model: plan.program_units).
# Public figure: ~119-121 resident ANE programs per process on the private _ANEClient path
# (maderix/ANE; oMLX docs, jundot/omlx). For Core ML the limit is NOT known publicly: each
# function of a multifunction package is its own ANE compile (coreml-evidence.md Q2 risk 4),
# so each tier counts as one program, and the private path's figure is assumed until a Mac
# measures it (`npumoe selftest`). `--max-programs` overrides it.
PROGRAM_BUDGET = 120
PROGRAM_BUDGET_SOURCE = ("~120 per process on the private ANE path (maderix/ANE, oMLX); unknown for Core ML, "
                         "assumed the same; each tier function counts")
TIERS_ARE_PROGRAMS = True  # each tier function compiles separately
# Programs compute in fp16 and their matmul/conv outputs saturate near FP16_SATURATION: a layer
# whose calibrated |gate|, |up| or |down output| reaches this stays on MLX (plan.fp16_unsafe).
# Half the saturation point: calibration sees a sample of tokens, not every activation.
FP16_RANGE_LIMIT = FP16_SATURATION / 2
_COMPUTE_UNITS = ("CPU_AND_NE", "CPU_ONLY", "CPU_AND_GPU")
MIN_MACOS = (15, 0)  # the iOS18 opset (constexpr_blockwise_shift_scale, constexpr_lut_to_dense)


class FormatError(ValueError):
    """A weight format loses more than its tolerance on this model's experts (one line)."""


def available() -> bool:
    return sys.platform == "darwin" and macos_version() >= MIN_MACOS


def unavailable_reason() -> str:
    """One line: why Core ML programs cannot run here ('' when they can)."""
    if sys.platform != "darwin":
        return f"{OFF_MACOS} (this is {sys.platform})"
    if macos_version() < MIN_MACOS:
        v = ".".join(map(str, macos_version())) or "unknown"
        return f"Core ML expert programs need macOS 15 or later (their iOS18 opset); this is macOS {v}"
    return ""


def macos_version():
    v = platform.mac_ver()[0]
    return tuple(int(p) for p in v.split(".")) if v else ()


def cache_dir() -> Path:
    """Compiled packages: ``coreml/`` under npumoe's one cache root (paths.py)."""
    return cache_root() / "coreml"


def _package_key(pkg: Path) -> str:
    """Content key of a package: model spec bytes + size and samples of each weight file.

    Weight files can be a GiB; sampling (head, middle, tail) keeps this fast while a
    rebuilt package (new spec or different weights) still gets a new key.
    """
    h = hashlib.sha256()
    for f in sorted(p for p in pkg.rglob("*") if p.is_file()):
        rel = str(f.relative_to(pkg))
        size = f.stat().st_size
        h.update(f"{rel}:{size}".encode())
        with open(f, "rb") as fh:
            update_sampled(h, fh, 0, size, 3, 1 << 20, 3 << 20, "ends")
    return h.hexdigest()[:24]


# coremltools' bridge, per element of a program row (coreml-evidence.md Q3, read from its
# source): it takes fp32 (``CoreMLPythonArray.mm:dataTypeOf``: no fp16; an fp16 ndarray is cast
# back to fp32 first, ``models/model.py``, so the host no longer casts to fp16), Core ML
# converts fp32 -> the model's fp16 input (6), its fp16 output -> fp32 (6,
# ``CoreMLPythonUtils.mm:convertArrayValueToPython``) and copies that into a py::array (8).
BRIDGE_BYTES = 20


def host_bytes(layout: str) -> int:
    """Host bytes (read + written) per element of a program row on this program's path,
    counted by tests/test_copies.py: dispatch.gather 8 ((G, C, D); (G, D, C) rows are gathered
    on MLX: 0), the bridge, dispatch.checked 4, the output into the call's buffer 8. The
    executor's finish comes on top (``registry.host_bytes``: the buffer to MLX, 8, with MLX on
    a GPU, as on a Mac: 40 in all). (Before: 62 plus 8 per pair, priced 8.)"""
    return (8 if layout == "GCD" else 0) + BRIDGE_BYTES + 4 + 8


class CoreMLProgram(Program):
    """One package's tier functions. Copies and pickles drop the loaded models and
    reopen each tier's function from the compiled package on its first run.

    Takes x (G, D, C) channels first (``input_layout``). It is passed to ``predict`` as
    float32: coremltools' bridge has no fp16 input type (an fp16 array is cast back to
    fp32, coremltools/models/model.py; coremlpython/CoreMLPythonArray.mm), and Core ML
    converts fp32 to the model's fp16 input itself, so a host ``astype(float16)`` only adds
    two passes (docs/apple-silicon.md)."""

    transient = {"models": dict}
    input_layout = INPUT_LAYOUT

    def __init__(self, name, models: Dict[int, object], G: int, D: int, compiled: Path,
                 functions: Optional[Dict[int, str]] = None, compute_units: str = "CPU_AND_NE",
                 meta: Optional[dict] = None):
        self.name, self.G, self.D = name, G, D
        self.meta = dict(meta or {})
        self.models = dict(sorted(models.items()))
        self.tiers = tuple(self.models)
        self.compiled = compiled
        self.functions = dict(functions or {})  # tier -> function name in the package
        self.compute_units = compute_units

    def model(self, tier: int):
        m = self.models.get(tier)
        if m is None:
            import coremltools as ct

            m = self.models[tier] = ct.models.CompiledMLModel(
                str(self.compiled), compute_units=getattr(ct.ComputeUnit, self.compute_units),
                function_name=self.functions[tier],
            )
        return m

    def _run(self, x: np.ndarray, tier: int) -> np.ndarray:
        # fp32 as is (run_layout hands a C-contiguous float32 array: no copy): the bridge takes no fp16
        out = self.model(tier).predict({INPUT_NAME: np.ascontiguousarray(x, dtype=np.float32)})
        return np.asarray(out[OUTPUT_NAME], dtype=np.float32)


HOST_BYTES_PER_ELEMENT = host_bytes(CoreMLProgram.input_layout)


class MilProgram(Program):
    """A package run by the numpy MIL interpreter: slow, but it runs off macOS (build checks).
    Same contract as CoreMLProgram: x (G, D, C) in, y (G, D, C) out."""

    input_layout = INPUT_LAYOUT

    def __init__(self, package: Path, meta: dict):
        from ane_kernels.milrun import load_package

        self.meta, self.name = meta, meta["name"]
        self.G, self.D, self.tiers = int(meta["G"]), int(meta["D"]), tuple(int(t) for t in meta["tiers"])
        self.program = load_package(package)

    def _run(self, x: np.ndarray, tier: int) -> np.ndarray:
        from ane_kernels.milrun import run_function

        (y,) = run_function(self.program, function_name(tier), {INPUT_NAME: x}).values()  # fp16 inside
        return np.asarray(y, np.float32)


class Backend:
    name = "coreml"

    def __init__(
        self,
        compute_units: str = "CPU_AND_NE",
        cache: Optional[str] = None,
        check_placement: bool = True,
    ):
        if not available():
            raise BackendError(unavailable_reason())
        if compute_units not in _COMPUTE_UNITS:
            raise ValueError(
                f"compute_units {compute_units!r} not allowed (choose from {_COMPUTE_UNITS}; "
                "ALL may silently pick the GPU)"
            )
        import coremltools as ct

        self.ct = ct
        self.compute_units_name = compute_units
        self.compute_units = getattr(ct.ComputeUnit, compute_units)
        self.cache = Path(cache) if cache else cache_dir()
        self.check_placement = check_placement and compute_units == "CPU_AND_NE"

    def compile(self, pkg) -> Path:
        """Compile `pkg` to `<cache>/<name>-<key>.mlmodelc` once; later calls reuse it."""
        pkg = Path(pkg)
        out = self.cache / f"{pkg.stem}-{_package_key(pkg)}.mlmodelc"
        if out.is_dir():
            return out
        self.cache.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=self.cache))
        try:
            built = self.ct.models.utils.compile_model(str(pkg), str(tmp / out.name))
            try:
                os.rename(built, out)
            except OSError:  # another process compiled it meanwhile
                if not out.is_dir():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return out

    @staticmethod
    def build(spec: ProgramSpec, out_dir, *, limits=None, layout: Optional[str] = None, log=None,
              weight_format: Optional[str] = None) -> dict:
        """Write `spec` as one multifunction `<name>.mlpackage` in `out_dir` (the ANE's static
        checks first: LimitError names what does not fit `limits`); returns the entry.

        `weight_format` (formats.WEIGHT_FORMATS, default formats.DEFAULT_FORMAT) is how the
        weights are stored; the saved program then runs in the numpy MIL interpreter against
        the spec's own weights (the model's experts) and a format past its tolerance is
        refused (FormatError). `layout` None: conv where the group fits, else matmul."""
        limits = limits or DEFAULT_LIMITS
        spec = replace(spec, storage=check_format(weight_format or spec.storage or DEFAULT_FORMAT))
        if layout is None:
            gs = min([w.group_size for w in (spec.gate, spec.up, spec.down) if isinstance(w, AffineWeight)] or [64])
            layout = choose_layout(spec.G, spec.D, spec.H, limits, gs) or "conv"  # None: the checks name the axis
        b = build_package(spec, Path(out_dir) / f"{spec.name}.mlpackage", layout=layout, limits=limits)
        err = format_error(b.path, spec)
        tol = FORMAT_TOLERANCE[spec.storage]
        if not err <= tol:
            shutil.rmtree(b.path, ignore_errors=True)
            raise FormatError(f"layer {spec.layer} ({spec.name}): weight format {spec.storage} is off the model's "
                              f"experts by {err:.3g} (max relative error) > its tolerance {tol:g}; "
                              f"choose another --weight-format")
        if log is not None:
            log(f"wrote {b.path} ({b.package_bytes / 1e6:.2f} MB on disk, {b.weight_bytes / 1e6:.2f} MB "
                f"weights shared by {len(b.functions)} functions, layout {b.layout}, {b.seconds:.1f}s)")
            for fn, t in sorted(b.functions.items(), key=lambda kv: kv[1]):
                log(f"  function {fn}: {b.ops_per_function[fn]} ops")
            log("  ANE static checks: passed")
            log(f"  weight format {spec.storage}: max relative error {err:.2e} vs the model's experts "
                f"(tolerance {tol:g})")
        return {**spec.describe(), "layout": b.layout, "package": b.path.name, "max_rel_err": err,
                "functions": {str(t): fn for fn, t in b.functions.items()}, "files": [b.path.name]}

    @staticmethod
    def checker(entry: dict, folder) -> Tuple[MilProgram, List[int]]:
        """A fresh package in the numpy MIL interpreter (any OS), and its smallest tier to check:
        every tier shares the weights, and the interpreter is slow."""
        pkg = member(folder, entry["package"])
        same_program(entry, read_metadata(pkg), pkg.name)
        prog = MilProgram(pkg, entry)
        return prog, [min(prog.tiers)]

    def load(self, src, folder=None) -> CoreMLProgram:
        """src: an entry ``build`` returned, with the `folder` it wrote to; a loose .mlpackage;
        or a ProgramSpec (built into a temporary package, then compiled into the cache)."""
        if isinstance(src, ProgramSpec):
            with tempfile.TemporaryDirectory(prefix=".build-", dir=self._cache_root()) as tmp:
                return self.load(self.build(src, tmp), tmp)
        if folder is not None:
            meta, pkg = src, member(folder, src["package"])
            functions = {int(t): fn for t, fn in src["functions"].items()}
        else:
            pkg, meta, functions = Path(src), None, None
        if pkg.suffix != ".mlpackage" or not pkg.is_dir():
            raise BackendError(f"{pkg} is not an .mlpackage")
        found = read_metadata(pkg)
        if meta is None:
            meta = found
            functions = {int(t): function_name(int(t)) for t in meta["tiers"]}
        same_program(meta, found, pkg.name)
        compiled = self.compile(pkg)
        models = {
            t: self.ct.models.CompiledMLModel(str(compiled), compute_units=self.compute_units, function_name=fn)
            for t, fn in functions.items()
        }
        if self.check_placement and macos_version() >= (14, 4):
            self._require_ane(compiled, list(functions.values()))
        return CoreMLProgram(
            meta["name"], models, int(meta["G"]), int(meta["D"]), compiled,
            functions=functions, compute_units=self.compute_units_name, meta=meta,
        )

    def _cache_root(self) -> Path:
        self.cache.mkdir(parents=True, exist_ok=True)
        return self.cache

    def _require_ane(self, compiled: Path, functions) -> None:
        """Raise unless every compute op of every tier function prefers the Neural Engine."""
        from coremltools.models.compute_plan import MLComputePlan

        plan = MLComputePlan.load_from_path(path=str(compiled), compute_units=self.compute_units)
        plans = {fn: plan if covers(plan, fn) else self._function_plan(compiled, fn, MLComputePlan)
                 for fn in functions}
        require_ane(plans, compiled.name)

    def _function_plan(self, compiled: Path, fn: str, MLComputePlan):
        """A compute plan for one function, when the default one does not cover it: coremltools
        9 loads plans without a function name (compute_plan.py: load_from_path(path,
        compute_units)); a later one that takes `function_name` is used; otherwise the default
        plan stays and the check refuses, naming the function."""
        import inspect

        if "function_name" in inspect.signature(MLComputePlan.load_from_path).parameters:
            return MLComputePlan.load_from_path(path=str(compiled), compute_units=self.compute_units,
                                                function_name=fn)
        return MLComputePlan.load_from_path(path=str(compiled), compute_units=self.compute_units)


# ---- placement: what MLComputePlan says about each op ----

NEURAL_ENGINE = "MLNeuralEngineComputeDevice"
_DEVICE_NAMES = {"MLCPUComputeDevice": "CPU", "MLGPUComputeDevice": "GPU", NEURAL_ENGINE: "NeuralEngine"}


def _device(dev) -> str:
    return "unknown" if dev is None else _DEVICE_NAMES.get(type(dev).__name__, type(dev).__name__)


def op_kind(operator_name: str) -> str:
    """MLComputePlan names ML Program ops with their opset: 'ios18.conv' -> 'conv' ('const' is bare)."""
    return operator_name.rsplit(".", 1)[-1]


def _compute_ops(plan, fn: str):
    """The ops of function `fn` that get a device: const and constexpr_* ops are folded at load
    and MLComputePlan gives them no usage (public dumps: 'ios18.constexpr_blockwise_shift_scale
    | 0 | 0 | 0 | 77 (unknown)')."""
    func = plan.model_structure.program.functions.get(fn)
    if func is None:
        return None
    return [op for op in func.block.operations
            if not (op_kind(op.operator_name) == "const" or op_kind(op.operator_name).startswith("constexpr_"))]


def covers(plan, fn: str) -> bool:
    """Whether `plan` reports a device for any compute op of function `fn` (a plan loaded
    without a function name may cover only the default function)."""
    ops = _compute_ops(plan, fn)
    return bool(ops) and any(plan.get_compute_device_usage_for_mlprogram_operation(op) is not None for op in ops)


@dataclass(frozen=True)
class Placement:
    """One compute op that would not run on the Neural Engine (or a function the plan lacks:
    op None). `weight`: MLComputePlan's estimated share of the function's work, when known."""

    function: str
    op: Optional[str]
    preferred: str = "unknown"
    supported: Tuple[str, ...] = ()
    weight: Optional[float] = None

    def __str__(self) -> str:
        if self.op is None:
            return f"function {self.function}: not in the compute plan"
        work = f", {self.weight:.0%} of the work" if self.weight else ""
        return (f"function {self.function}: op {self.op} prefers {self.preferred} "
                f"(supported: {', '.join(self.supported) or 'none reported'}{work})")


def placement_problems(plans, functions) -> List[Placement]:
    """Every compute op of every function in `functions` that would not run on the Neural
    Engine (function, op, preferred device, supported devices, cost weight); [] if all do.
    ``str(p)`` is its one line.

    `plans`: one MLComputePlan for every function, or {function: MLComputePlan} (anything
    with the same attributes: tests pass fakes modelled on public dumps)."""
    off = []
    for fn in functions:
        plan = plans[fn] if isinstance(plans, dict) else plans
        ops = _compute_ops(plan, fn)
        if ops is None:
            off.append(Placement(fn, None, "missing from the plan"))
            continue
        for op in ops:
            usage = plan.get_compute_device_usage_for_mlprogram_operation(op)
            pref = None if usage is None else usage.preferred_compute_device
            if type(pref).__name__ == NEURAL_ENGINE:
                continue
            sup = () if usage is None else tuple(_device(d) for d in usage.supported_compute_devices)
            cost_of = getattr(plan, "get_estimated_cost_for_mlprogram_operation", None)
            cost = None if cost_of is None else cost_of(op)
            off.append(Placement(fn, op.operator_name, _device(pref), sup,
                                 None if cost is None else float(cost.weight)))
    return off


def require_ane(plans, where: str, functions=None) -> None:
    """Raise BackendError naming each op that would not run on the Neural Engine."""
    functions = list(plans) if functions is None else functions
    off = placement_problems(plans, functions)
    if off:
        raise BackendError(f"{where}: {len(off)} op(s) would not run on the Neural Engine: "
                           + "; ".join(map(str, off)))
