"""Issue 23: padding across domains, with and without the online re-plan, on every shared trace.

    PYTHONPATH=. python benchmarks/replay_replan.py [--observe 0.25] [--out benchmarks/results/issue23-replay-replan.json]

For each trace B (leave one out): plan on the family's other domains (OLMoE: the other one;
Mixtral: the four others, a calibration mix), as ``npumoe replay --workload chat|batch`` does,
then replay B's workload calls through the executor's decisions (``replay.replay_calls``):
- ``static``: every call on the calibrated plan (what ``npumoe replay`` prints across domains);
- ``replan``: the first ``--observe`` share of B's calls on the calibrated plan; then the server's
  re-plan (``replan.regroup``: ``make_plan`` on those served calls, new groups and ladders within
  the program budget; kept per layer only where it pads + overflows less on the calls it saw,
  as ``Replanner.candidates`` does) and the rest of B's calls on it. Printed: over the whole
  run, and the calls after the re-plan only (held out: the re-plan never saw them).
onnx parametric costs, each family's own preset shape, no compute, deterministic.
"""

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from npumoe_mlx.cli import replay as rp  # noqa: E402
from npumoe_mlx.backends.registry import default_cost  # noqa: E402
from npumoe_mlx.runtime.experts import ExpertBlock  # noqa: E402
from npumoe_mlx.planning.plan import PlanLimits, below_ladder_tiers  # noqa: E402
from npumoe_mlx.runtime.replan import GAIN, observed_tally, regroup, served_calls  # noqa: E402

ROUTING = Path(__file__).resolve().parent / "routing"
FAMILIES = {"olmoe-1b-7b": ("arxiv", "book"), "mixtral-8x7b": ("arxiv", "book", "c4", "github", "wikipedia")}
SEQ = 2048


def tally(ts) -> dict:
    slots = sum(t.slots for t in ts)
    return {"padding_pct": round(100.0 * sum(t.padded for t in ts) / max(slots, 1), 2),
            "overflow_pct": round(100.0 * sum(t.overflow for t in ts) / max(sum(t.pairs for t in ts), 1), 2),
            "spill_pct": round(100.0 * sum(t.spill for t in ts) / max(sum(t.pairs for t in ts), 1), 2),
            "offloaded_pct": round(100.0 * sum(t.offloaded for t in ts) / max(sum(t.calls for t in ts), 1), 1)}


def case(family: str, target: str, workload: str, observe: float, backend: str = "onnx") -> dict:
    sh = rp.preset_shape(family)
    cost, lim = default_cost(backend), PlanLimits.for_backend(backend)
    cal_names = [f"{family}.{d}" for d in FAMILIES[family] if d != target]
    cal = [rp.load_trace(ROUTING / f"{n}.npz") for n in cal_names]
    rep = rp.load_trace(ROUTING / f"{family}.{target}.npz")
    t0 = time.time()
    plan = rp.replay(cal, [rep], sh["D"], sh["H"], cost, lim, tokens=(128, 512, 2048), seq_len=SEQ,
                     workload=workload)["plan"]
    extra = below_ladder_tiers(lim)
    calls, seen, shapes = {}, {}, {}
    for lp in plan.layers:
        counts, n = rp.workload_counts(rep[lp.layer], lp.num_experts, workload, SEQ, 2048, seed=0)
        got = [(int(t), lp.top_k, c) for t, c in zip(n, counts)]
        cut = int(len(got) * observe)
        calls[lp.layer], seen[lp.layer] = got, served_calls(got[:cut])
        shapes[lp.layer] = ExpertBlock(lp.layer, lp.path, "SwitchGLU", lp.num_experts, lp.top_k, dims=sh["D"],
                                       hidden=sh["H"], activation="swiglu", bias=False, quant=None, dtype="float32")
    new = regroup(plan.layers, seen, shapes, cost, lim)
    static, before, after, kept = [], [], [], []
    for lp in plan.layers:
        got = calls[lp.layer]
        cut = int(len(got) * observe)

        def run(p, part):
            if not part:
                return rp.Tally()
            c = np.stack([x[2] for x in part])
            return rp.replay_calls(p, cost, c, np.asarray([x[0] for x in part]), "auto", extra)

        chosen = lp
        cand = new.get(lp.layer)
        if cand is not None and sum(observed_tally(cand, cost, seen[lp.layer], extra)) + GAIN <= \
                sum(observed_tally(lp, cost, seen[lp.layer], extra)):
            chosen = cand
            kept.append(lp.layer)
        static.append(run(lp, got))
        before.append(run(lp, got[:cut]))
        after.append(run(chosen, got[cut:]))
    return {"family": family, "calibrate": cal_names, "replay": f"{family}.{target}", "workload": workload,
            "observe": observe, "layers": len(plan.layers), "regrouped_layers": kept,
            "programs": {"plan": sum(len(lp.groups) for lp in plan.layers),
                         "replan": sum(len((new.get(lp.layer) if lp.layer in kept else lp).groups) for lp in plan.layers),
                         "budget": lim.max_programs},
            "static": tally(static), "replan_over_the_run": tally(before + after), "replan_after": tally(after),
            "seconds": round(time.time() - t0, 1)}


def _case(job):
    return case(*job)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--observe", type=float, default=0.25, help="share of the replayed calls served before the re-plan")
    p.add_argument("--workloads", default="chat,batch")
    p.add_argument("--only", help="family.domain traces to replay, comma-separated, in this order (default: all)")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "issue23-replay-replan.json"))
    a = p.parse_args(argv)
    only = a.only.split(",") if a.only else None
    jobs = [(f, d, w, a.observe) for f, ds in FAMILIES.items() for d in ds for w in a.workloads.split(",")
            if not only or f"{f}.{d}" in only]
    if only:
        jobs.sort(key=lambda j: only.index(f"{j[0]}.{j[1]}"))
    rows = []
    with ProcessPoolExecutor(a.jobs) as pool:
        for r in pool.map(_case, jobs):
            rows.append(r)
            print(f"{' + '.join(r['calibrate'])} -> {r['replay']} {r['workload']}: static pad "
                  f"{r['static']['padding_pct']}% ovf {r['static']['overflow_pct']}% | re-plan: over the run pad "
                  f"{r['replan_over_the_run']['padding_pct']}% ovf {r['replan_over_the_run']['overflow_pct']}%, after "
                  f"pad {r['replan_after']['padding_pct']}% ovf {r['replan_after']['overflow_pct']}% "
                  f"(regrouped {len(r['regrouped_layers'])}/{r['layers']} layers, programs "
                  f"{r['programs']['plan']} -> {r['programs']['replan']}, {r['seconds']} s)", flush=True)
            Path(a.out).parent.mkdir(parents=True, exist_ok=True)
            Path(a.out).write_text(json.dumps({"load_average": os.getloadavg(), "rows": rows}, indent=1))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"load_average": os.getloadavg(), "rows": rows}, indent=1))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
