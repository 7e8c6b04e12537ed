"""What an offloaded expert block checks before its executor runs.

Programs bake in the weights they were built from, and run outside MLX's graph.
So before each call the block makes sure that:

- the weights are still the ones the programs were built from: the identity of
  every array and submodule under the block is recorded at install and compared
  on each call (a few ``is`` checks, no hashing). ``model.update``,
  ``load_weights``, ``nn.quantize``, ``set_dtype`` and LoRA all replace arrays or
  submodules; a replacement that shares the recorded array's buffer (the copies
  ``nn.value_and_grad`` and ``mx.compile`` put in place) keeps the programs.
  A real change sends the block to stock MLX for good, with one notice per model
  naming the command that rebuilds the programs;
- gradients are right: a result the programs computed enters the graph through
  ``mx.custom_function``, whose backward is stock MLX's (recomputed), so
  ``mx.grad``/``nn.value_and_grad``/``mx.vjp`` see the true derivative (calls the
  executor keeps on MLX carry MLX's own graph and need nothing);
- transforms that forbid reading arrays (``mx.compile``, ``mx.vmap``) get stock
  MLX: the executor's host sync raises MLX's refusal before it changes any
  state, and the call is redone on MLX.
"""

from dataclasses import dataclass, field
from typing import Callable, List, Optional

import mlx.core as mx
import numpy as np

from ..log import get as _get_log

_log = _get_log(__name__)

# MLX's refusals to read an array inside compile/vmap (eval) or any transform (async_eval).
_REFUSALS = ("during function transformations", "inside a graph transformation")
_HALF = (mx.float16, mx.bfloat16)


def is_transform_refusal(err: BaseException) -> bool:
    """True for MLX's "[eval] Attempting to eval an array during function transformations"."""
    return isinstance(err, ValueError) and any(r in str(err) for r in _REFUSALS)


def cpu_half_error(block: str, linears) -> Optional[str]:
    """The one-line message for float16/bfloat16 SwitchLinear weights on MLX's CPU, else None.

    MLX's CPU ``gather_mm`` is float32-only; Metal runs half precision fine.
    """
    for lin in linears:
        if isinstance(lin, dict) and isinstance(lin.get("linear"), dict):  # LoRA around it
            lin = lin["linear"]
        w = lin.get("weight") if isinstance(lin, dict) and "scales" not in lin else None
        if isinstance(w, mx.array) and w.dtype in _HALF and mx.default_device().type == mx.DeviceType.cpu:
            name = str(w.dtype).split(".")[-1]
            return (
                f"{block}: {name} expert weights need MLX's GPU (Metal); on CPU use a float32 or "
                f"quantized model: model.set_dtype(mx.float32) or nn.quantize(model), or convert it "
                f"with `mlx_lm.convert --dtype float32` or `mlx_lm.convert -q`"
            )
    return None


@dataclass
class Notice:
    """One notice per installed model, however many blocks find their weights changed."""

    rebuild: str  # e.g. "npumoe build --model M --backend onnx --force"
    shown: bool = False

    def show(self, where: str) -> None:
        if self.shown:
            return
        self.shown = True
        _log.warning(
            f"{where}: expert weights changed since the programs were built (update, "
            f"load_weights, quantize, set_dtype or LoRA replaced them); the offloaded layers run on "
            f"stock MLX from now on; rebuild the programs with `{self.rebuild}`"
        )


def _snapshot(tree, out: list) -> list:
    """(container, None, len) and (container, key, value) for everything under a module."""
    out.append((tree, None, len(tree)))
    for k, v in (tree.items() if isinstance(tree, dict) else enumerate(tree)):
        out.append((tree, k, v))
        if isinstance(v, (dict, list)):
            _snapshot(v, out)
    return out


def _buffer(a: mx.array):
    """(address, strides) of an array's data; evaluates it (raises inside compile/vmap)."""
    if a.dtype == mx.bfloat16:  # numpy has no bfloat16: look at the same bytes as uint16
        a = a.view(mx.uint16)
    n = np.asarray(a)
    return n.__array_interface__["data"][0], n.strides


def _same_data(c, k, old) -> bool:
    """True if ``c[k]`` is an array over the very memory of ``old`` (kept alive by the record)."""
    if k is None or not isinstance(old, mx.array):
        return False
    try:
        new = c[k]
    except (KeyError, IndexError):
        return False
    return (isinstance(new, mx.array) and new.shape == old.shape and new.dtype == old.dtype
            and _buffer(new) == _buffer(old))


@dataclass
class BakedWeights:
    """The arrays and submodules a block's programs were built from, by identity."""

    where: str  # "layer 3 (model.layers.3.mlp.switch_mlp)"
    notice: Notice
    entries: list = field(default_factory=list)
    # (container, key) of arrays replaced by same-buffer copies: they may be a
    # transform's tracers, so they go through the custom vjp as inputs.
    traced: list = field(default_factory=list)
    stale: bool = False

    @classmethod
    def record(cls, module, where: str, notice: Notice) -> "BakedWeights":
        return cls(where, notice, _snapshot(module, []))

    def _changed(self) -> list:
        """Entries whose value is no longer the recorded one (a length change counts)."""
        out = []
        for c, k, v in self.entries:
            if k is None:
                if len(c) != v:
                    out.append((c, k, v))
                continue
            try:
                now = c[k]
            except (KeyError, IndexError):
                out.append((c, k, v))
                continue
            if now is not v:
                out.append((c, k, v))
        return out

    def check(self, module, executor=None) -> bool:
        """True if the programs still compute this block. Raises MLX's refusal inside
        compile/vmap when it has to read arrays to tell (the caller then uses MLX)."""
        if self.stale:
            return False
        changed = self._changed()
        if not changed:
            return True
        if all(_same_data(c, k, v) for c, k, v in changed):
            # copies over the same memory (a transform's tracers, compile's state): keep going
            for c, k, _ in changed:
                if not any(c is c2 and k == k2 for c2, k2 in self.traced):
                    self.traced.append((c, k))
            self.entries = _snapshot(module, [])
            return True
        self.stale, self.entries, self.traced = True, [], []  # drop the references to the old weights
        stats = getattr(executor, "stats", None)
        if stats is not None and hasattr(stats, "fallback"):
            stats.fallback = "expert weights changed since the programs were built"
        self.notice.show(self.where)
        return False


def with_mlx_grad(module, traced: List, stock: Callable, y: mx.array, x: mx.array, *rest) -> mx.array:
    """``y`` (the programs' ``module(x, *rest)``) in the graph with stock MLX's backward.

    Cotangents flow to ``x`` and to the arrays in ``traced`` (the only ones a
    transform can be differentiating: every other array is the one recorded at
    install, which no transform has replaced). The backward recomputes the
    block's forward on MLX.
    """
    slots = [(c, k) for c, k in traced if isinstance(c[k], mx.array)]

    @mx.custom_function
    def f(x, *params):
        return y

    def g(x, *ps):  # the block on stock MLX, with the traced arrays set to ``ps``
        old = [c[k] for c, k in slots]
        try:
            for (c, k), p in zip(slots, ps):
                c[k] = p
            return stock(module, x, *rest)
        finally:
            for (c, k), p in zip(slots, old):
                c[k] = p

    @f.vjp
    def f_vjp(primals, cotangent, output):
        one = isinstance(primals, mx.array)  # MLX passes and wants a bare array for one input
        _, grads = mx.vjp(g, [primals] if one else list(primals), [cotangent])
        return grads[0] if one else tuple(grads)

    @f.jvp
    def f_jvp(primals, tangents):
        one = isinstance(primals, mx.array)
        _, (out,) = mx.jvp(g, [primals] if one else list(primals), [tangents] if one else list(tangents))
        return out

    return f(x, *[c[k] for c, k in slots])
