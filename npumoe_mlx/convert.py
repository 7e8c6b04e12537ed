"""`npumoe convert`: a Hugging Face or MLX MoE model -> MLX weights + offload bundle.

- A Hugging Face checkpoint (per-expert tensors, HF key names; a folder or a repo
  id), or any source with conversion flags (``-q``, ``--dtype``, ...), goes
  through ``mlx_lm.convert`` to ``--mlx-path``; the bundle is built beside it.
- An MLX model (an mlx-community repo id, or a local folder) is used as it is;
  its bundle goes to the cache, keyed by the weights' fingerprint (beside a
  local model with ``--in-place``), where ``npumoe generate`` finds it.
Re-running with an up-to-date bundle does nothing and says so; ``--force`` rebuilds.
"""

import json
import sys
from pathlib import Path
from typing import Optional

from mlx_lm import utils as mlx_utils
from mlx_lm.convert import configure_parser as mlx_convert_parser
from mlx_lm.convert import convert as mlx_convert

from . import bundle as bundles
from .checks import resolve_model
from .lock import build_lock

CONVERSION_FLAGS = ("quantize", "dequantize", "dtype", "q_bits", "q_group_size", "quant_predicate")


def is_mlx_layout(model_path: Path) -> bool:
    """True if the saved tensor names are already the MLX model's parameter names."""
    from mlx.utils import tree_flatten
    from safetensors import safe_open

    config = json.loads((model_path / "config.json").read_text())
    if "quantization" in config:
        return True  # only MLX writes its quantization block
    model_class, args_class = mlx_utils._get_classes(config)
    model = model_class(args_class.from_dict(config))  # lazy: no weights are materialised
    want = {k for k, _ in tree_flatten(model.parameters())}
    have = set()
    for f in model_path.glob("*.safetensors"):
        with safe_open(str(f), "np") as st:
            have.update(st.keys())
    return bool(have) and have <= want and len(have) >= len(want) * 0.9


def _parser():
    p = mlx_convert_parser()
    p.prog = "npumoe convert"
    p.description = __doc__.splitlines()[0]
    p.add_argument("--backend", choices=("onnx", "coreml"), default=None,
                   help="Program backend (default: coreml on Apple Silicon, onnx elsewhere).")
    p.add_argument("--force", action="store_true", help="Rebuild the bundle even if it is up to date.")
    p.add_argument("--in-place", action="store_true", help="Put an MLX model's bundle beside it, not in the cache.")
    p.add_argument("--tokens", type=int, default=2048, help="Calibration tokens (default 2048).")
    p.add_argument("--chunk-size", type=int, default=2048,
                   help="Calibration prefill chunk: your mlx_lm prefill_step_size (default 2048, mlx_lm's).")
    p.add_argument("--no-tune", action="store_true", help="Use parametric costs instead of measuring.")
    return p


def convert(
    source: str,
    mlx_path: str = "mlx_model",
    *,
    backend: Optional[str] = None,
    force: bool = False,
    in_place: bool = False,
    tokens: int = 2048,
    chunk_size: int = 2048,
    tune: bool = True,
    trust_remote_code: bool = False,
    progress: bool = False,
    **mlx_convert_kwargs,
) -> Path:
    """``source`` -> MLX weights (if needed, via ``mlx_lm.convert(**mlx_convert_kwargs)``)
    + an up-to-date offload bundle. Returns the model folder to load."""
    from .offload import resolve

    backend = backend or resolve("auto")
    src = resolve_model(source)
    convert_now = any(mlx_convert_kwargs.get(f) for f in CONVERSION_FLAGS) or not is_mlx_layout(src)
    if convert_now:
        model_path = Path(mlx_path)
        if model_path.exists():
            print(f"[npumoe] {model_path} exists: using it as the converted model (remove it to convert again)")
        else:
            print(f"[npumoe] converting {source} -> {model_path} with mlx_lm.convert")
            mlx_convert(source, str(model_path), trust_remote_code=trust_remote_code, **mlx_convert_kwargs)
        out = bundles.default_bundle_dir(model_path, backend)
    else:
        model_path = src
        out = model_path / f"npumoe-{backend}" if in_place else bundles.cached_bundle_dir(model_path, backend)

    if (out / "manifest.json").exists() and not force:
        try:
            bundles.read(out, model_path, source)
            print(f"bundle {out} is up to date; nothing to do (--force rebuilds)")
            return model_path
        except bundles.BundleError as e:
            print(f"[npumoe] rebuilding a stale bundle: {e}", file=sys.stderr)
    with build_lock(out):
        bundles.build(
            str(model_path), backend, str(out), tokens=tokens, chunk_size=chunk_size,
            tune=tune, trust_remote_code=trust_remote_code, progress=progress,
        )
    print(f"generate with: npumoe generate --model {model_path} --offload {backend}")
    return model_path


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if not args.hf_path:
        raise ValueError("give the model to convert with --hf-path (or --model)")
    convert(
        args.hf_path, args.mlx_path, backend=args.backend, force=args.force, in_place=args.in_place,
        tokens=args.tokens, chunk_size=args.chunk_size, tune=not args.no_tune,
        trust_remote_code=args.trust_remote_code, progress=True,
        quantize=args.quantize, q_group_size=args.q_group_size, q_bits=args.q_bits, q_mode=args.q_mode,
        dtype=args.dtype, dequantize=args.dequantize, quant_predicate=args.quant_predicate,
    )
    return 0
