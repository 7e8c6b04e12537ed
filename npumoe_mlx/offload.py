"""Offload modes: what ``--offload`` / ``load(..., offload=)`` install on a model."""

import platform
import sys
from typing import Optional

import mlx.nn as nn

from . import experts
from .reference import StaticTierReference

MODES = ("auto", "coreml", "onnx", "mlx", "off")


class OffloadError(ValueError):
    pass


def resolve(mode: str) -> str:
    """Map ``auto`` to the backend this machine prefers."""
    if mode not in MODES:
        raise OffloadError(f"unknown offload mode {mode!r}; choose one of {', '.join(MODES)}")
    if mode != "auto":
        return mode
    is_apple = sys.platform == "darwin" and platform.machine() == "arm64"
    return "coreml" if is_apple else "onnx"


def apply(model: nn.Module, config: dict, mode: str, quiet: bool = False) -> str:
    """Install the executor for ``mode`` on every supported expert block.

    Returns the mode actually in effect. Program backends (coreml, onnx) need a
    built bundle; until one exists ``auto`` runs the static-tier reference on MLX
    and an explicit request for them fails with a clear message.
    """
    want = resolve(mode)
    if want in ("coreml", "onnx"):
        if mode != "auto":
            raise OffloadError(
                f"--offload {want}: program bundles are not built yet in this version; "
                "use --offload mlx or --offload off"
            )
        if not quiet:
            print(
                f"[npumoe] offload auto: no {want} program bundle for this model; "
                "experts run on MLX (static-tier reference)",
                file=sys.stderr,
            )
        want = "mlx"
    if want == "off":
        return "off"
    blocks = experts.install(model, lambda blk: StaticTierReference(), config, quiet=quiet)
    if not blocks and not quiet:
        print("[npumoe] no supported MoE expert blocks: the model runs on stock MLX", file=sys.stderr)
    return want
