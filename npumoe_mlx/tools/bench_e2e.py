"""`npumoe bench e2e`: end-to-end prefill and decode of a realistic-shape MoE, offload vs stock.

Real expert/attention dims from ``data/model-shapes.json`` (random weights, skewed
router, a few layers) so the numbers reflect real matmul sizes without real
weights: make the model -> build its bundle (calibrated at the prefill step) ->
measure both sides exactly as ``npumoe compare`` does (``compare.measure_side``)
-> one row per prompt length, JSON and a plot.

``--shape`` also takes a family name (``qwen3_moe``, ...) for the tiny default
dims, which is what the tests use. ``npumoe bench layer`` is a separate module;
``main`` here is what ``npumoe bench e2e`` calls.
"""

import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import numpy as np
from mlx_lm.utils import load_tokenizer

from ..atomic import write_json
from ..backends import registry
from ..build.build import build as build_bundle
from ..build.workloads import prompt_of_tokens
from ..bundle import bundle as bundles
from ..bundle.bundle import default_bundle_dir
from ..build.args import add_dense_flag
from ..cli.replay import load_shape_presets
from ..runtime.dense import check_mode
from ..runtime.executor import LayerStats, summarize
from ..runtime.offload import resolve
from .compare import measure_side, token_agreement
from .report import PLOT_MISSING, ArgError, Parser, loadavg_at_end, machine_info, mlx_device_label, pyplot, save_figure, token_list
from .tiny import FAMILIES, MARKER, make_tiny_model

SKEW = 1.5  # a few hot experts, like trained routers


def resolve_shape(shape: str):
    """(family, preset or None): a preset name from model-shapes.json, or a factory family name."""
    presets = load_shape_presets()
    if shape in presets:
        return presets[shape]["mlx_family"], shape
    if shape in FAMILIES:
        return shape, None
    raise ValueError(f"unknown --shape {shape!r}: not a preset ({', '.join(presets)}) nor a family ({', '.join(FAMILIES)})")


def _model_args(family, preset, layers, q_bits, experts, seed) -> dict:
    return {"family": family, "shape": preset, "num_layers": layers, "q_bits": q_bits,
            "num_experts": experts, "seed": seed, "skew": SKEW}


def _reusable(model_dir: Path, args: dict, backend: str) -> bool:
    """A model (and bundle) from an earlier run with the same arguments can be reused."""
    try:
        info = json.loads((model_dir / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return info.get("bench_args") == args and (default_bundle_dir(model_dir, backend) / "manifest.json").is_file()


def prepare(
    shape: str, *, layers: int = 2, q_bits: Optional[int] = 4, experts: Optional[int] = None, seed: int = 0,
    backend: str = "onnx", calib_tokens: int = 256, prefill_step: int = 512, tune: bool = True, cost=None,
    workdir: Path, log: Callable[[str], None] = print,
) -> Path:
    """Make (or reuse) the benchmark model in ``workdir/model`` and build its bundle."""
    family, preset = resolve_shape(shape)
    args = _model_args(family, preset, layers, q_bits, experts, seed)
    model_dir = Path(workdir) / "model"
    if _reusable(model_dir, args, backend):
        log(f"[bench e2e] reusing model and bundle in {model_dir}")
        return model_dir
    log(f"[bench e2e] making {family} model ({preset or 'tiny dims'}, {layers} layers, "
        f"{'q' + str(q_bits) if q_bits else 'float32'}, skew {SKEW})")
    make_tiny_model(model_dir, family, q_bits=q_bits, shape=preset, skew=SKEW, seed=seed,
                    num_layers=layers, num_experts=experts)
    log(f"[bench e2e] building the {backend} bundle ({calib_tokens} calibration tokens, chunks of {prefill_step})")
    build_bundle(str(model_dir), backend, corpus=("long-context", "qa", "code"), tokens=calib_tokens,
                  chunk_size=prefill_step, cost=cost, tune=tune, log=log)
    marker = model_dir / MARKER
    info = json.loads(marker.read_text())
    info["bench_args"] = args
    marker.write_text(json.dumps(info, indent=2))
    return model_dir


def bench_model(
    model_dir, label: str, prompt_tokens: Sequence[int], *, backend: str = "onnx", max_tokens: int = 16,
    prefill_step: int = 512, seed: int = 0, repeats: int = 1, log: Callable[[str], None] = print,
    keep_mlx_experts: bool = False, dense_programs: bool = False,
) -> dict:
    """Measure offload vs stock on prompts of ``prompt_tokens`` tokens; rows + context."""
    model_dir = Path(model_dir)
    b = bundles.read(bundles.default_bundle_dir(model_dir, backend))
    lp0 = b.plan.layers[0]
    tok = load_tokenizer(model_dir)
    prompts = [(f"{n} tokens", prompt_of_tokens(tok, n, seed)) for n in prompt_tokens]
    gflop = lambda n: n * lp0.top_k * 6 * lp0.D * lp0.H * len(b.plan.layers) / 1e9
    log(f"[bench e2e] D={lp0.D} H={lp0.H} E={lp0.num_experts} k={lp0.top_k}, {len(b.plan.layers)} MoE layers: "
        + ", ".join(f"{n} tokens = {gflop(n):.1f} GFLOP of expert work" for n in prompt_tokens))
    machine = machine_info()
    sides = {}
    for side, mode in (("stock", "off"), ("offload", backend)):
        log(f"[bench e2e] measuring {side}")
        sides[side] = measure_side(str(model_dir), mode, prompts, max_tokens=max_tokens, prefill_step=prefill_step,
                                   bundle=str(b.path) if mode != "off" else None, logit_prompt=None, repeats=repeats, log=log,
                                   keep_mlx_experts=keep_mlx_experts, dense_programs=dense_programs)
    rows = []
    for n, ro, rs in zip(prompt_tokens, sides["offload"]["runs"], sides["stock"]["runs"]):
        s = ro.get("offload_stats") or summarize([LayerStats(-1)])
        rows.append({
            "shape": label,
            "prompt_tokens": n,
            "offload_prefill_tps": ro["prefill_tps"],
            "stock_prefill_tps": rs["prefill_tps"],
            "prefill_speedup": ro["prefill_tps"] / rs["prefill_tps"],
            "offload_decode_tps": ro["decode_tps"],
            "stock_decode_tps": rs["decode_tps"],
            "decode_speedup": ro["decode_tps"] / rs["decode_tps"],
            "offload_ttft_s": ro["ttft_s"],
            "stock_ttft_s": rs["ttft_s"],
            "offload_cpu_s_per_token": ro["cpu_s_per_token"],
            "stock_cpu_s_per_token": rs["cpu_s_per_token"],
            "offload_energy_j": ro["energy_j"],
            "stock_energy_j": rs["energy_j"],
            "token_agreement": token_agreement(ro["tokens"], rs["tokens"])[0],
            "offload_peak_mem_gb": ro.get("peak_mem_gb"),
            "stock_peak_mem_gb": rs.get("peak_mem_gb"),
            "padding_pct": s["padding_pct"],
            "spill_pct": s["spill_pct"],
            "program_calls": s["program_calls"],
            "offloaded_calls": s["offloaded_calls"],
            "layer_calls": s["layer_calls"],
        })
    return {
        "shape": label,
        "dims": {"D": lp0.D, "H": lp0.H, "experts": lp0.num_experts, "top_k": lp0.top_k,
                 "moe_layers": len(b.plan.layers)},
        "backend": backend,
        "bundle": str(b.path),
        "cost": b.cost.to_dict(),
        "devices": {"offload": sides["offload"]["device"], "stock": sides["stock"]["device"],
                    "offload_non_expert": mlx_device_label()},
        "machine": {**machine, **loadavg_at_end()},
        "max_tokens": max_tokens,
        "prefill_step": prefill_step,
        "repeats": repeats,
        "energy_note": sides["offload"]["energy_note"],
        "rows": rows,
        "keep_mlx_experts": keep_mlx_experts,
        "dense_programs": dense_programs,
        "dense": sides["offload"].get("dense"),
        "resident": {"offload": sides["offload"]["resident"], "stock": sides["stock"]["resident"]},
        "notes": "random weights at real dims (router skew 1.5); each side warmed up first, then one greedy "
                 "generation per prompt length, measured as in `npumoe compare`; speedup = offload / stock",
    }


def bench(
    shape: str, prompt_tokens: Sequence[int] = (128, 512), *, layers: int = 2, q_bits: Optional[int] = 4,
    max_tokens: int = 16, experts: Optional[int] = None, calib_tokens: int = 256, prefill_step: int = 512,
    backend: str = "auto", tune: bool = True, cost=None, seed: int = 0, repeats: int = 1, workdir=None,
    log: Callable[[str], None] = print, keep_mlx_experts: bool = False, dense_programs: bool = False,
) -> dict:
    """make model -> build bundle -> measure; ``workdir`` keeps (and later reuses) the model and bundle."""
    want = resolve(backend)
    if want not in registry.names(bundles=True):
        raise ValueError(f"--backend must be auto or one of {', '.join(registry.names(bundles=True))}, got {backend!r}")
    if dense_programs:
        check_mode(want)
    if max_tokens < 2 or repeats < 1:
        raise ValueError("--max-tokens must be >= 2 and --repeats >= 1")
    tmp = None if workdir else Path(tempfile.mkdtemp(prefix="npumoe-bench-e2e-"))
    try:
        model_dir = prepare(shape, layers=layers, q_bits=q_bits, experts=experts, seed=seed, backend=want,
                            calib_tokens=calib_tokens, prefill_step=prefill_step, tune=tune, cost=cost,
                            workdir=Path(workdir or tmp), log=log)
        result = bench_model(model_dir, shape, prompt_tokens, backend=want, max_tokens=max_tokens,
                             prefill_step=prefill_step, seed=seed, repeats=repeats, log=log,
                             keep_mlx_experts=keep_mlx_experts, dense_programs=dense_programs)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    result["model"] = {"layers": layers, "q_bits": q_bits, "experts_override": experts, "seed": seed,
                       "skew": SKEW, "calib_tokens": calib_tokens, "tuned": cost is None and tune}
    return result


def format_rows(rows: List[dict]) -> str:
    head = ("| shape | prompt | prefill tok/s offload | stock | speedup | decode tok/s offload | stock | "
            "agreement | padding % | program calls |")
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['prompt_tokens']} | {r['offload_prefill_tps']:.1f} | {r['stock_prefill_tps']:.1f} | "
            f"{r['prefill_speedup']:.2f}x | {r['offload_decode_tps']:.1f} | {r['stock_decode_tps']:.1f} | "
            f"{r['token_agreement']:.2f} | {r['padding_pct']:.1f} | {r['program_calls']} |"
        )
    return "\n".join(lines)


def plot(result: dict, path: Path) -> bool:
    """Prefill and decode tok/s per prompt length, offload vs stock, speedup on top (False: no matplotlib)."""
    plt = pyplot()
    if plt is None:
        return False

    rows, d = result["rows"], result["devices"]
    x = np.arange(len(rows))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, k, title in ((axes[0], "prefill", "prefill tok/s"), (axes[1], "decode", "decode tok/s")):
        off = [r[f"offload_{k}_tps"] for r in rows]
        st = [r[f"stock_{k}_tps"] for r in rows]
        ax.bar(x - 0.2, off, 0.4, label=f"offload: {d['offload']}", color="tab:orange")
        ax.bar(x + 0.2, st, 0.4, label=f"stock: {d['stock']}", color="tab:blue")
        for i, (a, b) in enumerate(zip(off, st)):
            ax.annotate(f"{a / b:.2f}x", (i, max(a, b)), ha="center", va="bottom", fontsize=8)
        ax.set_xticks(x)
        ax.set_xticklabels([f"{r['prompt_tokens']} tok" for r in rows])
        ax.set_title(title)
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=2, fontsize=9)
    dims = result["dims"]
    fig.suptitle(f"npumoe bench e2e: {result['shape']} (D={dims['D']}, H={dims['H']}, E={dims['experts']}, "
                 f"k={dims['top_k']}, {dims['moe_layers']} MoE layers)")
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    save_figure(fig, path)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    """``npumoe bench e2e ...`` (a leading ``e2e`` in argv is accepted and skipped)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["e2e"]:
        argv = argv[1:]
    p = Parser(prog="npumoe bench e2e",
                description="End-to-end prefill/decode of a realistic-shape MoE (random weights): offload vs stock.")
    p.add_argument("--shape", required=True,
                   help="A preset of data/model-shapes.json (e.g. qwen3-30b-a3b) or a family name for tiny dims.")
    p.add_argument("--prompt-tokens", type=token_list, default=(128, 512), metavar="N[,N...]",
                   help="Prompt lengths (default 128,512).")
    p.add_argument("--layers", type=int, default=2, help="Transformer layers (default 2).")
    p.add_argument("--q-bits", type=int, choices=(0, 4, 8), default=4, help="4 or 8 (MLX affine), 0 = float32 (default 4).")
    p.add_argument("--experts", type=int, help="Override the expert count (smaller checkpoints).")
    p.add_argument("--max-tokens", type=int, default=16, help="Tokens generated per prompt (default 16).")
    p.add_argument("--prefill-step", type=int, default=512, help="Prefill chunk, also the calibration chunk (default 512).")
    p.add_argument("--calib-tokens", type=int, default=256, help="Calibration tokens of the build (default 256).")
    p.add_argument("--backend", choices=("auto", *registry.names(bundles=True)), default="auto")
    p.add_argument("--no-tune", action="store_true", help="Parametric costs instead of measuring this machine.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1, help="Runs per prompt length; the median-wall run is kept.")
    p.add_argument("--keep-mlx-experts", action="store_true",
                   help="Keep MLX's copy of the experts only programs serve (default: released, read back if needed).")
    add_dense_flag(p)
    p.add_argument("--workdir", help="Keep the model and bundle here (reused by a later run with the same options).")
    p.add_argument("--json", help="Output JSON (default ./bench-e2e-<shape>.json).")
    p.add_argument("--plot", help="Output PNG (default ./bench-e2e-<shape>.png).")
    try:
        args = p.parse_args(argv)
        if args.layers < 1 or args.prefill_step < 1 or args.calib_tokens < 1:
            raise ArgError("--layers, --prefill-step and --calib-tokens must be >= 1")
        from ..outputs import OutputError, check_file

        try:  # before the benchmark, not after it
            check_file(args.json or f"bench-e2e-{args.shape}.json", "--json")
            if args.plot:
                check_file(args.plot, "--plot")
        except OutputError as e:
            raise ArgError(str(e)) from None
    except ArgError as e:
        print(f"npumoe bench e2e: error: {e}", file=sys.stderr)
        return 2
    log = lambda m: print(m, file=sys.stderr)
    try:
        result = bench(args.shape, args.prompt_tokens, layers=args.layers, q_bits=args.q_bits or None,
                       max_tokens=args.max_tokens, experts=args.experts, calib_tokens=args.calib_tokens,
                       prefill_step=args.prefill_step, backend=args.backend, tune=not args.no_tune,
                       seed=args.seed, repeats=args.repeats, workdir=args.workdir, log=log,
                       keep_mlx_experts=args.keep_mlx_experts, dense_programs=args.dense_programs)
    except ValueError as e:
        print(f"npumoe bench e2e: error: {e}", file=sys.stderr)
        return 2
    json_path = Path(args.json or f"bench-e2e-{args.shape}.json")
    plot_path = Path(args.plot or json_path.with_suffix(".png"))
    write_json(json_path, result)
    plotted = plot(result, plot_path)
    print(format_rows(result["rows"]))
    print(f"wrote {json_path}" + (f" and {plot_path}" if plotted else f"; {PLOT_MISSING}"))
    return 0


if __name__ == "__main__":
    from ..log import console

    console()  # `[npumoe] ...` lines, as the npumoe command shows them
    sys.exit(main())
