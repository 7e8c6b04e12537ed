"""Issue 23 target: `npumoe server --replan auto` under 40 chat requests of 20-800 tokens.

    PYTHONPATH=. python benchmarks/server_replan.py [--plan tight|default] [--out JSON]

A tiny qwen3_moe (16 experts, skewed routing) and an onnx bundle; two servers on 127.0.0.1:
``npumoe server --replan auto`` and stock ``mlx_lm server``. The same 40 requests (prompts of
20-800 tokens, log-uniform, seed 23; chat template around them) go to both through the openai client at temperature 0,
one after another; the re-plan runs in the background while the next requests are served.
Printed and saved:
- padding and overflow of the routed layers over the whole run, before the re-plan's swap and
  after it (from ``/v1/npumoe/stats`` after every request: slots/padded/overflow/synced_pairs);
- re-plans (the generation), which requests were in flight while it built and swapped;
- requests whose text differs from mlx_lm.server's (the target: none).

``--plan tight``: the bundle of tests/test_workloads.py (a plan sized for 16-token calls: one
tier of 16 rows per group, cost "offload everything"), which must drift. ``--plan default``: the
default build of the tiny model (calibrated, onnx's parametric costs).
"""

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from npumoe_mlx.build.build import build as build_bundle  # noqa: E402
from npumoe_mlx.planning.cost import CostModel  # noqa: E402
from npumoe_mlx.planning.plan import PlanLimits  # noqa: E402
from npumoe_mlx.tools.tiny import make_tiny_model  # noqa: E402
from npumoe_mlx.build.workloads import prompt_of_tokens  # noqa: E402

EAGER = CostModel("onnx", 1e-9, 1e15, 1e15, 0.0, 1.0, 1.0, first_offload_tokens=1, source="bench: offload everything")
FIELDS = ("slots", "padded", "overflow", "synced_pairs")


class Server:
    """A server subprocess on a free port of 127.0.0.1, output to a log file."""

    def __init__(self, cmd, log: Path, env: dict):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self._out = open(log, "wb")
        self.log = log
        self.proc = subprocess.Popen([*cmd, "--host", "127.0.0.1", "--port", str(self.port)], stdout=self._out,
                                     stderr=subprocess.STDOUT, env=env, cwd=log.parent)
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout=180.0):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log.read_text()}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            time.sleep(0.2)
        raise TimeoutError(f"server not ready in {timeout} s")

    def client(self):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key="not-needed", timeout=300, max_retries=0)

    def stats(self) -> dict:
        with urllib.request.urlopen(self.url + "/v1/npumoe/stats", timeout=30) as r:
            return json.loads(r.read())

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=15)
        self._out.close()


def routed(st: dict) -> dict:
    """Sums of FIELDS over the routed layers of a /v1/npumoe/stats answer."""
    ls = [l for l in st["layers"] if l["kind"] == "routed"]
    return {f: sum(l[f] for l in ls) for f in FIELDS}


def rates(a: dict, b: dict = None) -> dict:
    """(padding %, overflow %) of the counters ``a`` minus ``b``."""
    d = {f: a[f] - (b or {}).get(f, 0) for f in FIELDS}
    return {"padding_pct": round(100.0 * d["padded"] / max(d["slots"], 1), 2),
            "overflow_pct": round(100.0 * d["overflow"] / max(d["synced_pairs"], 1), 2),
            "slots": d["slots"], "pairs": d["synced_pairs"]}


def make_bundle(root: Path, plan: str):
    path = make_tiny_model(root / "m", "qwen3_moe", seed=1, num_experts=16, skew=2.0)
    if plan == "tight":  # tests/test_workloads.py's: sized for 16-token calls
        tight = PlanLimits.for_backend("onnx", max_tiers=1)
        tight.capacities = [16]
        out = build_bundle(str(path), "onnx", str(root / "b"), cost=EAGER, limits=tight, corpus=["qa"], tokens=256,
                           chunk_size=128, log=lambda m: None)
    else:
        out = build_bundle(str(path), "onnx", str(root / "b"), tune=False, log=lambda m: None)
    return path, out


def run(root: Path, plan: str, n_requests: int, max_tokens: int, lo: int, hi: int) -> dict:
    path, out = make_bundle(root, plan)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    (root / "hub").mkdir(exist_ok=True)
    ours = Server([sys.executable, "-m", "npumoe_mlx.cli.server", "--model", str(path), "--offload", "onnx", "--bundle",
                   str(out), "--replan", "auto"], root / "ours.log", {**env, "HF_HUB_CACHE": str(root / "no-cache")})
    stock = Server([sys.executable, "-m", "mlx_lm", "server", "--model", str(path)], root / "stock.log",
                   {**env, "HF_HUB_CACHE": str(root / "hub")})
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    tok = load_tokenizer(Path(path))
    rng = np.random.default_rng(23)
    sizes = np.exp(rng.uniform(np.log(lo), np.log(hi), n_requests)).astype(int)  # prompt tokens
    reqs, snaps = [], []
    try:
        ours.wait_ready(), stock.wait_ready()
        first = ours.stats()
        for i, n in enumerate(sizes):
            msg = [{"role": "user", "content": tok.decode(prompt_of_tokens(tok, int(n), seed=i))}]
            t0 = time.time()
            got = [c.message.content for c in ours.client().chat.completions.create(
                model="default_model", messages=msg, max_tokens=max_tokens, temperature=0.0).choices]
            t1 = time.time()
            want = [c.message.content for c in stock.client().chat.completions.create(
                model="default_model", messages=msg, max_tokens=max_tokens, temperature=0.0).choices]
            st = ours.stats()
            snaps.append(routed(st))
            reqs.append({"i": i, "tokens": int(n), "start": t0, "end": t1, "equal": got == want,
                         "generation": st["replan"]["generation"]})
        last = st
    finally:
        ours.stop()
        stock.stop()
    r = last["replan"]
    swap = next((i for i, q in enumerate(reqs) if q["generation"] >= 1), None)
    t_start, t_end = r.get("last_started"), r.get("last_replan")
    in_flight = [q["i"] for q in reqs if t_start is not None and t_end is not None
                 and q["start"] < t_end and q["end"] > t_start]
    out = {
        "plan": plan, "requests": n_requests, "max_tokens": max_tokens, "prompt_tokens": [q["tokens"] for q in reqs],
        "generation": r["generation"], "replans": r["generation"], "first_request_after_swap": swap,
        "requests_in_flight_during_replan": in_flight,
        "replan_seconds": None if t_start is None or t_end is None else round(t_end - t_start, 2),
        "text_equal_to_mlx_lm_server": sum(q["equal"] for q in reqs), "text_differs": [q["i"] for q in reqs if not q["equal"]],
        "over_the_run": rates(snaps[-1], routed(first)),
        "before_swap": rates(snaps[swap - 1] if swap else snaps[-1], routed(first)) if swap != 0 else None,
        "after_swap": rates(snaps[-1], snaps[swap - 1]) if swap else None,
        "replan": r, "uptime": os.getloadavg(),
    }
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--plan", choices=("tight", "default"), default="tight")
    p.add_argument("--requests", type=int, default=40)
    p.add_argument("--max-tokens", type=int, default=8, help="tokens generated per request")
    p.add_argument("--min-tokens", type=int, default=20)
    p.add_argument("--max-prompt-tokens", type=int, default=800)
    p.add_argument("--out", help="write the result JSON here")
    p.add_argument("--keep", help="work folder to keep (default: a temp folder, removed)")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(a.keep or tmp)
        root.mkdir(parents=True, exist_ok=True)
        res = run(root, a.plan, a.requests, a.max_tokens, a.min_tokens, a.max_prompt_tokens)
    for k in ("over_the_run", "before_swap", "after_swap"):
        print(f"{k:>14}: {res[k]}")
    print(f"re-plans {res['replans']} (first request after the swap: {res['first_request_after_swap']}, "
          f"requests in flight while it ran: {res['requests_in_flight_during_replan']}, {res['replan_seconds']} s); "
          f"text equal to mlx_lm.server on {res['text_equal_to_mlx_lm_server']}/{res['requests']}; "
          f"load average {res['uptime']}")
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
