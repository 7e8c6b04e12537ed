"""Run compiled expert programs: one small interface, three backends.

    backend = load_backend("onnx", providers=["CPUExecutionProvider"], threads=2)
    program = backend.load(path_or_spec)
    y = program.run(x, tier)  # x: (G, C, D) float32 -> y: (G, C, D) float32

- ``coreml``: a multifunction .mlpackage on the Neural Engine (macOS only).
- ``onnx``: the per-tier .onnx graphs under onnxruntime (any execution provider).
- ``mlx``: the ProgramSpec's weights with MLX (reference and fallback).

``run`` takes C <= tier rows: short inputs are zero-padded to the tier and the
output cropped back to C rows; ``tier=None`` picks the smallest tier >= C.
"""

import importlib
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np

from ..tiers import tier_for

BACKENDS = ("coreml", "onnx", "mlx")


class BackendError(RuntimeError):
    """A backend cannot run here, or a program does not fit the backend."""


def load_backend(name: str, **opts):
    """The backend called `name` ("coreml", "onnx" or "mlx"), built with `opts`."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
    module = importlib.import_module(f"{__name__}.{name}")
    return module.Backend(**opts)


def pick_tier(tiers: Sequence[int], rows: int) -> int:
    """Smallest tier >= rows, or the top tier (the tier rule of ``tiers.py``; ``run`` refuses rows past it)."""
    return tier_for(rows, sorted(tiers))


class Program:
    """A loaded program: G experts, hidden size D, a set of tiers.

    Subclasses implement `_run(x (G, tier, D) float32, tier) -> (G, tier, D)`.
    """

    name: str = ""
    G: int = 0
    D: int = 0
    tiers: Tuple[int, ...] = ()
    # Attributes holding runtime handles (sessions, compiled models), each with the
    # factory of its empty value: a copy or unpickled program drops them and reopens
    # them lazily from what it keeps (paths, model bytes).
    transient: Dict[str, Callable[[], object]] = {}

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
        if C < tier:
            xp = np.zeros((self.G, tier, self.D), np.float32)
            xp[:, :C] = x
            return self._run(xp, tier)[:, :C]
        return self._run(np.ascontiguousarray(x, dtype=np.float32), tier)

    def _run(self, x: np.ndarray, tier: int) -> np.ndarray:
        raise NotImplementedError
