"""`npumoe replay`: plan from routing traces and replay them through the executor's decisions.

No compute: for every call of N consecutive tokens of a trace (never crossing a
``--seq-len`` sequence), the per-expert counts go through the same functions the
executor calls (``plan.decide`` -> ``tiers.decide_call``, the tier rule of
``tiers.py``), and the rows, padding, overflow, spill and predicted time/energy
are tallied per layer x call size.

Trace format (``benchmarks/routing/README.md``): an ``.npz`` with ``layerN`` ->
(T, k) expert ids of every token, in order; ``npumoe calibrate --save-routes``
writes the same from a real model.
"""

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from ..build.args import choose_cost
from ..atomic import write_json
from ..backends import registry
from ..planning.chips import chip_profile
from ..planning.cost import CostModel, flops_per_row
from ..runtime.experts import ExpertBlock
from ..planning.plan import LayerPlan, PlanLimits, below_ladder_tiers, call_context, decide, make_plan
from ..planning.profiles import LayerCounts, Profile
from ..runtime.stats import LayerStats, pct
from ..planning.traces import load_trace, save_routes  # noqa: F401 (replay's trace I/O lives in traces.py)
from ..build.workloads import GENERATION_SIZES, WORKLOADS, workload_calls

ROW_FIELDS = (
    "layer", "tokens", "calls", "padding_pct", "overflow_pct", "dropped_pct", "spill_pct", "cold_pct",
    "offloaded_pct", "program_calls_per_call", "groups", "predicted_s", "mlx_only_s", "predicted_j", "mlx_only_j",
    "naive_s", "naive_j", "cpu_s", "cpu_j",
)
# The baselines NPUMoE (arXiv 2604.18788) compares against, all Core ML, on M2 Max / M2 Ultra; the
# paper has no GPU baseline (coreml-evidence.md Q5). Each is predicted from the same cost model:
#   all_gpu:    every pair on MLX (the project's own baseline; ``mlx_only``)
#   coreml_cpu: every pair on the CPU (Core ML CPU-only): pairs * 6DH / the chip's CPU FLOP/s
#   naive_npu:  one NPU graph per expert, no tiers: each expert with a pair is one program call
#               sized for the whole call (n rows), one after another, after the host sync
#   anemll:     ANEMLL runs attention on the NPU and the experts on the CPU: on the expert FFNs
#               (all replay prices) the same cost as coreml_cpu
BASELINES = ("all_gpu", "coreml_cpu", "naive_npu", "anemll")
PAPER = ("NPUMoE (arXiv 2604.18788, M2 Max / M2 Ultra): 1.32-5.55x lower latency and 1.81-7.37x energy "
         "efficiency against Core ML CPU-only, naive NPU and ANEMLL")


def split_half(routes: np.ndarray, seq_len: int):
    """(first half of the sequences, second half)."""
    n_seq = max(routes.shape[0] // seq_len, 1)
    cut = (n_seq // 2) * seq_len if n_seq > 1 else routes.shape[0] // 2
    return routes[:cut], routes[cut:]


def call_counts(routes: np.ndarray, E: int, n: int, seq_len: int) -> np.ndarray:
    """(S, E) per-expert pair counts of every full n-token call inside each sequence."""
    T, k = routes.shape
    per_seq = seq_len // n
    if per_seq == 0:
        return np.zeros((0, E), np.int64)
    n_seq = T // seq_len
    rows = []
    if n_seq:
        a = routes[: n_seq * seq_len].reshape(n_seq, seq_len, k)[:, : per_seq * n].reshape(n_seq * per_seq, n * k)
        rows.append(a)
    rest = routes[n_seq * seq_len:]  # a last, shorter sequence
    m = rest.shape[0] // n
    if m:
        rows.append(rest[: m * n].reshape(m, n * k))
    if not rows:
        return np.zeros((0, E), np.int64)
    a = np.concatenate(rows).astype(np.int64)
    idx = np.arange(a.shape[0])[:, None] * E + a
    return np.bincount(idx.ravel(), minlength=a.shape[0] * E).reshape(a.shape[0], E)


def trace_profile(parts: Sequence[np.ndarray], layer: int, E: int, seq_len: int, block: int) -> LayerCounts:
    """A layer profile (as ``calibrate`` writes) from routes: ``block``-token counts with their sequence."""
    chunks, seq = [], 0
    k = parts[0].shape[1]
    for routes in parts:
        for s0 in range(0, routes.shape[0], seq_len):
            c = call_counts(routes[s0 : s0 + seq_len], E, block, seq_len)
            chunks += [{"tokens": block, "counts": r.tolist(), "seq": seq} for r in c]
            seq += 1
    total = np.sum([ch["counts"] for ch in chunks], axis=0) if chunks else np.zeros(E, int)
    return LayerCounts(layer, f"layer{layer}", E, k, [int(x) for x in total], chunks)


@dataclass
class Tally(LayerStats):
    """The executor's counters (``LayerStats``: ``pairs`` of offloaded calls, ``overflow`` pairs past
    a group's top tier, ``spilled`` resident pairs left to MLX after the rounds) and the predictions."""

    layer: int = -1
    cold: int = 0  # pairs of cold experts
    predicted_s: float = 0.0
    mlx_only_s: float = 0.0
    predicted_j: float = 0.0
    mlx_only_j: float = 0.0
    naive_s: float = 0.0  # the paper's baselines (BASELINES)
    naive_j: float = 0.0
    cpu_s: float = 0.0
    cpu_j: float = 0.0


def naive_npu(cost: CostModel, counts: np.ndarray, n: int, D: int, H: int):
    """(seconds, joules) of the paper's naive baseline on (S, E) call counts of n tokens: every
    expert with a pair is its own one-expert program (no tiers: sized for all n rows)."""
    active = (np.asarray(counts) > 0).sum(axis=-1)  # (S,)
    return (np.where(active > 0, cost.sync_s, 0.0) + active * cost.programs_s(1, 1, n, D, H),
            active * cost.program_j(1, n, D, H))


def on_cpu(pairs, D: int, H: int, cpu: Optional[tuple]):
    """(seconds, joules) of ``pairs`` expert rows on the CPU (Core ML CPU-only, ANEMLL's experts);
    cpu: (FLOP/s, watts), or None (no measurement: NaN)."""
    if not cpu:
        return np.nan * np.asarray(pairs, float), np.nan * np.asarray(pairs, float)
    s = np.asarray(pairs, float) * flops_per_row(D, H) / cpu[0]
    return s, s * cpu[1]


def replay_calls(lp: LayerPlan, cost: CostModel, counts: np.ndarray, n, overflow: str = "auto",
                 extra_tiers: Sequence[int] = (), cpu: Optional[tuple] = None) -> Tally:
    """Run the executor's decisions on (S, E) call counts of n tokens each (``extra_tiers``: the row
    counts the programs run below their ladders, ``plan.below_ladder_tiers``); the paper's baselines
    beside (``cpu``: (FLOP/s, watts) of the CPU, or None)."""
    t = Tally(lp.layer)
    if len(counts):
        ns, nj = naive_npu(cost, counts, n, lp.D, lp.H)
        cs, cj = on_cpu(np.asarray(counts).sum(axis=-1), lp.D, lp.H, cpu)
        t.naive_s, t.naive_j, t.cpu_s, t.cpu_j = float(ns.sum()), float(nj.sum()), float(cs.sum()), float(cj.sum())
    groups = [np.asarray(g.experts) for g in lp.groups]
    cold = np.zeros(lp.num_experts, bool)
    cold[list(lp.cold)] = True
    sizes = np.broadcast_to(np.asarray(n), (len(counts),))  # one size, or each call's (a workload's mix)
    ctx = call_context(lp, cost, overflow, extra_tiers, groups, cold)  # the executor's decision path, built once
    for c, n in zip(counts, sizes):
        t.calls += 1
        pairs = int(c.sum())
        alone_s, alone_j = cost.mlx_s(pairs, lp.D, lp.H), cost.mlx_j(pairs, lp.D, lp.H)
        t.mlx_only_s += alone_s
        t.mlx_only_j += alone_j
        d = decide(ctx, c) if lp.offloads(n) else None
        if d is None or not d.offload:
            t.predicted_s += alone_s
            t.predicted_j += alone_j
            continue
        t.offloaded += 1
        t.pairs += pairs
        t.cold += int(c[cold].sum())
        for ids, g, caps, r in zip(groups, lp.groups, d.caps, d.rounds):
            load = c[ids]
            run = caps[:r]
            served = np.minimum(load, sum(run))
            t.program_calls += len(run)
            t.slots += len(ids) * sum(run)
            t.padded += len(ids) * sum(run) - int(served.sum())
            t.overflow += int(np.maximum(load - g.tiers[-1], 0).sum())
            t.spilled += int((load - served).sum())
        t.predicted_s += d.offload_s
        t.predicted_j += d.offload_j
    return t


def workload_counts(routes: np.ndarray, E: int, kind: str, seq_len: int, step: int = 2048, seed: int = 0):
    """(S, E) per-expert counts and (S,) tokens of the calls workload ``kind`` makes over a trace's
    ``seq_len``-token sequences (``workloads.workload_calls``: chat requests, batched prefill of
    B prompts; a trace has no pad tokens, so a batched call counts its prompts' tokens only)."""
    lengths = [min(seq_len, routes.shape[0] - s) for s in range(0, routes.shape[0], seq_len)]
    calls = workload_calls(lengths, kind, step, seed)
    out = np.zeros((len(calls), E), np.int64)
    tokens = np.zeros(len(calls), np.int64)
    for i, call in enumerate(calls):
        for d, st, m in call:
            a = routes[d * seq_len + st : d * seq_len + st + m].ravel()
            out[i] += np.bincount(a, minlength=E)[:E]
            tokens[i] += m
    return out, tokens


def workload_profile(parts: Sequence[np.ndarray], layer: int, E: int, seq_len: int, step: int = 2048) -> List[dict]:
    """Whole-call chunks (``"call": true``, as ``calibrate(batched=True)`` records) of the batched
    prefill calls over calibration traces: the plan sizes its top tiers for them."""
    chunks, first = [], sum(-(-r.shape[0] // seq_len) for r in parts)  # sequence ids after trace_profile's
    for pi, routes in enumerate(parts):
        c, tok = workload_counts(routes, E, "batch", seq_len, step, seed=pi)
        chunks += [{"tokens": int(t), "counts": r.tolist(), "seq": first + len(chunks) + i, "call": True}
                   for i, (r, t) in enumerate(zip(c, tok))]
    return chunks


def row_of(layer: int, n: int, t: Tally, groups: int) -> dict:
    return {
        "layer": layer, "tokens": n, "calls": t.calls,
        "padding_pct": t.padding_pct, "overflow_pct": pct(t.overflow, t.pairs), "dropped_pct": 0.0,  # of offloaded pairs
        "spill_pct": t.spill_pct, "cold_pct": pct(t.cold, t.pairs), "offloaded_pct": pct(t.offloaded, t.calls),
        "program_calls_per_call": t.program_calls / t.offloaded if t.offloaded else 0.0, "groups": groups,
        "predicted_s": t.predicted_s / max(t.calls, 1), "mlx_only_s": t.mlx_only_s / max(t.calls, 1),
        "predicted_j": t.predicted_j / max(t.calls, 1), "mlx_only_j": t.mlx_only_j / max(t.calls, 1),
        "naive_s": t.naive_s / max(t.calls, 1), "naive_j": t.naive_j / max(t.calls, 1),
        "cpu_s": t.cpu_s / max(t.calls, 1) if t.cpu_s == t.cpu_s else None,  # None: no CPU measurement
        "cpu_j": t.cpu_j / max(t.calls, 1) if t.cpu_j == t.cpu_j else None,
    }


def summarize(rows: List[dict]) -> Dict[str, dict]:
    """Per call size: every numeric field averaged over layers (``groups`` too), worst overflow and padding."""
    out = {}
    for n in sorted({r["tokens"] for r in rows}):
        rs = [r for r in rows if r["tokens"] == n]
        s = {f: None if any(r[f] is None for r in rs) else float(np.mean([r[f] for r in rs]))
             for f in ROW_FIELDS if f not in ("layer", "tokens")}
        s["max_padding_pct"] = max(r["padding_pct"] for r in rs)
        s["max_overflow_pct"] = max(r["overflow_pct"] for r in rs)
        s["max_calls_over_groups"] = max(r["program_calls_per_call"] / max(r["groups"], 1) for r in rs)
        s["time_ratio"] = s["predicted_s"] / s["mlx_only_s"] if s["mlx_only_s"] else 1.0
        s["energy_ratio"] = s["predicted_j"] / s["mlx_only_j"] if s["mlx_only_j"] else 1.0
        s["baselines"] = baselines(s)
        out[str(n)] = s
    return out


def baselines(s: dict) -> Dict[str, dict]:
    """The plan's predicted speedup over each of the paper's baselines: {name: {"s", "j",
    "latency_x" (baseline time / the plan's), "energy_x" (baseline J / the plan's)}}; None where a
    number is unknown (no CPU measurement, no energy costs)."""
    def ratio(a, b):
        return float(a / b) if a and b else None

    sides = {"all_gpu": ("mlx_only_s", "mlx_only_j"), "coreml_cpu": ("cpu_s", "cpu_j"),
             "naive_npu": ("naive_s", "naive_j"), "anemll": ("cpu_s", "cpu_j")}
    return {name: {"s": s[ts], "j": s[tj] or None, "latency_x": ratio(s[ts], s["predicted_s"]),
                   "energy_x": ratio(s[tj], s["predicted_j"])} for name, (ts, tj) in sides.items()}


def format_baselines(summary: Dict[str, dict]) -> str:
    """The plan's predicted speedups over the paper's baselines, beside the paper's own."""
    names = {"all_gpu": "all on the GPU (MLX)", "coreml_cpu": "Core ML CPU-only",
             "naive_npu": "naive NPU (one graph per expert, no tiers)", "anemll": "ANEMLL (experts on the CPU)"}
    x = lambda v: "n/a" if v is None else f"{v:.2f}x"  # noqa: E731
    lines = ["predicted speedup of this plan (latency / energy) over each baseline, per call size:"]
    for name in BASELINES:
        cells = [f"{n}: {x(s['baselines'][name]['latency_x'])} / {x(s['baselines'][name]['energy_x'])}"
                 for n, s in summary.items()]
        lines.append(f"  {names[name]:45s} " + "   ".join(cells))
    if any(s["baselines"]["coreml_cpu"]["s"] is None for s in summary.values()):
        lines.append("  (CPU baselines n/a: no public CPU measurement for this chip; give --cpu-tflops and --cpu-power-w)")
    lines.append(f"  ANEMLL = Core ML CPU-only on the expert FFNs (it differs in attention, which replay does not price)")
    lines.append(f"  paper: {PAPER}")
    return "\n".join(lines)


SHAPES_FILE = Path(__file__).parent.parent / "data" / "model-shapes.json"


def load_shape_presets() -> Dict[str, dict]:
    """Expert-block shapes of real MoE models (``data/model-shapes.json``)."""
    data = json.loads(SHAPES_FILE.read_text())
    return {k: v for k, v in data.items() if not k.startswith("_")}


def preset_shape(name: str) -> dict:
    presets = load_shape_presets()
    if name not in presets:
        raise ValueError(f"unknown shape preset {name!r}; choose from {', '.join(presets)}")
    p = presets[name]
    return {"D": int(p["hidden"]), "H": int(p["expert_intermediate"])}


def check_trace_shape(path, trace: Dict[int, np.ndarray], shape: str) -> None:
    """Refuse a trace that cannot come from ``shape``: another top-k, or expert ids past its experts."""
    p = load_shape_presets()[shape]
    k = {a.shape[1] for a in trace.values()}.pop()
    top = max(int(a.max(initial=0)) for a in trace.values())
    if k != int(p["top_k"]) or top >= int(p["experts"]):
        raise ValueError(f"{path}: routes top-{k} over expert ids 0..{top}, but --shape {shape} has "
                         f"{p['experts']} experts, top-{p['top_k']}; pass the shape of the model the trace comes from")


def replay(
    calibrate: Sequence[Dict[int, np.ndarray]],
    routes: Sequence[Dict[int, np.ndarray]],
    D: int,
    H: int,
    cost: CostModel,
    limits: PlanLimits,
    tokens: Sequence[int] = (128, 512, 2048),
    seq_len: int = 2048,
    split: Optional[str] = None,
    objective: str = "time",
    overflow: str = "auto",
    energy_bound: str = "time",
    cpu: Optional[tuple] = None,
    workload: str = "prefill",
) -> dict:
    """Plan on ``calibrate`` traces, replay ``routes`` traces: {"plan", "rows", "summary"};
    ``cpu``: (FLOP/s, watts) of the CPU for the paper's CPU baselines (None: n/a).

    ``workload="prefill"``: calls of each size in ``tokens``. ``"chat"``/``"batch"``: the plan is
    the default build's (ladders for ``tokens`` and ``profiles.GENERATION_SIZES``, batched calls
    recorded whole), and the calls are that workload's mix (one row per layer, ``tokens`` 0); the
    executor's small-call tiers (``plan.below_ladder_tiers``) take part as it uses them."""
    if workload not in WORKLOADS:
        raise ValueError(f"--workload must be one of {', '.join(WORKLOADS)}, got {workload!r}")
    layers = sorted(set.intersection(*[set(t) for t in list(calibrate) + list(routes)]))
    if not layers:
        raise ValueError("the traces share no layer")
    if split not in (None, "half"):
        raise ValueError(f"--split must be 'half', got {split!r}")
    tokens = sorted({int(n) for n in tokens})
    if not tokens or tokens[0] < 1 or tokens[-1] > seq_len:
        raise ValueError(f"--tokens must be call sizes between 1 and --seq-len {seq_len}, got {tokens}")
    mixed = workload != "prefill"
    sizes = sorted(set(tokens) | ({n for n in GENERATION_SIZES if n < seq_len} if mixed else set()))
    block = math.gcd(*sizes) if len(sizes) > 1 else sizes[0]
    profile_layers, shapes, replay_sets = [], {}, {}
    for l in layers:
        ks = {t[l].shape[1] for t in list(calibrate) + list(routes)}
        if len(ks) != 1:
            raise ValueError(f"layer {l}: the traces disagree on top-k ({sorted(ks)})")
        E = int(max(int(t[l].max(initial=0)) for t in list(calibrate) + list(routes))) + 1
        cal = [split_half(t[l], seq_len)[0] if split else t[l] for t in calibrate]
        rep = [split_half(t[l], seq_len)[1] if split else t[l] for t in routes]
        profile_layers.append(trace_profile(cal, l, E, seq_len, block))
        if mixed:
            profile_layers[-1].chunks += workload_profile(cal, l, E, seq_len, max(tokens))
        shapes[l] = ExpertBlock(l, f"layer{l}", "SwitchGLU", E, next(iter(ks)), dims=D, hidden=H, activation="swiglu",
                                bias=False, quant=None, dtype="float32")  # a trace's block: its shape is all the plan reads
        replay_sets[l] = rep
    seen = sum(ch["tokens"] for ch in profile_layers[0].chunks)
    profile = Profile(None, "", "routing traces", seen, 0, profile_layers)  # chunk size 0: ladders fit ``tokens``
    plan = make_plan(profile, shapes, cost, limits, call_sizes=sizes, objective=objective,
                     energy_bound=energy_bound)
    rows = []
    extra = below_ladder_tiers(limits) if mixed else ()
    for lp in plan.layers if mixed else ():
        got = [workload_counts(r, lp.num_experts, workload, seq_len, max(tokens), seed=i)
               for i, r in enumerate(replay_sets[lp.layer])]
        counts, n = np.concatenate([g[0] for g in got]), np.concatenate([g[1] for g in got])
        rows.append(row_of(lp.layer, 0, replay_calls(lp, cost, counts, n, overflow, extra, cpu), len(lp.groups)))
    for lp in plan.layers if not mixed else ():
        for n in tokens:
            counts = np.concatenate([call_counts(r, lp.num_experts, n, seq_len) for r in replay_sets[lp.layer]])
            rows.append(row_of(lp.layer, n, replay_calls(lp, cost, counts, n, overflow, cpu=cpu), len(lp.groups)))
    return {"plan": plan, "rows": rows, "summary": summarize(rows)}


def format_rows(rows: List[dict], summary: Dict[str, dict]) -> str:
    head = ("layer", "tokens", "pad%", "ovf%", "spill%", "cold%", "offl%", "calls/call", "groups", "time/MLX", "J/MLX")
    lines = ["  ".join(f"{h:>10}" for h in head)]

    def line(layer, r):
        tr = r["predicted_s"] / r["mlx_only_s"] if r["mlx_only_s"] else 1.0
        jr = f"{r['predicted_j'] / r['mlx_only_j']:.3f}" if r["mlx_only_j"] else "n/a"  # no energy terms
        vals = (layer, r["tokens"] if "tokens" in r else "", f"{r['padding_pct']:.1f}", f"{r['overflow_pct']:.2f}",
                f"{r['spill_pct']:.2f}", f"{r['cold_pct']:.1f}", f"{r['offloaded_pct']:.0f}",
                f"{r['program_calls_per_call']:.1f}", f"{r['groups']:.1f}", f"{tr:.3f}", jr)
        return "  ".join(f"{v:>10}" for v in vals)

    for r in rows:
        lines.append(line(r["layer"], r))
    for n, s in summary.items():
        lines.append(line("mean", {**s, "tokens": int(n)}))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="npumoe replay", description=(
        "Plan from routing traces and replay traces through the executor's decisions (no compute)."))
    p.add_argument("--shape", required=True, help="Expert shape preset (D, H), e.g. qwen3-30b-a3b, mixtral-8x7b.")
    p.add_argument("--calibrate", nargs="+", required=True, metavar="NPZ", help="Traces to plan from.")
    p.add_argument("--routes", nargs="+", metavar="NPZ", help="Traces to replay (default: the --calibrate ones).")
    p.add_argument("--split", choices=("half",), help="Plan on the first half of each file's sequences, replay the second.")
    p.add_argument("--seq-len", type=int, default=2048, help="Tokens per sequence in the traces (default 2048).")
    p.add_argument("--tokens", default="128,512,2048", help="Call sizes to replay (default 128,512,2048).")
    p.add_argument("--backend", choices=registry.names(bundles=True), default=registry.DEFAULT)
    p.add_argument("--chip", help="Predict for this Apple chip profile (see npumoe_mlx/data/chips.json).")
    p.add_argument("--objective", choices=("time", "energy"), default="time")
    p.add_argument("--energy-bound", choices=("time", "gpu"), default="time",
                   help="Energy objective: stay within 1.2x of the least time (default) or of all-on-GPU's time.")
    p.add_argument("--overflow", choices=("auto", "rerun", "spill"), default="auto")
    p.add_argument("--cost", help="Cost model JSON (default: the backend's parametric costs, or --chip's).")
    p.add_argument("--workload", choices=WORKLOADS, default="prefill",
                   help="Calls to replay: prefill (each --tokens size, default), chat (requests of 20-800 tokens "
                        "in one call each), batch (2 or 4 prompts of 200-800 tokens per call).")
    p.add_argument("--json", metavar="PATH", help="Write rows and summary as JSON.")
    p.add_argument("--cpu-tflops", type=float, help="CPU FLOP/s (TFLOP/s) for the paper's CPU baselines "
                   "(default: --chip's measured one, where its profile has one).")
    p.add_argument("--cpu-power-w", type=float, help="CPU watts while it runs them (with --cpu-tflops).")
    args = p.parse_args(argv)
    if args.json:
        from ..outputs import check_file

        check_file(args.json, "--json")  # before the work
    if args.seq_len < 1:
        raise ValueError(f"--seq-len must be >= 1, got {args.seq_len}")
    try:
        tokens = [int(x) for x in args.tokens.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--tokens must be comma-separated integers, got {args.tokens!r}") from None
    shape = preset_shape(args.shape)
    cost = cost_for(args.backend, args.chip, args.cost, shape["D"], shape["H"])
    cal = [load_trace(f) for f in args.calibrate]
    rep = [load_trace(f) for f in (args.routes or args.calibrate)]
    for f, t in zip(list(args.calibrate) + list(args.routes or []), cal + (rep if args.routes else [])):
        check_trace_shape(f, t, args.shape)
    cpu = cpu_rate(args.chip, args.cpu_tflops, args.cpu_power_w)
    out = replay(cal, rep, shape["D"], shape["H"], cost, PlanLimits.for_backend(args.backend), tokens,
                 args.seq_len, args.split, args.objective, args.overflow, args.energy_bound, cpu, args.workload)
    print(f"replay: shape {args.shape} (D={shape['D']}, H={shape['H']}), backend {args.backend}, "
          f"cost {cost.source}, objective {args.objective}, split {args.split or 'none'}, workload {args.workload}")
    print(format_rows(out["rows"], out["summary"]))
    if not any(r["mlx_only_j"] for r in out["rows"]):
        print(f"J/MLX n/a: the cost model ({cost.source}) has no energy terms; "
              "energy is predicted with --backend coreml --chip CHIP, or measured by npumoe tune on macOS")
    print(format_baselines(out["summary"]))
    if args.json:
        write_json(args.json, {
            "command": "npumoe replay " + " ".join(argv if argv is not None else []),
            "shape": args.shape, "D": shape["D"], "H": shape["H"], "backend": args.backend, "chip": args.chip,
            "objective": args.objective, "energy_bound": args.energy_bound, "split": args.split, "workload": args.workload, "cost": cost.to_dict(),
            "rows": out["rows"], "summary": out["summary"],
        })
        print(f"wrote {args.json}")
    return 0


def cpu_rate(chip: Optional[str], tflops: Optional[float] = None, watts: Optional[float] = None) -> Optional[tuple]:
    """(FLOP/s, watts) of the CPU: the flags, else --chip's profile where it has a measurement, else None."""
    if tflops is not None or watts is not None:
        if not (tflops and tflops > 0 and watts and watts > 0):
            raise ValueError("give both --cpu-tflops and --cpu-power-w, each > 0")
        return tflops * 1e12, watts
    if chip:
        c = chip_profile(chip)
        if c.cpu_tflops and c.cpu_power_w:
            return c.cpu_tflops * 1e12, c.cpu_power_w
    return None


def cost_for(backend: str, chip: Optional[str], cost_path: Optional[str], D: int = 0, H: int = 0) -> CostModel:
    """--cost FILE, else --chip's predicted costs, else the backend's parametric ones."""
    if cost_path and chip:
        raise ValueError("give --cost or --chip, not both")
    return choose_cost(backend, cost_path, chip, D=D, H=H)
