"""npumoe-mlx: MoE LLMs on MLX with expert FFNs on static-tier programs (ANE / ONNX Runtime).

A drop-in for ``mlx_lm``: ``load`` takes everything ``mlx_lm.load`` takes plus
``offload=``; ``convert`` makes MLX weights (via mlx_lm.convert) and the offload
bundle; ``generate``, ``stream_generate`` and ``batch_generate`` are mlx_lm's own
functions (the offload lives inside the model's expert blocks, so mlx_lm's
generation loop runs unchanged). ``install``/``remove`` put the offload on (or
take it off) a model loaded elsewhere; ``stats`` says what ran where per layer; ``sharded_load``
is mlx_lm's ``sharded_load`` with each rank's experts offloaded.
"""

import sys as _sys

try:  # seconds of imports (mlx, mlx_lm): the `npumoe` command imports this package before its main runs
    from mlx_lm.generate import (
        BatchResponse,
        GenerationResponse,
        batch_generate,
        generate,
        stream_generate,
    )

    from ._version import __version__
    from .cli.convert import convert
    from .runtime.loading import install, load, remove, stats
    from .runtime.options import OffloadOptions
    from .runtime.sharded import sharded_load
except KeyboardInterrupt:  # Ctrl-C while `npumoe ...` / `python -m npumoe_mlx...` starts: no traceback
    if _sys.argv[:1] == ["-m"] or _sys.argv[0].rsplit("/", 1)[-1] == "npumoe":
        _sub = _sys.argv[1] if len(_sys.argv) > 1 and not _sys.argv[1].startswith("-") else ""
        print(f"npumoe{' ' + _sub if _sub else ''}: interrupted", file=_sys.stderr)
        raise SystemExit(130) from None
    raise

__all__ = [
    "load",
    "install",
    "remove",
    "stats",
    "sharded_load",
    "generate",
    "stream_generate",
    "batch_generate",
    "convert",
    "OffloadOptions",
    "GenerationResponse",
    "BatchResponse",
    "__version__",
]
