"""Offload modes: what ``--offload`` / ``load(..., offload=)`` install on a model."""

from typing import Optional

import mlx.nn as nn

from . import experts
from ..backends import registry
from ..hints import build_cmd
from .options import MODES, OffloadError, OffloadOptions  # noqa: F401 (MODES, OffloadError: their old home)
from .reference import StaticTierReference
from ..log import get as _get_log

_log = _get_log(__name__)


def resolve(mode: str, check_runs: bool = False) -> str:
    """Map ``auto`` to the backend this machine prefers; with ``check_runs``, refuse a
    backend that cannot run here (before anything slow happens)."""
    if mode not in MODES:
        raise OffloadError(f"unknown offload mode {mode!r}; choose one of {', '.join(MODES)}")
    if mode in registry.REGISTRY and check_runs:
        ok, why = registry.get(mode).available()
        if not ok:
            other = registry.preferred()
            fix = f"--offload {other} (or auto)" if other != mode else "--offload off (stock MLX)"
            raise OffloadError(f"{why}; use {fix} here")
    if mode != "auto":
        return mode
    return registry.preferred()


def _notice(msg: str, quiet: bool) -> None:
    if not quiet:
        _log.warning(msg)


def apply(
    model: nn.Module,
    config: dict,
    opts: OffloadOptions,
    model_path=None,
    model_name: str = "MODEL",
    fingerprint: Optional[str] = None,
) -> str:
    """Install the executors for ``opts.offload``; returns the mode in effect.

    coreml/onnx run the programs of a built bundle (``opts.bundle`` or the default
    place for this model); asked for explicitly, a missing bundle is an error.
    ``auto`` uses the preferred backend's bundle when one exists, else stock MLX.
    The bundle is the one ``bundle.locate_bundle`` names (``opts.bundle`` wins); its
    programs are checked against the model's experts on a probe (a sample of
    them; all of them, and whole-file hashes, with ``opts.verify``). An onnx bundle then
    releases MLX's copy of the experts only programs serve (reloaded from the
    model's safetensors if MLX needs them), unless ``opts.keep_mlx_experts``.
    ``fingerprint``: a shard's (sharded.py), instead of ``model_path``'s files'.
    """
    from ..bundle import bundle as bundles
    from . import installer

    mode, bundle, quiet = opts.offload, opts.bundle, opts.quiet
    want = resolve(mode, check_runs=True)
    if want == "off":
        return "off"
    if not registry.get(want).bundles:  # the reference: no bundle to build or read
        blocks = experts.install(model, lambda blk: StaticTierReference(), config, quiet=quiet)
        if not blocks:
            _notice("no supported MoE expert blocks: the model runs on stock MLX", quiet)
        return want
    blocks = experts.find_expert_blocks(model, config)  # the one walk of the model per load
    if not any(b.supported for b in blocks):
        _notice("no supported MoE expert blocks: the model runs on stock MLX", quiet)
        return "off"
    path = bundles.locate_bundle(model_path, want, bundle) if (bundle or model_path) else None
    if path is None or not (path / "manifest.json").exists():
        where = f" at {path}" if path else ""
        if mode == "auto" and not bundle:
            _notice(
                f"offload auto: no {want} bundle for this model{where}; experts run on stock MLX "
                f"(build one with `{build_cmd(model_name, want)}`)",
                quiet,
            )
            return "off"
        raise OffloadError(  # a --bundle DIR that is missing: the fix builds into DIR
            f"no {want} bundle for this model{where}; build it with "
            f"`{build_cmd(model_name, want, out=path if bundle else None)}`"
        )
    b = bundles.read(path, model_path, model_name, verify=opts.verify, fingerprint=fingerprint)
    if b.plan.backend != want:
        raise OffloadError(f"bundle {path} is for {b.plan.backend}, not {want}")
    installer.install(b, model, config, opts, blocks=blocks, model_path=model_path)
    model.npumoe_bundle = str(path)  # a plain attribute (not a parameter): --stats names it
    return want
