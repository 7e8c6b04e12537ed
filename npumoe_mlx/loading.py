"""``load``: mlx_lm.load plus the offload seam."""

from typing import Any, Dict, Optional

from mlx_lm import utils as mlx_utils

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
    quiet: bool = False,
):
    """Load like ``mlx_lm.load`` and install the expert executor for ``offload``.

    offload: "auto" (Core ML on Apple Silicon, ONNX Runtime elsewhere, when a
    bundle is built), "coreml", "onnx", "mlx" (static-tier reference on MLX) or
    "off" (stock mlx_lm). Returns ``(model, tokenizer[, config])`` like mlx_lm.
    """
    _offload.resolve(offload)  # fail on a bad mode before the (slow) load
    model, tokenizer, config = mlx_utils.load(
        path_or_hf_repo,
        tokenizer_config=tokenizer_config,
        model_config=model_config,
        adapter_path=adapter_path,
        lazy=lazy,
        return_config=True,
        revision=revision,
        trust_remote_code=trust_remote_code,
    )
    _offload.apply(model, config, offload, quiet=quiet)
    if return_config:
        return model, tokenizer, config
    return model, tokenizer
