"""`npumoe generate`: mlx_lm.generate's CLI with the expert offload installed.

The parser is mlx_lm's own plus our flags, and the run is mlx_lm's own ``main``
with its ``load`` pointed at ours, so flags, output format and behaviour cannot
drift from ``mlx_lm.generate``. Under ``mlx.launch`` (more than one rank) the model is
loaded with ``npumoe_mlx.sharded_load`` (tensor parallel, or ``--pipeline``; ``--build``
builds missing per-rank bundles first) and only rank 0 prints, as in mlx_lm's chat/server.
"""

import importlib
import os
import sys
from contextlib import contextmanager, nullcontext, redirect_stdout

import mlx.core as mx

from ..hints import build_cmd
from ..outputs import check_file
from ..runtime import dense, release, sharded
from ..runtime.executor import format_stats, offload_stats, stats_profile, summarize
from ..runtime.loading import load
from ..runtime.options import OffloadOptions, add_args
from ..build.args import at_least

# `mlx_lm.generate` the attribute is the function; we want the module.
mlx_generate = importlib.import_module("mlx_lm.generate")
_stock_arg_parser = mlx_generate.setup_arg_parser


def add_offload_args(parser, stats: bool = True):
    """The offload flags (options.py, one per OffloadOptions field that has one), and ``--stats``."""
    add_args(parser)
    if not stats:
        return parser
    parser.add_argument(
        "--stats",
        nargs="?",
        const="",
        default=None,
        metavar="FILE",
        help="Print offload statistics (program calls, padding, spill, time) after generating; with FILE, "
        f"also save the per-call expert loads there (re-size the bundle with `{build_cmd('M', from_stats='FILE')}`).",
    )
    return parser


def setup_arg_parser():
    parser = _stock_arg_parser()
    parser.prog = "npumoe generate"
    parser.description = "MoE LLM inference with expert offload (mlx_lm.generate flags plus --offload)"
    return sharded.add_distributed_args(add_offload_args(parser))


@contextmanager
def _patched(module, **attrs):
    old = {k: getattr(module, k) for k in attrs}
    for k, v in attrs.items():
        setattr(module, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(module, k, v)


def explain_stats(model) -> str:
    """Which bundle ran, and why calls stayed on MLX (each layer's plan sets min_tokens)."""
    from ..runtime.experts import installed_blocks
    from ..planning.plan import NEVER

    bundle = getattr(model, "npumoe_bundle", None)
    lines = [f"bundle: {bundle}" if bundle else "bundle: none (no programs installed)"]
    s = summarize(offload_stats(model))
    stayed = s["layer_calls"] - s["offloaded_calls"]
    released = [m for m in installed_blocks(model) if release.record_of(m) is not None]
    cold = sum(m.executor.stats.calls - m.executor.stats.offloaded for m in released
               if hasattr(getattr(m, "executor", None), "stats"))
    stayed -= cold  # released layers run every call on programs unless only cold experts are routed
    mins = [m.executor.plan.min_tokens for m in installed_blocks(model)
            if hasattr(getattr(m, "executor", None), "plan") and all(m is not r for r in released)]
    mins = [t for t in mins if t < NEVER]
    spread = f" ({min(mins)}-{max(mins)} by layer)" if mins and min(mins) != max(mins) else ""
    if stayed and mins:
        lines.append(
            f"{stayed} MoE layer calls stayed on MLX: the plan runs programs only for calls of at least "
            f"{min(mins)} tokens{spread} (each decode step is 1 token); smaller calls are faster on MLX"
        )
    elif stayed:
        lines.append(f"{stayed} MoE layer calls stayed on MLX: the plan offloads no layer at any call size")
    recs = [release.record_of(m) for m in released]
    if recs:
        lines.append(
            f"MLX does not hold {sum(len(r.ids) for r in recs)} experts of {len(recs)} layers "
            f"({sum(r.nbytes for r in recs) / 1e6:.1f} MB): programs serve them at every call size, decode "
            f"included (--keep-mlx-experts keeps MLX's copy)"
            + (f"; {cold} calls of those layers routed only to cold experts ran on MLX" if cold else "")
        )
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = setup_arg_parser()
    args = parser.parse_args(argv)
    at_least("--prefill-step-size", args.prefill_step_size, 1, "tokens per prefill chunk")
    if args.stats:  # --stats FILE: checked before the load and the generation
        check_file(args.stats, "--stats")
    if args.dense_programs and (args.build or mx.distributed.init().size() > 1):
        raise ValueError("--dense-programs is not supported with --build or under mlx.launch (sharded models) yet")
    loaded = []
    # Under mlx.launch (more than one rank): mlx_lm's sharded_load, tensor parallel unless
    # --pipeline, as mlx_lm's chat/server/benchmark do; only rank 0 prints.
    distributed = mx.distributed.init().size() > 1
    if distributed and args.seed is None:  # every rank must sample the same token
        argv = [*argv, "--seed", str(sharded.shared_seed())]

    def _load(*a, **kw):
        if distributed or args.build:
            out = sharded.cli_load(args, *a, **kw)
        else:
            out = load(*a, options=OffloadOptions.from_args(args), **kw)
        loaded.append(out[0])
        return out

    saved_argv = sys.argv
    sys.argv = ["npumoe generate", *argv]
    quiet_rank = distributed and mx.distributed.init().rank() != 0
    try:
        with _patched(mlx_generate, setup_arg_parser=setup_arg_parser, load=_load), \
                redirect_stdout(open(os.devnull, "w")) if quiet_rank else nullcontext():
            mlx_generate.main()
    finally:
        sys.argv = saved_argv
    if distributed:
        sharded.settle()
    if args.stats is not None and loaded:  # --stats, or --stats FILE
        if distributed:  # collective: every rank sends its numbers to rank 0
            per_rank = sharded.rank_stats(loaded[0])
            if not quiet_rank:
                print(sharded.format_rank_stats(per_rank))
        else:
            print_stats(loaded[0], args)
    return 0


def print_stats(model, args) -> None:
    """``--stats [FILE]``: what ran where and why; with FILE also the per-call loads."""
    print(format_stats(summarize(offload_stats(model))))
    print(explain_stats(model))
    if args.dense_programs:
        print(dense.format_summary(dense.summary(model)))
    if args.stats:  # the per-call loads, for `npumoe plan --from-stats FILE`
        stats_profile(model).save(args.stats)
        print(f"per-call loads written to {args.stats}")


if __name__ == "__main__":
    from ..log import console

    console()  # `[npumoe] ...` lines, as the npumoe command shows them
    sys.exit(main())
