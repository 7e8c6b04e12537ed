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

from .interrupt import caused_by as _caused_by, exit_code as _exit_code, keep_ctrl_c as _keep_ctrl_c

# the `npumoe` command (or `python -m npumoe_mlx...`, whose argv[0] is "-m" while its package imports)
_CLI = _sys.argv[:1] == ["-m"] or _sys.argv[0].rsplit("/", 1)[-1] == "npumoe"
if _CLI:
    _keep_ctrl_c()

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
except BaseException as _e:  # Ctrl-C while the command starts: one line, exit 130, no traceback
    if _CLI and _caused_by(_e):
        _sub = _sys.argv[1] if len(_sys.argv) > 1 and not _sys.argv[1].startswith("-") else ""
        raise SystemExit(_exit_code(f"npumoe{' ' + _sub if _sub else ''}")) from None
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
