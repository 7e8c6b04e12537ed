"""ProgramSpec -> ONNX graphs, one .onnx per tier (runs anywhere onnxruntime does).

Graph for tier C: x (G, C, D) float32 -> y (G, C, D) float32. The graph never depends
on C: `build_onnx(spec, None)` / `make_dynamic` give it a symbolic row count, for
providers that take dynamic shapes (one session, one resident copy, every tier).
- float weights: batched MatMul with one [G, D, 2H] initializer (gate and up fused,
  per expert [gate | up] along the last axis) and one [G, H, D] for down.
- MLX affine weights (2, 4, 8 bits): per expert `com.microsoft.MatMulNBits` (bits=4,
  block_size=group size, NO zero points: onnxruntime's fast kernel; float zero points
  cost ~4 ms more per call in onnxruntime 1.32, and 8-bit with float zero points is
  refused) plus an exact correction. With the kernel's implicit zero point 8,
  s*q + b = s*(q - z) + (z*s + b), so y = MatMulNBits(x) + (per-group sums of x) @ c^T,
  c = z*s + b: exact in real arithmetic, ~1/group_size extra FLOPs. MLX packs 4-bit
  codes low bits first into little-endian uint32, byte for byte the low-nibble-first
  uint8 layout MatMulNBits reads. 8-bit codes are split into two nibble planes,
  q = 16*hi + lo, run as one MatMulNBits over [x, x] (K doubled): onnxruntime's 8-bit
  float kernel takes ~6 ms per 1-row call at K=2048, N=1536, the 4-bit one ~0.3 ms.
  Scales and biases are stored in float16 or bfloat16 when that is lossless (MLX
  bf16/fp16 models) and cast at load: the weight file holds the quantized model's bytes.
"""

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np

from . import onnx_wire
from .spec import INPUT_NAME, OUTPUT_NAME, AffineWeight, ProgramSpec, Weight, dequantize, fuse_rows, pack_bits  # noqa: F401

OPSET = 17
ROWS = "C"  # the symbolic row dimension of a dynamic graph
METADATA_KEY = "npumoe.program"  # model property: spec.describe() as JSON (as in Core ML packages)


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
        self.inits.append(numpy_helper.from_array(np.array(arr, order="C"), nm))  # 0-d stays 0-d
        return nm

    def node(self, op, inputs, n_out=1, base=None, domain=None, **attrs):
        from onnx import helper

        outs = [self.name(base or op.lower()) for _ in range(n_out)]
        kw = {"domain": domain} if domain else {}
        self.nodes.append(helper.make_node(op, inputs, outs, name=self.name(op), **kw, **attrs))
        return outs if n_out > 1 else outs[0]


def _compact(arr: np.ndarray):
    """(dtype tag, array): the smallest of float16 / bfloat16 / float32 that holds every
    value exactly. MLX stores scales and biases in the model's dtype (bf16 or fp16 in
    most checkpoints, float32 in tiny ones); the graph casts them back to float32 (a
    constant the session folds at load), so the file keeps the quantized model's bytes.
    bfloat16 goes as its upper 16 bits (numpy has no bfloat16)."""
    a = np.ascontiguousarray(arr, np.float32)
    with np.errstate(over="ignore"):
        h = a.astype(np.float16)
    if np.array_equal(h.astype(np.float32), a):
        return "float16", h
    bits = a.view(np.uint32)
    if not (bits & 0xFFFF).any():
        return "bfloat16", (bits >> 16).astype(np.uint16)
    return "float32", a


def _const_f32(g: _Graph, base: str, arr: np.ndarray) -> str:
    """A float32 constant stored compactly (see `_compact`)."""
    from onnx import TensorProto, helper

    kind, a = _compact(arr)
    if kind == "float32":
        return g.init(base, a)
    if kind == "float16":
        name = g.init(base, a)
    else:
        name = g.name(base)
        g.inits.append(helper.make_tensor(name, TensorProto.BFLOAT16, a.shape, a.tobytes(), raw=True))
    return g.node("Cast", [name], to=TensorProto.FLOAT)


def nibble_planes(w: AffineWeight):
    """MLX affine codes as 4-bit planes: ``([(plane (G, out, in) in 0..15, m)], z)`` with
    ``sum(m * (plane - 8)) == q - z``, so ``s*q + b = s * sum(m * (plane - 8)) + (z*s + b)``.

    4-bit codes are one plane (z = 8); 8-bit codes split into nibbles, q = 16*hi + lo
    (z = 136); 2-bit codes sit centred in one plane, q + 6 (z = 2, small so the
    correction cancels little). Each plane is a 4-bit MatMulNBits without zero points
    (onnxruntime's fast kernel); every format keeps its codes packed. ``None``: 4-bit,
    whose packed words already are the plane's bytes.
    """
    if w.bits == 4:
        return None, 8
    q = w.unpack()
    if w.bits == 8:
        return [(q >> 4, 16), (q & 15, 1)], 136
    return [(q + 6, 1)], 2


def _nbits_operands(w: AffineWeight):
    """(blobs (G, out, P * in/gs, gs/2) uint8, plane multipliers, z) for MatMulNBits."""
    G, out, inp = w.shape
    planes, z = nibble_planes(w)
    if planes is None:
        blobs = w.packed.view(np.uint8).reshape(G, out, inp // w.group_size, w.group_size // 2)
        return blobs, [1], z
    q = np.concatenate([p for p, _ in planes], axis=2)  # (G, out, P * in)
    blobs = pack_bits(q, 4).view(np.uint8).reshape(G, out, -1, w.group_size // 2)
    return blobs, [m for _, m in planes], z


def _linear(g: _Graph, x: str, w: Weight, bias: Optional[np.ndarray], G: int, base: str):
    """x: (G, C, in) -> (G, C, out) with per-expert weight w: (G, out, in) (+ bias (G, out)).

    MLX affine weights: the 4-bit MatMulNBits planes with no zero points (the fast
    kernel; float zero points cost ~4 ms more per call in onnxruntime 1.32), one node per
    expert, plus the exact correction (per-group sums of x) @ c^T with c = z*s + b
    (G, out, in/gs): ~1/group_size extra FLOPs.
    """
    if isinstance(w, AffineWeight):
        _, out, inp = w.shape
        gs, nb = w.group_size, inp // w.group_size
        blobs, mults, z = _nbits_operands(w)
        xk = x if len(mults) == 1 else g.node("Concat", [x] * len(mults), axis=2)  # (G, C, P*in)
        xs = g.node("Split", [xk, g.init("split_ones", np.ones(G, np.int64))], n_out=G, axis=0) if G > 1 else [xk]
        s_all = _const_f32(g, f"{base}_s", w.scales)  # (G, out, nb), stored once
        ys = []
        for e in range(G):
            s = g.node("Gather", [s_all, g.init("e", np.array(e, np.int64))], axis=0)  # (out, nb)
            if len(mults) > 1:
                s = g.node("Concat", [g.node("Mul", [s, _scalar(g, m)]) for m in mults], axis=1)
            s = g.node("Reshape", [s, g.init("flat", np.array([-1], np.int64))])  # (out * P*nb,)
            ys.append(
                g.node(
                    "MatMulNBits",
                    [xs[e], g.init(f"{base}_q", blobs[e]), s],
                    base=f"{base}_e",
                    domain="com.microsoft",
                    K=len(mults) * inp,
                    N=out,
                    bits=4,
                    block_size=gs,
                )
            )
        y = g.node("Concat", ys, axis=0) if G > 1 else ys[0]
        # correction: x (G, C, in) -> per-group sums (G, C, nb) @ c^T (G, nb, out)
        sums = g.node(
            "ReduceSum",
            [g.node("Reshape", [x, g.init("groups", np.array([0, 0, nb, gs], np.int64))]),
             g.init("last", np.array([-1], np.int64))],
            keepdims=0,
        )
        c = g.node("Add", [g.node("Mul", [s_all, _scalar(g, z)]), _const_f32(g, f"{base}_zb", w.biases)])
        cT = g.node("Transpose", [c], perm=[0, 2, 1])  # (G, nb, out)
        y = g.node("Add", [y, g.node("MatMul", [sums, cT])])
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


def _model(graph):
    """A ModelProto of ``graph`` at our opsets (com.microsoft for MatMulNBits), IR version 8."""
    from onnx import helper

    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)],
        producer_name="npumoe-ane_kernels",
    )
    model.ir_version = 8
    return model


def build_onnx(spec: ProgramSpec, tier: Optional[int]):
    """The ONNX ModelProto for one tier: x (G, C, D) float32 -> y (G, C, D) float32.

    ``tier=None``: the same graph with a symbolic row count C (the graph never depends
    on C), for providers that take dynamic shapes: one session serves every tier.
    """
    from onnx import TensorProto, checker, helper

    G, D, H = spec.G, spec.D, spec.H
    C = ROWS if tier is None else int(tier)
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
    model = _model(graph)
    helper.set_model_props(model, {METADATA_KEY: json.dumps(spec.describe())})
    checker.check_model(model)
    return model


def build_linear_onnx(w: Weight, bias: Optional[np.ndarray] = None, name: str = "linear"):
    """One dense linear layer as an ONNX ModelProto with a symbolic row count:
    x (1, C, in) float32 -> y (1, C, out) float32, C symbolic.

    w: (1, out, in) float or MLX affine weights, bias (1, out) or None. The expert
    programs' ``_linear`` with G = 1: the same MatMulNBits algebra (no zero points plus
    the exact per-group correction) for 2/4/8-bit codes, kept packed.
    """
    from onnx import TensorProto, checker, helper

    _, out, inp = w.shape if isinstance(w, AffineWeight) else np.shape(w)
    g = _Graph()
    y = _linear(g, INPUT_NAME, w, bias, 1, name)
    g.nodes.append(helper.make_node("Identity", [y], [OUTPUT_NAME], name="output"))
    graph = helper.make_graph(
        g.nodes, name,
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, [1, ROWS, inp])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, [1, ROWS, out])],
        initializer=g.inits,
    )
    model = _model(graph)
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


def read_metadata(model) -> dict:
    """The `spec.describe()` dict a graph built here carries (its model property)."""
    raw = {p.key: p.value for p in model.metadata_props}.get(METADATA_KEY)
    if raw is None:
        raise ValueError(f"graph {model.graph.name!r} is not an npumoe expert program (no metadata)")
    return json.loads(raw)


def graph_tier(model) -> int:
    """The tier C of a graph built here, read from the x (G, C, D) input shape."""
    x = next(i for i in model.graph.input if i.name == INPUT_NAME)
    return int(x.type.tensor_type.shape.dim[1].dim_value)


def make_dynamic(model):
    """A tier graph built here with its row count made symbolic (in place; returns it).

    Every tier graph is the same graph but for the declared x / y shapes, so this is the
    graph `build_onnx(spec, None)` gives, without a file of its own in the bundle.
    """
    for v in list(model.graph.input) + list(model.graph.output):
        if v.name in (INPUT_NAME, OUTPUT_NAME):
            v.type.tensor_type.shape.dim[1].dim_param = ROWS  # clears dim_value (oneof)
    return model


def graph_info(data: bytes) -> Tuple[dict, int]:
    """(``read_metadata``, ``graph_tier``) of a tier graph's saved bytes, read without the
    ``onnx`` package (``onnx_wire``): what a process that only runs programs needs."""
    raw = onnx_wire.metadata(data).get(METADATA_KEY)
    if raw is None:
        raise ValueError("graph is not an npumoe expert program (no metadata)")
    dims = onnx_wire.value_dims(data, INPUT_NAME)
    if len(dims) != 3 or dims[1][0] != "value":
        raise ValueError(f"graph input {INPUT_NAME} is not (G, tier, D) with a fixed tier")
    rows = dims[1][1]
    return json.loads(raw), int(rows)


def dynamic_bytes(data: bytes) -> bytes:
    """``make_dynamic`` on a tier graph's saved bytes (no ``onnx`` import): the same model
    with the x / y row count the symbol ``C``."""
    return onnx_wire.with_symbolic_dim(data, (INPUT_NAME, OUTPUT_NAME), 1, ROWS)


def op_counts(model) -> Dict[str, int]:
    counts: Dict[str, int] = {}
    for n in model.graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts
