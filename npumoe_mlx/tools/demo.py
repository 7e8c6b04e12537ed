"""`npumoe demo`: the whole job on a built-in model, offline, in about a minute.

Builds a small skewed MoE model (factory: qwen3_moe family, random weights, a few
hot experts like real models), builds its offload bundle (calibrate -> tune ->
plan -> compile), generates with the experts offloaded, then compares offload vs
stock MLX and says where the table and the plot are.
"""

import argparse
import sys
import time
from pathlib import Path

from .. import load, owned, stream_generate
from ..atomic import write_json
from ..build import build as build_bundle
from ..executor import format_stats, offload_stats, summarize
from ..offload import resolve
from ..workloads import prompt_of_tokens
from .compare import compare
from .tiny import TINY_FILES, make_tiny_model

# Small but not toy: expert matmuls big enough that where they run matters.
DEMO_DIMS = {"hidden": 256, "moe_inter": 512, "experts": 32, "top_k": 4, "heads": 4, "kv_heads": 2, "head_dim": 64}
SMALL_DIMS = {"hidden": 64, "moe_inter": 64, "experts": 8, "top_k": 2, "heads": 4, "kv_heads": 2, "head_dim": 16}


MARKER = "npumoe_demo.json"


def _claim(out: Path, backend: str, force: bool) -> None:
    """Check ``out`` is ours to write (see owned.py), then list what the demo writes there."""
    owned.check(out, MARKER, "demo", force)
    files = [MARKER, "compare", f"model/npumoe-{backend}"] + [f"model/{f}" for f in TINY_FILES]
    write_json(out / MARKER, {"tool": "npumoe demo", "files": files})


def run(out: str = "npumoe-demo", small: bool = False, prompt_tokens: int = 512, max_tokens: int = 16,
        layers: int = 4, log=print, force: bool = False) -> dict:
    t0 = time.perf_counter()
    out = Path(out)
    backend = resolve("auto")
    _claim(out, backend, force)
    model_dir = out / "model"
    dims = SMALL_DIMS if small else DEMO_DIMS
    log(f"[demo] 1/4 model: qwen3_moe, {layers} layers, {dims['experts']} experts (top-{dims['top_k']}), "
        f"D={dims['hidden']}, H={dims['moe_inter']}, skewed routers -> {model_dir}")
    log("       random weights (a synthetic model: its text is gibberish; the demo shows where the work runs "
        "and that offload matches stock MLX token for token)")
    # The demo's folder check passed, so anything else in model/ is the demo's own bundle: keep it
    # (rebuilt next) rather than refuse; with --force, the user's files there are kept too.
    make_tiny_model(model_dir, "qwen3_moe", skew=1.5, seed=0, num_layers=layers, dims=dims, force=True)

    log(f"[demo] 2/4 bundle ({backend}): calibrate -> tune -> plan -> compile")
    build_bundle(str(model_dir), backend, tokens=1024, chunk_size=prompt_tokens, tune=True,
                  log=lambda m: log("       " + m), progress=True)

    log("[demo] 3/4 generate with the experts offloaded")
    model, tok = load(str(model_dir), offload=backend, quiet=True)
    ids = prompt_of_tokens(tok, prompt_tokens, seed=1)
    text = "".join(r.text for r in stream_generate(model, tok, ids, max_tokens=max_tokens))
    log(f"       {len(ids)} prompt tokens -> {text!r} (random model: gibberish expected)")
    for line in format_stats(summarize(offload_stats(model))).splitlines():
        log(f"       {line}")
    del model

    log("[demo] 4/4 compare offload vs stock MLX")
    result = compare(str(model_dir), prompt_tokens=(prompt_tokens,), max_tokens=max_tokens, backend=backend,
                     out_dir=str(out / "compare"), log=lambda m: log("       " + m))
    log(f"[demo] done in {time.perf_counter() - t0:.0f} s. Results: {out / 'compare' / 'compare.md'}, "
        f"{out / 'compare' / 'compare.json'}, plot {out / 'compare' / 'compare.png'}")
    log(f"[demo] try: npumoe generate --model {model_dir} --prompt \"...\" --stats")
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="npumoe demo", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="npumoe-demo", help="Folder for the model, bundle and results (default ./npumoe-demo).")
    p.add_argument("--small", action="store_true", help="A toy-sized model (seconds; for tests).")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--force", action="store_true",
                   help="Rerun into a demo folder that also holds other files: only the demo's own files "
                   "(listed in its npumoe_demo.json) are replaced, the rest is kept.")
    args = p.parse_args(argv)
    run(args.out, args.small, args.prompt_tokens, args.max_tokens, args.layers, force=args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
