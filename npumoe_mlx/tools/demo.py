"""`npumoe demo`: the whole job on a built-in model, offline, in about a minute.

Builds a small skewed MoE model (factory: qwen3_moe family, random weights, a few
hot experts like real models), builds its offload bundle (calibrate -> tune ->
plan -> compile), generates with the experts offloaded, compares offload vs stock
MLX, and ends with three plain lines (tokens identical?, speed ratio, memory ratio) and
where the report is. It works in npumoe's cache, not the current folder, and a rerun
reuses the model and bundle while they are current.
"""

import argparse
import sys
import time
from pathlib import Path

from .. import load, stream_generate
from .._version import __version__
from ..atomic import write_json
from ..build.build import build as build_bundle
from ..build.workloads import prompt_of_tokens
from ..bundle import bundle as bundles
from ..bundle import owned
from ..runtime.executor import offload_stats, summarize
from ..runtime.offload import resolve
from .compare import compare
from .tiny import TINY_FILES, make_tiny_model

# Small but not toy: expert matmuls big enough that where they run matters.
DEMO_DIMS = {"hidden": 256, "moe_inter": 512, "experts": 32, "top_k": 4, "heads": 4, "kv_heads": 2, "head_dim": 64}
SMALL_DIMS = {"hidden": 64, "moe_inter": 64, "experts": 8, "top_k": 2, "heads": 4, "kv_heads": 2, "head_dim": 16}


MARKER = "npumoe_demo.json"


def default_out() -> Path:
    """The demo's folder: in npumoe's cache (``$NPUMOE_CACHE/demo``), never the current folder."""
    return bundles.cache_root() / "demo"


def _files(backend: str):
    return [MARKER, "compare", f"model/npumoe-{backend}"] + [f"model/{f}" for f in TINY_FILES]


def _reusable(out: Path, settings: dict) -> bool:
    """The model and bundle a previous run left are what this run would build, and current."""
    info = owned.read_marker(out, MARKER) or {}
    if info.get("settings") != settings:
        return False
    model = out / "model"
    try:
        bundles.read(model / f"npumoe-{settings['backend']}", model, str(model))
        return True
    except Exception:  # missing, stale, damaged: build again
        return False


def summary_lines(r: dict, report: Path, plotted: bool) -> list:
    """Three plain lines (tokens, speed, memory) and where the report is."""
    n = r["max_tokens"]
    if r["token_agreement"] == 1.0:
        tokens = f"tokens:  identical to stock MLX ({n} greedy tokens per prompt)"
    else:
        first = next((p["first_divergence"] for p in r["prompts"] if p["first_divergence"] is not None), None)
        tokens = (f"tokens:  NOT identical to stock MLX: {r['token_agreement']:.0%} agree, first difference at "
                  f"token {first}")
    o, s, d = r["offload"], r["stock"], r["devices"]
    pre, dec = o["prefill_tps"] / s["prefill_tps"], o["decode_tps"] / s["decode_tps"]
    speed = f"speed:   prefill {pre:.2f}x, decode {dec:.2f}x stock MLX ({d['offload']} vs {d['stock']})"
    if min(pre, dec) < 1:
        speed += "; below 1x, a program call's fixed cost outweighs the expert work it takes over at this size"
    memory = (f"memory:  peak {o['peak_mem_gb']:.2f} GB vs {s['peak_mem_gb']:.2f} GB stock "
              f"({o['peak_mem_gb'] / s['peak_mem_gb']:.2f}x)")
    if r.get("resident") and not r["resident"]["offload"]["released"]:
        memory += "; MLX kept its copy of the experts (the build measured decode cheaper on MLX)"
    files = f"{report / 'compare.md'}, compare.json" + (", compare.png" if plotted else "")
    return [tokens, speed, memory, f"report:  {files}"]


def run(out=None, small: bool = False, prompt_tokens: int = 512, max_tokens: int = 16,
        layers: int = 4, log=print, force: bool = False) -> dict:
    t0 = time.perf_counter()
    out = Path(out) if out else default_out()
    backend = resolve("auto")
    dims = SMALL_DIMS if small else DEMO_DIMS
    settings = {"npumoe": __version__, "backend": backend, "dims": dims, "layers": layers, "chunk": prompt_tokens}
    owned.check(out, MARKER, "demo", force)
    model_dir = out / "model"
    if _reusable(out, settings):
        log(f"[demo] 1-2/4 reusing the model and its {backend} bundle in {out} (current)")
    else:
        write_json(out / MARKER, {"tool": "npumoe demo", "files": _files(backend)})  # what it writes here
        log(f"[demo] 1/4 model: qwen3_moe, {layers} layers, {dims['experts']} experts (top-{dims['top_k']}), "
            f"D={dims['hidden']}, H={dims['moe_inter']}, skewed routers -> {model_dir}")
        log("       random weights: its text is gibberish; the demo shows where the work runs and whether "
            "offload matches stock MLX token for token")
        # The demo's folder check passed, so anything else in model/ is the demo's own bundle: keep it
        # (rebuilt next) rather than refuse; with --force, the user's files there are kept too.
        make_tiny_model(model_dir, "qwen3_moe", skew=1.5, seed=0, num_layers=layers, dims=dims, force=True)
        log(f"[demo] 2/4 bundle ({backend}): calibrate -> measure costs -> plan -> compile")
        build_bundle(str(model_dir), backend, tokens=1024, chunk_size=prompt_tokens, tune=True, progress=True,
                     log=lambda m: m.startswith(("[", "bundle written")) and log("       " + m.splitlines()[0]))
        write_json(out / MARKER, {"tool": "npumoe demo", "files": _files(backend), "settings": settings})

    log("[demo] 3/4 generate with the experts offloaded")
    model, tok = load(str(model_dir), offload=backend, quiet=True)
    ids = prompt_of_tokens(tok, prompt_tokens, seed=1)
    text = "".join(r.text for r in stream_generate(model, tok, ids, max_tokens=max_tokens))
    st = summarize(offload_stats(model))
    log(f"       {len(ids)} prompt tokens -> {text!r}; {st['offloaded_calls']} of {st['layer_calls']} MoE layer "
        f"calls ran their experts on programs")
    del model

    log("[demo] 4/4 compare offload vs stock MLX")
    report = out / "compare"
    result = compare(str(model_dir), prompt_tokens=(prompt_tokens,), max_tokens=max_tokens, backend=backend,
                     out_dir=str(report), log=lambda m: log("       " + m))
    log(f"[demo] done in {time.perf_counter() - t0:.0f} s")
    for line in summary_lines(result, report, (report / "compare.png").is_file()):
        log(line)
    log(f"try:     npumoe chat --model {model_dir}   (or generate --prompt \"...\" --stats)")
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="npumoe demo", description=__doc__.splitlines()[0])
    p.add_argument("--out", help="Folder for the model, bundle and report (default: $NPUMOE_CACHE/demo, "
                   "i.e. ~/.cache/npumoe/demo). A rerun reuses its model and bundle while they are current.")
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
    from ..log import console

    console()  # `[npumoe] ...` lines, as the npumoe command shows them
    sys.exit(main())
