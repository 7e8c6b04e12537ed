"""Calibration's expert FFNs on numpy's BLAS when MLX runs on the CPU.

Why: MLX's Linux CPU wheel links a reference BLAS, so a full-scale Qwen3-30B-A3B layer
(128 experts, top-8, 4-bit) took 17 s for a 512-token call in ``SwitchGLU`` (gather_qmm) and
6 GFLOP/s in a float32 matmul, where numpy's OpenBLAS ran the same matmul at ~200 GFLOP/s
(``benchmarks/calibration_speed.py``). Calibration needs the routing, and the FFN output only
to carry the hidden state on to the next layer's router, so it computes that output here:
pairs sorted by expert, each expert's weights dequantized once per call and applied to its
rows. Float32 throughout, so the result is stock MLX's up to rounding (a near-tie in a later
router's top-k may flip; the tests count how many).
"""

from typing import Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np
from mlx_lm.models.switch_layers import SwitchGLU

from ane_kernels.spec import AffineWeight, activate

from ..runtime.dispatch import finish_on_host
from .programs import spec_from_switch_glu


def wanted() -> bool:
    """Calibrate on the host BLAS: MLX's default device is the CPU (its arrays are host memory)."""
    return finish_on_host()


def supported(module: SwitchGLU) -> Optional[str]:
    """None if ``experts_ffn`` can compute ``module``, else why not (it then stays on MLX)."""
    try:
        spec_from_switch_glu(module, layer=0, expert_ids=[0], tiers=(1,))
    except ValueError as e:
        return str(e)
    return None


def experts_ffn(module: SwitchGLU, x: mx.array, inds: mx.array,
                sample: Sequence[int] = ()) -> Tuple[mx.array, np.ndarray]:
    """(y, max_abs): y (..., k, D) = the stock ``SwitchGLU`` output for x (..., D) and
    inds (..., k), in x's dtype; max_abs (3,) = max |gate|, |up|, |down output| over the
    pairs of tokens ``sample`` (indices into the N tokens; profiles.RANGE_KEYS order)."""
    k, D = inds.shape[-1], x.shape[-1]
    E = module.gate_proj["weight"].shape[0]
    act = spec_from_switch_glu(module, layer=0, expert_ids=[0], tiers=(1,))  # the activation and its constants
    up_w, gate_w, down_w = (_Stack(module[n]) for n in ("up_proj", "gate_proj", "down_proj"))
    x_np = np.array(x.reshape(-1, D).astype(mx.float32))  # (N, D)
    flat = np.array(inds.reshape(-1)).astype(np.int64)  # (N * k,) expert of each pair
    in_sample = np.zeros(x_np.shape[0], bool)
    in_sample[np.asarray(sample, dtype=np.int64)] = True
    order = np.argsort(flat, kind="stable")  # pairs grouped by expert
    counts = np.bincount(flat, minlength=E)
    y = np.empty((flat.size, D), np.float32)
    max_abs = np.zeros(3)
    start = 0
    for e in np.flatnonzero(counts):
        pairs = order[start : start + counts[e]]
        start += counts[e]
        h = x_np[pairs // k]  # (n_e, D)
        up, gate = up_w.apply(h, e), gate_w.apply(h, e)
        out = down_w.apply(activate(up, gate, act.activation, act.alpha, act.limit).astype(np.float32), e)
        y[pairs] = out
        seen = in_sample[pairs // k]
        if seen.any():
            max_abs = np.maximum(max_abs, [np.abs(a[seen]).max() for a in (gate, up, out)])
    return mx.array(y).astype(x.dtype).reshape(*inds.shape, D), max_abs


class _Stack:
    """One SwitchLinear / QuantizedSwitchLinear's experts as host arrays: float32 and packed
    codes are views of MLX's memory (no copy); other dtypes convert one expert at a time."""

    def __init__(self, lin):
        self.lin, self.quantized = lin, "scales" in lin
        self.w = _host(lin["weight"]) if self.quantized or lin["weight"].dtype == mx.float32 else None
        if self.quantized:
            self.scales, self.biases = _host(lin["scales"], mx.float32), _host(lin["biases"], mx.float32)
        self.bias = _host(lin["bias"], mx.float32) if "bias" in lin else None

    def weight(self, e: int) -> np.ndarray:
        """(out, in) float32 weight of expert ``e``."""
        lin = self.lin
        if self.quantized:
            return AffineWeight(self.w[e : e + 1], self.scales[e : e + 1], self.biases[e : e + 1],
                                lin.bits, lin.group_size).dequantize()[0]
        return self.w[e] if self.w is not None else _host(lin["weight"][e], mx.float32)

    def apply(self, h: np.ndarray, e: int) -> np.ndarray:
        """h (n, in) -> (n, out) through expert ``e`` (bias included)."""
        y = h @ self.weight(e).T
        return y if self.bias is None else y + self.bias[e]


def _host(a: mx.array, dtype=None) -> np.ndarray:
    """A host view of ``a`` (evaluated), converted to ``dtype`` first when it is another."""
    if dtype is not None and a.dtype != dtype:
        a = a.astype(dtype)
    return np.asarray(a)
