"""``sharded_load``: mlx_lm.utils.sharded_load plus the offload seam, one bundle per rank.

Under ``mlx.launch`` mlx_lm splits a model over ranks in two ways (both can be combined):

- tensor parallel (``model.shard(group)``): every rank holds every MoE layer, each
  expert with H/N of its hidden units (gate/up split by rows, down by columns, in
  place). ``experts(x, inds)`` then returns this rank's partial ``(..., k, D)``; the MoE
  block weights and sums it, adds the (equally split) shared experts, and only then
  runs one ``all_sum`` over the group.
- pipeline (``model.model.pipeline(group)``): each rank holds a range of layers.

A program replaces exactly ``experts(x, inds)`` (and a shared expert's ``mlp(x)``) of the
rank's own shard, so the partial sums and the ``all_sum`` stay where mlx_lm put them:
once, on the same values. Each rank has its own bundle, built from its own weights:
keyed by the shard (``tp2-r0``, ``pp2-r1``, ...) and by a fingerprint of the rank's
parameters. Building is collective: calibration runs the sharded model, so every rank
runs the same forward passes (ranks whose bundle is fine only follow along).
"""

import argparse
import hashlib
import inspect
import json
import sys
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm import utils as mlx_utils
from mlx_lm.generate import generation_stream

from ..backends import registry
from ..build.build import build as build_bundle
from ..bundle import bundle as bundles
from ..bundle import checks
from ..bundle.fingerprint import sample_spans
from ..bundle.lock import BuildInProgress, build_lock
from . import experts
from . import offload as _offload
from .executor import format_stats, offload_stats, summarize
from .loading import load
from .options import OffloadOptions

_CONFIG_PATTERNS = ["*.json", "*.py", "tokenizer.model", "*.tiktoken", "tiktoken.model", "*.txt", "*.jsonl", "*.jinja"]
SAMPLES = 16  # slices hashed per large tensor
SAMPLE_ELEMS = 1024
FULL_ELEMS = 4 * SAMPLES * SAMPLE_ELEMS  # tensors up to this size are hashed whole


@dataclass(frozen=True)
class Shard:
    """Which part of the model this rank holds."""

    tensor_size: int = 1
    tensor_rank: int = 0
    pipeline_size: int = 1
    pipeline_rank: int = 0
    start: int = 0  # first layer held (pipeline)
    end: Optional[int] = None  # one past the last layer held (pipeline)

    @property
    def sharded(self) -> bool:
        return self.tensor_size * self.pipeline_size > 1

    @property
    def key(self) -> str:
        """``tp2-r0``, ``pp2-r1``, ``pp2-r1-tp2-r0``: names this rank's bundle folder."""
        parts = []
        if self.pipeline_size > 1:
            parts.append(f"pp{self.pipeline_size}-r{self.pipeline_rank}")
        if self.tensor_size > 1:
            parts.append(f"tp{self.tensor_size}-r{self.tensor_rank}")
        return "-".join(parts) or "tp1-r0"


def shard_of(model, tensor_group: Optional[mx.distributed.Group] = None) -> Shard:
    """The shard a (sharded-)loaded model holds: pipeline from ``model.model``,
    tensor parallel from ``tensor_group`` or the ``sharding_group`` its MoE blocks got."""
    inner = getattr(model, "model", None)
    group = tensor_group
    if group is None:
        for _, m in model.named_modules():
            g = getattr(m, "sharding_group", None)
            if g is not None:
                group = g
                break
    return Shard(
        tensor_size=group.size() if group is not None else 1,
        tensor_rank=group.rank() if group is not None else 0,
        pipeline_size=getattr(inner, "pipeline_size", 1),
        pipeline_rank=getattr(inner, "pipeline_rank", 0),
        start=getattr(inner, "start_idx", 0) or 0,
        end=getattr(inner, "end_idx", None),
    )


def _as_bytes(a: mx.array) -> mx.array:
    """A view numpy can take (bfloat16 has no numpy dtype)."""
    return a.view(mx.uint16) if a.dtype == mx.bfloat16 else a


def shard_fingerprint(model, config: dict, shard: Shard) -> str:
    """sha256 over the config, the shard and this rank's parameters.

    Like fingerprint.py samples files, large tensors are sampled: name, dtype, shape and
    16 evenly spaced slices of 1024 elements; tensors up to 64K elements are hashed whole
    (about 64 KB per large tensor: a few hundred MB for a 600B model's thousands of tensors).
    """
    h = hashlib.sha256()
    h.update(b"npumoe-shard-fingerprint-1\0")
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    h.update(json.dumps(shard.__dict__, sort_keys=True).encode())
    params = sorted(tree_flatten(model.parameters()), key=lambda kv: kv[0])
    pieces = []
    for name, v in params:
        flat = _as_bytes(v).reshape(-1)
        spans = sample_spans(flat.size, SAMPLES, SAMPLE_ELEMS, FULL_ELEMS)
        pieces.append((name, v, [flat[o: o + n] for o, n in spans]))
    mx.eval([s for _, _, ss in pieces for s in ss])
    for name, v, ss in pieces:
        h.update(f"{name}\0{v.dtype}\0{tuple(v.shape)}\0".encode())
        for s in ss:
            h.update(np.ascontiguousarray(np.asarray(s)).tobytes())
    return h.hexdigest()


def shard_bundle_dir(model_path, backend: str, shard: Shard, fingerprint: str) -> Path:
    """``<model>/npumoe-<backend>-<shard key>`` beside a local model; in the cache (keyed by
    the shard's fingerprint, so unique per rank) for hub snapshots."""
    model_path = Path(model_path)
    d = bundles.default_bundle_dir(model_path, backend, fingerprint)
    return model_path / f"{d.name}-{shard.key}" if d.parent == model_path else d


def _world() -> mx.distributed.Group:
    return mx.distributed.init()


def _count(flag: bool) -> int:
    """How many ranks have ``flag`` set (collective over every rank)."""
    return int(mx.distributed.all_sum(mx.array(int(bool(flag))), group=_world(), stream=mx.cpu).item())


def _check(path: Path, fingerprint: str, model_name: str) -> Optional[str]:
    """None if ``path`` holds a valid bundle for these weights, else why not."""
    if not (path / "manifest.json").exists():
        return f"no bundle at {path}"
    try:
        bundles.read(path, None, model_name, fingerprint=fingerprint)
    except bundles.BundleError as e:
        return str(e)
    return None


def _build_defaults() -> Dict[str, Any]:
    sig = inspect.signature(build_bundle).parameters
    return {k: sig[k].default for k in ("corpus", "tokens", "chunk_size", "seed")}


def _follow(model, tokenizer, config, holds: bool, corpus, tokens: int, chunk_size: int, seed: int) -> None:
    """Run the forward passes a build's calibration runs, for a rank that builds nothing: its
    collectives must match the building ranks' one for one. A rank with MoE blocks calibrates
    and drops the profile (calibration evaluates the blocks' inputs, so the last layer's
    attention all_sum too); a pipeline rank without any evaluates what calibration would:
    its caches (which, through mx.depends, carry the send to the next stage)."""
    from mlx_lm.models.cache import make_prompt_cache

    from ..build.calibrate import _cap, calibrate
    from ..build.workloads import corpus_documents

    docs, _ = corpus_documents(list(corpus), tokens, seed)
    if holds:
        calibrate(model, tokenizer, config, docs, chunk_size=chunk_size, max_tokens=tokens)
        return
    ids = [list(tokenizer.encode(d)) for d in docs]
    for doc, n in zip(ids, _cap([len(i) for i in ids], tokens)):
        if n == 0:
            continue
        toks = mx.array(doc[:n])
        cache = make_prompt_cache(model)
        for start in range(0, n, chunk_size):
            model(toks[start: start + chunk_size][None], cache=cache)
            mx.eval([c.state for c in cache])
        mx.clear_cache()


def sharded_load(
    path_or_hf_repo: str,
    pipeline_group: Optional[mx.distributed.Group] = None,
    tensor_group: Optional[mx.distributed.Group] = None,
    return_config: bool = False,
    *,
    tokenizer_config: Optional[Dict[str, Any]] = None,
    trust_remote_code: bool = False,
    build: bool = False,
    build_options: Optional[Dict[str, Any]] = None,
    options: Optional[OffloadOptions] = None,
    **offload_options,
):
    """Load like ``mlx_lm.utils.sharded_load`` and offload the expert blocks this rank holds.

    Call it on every rank (it is collective). The offload options as in ``npumoe_mlx.load``
    (keyword arguments, or ``options=OffloadOptions(...)``). Each rank uses its own bundle:
    ``bundle`` (``{shard}`` in it is replaced by the shard key, e.g. ``tp2-r0``), else
    ``<model>/npumoe-<backend>-<shard>`` (the cache for hub models); a shard keeps MLX's copy
    of its experts (its arrays are not the files' tensors); ``dense_programs`` is refused (the
    linears are sharded; not supported yet). ``build=True`` first builds every missing or stale per-rank
    bundle (``build_options``: keyword arguments of ``npumoe_mlx.build.build.build``, the same
    on every rank). Returns ``(model, tokenizer[, config])`` like mlx_lm.
    """
    opts = OffloadOptions.merged(options, **offload_options)
    _offload.resolve(opts.offload)
    with checks.explain_load_errors(path_or_hf_repo):
        model, tokenizer, config = mlx_utils.sharded_load(
            path_or_hf_repo, pipeline_group, tensor_group, return_config=True,
            tokenizer_config=tokenizer_config, trust_remote_code=trust_remote_code,
        )
    model_path = mlx_utils._download(path_or_hf_repo, allow_patterns=_CONFIG_PATTERNS)  # no weights
    install(model, tokenizer, config, model_path, opts, tensor_group=tensor_group, build=build,
            build_options=build_options, model_name=str(path_or_hf_repo))
    if return_config:
        return model, tokenizer, config
    return model, tokenizer


def install(
    model,
    tokenizer,
    config: dict,
    model_path,
    opts: OffloadOptions,
    *,
    tensor_group: Optional[mx.distributed.Group] = None,
    build: bool = False,
    build_options: Optional[Dict[str, Any]] = None,
    model_name: str = "MODEL",
) -> str:
    """Offload a sharded model's blocks on this rank (collective); returns the mode in effect."""
    want = _offload.resolve(opts.offload)
    mode, bundle, quiet = opts.offload, opts.bundle, opts.quiet
    if opts.dense_programs:  # mlx_lm's sharded_load shards the linears even in one process
        raise _offload.OffloadError("dense programs are not supported on sharded models yet (their linears are "
                                    "sharded, as mlx_lm's sharded_load leaves them); use npumoe_mlx.load")
    shard = shard_of(model, tensor_group)
    rank = _world().rank()

    def log(msg: str) -> None:
        if not quiet:
            print(f"[npumoe rank {rank}] {msg}", file=sys.stderr, flush=True)

    if want == "off" or not registry.get(want).bundles or not shard.sharded:  # one process: the model's own bundle
        if want != "off" and registry.get(want).bundles and build:
            path = bundles.build_target(model_path, want, bundle)  # the bundle the load below uses
            try:
                bundles.read(path, model_path, model_name)
            except bundles.BundleError:
                build_bundle(str(model_path), want, str(path), loaded=(model, tokenizer, config), log=log,
                              **(build_options or {}))
        return _offload.apply(model, config, opts, model_path=model_path, model_name=model_name)

    holds = any(b.supported for b in experts.find_expert_blocks(model, config))
    fp = shard_fingerprint(model, config, shard)
    path = Path(bundle.format(shard=shard.key)) if bundle else shard_bundle_dir(model_path, want, shard, fp)
    why = _check(path, fp, model_name) if holds else None
    if build:
        if _count(why is not None):
            # batched=False: a rank that builds nothing follows the calibration's forward passes
            # one for one (_follow), and it follows the single-sequence ones only
            bopts = {**_build_defaults(), **(build_options or {}), "batched": False}
            failed = None
            with ExitStack() as held:
                if why is not None:  # take this rank's lock before the collective calibration starts
                    try:
                        held.enter_context(build_lock(path))
                    except BuildInProgress as e:
                        failed = e
                if _count(failed is not None):
                    raise failed or _offload.OffloadError("another rank's bundle is being built by another process")
                if why is not None:
                    log(f"building the {want} bundle of shard {shard.key} at {path} ({why})")
                    try:  # this rank holds the lock taken above
                        build_bundle(str(model_path), want, str(path), loaded=(model, tokenizer, config),
                                     fingerprint=fp, log=log, lock_held=True, **bopts)
                    except Exception as e:  # tell the other ranks before raising
                        failed = e
                else:
                    _follow(model, tokenizer, config, holds, bopts["corpus"], bopts["tokens"], bopts["chunk_size"],
                            bopts["seed"])
            if _count(failed is not None):
                raise failed or _offload.OffloadError("building a per-rank bundle failed on another rank")
            why = _check(path, fp, model_name) if holds else None
    missing = why is not None and mode == "auto" and not bundle and not (path / "manifest.json").exists()
    if _count(why is not None and not missing):  # every rank gives up together: none waits on a dead one
        raise _offload.OffloadError(
            f"shard {shard.key}: {why or 'a bundle is missing or stale on another rank'}; build the bundles "
            f"with sharded_load(..., build=True) or `npumoe generate --build` under mlx.launch"
        )
    if missing:
        log(f"offload auto: no {want} bundle for shard {shard.key} at {path}; experts run on stock MLX "
            f"(build the bundles with sharded_load(..., build=True) or `npumoe generate --build` under mlx.launch)")
        return "off"
    if not holds:
        log(f"shard {shard.key} holds no supported MoE expert block: it runs on stock MLX")
        return "off"
    mine = opts.replace(bundle=str(path), keep_mlx_experts=True)  # a shard's arrays are not the file's tensors
    return _offload.apply(model, config, mine, model_path=model_path, model_name=model_name, fingerprint=fp)


def shared_seed() -> int:
    """A fresh seed, the same on every rank (rank 0's, summed with zeros): sampling at
    temperature > 0 must pick the same token everywhere, as mlx_lm's server ensures."""
    world = _world()
    mine = int(np.random.SeedSequence().entropy % (2**31 - 1)) if world.rank() == 0 else 0
    return int(mx.distributed.all_sum(mx.array(mine, dtype=mx.int32), group=world, stream=mx.cpu).item())


def settle() -> None:
    """Wait for the step mlx_lm's generation leaves in flight (``generation_stream``): its
    all_sums must finish before any other collective starts, or before the process exits
    (else the peers' sockets break mid-sum)."""
    mx.synchronize(generation_stream)
    mx.synchronize()


def rank_stats(model, group: Optional[mx.distributed.Group] = None) -> List[dict]:
    """Every rank's ``summarize(offload_stats(model))`` (plus ``rank``), on every rank.

    Collective: call it on all ranks. A single process gets a list of one.
    """
    group = group or _world()
    settle()
    mine = summarize(offload_stats(model))
    mine["rank"] = group.rank()
    raw = np.frombuffer(json.dumps(mine).encode(), np.uint8).astype(np.int32)
    if group.size() == 1:
        return [mine]
    width = int(mx.distributed.all_gather(mx.array([raw.size]), group=group, stream=mx.cpu).max().item())
    buf = np.zeros((1, width), np.int32)
    buf[0, : raw.size] = raw
    rows = np.array(mx.distributed.all_gather(mx.array(buf), group=group, stream=mx.cpu))  # (N, width)
    return [json.loads(bytes(r[r > 0].astype(np.uint8)).decode()) for r in rows]


def format_rank_stats(stats: List[dict]) -> str:
    return "\n".join(
        f"rank {s['rank']}: " + format_stats(s).replace("\n", f"\nrank {s['rank']}: ") for s in stats
    )


def add_distributed_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Flags of the sharded path (used when ``mlx.launch`` starts more than one rank)."""
    parser.add_argument(
        "--pipeline", action="store_true",
        help="Under mlx.launch: pipeline the layers over the ranks instead of tensor parallelism (as mlx_lm's chat/server).",
    )
    parser.add_argument(
        "--build", action="store_true",
        help="Under mlx.launch: first build every rank's missing or stale offload bundle (all ranks calibrate together).",
    )
    return parser


def cli_load(args, path_or_hf_repo: str, adapter_path=None, tokenizer_config=None, model_config=None,
             return_config: bool = False, trust_remote_code: bool = False, **_):
    """The ``load`` mlx_lm's generate CLI calls, for ``npumoe generate`` under mlx.launch
    (or with ``--build``): ``sharded_load`` over the world group, tensor parallel unless
    ``args.pipeline``; one process loads the whole model (and, with --build, builds its bundle)."""
    if adapter_path:
        raise ValueError("adapters are not supported with sharding or --build (as in mlx_lm's distributed mode)")
    if (model_config or {}).get("quantize_activations"):
        raise ValueError("--quantize-activations is not supported with sharding or --build")
    opts = OffloadOptions.from_args(args)
    group = _world()
    if group.size() > 1:
        out = sharded_load(
            path_or_hf_repo, group if args.pipeline else None, None if args.pipeline else group, True,
            tokenizer_config=tokenizer_config, trust_remote_code=trust_remote_code, build=args.build, options=opts,
        )
    else:
        model_path = checks.resolve_model(path_or_hf_repo)
        model, tokenizer, config = load(str(model_path), tokenizer_config=tokenizer_config, return_config=True,
                                        trust_remote_code=trust_remote_code, offload="off")
        install(model, tokenizer, config, model_path, opts, build=args.build, model_name=str(path_or_hf_repo))
        out = (model, tokenizer, config)
    return out if return_config else out[:2]
