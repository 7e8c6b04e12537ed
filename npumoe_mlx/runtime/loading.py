"""``load``: mlx_lm.load plus the offload seam; ``install``/``remove``/``stats`` for models built elsewhere."""

import dataclasses
import os
from typing import Any, Dict, Optional

import mlx.nn as nn
from mlx_lm import utils as mlx_utils

from ..backends import registry
from ..bundle import checks
from . import dense, experts, release
from . import offload as _offload
from .executor import SharedExecutor, offload_stats, summarize
from .options import OffloadOptions


def load(
    path_or_hf_repo: str,
    tokenizer_config: Optional[Dict[str, Any]] = None,
    model_config: Optional[Dict[str, Any]] = None,
    adapter_path: Optional[str] = None,
    lazy: bool = False,
    return_config: bool = False,
    revision: Optional[str] = None,
    trust_remote_code: bool = False,
    options: Optional[OffloadOptions] = None,
    **offload_options,
):
    """Load like ``mlx_lm.load`` (same arguments, same order) and install the expert executor.

    The offload options (``npumoe_mlx.runtime.options.OffloadOptions``), as keyword arguments or as
    ``options=OffloadOptions(...)`` (keyword arguments override its fields):
    offload: "auto" (the Core ML bundle on Apple Silicon, the ONNX one elsewhere,
    when built; else stock MLX), "coreml", "onnx" (need a bundle from
    ``npumoe build``), "mlx" (static-tier reference on MLX) or "off" (stock).
    bundle: a bundle folder (default: found beside the model or in the cache).
    overflow: "auto" (cost model picks rerun or spill), "rerun", "spill", or
    "drop" (the paper's behaviour, for comparison only).
    backend_options: e.g. {"providers": [...], "threads": 2} for onnx.
    verify: check every program tier against the model's experts and every
    bundle file's whole sha256 (default: a sample, and sampled hashes).
    keep_mlx_experts: keep MLX's copy of the experts that only programs serve
    (default: an onnx bundle releases it, and it is read back from the model's
    safetensors if MLX needs it: a program fault, gradients, ``remove``).
    dense_programs: also run the non-expert linears (attention projections, dense MLPs) on
    onnxruntime where measured faster than MLX (dense.py; onnx only). True measures the
    costs (or reuses the bundle's ``dense-costs.json``); a ``dense.DenseCosts`` decides with those.
    quiet: no ``[npumoe]`` notices.
    An unknown or invalid option is a ValueError naming it.
    Returns ``(model, tokenizer[, config])`` like mlx_lm.
    """
    opts = OffloadOptions.merged(options, **offload_options)
    if isinstance(path_or_hf_repo, os.PathLike):  # a Path, or convert()'s result
        path_or_hf_repo = os.fspath(path_or_hf_repo)
    mode = _offload.resolve(opts.offload, check_runs=True)  # fail on a bad mode before the (slow) load
    if opts.dense_programs:
        dense.check_mode(opts.offload)
    model_path = checks.resolve_model(path_or_hf_repo, revision=revision)
    # Experts that programs will serve alone are never read into memory (a backend that
    # releases them: onnx): load lazily, release them, then read the rest (unless the caller asked for a lazy model).
    releasing = registry.releases_mlx_experts(mode) and not opts.keep_mlx_experts
    with checks.explain_load_errors(path_or_hf_repo):
        model, tokenizer, config = mlx_utils.load(
            str(model_path),
            tokenizer_config=tokenizer_config,
            model_config=model_config,
            adapter_path=adapter_path,
            lazy=lazy or releasing,
            return_config=True,
            trust_remote_code=trust_remote_code,
        )
    if releasing:
        model.__dict__[release.LOADED_LAZILY] = True  # release.py: arrays straight from the files
    _offload.apply(model, config, opts, model_path=model_path, model_name=path_or_hf_repo)
    model.__dict__.pop(release.LOADED_LAZILY, None)  # (no release happened: no bundle, or none fits)
    if releasing and not lazy:
        release.materialize(model)
    model.__dict__.pop(release.RELEASED, None)  # (lazy: the caller evaluates; nothing left to skip)
    dense_step(model, opts)
    if return_config:
        return model, tokenizer, config
    return model, tokenizer


def dense_step(model, opts: OffloadOptions) -> None:
    """``opts.dense_programs``: the non-expert linears on onnxruntime (dense.py), after the experts."""
    if not opts.dense_programs:
        return
    costs = opts.dense_programs if isinstance(opts.dense_programs, dense.DenseCosts) else None
    dense.install(model, opts.backend_options, costs=costs, bundle=getattr(model, "npumoe_bundle", None),
                  quiet=opts.quiet)


def _config_of(model, model_path) -> dict:
    """The model's config: config.json beside the weights, else the model's own args."""
    if model_path is not None:
        return checks.check_model_dir(model_path)
    args = getattr(model, "args", None)
    if dataclasses.is_dataclass(args):
        return dataclasses.asdict(args)
    return dict(args) if isinstance(args, dict) else {}


def install(
    model: nn.Module,
    offload: str = "auto",
    bundle: Optional[str] = None,
    config: Optional[Dict[str, Any]] = None,
    model_path: Optional[str] = None,
    options: Optional[OffloadOptions] = None,
    **offload_options,
) -> str:
    """Put the offload on a model built elsewhere (a server, a notebook, ``mlx_lm.load``).

    Same options and bundle rules as ``load`` (``offload`` and ``bundle`` may come first,
    positionally; given, they override ``options``'): the bundle is ``bundle`` or the one
    found for ``model_path`` (a local folder or a hub repo id; its fingerprint is
    checked). Without either, ``auto`` leaves the model on stock MLX and ``onnx``/
    ``coreml`` raise. Installing again replaces what was installed. Returns the
    mode in effect: "coreml", "onnx", "mlx" or "off". ``verify`` and
    ``keep_mlx_experts`` as in ``load`` (experts are released only when ``model_path``
    names the weights to read them back from). ``dense_programs`` as in ``load``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"install needs a loaded model (an mlx.nn.Module, e.g. from mlx_lm.load), got "
                        f"{type(model).__name__} {str(model)[:40]!r}; pass a path as model_path=")
    named = {k: v for k, v in (("offload", offload), ("bundle", bundle))
             if options is None or v != OffloadOptions.__dataclass_fields__[k].default}
    opts = OffloadOptions.merged(options, **named, **offload_options)
    _offload.resolve(opts.offload, check_runs=True)
    if opts.dense_programs:
        dense.check_mode(opts.offload)
    name = str(model_path) if model_path is not None else "MODEL"
    local = checks.resolve_model(model_path) if model_path is not None else None
    if config is None:
        config = _config_of(model, local)
    remove(model)
    mode = _offload.apply(model, config, opts, model_path=local, model_name=name)
    dense_step(model, opts)
    return mode


def remove(model: nn.Module) -> int:
    """Put every offloaded block back on stock MLX (same parameters). Returns how many."""
    model.__dict__.pop("npumoe_bundle", None)  # set by offload.apply for --stats
    return experts.remove(model)


def stats(model: nn.Module) -> Dict[str, Any]:
    """What ran where so far: the numbers ``npumoe generate --stats`` prints, per MoE layer.

    ``{"layers": [{layer, kind ("routed" | "shared"), calls, offloaded,
    program_calls, slots, padded, padding_pct, pairs, spilled, spill_pct,
    dropped, program_s, offload_call_s, fallback}], "total": summarize(...)}``;
    JSON-ready. A model without offload has no layers.
    """
    layer_stats = offload_stats(model)
    shared = {
        id(m.executor.stats) for _, m in model.named_modules()
        if isinstance(getattr(m, "executor", None), SharedExecutor)
    }
    layers = []
    for s in layer_stats:
        d = s.to_dict()
        d["kind"] = "shared" if id(s) in shared else "routed"
        d["padding_pct"] = s.padding_pct
        d["spill_pct"] = s.spill_pct
        layers.append(d)
    total = summarize(layer_stats)
    total["fallbacks"] = {str(k): v for k, v in total["fallbacks"].items()}  # JSON object keys
    return {"layers": layers, "total": total}
