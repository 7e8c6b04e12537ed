"""Calibration on MLX's CPU BLAS vs the host path (numpy experts + onnxruntime linears).

    python benchmarks/calibration_speed.py --model DIR [--tokens 512] [--out JSON]

Both sides calibrate the same model on the same corpus in one process, MLX first, then
host (``calibrate(host=False|True)``); each prints its seconds and tok/s, and the JSON
holds both, their ratio and how the two profiles' routed pairs agree (per layer x expert
totals; equal counts mean the rounding difference flipped no router's top-k).
Made for ``benchmarks/fullscale.py write --layers N`` checkpoints (full-scale dims, N layers).
"""

import argparse
import json
import os
import time

import numpy as np
from mlx_lm import utils as mlx_utils

from npumoe_mlx.build.calibrate import calibrate
from npumoe_mlx.build.workloads import corpus_documents


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--corpus", nargs="+", default=["long-context", "qa", "code"])
    p.add_argument("--sides", nargs="+", default=["mlx", "host"], choices=["mlx", "host"])
    p.add_argument("--out")
    a = p.parse_args()
    model, tok, config = mlx_utils.load(a.model, return_config=True)
    docs, desc = corpus_documents(a.corpus, a.tokens, 0)
    res, profiles = {"model": a.model, "corpus": desc, "tokens": a.tokens, "load": os.getloadavg()[0]}, {}
    for side in a.sides:
        t0 = time.perf_counter()
        profiles[side] = calibrate(model, tok, config, docs, max_tokens=a.tokens, host=side == "host")
        s = time.perf_counter() - t0
        res[side] = {"s": round(s, 2), "tok_per_s": round(profiles[side].tokens / s, 3)}
        print(f"{side}: {s:.1f} s, {profiles[side].tokens / s:.2f} tok/s", flush=True)
    if len(profiles) == 2:
        res["speedup"] = round(res["mlx"]["s"] / res["host"]["s"], 2)
        a_, b_ = (np.array([l.counts for l in profiles[k].layers]) for k in ("mlx", "host"))
        res["pairs"] = int(a_.sum())
        res["pairs_moved"] = int(np.abs(a_ - b_).sum() // 2)  # pairs counted under another expert
        res["max_abs"] = {k: [l.max_abs for l in profiles[k].layers] for k in profiles}
        print(f"speedup {res['speedup']}x; {res['pairs_moved']} of {res['pairs']} pairs on another expert")
    res["load_after"] = os.getloadavg()[0]
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
