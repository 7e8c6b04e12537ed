"""Find, describe and replace the expert blocks of any mlx_lm MoE model.

Every MoE family in mlx_lm calls its experts as ``y = experts(x, inds)`` with
``x: (..., D)``, ``inds: (..., k)`` and gets ``(..., k, D)`` back before the
routing weights are applied. That call is the seam: we swap the class of each
``SwitchGLU`` instance for :class:`OffloadedSwitchGLU`, which keeps the very same
``gate_proj/up_proj/down_proj`` children (so load/save keys do not change) and
hands the call to a pluggable executor. Swapping the class back removes it.
Before each call the block runs guard.py's checks: programs only while the weights
are the ones they were built from, MLX's backward under gradients, stock MLX inside
compile/vmap, and a clear message for half-precision experts on MLX's CPU.
"""

import re
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.switch_layers import (
    QuantizedSwitchLinear,
    SwitchGLU,
    SwitchLinear,
    SwitchMLP,
)

from ..hints import build_cmd
from ..log import get as _get_log
from . import guard, release

# Activation class name (as mlx_lm spells it) -> the kind a program implements.
ACTIVATIONS = {
    "SwiGLU": "swiglu",  # silu(gate) * up
    "SwigluOAI": "swiglu_oai",  # gpt-oss: clamped, (up + 1) * gate * sigmoid(1.702 gate)
    "GeGLU": "geglu",  # gelu_approx(gate) * up
}

_TOP_K_ATTRS = ("top_k", "num_experts_per_tok", "moe_topk")
_TOP_K_KEYS = ("num_experts_per_tok", "moe_topk", "top_k", "moe_k")
_SHARED_NAMES = ("shared_expert", "shared_experts", "shared_mlp")

# An executor computes ``experts(x, inds)``: (SwitchGLU, x (..., D), inds (..., k)) -> (..., k, D).
Executor = Callable[[SwitchGLU, mx.array, mx.array], mx.array]
DEFAULT_REBUILD = build_cmd("MODEL", force=True)
_log = _get_log(__name__)


@dataclass
class SharedExpert:
    path: str
    hidden: int  # H of the dense MLP (n_shared * moe_intermediate for deepseek-style)
    quant: Optional[dict] = None
    module: Optional[nn.Module] = field(default=None, repr=False, compare=False)


@dataclass
class ExpertBlock:
    """One expert module of one MoE layer, as the planner and builders see it."""

    layer: int
    path: str  # module path, e.g. "model.layers.3.mlp.switch_mlp"
    kind: str  # "SwitchGLU" | "SwitchMLP"
    num_experts: int
    top_k: Optional[int]
    dims: int  # D: model hidden size
    hidden: int  # H: expert intermediate size
    activation: str  # swiglu | swiglu_oai | geglu | the unknown class name
    bias: bool
    quant: Optional[dict]  # {"mode", "bits", "group_size"} or None
    dtype: str
    shared: List[SharedExpert] = field(default_factory=list)
    supported: bool = True
    reason: str = ""
    module: Optional[nn.Module] = field(default=None, repr=False, compare=False)
    parent: Optional[nn.Module] = field(default=None, repr=False, compare=False)  # the MoE layer (router, shared)

    def to_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k not in ("module", "parent")}
        d["shared"] = [{k: v for k, v in s.__dict__.items() if k != "module"} for s in self.shared]
        return d


def _linear_info(lin: nn.Module):
    """(out, in, quant, dtype) of a SwitchLinear / QuantizedSwitchLinear / Linear."""
    if isinstance(lin, QuantizedSwitchLinear) or hasattr(lin, "scales"):
        quant = {
            "mode": getattr(lin, "mode", "affine"),
            "bits": lin.bits,
            "group_size": lin.group_size,
        }
        out_dims = lin.weight.shape[-2]
        in_dims = lin.scales.shape[-1] * lin.group_size
        return out_dims, in_dims, quant, str(lin.scales.dtype).split(".")[-1]
    out_dims, in_dims = lin.weight.shape[-2:]
    return out_dims, in_dims, None, str(lin.weight.dtype).split(".")[-1]


def _layer_index(path: str) -> int:
    m = re.findall(r"layers\.(\d+)\.", path)
    return int(m[-1]) if m else -1


def _top_k(parent: Optional[nn.Module], config: dict) -> Optional[int]:
    for name in _TOP_K_ATTRS:
        v = getattr(parent, name, None) if parent is not None else None
        if isinstance(v, int):
            return v
    for key in _TOP_K_KEYS:
        v = config.get(key)
        if isinstance(v, int):
            return v
        if isinstance(v, list) and v:  # per-layer lists (hunyuan)
            return int(v[0])
    return None


def _shared(parent: Optional[nn.Module], parent_path: str) -> List[SharedExpert]:
    out = []
    if parent is None:
        return out
    for name in _SHARED_NAMES:
        mlp = parent.get(name) if isinstance(parent, dict) else None
        if not isinstance(mlp, nn.Module):
            continue
        lin = mlp.get("up_proj") or mlp.get("gate_proj") or mlp.get("w1")
        if lin is None:
            continue
        hidden, _, quant, _ = _linear_info(lin)
        out.append(SharedExpert(f"{parent_path}.{name}".lstrip("."), hidden, quant, mlp))
    return out


def _named_modules(model: nn.Module):
    # mlx returns them leaves-last; keep model order (layer 0 first).
    mods = model.named_modules()
    mods.sort(key=lambda kv: (_layer_index(kv[0] + "."), kv[0]))
    return mods


def find_expert_blocks(model: nn.Module, config: Optional[dict] = None) -> List[ExpertBlock]:
    """Describe every expert module (SwitchGLU, and SwitchMLP as unsupported) in layer order.

    One walk of the model: each block carries its module, its MoE layer (``parent``) and
    its shared experts' modules, so callers need not walk the model again."""
    config = config or {}
    ordered = _named_modules(model)
    mods = dict(ordered)
    blocks = []
    for path, m in ordered:
        if not isinstance(m, (SwitchGLU, SwitchMLP)):
            continue
        parent_path = path.rsplit(".", 1)[0] if "." in path else ""
        parent = mods.get(parent_path)
        if isinstance(m, SwitchGLU):
            first, second = m.gate_proj, m.down_proj
            act_name = type(m.activation).__name__
            activation = ACTIVATIONS.get(act_name, act_name)
        else:
            first, second = m.fc1, m.fc2
            activation = type(m.activation).__name__
        hidden, dims, quant, dtype = _linear_info(first)
        num_experts = first.weight.shape[0]
        blk = ExpertBlock(
            layer=_layer_index(path + "."),
            path=path,
            kind=type(m).__name__ if not isinstance(m, OffloadedSwitchGLU) else "SwitchGLU",
            num_experts=num_experts,
            top_k=_top_k(parent, config),
            dims=dims,
            hidden=hidden,
            activation=activation,
            bias="bias" in first,
            quant=quant,
            dtype=dtype,
            shared=_shared(parent, parent_path),
            module=m,
            parent=parent,
        )
        if isinstance(m, SwitchMLP):
            blk.supported, blk.reason = False, "SwitchMLP experts (no gated FFN)"
        elif activation not in ACTIVATIONS.values():
            blk.supported, blk.reason = False, f"unknown activation {act_name}"
        elif quant is not None and quant["mode"] != "affine":
            blk.supported, blk.reason = False, f"{quant['mode']} quantization"
        elif not isinstance(second, (SwitchLinear, QuantizedSwitchLinear)):
            blk.supported, blk.reason = False, f"{type(second).__name__} projections"
        blocks.append(blk)
    return blocks


class OffloadedSwitchGLU(SwitchGLU):
    """A SwitchGLU whose expert FFNs run through ``self.executor``.

    Installed by swapping the class of an existing instance: children, parameters
    and keys stay exactly those of the stock module.
    """

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        msg = guard.cpu_half_error(_where(self), (self.get("gate_proj"), self.get("up_proj"), self.get("down_proj")))
        if msg:
            raise ValueError(msg)
        return _guarded_call(self, stock_experts, x, indices)


def stock_experts(experts: SwitchGLU, x: mx.array, inds: mx.array) -> mx.array:
    """The stock mlx_lm computation, for executors that decide to stay on MLX.

    A block whose program-only experts were released from MLX (release.py) runs calls
    that touch only its MLX-resident experts on their compact copy, and reloads the
    released ones from the safetensors for any other call."""
    rec = release.record_of(experts)
    if rec is not None:
        return release.stock_call(experts, rec, x, inds)
    return SwitchGLU.__call__(experts, x, inds)


def _where(m) -> str:
    return m.__dict__.get("_npumoe_where", type(m).__name__)


def _guarded_call(m, stock, x, *rest):
    """``m.executor(m, x, *rest)`` unless that would be wrong, else ``stock(m, x, *rest)``.

    Programs (executors with ``bakes_weights``) run only while the block still
    holds the weights they were built from, and always with stock MLX's backward;
    inside compile/vmap, where reading arrays is refused, the call runs on MLX.
    """
    executor = m.executor
    baked = m.__dict__.get("_npumoe_weights")
    try:
        if baked is None:
            return executor(m, x, *rest)
        if not baked.check(m, executor):
            return stock(m, x, *rest)
        stats = getattr(executor, "stats", None)
        before = getattr(stats, "offloaded", None)
        y = executor(m, x, *rest)
        if before is not None and stats.offloaded == before:
            return y  # the executor kept this call on MLX: MLX's graph, MLX's gradient
        return guard.with_mlx_grad(m, baked.traced, stock, y, x, *rest)
    except ValueError as err:
        if not guard.is_transform_refusal(err):
            raise
        return stock(m, x, *rest)


def install(
    model: nn.Module,
    executor_for: Callable[[ExpertBlock], Optional[Executor]],
    config: Optional[dict] = None,
    quiet: bool = False,
    notice: Optional[guard.Notice] = None,
    blocks: Optional[List[ExpertBlock]] = None,
) -> List[ExpertBlock]:
    """Route every supported expert block through ``executor_for(block)``.

    Unsupported blocks (and blocks for which ``executor_for`` returns None) stay
    on stock MLX; each unsupported one gets a one-line notice on stderr.
    Executors that bake the weights in (``bakes_weights``) get the block's weights
    recorded; ``notice`` (shared by the blocks of one model) names the rebuild.
    ``blocks``: the model's ``find_expert_blocks`` when the caller has them (no second walk).
    Returns the blocks that were installed.
    """
    notice = notice or guard.Notice(DEFAULT_REBUILD)
    installed = []
    for blk in find_expert_blocks(model, config) if blocks is None else blocks:
        if not blk.supported:
            if not quiet:
                _log.warning(f"layer {blk.layer} ({blk.path}): {blk.reason}; stays on stock MLX")
            continue
        executor = executor_for(blk)
        if executor is None:
            continue
        m = blk.module
        m.__class__ = OffloadedSwitchGLU
        # A plain attribute, never a parameter: parameters() and keys are unchanged.
        object.__setattr__(m, "executor", executor)
        _record_weights(m, executor, f"layer {blk.layer} ({blk.path})", notice)
        installed.append(blk)
    return installed


def _record_weights(m: nn.Module, executor, where: str, notice: guard.Notice) -> None:
    object.__setattr__(m, "_npumoe_where", where)
    if getattr(executor, "bakes_weights", False):
        object.__setattr__(m, "_npumoe_weights", guard.BakedWeights.record(m, where, notice))
    elif "_npumoe_weights" in m.__dict__:
        object.__delattr__(m, "_npumoe_weights")


_DENSE_CLASSES = {}


def _offloaded_dense_class(cls):
    """A subclass of a family's dense MLP class whose call goes to ``self.executor``."""
    if cls not in _DENSE_CLASSES:
        _DENSE_CLASSES[cls] = type(
            f"Offloaded{cls.__name__}", (cls,),
            {
                "__call__": lambda self, x: _guarded_call(self, stock_dense, x),
                "__reduce_ex__": _reduce_dense,
                "stock_class": cls,
            },
        )
    return _DENSE_CLASSES[cls]


def _new_dense(stock_class):
    cls = _offloaded_dense_class(stock_class)
    return cls.__new__(cls)


def _reduce_dense(self, protocol):
    """Pickle by the stock class: the offloaded subclass is made at run time, not importable."""
    _, _, *rest = nn.Module.__reduce_ex__(self, protocol)
    return (_new_dense, (type(self).stock_class,), *rest)


def is_swiglu_mlp(mlp: nn.Module) -> bool:
    """True if ``mlp(x) == down(silu(gate(x)) * up(x))``: checked on numbers, not names,
    so a shared expert is offloaded only when a program computes exactly what it does."""
    if not all(isinstance(mlp.get(n), nn.Module) for n in ("gate_proj", "up_proj", "down_proj")):
        return False
    stock = getattr(type(mlp), "stock_class", type(mlp))
    up = mlp.up_proj
    D = up.weight.shape[-1] * 32 // up.bits if hasattr(up, "bits") else up.weight.shape[-1]
    x = mx.random.normal((3, D), key=mx.random.key(0))
    want = mlp.down_proj(nn.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
    got = stock.__call__(mlp, x)
    return got.shape == want.shape and bool(mx.allclose(got, want, rtol=1e-5, atol=1e-6).item())


def install_dense(mlp: nn.Module, executor, where: str = "shared expert", notice: Optional[guard.Notice] = None) -> None:
    """Route a dense MLP (a shared expert) through ``executor(mlp, x) -> y``; same keys."""
    mlp.__class__ = _offloaded_dense_class(type(mlp))
    object.__setattr__(mlp, "executor", executor)
    _record_weights(mlp, executor, where, notice or guard.Notice(DEFAULT_REBUILD))


def stock_dense(mlp: nn.Module, x: mx.array) -> mx.array:
    return type(mlp).stock_class.__call__(mlp, x)


def remove(model: nn.Module) -> int:
    """Put every offloaded block back on stock MLX (released experts read back from the
    safetensors: the very weights it had). Returns how many were removed."""
    n = 0
    for _, m in model.named_modules():
        if isinstance(m, OffloadedSwitchGLU):
            release.reload(m, quiet=True)
            m.__class__ = SwitchGLU
        elif type(m) in _DENSE_CLASSES.values():
            m.__class__ = type(m).stock_class
        else:
            continue
        for name in ("executor", "_npumoe_weights", "_npumoe_where"):
            m.__dict__.pop(name, None)
        n += 1
    return n


def installed_blocks(model: nn.Module) -> List[OffloadedSwitchGLU]:
    return [m for _, m in _named_modules(model) if isinstance(m, OffloadedSwitchGLU)]
