"""`npumoe convert`: a Hugging Face or MLX MoE model -> MLX weights + offload bundle.

- A Hugging Face checkpoint (per-expert tensors, HF key names; a folder or a repo
  id), or any source with conversion flags (``-q``, ``--dtype``, ...), goes
  through ``mlx_lm.convert`` to ``--mlx-path``; the bundle is built beside it.
- An MLX model (an mlx-community repo id, or a local folder) is used as it is;
  its bundle goes where ``npumoe build`` puts it (one rule, bundle.build_target):
  beside a writable local model, else in the cache keyed by the weights' fingerprint.
Re-running with an up-to-date bundle does nothing and says so; ``--force`` rebuilds.
``--refresh STATS`` rebuilds the bundle with its ladders re-sized for the per-call loads
``npumoe generate --stats STATS`` saved (``npumoe build --from-stats STATS`` for a converted
model), keeping the costs the bundle was planned with.
"""

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from mlx.utils import tree_flatten
from mlx_lm import utils as mlx_utils
from mlx_lm.convert import configure_parser as mlx_convert_parser, convert as mlx_convert
from safetensors import safe_open

from ..atomic import clean_stale, honour_umask, write_json
from ..backends import registry
from ..build.build import add_weight_format_flag, check_weight_format
from ..build.build import build as build_bundle
from ..build.calibrate import Profile
from ..bundle import bundle as bundles, owned
from ..bundle.checks import resolve_model
from ..bundle.fingerprint import model_fingerprint
from ..bundle.lock import build_lock
from ..log import STDOUT, get as _get_log
from ..planning.cost import CostModel
from ..runtime.offload import resolve
from ..build.args import at_least
from ..build.calibrate import CALIBRATE_WITH, add_calibrate_with_flag

_log = _get_log(__name__)

CONVERSION_FLAGS = ("quantize", "dequantize", "dtype", "q_bits", "q_group_size", "quant_predicate")


def is_mlx_layout(model_path: Path) -> bool:
    """True if the saved tensor names are already the MLX model's parameter names."""
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
    p.add_argument("--backend", choices=registry.names(bundles=True), default=None,
                   help="Program backend (default: coreml on Apple Silicon, onnx elsewhere).")
    p.add_argument("--force", action="store_true",
                   help="Rebuild the bundle even if it is up to date; convert again into an --mlx-path that holds "
                   "another npumoe conversion (only what npumoe convert wrote there is replaced).")
    p.add_argument("--in-place", action="store_true",
                   help="(Kept for old scripts: an MLX model's bundle now goes beside a writable local model anyway.)")
    p.add_argument("--tokens", type=int, default=2048, help="Calibration tokens (default 2048).")
    p.add_argument("--chunk-size", type=int, default=2048,
                   help="Calibration prefill chunk: your mlx_lm prefill_step_size (default 2048, mlx_lm's).")
    p.add_argument("--no-tune", action="store_true", help="Use parametric costs instead of measuring.")
    p.add_argument("--refresh", metavar="STATS",
                   help="Rebuild the bundle with its ladders re-sized for the per-call loads `npumoe generate "
                   "--stats STATS` saved (as `npumoe build --from-stats`; the bundle's costs are kept).")
    return add_calibrate_with_flag(add_weight_format_flag(p))


CONVERT_MARKER = "npumoe_convert.json"
SETTINGS = ("quantize", "q_group_size", "q_bits", "q_mode", "dtype", "dequantize", "quant_predicate")


class ConvertError(ValueError):
    pass


@dataclass(eq=False)
class Converted:
    """What ``convert`` made: the model folder to load and its offload bundle.

    It stands for the model folder (``os.fspath``, ``==`` a path), so
    ``load(convert(...))`` works as before.
    """

    model: Path
    bundle: Path
    backend: str
    converted: bool  # True if mlx_lm.convert wrote ``model`` (else it is the source itself)

    def __fspath__(self) -> str:
        return str(self.model)

    def __eq__(self, other):
        if isinstance(other, Converted):
            return (self.model, self.bundle, self.backend) == (other.model, other.bundle, other.backend)
        if isinstance(other, (str, os.PathLike)):
            return Path(self.model) == Path(other)
        return NotImplemented

    def __hash__(self):
        return hash(Path(self.model))


def _settings(kwargs: dict) -> dict:
    return {k: kwargs.get(k) if not callable(kwargs.get(k)) else repr(kwargs.get(k)) for k in SETTINGS}


def _reuse_or_refuse(model_path: Path, source: str, fingerprint: str, settings: dict, force: bool) -> bool:
    """True if ``model_path`` is a finished conversion of this very source with these settings."""
    if not model_path.exists():
        return False
    info = owned.read_marker(model_path, CONVERT_MARKER)
    if info is None:
        raise ConvertError(
            f"{model_path} already exists and was not written by npumoe convert; nothing was changed: "
            f"remove it or choose another --mlx-path (mlx_lm.convert refuses an existing path too)"
        )
    same_source = info.get("source_fingerprint") == fingerprint
    if same_source and info.get("settings") == settings:
        return True
    if force:
        return False  # convert again; only what convert wrote there is replaced
    what = "another model" if not same_source else "other settings"
    diff = "" if not same_source else ": " + ", ".join(
        f"{k} {info.get('settings', {}).get(k)!r} -> {v!r}" for k, v in settings.items()
        if info.get("settings", {}).get(k) != v)
    raise ConvertError(
        f"{model_path} holds a conversion of {what} (from {info.get('source')}{diff}); nothing was changed: "
        f"choose another --mlx-path, or pass --force to convert again into it"
    )


def _convert_into(source: str, model_path: Path, fingerprint: str, settings: dict, force: bool,
                  trust_remote_code: bool, kwargs: dict) -> None:
    """mlx_lm.convert into a temp folder beside ``model_path``, then rename it into place:
    a killed conversion leaves no partial ``model_path`` for a later run to use."""
    old = owned.check(model_path, CONVERT_MARKER, "convert", force)
    model_path.parent.mkdir(parents=True, exist_ok=True)
    with build_lock(model_path):
        clean_stale(model_path)  # what a killed conversion left
        tmp = Path(tempfile.mkdtemp(dir=model_path.parent, prefix=f".tmp-{model_path.name}-"))
        try:
            honour_umask(tmp)
            work = tmp / "model"
            _log.info(f"converting {source} -> {model_path} with mlx_lm.convert", extra=STDOUT)
            mlx_convert(source, str(work), trust_remote_code=trust_remote_code, **kwargs)
            files = sorted(os.listdir(work)) + ["npumoe-onnx", "npumoe-coreml", CONVERT_MARKER]
            write_json(work / CONVERT_MARKER, {
                "tool": "npumoe convert", "source": source, "source_fingerprint": fingerprint,
                "settings": settings, "files": files,
            })
            owned.publish(work, model_path, old)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


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
    refresh: Optional[str] = None,
    weight_format: Optional[str] = None,
    calibrate_with: str = "auto",
    **mlx_convert_kwargs,
) -> Converted:
    """``source`` -> MLX weights (if needed, via ``mlx_lm.convert(**mlx_convert_kwargs)``)
    + an up-to-date offload bundle. Returns ``Converted(model, bundle, backend, converted)``.
    ``refresh``: a stats file of ``npumoe generate --stats``; the bundle is rebuilt with
    ladders sized for those calls (the workload's layers replace the calibration's).
    ``in_place``: kept for old callers; the bundle goes where ``npumoe build`` puts it either way.
    ``weight_format``: how Core ML programs store the experts (build.py; Core ML only).
    ``calibrate_with``: auto, numpy or mlx, what computes the expert FFNs while calibrating."""
    if calibrate_with not in CALIBRATE_WITH:
        raise ValueError(f"--calibrate-with must be one of {', '.join(CALIBRATE_WITH)}, got {calibrate_with!r}")
    at_least("--tokens", tokens, 1, "calibration tokens")
    at_least("--chunk-size", chunk_size, 1, "tokens per calibration chunk")
    workload = Profile.load(refresh) if refresh else None  # a bad stats file fails before any work
    backend = backend or resolve("auto")
    check_weight_format(backend, weight_format)  # before any work
    src = resolve_model(source)
    convert_now = any(mlx_convert_kwargs.get(f) for f in CONVERSION_FLAGS) or not is_mlx_layout(src)
    if convert_now:
        model_path = Path(mlx_path)
        fingerprint, settings = model_fingerprint(src), _settings(mlx_convert_kwargs)
        if _reuse_or_refuse(model_path, source, fingerprint, settings, force):
            _log.info(f"{model_path} is {source} converted with the same settings: using it "
                      f"(--force converts again)", extra=STDOUT)
        else:
            _convert_into(source, model_path, fingerprint, settings, force, trust_remote_code, mlx_convert_kwargs)
        out = bundles.locate_bundle(model_path, backend)
    else:
        model_path = src
        out = bundles.build_target(model_path, backend)  # where `npumoe build` writes, and loads look

    cost = None
    if workload is not None:  # re-size, don't re-measure: plan with the costs the bundle has
        if (out / "cost.json").exists():
            try:
                cost = CostModel.load(out / "cost.json")
            except (OSError, ValueError, TypeError, KeyError) as e:
                _log.warning(f"not reusing {out / 'cost.json'} ({e}); measuring costs again")
    elif (out / "manifest.json").exists() and not force:
        try:
            bundles.read(out, model_path, source)
            print(f"bundle {out} is up to date; nothing to do (--force rebuilds)")
            return Converted(model_path, out, backend, convert_now)
        except bundles.BundleError as e:
            _log.warning(f"rebuilding a stale bundle: {e}")
    build_bundle(  # takes the bundle's build lock
        str(model_path), backend, str(out), tokens=tokens, chunk_size=chunk_size,
        tune=tune, trust_remote_code=trust_remote_code, progress=progress, cost=cost, workload=workload,
        weight_format=weight_format, host_calibration=CALIBRATE_WITH[calibrate_with],
    )
    print(f"generate with: npumoe generate --model {model_path} --offload {backend}")
    return Converted(model_path, out, backend, convert_now)


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if not args.hf_path:
        raise ValueError("give the model to convert with --hf-path (or --model)")
    convert(
        args.hf_path, args.mlx_path, backend=args.backend, force=args.force, in_place=args.in_place,
        tokens=args.tokens, chunk_size=args.chunk_size, tune=not args.no_tune,
        trust_remote_code=args.trust_remote_code, progress=True, refresh=args.refresh,
        weight_format=args.weight_format, calibrate_with=args.calibrate_with,
        quantize=args.quantize, q_group_size=args.q_group_size, q_bits=args.q_bits, q_mode=args.q_mode,
        dtype=args.dtype, dequantize=args.dequantize, quant_predicate=args.quant_predicate,
    )
    return 0
