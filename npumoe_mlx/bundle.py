"""The on-disk bundle: manifest, profile, plan, cost model and programs. Atomic, validated.

    <bundle>/manifest.json   kind, format, npumoe version, backend, model fingerprint,
                             limits, and every program file with its size and sha256
    <bundle>/profile.json    calibration (calibrate.py)
    <bundle>/plan.json       groups, tier ladders, residency, thresholds (plan.py)
    <bundle>/cost.json       the cost model (cost.py)
    <bundle>/programs/L<layer>/g<group>/...   .onnx per tier, or one .mlpackage

A build writes a temp folder and renames it into place (an interrupted build
leaves the previous bundle intact). Loading checks everything before a single
program runs: format, fingerprint, files (inside the bundle, present, hashes),
and that the plan fits the model; any mismatch is a clear error, never wrong output.
"""

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import mlx.nn as nn

from . import experts, verify
from ._version import __version__
from .atomic import clean_stale, folder, honour_umask, write_json
from .cost import CostModel, default_cost
from .guard import Notice
from .lock import build_lock
from .plan import Plan, PlanLimits, format_plan, make_plan
from .progress import progress_bar
from .residency import check_budget, default_memory_budget, describe, plan_resident

BUNDLE_FORMAT = 2  # 2: quantized programs without zero points (fast kernel), one session per program
KIND = "npumoe-bundle"
CACHE_ENV = "NPUMOE_CACHE"


class BundleError(ValueError):
    """A bundle that cannot be used for this model; the message says what to do."""


def _writable(path: Path) -> bool:
    """Can a build put a folder at ``path`` (rename into its parent)?"""
    parent = Path(path).absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    return os.access(parent, os.W_OK)


def rebuild_hint(model: str, backend: str, path=None, model_path=None) -> str:
    """The command that rebuilds the bundle at ``path`` so that loads of ``model`` then use it."""
    if path is None or (model_path is not None and Path(path).absolute() == locate_bundle(model_path, backend).absolute()):
        if path is not None and model_path is not None and _read_only(Path(model_path)):
            where = f" (the model folder is read-only: it goes to the cache, {cached_bundle_dir(model_path, backend)}, which loads then use)"
        else:
            where = ""
        return f"rebuild it with `npumoe build --model {model} --backend {backend} --force`{where}"
    if not _writable(Path(path)):
        return (f"{path} cannot be rebuilt in place (its folder is read-only): build one elsewhere with "
                f"`npumoe build --model {model} --backend {backend} --out DIR` and load it with `--bundle DIR`")
    return f"rebuild it with `npumoe build --model {model} --backend {backend} --out {path} --force`"


_rebuild_hint = rebuild_hint


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "npumoe")


def cached_bundle_dir(model_path, backend: str, fingerprint: Optional[str] = None) -> Path:
    """``$NPUMOE_CACHE/bundles/<fingerprint>-<backend>``: where hub models' bundles live."""
    from .fingerprint import model_fingerprint

    fp = fingerprint or model_fingerprint(model_path)
    return cache_root() / "bundles" / f"{fp[:16]}-{backend}"


def _read_only(model_path: Path) -> bool:
    """A model folder npumoe must not (hub snapshot) or cannot write a bundle into."""
    return "snapshots" in Path(model_path).parts or not os.access(model_path, os.W_OK)


_is_hub_snapshot = _read_only


def locate_bundle(model_path, backend: str, explicit=None, new_in_cache: Optional[bool] = None) -> Path:
    """The bundle folder loaders use for this model (whether or not it exists yet).

    1. ``explicit`` (``--bundle``) wins;
    2. else the first that holds a bundle of ``<model>/npumoe-<backend>`` and
       ``$NPUMOE_CACHE/bundles/<fingerprint>-<backend>``: beside first, but the cache
       first for a read-only model folder (or a hub snapshot), where builds write;
    3. else where a new one goes: beside a writable local model, else the cache
       (``new_in_cache`` forces either).
    Builds write to ``build_target``, which is this path or, for a read-only model
    folder, the cache's (then first in line), so the fix an error prints
    (``npumoe build --force``) always replaces the bundle the next load uses.
    """
    if explicit:
        return Path(explicit)
    model_path = Path(model_path)
    beside = model_path / f"npumoe-{backend}"
    read_only = _read_only(model_path)
    if not read_only and (beside / "manifest.json").exists():
        return beside  # (without fingerprinting the weights for the cache's name)
    cached = cached_bundle_dir(model_path, backend)
    for path in ((cached, beside) if read_only else (cached,)):
        if (path / "manifest.json").exists():
            return path
    if new_in_cache is None:
        new_in_cache = read_only
    return cached if new_in_cache else beside


def build_target(model_path, backend: str, explicit=None) -> Path:
    """Where ``npumoe build`` writes (``--out`` wins): the bundle loads use, or the
    cache's for a read-only model folder (loads look there first)."""
    if explicit:
        return Path(explicit)
    if _read_only(Path(model_path)):
        return cached_bundle_dir(model_path, backend)
    return locate_bundle(model_path, backend)


def default_bundle_dir(model_path, backend: str, fingerprint: Optional[str] = None) -> Path:
    """Where a new bundle goes: beside a local model (``<model>/npumoe-<backend>``),
    in the cache (keyed by the weights' fingerprint) for hub snapshots."""
    model_path = Path(model_path)
    if _is_hub_snapshot(model_path):
        return cached_bundle_dir(model_path, backend, fingerprint)
    return model_path / f"npumoe-{backend}"


def find_bundle(model_path, backend: str) -> Optional[Path]:
    """An existing bundle for this model (``locate_bundle``'s), or None."""
    path = locate_bundle(model_path, backend)
    return path if (path / "manifest.json").exists() else None


BUNDLE_ENTRIES = ("manifest.json", "profile.json", "plan.json", "cost.json", "programs")


def check_target(out: Path) -> None:
    """A build replaces ``out`` whole: refuse unless it is missing, empty or a bundle
    (holds nothing but what a build writes), so a wrong ``--out`` never deletes a folder."""
    out = Path(out)
    if not out.exists():
        return
    if not out.is_dir():
        raise BundleError(f"{out} exists and is not a folder; nothing was changed: choose another --out")
    other = sorted(p.name for p in out.iterdir() if p.name not in BUNDLE_ENTRIES)
    if other:
        raise BundleError(
            f"{out} is not an npumoe bundle folder (it holds {', '.join(other[:3])}); a build replaces its "
            f"folder whole, so nothing was changed: choose a new or empty --out"
        )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


SAMPLES, SAMPLE_BYTES = 4, 16 * 1024
SAMPLE_KEY = "sha256_4x16KiB"  # the manifest key of _sample_sha256 (names the scheme: a new one gets a new key)


def _sample_sha256(path: Path) -> str:
    """sha256 of a file's size and 4 evenly spaced 16 KiB samples (all of a file up to 64 KiB):
    what every load checks; the whole-file sha256 is checked with ``verify``."""
    size = path.stat().st_size
    h = hashlib.sha256(f"{size}\0".encode())
    with open(path, "rb") as f:
        if size <= SAMPLES * SAMPLE_BYTES:
            h.update(f.read())
        else:
            step = (size - SAMPLE_BYTES) // (SAMPLES - 1)
            for i in range(SAMPLES):
                f.seek(i * step)
                h.update(f.read(SAMPLE_BYTES))
    return h.hexdigest()


def _files_under(root: Path, rel: Path) -> Dict[str, dict]:
    out = {}
    base = root / rel
    paths = [base] if base.is_file() else sorted(p for p in base.rglob("*") if p.is_file())
    for p in paths:
        out[p.relative_to(root).as_posix()] = {
            "bytes": p.stat().st_size, "sha256": _sha256(p), SAMPLE_KEY: _sample_sha256(p)}
    return out


def safe_path(root: Path, rel: str) -> Path:
    """``root/rel`` if it stays inside ``root`` through no link; else BundleError."""
    if not isinstance(rel, str) or not rel or os.path.isabs(rel) or "\\" in rel:
        raise BundleError(f"manifest path {rel!r} is not a relative path inside the bundle")
    parts = Path(rel).parts
    if ".." in parts:
        raise BundleError(f"manifest path {rel!r} escapes the bundle folder")
    cur = root
    for part in parts:
        cur = cur / part
        if cur.is_symlink():
            raise BundleError(f"manifest path {rel!r} goes through a link ({cur.name}); refused")
    if not str(cur.resolve()).startswith(str(root.resolve()) + os.sep):
        raise BundleError(f"manifest path {rel!r} escapes the bundle folder")
    return cur


# --- build -------------------------------------------------------------------


def _build_checker(backend: str):
    """program folder -> a Program to check right after compiling it: onnx runs every tier
    under onnxruntime; Core ML runs its smallest tier (all tiers share the weights) in the
    numpy MIL interpreter, which works off macOS too."""
    if backend == "onnx":
        from .backends import load_backend

        be = load_backend("onnx")
        return be.load
    return lambda d: verify.milrun_program(Path(d) / "program.mlpackage")


def _verify_built(checker, backend: str, path: Path, rel: Path, entry: dict, module, want) -> None:
    prog = checker(path)
    tiers = sorted(prog.tiers) if backend == "onnx" else [min(prog.tiers)]
    x = verify.probe(prog.G, prog.D, verify.PROBE_ROWS, seed=entry["layer"])
    try:
        verify.check(prog, tiers, want, x, verify.tolerance(backend, module), f"{rel.as_posix()} ({prog.name})")
    except verify.ProgramMismatch as e:
        raise BundleError(f"build refused: {e}; this is a bug in npumoe or the model's format, please report it") from None


def _compile_group(spec, backend: str, dest: Path, limits=None) -> None:
    if backend == "onnx":
        from ane_kernels.onnx import save_onnx

        save_onnx(spec, dest)
    elif backend == "coreml":
        from ane_kernels.coreml import build_package

        dest.mkdir(parents=True, exist_ok=True)
        build_package(spec, dest / "program.mlpackage")
    else:
        raise ValueError(f"cannot compile programs for backend {backend!r}")


def build(
    model_path: str,
    backend: str = "onnx",
    out: Optional[str] = None,
    *,
    corpus: Sequence[str] = ("long-context", "qa", "code"),
    tokens: int = 2048,
    chunk_size: int = 2048,
    seed: int = 0,
    cost: Optional[CostModel] = None,
    objective: str = "time",
    chip: Optional[str] = None,
    tune: bool = True,
    limits: Optional[PlanLimits] = None,
    trust_remote_code: bool = False,
    log: Callable[[str], None] = print,
    progress: bool = False,
    loaded: Optional[tuple] = None,
    fingerprint: Optional[str] = None,
    memory_budget: Optional[int] = -1,
) -> Path:
    """calibrate -> tune -> plan -> compile, into a bundle written atomically. Returns its path.

    ``loaded``: an already loaded ``(model, tokenizer, config)`` (e.g. one rank's shard,
    see sharded.py) instead of loading ``model_path``; ``fingerprint``: the weights'
    fingerprint to record (default: that of the files in ``model_path``);
    ``memory_budget``: bytes the plan may keep resident (MLX + programs); -1 = 80% of
    this machine's RAM, None = no check.
    """
    from mlx_lm import utils as mlx_utils

    from .calibrate import calibrate
    from .checks import explain_load_errors, resolve_model
    from .fingerprint import model_fingerprint
    from .programs import spec_from_dense_mlp, spec_from_switch_glu
    from .workloads import corpus_documents

    if backend not in ("onnx", "coreml"):
        raise ValueError(f"--backend must be onnx or coreml, got {backend!r}")
    from .args import at_least

    at_least("--tokens", tokens, 1, "calibration tokens")
    at_least("--chunk-size", chunk_size, 1, "tokens per calibration chunk")
    t0 = time.perf_counter()
    local = resolve_model(model_path)
    if loaded is None:
        with explain_load_errors(model_path):
            model, tokenizer, config = mlx_utils.load(str(local), return_config=True, trust_remote_code=trust_remote_code)
    else:
        model, tokenizer, config = loaded
    fingerprint = fingerprint or model_fingerprint(local)
    out = build_target(local, backend, out)
    if not _writable(out):
        raise BundleError(f"cannot write the bundle {out}: its folder is read-only; pass --out DIR (a writable "
                          f"folder) and load it with --bundle DIR")
    with build_lock(out):  # one build of a bundle at a time; clears what a dead one left
        clean_stale(out)
        check_target(out)
        blocks = {b.layer: b for b in experts.find_expert_blocks(model, config) if b.supported}
        if not blocks:
            raise ValueError(f"{model_path}: no supported MoE expert blocks; nothing to offload (it runs on stock MLX)")

        docs, desc = corpus_documents(list(corpus), tokens, seed)
        log(f"[1/4] calibrating on {desc} ({tokens} tokens, chunks of {chunk_size})")
        profile = calibrate(
            model, tokenizer, config, docs, chunk_size=chunk_size, max_tokens=tokens,
            model_path=None, description=desc, progress=progress,
        )
        profile.model_fingerprint = fingerprint
        b0 = next(iter(blocks.values()))
        if cost is None and chip:
            from .cost import chip_cost

            cost = chip_cost(chip, backend, b0.dims, b0.hidden, (b0.quant or {}).get("bits", 16))
        if cost is None:
            if tune:
                from .tune import tune as run_tune

                log(f"[2/4] measuring costs ({backend}, D={b0.dims}, H={b0.hidden})")
                cost = run_tune(backend, b0.dims, b0.hidden, b0.quant, repeats=3, progress=progress)
            else:
                cost = default_cost(backend)
        log(f"      {describe_cost(cost)}")
        if backend == "coreml" and sys.platform != "darwin":
            log("      note: Core ML runs only on macOS; this bundle is for a Mac (its programs are "
                "checked here with the numpy MIL interpreter)")
        limits = limits or PlanLimits.for_backend(backend)
        mods = dict(model.named_modules())
        shapes = {
            l: {"D": b.dims, "H": b.hidden, "path": b.path, "quant": b.quant,
                "shared": [{"path": s.path, "hidden": s.hidden} for s in b.shared if _offloadable_shared(mods.get(s.path), s)]}
            for l, b in blocks.items()
        }
        plan = make_plan(profile.to_json(), shapes, cost, limits, objective=objective)
        log(f"[3/4] {format_plan(plan)}")
        resident = plan_resident(plan, model, blocks)
        log(f"      {describe(resident)}")
        check_budget(resident, default_memory_budget() if memory_budget == -1 else memory_budget)

        n_prog = plan.num_programs
        with folder(out) as tmp:
            tmp = Path(tmp)
            jobs = []  # (rel, make_spec, manifest entry): routed groups, then shared experts
            for lp in plan.layers:
                for gi, g in enumerate(lp.groups):
                    mod = blocks[lp.layer].module
                    jobs.append((
                        Path("programs") / f"L{lp.layer:03d}" / f"g{gi:02d}",
                        lambda lp=lp, g=g: spec_from_switch_glu(
                            blocks[lp.layer].module, layer=lp.layer, expert_ids=g.experts, tiers=g.tiers),
                        {"layer": lp.layer, "group": gi, "experts": g.experts, "tiers": g.tiers},
                        (mod, lambda x, m=mod, ids=tuple(g.experts): verify.model_group(m, ids, x)),
                    ))
                for si, sp in enumerate(lp.shared):
                    mlp = mods[sp.path]
                    jobs.append((
                        Path("programs") / f"L{lp.layer:03d}" / f"s{si:02d}",
                        lambda lp=lp, sp=sp: spec_from_dense_mlp(mods[sp.path], layer=lp.layer, tiers=sp.tiers),
                        {"layer": lp.layer, "group": f"s{si}", "experts": [-1], "tiers": sp.tiers},
                        (mlp, lambda x, m=mlp: verify.model_dense(m, x)),
                    ))
            programs = []
            checker = _build_checker(backend)
            for rel, make_spec, entry, (module, want) in progress_bar(
                    jobs, desc="[4/4] programs", unit="prog", disable=not progress):
                _compile_group(make_spec(), backend, tmp / rel)
                for f in (tmp / rel).rglob("*"):
                    honour_umask(f)  # writers of program files may use 0600 temp files
                _verify_built(checker, backend, tmp / rel, rel, entry, module, want)
                programs.append({**entry, "dir": rel.as_posix(), "files": _files_under(tmp, rel)})
            profile.save(tmp / "profile.json")
            plan.save(tmp / "plan.json")
            cost.save(tmp / "cost.json")
            meta = {}
            for name in ("profile.json", "plan.json", "cost.json"):
                meta[name] = _files_under(tmp, Path(name))[name]
            write_json(tmp / "manifest.json", {
                "kind": KIND,
                "format": BUNDLE_FORMAT,
                "npumoe_version": __version__,
                "backend": backend,
                "model_fingerprint": fingerprint,
                "model_type": config.get("model_type"),
                "limits": plan.limits.__dict__,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "meta": meta,
                "programs": programs,
            })
        total = sum(f["bytes"] for p in programs for f in p["files"].values())
        offloaded = sum(1 for lp in plan.layers if lp.groups or lp.shared)
        tiers = sum(len(p["tiers"]) for p in programs)
        log(f"bundle written to {out}: {offloaded}/{len(plan.layers)} MoE layers offloaded, {n_prog} programs "
            f"({tiers} tiers), {total / 1e6:.1f} MB, {time.perf_counter() - t0:.1f} s")
        return out


def describe_cost(cost: CostModel) -> str:
    from .cost import describe

    return describe(cost)


# --- load --------------------------------------------------------------------


@dataclass
class Bundle:
    path: Path
    manifest: dict
    plan: Plan
    cost: CostModel
    model_name: str = "MODEL"
    model_path: Optional[Path] = None


def read(path, model_path=None, model_name: str = "MODEL", verify: bool = False,
         fingerprint: Optional[str] = None) -> Bundle:
    """Validate a bundle folder (and, given ``model_path`` or ``fingerprint``, the weights it was built for).

    Every listed file is checked for size and a sampled sha256 (whole sha256 with
    ``verify``, or for bundles that list no sampled hash). Errors name the folder
    and the command that rebuilds that very folder. ``fingerprint``: the expected one
    (a shard's, see sharded.py) instead of the fingerprint of ``model_path``'s files.
    """
    root = Path(path)
    mpath = root / "manifest.json"
    backend = "coreml" if root.name.endswith("coreml") else "onnx"
    _hint = lambda b: _LazyHint(model_name, b, root, model_path)
    if not mpath.is_file():
        raise BundleError(f"{root}: not an npumoe bundle (no manifest.json); build one with `npumoe build --model {model_name}`")
    try:
        man = json.loads(mpath.read_text())
    except (OSError, ValueError) as e:
        raise BundleError(f"{mpath}: unreadable manifest ({e}); {_hint(backend)}") from None
    if not isinstance(man, dict) or man.get("kind") != KIND:
        raise BundleError(f"{mpath}: not an npumoe bundle manifest; {_hint(backend)}")
    backend = man.get("backend", backend)
    fmt = man.get("format")
    if type(fmt) is not int or fmt != BUNDLE_FORMAT:
        got = f"{json.dumps(fmt)} (a JSON {type(fmt).__name__}, not an integer)" if type(fmt) is not int else str(fmt)
        raise BundleError(
            f"{root}: bundle format {got} (written by npumoe {man.get('npumoe_version')}) is not format "
            f"{BUNDLE_FORMAT}, the one npumoe {__version__} reads; {_hint(backend)}"
        )
    if model_path is not None or fingerprint is not None:
        from .fingerprint import model_fingerprint

        if man.get("model_fingerprint") != (fingerprint or model_fingerprint(model_path)):
            raise BundleError(
                f"{root}: built for other weights (model fingerprint differs: the model changed "
                f"after the build); {_hint(backend)}"
            )
    try:
        for name, want in man["meta"].items():
            _check_file(root, name, want, _hint(backend), True)  # small, and they define the plan
        for prog in man["programs"]:
            for rel, want in prog["files"].items():
                _check_file(root, rel, want, _hint(backend), verify)
        plan = Plan.load(safe_path(root, "plan.json"))
        cost = CostModel.load(safe_path(root, "cost.json"))
    except BundleError:
        raise
    except (KeyError, TypeError, ValueError) as e:
        raise BundleError(f"{root}: malformed bundle ({type(e).__name__}: {e}); {_hint(backend)}") from None
    if plan.backend != backend:
        raise BundleError(f"{root}: plan is for {plan.backend}, manifest says {backend}; {_hint(backend)}")
    try:
        listed = {(p["layer"], p["group"]): ([int(e) for e in p["experts"]], [int(t) for t in p["tiers"]])
                  for p in man["programs"]}
    except (KeyError, TypeError, ValueError) as e:
        raise BundleError(f"{root}: malformed bundle ({type(e).__name__}: {e}); {_hint(backend)}") from None
    needed = {(lp.layer, gi): (list(g.experts), list(g.tiers)) for lp in plan.layers for gi, g in enumerate(lp.groups)}
    needed.update({(lp.layer, f"s{si}"): ([-1], list(sp.tiers)) for lp in plan.layers for si, sp in enumerate(lp.shared)})
    if listed != needed:
        raise BundleError(f"{root}: manifest programs do not match the plan; {_hint(backend)}")
    return Bundle(root, man, plan, cost, model_name, model_path)


class _LazyHint:
    """rebuild_hint's text, computed only when an error prints it (it fingerprints the model)."""

    def __init__(self, *args):
        self.args = args

    def __str__(self) -> str:
        return rebuild_hint(*self.args)

    __format__ = lambda self, spec: format(str(self), spec)


def _check_file(root: Path, rel: str, want: dict, hint, full: bool) -> None:
    p = safe_path(root, rel)
    if not p.is_file():
        raise BundleError(f"{root}: missing file {rel}; {hint}")
    sampled = want.get(SAMPLE_KEY) if not full else None
    if p.stat().st_size != want["bytes"] or (
        _sample_sha256(p) != sampled if sampled else _sha256(p) != want["sha256"]
    ):
        raise BundleError(f"{root}: {rel} is corrupt (size or sha256 differs); {hint}")


def _router_of(model, block_path: str):
    parent_path = block_path.rsplit(".", 1)[0]
    parent = dict(model.named_modules()).get(parent_path)
    if parent is None:
        return None
    for name in ("gate", "router"):
        m = parent.get(name) if isinstance(parent, dict) else None
        if m is not None:
            return m
    return None


def install(
    bundle: Bundle,
    model,
    config: dict,
    backend_opts: Optional[dict] = None,
    overflow: str = "auto",
    quiet: bool = False,
    verify_all: bool = False,
) -> List:
    """Check the plan against the model, load the programs, check them against the
    model's experts (a sample; all tiers of all with ``verify_all``), install the executors."""
    from .backends import load_backend
    from .executor import OffloadExecutor, SharedExecutor

    hint = _LazyHint(bundle.model_name, bundle.plan.backend, bundle.path, bundle.model_path)
    blocks = {b.layer: b for b in experts.find_expert_blocks(model, config)}
    for lp in bundle.plan.layers:
        b = blocks.get(lp.layer)
        if b is None or not b.supported:
            raise BundleError(
                f"{bundle.path}: plan names layer {lp.layer}, which has no offloadable expert block in this model; {hint}"
            )
        if (b.num_experts, b.dims, b.hidden) != (lp.num_experts, lp.D, lp.H):
            raise BundleError(
                f"{bundle.path}: layer {lp.layer} is E={b.num_experts}, D={b.dims}, H={b.hidden} in the model "
                f"but E={lp.num_experts}, D={lp.D}, H={lp.H} in the plan; {hint}"
            )
        ids = [e for g in lp.groups for e in g.experts] + list(lp.cold)
        bad = sorted({e for e in ids if not 0 <= e < b.num_experts})
        if bad:
            raise BundleError(
                f"{bundle.path}: plan names expert {bad[0]}, which the model's layer {lp.layer} "
                f"(E={b.num_experts}) lacks; {hint}"
            )
        if len(ids) != len(set(ids)):
            raise BundleError(f"{bundle.path}: plan names an expert of layer {lp.layer} twice; {hint}")
    be = load_backend(bundle.plan.backend, **(backend_opts or {}))
    progs = {(p["layer"], p["group"]): p for p in bundle.manifest["programs"]}
    loaded = {}  # (layer, group) -> (program, want_fn, module): groups, then shared experts
    for lp in bundle.plan.layers:
        for gi, g in enumerate(lp.groups):
            p = progs[(lp.layer, gi)]
            prog = _load_program(be, bundle, p, hint)
            _check_program(prog, lp, gi, p["dir"], bundle.path, hint)
            mod = blocks[lp.layer].module
            loaded[(lp.layer, gi)] = (prog, lambda x, m=mod, ids=tuple(g.experts): verify.model_group(m, ids, x), mod)
    shared = _load_shared(bundle, model, be, progs, hint)
    for key, (mlp, _, prog) in shared.items():
        loaded[key] = (prog, lambda x, m=mlp: verify.model_dense(m, x), mlp)
    _verify_loaded(bundle, loaded, progs, everything=verify_all, hint=hint)
    pinned = {k: verify.Pinned(prog, [bundle.path / f for f in progs[k]["files"]])  # read() checked the paths
              for k, (prog, _, _) in loaded.items()}
    executors = {}
    for lp in bundle.plan.layers:
        programs = [pinned[(lp.layer, gi)] for gi in range(len(lp.groups))]
        router = _router_of(model, blocks[lp.layer].path) if overflow == "drop" else None
        executors[lp.layer] = OffloadExecutor(lp, programs, bundle.cost, overflow=overflow, router=router)
    shared_ex = [(mlp, SharedExecutor(key[0], sp, pinned[key])) for key, (mlp, sp, _) in shared.items()]
    notice = Notice(f"npumoe build --model {bundle.model_name} --backend {bundle.plan.backend} --force")
    experts.install(model, lambda blk: executors.get(blk.layer), config, quiet=quiet, notice=notice)
    for mlp, ex in shared_ex:
        experts.install_dense(mlp, ex, f"layer {ex.stats.layer} shared expert", notice)
    return list(executors.values()) + [ex for _, ex in shared_ex]


def _load_program(be, bundle: Bundle, p: dict, hint: str):
    src = safe_path(bundle.path, p["dir"])  # every file in it was checked by read()
    if bundle.plan.backend == "coreml":
        src = src / "program.mlpackage"
    try:
        return be.load(src)
    except Exception as e:  # hashes matched, yet the backend cannot read it: edited by hand
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BundleError(f"{bundle.path}: cannot load program {p['dir']} ({why}); {hint}") from e


def _verify_loaded(bundle: Bundle, loaded: dict, progs: dict, everything: bool, hint: str) -> None:
    """Run a seeded probe through the programs (a sample, or all tiers of all with ``everything``)
    and compare with the model's experts on stock MLX; a mismatch refuses the bundle."""
    firsts = {}
    for key in loaded:
        firsts.setdefault(key[0], key)
    for key in verify.pick(list(loaded), everything, firsts):
        prog, want, module = loaded[key]
        tiers = sorted(prog.tiers) if everything else [min(prog.tiers)]
        x = verify.probe(prog.G, prog.D, verify.PROBE_ROWS, seed=key[0])
        try:
            verify.check(prog, tiers, want, x, verify.tolerance(bundle.plan.backend, module),
                         f"{progs[key]['dir']} ({prog.name})")
        except verify.ProgramMismatch as e:
            raise BundleError(f"{bundle.path}: {e}; {hint}") from None


_DISTRIBUTED = (nn.AllToShardedLinear, nn.ShardedToAllLinear, nn.QuantizedAllToShardedLinear, nn.QuantizedShardedToAllLinear)


def _offloadable_shared(mlp, shared) -> bool:
    """A shared expert gets a program only if it is a plain SwiGLU MLP in a format programs take."""
    if mlp is None or (shared.quant is not None and shared.quant.get("mode", "affine") != "affine"):
        return False
    if any(isinstance(c, _DISTRIBUTED) for c in mlp.children().values()):
        return False  # a tensor-parallel linear sums across ranks inside; a program would skip that
    return experts.is_swiglu_mlp(mlp)


def _load_shared(bundle: Bundle, model, be, progs: dict, hint: str) -> dict:
    """(layer, "s<i>") -> (mlp, plan entry, program) for every shared expert the plan offloads,
    checked against the model."""
    mods = dict(model.named_modules())
    out = {}
    for lp in bundle.plan.layers:
        for si, sp in enumerate(lp.shared):
            mlp = mods.get(sp.path)
            if mlp is None or not experts.is_swiglu_mlp(mlp):
                raise BundleError(f"{bundle.path}: plan offloads shared expert {sp.path}, which this model lacks; {hint}")
            p = progs[(lp.layer, f"s{si}")]
            prog = _load_program(be, bundle, p, hint)
            H = mlp.up_proj.weight.shape[0]
            if (prog.G, prog.D) != (1, lp.D) or sp.H != H or not set(sp.tiers) <= set(prog.tiers):
                raise BundleError(f"{bundle.path}: {p['dir']} does not fit shared expert {sp.path}; {hint}")
            out[(lp.layer, f"s{si}")] = (mlp, sp, prog)
    return out


def _check_program(prog, lp, gi: int, rel: str, root: Path, hint: str) -> None:
    """The loaded program is the one the plan wants: its name carries layer and expert ids."""
    from types import SimpleNamespace

    from ane_kernels.spec import ProgramSpec

    g = lp.groups[gi]
    want = ProgramSpec.name.fget(SimpleNamespace(layer=lp.layer, expert_ids=tuple(g.experts)))
    got = (prog.name, prog.G, prog.D)
    if got != (want, len(g.experts), lp.D) or not set(g.tiers) <= set(prog.tiers):
        raise BundleError(
            f"{root}: {rel} holds program {prog.name} (G={prog.G}, D={prog.D}, tiers {list(prog.tiers)}) but the "
            f"plan wants {want} (G={len(g.experts)}, D={lp.D}, tiers {list(g.tiers)}); {hint}"
        )


def main(argv=None) -> int:
    """`npumoe build`: calibrate -> tune -> plan -> compile into a bundle."""
    import argparse

    p = argparse.ArgumentParser(prog="npumoe build", description="Build the offload bundle of a model.")
    p.add_argument("--model", required=True, help="Local folder or Hugging Face repo of an mlx_lm model.")
    p.add_argument("--backend", choices=("onnx", "coreml"), default="onnx")
    p.add_argument("--out", help="Bundle folder (default: <model>/npumoe-<backend>, or the cache for hub models).")
    p.add_argument("--force", action="store_true", help="Rebuild even if an up-to-date bundle exists.")
    p.add_argument("--corpus", nargs="+", action="extend", metavar="NAME_OR_FILE",
                   help="Calibration corpora: long-context, qa, code, or .txt/.jsonl files (default: all three built-ins).")
    p.add_argument("--tokens", type=int, default=2048, help="Calibration tokens (default 2048).")
    p.add_argument("--chunk-size", type=int, default=2048,
                   help="Calibration prefill chunk: your mlx_lm prefill_step_size (default 2048, mlx_lm's).")
    p.add_argument("--cost", help="A cost model JSON from `npumoe tune` (default: measure now).")
    p.add_argument("--chip", help="Plan with the predicted costs of this Apple chip (coreml; see `npumoe chips`).")
    p.add_argument("--objective", choices=("time", "energy"), default="time",
                   help="Minimise each layer call's time, or its energy within 1.2x of the least time.")
    p.add_argument("--no-tune", action="store_true", help="Use parametric costs instead of measuring.")
    p.add_argument("--max-tiers", type=int, help="Tiers per group (default 12).")
    p.add_argument("--max-group", type=int, help="Experts per program (default 16).")
    p.add_argument("--max-programs", type=int, help="Resident programs over all layers (default: 4096 for onnx, 120 for coreml).")
    p.add_argument("--max-capacity", type=int, help="Largest token capacity of a tier (at least the smallest tier: 8 for onnx, 32 for coreml).")
    p.add_argument("--memory-budget", type=float, metavar="GB",
                   help="Resident bytes the plan may use, MLX + programs (default: 80%% of this machine's RAM; 0 = no check).")
    p.add_argument("--trust-remote-code", action="store_true")
    args = p.parse_args(argv)
    if args.memory_budget is not None and args.memory_budget < 0:
        raise ValueError(f"--memory-budget must be >= 0 GB, got {args.memory_budget}")
    from .args import at_least, limits_from_flags, load_cost
    from .checks import resolve_model

    at_least("--tokens", args.tokens, 1, "calibration tokens")
    at_least("--chunk-size", args.chunk_size, 1, "tokens per calibration chunk")
    limits_from_flags(args.backend, args.max_tiers, args.max_group, args.max_programs, args.max_capacity)
    if args.cost:
        load_cost(args.cost)  # a bad file fails before the model loads
    local = resolve_model(args.model)
    out = build_target(local, args.backend, args.out)
    if (out / "manifest.json").exists() and not args.force:
        try:
            read(out, local, args.model)
            print(f"bundle {out} is up to date; nothing to do (--force rebuilds)")
            return 0
        except BundleError as e:
            print(f"[npumoe] existing bundle is stale, rebuilding: {e}", file=sys.stderr)
    limits = limits_from_flags(args.backend, args.max_tiers, args.max_group, args.max_programs, args.max_capacity)
    cost = load_cost(args.cost) if args.cost else None
    build(
        str(local), args.backend, str(out), corpus=args.corpus or ("long-context", "qa", "code"),
        tokens=args.tokens, chunk_size=args.chunk_size, cost=cost, tune=not args.no_tune,
        objective=args.objective, chip=args.chip,
        limits=limits, trust_remote_code=args.trust_remote_code, progress=True,
        memory_budget=-1 if args.memory_budget is None else (int(args.memory_budget * 1e9) or None),
    )
    return 0
