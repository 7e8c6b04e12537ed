"""Where a compare run's peak RSS comes from: the RSS of this process sampled every ~10 ms
in a thread, cut into phases by markers (imports, load, warm-up, each measured run, ...).

    python benchmarks/rss_timeline.py --model MODEL [--sides stock,offload] [--prompt-tokens 512]
        [--max-tokens 16] [--repeats 1] [--json out.json]

Runs the same steps as ``npumoe compare`` (``compare.measure_side``'s parts, in order) and
prints, per phase: RSS at its start, its peak, RSS at its end (MB), and the peak over the
run minus the RSS at the start of the run (what VmHWM-reset meters report as the excess).
Linux only (/proc/self/status).
"""

import argparse
import gc
import json
import re
import sys
import threading
import time
from typing import List, Optional, Tuple

_RSS = re.compile(rb"VmRSS:\s+(\d+) kB")


def rss_parts() -> dict:
    """RSS by kind (bytes) from /proc/self/smaps: anon (heap, arenas, stacks), program weight
    files (.weights, mapped by onnxruntime), model safetensors, other files (libraries)."""
    out, kind = {"anon": 0, "weights": 0, "safetensors": 0, "files": 0}, "anon"
    with open("/proc/self/smaps") as f:
        for line in f:
            if line[0] in "0123456789abcdef" and "-" in line.split(" ", 1)[0]:
                parts = line.split()
                name = parts[5] if len(parts) > 5 else ""
                kind = ("anon" if not name or name.startswith("[") else "weights" if name.endswith(".weights")
                        else "safetensors" if name.endswith(".safetensors") else "files")
            elif line.startswith("Rss:"):
                out[kind] += int(line.split()[1]) * 1024
    return out


def rss_bytes() -> int:
    with open("/proc/self/status", "rb") as f:
        return int(_RSS.search(f.read()).group(1)) * 1024


class RssTimeline:
    """Samples VmRSS every ``period`` s in a daemon thread; ``mark(label)`` starts a phase."""

    def __init__(self, period: float = 0.01):
        self.period = period
        self.samples: List[Tuple[float, int]] = []
        self.marks: List[Tuple[float, str]] = []
        self.parts: List[dict] = []  # rss_parts() at each mark
        self._stop = threading.Event()
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.perf_counter() - self._t0, rss_bytes()))
            self._stop.wait(self.period)

    def start(self) -> "RssTimeline":
        self._thread.start()
        return self

    def mark(self, label: str) -> None:
        self.samples.append((time.perf_counter() - self._t0, rss_bytes()))
        self.marks.append((time.perf_counter() - self._t0, label))
        self.parts.append(rss_parts())

    def stop(self) -> None:
        self.mark("end")
        self._stop.set()
        self._thread.join()

    def phases(self) -> List[dict]:
        """Per phase (between consecutive marks): start, peak, end RSS (bytes) and seconds."""
        out = []
        s = sorted(self.samples)
        for (t0, label), (t1, _), parts in zip(self.marks, self.marks[1:], self.parts[1:]):
            inside = [r for t, r in s if t0 <= t <= t1]
            before = [r for t, r in s if t <= t0]
            start = before[-1] if before else inside[0]
            out.append({"phase": label, "s": t1 - t0, "start": start, "peak": max(inside + [start]),
                        "end": inside[-1] if inside else start, "end_parts": parts})
        return out


def report(tl: RssTimeline) -> str:
    lines = [f"{'phase':<34} {'s':>6} {'start MB':>9} {'peak MB':>8} {'end MB':>8} {'peak-start':>10}  "
             "at end: anon / .weights / safetensors / other files MB"]
    for p in tl.phases():
        e = p["end_parts"]
        lines.append(f"{p['phase']:<34} {p['s']:6.2f} {p['start'] / 1e6:9.1f} {p['peak'] / 1e6:8.1f} "
                     f"{p['end'] / 1e6:8.1f} {(p['peak'] - p['start']) / 1e6:10.1f}  "
                     f"{e['anon'] / 1e6:.1f} / {e['weights'] / 1e6:.1f} / {e['safetensors'] / 1e6:.1f} / {e['files'] / 1e6:.1f}")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--sides", default="stock,offload")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--prefill-step", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--keep-mlx-experts", action="store_true")
    ap.add_argument("--json")
    a = ap.parse_args(argv)

    tl = RssTimeline().start()
    tl.mark("import npumoe_mlx + compare")
    import mlx.core as mx
    from mlx_lm.utils import load_tokenizer
    from pathlib import Path

    try:
        from npumoe_mlx.runtime.heap import trim
    except ImportError:  # a release before heap.py (to measure it as it was)
        trim = lambda: None  # noqa: E731
    from npumoe_mlx.runtime.loading import load
    from npumoe_mlx.tools import compare as C
    from npumoe_mlx.tools.meters import Meters
    from npumoe_mlx.build.workloads import prompt_of_tokens

    tl.mark("prompt")
    ids = prompt_of_tokens(load_tokenizer(Path(a.model)), a.prompt_tokens, 0)
    for side in a.sides.split(","):
        mode = "off" if side == "stock" else "onnx"
        tl.mark(f"{side}: load")
        model, tok = load(a.model, offload=mode, quiet=True, keep_mlx_experts=a.keep_mlx_experts)
        tl.mark(f"{side}: warm-up")
        C.warm_up(model, tok, ids[: C.WARMUP_TOKENS], a.prefill_step)
        meters = Meters()
        for i in range(a.repeats):
            tl.mark(f"{side}: run {i} (gc)")
            gc.collect()
            tl.mark(f"{side}: run {i}")
            r = C.measure_run(model, tok, ids, a.max_tokens, a.prefill_step, meters)
            print(f"{side} run {i}: meters peak_mem_gb {r['peak_mem_gb']:.3f}, mlx peak {r['mlx_peak_mem_gb']:.3f}, "
                  f"prefill {r['prefill_tps']:.1f} tok/s, decode {r['decode_tps']:.1f} tok/s", file=sys.stderr)
        tl.mark(f"{side}: logits")
        C.prompt_logits(model, ids, a.prefill_step, len(ids))
        tl.mark(f"{side}: del model")
        del model
        gc.collect()
        mx.clear_cache()
        trim()  # as compare.measure_side does
    tl.stop()
    print(report(tl))
    mods = sorted(m for m in sys.modules if m.split(".")[0] in ("onnx", "coremltools", "google", "torch"))
    print(f"python packages imported that the run path needs not: {sorted({m.split('.')[0] for m in mods})}")
    if a.json:
        Path(a.json).write_text(json.dumps({"phases": tl.phases(), "modules": mods}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
