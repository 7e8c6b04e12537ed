"""Release MLX's copy of the experts only programs serve; reload it from the safetensors on demand.

An onnx bundle holds the weights of the experts it offloads. For a layer whose program
experts run on programs at every call size (``residency.program_only``), MLX's copy is
dead weight, so ``release_model``:

- checks each stacked ``(E, ...)`` array of the SwitchGLU (``weight``, ``scales``,
  ``biases``, ``bias`` of gate/up/down) equal, byte for byte, to the tensor of the same
  key in the model's safetensors (read as ``mlx_lm.utils.load_model`` does: every
  ``model*.safetensors``, then ``model.sanitize``);
- puts in its place that tensor loaded lazily by ``mx.load``: same key, shape and dtype
  (``parameters()``, ``save_weights`` and the guard see the same tree), no memory until
  something evaluates it;
- keeps the experts MLX still runs (cold ones) as a compact copy, their rows only, in a
  twin SwitchGLU outside the parameter tree, with ``remap`` (E,) from expert id to row.

``stock_call`` (what ``experts.stock_experts`` runs for a released block) serves calls that
touch only MLX-resident experts on the twin; any call that needs a released expert on MLX
(a program fault, gradients, compile/vmap, ``remove``, a weight check) reloads the layer:
evaluating the lazy arrays reads back the very bytes checked at release. The model's
weight files must stay in place while a model is loaded with released experts (as with
``mlx_lm.load(lazy=True)``).
"""

import glob
import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np
from mlx_lm.models.switch_layers import SwitchGLU

from ..log import get as _get_log
from . import guard, heap

_log = _get_log(__name__)

PROJ = ("gate_proj", "up_proj", "down_proj")
_RECORD = "_npumoe_released"
LOADED_LAZILY = "_npumoe_loaded_lazily"  # set on a model by ``load`` between its lazy read and the install
RELEASED = "_npumoe_released_layers"  # on a model: {layer: Released} of its last ``release_model``


@dataclass
class Released:
    """What was released from one expert block, and what MLX still holds of it."""

    layer: int
    ids: List[int]  # released expert ids (programs serve them)
    resident: np.ndarray  # (E,) bool: experts MLX still holds (in the twin)
    remap: mx.array  # (E,) uint32: expert id -> row of the twin's arrays (0 for released ones)
    twin: Optional[SwitchGLU]  # the resident experts only; None when every expert is released
    lazy: List[tuple] = field(default_factory=list)  # (module, key, lazy array) now in the tree
    nbytes: int = 0  # bytes MLX no longer holds
    source: str = ""  # the model folder the lazy arrays read from

    def intact(self) -> bool:
        """True while the block still holds the lazy arrays (nothing replaced them)."""
        return all(c.get(k) is a for c, k, a in self.lazy)


def record_of(m) -> Optional[Released]:
    """The block's release record if its released experts are still out of memory, else None."""
    rec = m.__dict__.get(_RECORD) if hasattr(m, "__dict__") else None
    if rec is None:
        return None
    if not rec.intact():  # the weights were replaced (update, LoRA, a transform): plain MLX from now on
        m.__dict__.pop(_RECORD, None)
        return None
    return rec


def released_bytes(model) -> int:
    """Bytes of expert weights MLX does not hold now (released and not reloaded)."""
    return sum(r.nbytes for _, m in model.named_modules() if (r := record_of(m)) is not None)


def file_tensors(model, model_path) -> Dict[str, mx.array]:
    """Every weight of the model's safetensors, loaded lazily and sanitized as mlx_lm loads them."""
    files = sorted(glob.glob(str(Path(model_path) / "model*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no model*.safetensors in {model_path}")
    weights = {}
    for f in files:
        weights.update(mx.load(f))
    if hasattr(model, "sanitize"):
        weights = model.sanitize(weights)
    return weights


def _arrays(m) -> List[Tuple[object, str, str, mx.array]]:
    """(module, proj name, key, array) of the stacked arrays of a SwitchGLU's projections."""
    out = []
    for p in PROJ:
        lin = m.get(p)
        if lin is None or not hasattr(lin, "items"):
            return []
        for k, v in lin.items():
            if isinstance(v, mx.array):
                out.append((lin, p, k, v))
    return out


def _shell(obj, cls=None):
    """An empty module of ``cls`` (default ``obj``'s type) with ``obj``'s attributes, not its
    children, and not the offload's own (``_npumoe*``, ``executor``): a twin fills them in."""
    cls = cls or type(obj)
    new = cls.__new__(cls)
    dict.__init__(new)
    new.__dict__.update({k: v for k, v in obj.__dict__.items() if not k.startswith("_npumoe") and k != "executor"})
    return new


def _twin(m, keep: np.ndarray) -> SwitchGLU:
    """A SwitchGLU over the experts ``keep`` only: same classes and settings, compact arrays."""
    twin = _shell(m, SwitchGLU)
    idx = mx.array(keep.astype(np.int32))
    E = m[PROJ[0]]["weight"].shape[0]
    for key, child in m.items():
        if key not in PROJ:
            dict.__setitem__(twin, key, child)  # the activation
            continue
        lin = _shell(child)
        for k, v in child.items():
            dict.__setitem__(lin, k, v[idx] if isinstance(v, mx.array) and v.ndim >= 1 and v.shape[0] == E else v)
        dict.__setitem__(twin, key, lin)
    mx.eval(twin.parameters())
    return twin


def file_twin(m, path: str, ids: Sequence[int], tensors: Dict[str, mx.array]) -> Optional[SwitchGLU]:
    """A SwitchGLU over experts ``ids`` of block ``m`` (module path ``path``), rows ``0..len(ids)-1``,
    read from ``tensors`` (``file_tensors``) instead of ``m``'s arrays; evaluated. None if a
    stacked array is not in ``tensors``. For a lazily read model, checking a program on this
    twin reads each tensor once and frees it, where ``m``'s own lazy arrays, once evaluated,
    would keep every checked layer's whole stacked experts until the release (the load's
    RSS peak: the model's expert bytes)."""
    idx = mx.array(np.asarray(ids, np.int32))

    def rows(name, v):
        f = tensors.get(name)
        return None if f is None or f.shape != v.shape or f.dtype != v.dtype else f[idx]

    return _twin_of(m, path, rows)


def _twin_of(m, path: str, rows) -> Optional[SwitchGLU]:
    """A SwitchGLU shell of ``m`` whose stacked arrays are ``rows(name, array)`` ((G, ...) each,
    or None: no twin); evaluated."""
    arrays = _arrays(m)
    if not arrays:
        return None
    twin = _shell(m, SwitchGLU)
    lins = {}
    for key, child in m.items():
        if key not in PROJ:
            dict.__setitem__(twin, key, child)  # the activation
            continue
        lin = lins[key] = _shell(child)
        dict.__setitem__(twin, key, lin)
    for lin, p, k, v in arrays:
        r = rows(f"{path}.{p}.{k}", v)
        if r is None:
            return None
        dict.__setitem__(lins[p], k, r)
    for key, child in m.items():  # anything else the projections hold (not stacked per expert)
        if key in PROJ:
            for k, v in child.items():
                if k not in lins[key]:
                    dict.__setitem__(lins[key], k, v)
    mx.eval(twin.parameters())
    return twin


_MX = {"F32": mx.float32, "F16": mx.float16, "BF16": mx.bfloat16, "U32": mx.uint32, "U8": mx.uint8,
       "I32": mx.int32, "U16": mx.uint16, "I8": mx.int8}
_HEADERS: Dict[tuple, Dict[str, tuple]] = {}  # (file, size, mtime) -> {tensor: (file, dtype, shape, data start)}


def _tensor_index(model_path) -> Dict[str, tuple]:
    """Every tensor of the model's safetensors as saved: (file, dtype, shape, first byte)."""
    out = {}
    for f in sorted(glob.glob(str(Path(model_path) / "model*.safetensors"))):
        st = os.stat(f)
        key = (f, st.st_size, st.st_mtime_ns)
        if key not in _HEADERS:
            with open(f, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(n))
            _HEADERS[key] = {k: (f, t["dtype"], tuple(t["shape"]), 8 + n + t["data_offsets"][0])
                             for k, t in header.items() if k != "__metadata__"}
        out.update(_HEADERS[key])
    return out


def rows_twin(m, path: str, ids: Sequence[int], model_path) -> Optional[SwitchGLU]:
    """``file_twin`` read row by row: experts ``ids`` of each stacked array straight from the
    bytes of the safetensors tensor of the same name, shape and dtype (a checkpoint saved in
    mlx_lm's layout, which ``sanitize`` leaves as it is). Reads G experts, not the layer's E
    (the probe before a program's first call, verify.py); None when a tensor is not saved so."""
    arrays = _arrays(m)
    if not arrays:
        return None
    try:
        index = _tensor_index(model_path)
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        return None
    tensors = {}
    for _, p, k, v in arrays:
        name = f"{path}.{p}.{k}"
        t = index.get(name)
        if t is None or _MX.get(t[1]) != v.dtype or t[2] != tuple(v.shape):
            return None
        f, _, shape, start = t
        row = v.dtype.size * int(np.prod(shape[1:], dtype=np.int64))
        with open(f, "rb") as fh:
            data = b"".join(os.pread(fh.fileno(), row, start + int(e) * row) for e in ids)
        if len(data) != row * len(ids):
            return None
        a = mx.array(np.frombuffer(data, np.uint8)).view(v.dtype).reshape(len(ids), *shape[1:])
        tensors[name] = a
    return _twin_of(m, path, lambda name, v: tensors[name])


def release_block(m, layer: int, ids: Sequence[int], want: Dict[str, mx.array], keep_from: Dict[str, mx.array],
                  path: str, source: str = "", values: bool = True) -> Tuple[Optional[Released], str]:
    """Release experts ``ids`` of block ``m`` (module path ``path``). ``want``: the file's tensors
    to check against (each evaluated, compared, dropped; shapes and dtypes only with ``values=False``);
    ``keep_from``: a second lazy load of them, whose arrays go into the tree unevaluated.
    Returns (record, "") or (None, why not)."""
    arrays = _arrays(m)
    if not arrays:
        return None, "its projections are not stacked expert arrays"
    E = arrays[0][3].shape[0]
    if any(v.ndim < 1 or v.shape[0] != E for *_, v in arrays):
        return None, "an expert array is not stacked (E, ...)"
    names = [f"{path}.{p}.{k}" for _, p, k, _ in arrays]
    for name, (_, _, _, v) in zip(names, arrays):
        f = want.pop(name, None)
        if f is None or keep_from.get(name) is None:
            return None, f"{name} is not in the model's safetensors"
        if f.shape != v.shape or f.dtype != v.dtype or (values and not mx.array_equal(f, v).item()):
            return None, f"{name} differs from the model's safetensors (changed after loading)"
        del f  # evaluated for the check: freed here
    ids = sorted({int(e) for e in ids})
    resident = np.ones(E, bool)
    resident[ids] = False
    keep = np.nonzero(resident)[0]
    remap = np.zeros(E, np.uint32)
    remap[keep] = np.arange(keep.size, dtype=np.uint32)
    twin = _twin(m, keep) if keep.size else None
    rec = Released(layer, ids, resident, mx.array(remap), twin, source=source)
    for (lin, _, k, v), name in zip(arrays, names):
        lazy = keep_from[name]
        rec.nbytes += int(v.nbytes) * len(ids) // E
        dict.__setitem__(lin, k, lazy)
        rec.lazy.append((lin, k, lazy))
    object.__setattr__(m, _RECORD, rec)
    baked = m.__dict__.get("_npumoe_weights")
    if baked is not None:  # the guard's record held the old arrays: record the lazy ones
        object.__setattr__(m, "_npumoe_weights", guard.BakedWeights.record(m, baked.where, baked.notice))
    return rec, ""


def release_model(model, model_path, blocks: Dict[int, Tuple[object, str, Sequence[int]]],
                  log=None) -> Dict[int, Released]:
    """Release, per layer, experts ``ids`` of block ``module`` at ``path``: ``{layer: (module, path, ids)}``.
    A layer that cannot be released keeps its MLX copy and ``log`` says why."""
    if not blocks:
        return {}
    log = log or _log.warning
    # ``load`` read the model lazily from these very files a moment ago (LOADED_LAZILY): its
    # arrays are the files' tensors by construction, so only shapes and dtypes are checked
    # (the values would cost a second read of every expert).
    values = not model.__dict__.pop(LOADED_LAZILY, False)
    try:
        want, keep_from = file_tensors(model, model_path), file_tensors(model, model_path)
    except Exception as err:  # no weights on disk to reload from: keep every MLX copy
        log(f"keeping MLX's copy of the offloaded experts: cannot read the model's safetensors ({err})")
        return {}
    out = {}
    for layer in sorted(blocks):
        m, path, ids = blocks[layer]
        rec, why = release_block(m, layer, ids, want, keep_from, path, str(model_path), values)
        if rec is None:
            log(f"layer {layer}: keeping MLX's copy of its offloaded experts: {why}")
        else:
            out[layer] = rec
    del want, keep_from
    model.__dict__[RELEASED] = out  # ``materialize`` skips these without walking the model
    mx.clear_cache()  # hand the freed buffers back (MLX keeps them cached otherwise)
    heap.trim()  # and malloc's free heap pages: the program check read these experts a moment ago
    return out


def stock_call(m, rec: Released, x: mx.array, inds: mx.array) -> mx.array:
    """``SwitchGLU.__call__(m, x, inds)`` for a released block: on the twin when every routed
    expert is MLX-resident, else after reloading the released experts."""
    try:
        ids = np.array(inds)
    except ValueError as err:
        if not guard.is_transform_refusal(err):
            raise
        forget(m)  # compile/vmap: the lazy arrays enter the graph and load when it runs
        return SwitchGLU.__call__(m, x, inds)
    if rec.twin is not None and bool(rec.resident[ids.astype(np.int64)].all()):
        return SwitchGLU.__call__(rec.twin, x, rec.remap[inds])
    reload(m, "a call needs them on MLX")
    return SwitchGLU.__call__(m, x, inds)


def reload(m, why: str = "", quiet: bool = False) -> bool:
    """Read the released experts back from the safetensors (MLX holds the whole block again).
    Returns True if something was reloaded."""
    rec = record_of(m)
    m.__dict__.pop(_RECORD, None) if hasattr(m, "__dict__") else None
    if rec is None:
        return False
    mx.eval([a for _, _, a in rec.lazy])
    if not quiet:
        _log.warning(f"layer {rec.layer}: reloaded {len(rec.ids)} released experts "
                     f"({rec.nbytes / 1e6:.1f} MB) from {rec.source or 'the safetensors'}" + (f": {why}" if why else ""))
    return True


def forget(m) -> None:
    """Drop the record without reading anything (the lazy arrays load when next evaluated)."""
    if hasattr(m, "__dict__"):
        m.__dict__.pop(_RECORD, None)


def materialize(model) -> None:
    """Evaluate every parameter of ``model`` except the released experts' lazy arrays
    (``load`` reads a model lazily when it releases experts, then this)."""
    from mlx.utils import tree_flatten

    out = {id(a) for r in model.__dict__.pop(RELEASED, {}).values() for _, _, a in r.lazy}
    mx.eval([v for _, v in tree_flatten(model.parameters()) if id(v) not in out])
