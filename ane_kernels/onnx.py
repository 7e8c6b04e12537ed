"""ProgramSpec -> static-shape ONNX graphs, one .onnx per tier (runs anywhere onnxruntime does).

Graph for tier C: x (G, C, D) float32 -> y (G, C, D) float32.
- float weights: batched MatMul with one [G, D, 2H] initializer (gate and up fused,
  per expert [gate | up] along the last axis) and one [G, H, D] for down.
- 4-bit MLX affine weights: per expert `com.microsoft.MatMulNBits` (bits=4,
  block_size=group size) on x[g], concatenated over experts. MLX packs codes low bits
  first into little-endian uint32, which is byte for byte the low-nibble-first uint8
  layout MatMulNBits reads; FLOAT zero points -bias/scale make (q - zp) * scale equal
  q * scale + bias exactly in real arithmetic.
- 8-bit (and 2-bit): onnxruntime's CPU MatMulNBits refuses 8-bit weights with float
  zero points (checked with onnxruntime 1.32: "does not support 8-bit weights with
  floating-point zero points"), and integer zero points cannot express MLX's float
  biases, so these are dequantized to float32 initializers.
"""

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict, Optional

import numpy as np

from .spec import AffineWeight, ProgramSpec, Weight, dequantize, fuse_rows

INPUT_NAME = "x"
OUTPUT_NAME = "y"
OPSET = 17
NBITS_FOR_MATMULNBITS = (4,)


class _Graph:
    """Tiny helper to emit nodes and initializers with unique names."""

    def __init__(self):
        self.nodes, self.inits, self.n = [], [], 0

    def name(self, base):
        self.n += 1
        return f"{base}_{self.n}"

    def init(self, base, arr):
        from onnx import numpy_helper

        nm = self.name(base)
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), nm))
        return nm

    def node(self, op, inputs, n_out=1, base=None, domain=None, **attrs):
        from onnx import helper

        outs = [self.name(base or op.lower()) for _ in range(n_out)]
        kw = {"domain": domain} if domain else {}
        self.nodes.append(helper.make_node(op, inputs, outs, name=self.name(op), **kw, **attrs))
        return outs if n_out > 1 else outs[0]


def _linear(g: _Graph, x: str, w: Weight, bias: Optional[np.ndarray], G: int, base: str):
    """x: (G, C, in) -> (G, C, out) with per-expert weight w: (G, out, in) (+ bias (G, out))."""
    Gw, out, inp = w.shape if isinstance(w, AffineWeight) else w.shape
    if isinstance(w, AffineWeight) and w.bits in NBITS_FOR_MATMULNBITS:
        n_blocks = inp // w.group_size
        blob = w.group_size * w.bits // 8
        # (G, out, in*bits/32) uint32 -> (G, out, in/bs, bs*bits/8) uint8, low nibble first
        B = w.packed.view(np.uint8).reshape(G, out, n_blocks, blob)
        scales = w.scales.astype(np.float32)
        zp = (-w.biases.astype(np.float64) / scales.astype(np.float64)).astype(np.float32)
        xs = g.node("Split", [x, g.init("split_ones", np.ones(G, np.int64))], n_out=G, axis=0) if G > 1 else [x]
        ys = []
        for e in range(G):
            ys.append(
                g.node(
                    "MatMulNBits",
                    [
                        xs[e],
                        g.init(f"{base}_q", B[e]),
                        g.init(f"{base}_scales", scales[e].reshape(-1)),
                        g.init(f"{base}_zp", zp[e].reshape(-1)),
                    ],
                    base=f"{base}_e",
                    domain="com.microsoft",
                    K=inp,
                    N=out,
                    bits=w.bits,
                    block_size=w.group_size,
                )
            )
        y = g.node("Concat", ys, axis=0) if G > 1 else ys[0]
    else:
        wt = dequantize(w, np.float32).transpose(0, 2, 1)  # (G, in, out)
        y = g.node("MatMul", [x, g.init(f"{base}_w", wt)], base=base)
    if bias is not None:
        y = g.node("Add", [y, g.init(f"{base}_b", np.asarray(bias, np.float32)[:, None, :])])
    return y


def _bias_gu(spec: ProgramSpec):
    if spec.gate_bias is None and spec.up_bias is None:
        return None
    z = np.zeros((spec.G, spec.H), np.float32)
    bg = z if spec.gate_bias is None else np.asarray(spec.gate_bias, np.float32)
    bu = z if spec.up_bias is None else np.asarray(spec.up_bias, np.float32)
    return np.concatenate([bg, bu], axis=1)  # (G, 2H)


def _scalar(g: _Graph, v: float) -> str:
    return g.init("c", np.asarray(v, np.float32))


def build_onnx(spec: ProgramSpec, tier: int):
    """The ONNX ModelProto for one tier: x (G, C, D) float32 -> y (G, C, D) float32."""
    from onnx import TensorProto, checker, helper

    G, C, D, H = spec.G, int(tier), spec.D, spec.H
    g = _Graph()
    try:
        w_gu = fuse_rows(spec.gate, spec.up)  # (G, 2H, D)
        h = _linear(g, INPUT_NAME, w_gu, _bias_gu(spec), G, "gate_up")
        gate, up = g.node(
            "Split", [h, g.init("split_gu", np.array([H, H], np.int64))], n_out=2, axis=2
        )
    except ValueError:  # gate and up in different formats: two linears
        gate = _linear(g, INPUT_NAME, spec.gate, spec.gate_bias, G, "gate")
        up = _linear(g, INPUT_NAME, spec.up, spec.up_bias, G, "up")

    if spec.activation == "swiglu":
        a = g.node("Mul", [g.node("Mul", [gate, g.node("Sigmoid", [gate])]), up])
    elif spec.activation == "swiglu_oai":
        gate = g.node("Min", [gate, _scalar(g, spec.limit)])
        up = g.node("Clip", [up, _scalar(g, -spec.limit), _scalar(g, spec.limit)])
        sig = g.node("Sigmoid", [g.node("Mul", [gate, _scalar(g, spec.alpha)])])
        a = g.node("Mul", [g.node("Add", [up, _scalar(g, 1.0)]), g.node("Mul", [gate, sig])])
    elif spec.activation in ("geglu", "geglu_exact"):
        if spec.activation == "geglu":  # tanh approximation, as mlx nn.gelu_approx
            # 0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3)))
            g3 = g.node("Mul", [g.node("Mul", [gate, gate]), gate])
            inner = g.node("Add", [gate, g.node("Mul", [g3, _scalar(g, 0.044715)])])
            t = g.node("Tanh", [g.node("Mul", [inner, _scalar(g, np.sqrt(2.0 / np.pi))])])
        else:  # exact: 0.5 g (1 + erf(g / sqrt(2)))
            t = g.node("Erf", [g.node("Mul", [gate, _scalar(g, 1 / np.sqrt(2.0))])])
        half = g.node("Mul", [gate, _scalar(g, 0.5)])
        a = g.node("Mul", [g.node("Mul", [half, g.node("Add", [t, _scalar(g, 1.0)])]), up])
    else:
        raise ValueError(f"unknown activation {spec.activation!r}")

    y = _linear(g, a, spec.down, spec.down_bias, G, "down")
    g.nodes.append(helper.make_node("Identity", [y], [OUTPUT_NAME], name="output"))
    graph = helper.make_graph(
        g.nodes,
        f"{spec.name}_c{C}",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, [G, C, D])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, [G, C, D])],
        initializer=g.inits,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)],
        producer_name="npumoe-ane_kernels",
    )
    model.ir_version = 8
    helper.set_model_props(model, {f"npumoe.{k}": str(v) for k, v in spec.describe().items()})
    checker.check_model(model)
    return model


def onnx_path(out_dir, spec_name: str, tier: int) -> Path:
    return Path(out_dir) / f"{spec_name}.c{tier}.onnx"


def weights_path(out_dir, spec_name: str) -> Path:
    return Path(out_dir) / f"{spec_name}.weights"


def save_onnx(spec: ProgramSpec, out_dir) -> Dict[int, Path]:
    """Write one .onnx graph per tier into `out_dir`; returns {tier: path}.

    All tier graphs reference ONE external weight file `<name>.weights` (ONNX external
    data: same location, offset and length for the same initializer), so the disk
    holds one copy of the weights however many tiers there are. Files are written in a
    temporary folder and renamed into place (weights first, then the graphs).
    """
    import onnx
    from onnx.external_data_helper import convert_model_to_external_data

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    wname = weights_path(out_dir, spec.name).name
    tmp = Path(tempfile.mkdtemp(prefix=f".{spec.name}.", dir=out_dir))
    try:
        shared, digests, written = {}, {}, []
        for tier in spec.tiers:
            model = build_onnx(spec, tier)
            for init in model.graph.initializer:
                if init.name in digests:
                    # same name, same bytes: the graphs differ only in the x / y shapes
                    if digests[init.name] != _digest(init):
                        raise AssertionError(f"initializer {init.name} differs across tiers")
                    init.ClearField("raw_data")
                    init.data_location = onnx.TensorProto.EXTERNAL
                    del init.external_data[:]
                    init.external_data.extend(shared[init.name])
            if not shared:
                digests = {i.name: _digest(i) for i in model.graph.initializer}
                convert_model_to_external_data(
                    model, all_tensors_to_one_file=True, location=wname, size_threshold=256
                )
            path = onnx_path(tmp, spec.name, tier)
            onnx.save_model(model, str(path))
            if not shared:
                shared = {
                    i.name: list(i.external_data)
                    for i in model.graph.initializer
                    if i.data_location == onnx.TensorProto.EXTERNAL
                }
                digests = {k: v for k, v in digests.items() if k in shared}
            written.append((tier, path))
        if (tmp / wname).exists():
            os.replace(tmp / wname, out_dir / wname)
        paths = {}
        for tier, path in written:
            paths[tier] = out_dir / path.name
            os.replace(path, paths[tier])
        return paths
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _digest(init) -> bytes:
    return hashlib.sha1(init.raw_data).digest() + str(tuple(init.dims)).encode()


def graph_tier(model) -> int:
    """The tier C of a graph built here, read from the x (G, C, D) input shape."""
    x = next(i for i in model.graph.input if i.name == INPUT_NAME)
    return int(x.type.tensor_type.shape.dim[1].dim_value)


def op_counts(model) -> Dict[str, int]:
    counts: Dict[str, int] = {}
    for n in model.graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts
