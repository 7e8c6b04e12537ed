"""Re-planning while serving: a loaded model's groups and ladders re-planned from its own traffic.

A plan is sized for its calibration; a server meets other calls (chat requests of every size,
batched prefill). Every offloaded layer already keeps its last calls' per-expert loads
(``OffloadExecutor.loads``, what ``--stats FILE`` saves for ``--from-stats``). ``Replanner``
compares the padding and overflow those calls saw with what the plan predicts and, once they
drift past it, plans again from the observed calls with the planner's own entry points: the
calls become a ``Profile`` (whole-call chunks, as batched calibration records them) and
``plan.make_plan`` cuts each layer's experts into new groups with new ladders, within the
program budget the bundle's plan had. Uneven loads inside a group pad whatever its ladder, so a
layer whose observed loads regroup better gets new programs: built and checked against the
model's own experts in the background (``<bundle>/replan/gNNN``, a folder written whole), then
swapped in as the layer's executor between two of its calls (a call in flight finishes on the
executor it started on; the next one starts on the new). A layer that cannot take new programs
(MLX released experts the new plan would put back on MLX; no weights to build from) keeps its
groups and gets new ladders only (``new_ladders``: same programs, the rows they already run).
Each candidate is kept only where the executor's own decisions on the observed calls
(``replay.replay_calls``) pad and overflow less. ``notify`` only says so. The re-planned layers go
to ``<bundle>/replan.json`` (temp + rename, after their programs' folder is in place), which
``attach`` applies on the next load of the same bundle.
"""

import json
import shutil
import threading
import time
from dataclasses import asdict, fields
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from ..atomic import folder, write_json
from ..backends import backend_class, load_backend
from ..build import verify
from ..build.programs import spec_from_switch_glu
from ..bundle.bundle import files_under
from ..cli.replay import replay_calls
from ..log import get as _get_log
from ..planning.plan import GroupPlan, LayerPlan, Plan, PlanLimits, _spread, below_ladder_tiers, make_plan, program_units
from ..planning.profiles import LayerCounts, Profile
from ..planning.residency import default_memory_budget, model_resident, module_bytes, size
from ..planning.tiers import DECODE_TIERS, choose_ladder, ladder_rounds
from . import release
from .executor import SMALL_PAIRS, OffloadExecutor
from .experts import find_expert_blocks, installed_blocks
from .stats import LayerStats, pct

_log = _get_log(__name__)

REPLAN_MODES = ("off", "notify", "auto")
REPLAN_FILE = "replan.json"
REPLAN_DIR = "replan"  # <bundle>/replan/gNNN: the programs of re-planned groups, one folder per generation
MIN_CALLS = 16  # offloaded calls a layer must see before its drift counts
PAD_MARGIN = 10.0  # points of padding over the plan's prediction that count as drift
OVERFLOW_MARGIN = 2.0  # points of overflow over the prediction that count as drift
GAIN = 1.0  # points of padding + overflow a candidate must save on the observed calls to be swapped in
PREFILL_STEP = 2048  # mlx_lm.server's prefill_step_size: its largest single-sequence call


def ladder_tally(loads: List[tuple], groups, ladders) -> tuple:
    """(padding %, overflow %) of calls ``loads`` [(tokens, k, counts (E,))] covered by ``ladders``
    (every round of the ladder rule, as ``overflow=rerun`` runs them)."""
    slots = padded = over = pairs = 0
    for _, _, c in loads:
        for ids, lad in zip(groups, ladders):
            load = c[ids]
            if not load.any():
                continue
            rows = sum(ladder_rounds(load, lad))
            slots += len(ids) * rows
            padded += len(ids) * rows - int(load.sum())
            over += int(np.maximum(load - lad[-1], 0).sum())
        pairs += int(c.sum())
    return pct(padded, slots), pct(over, pairs)


def new_ladders(ex: OffloadExecutor, capacities: List[int], max_tiers: int, loads=None,
                step: int = PREFILL_STEP) -> List[List[int]]:
    """Each group's ladder re-sized for the executor's recorded calls (at most ``max_tiers``, or
    the old count). The top tier is headroom as the planner's is: the largest call the server
    makes (its prefill step), so no single-sequence call overflows, whatever its size."""
    out = []
    for ids, old, p in zip(ex._groups, ex._tiers, ex.programs):
        caps = capacities if p.dynamic else sorted(set(p.tiers))
        peaks = np.asarray([c[ids].max() for _, _, c in (ex.loads if loads is None else loads)], float)
        peaks = peaks[peaks > 0]
        if peaks.size == 0:
            out.append(list(old))
            continue
        top = min(max(int(peaks.max()), int(old[-1]), step), max(caps))
        out.append(choose_ladder(_spread(peaks, top), caps, max(max_tiers, len(old)), top=top))
    return out


def served_calls(loads: List[tuple]) -> List[tuple]:
    """The recorded calls a plan sizes groups for: those past the small-call path (decode and
    prompt-cache remainders run at their exact rows on ``_small_tiers`` whatever the ladders)."""
    return [(int(t), int(k), np.asarray(c)) for t, k, c in loads if int(np.asarray(c).sum()) > SMALL_PAIRS]


def served_profile(plans: List[LayerPlan], calls: Dict[int, List[tuple]]) -> Profile:
    """Served calls ``calls`` (layer -> [(tokens, k, counts (E,))]) of the layers ``plans`` as a
    calibration ``Profile``: one whole-call chunk per call (``"call": true``, as batched
    calibration records them), so ``make_plan`` sizes groups and ladders for exactly these calls,
    top tier with its batched headroom."""
    layers = []
    for lp in plans:
        got = calls[lp.layer]
        total = np.sum([c for _, _, c in got], axis=0).astype(np.int64)
        chunks = [{"tokens": int(t), "counts": [int(x) for x in c], "call": True} for t, _, c in got]
        layers.append(LayerCounts(lp.layer, lp.path, lp.num_experts, lp.top_k, [int(x) for x in total], chunks))
    seen = sum(ch["tokens"] for ch in layers[0].chunks) if layers else 0
    return Profile(None, "", "served calls", int(seen), 0, layers)


def regroup(plans: List[LayerPlan], calls: Dict[int, List[tuple]], shapes: dict, cost, limits: PlanLimits,
            log=None, step: int = PREFILL_STEP) -> Dict[int, LayerPlan]:
    """New groups and ladders for the layers ``plans`` from their served ``calls``: the planner's
    own ``make_plan`` on ``served_profile`` (``shapes``: layer -> ExpertBlock, D/H/quant), within
    ``limits.max_programs``; top tiers sized for calls up to ``step`` tokens (the server's prefill
    step: the first calls served may all be short, later ones not). layer -> LayerPlan (layers
    left with no group are left out)."""
    plan = make_plan(served_profile(plans, calls), shapes, cost, limits, call_sizes=[step],
                     log=log or (lambda m: None))
    return {lp.layer: lp for lp in plan.layers if lp.groups}


def observed_tally(lp: LayerPlan, cost, calls: List[tuple], extra=(), overflow: str = "auto") -> tuple:
    """(padding %, overflow %) of ``lp`` on the observed ``calls`` [(tokens, k, counts (E,))] as the
    executor decides them (``replay.replay_calls``; ``extra``: the rows programs run below their ladders)."""
    if not calls:
        return 0.0, 0.0
    counts = np.stack([c for _, _, c in calls])
    t = replay_calls(lp, cost, counts, np.asarray([n for n, _, _ in calls]), overflow, extra)
    return pct(t.padded, t.slots), pct(t.overflow, int(counts.sum()))


def with_ladders(lp: LayerPlan, ladders: List[List[int]]) -> LayerPlan:
    d = asdict(lp)
    d["groups"] = [GroupPlan(list(g.experts), list(l)) for g, l in zip(lp.groups, ladders)]
    d["shared"] = list(lp.shared)
    return LayerPlan(**d)


def layer_plan_of(d: dict) -> LayerPlan:
    return LayerPlan(**{**d, "groups": [GroupPlan(**g) for g in d["groups"]], "shared": []})


class Replanner:
    """Watches a loaded model's offloaded layers; re-plans their groups and ladders when traffic drifts."""

    def __init__(self, model, mode: str = "notify", bundle: Optional[Path] = None, log=None,
                 capacities: Optional[List[int]] = None, max_tiers: int = 12, model_path=None,
                 limits: Optional[PlanLimits] = None, backend_options: Optional[dict] = None):
        if mode not in REPLAN_MODES:
            raise ValueError(f"--replan must be one of {', '.join(REPLAN_MODES)}, got {mode!r}")
        self.mode, self.bundle, self.log = mode, Path(bundle) if bundle else None, log or _log.info
        self.model, self.model_path = model, model_path
        self.execs = [m.executor for m in installed_blocks(model) if isinstance(m.executor, OffloadExecutor)]
        self.capacities = capacities or list(range(8, 4096 + 1, 8))
        self.max_tiers = max_tiers
        self.limits, self.backend_options = limits, backend_options or {}
        self.memory_budget = default_memory_budget()  # bytes resident a re-plan may reach (None: no check)
        self.generation, self.last_replan, self.last_started, self.predicted = 0, None, None, {}
        self.regrouped: List[int] = []  # layers whose groups the last re-plan changed (new programs)
        self._lock, self._thread, self.notified = threading.Lock(), None, False
        self.base = {}  # layer -> its stats when its plan last changed (drift counts calls since)
        self.judged = {}  # layer -> calls its last re-plan was made from: it is judged on as many
        self.retired = []  # (replaced executor, the layer's stats): counts of its calls in flight at the swap
        for ex in self.execs:  # the plan's own prediction: its ladders on the calls it has seen so far
            self.predicted[ex.plan.layer] = None

    FIELDS = ("slots", "padded", "overflow", "synced_pairs", "offloaded")

    def _observed(self, ex) -> dict:
        """Padding and overflow of the calls since the current plan went in (or since load)."""
        base = self.base.get(ex.plan.layer, {})
        d = {f: getattr(ex.stats, f) - base.get(f, 0) for f in self.FIELDS}
        return {"padding_pct": pct(d["padded"], d["slots"]),
                "overflow_pct": pct(d["overflow"], d["synced_pairs"]), "offloaded_calls": d["offloaded"]}

    def _fold(self) -> None:
        """Counts of calls that were in flight on a replaced executor when it was swapped out go to
        the layer's stats (the run's totals) and its drift base (they ran on the old plan); the old
        executor (and its programs) is then let go."""
        retired, self.retired = self.retired, []
        for old, shared in retired:
            got, old.stats = old.stats, LayerStats(old.plan.layer)
            base = self.base.get(old.plan.layer)
            for f in fields(LayerStats):
                if f.name in ("layer", "fallback"):
                    continue
                setattr(shared, f.name, getattr(shared, f.name) + getattr(got, f.name))
                if base is not None and f.name in base:
                    base[f.name] += getattr(got, f.name)

    def drifted(self) -> List[OffloadExecutor]:
        """Layers whose observed padding passed the prediction by ``PAD_MARGIN``, or whose overflow
        passed ``OVERFLOW_MARGIN``: every plan sizes its top tiers for ~0 overflow, so a plan that
        predicts more on its own calibration (a plan made for other calls) is off too."""
        with self._lock:
            self._fold()
        out = []
        for ex in self.execs:
            o, p = self._observed(ex), self.predicted.get(ex.plan.layer)
            if o["offloaded_calls"] < max(MIN_CALLS, self.judged.get(ex.plan.layer, 0)):
                continue
            pad, over = p if p is not None else (0.0, 0.0)
            if o["padding_pct"] > pad + PAD_MARGIN or o["overflow_pct"] > min(over, 0.0) + OVERFLOW_MARGIN:
                out.append(ex)
        return out

    def set_prediction(self, profile_loads: dict) -> None:
        """layer -> [(tokens, k, counts)] of the calibration: the plan's predicted (padding, overflow)."""
        for ex in self.execs:
            loads = profile_loads.get(ex.plan.layer)
            if loads:
                self.predicted[ex.plan.layer] = ladder_tally(loads, ex._groups, ex._tiers)

    def check(self, wait: bool = False) -> None:
        """After a request: on drift, notify, or re-plan in a background thread (``wait``: join it)."""
        with self._lock:
            self._fold()
        if self.mode == "off" or (self._thread is not None and self._thread.is_alive()):
            return
        drift = self.drifted()
        if not drift:
            return
        if self.mode == "notify":
            if not self.notified:
                self.notified = True
                self.log(f"layers {[ex.plan.layer for ex in drift]}: traffic pads or overflows past the "
                         f"plan's prediction; `--replan auto` re-plans the groups and ladders from it while serving")
            return
        self._thread = threading.Thread(target=self.replan, args=(drift,), daemon=True)
        self._thread.start()
        if wait:
            self._thread.join()

    def _plan_limits(self, execs: List[OffloadExecutor]) -> PlanLimits:
        """The backend's own limits (a new program may take any of its capacities) with the bundle
        plan's budget, less what the layers not re-planned keep."""
        base = self.limits or PlanLimits.for_backend(self.backend)
        lim = PlanLimits.for_backend(base.backend, max_group=base.max_group, max_program_bytes=base.max_program_bytes,
                                     max_axis=base.max_axis, weight_format=base.weight_format, call_ratio=base.call_ratio)
        others = [ex for ex in self.execs if ex not in execs]
        kept = sum(program_units(t, base.backend) for ex in others for t in ex._tiers)
        kept += sum(program_units(sp.tiers, base.backend) for ex in self.execs for sp in ex.plan.shared)
        lim.max_programs = max(base.max_programs - kept, 0)
        return lim

    @property
    def backend(self) -> str:
        return self.limits.backend if self.limits is not None else "onnx"

    def candidates(self, execs: List[OffloadExecutor], loads: Dict[int, List[tuple]]) -> Dict[int, tuple]:
        """layer -> (kind, LayerPlan, (padding %, overflow %) on the observed calls) of the best of: new
        groups (``make_plan`` on the served calls), new ladders on the same groups; only layers where
        it gains ``GAIN`` points of padding + overflow over the plan in place."""
        lim = self._plan_limits(execs)
        extra = below_ladder_tiers(lim)
        plan_of = {}
        served = {ex.plan.layer: served_calls(loads[ex.plan.layer]) for ex in execs}
        usable = [ex for ex in execs if served[ex.plan.layer]]
        blocks = {b.layer: b for b in find_expert_blocks(self.model) if b.supported}
        regroupable = [ex for ex in usable if self._can_build(ex, blocks.get(ex.plan.layer))]
        shapes = {ex.plan.layer: _no_shared(blocks[ex.plan.layer]) for ex in regroupable}
        if regroupable:
            plan_of = regroup([ex.plan for ex in regroupable], served, shapes, regroupable[0].cost, lim,
                              log=self.log)
        held = self._held_out(regroupable, loads, shapes, lim, extra) if plan_of else {}
        out, room = {}, self._memory_room()
        for ex in usable:
            calls = served[ex.plan.layer]
            every = [(int(t), int(k), np.asarray(c)) for t, k, c in loads[ex.plan.layer]]  # decode too: as stats count
            tally = lambda lp, ex=ex, every=every: observed_tally(lp, ex.cost, every, extra, ex.overflow)  # noqa: E731
            now = tally(ex.plan)
            opts = [("ladders", with_ladders(ex.plan, new_ladders(ex, self.capacities, self.max_tiers, calls)))]
            lp = plan_of.get(ex.plan.layer)
            if lp is not None and self._keeps_released(ex, lp):
                lp.shared = list(ex.plan.shared)
                opts.append(("groups", lp))
            scored = [(k, p, tally(p)) for k, p in opts]
            k, p, t = min(scored, key=lambda x: sum(x[2]))
            need = self._new_bytes(blocks[ex.plan.layer], p) if k == "groups" else 0
            if room is not None and need > room:
                self.log(f"re-plan: new groups for layer {ex.plan.layer} would need {size(need)} more resident "
                         f"while they load, over the memory budget of {size(self.memory_budget)} "
                         f"({size(max(room, 0))} left); new ladders only")
                (k, p, t), need = scored[0], 0  # the ladders (same groups, same programs: no new bytes)
            if sum(t) + GAIN <= sum(now):  # predicted from here on: on calls the new groups were not planned from
                out[ex.plan.layer] = (k, p, held.get(ex.plan.layer, t) if k == "groups" else t)
                room = None if room is None else room - need
        return out

    def _memory_room(self) -> Optional[int]:
        """Bytes the new programs may take under ``memory_budget``: what MLX and the programs hold now
        stays resident until the swap (the old programs go after it), so new groups add their
        experts' bytes in full. None: no budget (memory unknown, or set to None)."""
        if self.memory_budget is None:
            return None
        now = model_resident(self.model)
        return self.memory_budget - now["mlx"] - sum(u["on_programs"] for u in now["units"].values())

    @staticmethod
    def _new_bytes(block, lp: LayerPlan) -> int:
        """Bytes of a layer plan's new programs: its group experts' weights, as MLX stores them."""
        per_expert = module_bytes(block.module) / max(block.num_experts, 1)
        return int(sum(len(g.experts) for g in lp.groups) * per_expert)

    def _held_out(self, execs, loads, shapes, lim, extra) -> Dict[int, tuple]:
        """layer -> (padding %, overflow %) of new groups on calls they were not planned from (groups
        planned on every other recorded call, tallied on the rest, both ways): what the re-plan
        predicts for calls to come, so the drift that follows it is judged against an honest
        figure, not its fit to its own calls."""
        out = {}
        halves = [{ex.plan.layer: loads[ex.plan.layer][i::2] for ex in execs} for i in (0, 1)]
        tallies = {}
        for a, b in ((0, 1), (1, 0)):
            got = {l: served_calls(v) for l, v in halves[a].items()}
            use = [ex for ex in execs if got[ex.plan.layer]]
            if not use:
                return {}
            plans = regroup([ex.plan for ex in use], got, shapes, use[0].cost, lim)
            for ex in use:
                lp = plans.get(ex.plan.layer)
                rest = [(int(t), int(k), np.asarray(c)) for t, k, c in halves[b][ex.plan.layer]]
                if lp is None or not rest:
                    continue
                counts = np.stack([c for _, _, c in rest])
                t = replay_calls(lp, ex.cost, counts, np.asarray([n for n, _, _ in rest]), ex.overflow, extra)
                acc = tallies.setdefault(ex.plan.layer, [0, 0, 0, 0])
                acc[0] += t.padded
                acc[1] += t.slots
                acc[2] += t.overflow
                acc[3] += int(counts.sum())
        for l, (padded, slots, over, pairs) in tallies.items():
            out[l] = (pct(padded, slots), pct(over, pairs))
        return out

    def _can_build(self, ex: OffloadExecutor, block) -> bool:
        """New programs for this layer can be built here: its block, and its experts' weights (a
        layer whose experts MLX released is read back from the model's files, row by row)."""
        if block is None or ex.disabled:
            return False
        return release.record_of(block.module) is None or self.model_path is not None

    def _keeps_released(self, ex: OffloadExecutor, lp: LayerPlan) -> bool:
        """A released layer's new plan may not put a released expert on MLX (MLX no longer holds it)."""
        block = next((m for m in installed_blocks(self.model) if m.executor is ex), None)
        rec = release.record_of(block) if block is not None else None
        return rec is None or not set(lp.cold) & set(rec.ids)

    def replan(self, execs: List[OffloadExecutor]) -> dict:
        """New groups (new programs) or new ladders for ``execs`` from their recorded calls, swapped in
        between calls; written to ``<bundle>/replan.json``. Returns layer -> its new LayerPlan."""
        self.last_started = time.time()
        loads = {ex.plan.layer: list(ex.loads) for ex in execs}  # a snapshot: the serving thread keeps appending
        chosen = self.candidates(execs, loads)
        if not chosen:
            return {}
        gen = self.generation + 1
        built = {}  # layer -> (programs, manifest entries)
        fresh = {l: p for l, (k, p, _) in chosen.items() if k == "groups"}
        if fresh:
            try:
                built = self._build(fresh, gen)
            except Exception as e:  # a build or check that fails leaves the plan in place: ladders only then
                why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                self.log(f"re-plan: new programs for layers {sorted(fresh)} failed ({why}); "
                         f"keeping their groups")
                for l in list(fresh):
                    ex = next(e for e in execs if e.plan.layer == l)
                    chosen[l] = ("ladders", with_ladders(ex.plan, new_ladders(ex, self.capacities, self.max_tiers,
                                                                              served_calls(loads[l]))), None)
                fresh = {}
        with self._lock:
            for ex in execs:
                l = ex.plan.layer
                if l not in chosen:
                    continue
                kind, lp, t = chosen[l]
                if kind == "groups":
                    new = self._swap_executor(ex, lp, built[l][0])
                else:
                    stage(ex, [g.tiers for g in lp.groups])
                    new = ex
                self.base[l] = {f: getattr(new.stats, f) for f in self.FIELDS}
                self.judged[l] = len(loads[l])
                if t is not None:
                    self.predicted[l] = t
            self.regrouped = sorted(fresh)
            self.generation = gen
            self.last_replan = time.time()
            if self.bundle is not None:
                self._save(chosen, built, gen)
        self.log(f"re-planned layers {sorted(chosen)} from {sum(len(v) for v in loads.values())} served "
                 f"calls: new groups and programs for {sorted(fresh)}, new ladders for "
                 f"{sorted(set(chosen) - set(fresh))} (generation {gen})")
        return {l: lp for l, (_, lp, _) in chosen.items()}

    def _build(self, plans: Dict[int, LayerPlan], gen: int) -> dict:
        """Build and check the programs of the new groups; layer -> (programs, manifest entries).
        Folder ``<bundle>/replan/gNNN`` (written whole), or a temp folder without a bundle."""
        blocks = {b.layer: b for b in find_expert_blocks(self.model) if b.supported}
        root = (self.bundle / REPLAN_DIR / f"g{gen:03d}") if self.bundle is not None else None
        if root is None:
            import tempfile

            root = Path(tempfile.mkdtemp(prefix="npumoe-replan-"))
        compiler = backend_class(self.backend)
        fmt = {"weight_format": self.limits.weight_format} if self.limits is not None and self.limits.weight_format else {}
        entries = {}
        with folder(root) as tmp:
            for l, lp in plans.items():
                entries[l] = []
                for gi, g in enumerate(lp.groups):
                    rel = Path(f"L{l:03d}") / f"g{gi:02d}"
                    src, ids = self._weights(blocks[l], g.experts)
                    spec = spec_from_switch_glu(src, layer=l, expert_ids=ids, tiers=g.tiers)
                    spec.expert_ids = tuple(int(e) for e in g.experts)
                    out = compiler.build(spec, Path(tmp) / rel, **fmt)
                    entries[l].append({"dir": rel.as_posix(), "program": out, "files": files_under(Path(tmp), rel)})
        return {l: (self._load(blocks[l], lp, entries[l], root, check=True), entries[l]) for l, lp in plans.items()}

    def _weights(self, block, experts):
        """(a SwitchGLU holding ``experts``, their rows in it): the block itself, or for a layer whose
        experts MLX released, a twin read from the model's files (G experts' bytes)."""
        if release.record_of(block.module) is None:
            return block.module, list(experts)
        twin = release.rows_twin(block.module, block.path, list(experts), self.model_path)
        if twin is None:
            raise ValueError(f"layer {block.layer}: released experts cannot be read back from {self.model_path}")
        return twin, list(range(len(experts)))

    def _load(self, block, lp: LayerPlan, entries: List[dict], root: Path, check: bool) -> list:
        """The programs of ``entries`` (under ``root``), pinned to their files' hashes; ``check``: each
        runs a probe against the model's own experts now (else before its first call)."""
        be = load_backend(self.backend, **self.backend_options)
        out = []
        for g, e in zip(lp.groups, entries):
            prog = be.load(e["program"], root / e["dir"])
            if (prog.G, prog.D, list(prog.meta.get("expert_ids", ()))) != (len(g.experts), lp.D, list(g.experts)) \
                    or not set(g.tiers) <= set(prog.tiers):
                raise ValueError(f"{root / e['dir']} holds {prog.name}, not layer {lp.layer}'s group {g.experts}")
            prog.add_tiers([t for t in DECODE_TIERS if t < min(g.tiers)])
            src, ids = self._weights(block, g.experts)
            tol = verify.tolerance(self.backend, block.module, (e["program"] or {}).get("weight_format"))

            def probe(prog=prog, src=src, ids=ids, tol=tol, where=e["dir"]):
                x = verify.probe(prog.G, prog.D, verify.FIRST_USE_ROWS, seed=lp.layer)
                verify.check(prog, [min(prog.tiers)], lambda x: verify.model_group(src, ids, x), x, tol,
                             f"{REPLAN_DIR}/{where} ({prog.name})")

            files = {root / f: w["sha256"] for f, w in e["files"].items()}
            prog.expect_files({str(f.absolute()): h for f, h in files.items()})
            if check:
                probe()
            out.append(verify.Pinned(prog, list(files), files, None if check else probe))
        return out

    def _swap_executor(self, ex: OffloadExecutor, lp: LayerPlan, programs: list) -> OffloadExecutor:
        """A new executor for ``lp`` with ``programs``, taking over ``ex``'s stats, loads and notices; the
        block runs it from its next call (a call in flight finishes on ``ex``: one plan per call)."""
        new = OffloadExecutor(lp, programs, ex.cost, overflow=ex.overflow, router=ex.router, warn=ex.warn)
        new.stats, new.loads, new.noticed, new.notice = ex.stats, ex.loads, ex.noticed, ex.notice
        ex.stats = LayerStats(ex.plan.layer)  # a call in flight on ex counts apart: folded in by _fold, not as drift
        self.retired.append((ex, new.stats))
        for m in installed_blocks(self.model):
            if m.executor is ex:
                object.__setattr__(m, "executor", new)  # one attribute write: atomic for the serving thread
        self.execs = [new if e is ex else e for e in self.execs]
        return new

    def _save(self, chosen: dict, built: dict, gen: int) -> None:
        """``<bundle>/replan.json`` (temp + rename): per re-planned layer its plan and, for new groups,
        their programs' entries; folders of older generations no layer uses any more go."""
        saved = load_replan(self.bundle) or {"layers": {}}
        for l, (kind, lp, _) in chosen.items():
            entry = {"plan": {**asdict(lp), "shared": []}, "predicted": self.predicted.get(l)}
            if kind == "groups":
                at = f"{REPLAN_DIR}/g{gen:03d}"  # entries relative to the bundle, as its manifest's
                entry["programs"] = [{**e, "dir": f"{at}/{e['dir']}", "files": {f"{at}/{f}": w for f, w in e["files"].items()}}
                                     for e in built[l][1]]
            else:
                prev = saved["layers"].get(str(l))
                if isinstance(prev, dict) and prev.get("programs") and _same_groups(prev["plan"], lp):
                    entry["programs"] = prev["programs"]  # still those programs, new ladders
            saved["layers"][str(l)] = entry
        saved["generation"] = gen
        saved["plan_sha256"] = _plan_sha(self.bundle)
        write_json(self.bundle / REPLAN_FILE, saved)
        used = {e["dir"].split("/")[1] for v in saved["layers"].values() if isinstance(v, dict)
                for e in v.get("programs", [])}
        for d in (self.bundle / REPLAN_DIR).glob("g*"):
            if d.name not in used:
                shutil.rmtree(d, ignore_errors=True)

    def to_dict(self) -> dict:
        """What /v1/npumoe/stats shows under "replan"."""
        layers = []
        for ex in self.execs:
            p = self.predicted.get(ex.plan.layer)
            layers.append({"layer": ex.plan.layer, **self._observed(ex), "groups": len(ex.plan.groups),
                           "predicted_padding_pct": None if p is None else p[0],
                           "predicted_overflow_pct": None if p is None else p[1]})
        return {"mode": self.mode, "generation": self.generation, "last_replan": self.last_replan,
                "last_started": self.last_started, "running": self._thread is not None and self._thread.is_alive(),
                "regrouped_layers": self.regrouped, "layers": layers}


def _no_shared(block):
    """The block as the planner sees it, without its shared experts (their programs stay)."""
    from dataclasses import replace

    return replace(block, shared=[])


def _same_groups(plan: dict, lp: LayerPlan) -> bool:
    return [list(g["experts"]) for g in plan["groups"]] == [list(g.experts) for g in lp.groups]


def _plan_sha(bundle: Path) -> Optional[str]:
    """The bundle plan's sha256 (manifest): a saved re-plan belongs to that plan only."""
    try:
        with open(Path(bundle) / "manifest.json") as f:
            return json.load(f)["meta"]["plan.json"]["sha256"]
    except (OSError, KeyError, TypeError, ValueError):
        return None


def stage(ex: OffloadExecutor, ladders: List[List[int]]) -> None:
    """Give the executor new ladders for its next call: programs learn the row counts first."""
    for p, lad in zip(ex.programs, ladders):
        p.add_tiers([t for t in lad if t not in p.tiers])  # a no-op on static programs
    ex.pending_tiers = [list(l) for l in ladders]


def load_replan(bundle: Path) -> Optional[dict]:
    f = Path(bundle) / REPLAN_FILE
    if not f.is_file():
        return None
    with open(f) as fh:
        return json.load(fh)


def attach(model, mode: str, bundle: Optional[Path], log=None, model_path=None,
           backend_options: Optional[dict] = None) -> Optional[Replanner]:
    """A Replanner for a loaded model (None for ``off``); a saved ``replan.json`` of this bundle's plan
    is applied first: new groups on their saved programs (each checked against the model before its
    first call), new ladders where the groups match."""
    if mode == "off":
        return None
    log = log or _log.info
    limits = None
    if bundle is not None and (Path(bundle) / "plan.json").is_file():
        limits = Plan.load(Path(bundle) / "plan.json").limits
    r = Replanner(model, mode, bundle, log, model_path=model_path, limits=limits, backend_options=backend_options)
    saved = load_replan(bundle) if bundle is not None else None
    if saved and saved.get("plan_sha256", _plan_sha(bundle)) != _plan_sha(bundle):
        log("replan.json belongs to an earlier build of this bundle; not applied")
        saved = None
    blocks = {b.layer: b for b in find_expert_blocks(model) if b.supported} if saved else {}
    for ex in list(r.execs):
        v = (saved or {}).get("layers", {}).get(str(ex.plan.layer))
        if not v:
            continue
        if isinstance(v, list):  # ladders only (an earlier format)
            v = {"plan": {**asdict(with_ladders(ex.plan, v)), "shared": []}}
        lp = layer_plan_of(v["plan"])
        if v.get("programs"):
            try:
                if not r._keeps_released(ex, lp):
                    raise ValueError("MLX released experts this plan runs on MLX")
                progs = r._load(blocks[ex.plan.layer], lp, v["programs"], Path(bundle), check=False)
            except Exception as e:
                why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                log(f"layer {ex.plan.layer}: the re-planned programs in {bundle} cannot be used ({why}); "
                    f"serving the bundle's plan")
                continue
            lp.shared = list(ex.plan.shared)
            r._swap_executor(ex, lp, progs)
        elif _same_groups(v["plan"], ex.plan) and all(
                p.dynamic or set(g.tiers) <= set(p.tiers) for p, g in zip(ex.programs, lp.groups)):
            stage(ex, [g.tiers for g in lp.groups])
    if saved:
        r.generation = int(saved.get("generation", 0))
    profile = bundle / "profile.json" if bundle is not None else None
    if profile is not None and profile.is_file():
        from ..planning.plan import call_loads, prefill_call_sizes

        pr = Profile.load(profile)
        prof = {l.layer: l for l in pr.layers}
        sizes = lambda l: prefill_call_sizes(l, pr.chunk_size) if pr.chunk_size else None  # noqa: E731
        r.set_prediction({ex.plan.layer: [(0, 0, row) for row in call_loads(prof[ex.plan.layer],
                                                                               sizes(prof[ex.plan.layer]))[0]]
                          for ex in r.execs if ex.plan.layer in prof})
    for l, v in (saved or {}).get("layers", {}).items():  # a re-planned layer's prediction is its re-plan's
        if isinstance(v, dict) and v.get("predicted") is not None:
            r.predicted[int(l)] = tuple(v["predicted"])
    return r
