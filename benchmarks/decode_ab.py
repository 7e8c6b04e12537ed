"""Decode speed, offload vs stock, in turns in one process (per-token times, not one run each).

    PYTHONPATH=. python benchmarks/decode_ab.py --model npumoe-demo/model --json out.json

`npumoe compare` measures each side once, one after the other, 16 tokens each: on this shared
2-core machine one such pair moved 0.25x-1.05x between back-to-back runs. Here each side is
loaded once, warmed up, then `--rounds` greedy generations run in turns (stock, offload,
stock, ...) and every token's interval is kept; the report gives the 25th percentile and the
median of those intervals (tok/s = 1 / interval) and each round's median.
Variants: stock (mlx_lm.load), offload (npumoe_mlx.load: released layers' decode on
programs), keep (npumoe_mlx.load(keep_mlx_experts=True): decode on MLX).
"""

import argparse
import json
import os
import time

import numpy as np
from mlx_lm import load as stock_load
from mlx_lm import stream_generate
from mlx_lm.sample_utils import make_sampler

import npumoe_mlx


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--variants", default="stock,offload")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--json")
    a = p.parse_args(argv)
    loaders = {"stock": lambda: stock_load(a.model), "offload": lambda: npumoe_mlx.load(a.model, quiet=True),
               "keep": lambda: npumoe_mlx.load(a.model, keep_mlx_experts=True, quiet=True)}
    variants = a.variants.split(",")
    models = {v: loaders[v]() for v in variants}
    prompt = [3 + (i * 7) % 500 for i in range(a.prompt_tokens)]

    def run(v, n):
        model, tok = models[v]
        ts = [time.perf_counter() for _ in stream_generate(model, tok, prompt, max_tokens=n, sampler=make_sampler(0.0))]
        return np.diff(ts[1:])  # token intervals after the first (prefill + first sample)

    for v in variants:
        run(v, 8)  # warm-up
    load0 = os.getloadavg()
    res = {v: [] for v in variants}
    for _ in range(a.rounds):
        for v in variants:
            res[v].append(run(v, a.max_tokens))
    out = {"model": a.model, "npumoe_mlx": os.path.dirname(npumoe_mlx.__file__), "rounds": a.rounds,
           "prompt_tokens": a.prompt_tokens, "max_tokens": a.max_tokens,
           "loadavg_at_start": load0, "loadavg_at_end": os.getloadavg(), "sides": {}}
    for v in variants:
        iv = np.concatenate(res[v])
        out["sides"][v] = {"p25_ms": float(np.percentile(iv, 25) * 1e3), "median_ms": float(np.median(iv) * 1e3),
                           "p25_tps": float(1 / np.percentile(iv, 25)), "median_tps": float(1 / np.median(iv)),
                           "round_median_tps": [float(1 / np.median(r)) for r in res[v]]}
        s = out["sides"][v]
        print(f"{v:8s} per token: p25 {s['p25_ms']:.2f} ms, median {s['median_ms']:.2f} ms "
              f"({s['median_tps']:.0f} tok/s); rounds {[round(x) for x in s['round_median_tps']]}")
    if "stock" in out["sides"]:
        for v in variants:
            if v != "stock":
                out["sides"][v]["vs_stock_median"] = out["sides"][v]["median_tps"] / out["sides"]["stock"]["median_tps"]
                out["sides"][v]["vs_stock_p25"] = out["sides"][v]["p25_tps"] / out["sides"]["stock"]["p25_tps"]
                print(f"{v} vs stock: {out['sides'][v]['vs_stock_median']:.2f}x (medians), "
                      f"{out['sides'][v]['vs_stock_p25']:.2f}x (p25)")
    print(f"load {out['loadavg_at_start']} -> {out['loadavg_at_end']}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
