"""Compiled expert programs: one small interface, three backends.

Every backend module has a ``Backend`` class with the same steps:

    entry = Backend.build(spec, out_dir)          # write the program's files (anywhere)
    program = load_backend(name, **opts).load(entry, out_dir)
    y = program.run(x, tier)  # x: (G, C, D) float32 -> y: (G, C, D) float32

``build`` is a static method: Core ML programs are built off macOS too. The entry it
returns is plain JSON that callers store as is (a bundle's manifest): the program's
metadata (``ProgramSpec.describe()``: name, layer, expert ids, G, D, H, tiers, ...),
``files`` (what it wrote, names inside ``out_dir``) and what the backend needs to open
them. ``load`` opens an entry, checking that the files are the program it names; it
also takes a ProgramSpec (built in memory) or loose files (see each backend).
``Backend.checker(entry, out_dir)`` is a program that runs a fresh build on this
machine, with the tiers a build checks.

- ``coreml``: a multifunction .mlpackage on the Neural Engine (runs on macOS only).
- ``onnx``: the per-tier .onnx graphs under onnxruntime (any execution provider).
- ``mlx``: the spec's weights in a .safetensors file, run with MLX (reference and fallback).

Those are program formats; a backend (``registry.py``) is a format on a unit, with its
limits, costs and tolerance: ``onnx-coreml`` runs onnx programs through onnxruntime's
CoreML execution provider.

``run`` takes C <= tier rows: short inputs are zero-padded to the tier and the
output cropped back to C rows; ``tier=None`` picks the smallest tier >= C.
"""

import os
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np

from ..planning.tiers import tier_for
from . import registry

BACKENDS = registry.names()


class BackendError(RuntimeError):
    """A backend cannot run here, or a program does not fit the backend."""


def backend_class(name: str) -> type:
    """The ``Backend`` class of backend `name`'s program format: its static ``build``
    and ``checker`` work anywhere; an instance (``load_backend``) loads and runs."""
    return registry.program_module(name).Backend


def load_backend(name: str, **opts):
    """The backend called `name` (``registry.names()``), built with its descriptor's options and `opts`."""
    return backend_class(name)(**{**registry.get(name).options, **opts})


def member(folder, name: str) -> Path:
    """``folder/name`` for a file an entry names: a plain name (no folder part) that is no link."""
    if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name or os.sep in name:
        raise BackendError(f"program file name {name!r} is not a plain name inside {folder}")
    path = Path(folder) / name
    if path.is_symlink():
        raise BackendError(f"program file {path} is a link; refused")
    return path


IDENTITY = ("name", "layer", "expert_ids", "G", "D", "H", "tiers", "activation", "weight_format")


def same_program(meta: dict, found: dict, where) -> None:
    """Raise unless the metadata a program's files carry (`found`) is the entry's program (`meta`)."""
    diff = [k for k in IDENTITY if found.get(k) != meta.get(k)]
    if diff:
        k = next((k for k in diff if k != "name"), None)
        got, want = ("", "") if k is None else (f" ({k} {found.get(k)})", f" ({k} {meta.get(k)})")
        raise BackendError(f"{where} holds program {found.get('name')}{got}, the entry names {meta.get('name')}{want}")


def pick_tier(tiers: Sequence[int], rows: int) -> int:
    """Smallest tier >= rows, or the top tier (the tier rule of ``tiers.py``; ``run`` refuses rows past it)."""
    return tier_for(rows, sorted(tiers))


class Program:
    """A loaded program: G experts, hidden size D, a set of tiers.

    Subclasses implement `_run(x, tier)` on float32 arrays in `input_layout`:
    (G, tier, D) -> (G, tier, D), or (G, D, tier) -> (G, D, tier) for "GDC".
    """

    name: str = ""
    # The layout `_run` takes and returns: "GCD" x (G, C, D), or "GDC" x (G, D, C), channels
    # first (Core ML: the graph then needs no transposes). `run` takes (G, C, D) either way
    # (it transposes on the host for GDC programs); `run_layout` takes the declared layout.
    input_layout: str = "GCD"
    meta: dict = {}  # what it computes: ProgramSpec.describe() (layer, expert_ids, G, D, H, tiers, ...)
    G: int = 0
    D: int = 0
    tiers: Tuple[int, ...] = ()
    # Attributes holding runtime handles (sessions, compiled models), each with the
    # factory of its empty value: a copy or unpickled program drops them and reopens
    # them lazily from what it keeps (paths, model bytes).
    transient: Dict[str, Callable[[], object]] = {}
    # Capabilities, read by the executor, dispatch and tune (a program class overrides them):
    concurrent: bool = False  # run_into(x, tier, out) may be called from several threads at once
    dynamic: bool = False  # one session serves any row count: add_tiers costs no new weights
    ready: bool = True  # nothing left to check before its first call (verify.Pinned: False until first_use)

    def expect_files(self, sha256: Dict[str, str]) -> bool:
        """Check files ({absolute path: whole sha256}) on the very bytes the program reads as it
        opens them: True if it does (onnx sessions copy the bytes they check); False (the default)
        if it maps or reads them elsewhere, so the caller hashes the files itself."""
        return False

    def open(self) -> None:
        """Open what a first call needs now (a session), so file checks run before it; default: nothing."""

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in self.transient}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        for k, empty in self.transient.items():
            setattr(self, k, empty())

    def run(self, x: np.ndarray, tier: Optional[int] = None) -> np.ndarray:
        """y: (G, C, D) float32 for x: (G, C, D), each row through its expert's FFN."""
        x = np.asarray(x)
        if x.ndim != 3 or x.shape[0] != self.G or x.shape[2] != self.D:
            raise ValueError(f"x is {x.shape}, program {self.name} wants ({self.G}, C, {self.D})")
        C = x.shape[1]
        tier = pick_tier(self.tiers, C) if tier is None else int(tier)
        if tier not in self.tiers:
            raise ValueError(f"tier {tier} not in program {self.name} tiers {self.tiers}")
        if C > tier:
            raise ValueError(f"{C} rows exceed tier {tier}")
        if self.input_layout == "GDC":  # generic callers: one host transpose each way
            xt = np.zeros((self.G, self.D, tier), np.float32)
            xt[:, :, :C] = x.transpose(0, 2, 1)
            return np.ascontiguousarray(self._run(xt, tier)[:, :, :C].transpose(0, 2, 1))
        if C < tier:
            xp = np.zeros((self.G, tier, self.D), np.float32)
            xp[:, :C] = x
            return self._run(xp, tier)[:, :C]
        return self._run(np.ascontiguousarray(x, dtype=np.float32), tier)

    def run_layout(self, x: np.ndarray, tier: int) -> np.ndarray:
        """x: exactly ``tier`` rows in the program's own layout, float32 C-contiguous ((G, tier, D)
        for "GCD", (G, D, tier) for "GDC") -> y in the same layout. The executor's path
        (dispatch.run_calls): no padding, no transpose, no copy here."""
        want = self.native_shape(tier)
        if x.shape != want or x.dtype != np.float32 or not x.flags.c_contiguous:
            raise ValueError(f"x is {x.shape} {x.dtype}, program {self.name} ({self.input_layout}) wants {want} "
                             f"at tier {tier}, float32 C-contiguous")
        if tier not in self.tiers:
            raise ValueError(f"tier {tier} not in program {self.name} tiers {self.tiers}")
        return self._run(x, tier)

    def native_shape(self, tier: int) -> Tuple[int, int, int]:
        """The shape `run_layout` takes and returns at `tier`."""
        return (self.G, self.D, tier) if self.input_layout == "GDC" else (self.G, tier, self.D)

    def _run(self, x: np.ndarray, tier: int) -> np.ndarray:
        raise NotImplementedError

    def add_tiers(self, tiers: Sequence[int]) -> None:
        """Serve more row counts where that is free (``dynamic`` programs); others keep their tiers."""
