"""``load``: mlx_lm.load plus the offload seam."""

import os
from typing import Any, Dict, Optional

from mlx_lm import utils as mlx_utils

from . import checks
from . import offload as _offload


def load(
    path_or_hf_repo: str,
    tokenizer_config: Optional[Dict[str, Any]] = None,
    model_config: Optional[Dict[str, Any]] = None,
    adapter_path: Optional[str] = None,
    lazy: bool = False,
    return_config: bool = False,
    revision: Optional[str] = None,
    trust_remote_code: bool = False,
    offload: str = "auto",
    bundle: Optional[str] = None,
    overflow: str = "auto",
    backend_options: Optional[Dict[str, Any]] = None,
    quiet: bool = False,
    verify: bool = False,
):
    """Load like ``mlx_lm.load`` and install the expert executor for ``offload``.

    offload: "auto" (the Core ML bundle on Apple Silicon, the ONNX one elsewhere,
    when built; else stock MLX), "coreml", "onnx" (need a bundle from
    ``npumoe build``), "mlx" (static-tier reference on MLX) or "off" (stock).
    bundle: a bundle folder (default: found beside the model or in the cache).
    overflow: "auto" (cost model picks rerun or spill), "rerun", "spill", or
    "drop" (the paper's behaviour, for comparison only).
    backend_options: e.g. {"providers": [...], "threads": 2} for onnx.
    verify: check every program tier against the model's experts and every
    bundle file's whole sha256 (default: a sample, and sampled hashes).
    Returns ``(model, tokenizer[, config])`` like mlx_lm.
    """
    if isinstance(path_or_hf_repo, os.PathLike):  # a Path, or convert()'s result
        path_or_hf_repo = os.fspath(path_or_hf_repo)
    _offload.resolve(offload, check_runs=True)  # fail on a bad mode before the (slow) load
    model_path = checks.resolve_model(path_or_hf_repo, revision=revision)
    with checks.explain_load_errors(path_or_hf_repo):
        model, tokenizer, config = mlx_utils.load(
            str(model_path),
            tokenizer_config=tokenizer_config,
            model_config=model_config,
            adapter_path=adapter_path,
            lazy=lazy,
            return_config=True,
            trust_remote_code=trust_remote_code,
        )
    _offload.apply(
        model, config, offload, model_path=model_path, bundle=bundle, overflow=overflow,
        backend_options=backend_options, model_name=path_or_hf_repo, quiet=quiet, verify=verify,
    )
    if return_config:
        return model, tokenizer, config
    return model, tokenizer
