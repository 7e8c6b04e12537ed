"""Full-scale run: a real model's shape at all its layers, 4-bit, random weights.

Two steps, one process each (so each side's peak RSS is its own):

  python benchmarks/fullscale.py write --out DIR [--layers N]
      A random MLX-quantized checkpoint with a preset's dims (default qwen3-30b-a3b,
      48 layers, 4-bit, group 64), written layer by layer: codes, scales and biases
      are drawn directly in MLX's quantized layout (uint32-packed codes, scales,
      biases), so the writer never holds more than one layer (~0.4 GB). Shapes and
      the config's "quantization" entry come from mlx_lm's own model class and
      ``quantize_model`` run on a lazy (never evaluated) model, so they match what
      ``mlx_lm.convert -q`` writes (e.g. qwen3_moe's router at 8 bits).
  python benchmarks/fullscale.py run --model DIR --offload off|onnx --out JSON
  python benchmarks/fullscale.py summary --stock A.json --offload B.json --build-log LOG --model DIR --out JSON
      One greedy generation through ``npumoe_mlx.load`` (``off`` = stock mlx_lm):
      load time, prefill and decode tok/s, peak RSS (VmHWM, includes loading),
      the generated token ids. A watchdog stops the run (and says so in the JSON)
      if the machine's available memory falls under ``--min-available-gb``, so a
      side that cannot fit reports its numbers instead of invoking the OOM killer.

Weights: codes uniform; per group ``scale = 2a / (2^bits - 1) * U(0.75, 1.25)``,
``bias = -scale * (2^bits - 1) / 2``, so each weight is ~U(-a, a) with
``a = 1 / sqrt(fan_in)`` (MLX's Linear init); norms are ones. Routing is therefore
near uniform (no skew). The vocab is the preset's (151936 for Qwen3), with the
offline tokenizer of ``npumoe_mlx/tools/tiny.py`` (384 tokens); lm_head rows past
the tokenizer are zero, so greedy decoding stays inside the tokenizer while the
embedding and lm_head cost what the real model's do.
"""

import argparse
import contextlib
import io
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm import stream_generate
from mlx_lm.utils import _get_classes, quantize_model, save_config

from npumoe_mlx.atomic import honour_umask
from npumoe_mlx.build.workloads import prompt_of_tokens
from npumoe_mlx.cli.replay import load_shape_presets
from npumoe_mlx.runtime.executor import offload_stats, summarize
from npumoe_mlx.runtime.loading import load
from npumoe_mlx.tools.tiny import build_tokenizer_files, tiny_config

MARKER = "npumoe_fullscale.json"
DTYPES = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}


# ---------------------------------------------------------------------------
# write


def lazy_quantized_model(shape: str, layers: int, bits: int, group_size: int):
    """(params {key: lazy mx.array}, config) of the quantized model; nothing evaluated.

    The shapes and dtypes of the lazy arrays are the ones ``mlx_lm.convert -q`` writes.
    """
    preset = load_shape_presets()[shape]
    config = tiny_config(preset["mlx_family"], shape=shape, num_layers=layers, dims={"vocab": preset["vocab"]})
    model_cls, args_cls = _get_classes(config)
    model = model_cls(args_cls.from_dict(config))  # random inits stay lazy
    with contextlib.redirect_stdout(io.StringIO()):  # its "[INFO] ..." line
        model, config = quantize_model(model, config, group_size, bits, mode="affine")
    return dict(tree_flatten(model.parameters())), config


def _quant_of(key: str, config: dict) -> tuple:
    """(bits, group_size) of the quantized module owning ``key``."""
    q = config["quantization"]
    own = q.get(key.rsplit(".", 1)[0])
    if isinstance(own, dict):
        return own["bits"], own["group_size"]
    return q["bits"], q["group_size"]


def random_tensors(params: dict, keys, config: dict, rng, dtype, n_tokens: int) -> dict:
    """Random values for ``keys`` in MLX's quantized layout (see the module docstring)."""
    out = {}
    for k in keys:
        v = params[k]
        if k.endswith(".weight") and v.dtype == mx.uint32:
            out[k] = mx.array(rng.integers(0, 2**32, v.shape, dtype=np.uint32))
        elif k.endswith(".scales"):
            bits, gs = _quant_of(k, config)
            fan_in = params[k[: -len("scales")] + "weight"].shape[-1] * 32 // bits
            levels = 2**bits - 1
            s = (2.0 / np.sqrt(fan_in) / levels) * rng.uniform(0.75, 1.25, v.shape).astype(np.float32)
            if k == "lm_head.scales":
                s[n_tokens:] = 0.0  # rows past the tokenizer: zero logits, never the argmax
            out[k] = mx.array(s).astype(dtype)
            out[k[: -len("scales")] + "biases"] = mx.array(-s * (levels / 2)).astype(dtype)
        elif k.endswith(".biases"):
            continue  # written with its scales
        elif k.endswith(".weight") and v.ndim == 1:
            out[k] = mx.ones(v.shape, dtype=dtype)  # RMSNorm gains
        else:
            raise ValueError(f"no random recipe for {k} {v.shape} {v.dtype}")
    return out


def _layer_of(key: str):
    parts = key.split(".")
    return int(parts[2]) if key.startswith("model.layers.") else None


def write_model(out: Path, shape: str, layers: int, bits: int, group_size: int, dtype: str, seed: int,
                log=print) -> dict:
    """Write the checkpoint folder (temp folder renamed into place); returns its marker."""
    t0 = time.perf_counter()
    params, config = lazy_quantized_model(shape, layers, bits, group_size)
    config["torch_dtype"] = dtype
    by_shard = {}  # shard index -> keys: 0 = embedding, final norm, lm_head; i + 1 = layer i
    for k in params:
        layer = _layer_of(k)
        by_shard.setdefault(0 if layer is None else layer + 1, []).append(k)
    n_shards = len(by_shard)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        n_tokens = build_tokenizer_files(tmp)
        weight_map, total = {}, 0
        for i in sorted(by_shard):
            rng = np.random.default_rng([seed, i])
            tensors = random_tensors(params, sorted(by_shard[i]), config, rng, DTYPES[dtype], n_tokens)
            name = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
            mx.save_safetensors(str(tmp / name), tensors, metadata={"format": "mlx"})
            total += sum(int(t.nbytes) for t in tensors.values())
            weight_map.update({k: name for k in tensors})
            del tensors
            log(f"  shard {i + 1}/{n_shards} written ({total / 1e9:.2f} GB so far, "
                f"{time.perf_counter() - t0:.0f} s)")
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        save_config(config, tmp / "config.json")
        marker = {"writer": "benchmarks/fullscale.py", "shape": shape, "layers": layers, "bits": bits,
                  "group_size": group_size, "dtype": dtype, "seed": seed, "weight_bytes": total,
                  "tokenizer_size": n_tokens, "write_s": round(time.perf_counter() - t0, 1)}
        (tmp / MARKER).write_text(json.dumps(marker, indent=2))
        honour_umask(tmp)
        if out.exists():
            if not (out / MARKER).exists():
                raise FileExistsError(f"{out} exists and was not written by this script; pick another --out")
            shutil.rmtree(out)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return marker


# ---------------------------------------------------------------------------
# run


def _proc_kb(field: str, path: str = "/proc/self/status") -> int:
    with open(path) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


class Watchdog:
    """Polls MemAvailable; below ``min_gb`` it writes ``on_abort()`` and kills this process."""

    def __init__(self, min_gb: float, on_abort, period: float = 0.5):
        self.min_kb, self.on_abort, self.period = int(min_gb * 1e6), on_abort, period
        self.min_seen_kb = None
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self):
        while True:
            avail = _proc_kb("MemAvailable", "/proc/meminfo")
            self.min_seen_kb = avail if self.min_seen_kb is None else min(self.min_seen_kb, avail)
            if avail < self.min_kb:
                self.on_abort(f"stopped: the machine's MemAvailable fell to {avail / 1e6:.2f} GB "
                              f"(< {self.min_kb / 1e6:.2f} GB) at RSS {_proc_kb('VmRSS') / 1e6:.2f} GB")
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(self.period)


def run(model: str, offload: str, prompt_tokens: int, max_tokens: int, out: Path, min_available_gb: float,
        prefill_step: int, stats: bool, lazy: bool = False, log=print) -> dict:
    """One greedy generation; the result dict is also written to ``out`` (and on abort)."""
    res = {"model": model, "offload": offload, "prompt_tokens": prompt_tokens, "max_tokens": max_tokens,
           "prefill_step": prefill_step, "lazy": lazy, "pid": os.getpid(), "status": "loading",
           "loadavg_start": os.getloadavg()}

    def save():
        res["peak_rss_gb"] = _proc_kb("VmHWM") / 1e6
        res["min_mem_available_gb"] = dog.min_seen_kb / 1e6 if dog.min_seen_kb else None
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(res, indent=2))
        os.replace(tmp, out)

    def abort(reason):
        res["status"] = reason
        save()
        log(reason)

    dog = Watchdog(min_available_gb, abort)
    with contextlib.suppress(OSError):  # Linux: if the machine runs out, the kernel stops this run first
        Path("/proc/self/oom_score_adj").write_text("1000")
    t0 = time.perf_counter()
    # lazy: mlx_lm reads weights on first use; with an onnx bundle whose experts leave MLX
    # (release), their bytes are then never read (else the load peaks at the whole model).
    m, tok = load(model, offload=offload, lazy=lazy)
    res["load_s"] = round(time.perf_counter() - t0, 1)
    res["rss_after_load_gb"] = _proc_kb("VmRSS") / 1e6
    res["status"] = "generating"
    save()
    log(f"loaded in {res['load_s']} s, RSS {res['rss_after_load_gb']:.2f} GB")
    prompt = prompt_of_tokens(tok, prompt_tokens)
    tokens, top, last = [], [], None  # top: the 5 best (id, logprob) per step
    t1 = time.perf_counter()
    for r in stream_generate(m, tok, prompt, max_tokens=max_tokens, prefill_step_size=prefill_step):
        if not tokens:
            res["ttft_s"] = round(time.perf_counter() - t1, 2)
            log(f"first token after {res['ttft_s']} s")
        tokens.append(int(r.token))
        lp = np.array(r.logprobs.astype(mx.float32))  # (vocab,)
        top.append([[int(i), round(float(lp[i]), 4)] for i in np.argsort(lp)[::-1][:5]])
        last = r
    res.update(
        status="done", tokens=tokens, top5=top, text=last.text if last else "", prefill_tps=last.prompt_tps,
        decode_tps=last.generation_tps, generate_s=round(time.perf_counter() - t1, 1),
        mlx_peak_gb=mx.get_peak_memory() / 1e9, loadavg_end=os.getloadavg(),
    )
    if stats and offload != "off":
        res["offload_stats"] = summarize(offload_stats(m))
        with contextlib.suppress(ImportError):  # per-unit resident bytes, where this build has them
            from npumoe_mlx.planning.residency import model_resident

            held = model_resident(m)
            res["resident"] = {"mlx_gb": held["mlx"] / 1e9, "released_gb": held["released"] / 1e9}
    save()
    return res


# ---------------------------------------------------------------------------
# summary


def _time_v(log: Path) -> dict:
    """Wall seconds and max RSS from a ``/usr/bin/time -v`` log (None if absent)."""
    wall = rss = None
    for line in log.read_text(errors="replace").splitlines():
        line = line.strip()
        if line.startswith("Elapsed (wall clock)"):
            parts = [float(x) for x in line.rsplit(" ", 1)[1].split(":")]
            wall = sum(v * 60**i for i, v in enumerate(reversed(parts)))
        elif line.startswith("Maximum resident set size"):
            rss = int(line.rsplit(" ", 1)[1]) / 1e6  # kB -> GB
    return {"wall_s": wall, "max_rss_gb": rss}


def summary(stock: Path, offload: Path, build_log: Path, bundle: Path, model: Path) -> dict:
    """One JSON of both sides, the build and the agreement."""
    a, b = json.loads(stock.read_text()), json.loads(offload.read_text())
    sa, sb = a.get("tokens") or [], b.get("tokens") or []
    n = max(len(sa), len(sb))
    same = sum(x == y for x, y in zip(sa, sb))
    text = build_log.read_text(errors="replace")
    resident = [l.strip() for l in text.splitlines() if l.strip().startswith("resident:")]
    written = [l.strip() for l in text.splitlines() if l.startswith("bundle written")]
    files = [f for f in bundle.rglob("*") if f.is_file()] if bundle.exists() else []
    return {
        "model": json.loads((model / MARKER).read_text()),
        "model_bytes": sum(f.stat().st_size for f in model.glob("model*.safetensors")),
        "build": {**_time_v(build_log), "resident_line": resident[-1] if resident else None,
                  "result": written[-1] if written else None,
                  "bundle_bytes": sum(f.stat().st_size for f in files) or None},
        "stock": a,
        "offload": b,
        "token_agreement": same / n if n else None,
        "peak_rss_ratio": b["peak_rss_gb"] / a["peak_rss_gb"],
        "prefill_speedup": (b["prefill_tps"] / a["prefill_tps"]) if b.get("prefill_tps") else None,
        "decode_speedup": (b["decode_tps"] / a["decode_tps"]) if b.get("decode_tps") else None,
    }


# ---------------------------------------------------------------------------
# CLI


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Full-scale random 4-bit checkpoint: write it, run one side.")
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write", help="write the random quantized checkpoint")
    w.add_argument("--out", required=True, type=Path)
    w.add_argument("--shape", default="qwen3-30b-a3b", help="preset of npumoe_mlx/data/model-shapes.json")
    w.add_argument("--layers", type=int, default=None, help="default: the preset's")
    w.add_argument("--bits", type=int, default=4, choices=(4, 8))
    w.add_argument("--group-size", type=int, default=64)
    w.add_argument("--dtype", default="float32", choices=tuple(DTYPES),
                   help="scales, biases and norms (default float32: MLX's CPU runs half-precision "
                   "gather_qmm ~8x slower; bfloat16 is the real checkpoint's dtype)")
    w.add_argument("--seed", type=int, default=0)
    r = sub.add_parser("run", help="one greedy generation, stock (off) or offloaded")
    r.add_argument("--model", required=True)
    r.add_argument("--offload", default="off", help="off (stock mlx_lm), onnx, ...")
    r.add_argument("--prompt-tokens", type=int, default=128)
    r.add_argument("--max-tokens", type=int, default=8)
    r.add_argument("--prefill-step", type=int, default=2048)
    r.add_argument("--min-available-gb", type=float, default=0.5,
                   help="stop the run if the machine's MemAvailable falls below this")
    r.add_argument("--stats", action="store_true", help="add the offload counters to the JSON")
    r.add_argument("--lazy", action="store_true", help="mlx_lm lazy load (weights read on first use)")
    r.add_argument("--out", required=True, type=Path, help="result JSON")
    m = sub.add_parser("summary", help="one JSON of both runs and the build")
    m.add_argument("--stock", required=True, type=Path)
    m.add_argument("--offload", required=True, type=Path)
    m.add_argument("--build-log", required=True, type=Path, help="`/usr/bin/time -v npumoe build ...` output")
    m.add_argument("--model", required=True, type=Path)
    m.add_argument("--bundle", type=Path, help="default: MODEL/npumoe-onnx")
    m.add_argument("--out", required=True, type=Path)
    args = p.parse_args(argv)
    if args.cmd == "summary":
        res = summary(args.stock, args.offload, args.build_log, args.bundle or args.model / "npumoe-onnx", args.model)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=2))
        print(json.dumps({k: res[k] for k in ("token_agreement", "peak_rss_ratio", "prefill_speedup",
                                              "decode_speedup")}))
        return 0
    if args.cmd == "write":
        presets = load_shape_presets()
        if args.shape not in presets:
            p.error(f"unknown --shape {args.shape!r}; choose from {', '.join(presets)}")
        layers = args.layers or presets[args.shape]["layers"]
        marker = write_model(args.out, args.shape, layers, args.bits, args.group_size, args.dtype, args.seed)
        print(json.dumps(marker))
    else:
        res = run(args.model, args.offload, args.prompt_tokens, args.max_tokens, args.out,
                  args.min_available_gb, args.prefill_step, args.stats, args.lazy)
        print(json.dumps({k: v for k, v in res.items() if k != "text"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
