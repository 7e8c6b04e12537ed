"""Backends described once: what the planner, the loader, ``auto``, doctor and every
``--backend``/``--offload`` choice need to know about a backend, read from one registry.

A backend is a unit (ane, cpu, npu, gpu) running programs of one format (a module of
this package: coreml, onnx, mlx). An ONNX Runtime execution provider is a backend of
its own sharing the onnx format, with its own limits, costs and tolerance.

Adding a backend: its program module (if a new format) and one entry in ``REGISTRY``.
"""

import importlib
import importlib.util
from importlib.metadata import PackageNotFoundError, version
import platform
import sys
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, Mapping, Optional, Tuple

from ane_kernels.formats import DEFAULT_FORMAT
from ane_kernels.limits import DEFAULT_LIMITS

from ..planning.cost import MEMCPY_BPS, CostModel, chip_cost_model
from ..runtime.dispatch import finish_bytes
from ..interrupt import caused_by

COREML_MIN_MACOS = (15, 0)  # iOS18 opset programs (DESIGN.md: macOS 15+)


def _package(name: str) -> Tuple[bool, str]:
    """(installed, why not) of a Python package, without importing it."""
    if importlib.util.find_spec(name) is None:
        return False, f"{name} is not installed"
    return True, ""


def _coreml_runs() -> Tuple[bool, str]:
    if sys.platform != "darwin":
        return False, (f"Core ML runs only on macOS (this is {platform.system() or sys.platform}); "
                       f"its programs can be built here but run only on macOS")
    if platform.machine() != "arm64":
        return False, f"the Neural Engine needs Apple Silicon (this Mac is {platform.machine()})"
    if tuple(int(p) for p in platform.mac_ver()[0].split(".") if p.isdigit()) < COREML_MIN_MACOS:
        return False, f"macOS {platform.mac_ver()[0]} is older than 15.0, which the programs need"
    return _package("coremltools")


def _onnx_providers() -> Tuple[Optional[list], str]:
    """(providers onnxruntime lists here, or None and why it cannot be imported)."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        if caused_by(e):  # Ctrl-C during its import: an interrupt, not a broken install
            raise KeyboardInterrupt from e
        return None, f"onnxruntime cannot be imported ({e})"
    return list(ort.get_available_providers()), ""


def _onnx_runs(provider: str) -> Callable[[], Tuple[bool, str]]:
    def check() -> Tuple[bool, str]:
        found, why = _onnx_providers()
        if found is None:
            return False, why
        if provider not in found:
            return False, f"onnxruntime {package_version('onnxruntime')} here lists no {provider} (it has {', '.join(found)})"
        return True, ""
    return check


def package_version(package: str) -> Optional[str]:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _always() -> Tuple[bool, str]:
    return True, ""


def _providers() -> dict:
    return {"providers": _onnx_providers()[0] or []}


def _mlx_device() -> dict:
    import mlx.core as mx

    return {"device": str(mx.default_device())}


def _apple_silicon() -> bool:
    return sys.platform == "darwin" and platform.machine() == "arm64"


# Plan limits (PlanLimits fields). CPU: no alignment rule; multiples of 8 pad little; sessions
# open on first use, so more tiers cost little until a call needs them. 12 tiers hold padding
# <= 15% on real routing at 512- and 2048-token calls (benchmarks/replay.md); 6 did not.
CPU_LIMITS = {"capacities": tuple(range(8, 4096 + 1, 8)), "max_tiers": 12, "max_programs": 4096}
# ANE (ane-constraints.md): sequence axis a multiple of 32 fp16 (64-byte rows); the tiers are
# functions of one multifunction package sharing its weights, so 12 cost little.
# max_axis caps G at what the builder accepts; weight_format: how programs store the experts
# (ane_kernels/formats.py: its default follows Apple's guidance for the Neural Engine).
ANE_LIMITS = {"capacities": tuple(range(32, 4096 + 1, 32)), "max_tiers": 12, "max_axis": DEFAULT_LIMITS.max_axis,
              "weight_format": DEFAULT_FORMAT}

# Parametric default costs. onnx/mlx: this kind of 2-core x86 machine (measured once with
# `npumoe tune`; run it on yours); programs and MLX share the CPU's cores (overlap 0, as
# `tune` measures). coreml: ANE numbers from shared/reference/ane-constraints.md (Core ML
# predict ~0.2-0.4 ms per call; 2.3 TFLOPS on one 2048ch x 64 conv, so ~2 TFLOPS achieved on
# small grouped convs) against MLX on an Apple GPU (a few TFLOPS on gather_mm); energy: ANE
# ~2-2.8 W busy, GPU ~20 W on LLM work (maderix/ANE; ANEForge, in ane-constraints.md), per
# FLOP at the throughputs above. Host copies: one CPU core's memcpy (cost.MEMCPY_BPS).
CPU_COST = CostModel("onnx", 5e-5, 6.0e10, 5e9, 5e-5, 1e-4, 2.0e9, mlx_dense_flops=8.0e9, overlap=0.0)
MLX_COST = CostModel("mlx", 1e-4, 8.0e9, 5e9, 5e-5, 1e-4, 2.0e9, mlx_dense_flops=8.0e9, overlap=0.0)
ANE_COST = CostModel("coreml", 3e-4, 2.0e12, MEMCPY_BPS, 5e-5, 5e-5, 3.0e12, mlx_dense_flops=5.0e12,
                     program_j_per_flop=2.5 / 2.0e12, program_j_per_call=2.5 * 3e-4,
                     mlx_j_per_flop=20.0 / 3.0e12, mlx_j_per_call=20.0 * 5e-5)


@dataclass(frozen=True)
class BackendInfo:
    """One backend: everything outside its program module needs to know about it."""

    name: str  # what --backend / --offload / a plan's "backend" say
    unit: str  # where its programs run: "ane", "cpu", "npu" or "gpu"
    program_format: str  # the module under npumoe_mlx/backends/ that builds and loads its programs
    limits: Mapping  # PlanLimits fields (capacities, max_tiers, ...) besides its defaults
    cost: CostModel  # parametric default (``default_cost``)
    tolerance: float  # largest relative error its programs may show against MLX's experts
    available: Callable[[], Tuple[bool, str]]  # (programs run here, why not)
    releases_mlx_experts: bool = False  # a loaded bundle may drop MLX's copy of program-only experts
    preferred_on: Callable[[], bool] = lambda: False  # ``--offload auto`` picks it here (first in REGISTRY wins)
    # host bytes a row element moves on its data path, read + written (None: its program module's
    # HOST_BYTES_PER_ELEMENT, counted on the executor's path by tests/test_copies.py)
    host_bytes_per_element: Optional[float] = None
    bundles: bool = True  # ``npumoe build`` makes bundles of it (mlx: a reference, installed without one)
    options: Mapping = field(default_factory=dict)  # keyword arguments of its program module's Backend
    package: Optional[str] = None  # the Python package that runs it (doctor's version column)
    chip_costs: bool = False  # ``--chip`` profiles (data/chips.json) predict its programs
    details: Callable[[], dict] = dict  # what doctor lists beside "runs here" (providers, device)
    dense_programs: bool = False  # also runs a model's dense linears (dense.py: onnxruntime on the CPU)
    dynamic_rows: bool = False  # its programs run any row count below their ladders (plan.below_ladder_tiers)
    label: str = ""  # the device reports name (""; MLX's device); onnx programs name their session's provider
    weight_formats: bool = False  # builds its own expert weight format (--weight-format; ane_kernels/formats.py)
    builder: Optional[Tuple[str, str]] = None  # (package that builds its programs, pip requirement that installs it)
    # Where MLX's arrays live when its programs run, which decides the executor's finish
    # (``dispatch.finish_bytes``): None, this process's MLX device; False, an Apple GPU (its
    # programs run only on a Mac: Core ML's predictions price a Mac's path wherever they are made).
    finish_on_host: Optional[bool] = None

    def default_cost(self) -> CostModel:
        """A fresh copy of its parametric cost model (callers may change it)."""
        return replace(self.cost, backend=self.name, host_bytes_per_element=self.host_bytes(),
                       host_bytes_per_pair=self.host_bytes_per_pair())

    def host_bytes(self, on_host: Optional[bool] = None) -> float:
        """Host bytes (read + written) per element of a program row on this backend's path: its
        program module's HOST_BYTES_PER_ELEMENT plus the executor's finish
        (``dispatch.finish_bytes``: 8 where MLX runs on a GPU, 0 on the CPU). ``on_host`` None:
        the descriptor's ``finish_on_host``; False: a GPU (a Mac, for ``--chip`` predictions)."""
        if self.host_bytes_per_element is not None:
            return self.host_bytes_per_element
        return float(program_module(self.name).HOST_BYTES_PER_ELEMENT + finish_bytes(self._on_host(on_host))[0])

    def host_bytes_per_pair(self, on_host: Optional[bool] = None) -> float:
        """Host bytes (read + written) per element of each routed pair's output row of an
        offloaded call: the executor's finish (``dispatch.finish_bytes``: 16 where MLX runs on
        the CPU, 0 on a GPU), whatever the backend; ``on_host`` as ``host_bytes``."""
        return float(finish_bytes(self._on_host(on_host))[1])

    def _on_host(self, on_host: Optional[bool]) -> Optional[bool]:
        """The finish's side to price: the caller's, else the descriptor's (None: this process's MLX device)."""
        return self.finish_on_host if on_host is None else on_host


REGISTRY: Dict[str, BackendInfo] = {b.name: b for b in (
    BackendInfo("coreml", "ane", "coreml", ANE_LIMITS, ANE_COST, 1e-2, _coreml_runs,
                preferred_on=_apple_silicon, package="coremltools", chip_costs=True, label="ANE (Core ML)",
                weight_formats=True, builder=("coremltools", "npumoe-mlx[coreml]"), finish_on_host=False),
    BackendInfo("onnx", "cpu", "onnx", CPU_LIMITS, CPU_COST, 1e-4, _onnx_runs("CPUExecutionProvider"),
                releases_mlx_experts=True, preferred_on=lambda: True, package="onnxruntime", details=_providers,
                dense_programs=True, dynamic_rows=True, label="ONNX Runtime CPU", builder=("onnx", "onnx")),
    BackendInfo("mlx", "gpu", "mlx", CPU_LIMITS, MLX_COST, 1e-4,
                _always, bundles=False, package="mlx", details=_mlx_device, dynamic_rows=True),
    # onnx graphs through onnxruntime's CoreML execution provider (Core ML picks ANE, GPU or
    # CPU per op). No measurement of it exists here: limits and costs are the CPU's until
    # `npumoe tune --backend onnx-coreml` runs on a Mac; tolerance is Core ML's (fp16 on the ANE).
    BackendInfo("onnx-coreml", "ane", "onnx", CPU_LIMITS,
                replace(CPU_COST, source="parametric (the onnx CPU's: the CoreML EP is not measured)"), 1e-2,
                _onnx_runs("CoreMLExecutionProvider"),
                options={"providers": ["CoreMLExecutionProvider", "CPUExecutionProvider"]}, package="onnxruntime",
                details=_providers, label="ONNX Runtime CoreML", builder=("onnx", "onnx"), finish_on_host=False),
)}


DEFAULT = "onnx"  # runs anywhere: the default of --backend


def names(bundles: bool = False) -> Tuple[str, ...]:
    """Every backend's name (``bundles``: only those ``npumoe build`` makes bundles of)."""
    return tuple(n for n, b in REGISTRY.items() if b.bundles or not bundles)


def runnable() -> Tuple[str, ...]:
    """The backends whose programs run on this machine."""
    return tuple(n for n, b in REGISTRY.items() if b.available()[0])


def get(name: str) -> BackendInfo:
    if name not in REGISTRY:
        raise ValueError(f"unknown backend {name!r}; choose from {', '.join(REGISTRY)}")
    return REGISTRY[name]


def of_folder(folder: str) -> str:
    """The backend a bundle folder is named for (``npumoe-<backend>``, ``<fingerprint>-<backend>``),
    before its manifest says: the longest name it ends with, else ``DEFAULT``."""
    return max((n for n in names(bundles=True) if folder.endswith(n)), key=len, default=DEFAULT)


def releases_mlx_experts(mode: str) -> bool:
    """Whether offload mode ``mode`` (a backend, or "auto"/"off" resolved before) may release MLX's experts."""
    return mode in REGISTRY and REGISTRY[mode].releases_mlx_experts


def preferred() -> str:
    """The backend ``--offload auto`` uses on this machine."""
    return next(n for n, b in REGISTRY.items() if b.bundles and b.preferred_on())


def default_cost(name: str) -> CostModel:
    """A fresh copy of backend `name`'s parametric cost model."""
    if name not in REGISTRY:
        raise ValueError(f"no cost model for backend {name!r}")
    return REGISTRY[name].default_cost()


def program_module(name: str):
    """The module that builds and loads backend `name`'s programs."""
    return importlib.import_module(f"{__package__}.{get(name).program_format}")


def chip_cost(name: str, backend: str = "coreml", D: int = 0, H: int = 0, bits: int = 16,
              weight_format: Optional[str] = DEFAULT_FORMAT) -> CostModel:
    """Predicted costs of backend ``backend`` on Apple chip ``name`` (``cost.chip_cost_model``)."""
    info = get(backend)
    if not info.chip_costs:
        which = ", ".join(n for n, b in REGISTRY.items() if b.chip_costs)
        raise ValueError(f"--chip predicts Core ML programs on the ANE; use --backend {which}, not {backend!r}")
    return chip_cost_model(name, backend, D, H, bits, info.cost.copy_bps, info.host_bytes(on_host=False), weight_format)


def program_budget(name: str) -> Tuple[int, bool, str]:
    """(compiled programs one process may hold, whether each tier is its own program, source):
    its program module's PROGRAM_BUDGET, TIERS_ARE_PROGRAMS and PROGRAM_BUDGET_SOURCE."""
    m = program_module(name)
    return int(m.PROGRAM_BUDGET), bool(m.TIERS_ARE_PROGRAMS), str(m.PROGRAM_BUDGET_SOURCE)


def fp16_range_limit(name: str) -> Optional[float]:
    """Largest |activation| backend `name`'s programs compute without saturating (None: not fp16)."""
    return getattr(program_module(name), "FP16_RANGE_LIMIT", None)
