"""ANE constraints as code: one overridable `Limits` and the static checks every build runs.

Defaults come from public measurements (see the project's ane-constraints notes); they
differ by chip, so everything here is a field a caller can override, e.g.
`Limits(max_axis=65536)` on chips that accept larger axes.
"""

from dataclasses import dataclass, replace
from typing import FrozenSet, List

import numpy as np

# MIL ops the Neural Engine is known to execute (plus the compile-time const ops).
# Anything else in a program is reported: it would split the program or run on CPU.
ANE_OPS = frozenset(
    {
        "const",
        "constexpr_blockwise_shift_scale",
        "constexpr_affine_dequantize",
        "constexpr_lut_to_dense",
        "conv",
        "matmul",
        "linear",
        "add",
        "sub",
        "mul",
        "real_div",
        "maximum",
        "minimum",
        "clip",
        "sigmoid",
        "silu",
        "gelu",
        "tanh",
        "relu",
        "erf",
        "reshape",
        "transpose",
        "split",
        "slice_by_index",
        "concat",
        "squeeze",
        "expand_dims",
        "identity",
        "layer_norm",
        "softmax",
    }
)


@dataclass(frozen=True)
class Limits:
    """Everything the ANE is known to refuse or handle badly, in one place."""

    allowed_ops: FrozenSet[str] = ANE_OPS
    # one fp32 constant or cast can push a whole program off the ANE
    forbid_fp32: bool = True
    # per-axis size: 16384 on older chips, 65536 on newer ones
    max_axis: int = 16384
    max_rank: int = 5
    # baked weights per program: ~1-1.5 GB compiles; graphs over ~1.2 GB fell back to CPU
    max_weight_bytes: int = 1 << 30
    # MIL ops per program (const ops excluded): ~18K pass / ~21.7K fail measured on A16
    max_ops: int = 15000
    # The sequence (tier) axis is last in the ANE layout and padded to 64 bytes
    # (32 fp16): other capacities waste lanes. Set tier_multiple=1 to allow any.
    tier_multiple: int = 32
    # Core ML only offers the ANE enough work; tiny programs stay on CPU. Advisory
    # (used by planners), not a build check.
    min_reduction_depth_preferred: int = 4992

    def override(self, **kw) -> "Limits":
        return replace(self, **kw)


DEFAULT_LIMITS = Limits()


class LimitError(ValueError):
    """A program breaks one or more ANE limits; the message lists every violation."""

    def __init__(self, problems: List[str], what: str = "program"):
        self.problems = list(problems)
        super().__init__(
            f"{what} breaks {len(problems)} ANE limit(s): " + "; ".join(problems)
        )


def check_spec(spec, limits: Limits = DEFAULT_LIMITS) -> List[str]:
    """Checks that need the spec rather than the graph: tier capacities."""
    problems = []
    m = limits.tier_multiple
    for t in spec.tiers:
        if m > 1 and t % m:
            problems.append(f"tier capacity {t} is not a multiple of {m}")
        if t > limits.max_axis:
            problems.append(f"tier capacity {t} > max axis {limits.max_axis}")
    return problems


def _const_bytes(val, dtype) -> int:
    from coremltools.converters.mil.mil import types

    if not isinstance(val, np.ndarray):
        return 0
    if types.is_sub_byte(dtype):
        return (val.size * dtype.get_bitwidth() + 7) // 8
    return val.nbytes


def _inputs_of(op):
    for v in op.inputs.values():
        yield from v if isinstance(v, (list, tuple)) else (v,)


def check_program(prog, limits: Limits = DEFAULT_LIMITS) -> List[str]:
    """Static ANE checks of a pymil Program (every function); [] when it passes.

    Each message names the function, the op and the axis / size / dtype at fault.
    """
    from coremltools.converters.mil.mil import types

    problems = []
    for fname, func in prog.functions.items():
        where = f"function {fname!r}"
        n_ops, weight_bytes = 0, 0
        for name, var in func.inputs.items():
            problems += _check_var(where, f"input {name!r}", var, limits, types)
        # a constexpr op's inputs are its compressed storage, not tensors the ANE computes on:
        # constexpr_lut_to_dense's lut has rank(weight) + 2 by definition (coremltools iOS18)
        stored = {u.name for op in func.operations if op.op_type.startswith("constexpr_") for u in _inputs_of(op)}
        for op in func.operations:
            if op.op_type not in limits.allowed_ops:
                problems.append(
                    f"{where}: op {op.name!r} of type '{op.op_type}' is not on the ANE op list"
                )
            if op.op_type == "cast":
                dt = op.outputs[0].dtype
                problems.append(
                    f"{where}: cast op {op.name!r} to {types.builtin_to_string(dt)}"
                )
            if op.op_type == "const":
                out = op.outputs[0]
                weight_bytes += _const_bytes(out.val, out.dtype)
            else:
                n_ops += 1
            for v in op.outputs:
                lim = limits.override(max_rank=v.rank) if v.name in stored and v.rank > limits.max_rank else limits
                problems += _check_var(where, f"op {op.name!r} ({op.op_type})", v, lim, types)
        if n_ops > limits.max_ops:
            problems.append(f"{where}: {n_ops} ops > max {limits.max_ops}")
        if weight_bytes > limits.max_weight_bytes:
            problems.append(
                f"{where}: {weight_bytes} bytes of constants > max {limits.max_weight_bytes}"
            )
    return problems


def _check_var(where, who, var, limits, types) -> List[str]:
    problems = []
    if not types.is_tensor(var.sym_type) and not types.is_scalar(var.sym_type):
        return problems
    if limits.forbid_fp32 and var.dtype == types.fp32:
        problems.append(f"{where}: {who} output {var.name!r} is fp32 (ANE computes fp16)")
    shape = var.shape if types.is_tensor(var.sym_type) else ()
    if len(shape) > limits.max_rank:
        problems.append(f"{where}: {who} {var.name!r} has rank {len(shape)} > {limits.max_rank}")
    for axis, n in enumerate(shape):
        if isinstance(n, (int, np.integer)) and n > limits.max_axis:
            problems.append(
                f"{where}: {who} {var.name!r} axis {axis} has size {n} > {limits.max_axis}"
            )
        elif not isinstance(n, (int, np.integer)):
            problems.append(f"{where}: {who} {var.name!r} axis {axis} is dynamic ({n})")
    return problems


def require(problems: List[str], what: str = "program") -> None:
    """Raise `LimitError` listing every problem, if any."""
    if problems:
        raise LimitError(problems, what)
