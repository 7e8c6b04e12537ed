"""npumoe-mlx: MoE LLMs on MLX with expert FFNs on static-tier programs (ANE / ONNX Runtime).

A drop-in for ``mlx_lm``: ``load`` takes everything ``mlx_lm.load`` takes plus
``offload=``; ``convert`` makes MLX weights (via mlx_lm.convert) and the offload
bundle; ``generate``, ``stream_generate`` and ``batch_generate`` are mlx_lm's own
functions (the offload lives inside the model's expert blocks, so mlx_lm's
generation loop runs unchanged). ``install``/``remove`` put the offload on (or
take it off) a model loaded elsewhere; ``stats`` says what ran where per layer; ``sharded_load``
is mlx_lm's ``sharded_load`` with each rank's experts offloaded.
"""

from mlx_lm.generate import (
    BatchResponse,
    GenerationResponse,
    batch_generate,
    generate,
    stream_generate,
)

from ._version import __version__
from .convert import convert
from .loading import install, load, remove, stats
from .sharded import sharded_load

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
    "GenerationResponse",
    "BatchResponse",
    "__version__",
]
