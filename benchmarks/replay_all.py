"""Replay every shared routing trace through the planner and the executor's decisions.

    PYTHONPATH=. python benchmarks/replay_all.py [--routing benchmarks/routing] [--out benchmarks/results/replay.json]

Three tables (benchmarks/replay.md): tiers on real routing (each trace, --split half, onnx
and coreml parametric costs, calls of 128/512/2048 tokens), across domains (plan on some
traces, replay others), and concurrent residency per Apple chip profile (qwen3-30b-a3b
shape on the OLMoE traces, mixtral-8x7b shape on the Mixtral ones, 2048-token calls, time
and energy objectives). Each row is what `npumoe replay` prints for the same arguments.
No compute, deterministic; about 10 minutes on 2 cores.
"""

import argparse
import json
import platform
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from npumoe_mlx.backends.registry import chip_cost, default_cost
from npumoe_mlx.cli import replay as rp
from npumoe_mlx.planning.chips import CHIP_NAMES
from npumoe_mlx.planning.plan import PlanLimits

OLMOE = ["olmoe-1b-7b.arxiv", "olmoe-1b-7b.book"]
MIXTRAL = [f"mixtral-8x7b.{d}" for d in ("arxiv", "book", "c4", "github", "wikipedia")]
CROSS = [  # (plan on, replay on)
    (["olmoe-1b-7b.arxiv"], ["olmoe-1b-7b.book"]),
    (["olmoe-1b-7b.book"], ["olmoe-1b-7b.arxiv"]),
    (["mixtral-8x7b.arxiv", "mixtral-8x7b.book"], ["mixtral-8x7b.c4", "mixtral-8x7b.github", "mixtral-8x7b.wikipedia"]),
    (["mixtral-8x7b.github"], ["mixtral-8x7b.wikipedia"]),
]
CHIP_CASES = [("qwen3-30b-a3b", f) for f in OLMOE] + [("mixtral-8x7b", f) for f in MIXTRAL]
ROUTING = Path(__file__).resolve().parent / "routing"


def _run(job):
    kind, routing, cal, rep, shape, backend, chip, objective, tokens, split, bound = job
    sh = rp.preset_shape(shape)
    cost = chip_cost(chip, backend, sh["D"], sh["H"]) if chip else default_cost(backend)
    load = lambda names: [rp.load_trace(Path(routing) / f"{n}.npz") for n in names]  # noqa: E731
    out = rp.replay(load(cal), load(rep), sh["D"], sh["H"], cost, PlanLimits.for_backend(backend), tokens,
                    split=split, objective=objective, energy_bound=bound)
    args = f"--shape {shape} --calibrate {' '.join(n + '.npz' for n in cal)}"
    if rep != cal:
        args += f" --routes {' '.join(n + '.npz' for n in rep)}"
    args += f"{' --split half' if split else ''} --tokens {','.join(map(str, tokens))} --backend {backend}"
    args += f"{' --chip ' + chip if chip else ''}{' --objective ' + objective if objective != 'time' else ''}"
    args += f"{' --energy-bound ' + bound if objective == 'energy' and bound != 'time' else ''}"
    return {"kind": kind, "calibrate": cal, "routes": rep, "shape": shape, "backend": backend, "chip": chip,
            "objective": objective, "energy_bound": bound, "split": split, "command": f"npumoe replay {args}",
            "rows": out["rows"], "summary": out["summary"]}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--routing", default=str(ROUTING))
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "replay.json"))
    p.add_argument("--chips", default=",".join(CHIP_NAMES))
    p.add_argument("--jobs", type=int, default=2)
    a = p.parse_args()
    jobs = []
    for be in ("onnx", "coreml"):
        for f in OLMOE + MIXTRAL:
            jobs.append(("split", a.routing, [f], [f], f.split(".")[0], be, None, "time", (128, 512, 2048), "half", "time"))
        for cal, rep in CROSS:
            jobs.append(("cross", a.routing, cal, rep, cal[0].split(".")[0], be, None, "time", (128, 512, 2048), None, "time"))
    for chip in a.chips.split(","):
        for shape, f in CHIP_CASES:
            for obj, bound in (("time", "time"), ("energy", "time"), ("energy", "gpu")):
                jobs.append(("chip", a.routing, [f], [f], shape, "coreml", chip, obj, (2048,), "half", bound))
    t0 = time.time()
    with ProcessPoolExecutor(a.jobs) as ex:
        results = list(ex.map(_run, jobs))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({
        "machine": f"{platform.node()} ({platform.machine()})", "seconds": round(time.time() - t0, 1),
        "results": results}, indent=1))
    print(f"wrote {a.out} ({len(results)} replays, {time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
