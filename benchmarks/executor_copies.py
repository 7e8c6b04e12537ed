"""What an offloaded call of ``OffloadExecutor`` leaves in MLX's graph: the MLX-side copies
of the routed activation (the host-side ones are counted by reading the call; see the
executor's docstring and exec-report).

    PYTHONPATH=. python benchmarks/executor_copies.py

One layer (8 experts in two groups, onnx programs built in memory), 256 tokens, top-2,
x in float32 and bfloat16, with and without pairs spilled to MLX. Prints the primitives
of the lazy result's graph (``mx.export_to_dot``) that copy (P, D) rows: AsType,
Concatenate, Gather, Scatter; the ``mx.array`` made from the host rows is the graph's leaf.
"""

import collections
import re
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx_lm.models.switch_layers import SwitchGLU

from npumoe_mlx.backends import load_backend
from npumoe_mlx.build.programs import spec_from_switch_glu
from npumoe_mlx.planning.cost import CostModel
from npumoe_mlx.planning.plan import GroupPlan, LayerPlan
from npumoe_mlx.runtime.executor import OffloadExecutor

E, D, H, N, K = 8, 256, 128, 256, 2
EAGER = CostModel("onnx", 1e-9, 1e15, 1e15, 0.0, 1.0, 1.0, first_offload_tokens=1)
COPIES = ("AsType", "Concatenate", "Gather", "Scatter", "Copy")


def graph_primitives(y: mx.array) -> collections.Counter:
    with tempfile.TemporaryDirectory() as d:
        mx.export_to_dot(str(Path(d) / "g.dot"), y)
        dot = (Path(d) / "g.dot").read_text()
    return collections.Counter(re.findall(r'label ="([A-Za-z]+)"', dot))


def main():
    mx.random.seed(0)
    glu = SwitchGLU(D, H, E)
    mx.eval(glu.parameters())
    rng = np.random.default_rng(0)
    inds = mx.array(np.stack([rng.choice(E, K, replace=False) for _ in range(N)]).astype(np.uint32))[None]
    be = load_backend("onnx")
    for spill in (False, True):
        tiers = [32] if spill else [64, 128, 256]  # 32 rows per expert: most pairs overflow to MLX
        groups = [GroupPlan(list(range(0, 4)), tiers), GroupPlan(list(range(4, 8)), tiers)]
        lp = LayerPlan(0, "p", E, K, D, H, groups=groups, cold=[], min_tokens=1)
        programs = [be.load(spec_from_switch_glu(glu, layer=0, expert_ids=g.experts, tiers=g.tiers)) for g in groups]
        for dtype in (mx.float32, mx.bfloat16):
            ex = OffloadExecutor(lp, programs, EAGER, overflow="spill" if spill else "rerun")
            ex.notice = lambda m: None
            x = mx.array(rng.standard_normal((1, N, D)).astype(np.float32)).astype(dtype)
            mx.eval(x)
            y = ex(glu, x, inds)
            prims = graph_primitives(y)
            err = float(mx.abs(y.astype(mx.float32) - glu(x, inds).astype(mx.float32)).max())
            print(f"{'spill' if spill else 'no spill':8s} {str(dtype):14s} spilled {ex.stats.spilled:3d} pairs: "
                  f"copying primitives {dict((k, v) for k, v in prims.items() if k in COPIES)}; "
                  f"all {dict(prims)}; max |y - stock| {err:.2e}")


if __name__ == "__main__":
    main()
