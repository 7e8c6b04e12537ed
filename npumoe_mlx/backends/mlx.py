"""The mlx backend: a ProgramSpec's weights run with MLX (reference and fallback).

Float weights use a batched matmul over the G experts; MLX affine weights stay
quantized (`mx.quantized_matmul` with per-expert weights), exactly as SwitchGLU's
gather_qmm would compute them. MLX's CPU gather/batched float matmul is float32 only,
so float weights default to float32.

``build`` writes the spec's weights to one ``<name>.safetensors`` (MLX's own format;
the entry rides in its metadata too), which ``load`` reads back into a ProgramSpec.
"""

import json
import os
import tempfile
from pathlib import Path
from typing import List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.activations import swiglu, swiglu_oai

from ane_kernels.spec import AffineWeight, ProgramSpec

from ..runtime.dispatch import moved
from . import BackendError, Program, member, same_program

LINEARS = ("gate", "up", "down")
METADATA_KEY = "npumoe.program"


def _arrays(spec: ProgramSpec) -> Tuple[dict, dict]:
    """The spec's weights as named arrays, and {linear: {bits, group_size}} of the quantized ones."""
    arrays, quant = {}, {}
    for k in LINEARS:
        w, b = getattr(spec, k), getattr(spec, f"{k}_bias")
        if isinstance(w, AffineWeight):
            arrays.update({f"{k}.weight": w.packed, f"{k}.scales": w.scales, f"{k}.biases": w.biases})
            quant[k] = {"bits": w.bits, "group_size": w.group_size}
        else:
            arrays[f"{k}.weight"] = np.asarray(w)
        if b is not None:
            arrays[f"{k}.bias"] = np.asarray(b)
    return arrays, quant


def _spec(meta: dict, arrays: dict) -> ProgramSpec:
    """The ProgramSpec an entry's metadata and its weights describe."""
    a = {k: np.array(v) for k, v in arrays.items()}
    weights = {}
    for k in LINEARS:
        q = meta["quant"].get(k)
        weights[k] = a[f"{k}.weight"] if q is None else AffineWeight(
            a[f"{k}.weight"], a[f"{k}.scales"], a[f"{k}.biases"], int(q["bits"]), int(q["group_size"]))
        weights[f"{k}_bias"] = a.get(f"{k}.bias")
    return ProgramSpec(layer=int(meta["layer"]), expert_ids=tuple(meta["expert_ids"]), tiers=tuple(meta["tiers"]),
                       D=int(meta["D"]), H=int(meta["H"]), activation=meta["activation"],
                       alpha=float(meta["alpha"]), limit=float(meta["limit"]), **weights)


class _Linear:
    """One stacked linear, w: (G, out, in) float or MLX affine, bias: (G, out)."""

    def __init__(self, w, bias, dtype):
        if isinstance(w, AffineWeight):
            self.q = mx.array(w.packed)
            self.scales = mx.array(w.scales)
            self.biases = mx.array(w.biases)
            self.bits, self.group_size = w.bits, w.group_size
            self.wt = None
        else:
            self.wt = mx.array(np.asarray(w)).astype(dtype).swapaxes(-1, -2)  # (G, in, out)
        self.bias = None if bias is None else mx.array(np.asarray(bias))[:, None, :].astype(dtype)

    def __call__(self, x):  # x: (G, C, in) -> (G, C, out)
        if self.wt is not None:
            y = mx.matmul(x, self.wt)
        else:
            y = mx.quantized_matmul(
                x, self.q, self.scales, self.biases,
                transpose=True, group_size=self.group_size, bits=self.bits,
            )
        return y if self.bias is None else y + self.bias


PROGRAM_BUDGET = 4096  # MLX arrays: no per-process program limit (the planner's cap)
PROGRAM_BUDGET_SOURCE = "no per-process limit (MLX arrays; the planner's cap)"
TIERS_ARE_PROGRAMS = False

# Host bytes per element of a program row on this program's path (tests/test_copies.py):
# dispatch.gather 8, this program's copy into MLX 8 and back 8, its rows into the call's
# buffer 8, dispatch.checked 4. The executor's finish comes on top (``registry.host_bytes``:
# 8 per row element with MLX on a GPU, 44 in all; on the CPU 16 per pair element instead).
HOST_BYTES_PER_ELEMENT = 36


class MLXProgram(Program):
    def __init__(self, spec: ProgramSpec, dtype=mx.float32):
        self.spec, self.name, self.meta = spec, spec.name, spec.describe()
        self.G, self.D, self.tiers = spec.G, spec.D, spec.tiers
        self.dtype = dtype
        self.gate = _Linear(spec.gate, spec.gate_bias, dtype)
        self.up = _Linear(spec.up, spec.up_bias, dtype)
        self.down = _Linear(spec.down, spec.down_bias, dtype)

    def __getstate__(self) -> dict:  # mx.Dtype does not pickle: keep its name
        return {**super().__getstate__(), "dtype": str(self.dtype).split(".")[-1]}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__({**state, "dtype": getattr(mx, state["dtype"])})

    def _act(self, up, gate):
        a = self.spec.activation
        if a == "swiglu":
            return swiglu(gate, up)
        if a == "swiglu_oai":
            return swiglu_oai(gate, up, alpha=self.spec.alpha, limit=self.spec.limit)
        if a == "geglu":
            return nn.gelu_approx(gate) * up
        if a == "geglu_exact":
            return nn.gelu(gate) * up
        raise ValueError(f"unknown activation {a!r}")

    def run_mx(self, x: mx.array) -> mx.array:
        """y: (G, C, D) for x: (G, C, D) as MLX arrays, lazily (no host sync); any C."""
        x = x.astype(self.dtype)
        return self.down(self._act(self.up(x), self.gate(x)))

    def _run(self, x: np.ndarray, tier: int) -> np.ndarray:
        y = np.array(self.run_mx(mx.array(x)).astype(mx.float32))
        moved(2 * x.nbytes + 2 * y.nbytes)  # numpy -> MLX in, MLX -> numpy out
        return y


class Backend:
    name = "mlx"

    def __init__(self, dtype: Optional[str] = "float32"):
        self.dtype = getattr(mx, dtype) if isinstance(dtype, str) else dtype

    @staticmethod
    def build(spec: ProgramSpec, out_dir, *, limits=None, layout=None, log=None) -> dict:
        """Write `spec`'s weights to `out_dir/<name>.safetensors`; returns the entry.
        limits, layout: the Neural Engine's (Core ML); MLX has neither."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        arrays, quant = _arrays(spec)
        name = f"{spec.name}.safetensors"
        entry = {**spec.describe(), "weights": name, "quant": quant, "files": [name]}
        fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".tmp-", suffix=".safetensors")
        os.close(fd)
        try:
            mx.save_safetensors(tmp, {k: mx.array(v) for k, v in arrays.items()},
                                metadata={METADATA_KEY: json.dumps(entry)})
            os.replace(tmp, out_dir / name)
        except BaseException:
            os.unlink(tmp)
            raise
        if log is not None:
            log(f"wrote {out_dir / name} ({(out_dir / name).stat().st_size / 1e6:.2f} MB)")
        return entry

    @classmethod
    def checker(cls, entry: dict, folder) -> Tuple[MLXProgram, List[int]]:
        """A fresh build run with MLX, and every tier to check."""
        prog = cls().load(entry, folder)
        return prog, list(prog.tiers)

    def load(self, src, folder=None) -> MLXProgram:
        """src: a ProgramSpec; an entry ``build`` returned, with the `folder` it wrote to;
        or a loose .safetensors file ``build`` wrote."""
        if isinstance(src, ProgramSpec):
            return MLXProgram(src, self.dtype)
        if folder is None and not isinstance(src, (str, os.PathLike)):
            raise TypeError(f"the mlx backend runs a ProgramSpec or its files, got {type(src).__name__}")
        path = Path(src) if folder is None else member(folder, src["weights"])
        try:
            arrays, metadata = mx.load(str(path), return_metadata=True)
            found = json.loads(metadata[METADATA_KEY])
        except (OSError, RuntimeError, ValueError, KeyError) as e:
            raise BackendError(f"{path} is not an npumoe program's weights ({e})") from e
        meta = found if folder is None else src
        same_program(meta, found, path.name)
        return MLXProgram(_spec(meta, arrays), self.dtype)
