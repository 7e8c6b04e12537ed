"""ProgramSpec -> Core ML ML Program: one multifunction .mlpackage, one function per tier.

Layout ("conv", the default). Apple's ANE guidance is channels-first (B, C, 1, S)
with linears as 1x1 convolutions and the sequence axis last (>= 32 fp16 = one
64-byte row); that is the shape the ANE compiler maps best. G experts become ONE
grouped 1x1 conv (`groups=G`): input channels are the G experts' D-vectors
side by side, so each expert only sees its own rows and the whole group is one
large op (grouping is what NPUMoE found to pay most). Gate and up are fused into
one conv weight (per expert [gate_g; up_g]), so a function is:

    x (G, D, C) -> reshape -> (1, G*D, 1, C)          (no transpose: the host gathers (G, D, C))
    per H chunk k: conv(groups=G, W_gu_k (G*2Hc, D, 1, 1)) -> (1, G*2Hc, 1, C) -> (G, 2, Hc, C)
                   act(up, gate) (G, 1, Hc, C) -> (1, G*Hc, 1, C)
                   conv(groups=G, W_down_k (G*D, Hc, 1, 1)) -> (1, G*D, 1, C)
    sum over chunks -> reshape -> y (G, D, C)

The channel axes are G*D and G*2Hc. H is split into chunks (`h_chunks`) so that G*2Hc
fits the per-axis limit (16384 on older chips: Mixtral's 2H = 28672 runs as two chunks
inside one program); G*D cannot be split, so wider groups use layout "matmul": a batched
matmul W (G, 2Hc, D) @ x (G, D, C), whose largest axis is max(C, D, 2Hc) - also without
transposes. `limits.py` checks every program; the planner (plan.py) caps G by the same rule.

Weights are stored in a format chosen at build (`formats.py`: blockwise, fp16,
int8-channel, palette). blockwise keeps MLX affine 4/8-bit (and 2-bit) weights compressed
as `constexpr_blockwise_shift_scale` (uint4/uint8 codes, fp16 scale, fp16 offset =
-bias/scale: scale * (q - offset) = q * scale + bias). Every tier function is built
from the same numpy arrays, so `save_multifunction` dedups the blobs: the package
holds one copy of the weights.
"""

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
import math
from typing import Dict, List, Optional, Tuple

import numpy as np

from .formats import PALETTE_BITS, PALETTE_GROUP, WEIGHT_FORMATS, check_format, int8_channel, palettize
from .limits import DEFAULT_LIMITS, Limits, check_program, check_spec, require
from .spec import (INPUT_NAME, OUTPUT_NAME, AffineWeight, ProgramSpec, Weight, dequantize, function_name, fuse_rows,  # noqa: F401
                   take, take_cols, weight_shape)

LAYOUTS = ("conv", "matmul")
INPUT_LAYOUT = "GDC"  # x and y are (G, D, C): channels first, the tier (sequence) axis last
FP16_MAX = 65504.0
FP16_SATURATION = 32759.0  # ANE matmul/conv outputs saturate to inf near here (ANEForge op quirks: fp16max/2)


@dataclass
class CoreMLBuild:
    """What `build_package` wrote, for reports and the CLI."""

    path: Path
    functions: Dict[str, int]  # function name -> tier
    layout: str
    ops_per_function: Dict[str, int]
    weight_bytes: int  # bytes of baked constants in one function
    package_bytes: int  # bytes on disk
    problems: List[str] = field(default_factory=list)
    seconds: float = 0.0


def _affine_to_shift_scale(w: AffineWeight):
    """MLX affine -> (codes uint4/uint8 (G, out, in), scale fp16, offset fp16 (G, out, in/gs)).

    offset = -bias / scale. A degenerate group (|scale| ~ 0, constant weights) has no
    finite fp16 offset; it is re-expressed as scale' * (q - offset') with a large
    exact offset' = -2**15, which reproduces bias to fp16 precision.
    """
    from coremltools.converters.mil.mil import types

    q = w.unpack()
    s = w.scales.astype(np.float64)
    b = w.biases.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        off = -b / s
    bad = ~np.isfinite(off) | (np.abs(off) > 30000.0) | (np.abs(s) < 6.2e-5 * 2**-10)
    if bad.any():
        G, out, n = q.shape
        qm = q.reshape(G, out, n // w.group_size, w.group_size).mean(-1)
        K = 2.0**15
        off = np.where(bad, -K, off)
        s = np.where(bad, b / (qm + K), s)
    code_dtype = types.np_uint4_dtype if w.bits == 4 else np.uint8
    return q.astype(code_dtype), s.astype(np.float16), off.astype(np.float16)


def h_chunks(spec: ProgramSpec, layout: str, limits: Limits = DEFAULT_LIMITS) -> List[Tuple[int, int]]:
    """Split H into near-equal chunks so every channel axis fits `limits.max_axis`.

    conv puts G*2*Hc on one axis, matmul 2*Hc: Mixtral's 2H = 28672 becomes two
    7168-wide chunks (14336 per gate/up conv). Chunk edges fall on the source's
    quantization groups (and multiples of 32) so quantized weights split exactly.
    A program too wide to split (G*D over the limit) is left whole for the checks to name.
    """
    H, G = spec.H, spec.G
    widest = limits.max_axis // (2 * G if layout == "conv" else 2)
    gs = [w.group_size for w in (spec.gate, spec.up, spec.down) if isinstance(w, AffineWeight)]
    align = int(np.lcm.reduce([32, *gs]))
    if H <= widest or widest < align:
        return [(0, H)]
    n = -(-H // widest)
    while True:
        edges = [0] + [min(H, round(k * H / n / align) * align) for k in range(1, n)] + [H]
        if all(0 < b - a <= widest for a, b in zip(edges, edges[1:])):
            return list(zip(edges, edges[1:]))
        n += 1


def choose_layout(G: int, D: int, H: int, limits: Limits = DEFAULT_LIMITS, group_size: int = 64) -> Optional[str]:
    """The layout a group of G experts builds in: "conv" (Apple's ANE layout) where G*D fits
    one axis, else "matmul" (axes D, 2Hc, C, G); None when neither fits (D itself too wide).
    H never decides: it is split into chunks (`h_chunks`) down to one quantization group."""
    m = limits.max_axis
    align = int(np.lcm(32, group_size))
    if G * D <= m and (H <= m // (2 * G) or m // (2 * G) >= align):
        return "conv"
    if D <= m and G <= m and (H <= m // 2 or m // 2 >= align):
        return "matmul"
    return None


def max_group(D: int, H: int, limits: Limits = DEFAULT_LIMITS, group_size: int = 64) -> int:
    """The most experts one program can hold under `limits`' axis rule (0: none builds);
    `choose_layout` picks conv up to max_axis // D experts, matmul beyond."""
    if choose_layout(1, D, H, limits, group_size) is None:
        return 0
    return limits.max_axis if choose_layout(limits.max_axis, D, H, limits, group_size) else max(
        g for g in range(1, limits.max_axis // D + 1) if choose_layout(g, D, H, limits, group_size))


def _encode(w: Weight, fmt: str, shape) -> tuple:
    """A (G, out, in) weight in format `fmt`, as the arrays of the constant that holds it,
    shaped for the layout: `shape` is (G*out, in, 1, 1) for conv, (G, out, in) for matmul.

    Returns ("fp16", w) | ("shift", data, scale, offset or None) | ("lut", indices, lut).
    """
    from coremltools.converters.mil.mil import types

    G, out, n = weight_shape(w)
    conv = len(shape) == 4
    if fmt == "blockwise" and isinstance(w, AffineWeight):
        q, s, off = _affine_to_shift_scale(w)
        if conv:
            q, s, off = (a.reshape(G * out, -1, 1, 1) for a in (q, s, off))
        return ("shift", q, s, off)
    group = math.gcd(out, PALETTE_GROUP)  # a palette group never spans two experts

    def per_expert(fn):
        """fn(w_g (out, in) float32) -> arrays, run one expert at a time (a fp32 copy of a
        whole group's weights is GBs at Mixtral / gpt-oss sizes), stacked over experts."""
        parts = [fn(dequantize(take(w, 0, g, g + 1), np.float32)[0]) for g in range(G)]
        return [np.concatenate(p) for p in zip(*parts)]

    if fmt in ("blockwise", "fp16"):
        (wf,) = per_expert(lambda wg: (wg.astype(np.float16),))
        return ("fp16", np.ascontiguousarray(wf.reshape(shape)))
    if fmt == "int8-channel":
        q, scale = per_expert(int8_channel)  # one scale per output channel
        return ("shift", q.reshape(shape), scale.reshape((G * out, 1, 1, 1) if conv else (G, out, 1)), None)
    if fmt == "palette":
        idx, lut = per_expert(lambda wg: palettize(wg, PALETTE_BITS, group))
        code = types.np_uint4_dtype if PALETTE_BITS == 4 else np.uint8
        # lut rank = rank + 2: per axis the number of tables along it, then (2**bits, 1)
        tables = (G * out // group, 1, 1, 1) if conv else (G, out // group, 1)
        lut = lut.reshape(*tables, 1 << PALETTE_BITS, 1)
        return ("lut", idx.reshape(shape).astype(code), lut)
    raise ValueError(f"unknown weight format {fmt!r} (known: {', '.join(WEIGHT_FORMATS)})")


def _emit(mb, enc):
    """The MIL constant (a constexpr op for compressed formats) of an `_encode` result."""
    if enc[0] == "fp16":
        return enc[1]
    if enc[0] == "shift":
        _, data, scale, off = enc
        kw = {} if off is None else {"offset": off}
        return mb.constexpr_blockwise_shift_scale(data=data, scale=scale, **kw)
    _, idx, lut = enc
    return mb.constexpr_lut_to_dense(indices=idx, lut=lut)


def _fp16(v):
    return np.float16(v)


def _activation(mb, up, gate, spec: ProgramSpec):
    """act(up, gate) with fp16 constants only."""
    if spec.activation == "swiglu":
        return mb.mul(x=mb.silu(x=gate), y=up)
    if spec.activation == "swiglu_oai":
        lim = _fp16(spec.limit)
        gate = mb.minimum(x=gate, y=lim)
        up = mb.clip(x=up, alpha=_fp16(-spec.limit), beta=lim)
        glu = mb.mul(x=gate, y=mb.sigmoid(x=mb.mul(x=gate, y=_fp16(spec.alpha))))
        return mb.mul(x=mb.add(x=up, y=_fp16(1.0)), y=glu)
    if spec.activation in ("geglu", "geglu_exact"):
        mode = "TANH_APPROXIMATION" if spec.activation == "geglu" else "EXACT"
        return mb.mul(x=mb.gelu(x=gate, mode=mode), y=up)
    raise ValueError(f"unknown activation {spec.activation!r}")


def _bias(b_gate, b_up, G, H):
    if b_gate is None and b_up is None:
        return None
    zg = np.zeros((G, H), np.float32)
    bg = zg if b_gate is None else np.asarray(b_gate, np.float32)
    bu = zg if b_up is None else np.asarray(b_up, np.float32)
    return np.concatenate([bg, bu], axis=1)  # (G, 2H), per expert [gate; up]


@dataclass
class Weights:
    """A spec's weights encoded once for one layout (every tier function reuses the same
    arrays, so `save_multifunction` stores them once): per H chunk, the fused gate/up
    constant, the down constant and the chunk's gate/up bias."""

    layout: str
    fmt: str
    chunks: List[Tuple[int, int]]
    gate_up: List[tuple]
    down: List[tuple]
    bias_gu: List[Optional[np.ndarray]]
    bias_down: Optional[np.ndarray]


def encode_weights(spec: ProgramSpec, layout: str = "conv", limits: Limits = DEFAULT_LIMITS) -> Weights:
    """Encode `spec`'s weights in its storage format (`spec.storage`, default blockwise)."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r} (known: {', '.join(LAYOUTS)})")
    fmt = check_format(spec.storage or "blockwise")
    G, D = spec.G, spec.D
    chunks = h_chunks(spec, layout, limits)
    b_gu = _bias(spec.gate_bias, spec.up_bias, G, spec.H)
    gu, dn, bgu = [], [], []
    for a, b in chunks:
        Hc = b - a
        w_gu = fuse_rows(take(spec.gate, 1, a, b), take(spec.up, 1, a, b))  # (G, 2Hc, D)
        gu.append(_encode(w_gu, fmt, (G * 2 * Hc, D, 1, 1) if layout == "conv" else (G, 2 * Hc, D)))
        w_d = take_cols(spec.down, a, b)  # (G, D, Hc)
        dn.append(_encode(w_d, fmt, (G * D, Hc, 1, 1) if layout == "conv" else (G, D, Hc)))
        bgu.append(None if b_gu is None else np.concatenate(
            [b_gu[:, a:b], b_gu[:, spec.H + a : spec.H + b]], axis=1))  # (G, 2Hc)
    b_d = None if spec.down_bias is None else np.asarray(spec.down_bias, np.float32)
    return Weights(layout, fmt, chunks, gu, dn, bgu, b_d)


def build_program(spec: ProgramSpec, tier: int, layout: str = "conv", limits: Limits = DEFAULT_LIMITS,
                  weights: Optional[Weights] = None):
    """A single-function pymil Program for one tier: x (G, D, C) fp16 -> y (G, D, C) fp16.

    Channels-first in and out (INPUT_LAYOUT): the caller gathers rows straight into
    (G, D, C), so the graph has no transposes (Apple's ANE principle: minimise them).
    """
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    w = weights or encode_weights(spec, layout, limits)
    layout = w.layout
    G, C, D = spec.G, int(tier), spec.D

    @mb.program(
        input_specs=[mb.TensorSpec(shape=(G, D, C), dtype=types.fp16)],
        opset_version=ct.target.iOS18,
    )
    def prog(x):
        conv = layout == "conv"
        h_in = mb.reshape(x=x, shape=[1, G * D, 1, C]) if conv else x
        acc = None
        for k, (a, b) in enumerate(w.chunks):
            Hc, bgu = b - a, w.bias_gu[k]
            if conv:  # (1, G*D, 1, C) -> (1, G*2Hc, 1, C), grouped over experts
                kw = {} if bgu is None else {"bias": bgu.reshape(-1).astype(np.float16)}
                h = mb.conv(x=h_in, weight=_emit(mb, w.gate_up[k]), groups=G, **kw)
            else:  # (G, 2Hc, D) @ (G, D, C) -> (G, 2Hc, C)
                h = mb.matmul(x=_emit(mb, w.gate_up[k]), y=h_in)
                if bgu is not None:
                    h = mb.add(x=h, y=bgu[:, :, None].astype(np.float16))
            h = mb.reshape(x=h, shape=[G, 2, Hc, C])
            gate, up = mb.split(x=h, num_splits=2, axis=1)  # (G, 1, Hc, C) each
            act = _activation(mb, up, gate, spec)
            bd = w.bias_down if k == 0 else None
            if conv:
                act = mb.reshape(x=act, shape=[1, G * Hc, 1, C])
                kw = {} if bd is None else {"bias": bd.reshape(-1).astype(np.float16)}
                y = mb.conv(x=act, weight=_emit(mb, w.down[k]), groups=G, **kw)  # (1, G*D, 1, C)
            else:
                act = mb.reshape(x=act, shape=[G, Hc, C])
                y = mb.matmul(x=_emit(mb, w.down[k]), y=act)  # (G, D, C)
                if bd is not None:
                    y = mb.add(x=y, y=bd[:, :, None].astype(np.float16))
            acc = y if acc is None else mb.add(x=acc, y=y)  # down of the whole H: a sum over chunks
        if conv:
            return mb.reshape(x=acc, shape=[G, D, C], name=OUTPUT_NAME)
        return mb.identity(x=acc, name=OUTPUT_NAME)

    return prog


def _convert(prog):
    import coremltools as ct

    return ct.convert(
        prog,
        convert_to="mlprogram",
        minimum_deployment_target=ct.target.macOS15,
        compute_precision=ct.precision.FLOAT16,
        compute_units=ct.ComputeUnit.CPU_AND_NE,
        skip_model_load=True,
    )


def _model_file(pkg: Path) -> Path:
    manifest = json.loads((pkg / "Manifest.json").read_text())
    root = manifest["rootModelIdentifier"]
    return pkg / "Data" / manifest["itemInfoEntries"][root]["path"]


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def replace_path(tmp: Path, out: Path) -> None:
    """Move `tmp` to `out` as atomically as the file system allows (dirs included)."""
    out = Path(out)
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.rename(out, old)
    os.rename(tmp, out)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() else old.unlink()


def build_package(
    spec: ProgramSpec,
    out_path,
    *,
    layout: str = "conv",
    limits: Limits = DEFAULT_LIMITS,
    check: bool = True,
) -> CoreMLBuild:
    """Build every tier of `spec` into one multifunction .mlpackage at `out_path`.

    Every tier program passes the ANE static checks first (else LimitError naming the
    op / axis). The package is written to a temporary sibling and renamed into place.
    """
    import coremltools as ct

    t0 = time.perf_counter()
    out_path = Path(out_path)
    problems = check_spec(spec, limits)
    progs = {}
    weights = encode_weights(spec, layout, limits)
    for tier in spec.tiers:
        progs[function_name(tier)] = prog = build_program(spec, tier, layout, limits, weights)
        problems += check_program(prog, limits)
    if layout == "conv" and any(" axis " in p for p in problems):
        problems.append(
            f"hint: the conv layout puts G*D={spec.G * spec.D} on the channel axis; "
            "use layout='matmul' or fewer experts per group"
        )
    if check:
        require(problems, f"program {spec.name}")

    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.", dir=out_path.parent))
    try:
        desc = ct.utils.MultiFunctionDescriptor()
        for fname, prog in progs.items():
            single = tmp / f"{fname}.mlpackage"
            _convert(prog).save(str(single))
            desc.add_function(str(single), "main", fname)
        desc.default_function_name = function_name(spec.tiers[0])
        final = tmp / out_path.name
        ct.utils.save_multifunction(desc, str(final))
        _write_metadata(final, spec, layout, weights.chunks)
        # check again what Core ML will actually load (converter passes included)
        from .milrun import load_package

        saved = load_package(final)
        if check:
            require(check_program(saved, limits), f"saved program {spec.name}")
        replace_path(final, out_path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    from .limits import _const_bytes

    ops = {
        name: sum(op.op_type != "const" for op in f.operations)
        for name, f in saved.functions.items()
    }
    one = next(iter(saved.functions.values()))
    wbytes = sum(
        _const_bytes(op.outputs[0].val, op.outputs[0].dtype)
        for op in one.operations
        if op.op_type == "const"
    )
    return CoreMLBuild(
        path=out_path,
        functions={function_name(t): t for t in spec.tiers},
        layout=layout,
        ops_per_function=ops,
        weight_bytes=wbytes,
        package_bytes=_dir_bytes(out_path),
        problems=problems,
        seconds=time.perf_counter() - t0,
    )


def _write_metadata(pkg: Path, spec: ProgramSpec, layout: str, chunks) -> None:
    """Record what the program computes in the model's user-defined metadata."""
    from coremltools.proto import Model_pb2

    f = _model_file(pkg)
    m = Model_pb2.Model()
    m.ParseFromString(f.read_bytes())
    meta = dict(spec.describe(), layout=layout, input=INPUT_NAME, output=OUTPUT_NAME,
                input_layout=INPUT_LAYOUT, h_chunks=[list(c) for c in chunks])
    m.description.metadata.userDefined["npumoe.program"] = json.dumps(meta)
    m.description.metadata.shortDescription = (
        f"npumoe expert program {spec.name}: tiers {list(spec.tiers)}"
    )
    f.write_bytes(m.SerializeToString())


def read_metadata(pkg) -> dict:
    """The `spec.describe()` dict stored by `build_package` (plus layout, io names)."""
    from coremltools.proto import Model_pb2

    m = Model_pb2.Model()
    m.ParseFromString(_model_file(Path(pkg)).read_bytes())
    raw = m.description.metadata.userDefined.get("npumoe.program")
    if raw is None:
        raise ValueError(f"{pkg} is not an npumoe expert program (no metadata)")
    return json.loads(raw)
