"""A numpy interpreter for the MIL ops our programs use, to verify saved packages anywhere.

Core ML runs only on macOS, and MIL ops' `value_inference` is constant folding (no
conv, no silu), so this module loads the SAVED .mlpackage back (model protobuf +
weight blob -> pymil Program, the same loader `save_multifunction` uses) and executes
each function op by op with numpy. Float results are rounded to fp16 after every op
(fp16 storage, fp32 arithmetic inside an op), constexpr dequantization included. An op
it does not know raises `UnsupportedOp` naming it: nothing passes silently.
"""

import math
from pathlib import Path
from typing import Callable, Dict

import numpy as np

from .spec import INPUT_NAME, ProgramSpec, function_name, reference_ffn


class UnsupportedOp(NotImplementedError):
    pass


def load_package(path):
    """The saved .mlpackage as a pymil Program (all functions), weights read from disk."""
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto import load as milproto

    path = Path(path)
    spec = ct.utils.load_spec(str(path))
    if spec.WhichOneof("Type") != "mlProgram":
        raise ValueError(f"{path} is not an ML Program")
    weights = path / "Data" / "com.apple.CoreML" / "weights"
    return milproto.load(spec, spec.specificationVersion, str(weights))


# ---- op implementations: f(op, arg) -> output array(s); arg(name) -> input value ----


def _f32(a):
    return np.asarray(a, np.float32)


def _batched(a, b):
    """np.matmul(a, b) over leading batch axes, each batch's slices made fp32 on their own:
    a whole fp16 weight stack copied to fp32 at once is GBs at gpt-oss / Mixtral sizes."""
    lead = np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    a = np.broadcast_to(a, lead + a.shape[-2:])
    b = np.broadcast_to(b, lead + b.shape[-2:])
    out = np.empty(lead + (a.shape[-2], b.shape[-1]), np.float32)
    for i in np.ndindex(*lead):
        out[i] = _f32(a[i]) @ _f32(b[i])
    return out


def _conv(op, arg):
    x, w = _f32(arg("x")), np.asarray(arg("weight"))
    groups = int(arg("groups", 1))
    for key, ok in (("strides", 1), ("dilations", 1)):
        v = arg(key, None)
        if v is not None and any(int(s) != ok for s in np.ravel(v)):
            raise UnsupportedOp(f"milrun: conv {op.name!r} with {key}={list(v)}")
    pad = arg("pad", None)
    if (pad is not None and np.any(np.asarray(pad) != 0)) or tuple(w.shape[2:]) != (1, 1):
        raise UnsupportedOp(
            f"milrun: conv {op.name!r} supports only 1x1 kernels without padding, "
            f"got weight {w.shape}, pad {pad}"
        )
    if x.ndim != 4:
        raise UnsupportedOp(f"milrun: conv {op.name!r} on rank {x.ndim} input")
    B, Cin, Hs, Ws = x.shape
    Cout = w.shape[0]
    xg = x.reshape(B, groups, Cin // groups, Hs * Ws)  # (B, g, cin, S)
    wg = w.reshape(groups, Cout // groups, Cin // groups)  # (g, cout, cin)
    y = _batched(wg[None], xg).reshape(B, Cout, Hs, Ws)  # BLAS per group
    b = arg("bias", None)
    if b is not None:
        y = y + _f32(b)[None, :, None, None]
    return y


def _matmul(op, arg):
    x, y = np.asarray(arg("x")), np.asarray(arg("y"))
    if arg("transpose_x", False):
        x = np.swapaxes(x, -1, -2)
    if arg("transpose_y", False):
        y = np.swapaxes(y, -1, -2)
    if min(x.ndim, y.ndim) < 2 or max(x.ndim, y.ndim) < 3:
        return np.matmul(_f32(x), _f32(y))
    return _batched(x, y)


def _linear(op, arg):
    y = _f32(arg("x")) @ _f32(arg("weight")).T
    b = arg("bias", None)
    return y if b is None else y + _f32(b)


def _shift_scale(op, arg):
    """constexpr_blockwise_shift_scale: scale * (data - offset), blocks implied by shapes."""
    data = np.asarray(arg("data")).astype(np.float32)
    scale = _f32(arg("scale"))
    off = arg("offset", None)

    def expand(a):
        if all(m in (1, n) for n, m in zip(data.shape, a.shape)):
            return a  # per channel / per tensor: plain broadcasting
        for axis, (n, m) in enumerate(zip(data.shape, a.shape)):
            if n != m:
                a = np.repeat(a, n // m, axis=axis)
        return a

    if off is not None:
        data -= expand(_f32(off))  # in place: one fp32 copy of the weight, not three
    data *= expand(scale)
    return data


def _lut_to_dense(op, arg):
    """constexpr_lut_to_dense (iOS18), scalar palettes: indices (K axes), lut (K + 2 axes):
    lut.shape[i] tables along axis i (each over indices.shape[i] / lut.shape[i] entries),
    then (2**bits, 1). Each element reads its own table's entry at its index."""
    idx = np.asarray(arg("indices")).astype(np.int64)
    lut = _f32(arg("lut"))
    K = idx.ndim
    if lut.ndim != K + 2 or lut.shape[-1] != 1:
        raise UnsupportedOp(f"milrun: {op.name!r}: only scalar palettes (vector size 1), got lut {lut.shape}")
    n_c = lut.shape[-2]
    table = np.zeros((1,) * K, np.int64)  # flat table number of every element, broadcast per axis
    for axis in range(K):
        n, t = idx.shape[axis], lut.shape[axis]
        shape = [1] * K
        shape[axis] = n
        table = table * t + (np.arange(n) // (n // t)).reshape(shape)
    return lut.reshape(-1)[table * n_c + idx]


def _affine_dequantize(op, arg):
    q = np.asarray(arg("quantized_data")).astype(np.float32)
    axis = int(arg("axis"))
    shape = [1] * q.ndim
    shape[axis] = -1
    zp = np.asarray(arg("zero_point")).astype(np.float32)
    s = _f32(arg("scale"))
    zp = zp.reshape(shape) if zp.ndim == 1 else zp
    s = s.reshape(shape) if s.ndim == 1 else s
    return (q - zp) * s


def _sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * x))


_erf = np.vectorize(math.erf, otypes=[np.float64])


def _gelu(op, arg):
    x = _f32(arg("x")).astype(np.float64)
    mode = arg("mode", "EXACT")
    if mode == "EXACT":
        return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))
    if mode == "TANH_APPROXIMATION":
        return 0.5 * x * (1.0 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    if mode == "SIGMOID_APPROXIMATION":
        return x * _sigmoid(1.702 * x)
    raise UnsupportedOp(f"milrun: gelu {op.name!r} mode {mode!r}")


def _split(op, arg):
    x = np.asarray(arg("x"))
    axis = int(arg("axis"))
    sizes = arg("split_sizes", None)
    if sizes is not None:
        return np.split(x, np.cumsum(np.asarray(sizes))[:-1], axis=axis)
    return np.split(x, int(arg("num_splits")), axis=axis)


def _slice_by_index(op, arg):
    x = np.asarray(arg("x"))
    begin, end = np.asarray(arg("begin")), np.asarray(arg("end"))
    stride = arg("stride", None)
    stride = np.ones(x.ndim, int) if stride is None else np.asarray(stride)
    bmask = arg("begin_mask", None)
    emask = arg("end_mask", None)
    smask = arg("squeeze_mask", None)
    idx = []
    for i in range(x.ndim):
        b = None if bmask is not None and bmask[i] else int(begin[i])
        e = None if emask is not None and emask[i] else int(end[i])
        if smask is not None and smask[i]:
            idx.append(int(begin[i]))
        else:
            idx.append(slice(b, e, int(stride[i])))
    return x[tuple(idx)]


def _binary(fn):
    return lambda op, arg: fn(_f32(arg("x")), _f32(arg("y")))


def _unary(fn):
    return lambda op, arg: fn(_f32(arg("x")))


def _axes(op, arg, key):
    v = arg(key, None)
    return None if v is None else tuple(int(a) for a in np.ravel(v))


OPS: Dict[str, Callable] = {
    "conv": _conv,
    "matmul": _matmul,
    "linear": _linear,
    "constexpr_blockwise_shift_scale": _shift_scale,
    "constexpr_affine_dequantize": _affine_dequantize,
    "constexpr_lut_to_dense": _lut_to_dense,
    "add": _binary(np.add),
    "sub": _binary(np.subtract),
    "mul": _binary(np.multiply),
    "real_div": _binary(np.divide),
    "maximum": _binary(np.maximum),
    "minimum": _binary(np.minimum),
    "clip": lambda op, arg: np.clip(_f32(arg("x")), float(arg("alpha")), float(arg("beta"))),
    "sigmoid": _unary(_sigmoid),
    "silu": _unary(lambda x: x * _sigmoid(x)),
    "tanh": _unary(np.tanh),
    "relu": _unary(lambda x: np.maximum(x, 0)),
    "erf": _unary(lambda x: _erf(x.astype(np.float64))),
    "gelu": _gelu,
    "identity": lambda op, arg: np.asarray(arg("x")),
    "reshape": lambda op, arg: np.reshape(
        np.asarray(arg("x")), [int(s) for s in np.ravel(arg("shape"))]
    ),
    "transpose": lambda op, arg: np.transpose(np.asarray(arg("x")), _axes(op, arg, "perm")),
    "squeeze": lambda op, arg: np.squeeze(np.asarray(arg("x")), _axes(op, arg, "axes")),
    "expand_dims": lambda op, arg: np.expand_dims(np.asarray(arg("x")), _axes(op, arg, "axes")),
    "concat": lambda op, arg: np.concatenate(
        [np.asarray(v) for v in arg("values")], axis=int(arg("axis"))
    ),
    "split": _split,
    "slice_by_index": _slice_by_index,
}


def _to_storage(value, var):
    """Round float results to the var's storage dtype (fp16 in our programs)."""
    from coremltools.converters.mil.mil import types

    if not isinstance(value, np.ndarray) and not np.isscalar(value):
        return value
    if var.dtype == types.fp16:
        return np.asarray(value, np.float32).astype(np.float16)
    if var.dtype == types.fp32:
        return np.asarray(value, np.float32)
    return value


def run_function(prog, function: str, inputs: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Execute one function of a pymil Program with numpy; returns its outputs by name."""
    from coremltools.converters.mil.mil import types

    if function not in prog.functions:
        raise KeyError(f"no function {function!r} (have {list(prog.functions)})")
    func = prog.functions[function]
    env = {}
    for name, var in func.inputs.items():
        if name not in inputs:
            raise KeyError(f"missing input {name!r}")
        x = np.asarray(inputs[name])
        if tuple(x.shape) != tuple(var.shape):
            raise ValueError(f"input {name!r} is {x.shape}, function wants {var.shape}")
        env[var.name] = _to_storage(x, var)

    # free each value after its last reader (a GB of dequantized weights at Mixtral sizes)
    last = {}
    for i, op in enumerate(func.operations):
        for v in op.inputs.values():
            for u in v if isinstance(v, (list, tuple)) else (v,):
                last[u.name] = i
    keep = {v.name for v in func.outputs}
    for i, op in enumerate(func.operations):
        for name in [n for n, j in last.items() if j == i - 1 and n not in keep]:
            env.pop(name, None)
        if op.op_type == "const":
            env[op.outputs[0].name] = op.outputs[0].val
            continue
        impl = OPS.get(op.op_type)
        if impl is None:
            raise UnsupportedOp(
                f"milrun: no numpy implementation for op '{op.op_type}' ({op.name!r})"
            )

        def arg(key, default=KeyError, _op=op):
            if key not in _op.inputs:
                if default is KeyError:
                    raise UnsupportedOp(f"milrun: op {_op.name!r} lacks input {key!r}")
                return default
            v = _op.inputs[key]
            if isinstance(v, (list, tuple)):
                return [env[u.name] for u in v]
            return env[v.name]

        out = impl(op, arg)
        outs = out if isinstance(out, list) else [out]
        if len(outs) != len(op.outputs):
            raise UnsupportedOp(f"milrun: op {op.name!r} gave {len(outs)} outputs")
        for var, val in zip(op.outputs, outs):
            val = _to_storage(val, var)
            if types.is_tensor(var.sym_type) and tuple(np.shape(val)) != tuple(var.shape):
                raise AssertionError(
                    f"milrun: op {op.name!r} ({op.op_type}) produced {np.shape(val)}, "
                    f"program says {var.shape}"
                )
            env[var.name] = val
    return {v.name: env[v.name] for v in func.outputs}


def rel_err(y, ref) -> float:
    """||y - ref|| / ||ref|| in float64."""
    y, ref = np.asarray(y, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(y - ref) / max(np.linalg.norm(ref), 1e-30))


def verify_package(path, spec: ProgramSpec, *, tol=1e-2, seed=0, x_scale=1.0) -> dict:
    """Run every tier function of the saved package with numpy and compare to reference_ffn.

    Returns {"functions": {name: {"tier", "rel_err", "ops"}}, "max_rel_err", "ok"}.
    Missing tier functions, non-finite outputs and unknown ops raise.
    """

    prog = load_package(path)
    rng = np.random.default_rng(seed)
    top = max(spec.tiers)
    # rows are independent: one input at the largest tier, each tier takes a prefix
    x = (rng.standard_normal((spec.G, top, spec.D)) * x_scale).astype(np.float16)
    ref = reference_ffn(spec, x.astype(np.float64))
    report, worst = {}, 0.0
    for tier in spec.tiers:
        name = function_name(tier)
        xt = np.ascontiguousarray(x[:, :tier].transpose(0, 2, 1))  # the program takes (G, D, C)
        (y,) = run_function(prog, name, {INPUT_NAME: xt}).values()
        y = np.asarray(y).transpose(0, 2, 1)
        if not np.all(np.isfinite(np.asarray(y, np.float32))):
            raise FloatingPointError(f"{path}: function {name} produced non-finite values")
        err = rel_err(y, ref[:, :tier])
        ops = sum(op.op_type != "const" for op in prog.functions[name].operations)
        report[name] = {"tier": tier, "rel_err": err, "ops": ops}
        worst = max(worst, err)
    return {"functions": report, "max_rel_err": worst, "ok": worst <= tol, "tol": tol}


def max_rel_err(y, ref) -> float:
    """max |y - ref| / max |ref| (the measure npumoe's build and load checks use)."""
    y, ref = np.asarray(y, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(y - ref).max() / max(float(np.abs(ref).max()), 1e-30))


def format_error(path, spec: ProgramSpec, *, rows: int = 8, seed: int = 0) -> float:
    """Max relative error of the saved package's smallest tier on `rows` seeded rows per
    expert against `reference_ffn` on the spec's own weights (the model's experts, whatever
    format the package stores them in)."""

    tier = min(spec.tiers)
    rows = min(rows, tier)
    x = np.random.default_rng(seed).standard_normal((spec.G, rows, spec.D)).astype(np.float32)
    xt = np.zeros((spec.G, spec.D, tier), np.float32)
    xt[:, :, :rows] = x.transpose(0, 2, 1)
    (y,) = run_function(load_package(path), function_name(tier), {INPUT_NAME: xt}).values()
    y = np.asarray(y, np.float32)[:, :, :rows].transpose(0, 2, 1)
    if not np.all(np.isfinite(y)):
        return float("inf")
    return max_rel_err(y, reference_ffn(spec, x, dtype=np.float32))  # fp32: far below the tolerances
