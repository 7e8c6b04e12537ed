"""Bridge from mlx_lm expert modules to ane_kernels programs, and `npumoe build-programs`.

`spec_from_switch_glu` reads one group of experts out of a `SwitchGLU` (float or
MLX affine-quantized, with or without biases) into a ProgramSpec; the CLI builds that
group's static-tier programs for one layer of a model with any backend's ``build``
and checks them with its ``checker`` against the numpy reference.
"""

import argparse
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import mlx.core as mx
import numpy as np
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchGLU

from ane_kernels.formats import DEFAULT_FORMAT, TOLERANCE as FORMAT_TOLERANCE, WEIGHT_FORMATS
from ane_kernels.limits import DEFAULT_LIMITS, LimitError
from ane_kernels.milrun import rel_err
from ane_kernels.spec import AffineWeight, ProgramSpec, reference_ffn

from ..backends import BACKENDS, BackendError, backend_class, registry
from ..hints import one_line
from ..runtime.experts import ACTIVATIONS, find_expert_blocks


def _np(a: mx.array, dtype=None) -> np.ndarray:
    """MLX -> numpy; bfloat16 (which numpy lacks) goes through float32."""
    if a.dtype == mx.bfloat16 or (dtype is not None and a.dtype != dtype):
        a = a.astype(dtype or mx.float32)
    return np.array(a)


def _weight(lin, ids: mx.array):
    """One SwitchLinear / QuantizedSwitchLinear restricted to experts `ids`."""
    if isinstance(lin, QuantizedSwitchLinear) or "scales" in lin:
        mode = getattr(lin, "mode", "affine")
        if mode != "affine" or lin.get("biases") is None:
            raise ValueError(f"{mode} quantization is not supported (MLX affine only)")
        if getattr(lin, "global_scale", None) is not None:
            raise ValueError("quantized experts with a global scale are not supported")
        w = AffineWeight(
            packed=_np(lin["weight"][ids]),
            scales=_np(lin["scales"][ids], mx.float32),
            biases=_np(lin["biases"][ids], mx.float32),
            bits=lin.bits,
            group_size=lin.group_size,
        )
    else:
        w = _np(lin["weight"][ids], mx.float32)
    bias = _np(lin["bias"][ids], mx.float32) if "bias" in lin else None
    return w, bias


def spec_from_switch_glu(
    module: SwitchGLU,
    *,
    layer: int,
    expert_ids: Sequence[int],
    tiers: Sequence[int],
    activation: Optional[str] = None,
) -> ProgramSpec:
    """ProgramSpec for experts `expert_ids` of `module` (weights copied to numpy).

    The activation comes from `type(module.activation).__name__` unless given.
    """
    act_name = type(module.activation).__name__
    if activation is None:
        if act_name not in ACTIVATIONS:
            raise ValueError(
                f"unsupported SwitchGLU activation {act_name} "
                f"(supported: {', '.join(ACTIVATIONS)})"
            )
        activation = ACTIVATIONS[act_name]
    E = module.gate_proj["weight"].shape[0]
    expert_ids = [int(e) for e in expert_ids]
    bad = [e for e in expert_ids if not 0 <= e < E]
    if bad or not expert_ids or len(set(expert_ids)) != len(expert_ids):
        raise ValueError(f"expert ids {expert_ids} must be distinct and in 0..{E - 1}")
    ids = mx.array(expert_ids)
    gate, gate_b = _weight(module.gate_proj, ids)
    up, up_b = _weight(module.up_proj, ids)
    down, down_b = _weight(module.down_proj, ids)
    G, H, D = gate.shape if isinstance(gate, AffineWeight) else gate.shape
    extra = {}
    if activation == "swiglu_oai":
        extra = {
            "alpha": float(getattr(module.activation, "_alpha", 1.702)),
            "limit": float(getattr(module.activation, "_limit", 7.0)),
        }
    return ProgramSpec(
        layer=layer,
        expert_ids=tuple(expert_ids),
        tiers=tuple(tiers),
        D=D,
        H=H,
        activation=activation,
        gate=gate,
        up=up,
        down=down,
        gate_bias=gate_b,
        up_bias=up_b,
        down_bias=down_b,
        **extra,
    )


def _dense_weight(lin):
    """nn.Linear / nn.QuantizedLinear as a one-expert stack: (1, out, in)."""
    if "scales" in lin:
        if getattr(lin, "mode", "affine") != "affine" or lin.get("biases") is None:
            raise ValueError(f"{getattr(lin, 'mode', '?')} quantization is not supported")
        w = AffineWeight(
            packed=_np(lin["weight"])[None],
            scales=_np(lin["scales"], mx.float32)[None],
            biases=_np(lin["biases"], mx.float32)[None],
            bits=lin.bits,
            group_size=lin.group_size,
        )
    else:
        w = _np(lin["weight"], mx.float32)[None]
    bias = _np(lin["bias"], mx.float32)[None] if "bias" in lin else None
    return w, bias


def spec_from_dense_mlp(
    mlp, *, layer: int, tiers: Sequence[int], activation: str = "swiglu", expert_id: int = -1
) -> ProgramSpec:
    """ProgramSpec (G = 1) for a dense gated MLP with gate_proj/up_proj/down_proj
    (a shared expert); `expert_id` -1 marks it as not a routed expert."""
    gate, gate_b = _dense_weight(mlp.gate_proj)
    up, up_b = _dense_weight(mlp.up_proj)
    down, down_b = _dense_weight(mlp.down_proj)
    _, H, D = gate.shape
    return ProgramSpec(
        layer=layer, expert_ids=(expert_id,), tiers=tuple(tiers), D=D, H=H,
        activation=activation, gate=gate, up=up, down=down,
        gate_bias=gate_b, up_bias=up_b, down_bias=down_b,
    )


def switch_glu_layers(model) -> dict:
    """{decoder layer index: (module path, SwitchGLU)} of the model's offloadable blocks."""
    return {b.layer: (b.path, b.module) for b in find_expert_blocks(model) if b.supported}


def _ints(s: str):
    try:
        vals = [int(v) for v in s.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}")
    if not vals:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return vals


def _parser():
    p = argparse.ArgumentParser(
        prog="npumoe build-programs",
        description="Build one expert group's static-tier programs for one MoE layer.",
    )
    p.add_argument("--model", required=True, help="local mlx_lm model folder (or hub id)")
    p.add_argument("--layer", type=int, required=True, help="decoder layer index")
    p.add_argument("--experts", type=_ints, required=True, help="expert ids, e.g. 0,1,2,3")
    p.add_argument("--tiers", type=_ints, default=[32, 64, 128], help="token capacities")
    p.add_argument("--format", choices=BACKENDS, default="coreml", help="the backend whose programs to build")
    p.add_argument("--layout", choices=("conv", "matmul"), default=None,
                   help="Core ML layout (default: conv where the group fits one axis, else matmul)")
    p.add_argument("--weight-format", choices=WEIGHT_FORMATS, default=None,
                   help=f"How Core ML programs store weights (default {DEFAULT_FORMAT}; docs/apple-silicon.md)")
    p.add_argument("--max-axis", type=int, default=None, help="override the ANE per-axis limit")
    p.add_argument("--no-verify", action="store_true", help="skip the numeric check")
    p.add_argument("--out", required=True, help="output folder")
    return p


def _fail(msg: str) -> int:
    print(f"npumoe build-programs: error: {msg}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    limits = DEFAULT_LIMITS if args.max_axis is None else DEFAULT_LIMITS.override(
        max_axis=args.max_axis
    )
    if args.weight_format and not registry.get(args.format).weight_formats:
        return _fail(f"--weight-format sets how Core ML programs store weights; {args.format} programs keep "
                     "the model's own weights")
    try:
        import mlx_lm

        m = args.model
        looks_local = m.startswith((".", "/", "~")) or m.count("/") != 1
        if not Path(m).expanduser().exists() and looks_local:  # else: a hub id "org/name"
            raise FileNotFoundError(f"no model at {m}")
        model, _ = mlx_lm.load(str(Path(m).expanduser()) if Path(m).expanduser().exists() else m, lazy=True)
        layers = switch_glu_layers(model)
        if args.layer not in layers:
            raise ValueError(
                f"layer {args.layer} has no SwitchGLU experts (MoE layers: "
                f"{', '.join(map(str, layers)) or 'none'})"
            )
        path, module = layers[args.layer]
        spec = spec_from_switch_glu(
            module, layer=args.layer, expert_ids=args.experts, tiers=args.tiers
        )
    except (ValueError, FileNotFoundError, OSError) as e:
        return _fail(one_line(e))

    out = Path(args.out)
    print(
        f"{path}: experts {list(spec.expert_ids)}, D={spec.D}, H={spec.H}, "
        f"{spec.activation}, {spec.weight_format}, tiers {list(spec.tiers)}"
    )
    t0 = time.perf_counter()
    try:
        backend = backend_class(args.format)
        fmt = {"weight_format": args.weight_format} if registry.get(args.format).weight_formats else {}
        built = backend.build(spec, out, limits=limits, layout=args.layout, log=print, **fmt)
        if not args.no_verify:  # a lossy Core ML format: its own bound (norm error, below its max error)
            tol = max(registry.get(args.format).tolerance, FORMAT_TOLERANCE.get(built.get("weight_format"), 0.0))
            _verify(backend.checker(built, out)[0], spec, tol)
    except (LimitError, ValueError, BackendError) as e:
        return _fail(one_line(e))
    print(f"done in {time.perf_counter() - t0:.1f}s")
    return 0


def _verify(prog, spec: ProgramSpec, tol: float) -> None:
    """Every tier of the built program on seeded rows vs the numpy reference."""
    rng = np.random.default_rng(0)
    for tier in prog.tiers:
        x = rng.standard_normal((spec.G, tier, spec.D)).astype(np.float32)
        e = rel_err(prog.run(x, tier), reference_ffn(spec, x))
        print(f"  {type(prog).__name__} c{tier}: rel err {e:.2e} vs reference")
        if e > tol:
            raise ValueError(f"verification failed for tier {tier}: rel err {e:.2e} > {tol:g}")


if __name__ == "__main__":
    from ..log import console

    console()  # `[npumoe] ...` lines, as the npumoe command shows them
    sys.exit(main())
