"""`npumoe bench layer`: one MoE layer of a real model's shape, offload vs stock SwitchGLU.

Random weights at the preset's real dims (shared/reference/model-shapes.json),
skewed routing like real models (Zipf popularity, Gumbel top-k), a synthetic
calibration of the same routing, the cost model measured in this run, the plan,
the programs, then per token count: offload and stock time, the backend's dense
GEMM rate at the same dims (one expert's FFN as a single dense program over the N
tokens, measured in the same run; ``gemm_fraction`` = the offload path's rate over
it), padding, calls, spill, and the cost model's predicted time next to the
measured one.
"""

import argparse
import os
import platform
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import List, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.switch_layers import SwitchGLU

from ane_kernels.spec import ProgramSpec, dequantize

from ..atomic import write_json
from ..backends import load_backend, registry
from ..build.programs import spec_from_switch_glu
from ..build.tune import median_s, tune
from ..cli.replay import load_shape_presets
from ..planning.cost import flops_per_row
from ..planning.plan import PlanLimits, plan_layer
from ..planning.profiles import LayerCounts
from ..runtime.executor import OffloadExecutor
from ..runtime.experts import stock_experts
from ..runtime.stats import LayerStats


def popularity(E: int, skew: float, rng) -> np.ndarray:
    """(E,) expert shares: Zipf(skew) over a random ranking (skew 0 = uniform)."""
    p = 1.0 / np.arange(1, E + 1) ** skew
    return (p / p.sum())[rng.permutation(E)]


def route(N: int, k: int, p: np.ndarray, rng) -> np.ndarray:
    """(N, k) distinct experts per token, drawn by popularity (Gumbel top-k)."""
    g = np.log(p)[None, :] + rng.gumbel(size=(N, p.size))
    return np.argsort(-g, axis=1)[:, :k].astype(np.uint32)


def bench_shape(
    name: str,
    shape: dict,
    tokens: Sequence[int],
    backend: str = "onnx",
    q_bits: Optional[int] = 4,
    skew: float = 1.0,
    repeats: int = 3,
    log=print,
) -> List[dict]:
    D, H, E, k = shape["hidden"], shape["expert_intermediate"], shape["experts"], shape["top_k"]
    quant = {"mode": "affine", "bits": q_bits, "group_size": 64} if q_bits else None
    rng = np.random.default_rng(0)
    mx.random.seed(0)
    m = SwitchGLU(D, H, E)
    if quant:
        nn.quantize(m, group_size=64, bits=q_bits)
    mx.eval(m.parameters())
    p = popularity(E, skew, rng)

    # synthetic calibration with this routing: prefill calls of the sizes benchmarked
    sizes = [n for n in tokens if n >= 16] or [512]
    chunks = [{"tokens": n, "counts": np.bincount(route(n, k, p, rng).ravel(), minlength=E).tolist()}
              for n in sizes for _ in range(2)]
    prof = LayerCounts(0, "bench", E, k, np.sum([c["counts"] for c in chunks], 0).tolist(), chunks)
    log(f"[{name}] D={D} H={H} E={E} k={k} {'q%d' % q_bits if q_bits else 'float32'}: measuring costs")
    cost = tune(backend, D, H, quant, repeats=3)
    lp = plan_layer(prof, D, H, cost, PlanLimits.for_backend(backend), quant)
    log(f"[{name}] plan: {len(lp.groups)} groups {[len(g.experts) for g in lp.groups]}, {len(lp.cold)} cold, "
        f"offload from {lp.min_tokens} tokens")
    be = load_backend(backend)
    with tempfile.TemporaryDirectory() as tmp:
        programs = []
        for gi, g in enumerate(lp.groups):
            spec = spec_from_switch_glu(m, layer=0, expert_ids=g.experts, tiers=g.tiers)
            folder = Path(tmp) / f"g{gi}"  # programs from files, as a bundle loads them
            programs.append(be.load(be.build(spec, folder), folder))
        ex = OffloadExecutor(lp, programs, cost)
        one_row = one_row_call(be, m, D, H, repeats=max(repeats, 5) * 4)
        log(f"[{name}] 1-row call: program {one_row['one_row_program_ms']:.3f} ms, dense float32 MatMul "
            f"{one_row['one_row_dense_ms']:.3f} ms (x{one_row['one_row_ratio']:.2f})")
        rows = []
        f = flops_per_row(D, H)
        for N in tokens:
            x = mx.random.normal((N, D)) / D**0.5
            inds = mx.array(route(N, k, p, rng))
            mx.eval(x, inds)
            reps = repeats if N * k * f < 2e10 else 1
            stock_y = stock_experts(m, x, inds)
            mx.eval(stock_y)
            t_stock = median_s(lambda: mx.eval(stock_experts(m, x, inds)), reps, warm_up=False)
            y = ex(m, x, inds)
            mx.eval(y)  # warm-up (ORT first run)
            # offload and the dense reference timed in turns (medians): gemm_fraction is their
            # ratio, and on a shared machine the load moves between separately timed medians
            gemm_run, gemm_scale = _gemm_call(be, m, D, N)
            before = _snapshot(ex.stats)
            t_off, t_g = _interleaved([lambda: mx.eval(ex(m, x, inds)), gemm_run], max(reps, 3))
            st = _delta(ex.stats, before)
            err = float(mx.abs(y - stock_y).max() / mx.abs(stock_y).max())
            counts = np.bincount(np.array(inds).ravel(), minlength=E)
            pred = lp.predicted(cost, N, counts)
            # dense reference: the same FFN dims as one dense program over the N tokens,
            # scaled to the N*k routed rows (what the backend does with no routing at all)
            t_gemm = t_g * gemm_scale * k
            flops = N * k * f
            row = {
                "shape": name, "tokens": N, "backend": backend, "weights": f"q{q_bits}" if q_bits else "float32",
                "offload_tps": N / t_off, "stock_tps": N / t_stock, "speedup": t_stock / t_off,
                "achieved_gflops": flops / t_off / 1e9, "gemm_gflops": flops / t_gemm / 1e9,
                "gemm_fraction": t_gemm / t_off,
                "padding_pct": st.padding_pct,
                "calls": st.program_calls / max(st.offloaded, 1),
                "spill_pct": st.spill_pct,
                "offloaded": st.offloaded > 0,
                "predicted_s": pred["offload_s"] if st.offloaded else pred["mlx_s"],
                "measured_s": t_off, "stock_s": t_stock, "max_rel_err": err, "fallback": ex.stats.fallback,
            }
            row["mlx_pairs_pct"] = row["spill_pct"] if row["offloaded"] else 100.0
            row.update(one_row)
            rows.append(row)
            log(f"[{name}] {N:>5} tokens: offload {row['offload_tps']:9.1f} tok/s  stock {row['stock_tps']:9.1f} tok/s  "
                f"x{row['speedup']:.2f}  gemm_fraction {row['gemm_fraction']:.2f}  padding {row['padding_pct']:.1f}%  "
                f"calls {row['calls']:.1f}  spill {row['spill_pct']:.1f}%  predicted {row['predicted_s'] * 1e3:.1f} ms "
                f"measured {t_off * 1e3:.1f} ms")
    return rows


def _snapshot(st: LayerStats) -> LayerStats:
    return replace(st)


def _delta(st: LayerStats, before: LayerStats) -> LayerStats:
    return st.since(before)


def _gemm_call(be, m: SwitchGLU, D: int, N: int):
    """One dense FFN program call (one expert, N rows rounded up to 8, D and H of the layer),
    warmed up, and the factor that scales its time to N rows."""
    C = max(8, -(-N // 8) * 8)
    prog = be.load(spec_from_switch_glu(m, layer=0, expert_ids=[0], tiers=[C]))
    x = np.random.default_rng(1).standard_normal((1, C, D)).astype(np.float32)
    prog.run(x, C)
    return (lambda: prog.run(x, C)), N / C


def _interleaved(fns, reps: int) -> List[float]:
    """Median seconds of each function, timed in turns ``reps`` times."""
    ts = [[] for _ in fns]
    for _ in range(reps):
        for t, fn in zip(ts, fns):
            t0 = time.perf_counter()
            fn()
            t.append(time.perf_counter() - t0)
    return [float(np.median(t)) for t in ts]


def one_row_call(be, m: SwitchGLU, D: int, H: int, repeats: int = 20) -> dict:
    """A 1-row call of a one-expert program (the layer's weight format) vs the same FFN
    as dense float32 MatMuls, both through the backend the same way: the program's fixed
    cost per call, which decides whether decode-sized calls can go to programs."""
    spec = spec_from_switch_glu(m, layer=0, expert_ids=[0], tiers=[1])
    dense = ProgramSpec(layer=0, expert_ids=(0,), tiers=(1,), D=D, H=H, activation=spec.activation,
                        gate=dequantize(spec.gate), up=dequantize(spec.up), down=dequantize(spec.down))
    x = np.random.default_rng(2).standard_normal((1, 1, D)).astype(np.float32)
    t = {}
    for key, sp in (("program", spec), ("dense", dense)):
        prog = be.load(sp)
        prog.run(x, 1)
        t[key] = median_s(lambda: prog.run(x, 1), repeats, warm_up=False)
    return {"one_row_program_ms": t["program"] * 1e3, "one_row_dense_ms": t["dense"] * 1e3,
            "one_row_ratio": t["program"] / t["dense"]}


def format_table(rows: List[dict]) -> str:
    """Markdown: one row per (shape, tokens)."""
    head = ("shape", "tokens", "offload tok/s", "stock tok/s", "speedup", "gemm_fraction", "padding %",
            "calls", "spill %", "pairs on MLX %", "predicted ms", "measured ms")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['tokens']} | {r['offload_tps']:.1f} | {r['stock_tps']:.1f} | {r['speedup']:.2f}x | "
            f"{r['gemm_fraction']:.2f} | {r['padding_pct']:.1f} | {r['calls']:.0f} | {r['spill_pct']:.1f} | "
            f"{r.get('mlx_pairs_pct', r['spill_pct']):.1f} | "
            f"{r['predicted_s'] * 1e3:.0f} | {r['measured_s'] * 1e3:.0f} |"
        )
    return "\n".join(lines)


def plot(rows: List[dict], path: str) -> bool:
    from .report import pyplot

    plt = pyplot()
    if plt is None:
        return False

    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    fig, axes = plt.subplots(1, len(shapes), figsize=(4 * len(shapes), 3.2), squeeze=False)
    for ax, s in zip(axes[0], shapes):
        rs = [r for r in rows if r["shape"] == s]
        n = [r["tokens"] for r in rs]
        ax.plot(n, [r["offload_tps"] for r in rs], "o-", label=f"offload ({rs[0]['backend']})")
        ax.plot(n, [r["stock_tps"] for r in rs], "s--", label="stock MLX SwitchGLU")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(s)
        ax.set_xlabel("tokens per call")
        ax.set_ylabel("tokens/s")
        ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = str(path) + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    Path(tmp).replace(path)
    return True


def main(argv=None) -> int:
    shapes = load_shape_presets()
    p = argparse.ArgumentParser(prog="npumoe bench layer", description=__doc__.splitlines()[0])
    p.add_argument("--shape", nargs="+", action="extend", required=True, metavar="PRESET",
                   help=f"Presets: {', '.join(shapes)}, or 'all'.")
    p.add_argument("--tokens", default="1,128,512,2048", help="Tokens per call, comma-separated.")
    p.add_argument("--backend", choices=registry.runnable(), default=registry.DEFAULT)
    p.add_argument("--q-bits", type=int, choices=(0, 4, 8), default=4, help="Expert weights: 4/8-bit affine, or 0 for float32.")
    p.add_argument("--skew", type=float, default=1.0, help="Zipf exponent of expert popularity (0 = uniform).")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", help="Write the rows as JSON.")
    p.add_argument("--plot", help="Write a PNG plot.")
    args = p.parse_args(argv)
    if args.json:
        from ..outputs import check_file

        check_file(args.json, "--json")  # before the work
    names = list(shapes) if args.shape == ["all"] else args.shape
    bad = [n for n in names if n not in shapes]
    if bad:
        raise ValueError(f"unknown shape preset {bad[0]!r}; choose from {', '.join(shapes)}")
    try:
        tokens = [int(t) for t in args.tokens.split(",")]
        assert all(t > 0 for t in tokens)
    except (ValueError, AssertionError):
        raise ValueError(f"--tokens must be positive integers separated by commas, got {args.tokens!r}") from None
    rows = []
    for n in names:
        rows += bench_shape(n, shapes[n], tokens, args.backend, args.q_bits or None, args.skew, args.repeats)
        if args.json:  # keep what is measured so far
            write_json(args.json, {"rows": rows, "machine": _machine()})
    print(format_table(rows))
    if args.json:
        print(f"wrote {args.json}")
    if args.plot:
        from .report import PLOT_MISSING

        print(f"wrote {args.plot}" if plot(rows, args.plot) else PLOT_MISSING)
    return 0


def _machine() -> dict:
    return {"platform": platform.platform(), "cpus": os.cpu_count(), "mlx_device": str(mx.default_device())}
