"""Programs checked against the model they claim to compute.

A bundle's hashes prove its files are the ones its manifest lists, not that they
compute this model's experts. So at build (every tier of every program) and at load
(a sample; every tier with ``verify``), each program runs a small seeded probe
through ``program.run(x, tier)`` and its output is compared with the model's own
experts computed by stock MLX. A mismatch refuses the bundle, naming the program.

A load hashes samples of each program file (``bundle.read``), so before a program's
first call (``Pinned.first_use``, which the executors call) every byte of its files
is checked against the manifest's whole sha256 and the program that was not probed
at load runs the probe. The onnx backend checks the very bytes its session copies
(backends/onnx.py ``read_source``: weights in memory the process owns, so a file
rewritten or truncated later changes nothing); other backends read the files once
(the page cache the backend then reads). Program files are also pinned at load:
the first time each tier runs, ``Pinned`` checks that its files are still the ones
checked at load (inode, size, mtime, ctime). Any failure makes the run fail, and the
executor keeps that layer on MLX with one warning (see executor.py) instead of
running unchecked code.
"""

import os
import random
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np

from ane_kernels.formats import TOLERANCE as FORMAT_TOLERANCE

from ..backends import registry
from ..bundle.bundle import _sha256
from ..hints import one_line
from ..runtime import experts, heap

DTYPE_TOLERANCE = {mx.float16: 1e-2, mx.bfloat16: 3e-2}  # the model's own rounding
PROBE_ROWS = 8
# Rows of the probe before a program's first call (Pinned.first_use): every weight of the program
# touches every row's output, so 2 rows see any damaged weight; the reference on stock MLX costs
# per row (CPU: ~6 ms a row for one Qwen3-dims q4 expert under load, measured), and a bundle has
# hundreds of programs.
FIRST_USE_ROWS = 2
LOAD_LAYERS, LOAD_OTHERS = 8, 2  # programs checked at a (non --verify) load, see pick()


class ProgramMismatch(ValueError):
    """A program does not compute what the model's experts compute."""


class ModelNotFinite(ValueError):
    """The model's own experts give NaN or Inf: its weights, not a program, are at fault."""


def probe(G: int, D: int, rows: int, seed: int) -> np.ndarray:
    """x: (G, rows, D) float32, seeded."""
    return np.random.default_rng(seed).standard_normal((G, rows, D)).astype(np.float32)


def model_group(module, expert_ids: Sequence[int], x: np.ndarray) -> np.ndarray:
    """y: (G, rows, D): row block g through expert ``expert_ids[g]`` of a SwitchGLU, stock MLX."""
    G, rows, D = x.shape
    dtype = module.down_proj.scales.dtype if hasattr(module.down_proj, "scales") else module.down_proj.weight.dtype
    xs = mx.array(x.reshape(G * rows, D)).astype(dtype)
    inds = mx.array(np.repeat(np.asarray(expert_ids, np.uint32), rows)[:, None])  # (G*rows, 1)
    y = experts.stock_experts(module, xs, inds)  # (G*rows, 1, D)
    return np.array(y.astype(mx.float32)).reshape(G, rows, D)


def model_dense(mlp, x: np.ndarray) -> np.ndarray:
    """y: (1, rows, D): a shared expert (dense SwiGLU MLP) on stock MLX."""
    stock = getattr(type(mlp), "stock_class", type(mlp))
    dtype = mlp.down_proj.scales.dtype if hasattr(mlp.down_proj, "scales") else mlp.down_proj.weight.dtype
    y = stock.__call__(mlp, mx.array(x[0]).astype(dtype))
    return np.array(y.astype(mx.float32))[None]


def tolerance(backend: str, module, weight_format: Optional[str] = None) -> float:
    """Largest relative error (max |got - want| / max |want|) backend ``backend``'s programs may
    show against ``module``: the backend's own (registry), the model dtype's rounding, and for a
    Core ML weight format that re-quantizes the experts (formats.py), that format's stated bound."""
    info = registry.get(backend)
    lin = module.down_proj
    dtype = lin.scales.dtype if hasattr(lin, "scales") else lin.weight.dtype
    return max(info.tolerance, DTYPE_TOLERANCE.get(dtype, 0.0),
               FORMAT_TOLERANCE.get(weight_format, 0.0) if info.weight_formats else 0.0)


def check(program, tiers: Iterable[int], want_fn, x: np.ndarray, tol: float, where: str) -> None:
    """Run ``program`` at each tier on ``x`` and compare with ``want_fn(x)``; ProgramMismatch if off."""
    want = want_fn(x)
    if not np.all(np.isfinite(want)):
        raise ModelNotFinite(
            f"the model's own experts of {where} give NaN or Inf on a seeded probe (stock MLX): the model's "
            f"weights hold NaN or Inf; re-download or re-convert the model")
    scale = max(float(np.abs(want).max()), 1e-6)
    for tier in tiers:
        rows = min(x.shape[1], tier)
        try:
            got = np.asarray(program.run(x[:, :rows], tier), np.float32)
        except Exception as e:
            why = one_line(e)
            raise ProgramMismatch(f"program {where} failed on the probe at tier {tier} ({why})") from e
        if got.shape != want[:, :rows].shape or not np.all(np.isfinite(got)):
            raise ProgramMismatch(f"program {where} gave a bad output at tier {tier} (shape {got.shape} or non-finite)")
        err = float(np.abs(got - want[:, :rows]).max()) / scale
        if err > tol:
            raise ProgramMismatch(
                f"program {where} does not compute the model's experts (tier {tier}: relative error "
                f"{err:.2g} > {tol:g} on a seeded probe)"
            )


def pick(keys: Sequence[Tuple], everything: bool, first_of_layer: Dict[int, Tuple]) -> List[Tuple]:
    """The programs to check at load: all; or the first (hottest) group of up to LOAD_LAYERS
    layers plus LOAD_OTHERS other programs, drawn afresh at every load."""
    if everything:
        return list(keys)
    rng = random.Random(os.urandom(8))
    firsts = list(first_of_layer.values())
    chosen = set(rng.sample(firsts, min(LOAD_LAYERS, len(firsts))))
    rest = [k for k in keys if k not in chosen]
    chosen.update(rng.sample(rest, min(LOAD_OTHERS, len(rest))))
    return [k for k in keys if k in chosen]


def stat_sig(path: Path) -> Tuple[int, int, int, int]:
    st = path.stat()
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def first_use(programs: Iterable) -> None:
    """``Pinned.first_use`` of each program a call is about to run (on the caller's thread:
    the probe runs MLX). A few microseconds once every program was checked."""
    opened = False
    for p in programs:
        if not p.ready:
            opened = True
            p.first_use()
    if opened:  # the files' bytes were read into (and freed from) the heap: hand the pages back
        heap.trim()


class Pinned:
    """A program whose files must stay the ones checked at load (see the module docstring).
    sha256: {file: whole sha256} from the manifest; probe: runs the numeric check (None when
    the load ran it); hint: the rebuild fix a failure names."""

    def __init__(self, program, files: Sequence[Path], sha256: Dict[Path, str] = None, probe=None, hint: str = ""):
        self.program = program
        self.name, self.G, self.D, self.tiers = program.name, program.G, program.D, program.tiers
        self.input_layout = program.input_layout  # what run_layout takes
        self._files = {Path(f): stat_sig(Path(f)) for f in files}
        self._seen = set()
        self._sha256 = {Path(f): h for f, h in (sha256 or {}).items()}
        self._probe, self._hint = probe, hint
        self.ready = not self._sha256 and probe is None

    def __getstate__(self) -> dict:
        """A copy or unpickled program keeps its files' hashes but not the probe (a closure over
        the model's experts): only a program not yet used can lack it, and its bytes are still checked."""
        return {**self.__dict__, "_probe": None}

    def first_use(self) -> None:
        """Every byte checked, then the probe, before the program's first call; raises on a
        damaged or changed file (the executor falls back to MLX with one warning)."""
        if self.ready:
            return
        try:
            if self.program.expect_files({str(f.absolute()): h for f, h in self._sha256.items()}):
                self.program.open()  # onnx: the session's open checks the bytes it copies
            else:
                for f, want in self._sha256.items():
                    if _sha256(f) != want:
                        raise ProgramMismatch(f"program file {f} is damaged or changed since the build "
                                              f"(its sha256 is not the manifest's)")
            if self._probe is not None:
                self._probe()
        except Exception as e:  # ours, or the backend's own (a file it could not read or parse)
            why = one_line(e)
            hint = str(self._hint)  # (computed only now: it may fingerprint the model)
            raise ProgramMismatch(f"{why}; {hint}" if hint else why) from None
        self.ready = True

    def run(self, x, tier=None):
        self._check(tier)
        return self.program.run(x, tier)

    def run_into(self, x, tier, out):  # dispatch.run_calls' zero-copy path: the same check first
        self._check(tier)
        return self.program.run_into(x, tier, out)

    def run_layout(self, x, tier):  # dispatch.run_calls' path for (G, D, C) programs: the same check first
        self._check(tier)
        return self.program.run_layout(x, tier)

    def _check(self, key) -> None:
        if key not in self._seen:
            for f, sig in self._files.items():
                try:
                    now = stat_sig(f)
                except OSError:
                    now = None
                if now != sig:
                    raise RuntimeError(f"program file {f} changed after the bundle was checked at load; "
                                       f"reload the model to use the new bundle")
            self._seen.add(key)

    def __getattr__(self, name):  # anything else a caller reads comes from the program
        if name.startswith("__") or name in ("program", "_files", "_seen", "_sha256", "_probe", "_hint", "ready"):
            raise AttributeError(name)  # (not set yet, e.g. while unpickling)
        return getattr(self.program, name)
