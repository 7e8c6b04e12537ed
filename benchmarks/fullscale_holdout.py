"""Held-out calls of a build's own calibration domain through its bundle: padding and overflow
per workload, as the executors count them (issue 23, item 4).

    python benchmarks/fullscale_holdout.py --model DIR [--seed 1] [--tokens 2048] --out JSON

The bundle ``npumoe build`` put beside the model is loaded with ``--offload onnx`` (lazy, so
released experts are never read; dense programs for the attention). The build's calibration
corpora (long-context, qa, code) at another seed are prefilled the way each workload calls
(``workloads.workload_calls``): prefill in 2048-token steps, chat requests of 20-800 tokens
continuing their conversation's cache, batch prompts of 200-800 tokens, 2 or 4 per call,
right-padded as ``batch_generate`` pads them. Each workload's padding of program rows and
overflow of pairs past a group's top tier come from the executors' counters (runtime/stats.py).
No decoding: the tiers serve prefill calls (decode stays on MLX).
"""

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache

sys.path.insert(0, str(Path(__file__).parent))
from fullscale import Watchdog, _proc_kb  # noqa: E402

from npumoe_mlx.build.calibrate import encode_documents  # noqa: E402
from npumoe_mlx.build.workloads import WORKLOADS, corpus_documents, workload_calls  # noqa: E402
from npumoe_mlx.runtime.executor import offload_stats, summarize  # noqa: E402
from npumoe_mlx.runtime.loading import load  # noqa: E402

CORPUS = ("long-context", "qa", "code")  # npumoe build's default


def run_workload(model, docs, kind: str, step: int) -> None:
    """Prefill ``docs`` (token id lists) as workload ``kind`` calls them; nothing is decoded."""
    lengths = [len(d) for d in docs]
    caches = {}
    for call in workload_calls(lengths, kind, step):
        if kind == "batch":
            rows = [docs[d][s : s + m] for d, s, m in call]
            L = max(len(r) for r in rows)
            x = mx.array([r + [0] * (L - len(r)) for r in rows])  # (B, L), right-padded
            cache = make_prompt_cache(model)  # each group of prompts from an empty cache
        else:
            (d, s, m), = call
            if s == 0:
                caches[d] = make_prompt_cache(model)
            x, cache = mx.array(docs[d][s : s + m])[None], caches[d]
        model(x, cache=cache)
        mx.eval([c.state for c in cache])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--tokens", type=int, default=2048, help="held-out tokens per workload")
    p.add_argument("--seed", type=int, default=1, help="corpus seed (the build calibrates on seed 0)")
    p.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    p.add_argument("--step", type=int, default=2048, help="prefill step (mlx_lm's default)")
    p.add_argument("--min-available-gb", type=float, default=1.0)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    out = Path(a.out)
    res = {"model": a.model, "corpus": list(CORPUS), "seed": a.seed, "tokens": a.tokens, "workloads": {},
           "loadavg_start": os.getloadavg(), "status": "loading"}

    def save():
        res["peak_rss_gb"] = _proc_kb("VmHWM") / 1e6
        out.with_suffix(".tmp").write_text(json.dumps(res, indent=1))
        os.replace(out.with_suffix(".tmp"), out)

    def abort(reason):
        res["status"] = reason
        save()
        print(reason, flush=True)
        os._exit(3)

    Watchdog(a.min_available_gb, abort)
    t0 = time.perf_counter()
    model, tok = load(a.model, offload="onnx", lazy=True, dense_programs=True)
    res["load_s"] = round(time.perf_counter() - t0, 1)
    docs_text, desc = corpus_documents(list(CORPUS), a.tokens, a.seed)
    docs = [ids[: a.tokens // len(docs_text)] for ids in encode_documents(tok, docs_text)]
    res["corpus_description"] = desc
    for kind in a.workloads:
        before = [replace(s) for s in offload_stats(model)]
        t0 = time.perf_counter()
        run_workload(model, docs, kind, a.step)
        got = summarize([s.since(b) for s, b in zip(offload_stats(model), before)])
        got["seconds"] = round(time.perf_counter() - t0, 1)
        res["workloads"][kind] = got
        print(f"{kind}: padding {got['padding_pct']:.1f}%, overflow {got['overflow_pct']:.2f}%, "
              f"{got['offloaded_calls']}/{got['layer_calls']} layer calls on programs, {got['seconds']} s", flush=True)
        save()
    res["status"] = "done"
    res["loadavg_end"] = os.getloadavg()
    save()


if __name__ == "__main__":
    main()
