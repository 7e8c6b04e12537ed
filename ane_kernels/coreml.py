"""ProgramSpec -> Core ML ML Program: one multifunction .mlpackage, one function per tier.

Layout ("conv", the default). Apple's ANE guidance is channels-first (B, C, 1, S)
with linears as 1x1 convolutions and the sequence axis last (>= 32 fp16 = one
64-byte row); that is the shape the ANE compiler maps best. G experts become ONE
grouped 1x1 conv (`groups=G`): input channels are the G experts' D-vectors
side by side, so each expert only sees its own rows and the whole group is one
large op (grouping is what NPUMoE found to pay most). Gate and up are fused into
one conv weight (per expert [gate_g; up_g]), so a function is:

    x (G, C, D) -> transpose, reshape -> (1, G*D, 1, C)
    conv(groups=G, W_gu (G*2H, D, 1, 1)) -> (1, G*2H, 1, C) -> (G, 2, H, C) -> gate, up
    act(up, gate) (G, 1, H, C) -> (1, G*H, 1, C)
    conv(groups=G, W_down (G*D, H, 1, 1)) -> (1, G*D, 1, C) -> (G, C, D)

The channel axes are G*D and G*2H; when those exceed the per-axis limit (16384 on
older chips) use layout "matmul": a batched matmul x (G, C, D) @ W (G, 2H, D)^T whose
largest axis is max(C, D, 2H).

Weights are fp16 constants; MLX affine 4/8-bit (and 2-bit) weights stay compressed
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
from typing import Dict, List

import numpy as np

from .limits import DEFAULT_LIMITS, Limits, check_program, check_spec, require
from .spec import AffineWeight, ProgramSpec, Weight, fuse_rows

LAYOUTS = ("conv", "matmul")
INPUT_NAME = "x"
OUTPUT_NAME = "y"
FP16_MAX = 65504.0
FP16_SATURATION = 32759.0  # ANE matmul/conv outputs saturate to inf near here (ANEForge op quirks: fp16max/2)


def function_name(tier: int) -> str:
    return f"c{tier}"


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


def _const_weight(mb, w: Weight, shape4):
    """A weight (G, out, in) as a (possibly compressed) constant of shape `shape4`.

    For the conv layout shape4 is (G*out, in, 1, 1); for matmul (G, out, in).
    """
    if isinstance(w, AffineWeight):
        q, s, off = _affine_to_shift_scale(w)
        G, out, n_groups = s.shape
        if len(shape4) == 4:
            q = q.reshape(G * out, -1, 1, 1)
            s = s.reshape(G * out, n_groups, 1, 1)
            off = off.reshape(G * out, n_groups, 1, 1)
        return mb.constexpr_blockwise_shift_scale(data=q, scale=s, offset=off)
    return np.ascontiguousarray(np.asarray(w, np.float32).reshape(shape4).astype(np.float16))


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


def build_program(spec: ProgramSpec, tier: int, layout: str = "conv"):
    """A single-function pymil Program for one tier: x (G, C, D) fp16 -> y (G, C, D) fp16."""
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r} (known: {', '.join(LAYOUTS)})")
    G, C, D, H = spec.G, int(tier), spec.D, spec.H
    w_gu = fuse_rows(spec.gate, spec.up)  # (G, 2H, D), per expert [gate; up]
    b_gu = _bias(spec.gate_bias, spec.up_bias, G, H)  # (G, 2H) or None
    b_d = None if spec.down_bias is None else np.asarray(spec.down_bias, np.float32)

    @mb.program(
        input_specs=[mb.TensorSpec(shape=(G, C, D), dtype=types.fp16)],
        opset_version=ct.target.iOS18,
    )
    def prog(x):
        if layout == "conv":
            h = mb.transpose(x=x, perm=[0, 2, 1])  # (G, D, C)
            h = mb.reshape(x=h, shape=[1, G * D, 1, C])
            kw = {} if b_gu is None else {"bias": b_gu.reshape(-1).astype(np.float16)}
            h = mb.conv(
                x=h, weight=_const_weight(mb, w_gu, (G * 2 * H, D, 1, 1)), groups=G, **kw
            )  # (1, G*2H, 1, C)
            h = mb.reshape(x=h, shape=[G, 2, H, C])
            gate, up = mb.split(x=h, num_splits=2, axis=1)  # (G, 1, H, C) each
            a = _activation(mb, up, gate, spec)
            a = mb.reshape(x=a, shape=[1, G * H, 1, C])
            kw = {} if b_d is None else {"bias": b_d.reshape(-1).astype(np.float16)}
            y = mb.conv(
                x=a, weight=_const_weight(mb, spec.down, (G * D, H, 1, 1)), groups=G, **kw
            )  # (1, G*D, 1, C)
            y = mb.reshape(x=y, shape=[G, D, C])
            return mb.transpose(x=y, perm=[0, 2, 1], name=OUTPUT_NAME)
        # layout == "matmul": batched over experts, weights (G, out, in) as MLX stores them
        h = mb.matmul(x=x, y=_const_weight(mb, w_gu, (G, 2 * H, D)), transpose_y=True)
        if b_gu is not None:
            h = mb.add(x=h, y=b_gu[:, None, :].astype(np.float16))
        gate, up = mb.split(x=h, num_splits=2, axis=2)  # (G, C, H) each
        a = _activation(mb, up, gate, spec)
        y = mb.matmul(x=a, y=_const_weight(mb, spec.down, (G, D, H)), transpose_y=True)
        if b_d is not None:
            return mb.add(x=y, y=b_d[:, None, :].astype(np.float16), name=OUTPUT_NAME)
        return mb.identity(x=y, name=OUTPUT_NAME)

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
    for tier in spec.tiers:
        progs[function_name(tier)] = prog = build_program(spec, tier, layout)
        problems += check_program(prog, limits)
    if layout == "conv" and any(" axis " in p for p in problems):
        problems.append(
            f"hint: the conv layout puts G*D={spec.G * spec.D} and G*2H={spec.G * 2 * spec.H} "
            "on the channel axis; use layout='matmul' or fewer experts per group"
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
        _write_metadata(final, spec, layout)
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


def _write_metadata(pkg: Path, spec: ProgramSpec, layout: str) -> None:
    """Record what the program computes in the model's user-defined metadata."""
    from coremltools.proto import Model_pb2

    f = _model_file(pkg)
    m = Model_pb2.Model()
    m.ParseFromString(f.read_bytes())
    meta = dict(spec.describe(), layout=layout, input=INPUT_NAME, output=OUTPUT_NAME)
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
