"""Host copies of an offloaded layer call: time and bytes per program row element, one process per
code version (run it with PYTHONPATH set to each tree, alternately, to compare two versions in
the same run; ``--stock`` also times stock MLX on the same call).

    PYTHONPATH=. python benchmarks/host_copies.py --experts 16 --tokens 512

Qwen3-30B-A3B expert dims (D=2048, H=768), float32 (or 4-bit), top-8 over E experts in groups of 8, onnx
programs built in memory, every pair on programs (a cost model that offloads everything). Prints
one JSON line: median ms (wall, and this process's CPU time) of the offloaded call and of stock
SwitchGLU, and (where the code counts
them: ``dispatch.COUNTER``) the host bytes moved per program row element.
"""

import argparse
import json
import time

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.switch_layers import SwitchGLU

from npumoe_mlx.backends import Program, load_backend
from npumoe_mlx.build.programs import spec_from_switch_glu
from npumoe_mlx.planning.cost import CostModel
from npumoe_mlx.planning.plan import GroupPlan, LayerPlan
from npumoe_mlx.runtime import dispatch
from npumoe_mlx.runtime.executor import OffloadExecutor

D, H, K = 2048, 768, 8


class Identity(Program):
    """A program that computes nothing (y = x, written in place like onnxruntime's IO binding):
    the call's time is then the host path's own (gather, checks, copies, MLX's side)."""

    concurrent = True

    def __init__(self, G, tiers):
        self.name, self.G, self.D, self.tiers = "identity", G, D, tuple(tiers)

    def run_into(self, x, tier, out):
        np.copyto(out, x)
        return out

    def run(self, x, tier=None):
        return np.array(x)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--identity", action="store_true", help="Programs that compute nothing: time the host path alone")
    p.add_argument("--stock", action="store_true", help="Also time stock SwitchGLU (slow on a CPU: ~90 s a call here)")
    p.add_argument("--q-bits", type=int, choices=(0, 4), default=0, help="4-bit experts, or 0: float32 (MLX's CPU path is fast only for float32)")
    args = p.parse_args(argv)
    E, N = args.experts, args.tokens
    mx.random.seed(0)
    glu = SwitchGLU(D, H, E)
    if args.q_bits:
        nn.quantize(glu, group_size=64, bits=args.q_bits)
    mx.eval(glu.parameters())
    rng = np.random.default_rng(0)
    inds = mx.array(np.stack([rng.choice(E, K, replace=False) for _ in range(N)]).astype(np.uint32))[None]
    x = mx.array(rng.standard_normal((1, N, D)).astype(np.float32))
    counts = np.bincount(np.array(inds).ravel(), minlength=E)
    top = int(-(-counts.max() // 8) * 8)  # one tier that holds every expert's load: no spill
    groups = [GroupPlan(list(range(i, min(i + 8, E))), [top]) for i in range(0, E, 8)]
    lp = LayerPlan(0, "p", E, K, D, H, groups=groups, cold=[], min_tokens=1)
    be = load_backend("onnx")
    if args.identity:
        progs = [Identity(len(g.experts), g.tiers) for g in groups]
    else:
        progs = [be.load(spec_from_switch_glu(glu, layer=0, expert_ids=g.experts, tiers=g.tiers)) for g in groups]
    eager = CostModel("onnx", 1e-9, 1e15, 1e15, 0.0, 1.0, 1.0, first_offload_tokens=1)
    ex = OffloadExecutor(lp, progs, eager, overflow="rerun")
    ex.notice = lambda m: None

    cpu = []  # this process's CPU seconds per call (all threads): steadier than wall time on a shared machine

    def med(f, cpu=None):
        f()  # warm
        ts = []
        for _ in range(args.repeats):
            t, c = time.perf_counter(), time.process_time()
            f()
            ts.append(time.perf_counter() - t)
            if cpu is not None:
                cpu.append(time.process_time() - c)
        return float(np.median(ts))

    off = med(lambda: mx.eval(ex(glu, x, inds)), cpu)
    stock = med(lambda: mx.eval(glu(x, inds))) if args.stock else float("nan")
    # the same result as stock's, checked on a few tokens (stock on all of them is slow on a CPU)
    sub = slice(0, 16)
    want = mx.broadcast_to(x[:, sub, None, :], (1, 16, K, D)) if args.identity else glu(x[:, sub], inds[:, sub])
    err = float(mx.abs(ex(glu, x, inds)[:, sub] - want).max())
    per_elem = None
    per_pair = None
    if hasattr(dispatch, "COUNTER"):
        dispatch.COUNTER = [0, 0]  # [per program row, per pair] (older trees count into [0] only)
        slots0, pairs0 = ex.stats.slots, ex.stats.pairs
        mx.eval(ex(glu, x, inds))
        per_elem = dispatch.COUNTER[0] / ((ex.stats.slots - slots0) * D)
        per_pair = dispatch.COUNTER[1] / ((ex.stats.pairs - pairs0) * D)
        dispatch.COUNTER = None
    program_s = ex.stats.program_s / max(ex.stats.offloaded, 1)
    print(json.dumps({"experts": E, "tokens": N, "offload_ms": off * 1e3, "offload_cpu_ms": float(np.median(cpu)) * 1e3,
                      "stock_ms": stock * 1e3,
                      "offload_over_stock": off / stock, "program_part_ms": program_s * 1e3,
                      "host_bytes_per_element": per_elem, "host_bytes_per_pair_element": per_pair,
                      "max_abs_err": err}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
