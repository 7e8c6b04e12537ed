"""One offloaded MoE layer at run time: count -> tiers -> gather -> programs -> scatter.

Per call of ``experts(x, inds)`` (x: (..., D), inds: (..., k)):
1. calls below the plan's ``min_tokens`` (decode) go straight to stock MLX, no sync;
2. MLX sorts and counts the pairs; ONE host sync brings order, counts and x over;
3. the cost model picks programs or MLX for this call, and per group whether
   overflow past the top tier runs the ladder again or spills to MLX;
4. cold experts and spill start on MLX (``mx.async_eval``) before the programs run;
5. rows are gathered into (G, C, D) with numpy fancy indexing (no loop over tokens),
   each resident group's program runs at its tier, and one gather puts every
   pair's row back in order: (..., k, D) in x.dtype.
A program that raises or returns a wrong shape or non-finite values disables the
layer's offload for the rest of the run (one warning); that call reruns on MLX.
"""

import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, List, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .cost import CostModel
from .dispatch import ProgramError, run_calls
from .experts import SwitchGLU, stock_dense, stock_experts
from .plan import LayerPlan
from .tiers import OVERFLOW_MODES, CallDecision, decide_call, ladder_rounds, plan_slots

MAX_LOADS = 4096  # per-call loads kept per layer for --stats FILE
OVERFLOW_NOTICE = 0.05  # overflow rate that prints the re-plan notice (plans size top tiers for ~0)


@dataclass
class LayerStats:
    layer: int
    calls: int = 0  # layer calls
    offloaded: int = 0  # layer calls that ran programs
    program_calls: int = 0
    slots: int = 0  # program rows
    padded: int = 0  # program rows with no pair
    pairs: int = 0  # routed pairs in offloaded calls
    spilled: int = 0  # pairs of offloaded calls run on MLX (cold experts + overflow)
    dropped: int = 0  # pairs dropped (--overflow drop only)
    overflow: int = 0  # pairs of synced calls past their group's top tier
    synced_pairs: int = 0  # pairs of calls that reached the host sync (the overflow rate's base)
    program_s: float = 0.0
    offload_call_s: float = 0.0  # wall time of offloaded calls from the sync to the lazy result
    fallback: str = ""  # why the layer fell back to MLX for the rest of the run

    def to_dict(self) -> dict:
        return asdict(self)


def _warn(msg: str) -> None:
    print(f"[npumoe] {msg}", file=sys.stderr)


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
        self._noticed = False
        self.notice = _warn  # advice (not a fault): the re-plan notice
        self.disabled = not plan.groups
        self._groups = [np.asarray(g.experts) for g in plan.groups]
        self._tiers = [list(g.tiers) for g in plan.groups]
        self._cold = np.zeros(plan.num_experts, bool)
        self._cold[plan.cold] = True

    def _decide(self, counts: np.ndarray) -> CallDecision:
        return decide_call(counts, self._groups, self._tiers, self._cold, self.cost, self.plan.D, self.plan.H,
                           self.overflow, self.plan.objective, self.plan.max_calls, self.plan.energy_bound)

    def _record(self, n_tokens: int, k: int, counts: np.ndarray) -> None:
        """Keep the call's loads (the last MAX_LOADS) and notice overflow well above the plan's."""
        st = self.stats
        self.loads.append((n_tokens, k, counts))
        del self.loads[:-MAX_LOADS]
        st.synced_pairs += int(counts.sum())
        st.overflow += int(np.maximum(counts - self._top, 0).sum())  # one vector op, not one per group
        if not self._noticed and st.synced_pairs >= 64 * k and st.overflow > OVERFLOW_NOTICE * st.synced_pairs:
            self._noticed = True
            self.notice(f"layer {self.plan.layer}: {100 * st.overflow / st.synced_pairs:.0f}% of routed pairs overflow "
                      f"their group's top tier (the plan expects ~0); save this workload with `npumoe generate "
                      f"--stats FILE`, see the new plan with `npumoe plan --from-stats FILE` and rebuild with "
                      f"`npumoe build --model M --from-stats FILE`")

    # --- the call ---------------------------------------------------------
    def __call__(self, experts: SwitchGLU, x: mx.array, inds: mx.array) -> mx.array:
        st = self.stats
        st.calls += 1
        D = x.shape[-1]
        n_tokens = x.size // D
        if self.disabled or n_tokens < self.plan.min_tokens:
            return stock_experts(experts, x, inds)
        k = inds.shape[-1]
        flat = inds.reshape(-1)  # (P,)
        drop = self.overflow == "drop"
        logits = _router_logits(self.router, x.reshape(-1, D), self.plan.num_experts) if drop else None
        score = None
        if logits is not None:
            score = mx.take_along_axis(logits, inds.reshape(-1, k).astype(mx.int32), axis=-1).reshape(-1)
        order = mx.argsort(flat)
        counts = mx.zeros((self.plan.num_experts,), mx.int32).at[flat].add(1)
        x32 = x.reshape(-1, D).astype(mx.float32)
        mx.eval(order, counts, x32, *([score] if score is not None else []))  # the one host sync
        t0 = time.perf_counter()  # upstream layers finished in that sync: time only our part
        order_np, counts_np = np.array(order), np.array(counts)
        if score is not None:  # paper's drop mode: within an expert, highest router score first
            order_np = np.lexsort((-np.array(score.astype(mx.float32)), np.array(flat)))
        self._record(n_tokens, k, counts_np)
        d = self._decide(counts_np)
        if not drop and not d.offload:
            return stock_experts(experts, x, inds)

        s = plan_slots(order_np, counts_np, k, self._groups, self._tiers, caps=[c[:r] for c, r in zip(d.caps, d.rounds)])
        flat_np = np.array(flat)
        left = np.nonzero(s.loc < 0)[0]  # pairs no program took: cold experts, overflow
        if drop:
            overflow = left[~self._cold[flat_np[left]]]
            st.dropped += int(overflow.size)
            left = left[self._cold[flat_np[left]]]
        # Start MLX on the leftover pairs first, so it runs while the programs do.
        y_mlx = None
        if left.size:
            tok = mx.array(left // k, dtype=mx.int32)
            e = mx.array(flat_np[left], dtype=mx.uint32)[:, None]
            y_mlx = stock_experts(experts, x32[tok], e).reshape(-1, D)  # (L, D)
            mx.async_eval(y_mlx)

        x_np = np.asarray(x32)  # (N, D), no copy
        outs = np.empty((max(s.slots, 1), D), np.float32)
        tp = time.perf_counter()
        try:  # gathers, program calls (several at once where the backend allows), checks
            row = run_calls(self.programs, s.calls, x_np, outs)
        except Exception as err:  # fault: this layer stays on MLX from now on
            self.disabled = True
            st.fallback = f"{type(err).__name__}: {err}"
            self.warn(f"layer {self.plan.layer}: program failed ({st.fallback}); layer falls back to MLX for the rest of the run")
            return stock_experts(experts, x, inds)
        st.program_s += time.perf_counter() - tp

        loc = s.loc.copy()
        parts = [mx.array(outs[:row])]
        if y_mlx is not None:
            loc[left] = row + np.arange(left.size)
            parts.append(y_mlx)
        if drop:  # dropped pairs contribute zero
            loc[loc < 0] = row + left.size
            parts.append(mx.zeros((1, D), mx.float32))
        y = mx.concatenate(parts, axis=0)[mx.array(loc, dtype=mx.int32)]
        st.offloaded += 1
        st.program_calls += len(s.calls)
        st.slots += s.slots
        st.padded += s.padded
        st.pairs += int(flat_np.size)
        st.spilled += int(left.size)
        st.offload_call_s += time.perf_counter() - t0
        return y.reshape(*inds.shape, D).astype(x.dtype)


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
        x_np = np.asarray(x32)
        out = np.empty((n, D), np.float32)
        calls = slots = start = 0
        try:
            for cap in ladder_rounds(np.array([n]), self.plan.tiers):
                rows = x_np[start : start + cap]
                y = self.program.run(rows[None], cap)  # pads to the tier, crops back
                if getattr(y, "shape", None) != (1, rows.shape[0], D) or not np.isfinite(y).all():
                    raise ProgramError(f"returned shape {getattr(y, 'shape', None)} or non-finite values")
                out[start : start + rows.shape[0]] = y[0]
                start += rows.shape[0]
                calls += 1
                slots += cap
        except Exception as err:
            self.disabled = True
            st.fallback = f"{type(err).__name__}: {err}"
            self.warn(f"layer {st.layer} shared expert: program failed ({st.fallback}); it falls back to MLX for the rest of the run")
            return stock_dense(mlp, x)
        st.offloaded += 1
        st.program_calls += calls
        st.slots += slots
        st.padded += slots - n
        st.pairs += n
        st.program_s += time.perf_counter() - t0
        st.offload_call_s += time.perf_counter() - t0
        return mx.array(out).reshape(x.shape).astype(x.dtype)


def stats_profile(model, model_type: str = "") -> "Profile":
    """The per-call loads the offloaded layers saw, as a calibration profile (``--stats FILE``):
    ``npumoe plan --from-stats FILE`` re-sizes the ladders for this workload."""
    from .calibrate import LayerCounts, Profile
    from .experts import installed_blocks

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
    from .experts import installed_blocks

    routed = [m.executor.stats for m in installed_blocks(model) if isinstance(m.executor, OffloadExecutor)]
    shared = [
        m.executor.stats for _, m in model.named_modules()
        if isinstance(getattr(m, "executor", None), SharedExecutor)
    ]
    return routed + sorted(shared, key=lambda s: s.layer)


def summarize(stats: Sequence[LayerStats]) -> dict:
    tot = LayerStats(-1)
    for s in stats:
        for f in ("calls", "offloaded", "program_calls", "slots", "padded", "pairs", "spilled", "dropped",
                  "overflow", "synced_pairs"):
            setattr(tot, f, getattr(tot, f) + getattr(s, f))
        tot.program_s += s.program_s
        tot.offload_call_s += s.offload_call_s
    return {
        "layers": len(stats),
        "layer_calls": tot.calls,
        "offloaded_calls": tot.offloaded,
        "program_calls": tot.program_calls,
        "program_calls_per_offloaded_call": tot.program_calls / max(tot.offloaded, 1),
        "padding_pct": 100.0 * tot.padded / max(tot.slots, 1),
        "spill_pct": 100.0 * tot.spilled / max(tot.pairs, 1),
        "drop_pct": 100.0 * tot.dropped / max(tot.pairs, 1),
        "overflow_pct": 100.0 * tot.overflow / max(tot.synced_pairs, 1),
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
