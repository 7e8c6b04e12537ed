"""`npumoe generate`: mlx_lm.generate's CLI with the expert offload installed.

The parser is mlx_lm's own plus our flags, and the run is mlx_lm's own ``main``
with its ``load`` pointed at ours, so flags, output format and behaviour cannot
drift from ``mlx_lm.generate``.
"""

import importlib
import sys
from contextlib import contextmanager


from .executor import format_stats, offload_stats, stats_profile, summarize
from .loading import load
from .offload import MODES

# `mlx_lm.generate` the attribute is the function; we want the module.
mlx_generate = importlib.import_module("mlx_lm.generate")
_stock_arg_parser = mlx_generate.setup_arg_parser


def add_offload_args(parser):
    parser.add_argument(
        "--offload",
        choices=MODES,
        default="auto",
        help="Where expert FFNs run: auto (Core ML on Apple Silicon, ONNX Runtime "
        "elsewhere, when built), coreml, onnx, mlx (static-tier reference on MLX), "
        "off (stock mlx_lm). Default: auto.",
    )
    parser.add_argument(
        "--bundle",
        default=None,
        help="Offload bundle folder (default: <model>/npumoe-<backend>, or the cache for hub models).",
    )
    parser.add_argument(
        "--overflow",
        choices=("auto", "rerun", "spill", "drop"),
        default="auto",
        help="Pairs past a group's top tier: auto (cost model picks), rerun the ladder, spill to "
        "MLX, or drop them (the paper's behaviour, for comparison; never the default).",
    )
    parser.add_argument(
        "--stats",
        nargs="?",
        const="",
        default=None,
        metavar="FILE",
        help="Print offload statistics (program calls, padding, spill, time) after generating; with FILE, "
        "also save the per-call expert loads there (re-plan with `npumoe plan --from-stats FILE`).",
    )
    return parser


def setup_arg_parser():
    parser = _stock_arg_parser()
    parser.prog = "npumoe generate"
    parser.description = "MoE LLM inference with expert offload (mlx_lm.generate flags plus --offload)"
    return add_offload_args(parser)


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


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = setup_arg_parser()
    args = parser.parse_args(argv)
    loaded = []

    def _load(*a, **kw):
        out = load(*a, offload=args.offload, bundle=args.bundle, overflow=args.overflow, **kw)
        loaded.append(out[0])
        return out

    saved_argv = sys.argv
    sys.argv = ["npumoe generate", *argv]
    try:
        with _patched(mlx_generate, setup_arg_parser=setup_arg_parser, load=_load):
            mlx_generate.main()
    finally:
        sys.argv = saved_argv
    if args.stats is not None and loaded:
        print(format_stats(summarize(offload_stats(loaded[0]))))
        if args.stats:
            stats_profile(loaded[0]).save(args.stats)
            print(f"per-call loads written to {args.stats}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
