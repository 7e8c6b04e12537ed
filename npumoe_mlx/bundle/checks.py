"""Check a model before mlx_lm loads it, so bad input gets an error naming the file and the fix.

mlx_lm's own errors name a JSON parser, a tensor offset or the hub (a missing
config.json in a typo'd folder turns into a hub look-up). These checks read only
config.json and the safetensors headers; nothing is unpickled or executed.
"""

import json
import os
import re
import struct
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import mlx_lm
from mlx_lm import utils as mlx_utils

from ..hints import one_line

WEIGHTS_GLOB = "model*.safetensors"  # what mlx_lm.load reads, and nothing else
PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.pickle")
MAX_HEADER = 100 * 1024 * 1024  # the safetensors spec's own limit
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_ITEMSIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "I16": 2, "F16": 2,
    "BF16": 2, "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8, "C64": 8,
}


class ModelError(ValueError):
    """A model folder mlx_lm cannot load; the message names the file and the fix."""


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def resolve_model(path_or_hf_repo, revision: Optional[str] = None, need_tokenizer: bool = True) -> Path:
    """The checked local folder of a model: a folder as is, a repo id through the hub (cache)."""
    name = os.fspath(path_or_hf_repo) if isinstance(path_or_hf_repo, os.PathLike) else str(path_or_hf_repo)
    p = Path(name)
    if p.exists():
        if not p.is_dir():
            raise ModelError(f"{p} is a file, not a model folder; pass the folder that holds config.json")
        check_model_dir(p, need_tokenizer)
        return p
    offline = _offline()
    if not _REPO_ID.match(name):
        why = " (and HF_HUB_OFFLINE is set)" if offline else ""
        raise ModelError(
            f"no such model folder {name}{why}; pass a local mlx_lm model folder "
            f"or a Hugging Face repo id like mlx-community/<model>"
        )
    try:
        local = Path(mlx_utils._download(name, revision=revision))
    except Exception as e:
        if offline:
            raise ModelError(
                f"no such model folder {name}, and {name} is not in the Hugging Face cache "
                f"(HF_HUB_OFFLINE is set, so it is not downloaded); check the path, or unset HF_HUB_OFFLINE"
            ) from None
        first = one_line(e)
        raise ModelError(
            f"no such model folder {name}, and the Hugging Face hub did not give it ({first}); "
            f"check the path or repo id and your network"
        ) from None
    check_model_dir(local, need_tokenizer)
    return local


def check_model_dir(path, need_tokenizer: bool = True) -> dict:
    """Raise ModelError unless ``path`` looks loadable by mlx_lm; returns its config."""
    root = Path(path)
    cfg_path = root / "config.json"
    if not cfg_path.is_file():
        raise ModelError(
            f"{root}: no config.json, so this is not an mlx_lm model folder; pass the folder that holds "
            f"config.json and model*.safetensors, or convert a Hugging Face model with `mlx_lm.convert --hf-path REPO`"
        )
    try:
        config = json.loads(cfg_path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ModelError(f"{cfg_path}: not valid JSON ({e}); restore or re-download config.json") from None
    if not isinstance(config, dict):
        raise ModelError(f"{cfg_path}: not a JSON object; restore or re-download config.json")
    _check_model_type(cfg_path, config)
    check_config(cfg_path, config)
    _check_weights(root)
    if need_tokenizer and not (any((root / f).is_file() for f in TOKENIZER_FILES) or any(root.glob("*.tiktoken"))):
        raise ModelError(
            f"{root}: no tokenizer (none of {', '.join(TOKENIZER_FILES)}); copy the tokenizer files from the "
            f"original model, or convert it again with `mlx_lm.convert`, which writes them"
        )
    return config


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tiktoken.model", "vocab.json", "tokenizer_config.json")
# Fields the seam and the planner read (checked before mlx_lm sees them). ``top_k`` is left out:
# many configs carry a sampling default (top_k: 50) under that name.
EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
TOP_K_KEYS = ("num_experts_per_tok", "moe_topk", "moe_k")
POSITIVE_KEYS = ("num_hidden_layers", "hidden_size")
COUNT_KEYS = ("moe_intermediate_size",) + EXPERT_COUNT_KEYS  # 0 is a dense model's


def _kind(v) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "a boolean", list: "a list",
            dict: "an object"}.get(type(v), type(v).__name__)


def _bad(cfg_path, key, value, constraint) -> ModelError:
    kind = "" if value is None else f" ({_kind(value)})"
    return ModelError(f"{cfg_path}: {key} is {json.dumps(value)}{kind}, but it must be {constraint}; fix config.json")


def _is_pos_int(v) -> bool:
    return type(v) is int and v >= 1


def check_config(cfg_path, config: dict) -> None:
    """Every MoE field npumoe and mlx_lm's MoE blocks read: a positive integer, top-k <= experts.

    A nested ``text_config`` (multimodal checkpoints) is checked the same way.
    """
    for cfg in (config, config.get("text_config")):
        if not isinstance(cfg, dict):
            continue
        for key in POSITIVE_KEYS:
            if key in cfg and not _is_pos_int(cfg[key]) and (key == "num_hidden_layers" or cfg[key] is not None):
                raise _bad(cfg_path, key, cfg[key], "an integer >= 1")
        for key in COUNT_KEYS:
            if cfg.get(key) is not None and not (type(cfg[key]) is int and cfg[key] >= 0):
                raise _bad(cfg_path, key, cfg[key], "an integer >= 0")
        experts = next((cfg[k] for k in EXPERT_COUNT_KEYS if _is_pos_int(cfg.get(k))), None)
        if experts is not None and cfg.get("moe_intermediate_size") == 0:
            raise _bad(cfg_path, "moe_intermediate_size", 0, f">= 1 in a MoE model ({experts} experts)")
        for key in TOP_K_KEYS:
            if cfg.get(key) is None:
                continue
            v = cfg[key]
            ks = v if isinstance(v, list) and v else [v]  # per-layer lists (hunyuan)
            if not all(type(k) is int and k >= 0 for k in ks) or (experts is not None and min(ks) < 1):
                raise _bad(cfg_path, key, v, "an integer >= 1 (experts per token)")
            if experts is not None and max(ks) > experts:
                raise _bad(cfg_path, key, v, f"<= the number of experts ({experts})")


def _check_model_type(cfg_path: Path, config: dict) -> None:
    if config.get("model_file") is not None:
        return  # custom architecture code: mlx_lm runs it only with trust_remote_code
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise ModelError(f"{cfg_path}: no model_type; restore or re-download config.json")
    try:
        mlx_utils._get_classes(config)
    except ValueError:
        raise ModelError(
            f"{cfg_path}: model_type {model_type!r} is not supported by mlx-lm {mlx_lm.__version__}; "
            f"upgrade mlx-lm (`pip install -U mlx-lm`) or fix model_type"
        ) from None


def _check_weights(root: Path) -> None:
    files = sorted(root.glob(WEIGHTS_GLOB))
    if not files:
        unsafe = sorted(p.name for pat in PICKLE_WEIGHTS for p in root.glob(pat))
        if unsafe:
            raise ModelError(
                f"{root}: weights only in {', '.join(unsafe)} (PyTorch pickle format, which can run code "
                f"when loaded); npumoe loads only model*.safetensors: convert with `mlx_lm.convert --hf-path REPO`"
            )
        other = sorted(p.name for p in root.glob("*.safetensors"))
        hint = f" ({', '.join(other)} do not match model*.safetensors)" if other else ""
        raise ModelError(
            f"{root}: no weight files model*.safetensors{hint}; the download may be incomplete: "
            f"re-download the model or convert it with `mlx_lm.convert`"
        )
    for f in files:
        check_safetensors(f)
    index = root / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return  # mlx_lm does not read the index; a broken one is harmless
        missing = sorted(s for s in shards if not (root / s).is_file())
        if missing:
            raise ModelError(
                f"{root}: missing weight file {missing[0]} (listed in {index.name}); "
                f"the download is incomplete: re-download the model"
            )


def check_safetensors(path) -> None:
    """Header and sizes of one safetensors file; a truncated or corrupt file is a ModelError."""
    p = Path(path)
    fix = "re-download or re-convert the model"
    size = p.stat().st_size
    with open(p, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ModelError(f"{p}: corrupt or truncated safetensors file ({size} bytes); {fix}")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER or 8 + n > size:
            raise ModelError(f"{p}: corrupt or truncated safetensors file (bad header length {n}); {fix}")
        head = f.read(n)
    try:
        header = json.loads(head)
        if not isinstance(header, dict):
            raise ValueError("not an object")
    except (UnicodeDecodeError, ValueError) as e:
        raise ModelError(f"{p}: corrupt safetensors file (header is not JSON: {e}); {fix}") from None
    end = 0
    for name, t in header.items():
        if name == "__metadata__":
            continue
        try:
            a, b = (int(v) for v in t["data_offsets"])
            count = 1
            for d in t["shape"]:
                count *= int(d)
            itemsize = _ITEMSIZE.get(t["dtype"])
        except (KeyError, TypeError, ValueError):
            raise ModelError(f"{p}: corrupt safetensors file (bad entry for tensor {name!r}); {fix}") from None
        if not 0 <= a <= b or (itemsize is not None and b - a != count * itemsize):
            raise ModelError(f"{p}: corrupt safetensors file (tensor {name!r} has bad offsets); {fix}")
        end = max(end, b)
    if 8 + n + end > size:
        raise ModelError(
            f"{p}: truncated safetensors file ({size} bytes, its header needs {8 + n + end}); {fix}"
        )


@contextmanager
def explain_load_errors(path):
    """Turn mlx_lm's weight/config mismatch and custom-code errors into ones that say what to do."""
    try:
        yield
    except TypeError as e:  # ModelArgs(**config): a field the family's code needs is not in config.json
        m = re.search(r"missing \d+ required (?:positional|keyword-only) arguments?: (.+)$", str(e))
        if m is None:
            raise
        names = re.findall(r"'([^']+)'", m.group(1))
        raise ModelError(
            f"{path}: config.json has no {', '.join(names)} (the model's code needs "
            f"{'it' if len(names) == 1 else 'them'}); restore or re-download config.json"
        ) from None
    except KeyError as e:  # a family's sanitize() pops each tensor it needs by name
        key = e.args[0] if e.args else "?"
        raise ModelError(
            f"{path}: tensor {key} is missing from model*.safetensors (the model's code needs it); the checkpoint "
            f"is incomplete or from another model: re-download or re-convert it"
        ) from None
    except ValueError as e:
        msg = str(e).strip()
        first = msg.splitlines()[0] if msg else ""
        if "trust_remote_code" in msg:
            raise ModelError(
                f"{path}: config.json asks to run custom model code; this is off by default. "
                f"Pass --trust-remote-code (trust_remote_code=True) only if you trust this model"
            ) from None
        if re.search(r"Expected shape|Missing \d+ parameters|parameters not in model", msg):
            names = [s.strip().rstrip(",") for s in msg.splitlines()[1:] if s.strip()][:3]
            detail = first.rstrip(": ") + (f" ({', '.join(names)}, ...)" if names else "")
            raise ModelError(
                f"{path}: config.json does not match the weights in model*.safetensors ({detail}); "
                f"they come from different models or one was edited: restore config.json or re-download the model"
            ) from None
        raise
