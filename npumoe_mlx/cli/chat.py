"""`npumoe chat`: mlx_lm.chat with the expert offload installed.

As `npumoe generate`: the parser is mlx_lm's own plus our flags, and the loop is mlx_lm's
own ``main`` (its ChatUI, prompt cache, sampler, ``q``/``r``/``h`` commands) with its
``load`` and ``sharded_load`` pointed at ours, so the chat cannot drift from ``mlx_lm.chat``.
"""

import functools
import importlib
import sys

import mlx.core as mx

from ..runtime.loading import load
from ..runtime.options import OffloadOptions
from ..runtime.sharded import sharded_load
from ..build.args import at_least
from .generate import _patched, add_offload_args, print_stats

mlx_chat = importlib.import_module("mlx_lm.chat")
_stock_arg_parser = mlx_chat.setup_arg_parser


def setup_arg_parser():
    parser = _stock_arg_parser()
    parser.prog = "npumoe chat"
    parser.description = "Chat with an MoE LLM, its expert FFNs offloaded (mlx_lm.chat flags plus --offload)"
    return add_offload_args(parser)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = setup_arg_parser().parse_args(argv)
    at_least("--prefill-step-size", args.prefill_step_size, 1, "tokens per prefill chunk")
    at_least("--max-tokens", args.max_tokens, 1, "tokens per reply")
    if args.dense_programs and mx.distributed.init().size() > 1:
        raise ValueError("--dense-programs is not supported under mlx.launch (sharded models) yet")
    opts = OffloadOptions.from_args(args)
    loaded = []

    def kept(load_fn):
        def _load(*a, **kw):
            out = load_fn(*a, **kw)
            loaded.append(out[0])
            return out
        return _load

    saved_argv, sys.argv = sys.argv, ["npumoe chat", *argv]  # mlx_lm.chat parses sys.argv itself
    try:
        with _patched(
            mlx_chat,
            setup_arg_parser=setup_arg_parser,
            load=kept(functools.partial(load, options=opts)),
            sharded_load=kept(functools.partial(sharded_load, options=opts)),
        ):
            mlx_chat.main()
    finally:
        sys.argv = saved_argv
    if args.stats is not None and loaded and mx.distributed.init().size() == 1:  # after the chat ends
        print_stats(loaded[0], args)
    return 0


if __name__ == "__main__":
    from ..log import console

    console()  # `[npumoe] ...` lines, as the npumoe command shows them
    sys.exit(main())
