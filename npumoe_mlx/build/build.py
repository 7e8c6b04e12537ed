"""`npumoe build`: calibrate -> tune -> plan -> compile, into a bundle (bundle.py: its format).

``build`` is the one place that takes a bundle's build lock (lock.py); it writes a
temp folder and renames it into place, so an interrupted build leaves the previous
bundle intact. Every program is built by its backend (``Backend.build``, which
returns the entry the manifest keeps) and checked against the model's experts
right after (``Backend.checker``).
"""

import argparse
import importlib.util
import math
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Callable, Optional, Sequence

import mlx.nn as nn
from mlx_lm import utils as mlx_utils

from .._version import __version__
from ..atomic import clean_stale, folder, honour_umask, write_json
from ..backends import backend_class, registry
from ..bundle import bundle as bundles
from ..bundle.checks import explain_load_errors, resolve_model
from ..bundle.fingerprint import model_fingerprint
from ..bundle.lock import build_lock
from .args import at_least, choose_cost, limits_from_flags, load_cost
from ..log import get as _get_log
from ..planning.cost import CostModel
from ..planning.cost import describe as describe_cost
from ..planning.plan import PlanLimits, format_plan, make_plan
from ..planning.profiles import Profile, with_workload
from ..planning.residency import check_budget, default_memory_budget, describe, plan_resident
from ..runtime import experts
from . import verify
from .calibrate import CALIBRATE_WITH, add_calibrate_with_flag, calibrate
from .programs import spec_from_dense_mlp, spec_from_switch_glu
from .progress import progress_bar
from .tune import tune as run_tune
from .workloads import corpus_documents

_log = _get_log(__name__)


_DISTRIBUTED = (nn.AllToShardedLinear, nn.ShardedToAllLinear, nn.QuantizedAllToShardedLinear, nn.QuantizedShardedToAllLinear)


def offloadable_shared(mlp, shared) -> bool:
    """A shared expert gets a program only if it is a plain SwiGLU MLP in a format programs take."""
    if mlp is None or (shared.quant is not None and shared.quant.get("mode", "affine") != "affine"):
        return False
    if any(isinstance(c, _DISTRIBUTED) for c in mlp.children().values()):
        return False  # a tensor-parallel linear sums across ranks inside; a program would skip that
    return experts.is_swiglu_mlp(mlp)


def check_weight_format(backend: str, weight_format: Optional[str]) -> Optional[str]:
    """The Core ML weight format to build (default formats.DEFAULT_FORMAT); None for onnx,
    which keeps the model's own weights: a format given for onnx is refused in one line."""
    from ane_kernels.formats import DEFAULT_FORMAT, check_format

    if not registry.get(backend).weight_formats:
        if weight_format is not None:
            raise ValueError(f"--weight-format sets how Core ML programs store weights; the {backend} backend "
                             f"keeps the model's own weights (drop --weight-format or use --backend coreml)")
        return None
    return check_format(weight_format or DEFAULT_FORMAT)


def add_weight_format_flag(parser):
    """``--weight-format`` (build and convert)."""
    from ane_kernels.formats import DEFAULT_FORMAT, WEIGHT_FORMATS

    parser.add_argument("--weight-format", choices=WEIGHT_FORMATS, default=None,
                        help=f"How Core ML programs store expert weights (default {DEFAULT_FORMAT}, per Apple's "
                             "Neural Engine guidance; see docs/apple-silicon.md). Core ML only.")
    return parser


def _verify_built(backend: str, folder: Path, rel: Path, built: dict, layer: int, module, want) -> None:
    prog, tiers = backend_class(backend).checker(built, folder)
    x = verify.probe(prog.G, prog.D, verify.PROBE_ROWS, seed=layer)
    try:
        tol = verify.tolerance(backend, module, built.get("weight_format"))
        verify.check(prog, tiers, want, x, tol, f"{rel.as_posix()} ({prog.name})")
    except verify.ProgramMismatch as e:
        raise bundles.BundleError(f"build refused: {e}; this is a bug in npumoe or the model's format, please report it") from None


def workload_cost(bundle: Path, log: Callable[[str], None] = print) -> Optional[CostModel]:
    """``--from-stats`` re-sizes ladders, it doesn't re-measure: the costs the bundle has (None: none)."""
    try:
        return CostModel.load(Path(bundle) / "cost.json") if (Path(bundle) / "cost.json").exists() else None
    except (OSError, ValueError, TypeError, KeyError) as e:
        log(f"      not reusing {Path(bundle) / 'cost.json'} ({e})")
        return None


def plan_model(model, tokenizer, config, blocks: dict, backend: str, *, corpus=("long-context", "qa", "code"),
               tokens: int = 2048, chunk_size: int = 2048, seed: int = 0, cost: Optional[CostModel] = None,
               chip: Optional[str] = None, tune: bool = True, objective: str = "time",
               limits: Optional[PlanLimits] = None, workload: Optional[Profile] = None,
               log: Callable[[str], None] = print, progress: bool = False, weight_format: Optional[str] = None,
               batched: bool = True, times: Optional[dict] = None, host: Optional[bool] = None):
    """calibrate (+ the saved workload) -> costs -> plan: ``(profile, cost, plan)``. The one path
    ``npumoe build`` and ``npumoe plan --from-stats`` share, so the preview is what gets built.
    ``batched``: calibration also records batched prefill calls (as ``batch_generate`` makes them).
    ``times``: receives each stage's seconds ("calibrate", "costs", "plan"). ``host``: calibrate's
    (None: numpy's BLAS for the expert FFNs when MLX runs on the CPU)."""
    times = {} if times is None else times
    docs, desc = corpus_documents(list(corpus), tokens, seed)
    log(f"[1/4] calibrating on {desc} ({tokens} tokens, chunks of {chunk_size})")
    t0 = time.perf_counter()
    profile = calibrate(
        model, tokenizer, config, docs, chunk_size=chunk_size, max_tokens=tokens,
        model_path=None, description=desc, progress=progress, batched=batched, host=host,
    )
    times["calibrate"] = time.perf_counter() - t0
    if workload is not None:
        log(f"      re-sizing layers {[l.layer for l in workload.layers]} for the saved workload ({workload.corpus})")
        profile = with_workload(profile, workload)
    b0 = next(iter(blocks.values()))

    def measure() -> CostModel:
        log(f"[2/4] measuring costs ({backend}, D={b0.dims}, H={b0.hidden})")
        return run_tune(backend, b0.dims, b0.hidden, b0.quant, repeats=3, progress=progress, top_k=b0.top_k or 8)

    limits = limits or PlanLimits.for_backend(backend)
    if weight_format is not None:
        limits.weight_format = weight_format  # the group cap counts this format's bytes
    t0 = time.perf_counter()
    cost = cost or choose_cost(backend, chip=chip, tune=measure if tune else None, D=b0.dims, H=b0.hidden,
                               bits=(b0.quant or {}).get("bits", 16), weight_format=limits.weight_format)
    times["costs"] = time.perf_counter() - t0
    log(f"      {describe_cost(cost)}")
    t0 = time.perf_counter()
    plannable = {l: replace(b, shared=[s for s in b.shared if offloadable_shared(s.module, s)])
                 for l, b in blocks.items()}  # shared experts only where a program computes them
    plan = make_plan(profile, plannable, cost, limits, objective=objective)
    times["plan"] = time.perf_counter() - t0
    return profile, cost, plan


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
    lock_held: bool = False,
    workload: Optional[Profile] = None,
    weight_format: Optional[str] = None,
    batched: bool = True,
    host_calibration: Optional[bool] = None,
) -> Path:
    """calibrate -> tune -> plan -> compile, into a bundle written atomically. Returns its path.

    ``loaded``: an already loaded ``(model, tokenizer, config)`` (e.g. one rank's shard,
    see sharded.py) instead of loading ``model_path``; ``fingerprint``: the weights'
    fingerprint to record (default: that of the files in ``model_path``);
    ``memory_budget``: bytes the plan may keep resident (MLX + programs); -1 = 80% of
    this machine's RAM, None = no check. The build takes ``out``'s build lock (one build of a
    bundle at a time) unless ``lock_held``: sharded.py takes it before the collective
    calibration, so every rank learns together whether it may build. ``workload``: per-call
    loads saved by ``npumoe generate --stats FILE``; its layers replace the calibration's.
    ``weight_format``: how Core ML programs store the experts (ane_kernels/formats.py; default
    formats.DEFAULT_FORMAT); kept in plan.json (limits) and each program's manifest entry.
    ``host_calibration``: calibrate's ``host`` (``--calibrate-with``; None: auto).
    """
    if backend not in registry.names(bundles=True):
        raise ValueError(f"--backend must be one of {', '.join(registry.names(bundles=True))}, got {backend!r}")
    toolkit, requirement = registry.get(backend).builder or (None, None)
    if toolkit and importlib.util.find_spec(toolkit) is None:  # an extra off a Mac (pyproject.toml)
        raise ValueError(f"building {backend} programs needs {toolkit}, which is not installed: "
                         f"pip install '{requirement}'")
    at_least("--tokens", tokens, 1, "calibration tokens")
    at_least("--chunk-size", chunk_size, 1, "tokens per calibration chunk")
    weight_format = check_weight_format(backend, weight_format)
    t0 = time.perf_counter()
    local = resolve_model(model_path)
    if loaded is None:
        with explain_load_errors(model_path):
            model, tokenizer, config = mlx_utils.load(str(local), return_config=True, trust_remote_code=trust_remote_code)
    else:
        model, tokenizer, config = loaded
    times = {"load": time.perf_counter() - t0}
    fingerprint = fingerprint or model_fingerprint(local)
    out = bundles.build_target(local, backend, out)
    if not bundles._writable(out):
        raise bundles.BundleError(f"cannot write the bundle {out}: its folder is read-only; pass --out DIR (a writable "
                          f"folder) and load it with --bundle DIR")
    with nullcontext() if lock_held else build_lock(out):  # the one place a build takes the lock
        clean_stale(out)
        bundles.check_target(out)
        blocks = {b.layer: b for b in experts.find_expert_blocks(model, config) if b.supported}
        if not blocks:
            raise ValueError(f"{model_path}: no supported MoE expert blocks; nothing to offload (it runs on stock MLX)")

        if cost is None and workload is not None and not chip:
            cost = workload_cost(out, log)
        profile, cost, plan = plan_model(model, tokenizer, config, blocks, backend, corpus=corpus, tokens=tokens,
                                         chunk_size=chunk_size, seed=seed, cost=cost, chip=chip, tune=tune,
                                         objective=objective, limits=limits, workload=workload, log=log,
                                         progress=progress, weight_format=weight_format, batched=batched,
                                         times=times, host=host_calibration)
        profile.model_fingerprint = fingerprint
        runs, why = registry.get(backend).available()
        if not runs:
            log(f"      note: {why}; this bundle is for a machine where {backend} runs (its programs are "
                f"checked here on a reference: Core ML's with the numpy MIL interpreter)")
        log(f"[3/4] {format_plan(plan)}")
        budget = default_memory_budget() if memory_budget == -1 else memory_budget
        resident = plan_resident(plan, model, blocks, cost, keep_mlx_experts=False, budget=budget)  # as loads run it
        log(f"      {describe(resident)}")
        check_budget(resident, budget)

        n_prog = plan.num_programs
        t1 = time.perf_counter()
        with folder(out) as tmp:
            manifest = _write_bundle(Path(tmp), plan, blocks, backend, weight_format, progress,
                                     (profile, cost), fingerprint, config)
        times["compile"] = time.perf_counter() - t1
        total = manifest.total_bytes()
        offloaded = sum(1 for lp in plan.layers if lp.groups or lp.shared)
        tiers = sum(len(g.tiers) for lp in plan.layers for g in [*lp.groups, *lp.shared])
        log(f"bundle written to {out}: {offloaded}/{len(plan.layers)} MoE layers offloaded, {n_prog} programs "
            f"({tiers} tiers), {total / 1e6:.1f} MB, {time.perf_counter() - t0:.1f} s")
        log("      time per stage: " + ", ".join(f"{k} {v:.1f} s" for k, v in times.items()))
        return out


def _program_jobs(plan, blocks):
    """What to compile, in plan.json's order: (rel folder, make_spec, (layer, group), (module, reference))
    for each routed group, then each shared expert. Experts and tiers come from the plan, the one source."""
    mods = {s.path: s.module for b in blocks.values() for s in b.shared}  # shared experts' MLPs
    jobs = []
    for lp in plan.layers:
        for gi, g in enumerate(lp.groups):
            mod = blocks[lp.layer].module
            jobs.append((
                Path("programs") / f"L{lp.layer:03d}" / f"g{gi:02d}",
                lambda lp=lp, g=g: spec_from_switch_glu(
                    blocks[lp.layer].module, layer=lp.layer, expert_ids=g.experts, tiers=g.tiers),
                (lp.layer, gi),
                (mod, lambda x, m=mod, ids=tuple(g.experts): verify.model_group(m, ids, x)),
            ))
        for si, sp in enumerate(lp.shared):
            mlp = mods[sp.path]
            jobs.append((
                Path("programs") / f"L{lp.layer:03d}" / f"s{si:02d}",
                lambda lp=lp, sp=sp: spec_from_dense_mlp(mods[sp.path], layer=lp.layer, tiers=sp.tiers),
                (lp.layer, f"s{si}"),
                (mlp, lambda x, m=mlp: verify.model_dense(m, x)),
            ))
    return jobs


def _write_bundle(tmp: Path, plan, blocks, backend, weight_format, progress, profile_cost, fingerprint, config):
    """Compile and verify every program into ``tmp``, then profile/plan/cost and the manifest that
    hashes them all. Returns the Manifest (``tmp`` becomes the bundle when the caller's folder() closes)."""
    profile, cost = profile_cost
    programs = []
    compiler = backend_class(backend)
    fmt = {"weight_format": weight_format} if weight_format else {}
    for rel, make_spec, (layer, group), (module, want) in progress_bar(
            _program_jobs(plan, blocks), desc="[4/4] programs", unit="prog", disable=not progress):
        built = compiler.build(make_spec(), tmp / rel, **fmt)  # the backend's entry: its files and metadata
        for f in (tmp / rel).rglob("*"):
            honour_umask(f)  # writers of program files may use 0600 temp files
        _verify_built(backend, tmp / rel, rel, built, layer, module, want)
        programs.append(bundles.ProgramEntry(layer, group, rel.as_posix(), built, bundles.files_under(tmp, rel)))
    profile.save(tmp / "profile.json")
    plan.save(tmp / "plan.json")
    cost.save(tmp / "cost.json")
    meta = {name: bundles.files_under(tmp, Path(name))[name] for name in ("profile.json", "plan.json", "cost.json")}
    manifest = bundles.Manifest(
        npumoe_version=__version__, backend=backend, model_fingerprint=fingerprint,
        model_type=config.get("model_type"), created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        meta=meta, programs=programs,
    )
    write_json(tmp / "manifest.json", manifest.to_dict())
    return manifest


def main(argv=None) -> int:
    """`npumoe build`: calibrate -> tune -> plan -> compile into a bundle."""
    p = argparse.ArgumentParser(prog="npumoe build", description="Build the offload bundle of a model.")
    p.add_argument("--model", required=True, help="Local folder or Hugging Face repo of an mlx_lm model.")
    p.add_argument("--backend", choices=registry.names(bundles=True), default=registry.DEFAULT)
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
    p.add_argument("--from-stats", metavar="FILE",
                   help="Size the ladders for the per-call loads `npumoe generate --stats FILE` saved (rebuilds).")
    p.add_argument("--trust-remote-code", action="store_true")
    add_weight_format_flag(p)
    add_calibrate_with_flag(p)
    args = p.parse_args(argv)
    if args.memory_budget is not None and not (args.memory_budget >= 0 and math.isfinite(args.memory_budget)):
        raise ValueError(f"--memory-budget must be a number of GB >= 0 (0 = no check), got {args.memory_budget}")
    at_least("--tokens", args.tokens, 1, "calibration tokens")
    at_least("--chunk-size", args.chunk_size, 1, "tokens per calibration chunk")
    if args.out:
        from ..outputs import check_dir

        check_dir(args.out, "--out")  # (a system folder, a file, no write access: named as --out, before the work)
    limits_from_flags(args.backend, args.max_tiers, args.max_group, args.max_programs, args.max_capacity)
    check_weight_format(args.backend, args.weight_format)
    if args.cost:
        load_cost(args.cost)  # a bad file fails before the model loads
    workload = Profile.load(args.from_stats) if args.from_stats else None  # a bad file fails first
    local = resolve_model(args.model)
    out = bundles.build_target(local, args.backend, args.out)
    if (out / "manifest.json").exists() and not args.force and workload is None:
        try:
            bundles.read(out, local, args.model)
            print(f"bundle {out} is up to date; nothing to do (--force rebuilds)")
            return 0
        except bundles.BundleError as e:
            _log.warning(f"existing bundle is stale, rebuilding: {e}")
    limits = limits_from_flags(args.backend, args.max_tiers, args.max_group, args.max_programs, args.max_capacity)
    cost = load_cost(args.cost) if args.cost else None
    build(
        str(local), args.backend, str(out), corpus=args.corpus or ("long-context", "qa", "code"),
        tokens=args.tokens, chunk_size=args.chunk_size, cost=cost, tune=not args.no_tune,
        objective=args.objective, chip=args.chip,
        limits=limits, trust_remote_code=args.trust_remote_code, progress=True,
        memory_budget=-1 if args.memory_budget is None else (int(args.memory_budget * 1e9) or None),
        workload=workload, weight_format=args.weight_format, host_calibration=CALIBRATE_WITH[args.calibrate_with],
    )
    return 0
