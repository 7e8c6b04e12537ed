"""Where one offloaded layer call spends its time (bench layer's setup, one preset).

    PYTHONPATH=. python benchmarks/profile_layer.py --shape olmoe-1b-7b --tokens 512

Builds the layer, cost model, plan and programs exactly as `npumoe bench layer` does,
then times the executor's steps for one call, each on its own: MLX sort/count + the
host sync, the decision, slot planning, the gathers, every program call, the MLX
spill (cold experts + overflow) alone, the final scatter; then the whole call, the
programs alone and the spill alone, so their overlap (or contention) shows.
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.switch_layers import SwitchGLU

from ane_kernels.onnx import save_onnx
from npumoe_mlx.backends import load_backend
from npumoe_mlx.build.programs import spec_from_switch_glu
from npumoe_mlx.build.tune import median_s, tune
from npumoe_mlx.cli.replay import load_shape_presets
from npumoe_mlx.planning.cost import CostModel
from npumoe_mlx.planning.plan import PlanLimits, plan_layer
from npumoe_mlx.planning.profiles import LayerCounts
from npumoe_mlx.planning.tiers import plan_slots
from npumoe_mlx.runtime.executor import OffloadExecutor
from npumoe_mlx.runtime.experts import stock_experts
from npumoe_mlx.tools.bench_layer import popularity, route


def setup(name: str, tokens: int, cost_path=None, backend_opts=None, log=print):
    shape = load_shape_presets()[name]
    D, H, E, k = shape["hidden"], shape["expert_intermediate"], shape["experts"], shape["top_k"]
    quant = {"mode": "affine", "bits": 4, "group_size": 64}
    rng = np.random.default_rng(0)
    mx.random.seed(0)
    m = SwitchGLU(D, H, E)
    nn.quantize(m, group_size=64, bits=4)
    mx.eval(m.parameters())
    p = popularity(E, 1.0, rng)
    sizes = [tokens]
    chunks = [{"tokens": n, "counts": np.bincount(route(n, k, p, rng).ravel(), minlength=E).tolist()}
              for n in sizes for _ in range(2)]
    prof = LayerCounts(0, "bench", E, k, np.sum([c["counts"] for c in chunks], 0).tolist(), chunks)
    if cost_path and Path(cost_path).exists():
        cost = CostModel.load(cost_path)
    else:
        cost = tune("onnx", D, H, quant, repeats=3)
        if cost_path:
            cost.save(cost_path)
    log(f"cost: {cost.to_dict()}")
    lp = plan_layer(prof, D, H, cost, PlanLimits.for_backend("onnx"), quant)
    return m, p, rng, cost, lp, (D, H, E, k)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="olmoe-1b-7b")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--cost", help="cache the tuned cost model here")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    m, p, rng, cost, lp, (D, H, E, k) = setup(args.shape, args.tokens, args.cost)
    print(f"plan: {len(lp.groups)} groups {[len(g.experts) for g in lp.groups]} cold {lp.cold}")
    be = load_backend("onnx")
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        programs = []
        for gi, g in enumerate(lp.groups):
            spec = spec_from_switch_glu(m, layer=0, expert_ids=g.experts, tiers=g.tiers)
            save_onnx(spec, Path(tmp) / f"g{gi}")
            programs.append(be.load(Path(tmp) / f"g{gi}"))
        ex = OffloadExecutor(lp, programs, cost)
        N = args.tokens
        x = mx.random.normal((N, D)) / D**0.5
        inds = mx.array(route(N, k, p, rng))
        mx.eval(x, inds)
        mx.eval(ex(m, x, inds))  # warm-up
        R = args.repeats

        flat = inds.reshape(-1)

        def sync():
            order = mx.argsort(flat)
            counts = mx.zeros((E,), mx.int32).at[flat].add(1)
            x32 = x.reshape(-1, D).astype(mx.float32)
            mx.eval(order, counts, x32)
            return np.array(order), np.array(counts), x32

        order_np, counts_np, x32 = sync()
        out["sync_ms"] = median_s(sync, R) * 1e3
        d = ex._decide(counts_np)
        out["decide_ms"] = median_s(lambda: ex._decide(counts_np), R) * 1e3
        caps = [c[:r] for c, r in zip(d.caps, d.rounds)]
        s = plan_slots(order_np, counts_np, k, ex._groups, ex._tiers, caps=caps)
        out["slots_ms"] = median_s(lambda: plan_slots(order_np, counts_np, k, ex._groups, ex._tiers, caps=caps), R) * 1e3
        x_np = np.asarray(x32)
        flat_np = np.array(flat)
        left = np.nonzero(s.loc < 0)[0]
        out["program_calls"] = len(s.calls)
        out["left_pairs"] = int(left.size)
        out["cold_pairs"] = int(counts_np[lp.cold].sum())
        out["offload"] = bool(d.offload)
        out["pred_program_s"], out["pred_mlx_side_s"], out["pred_mlx_only_s"] = d.program_s, d.mlx_side_s, d.mlx_only_s

        def gathers():
            return [x_np[src].reshape(len(ids), cap, D) for _, ids, cap, src in s.calls]

        xs = gathers()
        out["gather_ms"] = median_s(gathers, R) * 1e3

        def progs():
            for (gi, ids, cap, _), xg in zip(s.calls, xs):
                programs[gi].run(xg, cap)

        out["programs_ms"] = median_s(progs, R) * 1e3
        per = []
        for (gi, ids, cap, _), xg in zip(s.calls, xs):
            per.append((len(ids), cap, median_s(lambda: programs[gi].run(xg, cap), R) * 1e3))
        out["per_call"] = per

        def spill():
            if not left.size:
                return
            tok = mx.array(left // k, dtype=mx.int32)
            e = mx.array(flat_np[left], dtype=mx.uint32)[:, None]
            mx.eval(stock_experts(m, x32[tok], e))

        out["spill_ms"] = median_s(spill, R) * 1e3
        out["whole_call_ms"] = median_s(lambda: mx.eval(ex(m, x, inds)), R) * 1e3
        # the same call with program calls one at a time vs on 2 workers, interleaved
        ts = {1: [], 2: []}
        for _ in range(R):
            for w in (1, 2):
                os.environ["NPUMOE_WORKERS"] = str(w)
                t = time.perf_counter()
                mx.eval(ex(m, x, inds))
                ts[w].append(time.perf_counter() - t)
        os.environ.pop("NPUMOE_WORKERS")
        out["whole_call_1worker_ms"] = float(np.median(ts[1])) * 1e3
        out["whole_call_2workers_ms"] = float(np.median(ts[2])) * 1e3
        out["stock_ms"] = median_s(lambda: mx.eval(stock_experts(m, x, inds)), 1) * 1e3
        pred = lp.predicted(cost, N, counts_np)
        out["predicted_ms"] = pred["offload_s"] * 1e3
        out["pred_per_call_ms"] = [cost.program_s(G, C, D, H) * 1e3 for G, C, _ in per]
        rows = sum(G * C for G, C, _ in per)
        f = 6.0 * D * H
        out["pred_terms_ms"] = {"sync": cost.sync_s * 1e3, "dispatch": len(per) * cost.dispatch_s * 1e3,
                                "experts": sum(G for G, _, _ in per) * cost.expert_s * 1e3,
                                "compute": rows * f / cost.program_flops * 1e3,
                                "copies": rows * D * 8 / cost.copy_bps * 1e3}
    print(json.dumps({k: v for k, v in out.items() if k not in ("per_call", "pred_per_call_ms")}, indent=1))
    pc = out["per_call"]
    print("per call (G, C, measured ms, predicted ms):")
    for (G, C, t), pr in sorted(zip(pc, out["pred_per_call_ms"]), key=lambda z: z[0][1]):
        print(f"  G={G} C={C:4d} {t:7.2f} {pr:7.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
