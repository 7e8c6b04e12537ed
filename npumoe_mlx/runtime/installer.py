"""Put a bundle on a model: check its plan against the model, load its programs, check
them against the model's own experts, and install the executors at the seam
(experts.py). ``offload.apply`` calls ``install`` after ``bundle.read``."""

from pathlib import Path
from typing import List, Optional

from ane_kernels.spec import program_name

from ..backends import load_backend
from ..build import verify
from ..bundle.bundle import Bundle, BundleError, LazyHint, ProgramEntry, safe_path
from ..hints import build_cmd, one_line
from ..planning.residency import default_memory_budget, plan_resident
from . import experts, release
from .executor import OffloadExecutor, SharedExecutor
from .guard import Notice
from .options import OffloadOptions
from .release import release_model


def _router_of(block: experts.ExpertBlock):
    parent = block.parent
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
    opts: OffloadOptions,
    blocks: Optional[List[experts.ExpertBlock]] = None,
    model_path=None,
) -> List:
    """Check the plan against the model, load the programs, check them against the
    model's experts (a sample; all tiers of all with ``opts.verify``), install the executors.
    Then, unless ``opts.keep_mlx_experts``, ``opts.overflow="spill"`` (overflow runs on MLX) or no
    ``model_path`` to reload from, release MLX's copy of the experts of program-only layers
    (residency.program_only, release.py). ``blocks``: the model's ``experts.find_expert_blocks``
    if the caller has them: the model is walked once per install."""
    overflow, quiet = opts.overflow, opts.quiet
    hint = LazyHint(bundle.model_name, bundle.plan.backend, bundle.path, bundle.model_path)
    found = experts.find_expert_blocks(model, config) if blocks is None else blocks
    blocks = {b.layer: b for b in found}
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
    be = load_backend(bundle.plan.backend, **(opts.backend_options or {}))
    progs = {p.key: p for p in bundle.manifest.programs}
    loaded = {}  # (layer, group) -> (program, want_fn, module): groups, then shared experts
    for lp in bundle.plan.layers:
        for gi, g in enumerate(lp.groups):
            p = progs[(lp.layer, gi)]
            prog = _load_program(be, bundle, p, hint)
            _check_program(prog, lp, gi, p.dir, bundle.path, hint)
            mod = blocks[lp.layer].module
            prog.add_tiers(  # 1..32-row calls for decode on released layers (dynamic programs)
                [t for t in (1, 2, 4, 8, 16, 32) if t < min(g.tiers)])
            loaded[(lp.layer, gi)] = (prog, _model_group(model, model_path, blocks[lp.layer], tuple(g.experts)), mod)
    shared = _load_shared(bundle, found, be, progs, hint)
    for key, (mlp, _, prog) in shared.items():
        loaded[key] = (prog, lambda x, m=mlp: verify.model_dense(m, x), mlp)
    for k, (prog, _, _) in loaded.items():  # whole-file hashes for the bytes a session copies (onnx)
        prog.expect_files({str((bundle.path / f).absolute()): w["sha256"] for f, w in progs[k].files.items()})
    probed = _verify_loaded(bundle, loaded, progs, everything=opts.verify, hint=hint)
    pinned = {k: verify.Pinned(prog, [bundle.path / f for f in progs[k].files],  # read() checked the paths
                               {bundle.path / f: w["sha256"] for f, w in progs[k].files.items()},
                               None if k in probed else _probe(bundle, loaded[k], progs[k].dir, k[0]), hint)
              for k, (prog, _, _) in loaded.items()}
    executors = {}
    for lp in bundle.plan.layers:
        programs = [pinned[(lp.layer, gi)] for gi in range(len(lp.groups))]
        router = _router_of(blocks[lp.layer]) if overflow == "drop" else None
        executors[lp.layer] = OffloadExecutor(lp, programs, bundle.cost, overflow=overflow, router=router)
    once = [False]  # one re-plan notice per model, not one per layer (48 at full scale)
    for ex in executors.values():
        ex.noticed = once
    shared_ex = [(mlp, SharedExecutor(key[0], sp, pinned[key])) for key, (mlp, sp, _) in shared.items()]
    notice = Notice(build_cmd(bundle.model_name, bundle.plan.backend, force=True))
    experts.install(model, lambda blk: executors.get(blk.layer), config, quiet=quiet, notice=notice, blocks=found)
    for mlp, ex in shared_ex:
        experts.install_dense(mlp, ex, f"layer {ex.stats.layer} shared expert", notice)
    if model_path is not None and not opts.keep_mlx_experts and overflow != "spill":  # spill: overflow runs on MLX
        dynamic = all(p.dynamic for p in pinned.values())
        gone = plan_resident(bundle.plan, model, blocks, bundle.cost, opts.keep_mlx_experts, default_memory_budget(),
                             dynamic)["release"]
        log = (lambda msg: None) if quiet else None
        release_model(model, model_path, {l: (blocks[l].module, blocks[l].path, ids) for l, ids in gone.items()}, log)
    return list(executors.values()) + [ex for _, ex in shared_ex]


def _model_group(model, model_path, block: experts.ExpertBlock, ids: tuple):
    """The check's reference, ``x -> verify.model_group(block, ids, x)``. A model ``load`` read
    lazily (to release experts) is checked on a twin read from its files (release.file_twin):
    evaluating the block's own lazy arrays would keep every checked layer's stacked experts
    in memory until the release (measured: the demo's load peaked at +0.2 GB, its expert bytes)."""
    if model_path is None or not model.__dict__.get(release.LOADED_LAZILY):
        return lambda x: verify.model_group(block.module, ids, x)

    def want(x):
        twin = (release.rows_twin(block.module, block.path, ids, model_path)  # G experts' bytes, not the layer's
                or release.file_twin(block.module, block.path, ids, release.file_tensors(model, model_path)))
        return verify.model_group(block.module, ids, x) if twin is None else verify.model_group(twin, range(len(ids)), x)

    return want


def _load_program(be, bundle: Bundle, p: ProgramEntry, hint: str):
    try:
        return be.load(p.program, safe_path(bundle.path, p.dir))  # read() checked its files
    except Exception as e:  # hashes matched, yet the backend cannot read it: edited by hand
        why = one_line(e)
        raise BundleError(f"{bundle.path}: cannot load program {p.dir} ({why}); {hint}") from e


def _probe(bundle: Bundle, item: tuple, where: str, seed: int):
    """The probe a program not checked at load runs before its first call (verify.Pinned)."""
    prog, want, module = item

    def run() -> None:
        x = verify.probe(prog.G, prog.D, verify.FIRST_USE_ROWS, seed=seed)
        verify.check(prog, [min(prog.tiers)], want, x, verify.tolerance(bundle.plan.backend, module),
                     f"{where} ({prog.name})")

    return run


def _verify_loaded(bundle: Bundle, loaded: dict, progs: dict, everything: bool, hint: str) -> set:
    """Run a seeded probe through the programs (a sample, or all tiers of all with ``everything``)
    and compare with the model's experts on stock MLX; a mismatch refuses the bundle. Returns
    the keys probed (the others are probed before their first call)."""
    firsts = {}
    for key in loaded:
        firsts.setdefault(key[0], key)
    chosen = verify.pick(list(loaded), everything, firsts)
    for key in chosen:
        prog, want, module = loaded[key]
        tiers = sorted(prog.tiers) if everything else [min(prog.tiers)]
        x = verify.probe(prog.G, prog.D, verify.PROBE_ROWS, seed=key[0])
        try:
            fmt = progs[key].weight_format
            verify.check(prog, tiers, want, x, verify.tolerance(bundle.plan.backend, module, fmt),
                         f"{progs[key].dir} ({prog.name})")
        except verify.ProgramMismatch as e:
            raise BundleError(f"{bundle.path}: {e}; {hint}") from None
    return set(chosen)


def _load_shared(bundle: Bundle, blocks: List[experts.ExpertBlock], be, progs: dict, hint: str) -> dict:
    """(layer, "s<i>") -> (mlp, plan entry, program) for every shared expert the plan offloads,
    checked against the model (its blocks' shared experts)."""
    mods = {s.path: s.module for b in blocks for s in b.shared}
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
                raise BundleError(f"{bundle.path}: {p.dir} does not fit shared expert {sp.path}; {hint}")
            out[(lp.layer, f"s{si}")] = (mlp, sp, prog)
    return out


def _check_program(prog, lp, gi: int, rel: str, root: Path, hint: str) -> None:
    """The loaded program is the one the plan wants: its metadata names layer and expert ids."""
    g = lp.groups[gi]
    want = program_name(lp.layer, g.experts)
    got = (prog.meta.get("layer"), list(prog.meta.get("expert_ids", ())), prog.G, prog.D)
    if got != (lp.layer, list(g.experts), len(g.experts), lp.D) or not set(g.tiers) <= set(prog.tiers):
        raise BundleError(
            f"{root}: {rel} holds program {prog.name} (G={prog.G}, D={prog.D}, tiers {list(prog.tiers)}) but the "
            f"plan wants {want} (G={len(g.experts)}, D={lp.D}, tiers {list(g.tiers)}); {hint}"
        )
