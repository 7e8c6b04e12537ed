"""What one expert program computes: ProgramSpec plus a numpy reference.

A program serves one group of G experts of one MoE layer at one or more token
capacities (tiers). Input X (G, C, D), output Y (G, C, D): row (g, c) is expert g's
gated FFN applied to X[g, c], no routing weights. This is mlx_lm's `SwitchGLU` for
those experts: `down(act(up(x), gate(x)))`.

Pure numpy: this module never imports mlx or npumoe_mlx.
"""

import hashlib
import math
from dataclasses import dataclass, field
from typing import Optional, Tuple, Union

import numpy as np

# swiglu:      silu(gate) * up                                (mlx_lm SwiGLU)
# swiglu_oai:  (clip(up) + 1) * g * sigmoid(alpha g), g = min(gate, limit)  (SwigluOAI)
# geglu:       gelu_approx(gate) * up, tanh approximation    (mlx_lm gemma4 GeGLU)
# geglu_exact: gelu(gate) * up with the exact erf
ACTIVATIONS = ("swiglu", "swiglu_oai", "geglu", "geglu_exact")
SUPPORTED_BITS = (2, 4, 8)

# Every program's I/O names, on every format (Core ML functions, ONNX graphs)
INPUT_NAME = "x"
OUTPUT_NAME = "y"


def function_name(tier: int) -> str:
    """The name of a program's function (Core ML) for one tier."""
    return f"c{tier}"


@dataclass
class AffineWeight:
    """MLX affine-quantized weights of G experts, as `mx.quantize` stores them.

    Per group of `group_size` inputs: w = q * scale + bias. `q` is packed into
    little-endian uint32 words, lowest bits first (32 // bits values per word).
    """

    packed: np.ndarray  # (G, out, in * bits // 32) uint32
    scales: np.ndarray  # (G, out, in // group_size) float
    biases: np.ndarray  # (G, out, in // group_size) float
    bits: int
    group_size: int

    def __post_init__(self):
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(
                f"affine bits={self.bits} not supported (supported: {SUPPORTED_BITS})"
            )
        self.packed = np.ascontiguousarray(self.packed, dtype=np.uint32)
        if self.packed.ndim != 3 or self.scales.shape != self.biases.shape:
            raise ValueError(
                f"affine weight shapes do not fit: packed {self.packed.shape}, "
                f"scales {self.scales.shape}, biases {self.biases.shape}"
            )
        G, out, n_groups = self.scales.shape
        if self.packed.shape[:2] != (G, out) or self.packed.shape[2] * 32 != (
            n_groups * self.group_size * self.bits
        ):
            raise ValueError(
                f"packed {self.packed.shape} does not match scales {self.scales.shape} "
                f"with bits={self.bits}, group_size={self.group_size}"
            )

    @property
    def shape(self) -> Tuple[int, int, int]:
        """(G, out, in) of the dequantized weight."""
        G, out, n_groups = self.scales.shape
        return (G, out, n_groups * self.group_size)

    def unpack(self) -> np.ndarray:
        """q: (G, out, in) uint8, the integer codes 0 .. 2**bits - 1."""
        return unpack_bits(self.packed, self.bits)

    def dequantize(self, dtype=np.float32) -> np.ndarray:
        """w: (G, out, in) = q * scale + bias, per group along `in`."""
        G, out, n = self.shape
        shape = (G, out, n // self.group_size, self.group_size)
        s = self.scales.astype(dtype)[..., None]
        b = self.biases.astype(dtype)[..., None]
        if self.bits == 4:  # each byte's two codes straight to floats (twice as fast as unpack)
            q = np.take(_NIBBLES.astype(dtype, copy=False), self.packed.astype("<u4", copy=False).view(np.uint8),
                        axis=0).reshape(shape)
            q *= s
            q += b
            return q.reshape(G, out, n)
        q = self.unpack().reshape(shape)
        return (q.astype(dtype) * s + b).reshape(G, out, n)

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.scales.nbytes + self.biases.nbytes


Weight = Union[np.ndarray, AffineWeight]


_NIBBLES = np.stack([np.arange(256) & 15, np.arange(256) >> 4], -1).astype(np.float32)  # byte -> its 4-bit codes, low first


def unpack_bits(packed: np.ndarray, bits: int) -> np.ndarray:
    """Unpack (..., n * bits // 32) uint32 words into (..., n) uint8 codes, low bits first."""
    per_word = 32 // bits
    shifts = (np.arange(per_word, dtype=np.uint32) * bits).astype(np.uint32)
    q = (packed.astype(np.uint32)[..., None] >> shifts) & np.uint32((1 << bits) - 1)
    return q.reshape(*packed.shape[:-1], packed.shape[-1] * per_word).astype(np.uint8)


def pack_bits(q: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of `unpack_bits`: (..., n) codes -> (..., n * bits // 32) uint32."""
    per_word = 32 // bits
    q = q.astype(np.uint32).reshape(*q.shape[:-1], q.shape[-1] // per_word, per_word)
    shifts = (np.arange(per_word, dtype=np.uint32) * bits).astype(np.uint32)
    return np.bitwise_or.reduce(q << shifts, axis=-1).astype(np.uint32)


def weight_shape(w: Weight) -> Tuple[int, int, int]:
    return w.shape if isinstance(w, AffineWeight) else tuple(w.shape)


def dequantize(w: Weight, dtype=np.float32) -> np.ndarray:
    """(G, out, in) float array of either weight kind."""
    if isinstance(w, AffineWeight):
        return w.dequantize(dtype)
    return np.asarray(w).astype(dtype)


def fuse_rows(a: Weight, b: Weight) -> Weight:
    """Per expert, stack a's rows over b's: (G, Ha, D) + (G, Hb, D) -> (G, Ha + Hb, D).

    Gate and up are fused this way into one weight, so one matmul / conv produces
    both; a quantized pair stays quantized (same bits and group size required).
    """
    if isinstance(a, AffineWeight) != isinstance(b, AffineWeight):
        raise ValueError("cannot fuse a quantized weight with a float one")
    if isinstance(a, AffineWeight):
        if (a.bits, a.group_size) != (b.bits, b.group_size):
            raise ValueError(
                f"cannot fuse q{a.bits}/g{a.group_size} with q{b.bits}/g{b.group_size}"
            )
        cat = lambda u, v: np.concatenate([u, v], axis=1)
        return AffineWeight(
            cat(a.packed, b.packed), cat(a.scales, b.scales), cat(a.biases, b.biases),
            a.bits, a.group_size,
        )
    return np.concatenate([a, b], axis=1)


def take(w: Weight, axis: int, start: int, stop: int) -> Weight:
    """Experts (axis 0) or output channels (axis 1) start:stop of a (G, out, in) weight;
    a quantized one stays quantized."""
    if axis not in (0, 1):
        raise ValueError(f"take: axis {axis} (input channels: take_cols)")
    r = (slice(None),) * axis + (slice(start, stop),)
    if isinstance(w, AffineWeight):
        return AffineWeight(w.packed[r], w.scales[r], w.biases[r], w.bits, w.group_size)
    return np.asarray(w)[r]


def take_cols(w: Weight, start: int, stop: int) -> Weight:
    """Input channels start:stop of a (G, out, in) weight; a quantized one only at its
    group boundaries (the packed words then split there too)."""
    if isinstance(w, AffineWeight):
        gs = w.group_size
        if start % gs or stop % gs:
            raise ValueError(f"input slice {start}:{stop} does not fall on group boundaries of {gs}")
        per = 32 // w.bits
        return AffineWeight(w.packed[..., start // per : stop // per], w.scales[..., start // gs : stop // gs],
                            w.biases[..., start // gs : stop // gs], w.bits, gs)
    return np.asarray(w)[..., start:stop]


def program_name(layer: int, expert_ids) -> str:
    """A file-name-safe program name: layer and expert ids (a name to show, never parsed)."""
    ids = [int(e) for e in expert_ids]
    if len(ids) <= 16:
        tag = "-".join(str(e) for e in ids)
    else:
        digest = hashlib.sha1(",".join(map(str, ids)).encode()).hexdigest()[:8]
        tag = f"{ids[0]}-{ids[-1]}_n{len(ids)}_{digest}"
    return f"layer{layer}_e{tag}"


@dataclass
class ProgramSpec:
    """One MoE layer, one group of experts, its tiers, and the experts' weights.

    Weights are stacked over the G experts of the group, in `expert_ids` order.
    A shared expert (dense MLP) is the case G = 1 with its own weights.
    """

    layer: int
    expert_ids: Tuple[int, ...]
    tiers: Tuple[int, ...]  # token capacities C, ascending
    D: int  # hidden size
    H: int  # expert intermediate size
    activation: str  # one of ACTIVATIONS
    gate: Weight  # (G, H, D)
    up: Weight  # (G, H, D)
    down: Weight  # (G, D, H)
    gate_bias: Optional[np.ndarray] = None  # (G, H)
    up_bias: Optional[np.ndarray] = None  # (G, H)
    down_bias: Optional[np.ndarray] = None  # (G, D)
    # gpt-oss clamped SwiGLU (mlx_lm activations.SwigluOAI)
    alpha: float = 1.702
    limit: float = 7.0
    meta: dict = field(default_factory=dict)
    # how a Core ML program stores the weights (formats.WEIGHT_FORMATS); None: as given
    storage: Optional[str] = None

    def __post_init__(self):
        self.expert_ids = tuple(int(e) for e in self.expert_ids)
        self.tiers = tuple(sorted(set(int(t) for t in self.tiers)))
        G, D, H = self.G, self.D, self.H
        if G < 1 or not self.tiers or min(self.tiers) < 1:
            raise ValueError(
                f"need at least one expert and positive tiers, got "
                f"experts {self.expert_ids}, tiers {self.tiers}"
            )
        if self.storage is not None:
            from .formats import check_format

            check_format(self.storage)
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"unknown activation {self.activation!r} (known: {', '.join(ACTIVATIONS)})"
            )
        for name, w, shape in (
            ("gate", self.gate, (G, H, D)),
            ("up", self.up, (G, H, D)),
            ("down", self.down, (G, D, H)),
        ):
            if weight_shape(w) != shape:
                raise ValueError(f"{name} weight is {weight_shape(w)}, expected {shape}")
        for name, b, shape in (
            ("gate_bias", self.gate_bias, (G, H)),
            ("up_bias", self.up_bias, (G, H)),
            ("down_bias", self.down_bias, (G, D)),
        ):
            if b is not None and tuple(b.shape) != shape:
                raise ValueError(f"{name} is {tuple(b.shape)}, expected {shape}")

    @property
    def G(self) -> int:
        return len(self.expert_ids)

    @property
    def quantized(self) -> bool:
        return any(isinstance(w, AffineWeight) for w in (self.gate, self.up, self.down))

    @property
    def has_bias(self) -> bool:
        return any(b is not None for b in (self.gate_bias, self.up_bias, self.down_bias))

    @property
    def weight_format(self) -> str:
        """The storage format when one is chosen (e.g. 'int8-channel'), else `source_format`."""
        return self.storage or self.source_format

    @property
    def source_format(self) -> str:
        """'float' or e.g. 'q4g64'; 'mixed' when the three linears differ."""
        fmts = {
            f"q{w.bits}g{w.group_size}" if isinstance(w, AffineWeight) else "float"
            for w in (self.gate, self.up, self.down)
        }
        return fmts.pop() if len(fmts) == 1 else "mixed"

    @property
    def name(self) -> str:
        return program_name(self.layer, self.expert_ids)

    @property
    def weight_bytes(self) -> int:
        """Bytes of the weights as given (packed codes + scales + biases when quantized)."""
        n = 0
        for w in (self.gate, self.up, self.down, self.gate_bias, self.up_bias, self.down_bias):
            if w is not None:
                n += w.nbytes
        return n

    def describe(self) -> dict:
        """Plain-JSON description (no weights)."""
        return {
            "name": self.name,
            "layer": self.layer,
            "expert_ids": list(self.expert_ids),
            "tiers": list(self.tiers),
            "D": self.D,
            "H": self.H,
            "G": self.G,
            "activation": self.activation,
            "weight_format": self.weight_format,
            **({"source_format": self.source_format} if self.storage else {}),
            "bias": self.has_bias,
            "alpha": self.alpha,
            "limit": self.limit,
        }


def _sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # overflow-free logistic


_erf = np.vectorize(math.erf, otypes=[np.float64])


def gelu_exact(x: np.ndarray) -> np.ndarray:
    """x * Phi(x) with the exact erf (mlx `nn.gelu`, MIL gelu mode EXACT, ONNX Erf)."""
    return 0.5 * x * (1.0 + _erf(np.asarray(x, np.float64) / math.sqrt(2.0)))


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """mlx `nn.gelu_approx` / MIL gelu mode TANH_APPROXIMATION."""
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def activate(up: np.ndarray, gate: np.ndarray, activation: str, alpha=1.702, limit=7.0):
    """The gated activation, argument order as SwitchGLU calls it: act(x_up, x_gate)."""
    if activation == "swiglu":
        return gate * _sigmoid(gate) * up
    if activation == "swiglu_oai":
        gate = np.minimum(gate, limit)
        up = np.clip(up, -limit, limit)
        return (up + 1.0) * (gate * _sigmoid(alpha * gate))
    if activation == "geglu":
        return gelu_tanh(gate) * up
    if activation == "geglu_exact":
        return gelu_exact(gate) * up
    raise ValueError(f"unknown activation {activation!r}")


def reference_ffn(spec: ProgramSpec, x: np.ndarray, dtype=np.float64) -> np.ndarray:
    """y: (G, C, D) = each expert's FFN on its rows of x: (G, C, D), in `dtype`.

    Weights are dequantized (q * scale + bias) first, so this is the exact function
    both the Core ML and ONNX programs approximate.
    """
    x = np.asarray(x, dtype)
    if x.ndim != 3 or x.shape[0] != spec.G or x.shape[2] != spec.D:
        raise ValueError(f"x is {x.shape}, expected ({spec.G}, C, {spec.D})")

    def linear(h, w, b):
        # h: (G, C, in), w: (G, out, in) -> (G, C, out)
        y = np.matmul(h, dequantize(w, dtype).transpose(0, 2, 1))
        if b is not None:
            y = y + np.asarray(b, dtype)[:, None, :]
        return y

    up = linear(x, spec.up, spec.up_bias)
    gate = linear(x, spec.gate, spec.gate_bias)
    h = activate(up, gate, spec.activation, spec.alpha, spec.limit).astype(dtype)
    return linear(h, spec.down, spec.down_bias)


def random_spec(
    *,
    G=2,
    D=64,
    H=32,
    tiers=(32, 64),
    activation="swiglu",
    bits=None,
    group_size=32,
    bias=False,
    layer=0,
    seed=0,
    scale=None,
) -> ProgramSpec:
    """A spec with random weights, quantized the way mx.quantize does when `bits` is set.

    For tests and benchmarks that do not need a real model.
    """
    rng = np.random.default_rng(seed)

    def w(out, inp):
        s = scale if scale is not None else 1.0 / math.sqrt(inp)
        return rng.uniform(-s, s, size=(G, out, inp)).astype(np.float32)

    def maybe_q(wf):
        return wf if bits is None else quantize_affine(wf, bits, group_size)

    b = (lambda n: rng.normal(0, 0.1, size=(G, n)).astype(np.float32)) if bias else (
        lambda n: None
    )
    return ProgramSpec(
        layer=layer,
        expert_ids=tuple(range(G)),
        tiers=tiers,
        D=D,
        H=H,
        activation=activation,
        gate=maybe_q(w(H, D)),
        up=maybe_q(w(H, D)),
        down=maybe_q(w(D, H)),
        gate_bias=b(H),
        up_bias=b(H),
        down_bias=b(D),
    )


def quantize_affine(w: np.ndarray, bits: int, group_size: int) -> AffineWeight:
    """numpy version of MLX affine quantization (min/max per group).

    Used only to make test data when MLX is not wanted; real weights come from MLX.
    """
    G, out, n = w.shape
    wg = w.reshape(G, out, n // group_size, group_size).astype(np.float32)
    lo, hi = wg.min(-1), wg.max(-1)
    n_levels = (1 << bits) - 1
    scales = np.maximum((hi - lo) / n_levels, 1e-7).astype(np.float32)
    q = np.clip(np.round((wg - lo[..., None]) / scales[..., None]), 0, n_levels)
    q = q.astype(np.uint8).reshape(G, out, n)
    return AffineWeight(pack_bits(q, bits), scales, lo.astype(np.float32), bits, group_size)
