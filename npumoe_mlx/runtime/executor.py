"""One offloaded MoE layer at run time: count -> tiers -> gather -> programs -> scatter.

Per call of ``experts(x, inds)`` (x: (..., D), inds: (..., k)):
1. calls below the plan's ``min_tokens`` (decode) go straight to stock MLX, no sync,
   unless MLX released the layer's program experts (release.py): then every call runs
   programs, decode on their 1..32-row tiers, overflow on the ladder again, and on dynamic
   programs any multiple of 8 rows (``_small_tiers``); a released call of up to
   ``SMALL_PAIRS`` pairs (decode) skips steps 2-3: the sync brings x and the indices, and
   its slots come straight from them (``_small_slots``: no MLX sort, no cost model);
2. MLX sorts and counts the pairs; ONE host sync brings order, counts and x over;
3. the cost model picks programs or MLX for this call, and per group whether
   overflow past the top tier runs the ladder again or spills to MLX;
4. cold experts and spill start on MLX (``mx.async_eval``) before the programs run;
5. rows are gathered once into the layout each program takes (``dispatch.gather``: (G, C, D);
   (G, D, C) for Core ML, gathered on MLX), each resident group's program runs at its tier and its rows
   land in ONE buffer in slot order (onnx writes them in place); each pair's row is taken
   from it and the MLX side's rows are set over theirs: (..., k, D) in x.dtype. MLX on a
   GPU: the buffer goes over in one copy (cast to x.dtype as it is copied) and MLX takes
   the rows; MLX on the CPU: numpy takes them and the (P, D) result goes over in one copy
   (one MLX buffer per call, not two). The host passes are ``dispatch``'s (per program row, and
   per pair: ``dispatch.finish_bytes``), what the cost model prices; tests/test_copies.py.
The call is three stages: ``_prepare`` (steps 1-3), ``_start_mlx`` + ``_run_programs``
(4-5), ``_finish`` (the buffer to MLX). A program that raises or returns a wrong shape
or non-finite values disables the layer's offload for the rest of the run (one warning,
``_guarded``, shared with ``SharedExecutor``); that call reruns on MLX (which reads a
released layer's experts back from the safetensors first).
"""

import time
from bisect import bisect_left
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..planning.cost import CostModel
from .dispatch import checked, finish_on_host, moved, run_calls
from .experts import SwitchGLU, installed_blocks, stock_dense, stock_experts
from ..hints import build_cmd
from ..planning.plan import LayerPlan, call_context, decide
from ..planning.profiles import LayerCounts, Profile
from .release import record_of
from .stats import LayerStats, total  # noqa: F401 (LayerStats: callers' name)
from ..planning.tiers import OVERFLOW_MODES, CallContext, CallDecision, Slots, ladder_rounds, plan_slots
from ..build.verify import first_use
from ..log import get as _get_log

_log = _get_log(__name__)

MAX_LOADS = 4096  # per-call loads kept per layer for --stats FILE
# Released layers: calls of up to this many routed pairs (decode, small batches) skip the cost
# model (every pair runs on programs anyway) and MLX's sort: slots straight from the indices.
SMALL_PAIRS = 64
ROW_STEP = 8  # released layers, dynamic programs: row counts are multiples of this (below it: the decode tiers)
EXACT_ROWS = 32  # dynamic programs: every row count up to this (a small call's peak load, unpadded)
OVERFLOW_NOTICE = 0.05  # overflow rate that prints the re-plan notice (plans size top tiers for ~0)


def _warn(msg: str) -> None:
    _log.warning(msg)


def _router_logits(router: Optional[nn.Module], x: mx.array, num_experts: int) -> Optional[mx.array]:
    if router is None:
        return None
    if isinstance(router, (nn.Linear, nn.QuantizedLinear)):
        return router(x)
    w = router.get("weight") if isinstance(router, dict) else None
    if isinstance(w, mx.array) and w.shape == (num_experts, x.shape[-1]):
        return x @ w.T
    return None


class OffloadExecutor:
    """Executor for one layer: ``executor(experts, x, inds) -> (..., k, D)``."""

    bakes_weights = True  # programs hold the weights: experts.py checks them before each call

    def __init__(
        self,
        plan: LayerPlan,
        programs: Sequence,  # one per plan.groups entry: .run(x (G,C,D) f32, tier) -> (G,C,D)
        cost: CostModel,
        overflow: str = "auto",
        router: Optional[nn.Module] = None,
        warn: Callable[[str], None] = None,
    ):
        if overflow not in OVERFLOW_MODES:
            raise ValueError(f"overflow must be one of {OVERFLOW_MODES}, got {overflow!r}")
        if len(programs) != len(plan.groups):
            raise ValueError(f"layer {plan.layer}: {len(programs)} programs for {len(plan.groups)} groups")
        self.plan, self.programs, self.cost = plan, list(programs), cost
        self.overflow, self.router, self.warn = overflow, router, warn or _warn
        self.stats = LayerStats(plan.layer)
        self.loads: List[tuple] = []  # (tokens, k, counts (E,)) of synced calls, for `--stats FILE`
        self._top = np.full(plan.num_experts, np.iinfo(np.int64).max)  # (E,) each resident expert's top tier
        for g in plan.groups:
            self._top[g.experts] = g.tiers[-1]
        self.noticed = [False]  # shared by a model's executors (installer): one re-plan notice per model
        self.notice = _warn  # advice (not a fault): the re-plan notice
        self.disabled = not plan.groups
        self._groups = [np.asarray(g.experts) for g in plan.groups]
        self._tiers = [list(g.tiers) for g in plan.groups]
        self._cold = np.zeros(plan.num_experts, bool)
        self._cold[plan.cold] = True
        self._released_tiers = None
        self._ctx = None  # _context, once per ladder set
        self.pending_tiers = None  # ladders re-planned while serving, taken at the next call (replan.py)
        self._group_of = np.full(plan.num_experts, -1, np.int64)  # (E,) each expert's group, -1: none
        self._pos = np.zeros(plan.num_experts, np.int64)  # (E,) its index within the group
        for gi, ids in enumerate(self._groups):
            self._group_of[ids], self._pos[ids] = gi, np.arange(ids.size)

    def _swap(self, ladders: List[List[int]]) -> None:
        """Run from now on with these ladders (same groups, same programs: replan.py)."""
        self.pending_tiers = None
        for g, lad in zip(self.plan.groups, ladders):
            g.tiers = list(lad)
            self._top[g.experts] = lad[-1]
        self._tiers = [list(l) for l in ladders]
        self._released_tiers = self._ctx = None

    def _decide(self, counts: np.ndarray, released: bool = False) -> CallDecision:
        """The plan's decision for this call, by the path replay and the planner take (``plan.decide``);
        released: MLX lacks these experts, every pair runs on programs."""
        return decide(self._context(), counts, released)

    def _context(self) -> CallContext:
        """This layer's ``tiers.CallContext``, once per ladder set (``_swap`` drops it); the row
        counts the programs run besides their ladders (``_small_tiers``) are asked for when a
        call first needs them (a small call, a released layer)."""
        if self._ctx is None:
            self._ctx = call_context(self.plan, self.cost, self.overflow, self._small_tiers, self._groups, self._cold)
        return self._ctx

    def _small_tiers(self) -> List[List[int]]:
        """The row counts a released layer's calls use: each group's ladder plus the program's
        tiers below it (the 1..32-row decode tiers the installer adds). A dynamic program (one
        onnx session, symbolic row count) takes any row count, so its ladder also gets every
        multiple of ``ROW_STEP`` up to its top: a load the calibration never saw (a 512-token
        call on a 256-token calibration doubles the loads) rounds up by at most ROW_STEP - 1
        rows instead of jumping to the top tier (measured: 49% of a qwen3-dims prefill's slots
        were padding that way)."""
        if self._released_tiers is None:
            self._released_tiers = []
            for p, ts in zip(self.programs, self._tiers):
                lad = {t for t in p.tiers if t < ts[0]} | set(ts)
                if p.dynamic:
                    grid = [t for t in range(1, EXACT_ROWS + 1) if t not in lad]  # small calls: their exact peak
                    grid += [t for t in range(ROW_STEP, ts[-1], ROW_STEP) if t not in lad and t > EXACT_ROWS]
                    p.add_tiers(grid)  # same session: no new weights
                    lad |= set(grid)
                self._released_tiers.append(sorted(lad))
        return self._released_tiers

    def _small_slots(self, flat: np.ndarray, counts: np.ndarray, k: int) -> Optional[Slots]:
        """A released layer's small call placed without the cost model: each group hit runs
        once at the smallest of its ``_small_tiers`` that holds its busiest expert. flat: (P,)
        expert of every pair; counts: (E,). None when a load passes the top tier (the general
        path reruns the ladder). Same slot layout as ``plan_slots``: (group, expert, column)."""
        ladders, gof = self._small_tiers(), self._group_of[flat]  # (P,) each pair's group
        hit = np.unique(gof[gof >= 0])
        off, cap = np.zeros(len(self._groups) + 1, np.int64), np.zeros(len(self._groups) + 1, np.int64)
        start, calls = 0, []
        for gi in hit.tolist():
            ids, lad = self._groups[gi], ladders[gi]
            j = bisect_left(lad, int(counts[ids].max()))
            if j == len(lad):
                return None
            off[gi], cap[gi] = start, lad[j]
            calls.append((gi, ids, int(lad[j]), start))
            start += ids.size * int(lad[j])
        P = flat.size
        order = np.argsort(flat, kind="stable")
        rank = np.empty(P, np.int64)
        rank[order] = np.arange(P) - (np.cumsum(counts) - counts)[flat[order]]  # (P,) pair's column in its expert
        ok = gof >= 0
        loc = np.where(ok, off[gof] + self._pos[flat] * cap[gof] + rank, -1)
        src = np.zeros(start, np.int64)  # (S,) token row of each slot (padding: row 0)
        src[loc[ok]] = np.nonzero(ok)[0] // k
        out = Slots(calls=[(gi, ids, c, src[o : o + ids.size * c]) for gi, ids, c, o in calls], loc=loc)
        out.slots, out.padded = int(start), int(start - ok.sum())
        return out

    def _record(self, n_tokens: int, k: int, counts: np.ndarray) -> None:
        """Keep the call's loads (the last MAX_LOADS) and notice overflow well above the plan's."""
        st = self.stats
        self.loads.append((n_tokens, k, counts))
        del self.loads[:-MAX_LOADS]
        st.synced_pairs += int(counts.sum())
        st.overflow += int(np.maximum(counts - self._top, 0).sum())  # one vector op, not one per group
        if not self.noticed[0] and st.synced_pairs >= 64 * k and st.overflow > OVERFLOW_NOTICE * st.synced_pairs:
            self.noticed[0] = True
            self.notice(f"layer {self.plan.layer}: {st.overflow_pct:.0f}% of routed pairs overflow "
                      f"their group's top tier (the plan expects ~0; other layers may too: `--stats` counts each); "
                      f"save this workload with `npumoe generate "
                      f"--stats FILE`, see the new plan with `npumoe plan --from-stats FILE` and rebuild with "
                      f"`npumoe convert --hf-path M --refresh FILE` (a converted model) or "
                      f"`{build_cmd('M', from_stats='FILE')}`")

    # --- the call: prepare (one host sync) -> run (MLX side, programs) -> finish (one array back) ---
    def __call__(self, experts: SwitchGLU, x: mx.array, inds: mx.array) -> mx.array:
        self.stats.calls += 1
        if self.pending_tiers is not None:  # re-planned while serving (replan.py): between calls only
            self._swap(self.pending_tiers)
        released = record_of(experts) is not None  # MLX no longer holds the program experts
        if self.disabled or not self.plan.offloads(x.size // x.shape[-1], released):
            return stock_experts(experts, x, inds)
        c = self._prepare(x, inds, released)
        if c is None:  # the cost model keeps this call on MLX
            return stock_experts(experts, x, inds)
        y_mlx = self._start_mlx(experts, c)  # first, so MLX runs while the programs do
        y = _guarded(self, f"layer {self.plan.layer}", "layer", lambda: self._run_programs(c))
        if y is None:  # a program failed: this call (and the layer from now on) on MLX
            return stock_experts(experts, x, inds)
        return self._finish(c, y, y_mlx)

    def _prepare(self, x: mx.array, inds: mx.array, released: bool = False) -> Optional["_Call"]:
        """Sort and count the pairs, bring them and x over in the one host sync, decide the call
        (every pair on programs when MLX released the layer's experts) and place its pairs; None
        when the call stays on MLX."""
        D, k = x.shape[-1], inds.shape[-1]
        flat = inds.reshape(-1)  # (P,)
        drop = self.overflow == "drop"
        if released and not drop and flat.size <= SMALL_PAIRS:
            return self._prepare_small(x, flat, tuple(inds.shape), released)
        logits = _router_logits(self.router, x.reshape(-1, D), self.plan.num_experts) if drop else None
        score = None
        if logits is not None:
            score = mx.take_along_axis(logits, inds.reshape(-1, k).astype(mx.int32), axis=-1).reshape(-1)
        order = mx.argsort(flat)
        counts = mx.zeros((self.plan.num_experts,), mx.int32).at[flat].add(1)
        x32 = x.reshape(-1, D).astype(mx.float32)  # (N, D): a copy only when x is not float32
        mx.eval(order, counts, x32, *([score] if score is not None else []))  # the one host sync
        t0 = time.perf_counter()  # upstream layers finished in that sync: time only our part
        order_np, counts_np, flat_np = np.array(order), np.array(counts), np.array(flat)
        if score is not None:  # paper's drop mode: within an expert, highest router score first
            order_np = np.lexsort((-np.array(score.astype(mx.float32)), flat_np))
        self._record(x.size // D, k, counts_np)
        d = self._decide(counts_np, released)
        if not drop and not d.offload:
            return None
        s = plan_slots(order_np, counts_np, k, self._groups, self._tiers, caps=[c[:r] for c, r in zip(d.caps, d.rounds)])
        left = np.nonzero(s.loc < 0)[0]  # pairs no program took: cold experts, overflow
        dropped = left[:0]
        if drop:
            cold = self._cold[flat_np[left]]
            left, dropped = left[cold], left[~cold]
        return _Call(x32, tuple(inds.shape), x.dtype, s, flat_np, left, dropped, t0)

    def _prepare_small(self, x: mx.array, flat: mx.array, shape: tuple, released: bool) -> Optional["_Call"]:
        """``_prepare`` for a released layer's small call (decode): the host sync brings only x
        and the indices over (no MLX sort or count), slots come from ``_small_slots``."""
        D, k = x.shape[-1], shape[-1]
        x32 = x.reshape(-1, D).astype(mx.float32)  # (N, D)
        mx.eval(x32, flat)  # the one host sync
        t0 = time.perf_counter()
        flat_np = np.array(flat).astype(np.int64)  # (P,)
        counts = np.bincount(flat_np, minlength=self.plan.num_experts)
        self._record(x32.shape[0], k, counts)
        s = self._small_slots(flat_np, counts, k)
        if s is None:  # past the small tiers' top: the ladder again, as the general path does it
            d = self._decide(counts, released)
            if not d.offload:
                return None
            s = plan_slots(np.argsort(flat_np, kind="stable"), counts, k, self._groups, self._tiers,
                           caps=[c[:r] for c, r in zip(d.caps, d.rounds)])
        if not s.calls:  # every pair on an expert without a program: MLX's compact copy
            return None
        left = np.nonzero(s.loc < 0)[0]
        return _Call(x32, shape, x.dtype, s, flat_np, left, left[:0], t0, small=True)

    def _start_mlx(self, experts: SwitchGLU, c: "_Call") -> Optional[mx.array]:
        """The leftover pairs on MLX, started now: (L, D) float32, or None."""
        if not c.left.size:
            return None
        tok = mx.array(c.left // c.k, dtype=mx.int32)
        e = mx.array(c.flat[c.left], dtype=mx.uint32)[:, None]
        y = stock_experts(experts, c.x32[tok], e).reshape(-1, c.D)  # (L, D)
        mx.async_eval(y)
        return y

    def _run_programs(self, c: "_Call") -> np.ndarray:
        """Every program call of ``c``: rows gathered in, outputs in slot order: (S + 1, D)
        float32, row S zero (the row of pairs no program took: MLX's, dropped)."""
        s, D = c.slots, c.D
        x_np = np.asarray(c.x32)  # (N, D), no copy
        outs = np.empty((s.slots + 1, D), np.float32)  # slot order: each call writes its rows in place
        outs[s.slots] = 0.0
        if not self.__dict__.get("all_checked"):  # every byte and the probe, before a program's first call
            first_use(self.programs[call[0]] for call in s.calls)
            self.all_checked = all(p.ready for p in self.programs)
        tp = time.perf_counter()
        n = (self.cost.decode_workers or self.cost.workers) if c.small else self.cost.workers  # tune's choices
        run_calls(self.programs, s.calls, x_np, outs, n, inputs=self._gather_on_mlx(c))  # several at once if tune
        self.stats.program_s += time.perf_counter() - tp  # chose so; checked
        return outs

    def _gather_on_mlx(self, c: "_Call") -> dict:
        """Call index -> (G, D, C) float32 rows of each call whose program is channels-first
        (Core ML), gathered and transposed by MLX (the GPU on a Mac: no host pass; numpy took
        16 B per element for it), on a stream of its own so it does not wait behind the MLX
        side's work; one eval for them all. The arrays are views of MLX's buffers (no copy)."""
        idx = [i for i, (gi, *_) in enumerate(c.slots.calls) if self.programs[gi].input_layout == "GDC"]
        if not idx:
            return {}
        with mx.stream(_gather_stream()):
            xs = {i: mx.contiguous(c.x32[mx.array(c.slots.calls[i][3], dtype=mx.int32)]
                                   .reshape(len(c.slots.calls[i][1]), c.slots.calls[i][2], c.D).swapaxes(1, 2))
                  for i in idx}
        mx.eval(list(xs.values()))
        return {i: np.asarray(a) for i, a in xs.items()}

    def _finish(self, c: "_Call", outs: np.ndarray, y_mlx: Optional[mx.array]) -> mx.array:
        """The programs' rows and the MLX side's as one (..., k, D) array in x.dtype, each pair's
        row taken from the slot buffer (pairs without a slot: the zero row; the MLX side's rows
        are set over theirs). MLX on the CPU (``dispatch.finish_on_host``): numpy takes the rows
        and the (P, D) result goes over in one copy; else the slot buffer goes over in one copy
        and MLX takes the rows on its device (``dispatch.finish_bytes`` prices either)."""
        st, P, S = self.stats, c.flat.size, c.slots.slots
        slot = np.where(c.slots.loc >= 0, c.slots.loc, S)  # (P,) each pair's slot, S: none (dropped: zero)
        if finish_on_host():
            rows = np.take(outs, slot, axis=0)  # (P, D) float32 in pair order
            y = mx.array(rows, dtype=c.dtype)  # cast to x.dtype as it is copied over (same bits as astype)
            moved(2 * rows.nbytes + rows.nbytes + rows.size * y.dtype.size, pair=True)
        else:
            y = mx.array(outs, dtype=c.dtype)  # (S + 1, D), cast to x.dtype as it is copied over
            moved(outs.nbytes + outs.size * y.dtype.size)
            y = y[mx.array(slot, dtype=mx.int32)]  # (P, D) on the MLX side
        if y_mlx is not None:
            y[mx.array(c.left, dtype=mx.int32)] = y_mlx.astype(c.dtype)
        st.offloaded += 1
        st.program_calls += len(c.slots.calls)
        st.slots += c.slots.slots
        st.padded += c.slots.padded
        st.pairs += P
        st.spilled += int(c.left.size)
        st.dropped += int(c.dropped.size)
        st.offload_call_s += time.perf_counter() - c.t0
        return y.reshape(*c.shape, c.D)


_GATHER_STREAM = []


def _gather_stream():
    """The stream the channels-first gathers run on (one per process, made on first use)."""
    if not _GATHER_STREAM:
        _GATHER_STREAM.append(mx.new_stream(mx.default_device()))
    return _GATHER_STREAM[0]


@dataclass
class _Call:
    """One offloaded call between its stages."""

    x32: mx.array  # (N, D) float32, evaluated
    shape: tuple  # inds.shape: (..., k)
    dtype: mx.Dtype  # x.dtype, the result's
    slots: Slots
    flat: np.ndarray  # (P,) expert of every pair
    left: np.ndarray  # (L,) pairs for MLX: cold experts, overflow
    dropped: np.ndarray  # (Q,) pairs dropped (--overflow drop)
    t0: float  # after the host sync
    small: bool = False  # a released layer's small call (``_prepare_small``)

    @property
    def D(self) -> int:
        return self.x32.shape[-1]

    @property
    def k(self) -> int:
        return self.shape[-1]


def _guarded(ex, where: str, who: str, run: Callable[[], np.ndarray]) -> Optional[np.ndarray]:
    """``run()``, the programs' part of a call. The fault guard of both executors: any error
    disables ``ex`` for the rest of the run with one warning and returns None (the caller
    reruns the call on MLX)."""
    try:
        return run()
    except Exception as err:
        ex.disabled = True
        ex.stats.fallback = f"{type(err).__name__}: {err}"
        ex.warn(f"{where}: program failed ({ex.stats.fallback}); {who} falls back to MLX for the rest of the run")
        return None


class SharedExecutor:
    """Executor for a shared expert (dense MLP): ``executor(mlp, x (..., D)) -> (..., D)``.

    Every token goes through it, so a call is rounds of the top tier and one last
    round at the smallest tier that fits; below ``min_tokens`` it stays on MLX.
    """

    bakes_weights = True

    def __init__(self, layer: int, plan, program, warn: Callable[[str], None] = None):
        self.plan, self.program, self.warn = plan, program, warn or _warn
        self.stats = LayerStats(layer)
        self.disabled = False

    def __call__(self, mlp, x: mx.array) -> mx.array:
        st = self.stats
        st.calls += 1
        D = x.shape[-1]
        n = x.size // D
        if self.disabled or n < self.plan.min_tokens:
            return stock_dense(mlp, x)
        x32 = x.reshape(-1, D).astype(mx.float32)
        mx.eval(x32)  # the one host sync of this call
        t0 = time.perf_counter()
        out = _guarded(self, f"layer {st.layer} shared expert", "it", lambda: self._run(np.asarray(x32)))
        if out is None:
            return stock_dense(mlp, x)
        st.program_s += time.perf_counter() - t0
        st.offload_call_s += time.perf_counter() - t0
        return mx.array(out, dtype=x.dtype).reshape(x.shape)  # cast as it is copied over (same bits as astype)

    def _run(self, x_np: np.ndarray) -> np.ndarray:
        """(n, D) float32 through the program in rounds of its ladder."""
        st, (n, D) = self.stats, x_np.shape
        first_use([self.program])
        out = np.empty((n, D), np.float32)
        caps, start = ladder_rounds(np.array([n]), self.plan.tiers), 0
        for cap in caps:
            rows = x_np[start : start + cap]
            out[start : start + rows.shape[0]] = checked(self.program.run(rows[None], cap), (1, rows.shape[0], D))[0]
            start += rows.shape[0]
        st.offloaded += 1
        st.program_calls += len(caps)
        st.slots += sum(caps)
        st.padded += sum(caps) - n
        st.pairs += n
        return out


def stats_profile(model, model_type: str = "") -> Profile:
    """The per-call loads the offloaded layers saw, as a calibration profile (``--stats FILE``):
    ``npumoe plan --from-stats FILE`` re-sizes the ladders for this workload."""
    layers, tokens = [], 0
    for m in installed_blocks(model):
        ex = m.executor
        if not isinstance(ex, OffloadExecutor) or not ex.loads:
            continue
        lp = ex.plan
        chunks = [{"tokens": int(n), "counts": [int(x) for x in c]} for n, _, c in ex.loads]
        total = np.sum([c for _, _, c in ex.loads], axis=0)
        layers.append(LayerCounts(lp.layer, lp.path, lp.num_experts, int(ex.loads[-1][1]), [int(x) for x in total], chunks))
        tokens = max(tokens, sum(int(n) for n, _, _ in ex.loads))
    if not layers:
        raise ValueError("no offloaded layer call reached the programs' sync: nothing to save (prompts too short?)")
    step = max(ch["tokens"] for l in layers for ch in l.chunks)
    return Profile(None, model_type, "npumoe generate --stats (per-call loads)", tokens, step, layers)


def offload_stats(model) -> List[LayerStats]:
    """LayerStats of every offloaded expert block, then of every offloaded shared expert."""
    routed = [m.executor.stats for m in installed_blocks(model) if isinstance(m.executor, OffloadExecutor)]
    shared = [
        m.executor.stats for _, m in model.named_modules()
        if isinstance(getattr(m, "executor", None), SharedExecutor)
    ]
    return routed + sorted(shared, key=lambda s: s.layer)


def summarize(stats: Sequence[LayerStats]) -> dict:
    tot = total(stats)
    return {
        "layers": len(stats),
        "layer_calls": tot.calls,
        "offloaded_calls": tot.offloaded,
        "program_calls": tot.program_calls,
        "program_calls_per_offloaded_call": tot.program_calls / max(tot.offloaded, 1),
        "padding_pct": tot.padding_pct,
        "spill_pct": tot.spill_pct,
        "drop_pct": tot.drop_pct,
        "overflow_pct": tot.overflow_pct,
        "program_s": tot.program_s,
        "offload_call_s": tot.offload_call_s,
        "fallbacks": {s.layer: s.fallback for s in stats if s.fallback},
    }


def format_stats(summary: dict) -> str:
    s = summary
    lines = [
        f"offload: {s['offloaded_calls']}/{s['layer_calls']} MoE layer calls ran programs "
        f"({s['program_calls']} program calls, {s['program_calls_per_offloaded_call']:.2f} per offloaded call)",
        f"padding {s['padding_pct']:.1f}% of slots, spill to MLX {s['spill_pct']:.1f}% of pairs, "
        f"past top tiers {s.get('overflow_pct', 0.0):.1f}%"
        + (f", dropped {s['drop_pct']:.1f}% of pairs" if s["drop_pct"] else ""),
        f"time: programs {s['program_s']:.3f} s, offloaded calls {s['offload_call_s']:.3f} s",
    ]
    for layer, why in s["fallbacks"].items():
        lines.append(f"layer {layer} fell back to MLX: {why}")
    return "\n".join(lines)
