"""Offload modes: what ``--offload`` / ``load(..., offload=)`` install on a model."""

import platform
import sys
from pathlib import Path
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


def _notice(msg: str, quiet: bool) -> None:
    if not quiet:
        print(f"[npumoe] {msg}", file=sys.stderr)


def apply(
    model: nn.Module,
    config: dict,
    mode: str,
    model_path=None,
    bundle: Optional[str] = None,
    overflow: str = "auto",
    backend_options: Optional[dict] = None,
    model_name: str = "MODEL",
    quiet: bool = False,
    fingerprint: Optional[str] = None,
) -> str:
    """Install the executors for ``mode``; returns the mode in effect.

    coreml/onnx run the programs of a built bundle (``bundle`` or the default
    place for this model); asked for explicitly, a missing bundle is an error.
    ``auto`` uses the preferred backend's bundle when one exists, else stock MLX.
    """
    from . import bundle as bundles

    want = resolve(mode)
    if want == "off":
        return "off"
    if want == "mlx":
        blocks = experts.install(model, lambda blk: StaticTierReference(), config, quiet=quiet)
        if not blocks:
            _notice("no supported MoE expert blocks: the model runs on stock MLX", quiet)
        return "mlx"
    if not any(b.supported for b in experts.find_expert_blocks(model, config)):
        _notice("no supported MoE expert blocks: the model runs on stock MLX", quiet)
        return "off"
    path = Path(bundle) if bundle else (bundles.find_bundle(model_path, want) if model_path else None)
    if path is None or not (path / "manifest.json").exists():
        where = f" at {path}" if path else ""
        if mode == "auto" and not bundle:
            _notice(
                f"offload auto: no {want} bundle for this model{where}; experts run on stock MLX "
                f"(build one with `npumoe build --model {model_name} --backend {want}`)",
                quiet,
            )
            return "off"
        raise OffloadError(
            f"no {want} bundle for this model{where}; build it with "
            f"`npumoe build --model {model_name} --backend {want}`"
        )
    b = bundles.read(path, model_path, model_name, fingerprint=fingerprint)  # fingerprint: a shard's (sharded.py)
    if b.plan.backend != want:
        raise OffloadError(f"bundle {path} is for {b.plan.backend}, not {want}")
    bundles.install(b, model, config, backend_options, overflow=overflow, quiet=quiet)
    return want
