"""Dense programs: a model's non-expert linear layers on onnxruntime (onnx backend only).

Why: MLX's CPU wheel on Linux links a reference BLAS, so its float32 and quantized
matmuls run at ~2-8 GFLOP/s where onnxruntime runs the same GEMM at ~100-200. With the
experts on programs, the attention projections (and the dense MLPs of non-MoE layers)
become most of a prefill. ``install`` gives each such ``nn.Linear`` / affine
``nn.QuantizedLinear`` a one-linear onnxruntime session with a symbolic row count,
built with the expert programs' own linear (``ane_kernels.onnx.build_linear_onnx``:
MatMulNBits without zero points plus the exact per-group correction, codes kept packed).

Decided by measured cost, not by flag alone: for each distinct shape (in, out, format)
``install`` times stock MLX and the program at 1 row and at ``ROWS[-1]`` rows, fits
``t(n) = a + b n`` to each, and swaps the module only if the program wins at the larger
count; calls below the crossover stay on MLX, and 1-row calls (decode) unless the program
takes less than half MLX's time (its host sync stalls mlx_lm's pipelined decode loop). The
timings are saved beside the bundle (``dense-costs.json``, written atomically) and reused
by the next load on the same host; ``costs=`` injects them (tests, a tuned file).

Not swapped: routers (linears directly in an MoE block: their top-k must match MLX's
bit for bit as often as possible, and they are small), linears inside an offloaded
block (a shared expert's programs cover them), LoRA-wrapped layers and non-affine
quantization. An untied ``lm_head`` (``find_heads``, timed at 1 row only) runs its program
only for calls of at most ``HEAD_ROWS`` rows (decode), and only if it wins there by the
decode margin: mlx_lm's prefill never evaluates the logits of its chunks, so MLX's
laziness skips that matmul and a program would compute it for nothing.
The swap is a class swap of the instance (``experts.install_dense``): same children,
same parameters and keys; ``npumoe_mlx.remove`` swaps the class back. Gradients take
stock MLX's backward, ``mx.compile``/``vmap`` run stock MLX, and a failing program
sends its layer back to MLX for the rest of the run (the expert executors' guards).
"""

import math
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.switch_layers import SwitchGLU, SwitchMLP

from ane_kernels.onnx import INPUT_NAME, OUTPUT_NAME, build_linear_onnx

from ..atomic import write_json
from ..backends import registry
from ..build.programs import _dense_weight
from ..log import get as _get_log
from . import experts, guard
from .dispatch import checked
from .executor import _guarded, _warn

_log = _get_log(__name__)

COSTS_FILE = "dense-costs.json"
FORMAT = "npumoe-dense-costs/1"
ROWS = (1, 128)  # row counts timed per shape: decode, and a prefill-sized call
DECODE_MARGIN = 0.5  # 1-row calls run the program only if it takes < this x MLX's time
SKIP_NAMES = ("lm_head",)
HEAD_ROWS = 64  # lm_head: calls of at most this many rows (decode); a prefill chunk's logits are never evaluated
HEAD_MAX_BYTES = 512 << 20  # float heads larger than this stay on MLX (the graph is built in memory)


class DenseError(ValueError):
    pass


def shape_key(lin: nn.Module) -> str:
    """``"<in>x<out>/<format>"``: format f32 (any float) or q<bits>g<group>; ``+b`` with a bias."""
    if "scales" in lin:
        out, inp = lin["scales"].shape[0], lin["scales"].shape[-1] * lin.group_size
        fmt = f"q{lin.bits}g{lin.group_size}"
    else:
        out, inp = lin["weight"].shape
        fmt = "f32"
    return f"{inp}x{out}/{fmt}" + ("+b" if "bias" in lin else "")


def _supported(lin: nn.Module) -> bool:
    if type(lin) is nn.Linear:
        return lin["weight"].ndim == 2
    if type(lin) is nn.QuantizedLinear:
        return getattr(lin, "mode", "affine") == "affine" and lin.get("biases") is not None and lin.bits in (2, 4, 8)
    return False


def find_linears(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """(path, module) of every linear a dense program may serve: plain ``nn.Linear`` and
    affine ``nn.QuantizedLinear`` outside expert blocks, routers, offloaded blocks and lm_head."""
    skip = set()
    for path, m in model.named_modules():
        pre = f"{path}." if path else ""
        if getattr(m, "executor", None) is not None:  # an offloaded block: everything under it
            skip.update(pre + p for p, _ in m.named_modules() if p)
        kids = m.children()
        if any(isinstance(c, (SwitchGLU, SwitchMLP)) for c in kids.values()):  # an MoE block
            skip.update(pre + k for k, c in kids.items() if isinstance(c, (nn.Linear, nn.QuantizedLinear)))  # routers
    out, seen = [], set()
    for path, m in model.named_modules():
        if _supported(m) and path not in skip and path.rsplit(".", 1)[-1] not in SKIP_NAMES and id(m) not in seen:
            seen.add(id(m))  # a module reachable by two paths is swapped once
            out.append((path, m))
    return out


def find_heads(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """(path, module) of an untied ``lm_head`` a dense program may serve at decode."""
    out = []
    for path, m in model.named_modules():
        if path.rsplit(".", 1)[-1] == "lm_head" and _supported(m):
            if "scales" in m or m["weight"].nbytes <= HEAD_MAX_BYTES:
                out.append((path, m))
    return out[:1]


class LinearProgram:
    """One linear's onnxruntime session: x (1, n, in) float32 -> y (1, n, out), any n."""

    concurrent = True

    def __init__(self, lin: nn.Module, open_session: Callable, name: str = "linear"):
        w, bias = _dense_weight(lin)
        _, self.out, self.inp = w.shape
        self.nbytes = int(w.nbytes + (0 if bias is None else bias.nbytes))  # what onnxruntime holds (before prepacking)
        self.session = open_session(build_linear_onnx(w, bias, name).SerializeToString())

    def __call__(self, x: np.ndarray) -> np.ndarray:
        import onnxruntime as ort

        y = np.empty((1, x.shape[1], self.out), np.float32)
        io = self.session.io_binding()  # a fresh binding per call: thread-safe, holds nothing after
        io.bind_cpu_input(INPUT_NAME, np.ascontiguousarray(x, dtype=np.float32))
        io.bind_ortvalue_output(OUTPUT_NAME, ort.OrtValue.ortvalue_from_numpy(y))
        self.session.run_with_iobinding(io)
        return y


@dataclass
class DenseStats:
    path: str
    calls: int = 0
    offloaded: int = 0
    rows: int = 0
    program_s: float = 0.0
    fallback: Optional[str] = None


class DenseExecutor:
    """``executor(lin, x (..., in)) -> (..., out)``: calls of >= ``min_rows`` rows run the
    program (one host sync), the rest stock MLX. A program fault disables it (``_guarded``)."""

    bakes_weights = True

    def __init__(self, path: str, program: LinearProgram, min_rows: int, warn: Callable[[str], None] = None,
                 max_rows: Optional[int] = None):
        self.program, self.min_rows, self.max_rows, self.warn = program, int(min_rows), max_rows, warn or _warn
        self.stats = DenseStats(path)
        self.disabled = False

    def __call__(self, lin: nn.Module, x: mx.array) -> mx.array:
        st = self.stats
        st.calls += 1
        K = x.shape[-1]
        n = x.size // K
        if self.disabled or n < self.min_rows or (self.max_rows is not None and n > self.max_rows):
            return experts.stock_dense(lin, x)
        x32 = x.reshape(1, n, K).astype(mx.float32)
        mx.eval(x32)  # the host sync (raises MLX's refusal inside compile/vmap: the guard runs MLX)
        t0 = time.perf_counter()
        out = self.program.out
        y = _guarded(self, f"dense program {st.path}", "it",
                     lambda: checked(self.program(np.asarray(x32)), (1, n, out)))
        if y is None:
            return experts.stock_dense(lin, x)
        st.program_s += time.perf_counter() - t0
        st.offloaded += 1
        st.rows += n
        return mx.array(y, dtype=x.dtype).reshape(*x.shape[:-1], out)


# ---- costs ---------------------------------------------------------------------------------

def crossover(rows: Sequence[int], mlx_s: Sequence[float], program_s: Sequence[float]) -> Optional[int]:
    """The smallest row count from which the program runs, or None (it must win at the
    largest measured count). Linear in n between the first and last measured counts. A
    1-row call (decode) needs the program within ``DECODE_MARGIN`` of MLX's time: its host
    sync also stalls mlx_lm's pipelined decode loop, which a call's own time does not show."""
    n0, n1 = rows[0], rows[-1]
    d0, d1 = program_s[0] - mlx_s[0], program_s[-1] - mlx_s[-1]
    if d1 >= 0:
        return None
    if d0 <= 0:
        return 2 if n0 == 1 and program_s[0] > DECODE_MARGIN * mlx_s[0] else n0
    return max(2, int(math.ceil(n0 + (n1 - n0) * d0 / (d0 - d1))))


def _time(fn: Callable[[], object], budget_s: float = 0.3, most: int = 5) -> float:
    """Median seconds of ``fn()``: a call slower than ``budget_s`` is timed once (MLX's CPU
    matmuls have no first-call compile), faster ones up to ``most`` times after a warm-up."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    if first > budget_s:
        return first
    times = []
    while len(times) < most and sum(times) <= budget_s:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def measure(lin: nn.Module, program: LinearProgram, rows: Sequence[int] = ROWS, seed: int = 0) -> dict:
    """Seconds per call of a linear still on MLX: stock MLX and the program (host sync and
    copies included), at each row count."""
    dtype = lin["scales"].dtype if "scales" in lin else lin["weight"].dtype
    ex = DenseExecutor("measure", program, min_rows=1)
    mlx_s, prog_s = [], []
    for n in rows:
        x = mx.random.normal((1, n, program.inp), key=mx.random.key(seed)).astype(dtype)
        mx.eval(x)
        mlx_s.append(_time(lambda: mx.eval(lin(x))))
        prog_s.append(_time(lambda: mx.eval(ex(lin, x))))
    return {"rows": list(rows), "mlx_s": mlx_s, "program_s": prog_s}


@dataclass
class DenseCosts:
    """Measured seconds per shape key: ``{key: {"rows", "mlx_s", "program_s"}}``."""

    shapes: Dict[str, dict] = field(default_factory=dict)
    host: str = field(default_factory=platform.node)

    def min_rows(self, key: str) -> Optional[int]:
        """The row count from which ``key`` runs its program, or None (MLX). An ``@head``
        key (lm_head, decode only) runs it only if it wins at 1 row by the decode margin."""
        c = self.shapes[key]
        m = crossover(c["rows"], c["mlx_s"], c["program_s"])
        return (m if m == 1 else None) if key.endswith("@head") else m

    def to_dict(self) -> dict:
        return {"format": FORMAT, "host": self.host, "shapes": self.shapes}

    @classmethod
    def load(cls, path) -> Optional["DenseCosts"]:
        """The saved costs, or None if missing, unreadable or measured on another host."""
        import json

        try:
            d = json.loads(Path(path).read_text())
            if d.get("format") != FORMAT or d.get("host") != platform.node():
                return None
            return cls({k: dict(v) for k, v in d["shapes"].items()}, d["host"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None


# ---- install ---------------------------------------------------------------------------------

def install(
    model: nn.Module,
    backend_options: Optional[dict] = None,
    costs: Optional[DenseCosts] = None,
    bundle: Optional[str] = None,
    rows: Sequence[int] = ROWS,
    quiet: bool = False,
    heads: bool = True,
) -> Dict[str, Optional[int]]:
    """Put dense programs on ``model``'s linears where they are faster (see the module doc).

    costs: measured costs to decide with (shapes missing from it are measured here);
    bundle: a folder to read and save ``dense-costs.json`` in (the offload bundle);
    heads: also an untied lm_head, for decode (calibration, which never decodes, says False).
    Returns {shape key: min_rows or None (stays on MLX)}.
    """
    from ..backends.onnx import Backend

    be = Backend(**(backend_options or {}))
    if not be.dynamic:
        raise DenseError("dense programs need an onnxruntime provider that takes dynamic shapes "
                         f"(CPU, CUDA); got {', '.join(map(str, be.providers))}")
    path = Path(bundle) / COSTS_FILE if bundle else None
    if costs is None:
        costs = (DenseCosts.load(path) if path is not None else None) or DenseCosts()
    linears, heads = find_linears(model), (find_heads(model) if heads else [])
    by_key: Dict[str, List[Tuple[str, nn.Module]]] = {}
    for p, lin in linears:
        by_key.setdefault(shape_key(lin), []).append((p, lin))
    fresh = False
    decisions: Dict[str, Optional[int]] = {}
    notice = guard.Notice("npumoe generate ... --dense-programs (reload the model)")
    t0 = time.perf_counter()
    for key, mods in by_key.items():
        first = None
        if key not in costs.shapes:
            first = LinearProgram(mods[0][1], be._session, name=mods[0][0])
            costs.shapes[key] = measure(mods[0][1], first, rows)
            fresh = True
        decisions[key] = m = costs.min_rows(key)
        if m is None:
            continue
        for i, (p, lin) in enumerate(mods):
            prog = first if i == 0 and first is not None else LinearProgram(lin, be._session, name=p)
            experts.install_dense(lin, DenseExecutor(p, prog, m), f"dense program {p}", notice)
    for p, lin in heads:  # decode only: 1-row costs, and it must win by the decode margin
        key, prog = shape_key(lin) + "@head", None
        if key not in costs.shapes:
            prog = LinearProgram(lin, be._session, name=p)
            costs.shapes[key] = measure(lin, prog, rows[:1])
            fresh = True
        decisions[key] = m = costs.min_rows(key)
        if m is not None:
            prog = prog or LinearProgram(lin, be._session, name=p)
            experts.install_dense(lin, DenseExecutor(p, prog, m, max_rows=HEAD_ROWS), f"dense program {p}", notice)
            by_key[key] = [(p, lin)]
    if fresh and path is not None and path.parent.is_dir():
        try:
            write_json(path, costs.to_dict())
        except OSError as e:  # a read-only bundle: measured again next load
            _say(f"could not save dense costs to {path} ({e.strerror or e})", quiet)
    n_on = sum(len(by_key[k]) for k, m in decisions.items() if m is not None)
    _say(f"dense programs: {n_on} of {len(linears) + len(heads)} linears on onnxruntime ("
         + ", ".join(f"{k}: " + ("MLX" if m is None else f"<= {HEAD_ROWS} rows" if k.endswith("@head") else f">= {m} rows")
                     for k, m in decisions.items())
         + f"; {time.perf_counter() - t0:.1f} s)", quiet)
    return decisions


def check_mode(offload: str) -> None:
    """Dense programs run on onnxruntime: refuse any other resolved offload mode up front."""
    from .offload import resolve

    want = resolve(offload)
    info = registry.REGISTRY.get(want)
    if info is None or not info.dense_programs:
        ok = ", ".join(n for n, b in registry.REGISTRY.items() if b.dense_programs)
        here = f" ({want} here)" if want != offload else ""
        serves = f" ({info.label} bundles serve experts only)" if info is not None and info.label else ""
        raise DenseError(f"--dense-programs runs on the {ok} backend only, not with --offload {offload}{here}{serves}: "
                         f"use --offload {ok}" + (" (or auto)" if registry.get(registry.preferred()).dense_programs else ""))


def installed(model: nn.Module) -> List[DenseExecutor]:
    return [m.executor for _, m in model.named_modules() if isinstance(getattr(m, "executor", None), DenseExecutor)]


def summary(model: nn.Module) -> dict:
    """Calls, calls on programs, rows and program seconds over every dense program."""
    ex = installed(model)
    return {
        "linears": len(ex),
        "calls": sum(e.stats.calls for e in ex),
        "offloaded_calls": sum(e.stats.offloaded for e in ex),
        "rows": sum(e.stats.rows for e in ex),
        "program_s": sum(e.stats.program_s for e in ex),
        "weight_bytes": sum(e.program.nbytes for e in ex),
        "fallbacks": {e.stats.path: e.stats.fallback for e in ex if e.stats.fallback},
    }


def format_summary(s: dict) -> str:
    line = (f"dense programs: {s['linears']} linears, {s['offloaded_calls']} of {s['calls']} calls on onnxruntime "
            f"({s['rows']} rows, {s['program_s']:.2f} s)")
    return line + "".join(f"\n  {p}: fell back to MLX ({why})" for p, why in s["fallbacks"].items())


def _say(msg: str, quiet: bool) -> None:
    if not quiet:
        _log.info(msg)
