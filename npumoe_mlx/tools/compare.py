"""`npumoe compare`: the offload path against stock MLX on the same prompts.

Both sides are measured the same way, one after the other in this process: load
(``offload=<backend>`` or ``offload="off"``), a short warm-up (a 2-token generation
of the first prompt's head, plus one call of every program tier) so one-time costs
(onnxruntime / Core ML first runs, MLX kernel setup) are not counted, then per
prompt one greedy ``stream_generate`` wrapped in wall, CPU, memory and energy
meters (``meters.py``). Then the generated tokens are compared position by position
and both models' logits over one prompt (same chunks as prefill).

Writes ``compare.json``, ``compare.md`` and ``compare.png`` into ``--out``.
"""

import gc
import json
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np
from mlx_lm import stream_generate
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.sample_utils import make_sampler
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.utils import load_tokenizer

from ..atomic import write_json
from ..backends import registry
from ..build.build import build as build_bundle
from ..build.workloads import prompt_of_tokens
from ..bundle import bundle as bundles
from ..bundle.checks import resolve_model
from ..bundle.owned import read_marker
from ..build.args import add_dense_flag
from ..hints import build_cmd, one_line
from ..outputs import check_dir
from ..planning.plan import NEVER
from ..planning.residency import describe_units, model_resident
from ..runtime import dense, heap
from ..runtime.executor import LayerStats, OffloadExecutor, offload_stats, summarize
from ..runtime.experts import installed_blocks
from ..runtime.loading import load
from ..runtime.offload import resolve
from .meters import Meters
from .report import (
    PLOT_MISSING, ArgError, Parser, loadavg_at_end, machine_info, mlx_device_label, pyplot, save_figure, token_list,
    write_text,
)

DEFAULT_PROMPT_TOKENS = (1024, 4096)
PREFILL_STEP = 2048  # mlx_lm's default prefill_step_size
WARMUP_TOKENS = 256  # prefix of the first prompt generated (2 tokens) before measuring
LOGIT_BYTES = 1 << 28  # logits kept per side for the logit check (positions x vocab x 4)
METRICS = ("ttft_s", "prefill_tps", "decode_tps", "cpu_s_per_token", "peak_mem_gb", "energy_j")


class CompareError(ValueError):
    """Cannot compare as asked; the message says what to do."""


# --- labels ---------------------------------------------------------------------


def offload_device_label(backend: str, model=None) -> str:
    """The device the expert programs really ran on (from the loaded sessions when there are any)."""
    providers = []
    for ex in _executors(model) if model is not None else []:
        for prog in ex.programs:
            for sess in getattr(prog, "sessions", {}).values():  # onnx programs: the provider each session runs on
                providers.append(sess.get_providers()[0])
    if providers:
        return f"ONNX Runtime {providers[0].replace('ExecutionProvider', '')}"
    info = registry.REGISTRY.get(backend)
    return info.label if info is not None and info.label else mlx_device_label()


# --- one side -------------------------------------------------------------------


def _executors(model) -> List:
    return [m.executor for m in installed_blocks(model) if isinstance(m.executor, OffloadExecutor)]


def _reset_stats(model) -> None:
    for ex in _executors(model):
        ex.stats = LayerStats(ex.plan.layer)


def warm_up(model, tokenizer, ids: Sequence[int], prefill_step: int) -> float:
    """A 2-token generation of ``ids`` and one run of every program tier; returns seconds."""
    t0 = time.perf_counter()
    for ex in _executors(model):
        for prog, g in zip(ex.programs, ex.plan.groups):
            for tier in g.tiers:
                prog.run(np.zeros((len(g.experts), tier, ex.plan.D), np.float32), tier)
    for _ in stream_generate(model, tokenizer, list(ids), max_tokens=2, sampler=make_sampler(0.0),
                             prefill_step_size=prefill_step):
        pass
    _reset_stats(model)
    return time.perf_counter() - t0


def measure_run(model, tokenizer, ids: Sequence[int], max_tokens: int, prefill_step: int, meters) -> dict:
    """One greedy generation of ``ids`` under ``meters``: the metrics of one prompt on one side."""
    _reset_stats(model)
    tokens, ttft, last = [], None, None
    gc.collect()
    meters.start()
    t0 = time.perf_counter()
    for r in stream_generate(model, tokenizer, list(ids), max_tokens=max_tokens, sampler=make_sampler(0.0),
                             prefill_step_size=prefill_step):
        if ttft is None:
            ttft = time.perf_counter() - t0
        tokens.append(int(r.token))
        last = r
    reading = meters.stop()
    n = len(ids) + len(tokens)
    out = {
        "prompt_tokens": len(ids),
        "generated_tokens": len(tokens),
        "ttft_s": ttft,
        "prefill_tps": last.prompt_tps,
        "decode_tps": last.generation_tps,
        "wall_s": reading.wall_s,
        "cpu_s": reading.cpu_s,
        "cpu_s_per_token": reading.cpu_s / n,
        "peak_mem_gb": reading.peak_rss_bytes / 1e9,
        "mlx_peak_mem_gb": reading.mlx_peak_bytes / 1e9,
        "energy_j": reading.energy_j,
        "energy_j_per_token": None if reading.energy_j is None else reading.energy_j / n,
        "tokens": tokens,
    }
    stats = offload_stats(model)
    if stats:
        out["offload_stats"] = summarize(stats)
        out["layer_stats"] = [s.to_dict() for s in stats]
    return out


def prompt_logits(model, ids: Sequence[int], prefill_step: int, keep: int) -> np.ndarray:
    """Logits (positions, vocab) of the last ``keep`` prompt positions, run in prefill chunks."""
    cache = make_prompt_cache(model)
    x = mx.array(list(ids))[None]  # (1, T)
    T, rows = x.shape[1], []
    for i in range(0, T, prefill_step):
        logits = model(x[:, i : i + prefill_step], cache=cache)  # (1, t, V)
        lo = max(T - keep - i, 0)
        if lo < logits.shape[1]:
            rows.append(np.array(logits[0, lo:].astype(mx.float32)))
        else:
            mx.eval([c.state for c in cache])
    return np.concatenate(rows, axis=0)


def measure_side(
    model_path: str,
    offload: str,
    prompts: Sequence[Tuple[str, List[int]]],
    *,
    max_tokens: int,
    prefill_step: int = PREFILL_STEP,
    bundle: Optional[str] = None,
    logit_prompt: Optional[int] = 0,
    repeats: int = 1,
    log: Callable[[str], None] = print,
    verify: bool = False,
    keep_mlx_experts: bool = False,
    dense_programs: bool = False,
) -> dict:
    """Load one side (``offload="off"`` is stock mlx_lm), warm up, measure every prompt.

    Returns {"offload", "device", "warmup_s", "runs": [measure_run dicts], "logits",
    "energy_note", "mem_note", "resident"}; the model is released before returning.
    ``resident``: bytes per unit after the load (residency.model_resident; the
    programs' share from the plan).
    """
    side = "stock" if offload == "off" else "offload"
    gc.collect()
    heap.trim()  # this side's peak RSS must not count free heap left by earlier work (a build, the other side)
    t0 = time.perf_counter()
    model, tokenizer = load(model_path, offload=offload, bundle=bundle, quiet=True, verify=verify,
                            keep_mlx_experts=keep_mlx_experts, dense_programs=dense_programs and offload != "off")
    resident = model_resident(model)
    resident["programs"] = sum(u["on_programs"] for u in resident["units"].values())
    log(f"[{side}] loaded in {time.perf_counter() - t0:.1f} s ({describe_units(resident)}); warming up")
    warm = warm_up(model, tokenizer, prompts[0][1][:WARMUP_TOKENS], prefill_step)
    device = mlx_device_label() if offload == "off" else offload_device_label(offload, model)
    meters = Meters()
    runs = []
    for name, ids in prompts:
        tries = [measure_run(model, tokenizer, ids, max_tokens, prefill_step, meters) for _ in range(repeats)]
        r = sorted(tries, key=lambda t: t["wall_s"])[(len(tries) - 1) // 2]  # the median run, whole
        r["repeats_wall_s"] = [t["wall_s"] for t in tries]
        runs.append(r)
        log(f"[{side}] {name}: ttft {r['ttft_s']:.2f} s, prefill {r['prefill_tps']:.1f} tok/s, "
            f"decode {r['decode_tps']:.1f} tok/s")
    logits = None
    if logit_prompt is not None:
        ids = prompts[logit_prompt][1]
        vocab = model.args.vocab_size if hasattr(model, "args") and hasattr(model.args, "vocab_size") else None
        keep = len(ids) if not vocab else max(1, min(len(ids), LOGIT_BYTES // (4 * vocab)))
        logits = prompt_logits(model, ids, prefill_step, keep)
    out = {
        "offload": offload, "device": device, "warmup_s": warm, "runs": runs, "logits": logits,
        "energy_meter": meters.energy.name, "energy_note": meters.energy.note, "mem_note": meters.memory.note,
        "resident": resident,
        "dense": dense.summary(model) if dense_programs and offload != "off" else None,
    }
    del model
    gc.collect()
    mx.clear_cache()
    heap.trim()  # (and hand this side's free heap back now)
    return out


# --- comparing ------------------------------------------------------------------


def token_agreement(a: Sequence[int], b: Sequence[int]) -> Tuple[float, Optional[int]]:
    """Fraction of positions (over the longer output) with equal tokens, and the first differing position."""
    n = max(len(a), len(b))
    if n == 0:
        return 1.0, None
    same = [x == y for x, y in zip(a, b)]
    first = next((i for i, s in enumerate(same) if not s), None)
    if first is None and len(a) != len(b):
        first = min(len(a), len(b))
    return sum(same) / n, first


def max_logit_diff_rel(a: np.ndarray, b: np.ndarray) -> float:
    """max|a - b| / max|b| (b is the stock side)."""
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def aggregate(runs: List[dict]) -> dict:
    """Side summary: means over prompts; peak memory is the max, energy the sum (None if any is)."""
    mean = lambda k: float(np.mean([r[k] for r in runs]))
    energy = [r["energy_j"] for r in runs]
    tokens = sum(r["prompt_tokens"] + r["generated_tokens"] for r in runs)
    total = None if any(e is None for e in energy) else float(sum(energy))
    return {
        "ttft_s": mean("ttft_s"),
        "prefill_tps": mean("prefill_tps"),
        "decode_tps": mean("decode_tps"),
        "cpu_s_per_token": mean("cpu_s_per_token"),
        "peak_mem_gb": max(r["peak_mem_gb"] for r in runs),
        "mlx_peak_mem_gb": max(r["mlx_peak_mem_gb"] for r in runs),
        "energy_j": total,
        "energy_j_per_token": None if total is None else total / tokens,
    }


def placement(bundle_dir: Path, runs: List[dict]) -> List[dict]:
    """Per MoE layer: the plan (groups, cold experts, min_tokens) and what ran (summed over prompts)."""
    plan = bundles.read(bundle_dir).plan
    totals: Dict[int, LayerStats] = {}
    for r in runs:
        for d in r.get("layer_stats", []):
            t = totals.setdefault(d["layer"], LayerStats(d["layer"]))
            for k, v in d.items():
                if k not in ("layer", "fallback"):
                    setattr(t, k, getattr(t, k) + v)
                elif k == "fallback" and v:
                    t.fallback = v
    out = []
    for lp in plan.layers:
        s = summarize([totals.get(lp.layer, LayerStats(lp.layer))])
        out.append({
            "layer": lp.layer,
            "num_experts": lp.num_experts,
            "groups": [{"experts": g.experts, "tiers": g.tiers} for g in lp.groups],
            "experts_on_programs": sum(len(g.experts) for g in lp.groups),
            "cold": list(lp.cold),
            "min_tokens": None if lp.min_tokens >= NEVER else lp.min_tokens,
            "layer_calls": s["layer_calls"],
            "offloaded_calls": s["offloaded_calls"],
            "program_calls": s["program_calls"],
            "padding_pct": s["padding_pct"],
            "spill_pct": s["spill_pct"],
            "fallback": totals[lp.layer].fallback if lp.layer in totals else "",
        })
    return out


def _prompts(model_path: str, prompt_tokens, prompts, seed: int) -> List[Tuple[str, List[int]]]:
    tok = load_tokenizer(Path(model_path))
    if prompts:
        out = []
        for text in prompts:
            w = tok if isinstance(tok, TokenizerWrapper) else TokenizerWrapper(tok)
            special = w.bos_token is None or not text.startswith(w.bos_token)  # as stream_generate does
            ids = list(w.encode(text, add_special_tokens=special))
            if not ids:
                raise CompareError("an empty --prompt has no tokens to compare")
            short = text if len(text) <= 32 else text[:29] + "..."
            out.append((f"{short!r} ({len(ids)} tokens)", ids))
        return out
    return [(f"{n} tokens", prompt_of_tokens(tok, n, seed)) for n in prompt_tokens]


def ensure_bundle(model_path: str, local: Path, backend: str, bundle: Optional[str], build: bool,
                  prefill_step: int, log) -> Path:
    """The bundle folder to use; built when missing and ``build``, else a one-line error."""
    path = bundles.locate_bundle(local, backend, bundle)  # the one generate/load use
    if (path / "manifest.json").exists():
        return path
    if not build:
        raise CompareError(
            f"no {backend} bundle for {model_path} at {path}; build it with "
            f"`{build_cmd(model_path, backend)}` (or pass --build)"
        )
    path = bundles.build_target(local, backend, bundle)
    log(f"no {backend} bundle at {path}: building it ({build_cmd(model_path, backend)})")
    build_bundle(str(local), backend, str(path), chunk_size=min(prefill_step, 512), log=log)  # takes the lock
    return path


def compare(
    model_path: str,
    *,
    prompt_tokens: Sequence[int] = DEFAULT_PROMPT_TOKENS,
    prompts: Optional[Sequence[str]] = None,
    max_tokens: int = 32,
    backend: str = "auto",
    out_dir="npumoe-compare",
    build: bool = False,
    bundle: Optional[str] = None,
    prefill_step: int = PREFILL_STEP,
    seed: int = 0,
    check_logits: bool = True,
    repeats: int = 1,
    log: Callable[[str], None] = print,
    verify: bool = False,
    keep_mlx_experts: bool = False,
    dense_programs: bool = False,
) -> dict:
    """Measure the offload path and stock MLX on the same prompts; write compare.{json,md,png}.

    Returns the compare.json dict. ``prompts`` (texts) replaces ``prompt_tokens``
    (synthetic long-context prompts of exactly that many tokens).
    """
    if backend not in ("auto", *registry.names(bundles=True)):
        raise CompareError(f"--backend must be auto or one of {', '.join(registry.names(bundles=True))}, got {backend!r}")
    if max_tokens < 2:
        raise CompareError("--max-tokens must be >= 2 (decode speed needs at least two generated tokens)")
    if prefill_step < 1 or repeats < 1:
        raise CompareError("--prefill-step and --repeats must be >= 1")
    check_out(out_dir)
    want = resolve(backend, check_runs=True)
    if dense_programs:
        dense.check_mode(want)
    local = resolve_model(model_path)
    bundle_dir = ensure_bundle(model_path, local, want, bundle, build, prefill_step, log)
    ids = _prompts(str(local), prompt_tokens, prompts, seed)
    logit_prompt = 0 if check_logits else None

    machine = machine_info()
    sides = {}
    for side, mode in (("stock", "off"), ("offload", want)):
        sides[side] = measure_side(str(local), mode, ids, max_tokens=max_tokens, prefill_step=prefill_step,
                                   bundle=str(bundle_dir) if mode != "off" else None,
                                   logit_prompt=logit_prompt, repeats=repeats, log=log,
                                   verify=verify and mode != "off", keep_mlx_experts=keep_mlx_experts,
                                   dense_programs=dense_programs)
    off, stock = sides["offload"], sides["stock"]
    machine.update(loadavg_at_end())

    per_prompt = []
    agreements = []
    for (name, p), ro, rs in zip(ids, off["runs"], stock["runs"]):
        agree, first = token_agreement(ro["tokens"], rs["tokens"])
        agreements.append(agree)
        pick = lambda r: {k: v for k, v in r.items() if k not in ("layer_stats",)}
        per_prompt.append({
            "name": name, "prompt_tokens": len(p), "token_agreement": agree, "first_divergence": first,
            "offload": pick(ro), "stock": pick(rs),
        })
    logit_diff = None
    if check_logits:
        logit_diff = max_logit_diff_rel(off["logits"], stock["logits"])
    devices = {"offload": off["device"], "stock": stock["device"], "offload_non_expert": mlx_device_label()}
    result = {
        "model": model_path,
        "backend": want,
        "bundle": str(bundle_dir),
        "devices": devices,
        "machine": machine,
        "max_tokens": max_tokens,
        "prefill_step": prefill_step,
        "repeats": repeats,
        "prompts": per_prompt,
        "offload": {**aggregate(off["runs"]), "energy_note": off["energy_note"], "warmup_s": off["warmup_s"]},
        "stock": {**aggregate(stock["runs"]), "energy_note": stock["energy_note"], "warmup_s": stock["warmup_s"]},
        "energy_note": off["energy_note"],
        "token_agreement": float(np.mean(agreements)),
        "max_logit_diff_rel": logit_diff,
        "logit_check": None if not check_logits else {
            "prompt": ids[0][0], "positions": int(stock["logits"].shape[0]), "vocab": int(stock["logits"].shape[1]),
        },
        "placement": placement(bundle_dir, off["runs"]),
        "keep_mlx_experts": keep_mlx_experts,
        "dense_programs": dense_programs,
        "resident": {"offload": off["resident"], "stock": stock["resident"]},
        "notes": {
            "method": "each side: load, warm-up (2-token generation of the first prompt's first "
            f"{WARMUP_TOKENS} tokens + one run of every program tier; not counted), then one greedy "
            "stream_generate per prompt; stock first, then offload, in one process",
            "aggregate": "side values are means over prompts; peak_mem_gb is the max, energy_j the sum",
            "ttft_s": "wall time from calling stream_generate to the first token (prefill + first sample)",
            "prefill_tps": "mlx_lm GenerationResponse.prompt_tps",
            "decode_tps": "mlx_lm GenerationResponse.generation_tps (last response)",
            "cpu_s_per_token": "time.process_time() of the whole run (all threads) / (prompt + generated tokens)",
            "memory": off["mem_note"],
            "energy": off["energy_note"] if off["energy_meter"] != "none"
            else f"unavailable, energy_j is null: {off['energy_note']}",
            "token_agreement": "greedy (temp 0); equal positions / generated positions of the longer side",
            "max_logit_diff_rel": "max|offload - stock| / max|stock| over the logit_check positions",
            "resident": "bytes after load per unit: mlx = model parameters MLX holds (released program-only "
            "experts excluded), programs = the offloaded experts' quantized bytes (the programs' weights); per layer in units",
        },
    }
    result["why_slower"] = why_slower(result)
    if result["why_slower"]:
        log(result["why_slower"])
    write_outputs(result, Path(out_dir), log)
    return result


def why_slower(r: dict) -> Optional[str]:
    """One line on why the offload side was slower, when it was (None when it was not)."""
    o, s = r["offload"], r["stock"]
    ratio = {n: o[k] / s[k] for n, k in (("prefill", "prefill_tps"), ("decode", "decode_tps")) if o[k] and s[k]}
    slow = [n for n, x in ratio.items() if x < 0.95]
    if not slow:
        return None
    st = [p["offload"].get("offload_stats") or {} for p in r["prompts"]]
    calls, progs = sum(x.get("offloaded_calls", 0) for x in st), sum(x.get("program_calls", 0) for x in st)
    load = r["machine"].get("loadavg_at_start", [None])[0]
    head = f"{' and '.join(slow)} slower than stock" + (f" ({ratio[slow[0]]:.2f}x)" if len(slow) == 1 else "")
    if not progs:
        return (f"{head}: no MoE layer call ran programs (calls below the plan's min_tokens stay on MLX), so the "
                f"difference is the offload's bookkeeping and run-to-run noise (load {load})")
    per = 1e3 * sum(x.get("program_s", 0.0) for x in st) / progs
    return (f"{head}: {calls} offloaded layer calls made {progs} program calls of {per:.2f} ms each; where experts "
            f"are small, a program call's fixed cost (host sync, call overhead, copies) exceeds the expert work it moves "
            f"off MLX (README: when not to use it); machine load at start {load}")


# --- output ---------------------------------------------------------------------


def _fmt(v, digits=3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def _ratio(a, b) -> str:
    if a is None or b is None or not b:
        return ""
    return f"{a / b:.2f}x"


_ROWS = (
    ("TTFT (s)", "ttft_s"),
    ("prefill tok/s", "prefill_tps"),
    ("decode tok/s", "decode_tps"),
    ("CPU s / token", "cpu_s_per_token"),
    ("peak RSS (GB)", "peak_mem_gb"),
    ("MLX peak (GB)", "mlx_peak_mem_gb"),
    ("energy (J)", "energy_j"),
)


def _table(off: dict, stock: dict, devices: dict) -> List[str]:
    lines = [f"| metric | offload: {devices['offload']} | stock: {devices['stock']} | offload / stock |",
             "|---|---:|---:|---:|"]
    for label, k in _ROWS:
        lines.append(f"| {label} | {_fmt(off.get(k))} | {_fmt(stock.get(k))} | {_ratio(off.get(k), stock.get(k))} |")
    return lines


def format_markdown(r: dict) -> str:
    d = r["devices"]
    lines = [f"# npumoe compare: {r['model']}", "",
             f"Experts on **{d['offload']}** (attention, router and the rest on {d['offload_non_expert']}) "
             f"vs stock mlx_lm on **{d['stock']}**. Backend `{r['backend']}`, {r['max_tokens']} generated "
             f"tokens, prefill step {r['prefill_step']}. Machine: {r['machine']['cpu']} "
             f"({r['machine']['cpu_count']} CPUs, {r['machine']['system']}).", ""]
    lines += ["## Mean over prompts", ""] + _table(r["offload"], r["stock"], d) + [""]
    if r.get("why_slower"):
        lines += [f"Why slower: {r['why_slower']}", ""]
    diff = r["max_logit_diff_rel"]
    lines.append(f"Greedy token agreement: **{r['token_agreement']:.3f}**; max relative logit difference: "
                 f"**{_fmt(diff)}**" + (f" ({r['logit_check']['positions']} positions of {r['logit_check']['prompt']})"
                                        if r["logit_check"] else ""))
    lines.append("")
    res = r.get("resident")
    if res:
        o, st = res["offload"], res["stock"]
        lines += ["## Resident weights per unit (after load)", "",
                  "| side | MLX | programs | released from MLX |", "|---|---:|---:|---:|",
                  f"| offload | {o['mlx'] / 1e9:.3f} GB | {o['programs'] / 1e9:.3f} GB | {o['released'] / 1e9:.3f} GB |",
                  f"| stock | {st['mlx'] / 1e9:.3f} GB | - | - |", ""]
    for p in r["prompts"]:
        lines += [f"## {p['name']}", ""] + _table(p["offload"], p["stock"], d)
        first = "" if p["first_divergence"] is None else f", first difference at token {p['first_divergence']}"
        lines += ["", f"Token agreement {p['token_agreement']:.3f}{first}.", ""]
    lines += ["## Placement (bundle plan) and what ran", "",
              "| layer | experts on programs | groups (tiers) | cold | min_tokens | offloaded calls | padding % | spill % |",
              "|---:|---:|---|---:|---:|---:|---:|---:|"]
    for lp in r["placement"]:
        groups = "; ".join(f"{len(g['experts'])}x{g['tiers']}" for g in lp["groups"]) or "-"
        lines.append(f"| {lp['layer']} | {lp['experts_on_programs']}/{lp['num_experts']} | {groups} | "
                     f"{len(lp['cold'])} | {_fmt(lp['min_tokens'])} | {lp['offloaded_calls']}/{lp['layer_calls']} | "
                     f"{lp['padding_pct']:.1f} | {lp['spill_pct']:.1f} |")
    lines += ["", "## How it was measured", ""] + [f"- {k}: {v}" for k, v in r["notes"].items()]
    return "\n".join(lines) + "\n"


def plot_panels(r: dict) -> List[tuple]:
    """(title, key, bar labels, {side: values}) per panel: the mean only beside several prompts
    (with one it would repeat that prompt's bars), and peak memory beside the speeds."""
    one = len(r["prompts"]) == 1
    labels = [p["name"] for p in r["prompts"]] + ([] if one else ["mean"])
    panels = [("prefill tok/s", "prefill_tps"), ("decode tok/s", "decode_tps"), ("TTFT (s)", "ttft_s"),
              ("CPU s / token", "cpu_s_per_token"), ("peak memory (GB)", "peak_mem_gb")]
    return [(title, k, labels, {side: [p[side][k] for p in r["prompts"]] + ([] if one else [r[side][k]])
                                for side in ("offload", "stock")}) for title, k in panels]


def plot(r: dict, path: Path) -> bool:
    """Grouped bars, offload vs stock (see ``plot_panels``); False when matplotlib is missing."""
    plt = pyplot()
    if plt is None:
        return False
    panels = plot_panels(r)
    colors = {"offload": "tab:orange", "stock": "tab:blue"}
    fig, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels), 4))
    for ax, (title, _, labels, vals) in zip(axes, panels):
        x = np.arange(len(labels))
        for i, side in enumerate(("offload", "stock")):
            ax.bar(x + (i - 0.5) * 0.4, [v if v is not None else 0 for v in vals[side]], 0.4,
                   label=f"{side}: {r['devices'][side]}", color=colors[side])
        ax.set_title(title)
        ax.set_xticks(x)
        ax.set_xticklabels(labels, rotation=20, ha="right", fontsize=8)
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=2, fontsize=9)
    fig.suptitle(f"npumoe compare: {Path(r['model']).name} (greedy token agreement {r['token_agreement']:.2f})")
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    save_figure(fig, path)
    plt.close(fig)
    return True


OUTPUTS = ("compare.json", "compare.md", "compare.png")
MARKER = "npumoe_compare.json"  # lists the files compare wrote in its --out: the ones it may replace


def _ours(out: Path) -> set:
    info = read_marker(out, MARKER)
    if info is not None and isinstance(info.get("files"), list):
        return set(info["files"])
    try:  # a compare.json from before the marker: its results, and the md/png written with it
        legacy = "token_agreement" in json.loads((out / "compare.json").read_text())
    except (OSError, ValueError, TypeError):
        legacy = False
    return set(OUTPUTS) if legacy else set()


def check_out(out_dir) -> Path:
    """``--out`` is a folder compare may write (not a file, not a system folder, writable) and
    holds no compare.{json,md,png} it did not write; checked before any work."""
    out = check_dir(out_dir, "--out")
    if out.is_dir():
        theirs = [n for n in OUTPUTS if (out / n).exists() and n not in _ours(out)]
        if theirs:
            raise CompareError(f"--out {out_dir} holds {', '.join(theirs)}, which npumoe compare did not write; "
                               f"nothing was run or changed: choose a new or empty --out")
    return out


def write_outputs(r: dict, out_dir: Path, log: Callable[[str], None] = print) -> None:
    check_out(out_dir)  # (again: the folder may have changed during the run)
    write_json(out_dir / MARKER, {"tool": "npumoe compare", "files": list(OUTPUTS)})
    write_json(out_dir / "compare.json", r)
    write_text(out_dir / "compare.md", format_markdown(r))
    if not plot(r, out_dir / "compare.png"):
        log(PLOT_MISSING)


# --- CLI ------------------------------------------------------------------------


def main(argv=None) -> int:
    p = Parser(prog="npumoe compare",
                description="Offload path vs stock MLX on the same prompts: speed, CPU, memory, energy, agreement.")
    p.add_argument("--model", required=True, help="Local folder or Hugging Face repo of an mlx_lm model.")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt-tokens", type=token_list, default=DEFAULT_PROMPT_TOKENS, metavar="N[,N...]",
                     help="Synthetic long-context prompts of exactly these lengths (default 1024,4096).")
    src.add_argument("--prompt", action="append", metavar="TEXT", help="A prompt text (repeatable).")
    p.add_argument("--max-tokens", type=int, default=32, help="Tokens generated per prompt (default 32).")
    p.add_argument("--backend", choices=("auto", *registry.names(bundles=True)), default="auto",
                   help="Offload backend (auto: coreml on Apple Silicon, onnx elsewhere).")
    p.add_argument("--bundle", help="Bundle folder (default: the one generate uses: <model>/npumoe-<backend> if "
                   "there, else the cache's).")
    p.add_argument("--build", action="store_true", help="Build the bundle first if it is missing.")
    p.add_argument("--prefill-step", type=int, default=PREFILL_STEP, help="Prefill chunk (default 2048, as mlx_lm).")
    p.add_argument("--seed", type=int, default=0, help="Seed of the synthetic prompts.")
    p.add_argument("--repeats", type=int, default=1, help="Runs per prompt; the median-wall run is kept (default 1).")
    p.add_argument("--no-logits", action="store_true", help="Skip the logit comparison (one extra prefill per side).")
    p.add_argument("--out", default="npumoe-compare", help="Output folder (default ./npumoe-compare).")
    p.add_argument("--verify", action="store_true",
                   help="Check every program tier against the model's experts and every bundle file's whole "
                   "sha256 at load (default: a sample, and sampled hashes).")
    p.add_argument("--keep-mlx-experts", action="store_true",
                   help="Keep MLX's copy of the experts only programs serve (default: onnx releases it and reads "
                   "it back from the safetensors if MLX needs it).")
    add_dense_flag(p)
    try:
        args = p.parse_args(argv)
    except ArgError as e:
        print(f"npumoe compare: error: {e}", file=sys.stderr)
        return 2
    log = lambda m: print(m, file=sys.stderr)
    try:
        r = compare(args.model, prompt_tokens=args.prompt_tokens, prompts=args.prompt, max_tokens=args.max_tokens,
                    backend=args.backend, out_dir=args.out, build=args.build, bundle=args.bundle,
                    prefill_step=args.prefill_step, seed=args.seed, check_logits=not args.no_logits, repeats=args.repeats, log=log,
                    verify=args.verify, keep_mlx_experts=args.keep_mlx_experts, dense_programs=args.dense_programs)
    except ValueError as e:  # CompareError, a bad or stale bundle, a bad offload mode: one line
        print(f"npumoe compare: error: {one_line(e)}", file=sys.stderr)
        return 1
    print(format_markdown(r))
    print(f"wrote {Path(args.out) / 'compare.json'}, compare.md, compare.png")
    return 0


if __name__ == "__main__":
    from ..log import console

    console()  # `[npumoe] ...` lines, as the npumoe command shows them
    sys.exit(main())
