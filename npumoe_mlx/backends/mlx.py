"""The mlx backend: a ProgramSpec's weights run with MLX (reference and fallback).

Float weights use a batched matmul over the G experts; MLX affine weights stay
quantized (`mx.quantized_matmul` with per-expert weights), exactly as SwitchGLU's
gather_qmm would compute them. MLX's CPU gather/batched float matmul is float32 only,
so float weights default to float32.
"""

from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.activations import swiglu, swiglu_oai

from ane_kernels.spec import AffineWeight, ProgramSpec

from . import Program


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


class MLXProgram(Program):
    def __init__(self, spec: ProgramSpec, dtype=mx.float32):
        self.spec, self.name = spec, spec.name
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
        y = self.run_mx(mx.array(x))
        return np.array(y.astype(mx.float32))


class Backend:
    name = "mlx"

    def __init__(self, dtype: Optional[str] = "float32"):
        self.dtype = getattr(mx, dtype) if isinstance(dtype, str) else dtype

    def load(self, spec: ProgramSpec) -> MLXProgram:
        if not isinstance(spec, ProgramSpec):
            raise TypeError(f"the mlx backend runs a ProgramSpec, got {type(spec).__name__}")
        return MLXProgram(spec, self.dtype)
