"""Per-call cost of the executor's decision (``tiers.decide_call``) on real routing.

    PYTHONPATH=. python benchmarks/bench_decide.py [--routing ../shared/routing]

Plans each case from a shared trace (first half, as ``npumoe replay --split half``), then
times ``decide_call`` (arrays built per call, as ``LayerPlan.decide`` and replay call it)
and ``CallDecider.decide`` (built once per layer, as the executor calls it) on the other half's calls of 128, 512 and 2048 tokens: the host work every offloaded layer
call adds after its sync. With ``tests/decide_reference.py`` beside it (a source checkout),
the same calls also go through the per-group Python rule it replaced, interleaved, so both
columns ran under the same load, and every decision is checked equal. Each number is the median
over the calls of each call's best of 5 runs. No compute; ~3 minutes.
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from npumoe_mlx import replay as rp
from npumoe_mlx.cost import chip_cost, default_cost
from npumoe_mlx.plan import PlanLimits
from npumoe_mlx.tiers import CallDecider, decide_call

ROOT = Path(__file__).resolve().parents[1]
ROUTING = ROOT / ".." / "shared" / "routing"
CASES = [  # (label, shape, trace, backend, chip, objective)
    ("olmoe onnx time", "qwen3-30b-a3b", "olmoe-1b-7b.arxiv", "onnx", None, "time"),
    ("mixtral coreml time", "mixtral-8x7b", "mixtral-8x7b.arxiv", "coreml", None, "time"),
    ("mixtral coreml energy M4-Max", "mixtral-8x7b", "mixtral-8x7b.arxiv", "coreml", "M4-Max", "energy"),
]


def _reference():
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        from decide_reference import decide_call as ref
    except ImportError:
        return None
    return ref


def _time(fn, args, counts, repeat=5) -> float:
    """Median over the calls of each call's best of ``repeat`` runs (us): robust to a loaded machine."""
    best = []
    for c in counts:
        b = float("inf")
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn(c, *args)
            b = min(b, time.perf_counter() - t0)
        best.append(b)
    return float(np.median(best)) * 1e6


def bench(routing: Path, ref, label, shape, trace, backend, chip, objective, max_calls=100):
    sh = rp.preset_shape(shape)
    cost = chip_cost(chip, backend, sh["D"], sh["H"]) if chip else default_cost(backend)
    t = rp.load_trace(routing / f"{trace}.npz")
    out = rp.replay([t], [t], sh["D"], sh["H"], cost, PlanLimits.for_backend(backend), (128, 512, 2048),
                    split="half", objective=objective)
    for lp in out["plan"].layers:
        rest = rp.split_half(t[lp.layer], 2048)[1]
        cold = np.zeros(lp.num_experts, bool)
        cold[list(lp.cold)] = True
        args = ([np.asarray(g.experts) for g in lp.groups], [list(g.tiers) for g in lp.groups], cold, cost,
                lp.D, lp.H, "auto", lp.objective, lp.max_calls, lp.energy_bound)
        for n in (128, 512, 2048):
            counts = rp.call_counts(rest, lp.num_experts, n, 2048)[:max_calls]
            dec = CallDecider(*args[:6])
            ex = lambda c, *_: dec.decide(c, *args[6:])  # noqa: E731  the executor's way: arrays built once
            line = f"{label:30s} layer {lp.layer:2d} groups {len(lp.groups):2d} tokens {n:4d}: "
            if ref is not None:
                same = all(decide_call(c, *args) == ref(c, *args) == ex(c) for c in counts)
                line += f"per-group {_time(ref, args, counts):7.1f} us, "
            line += (f"decide_call {_time(decide_call, args, counts):7.1f} us, CallDecider {_time(ex, args, counts):7.1f} us "
                     f"per call ({len(counts)} calls" + (f", same: {same})" if ref is not None else ")"))
            print(line, flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--routing", default=str(ROUTING))
    args = p.parse_args()
    ref = _reference()
    for case in CASES:
        bench(Path(args.routing), ref, *case)


if __name__ == "__main__":
    main()
