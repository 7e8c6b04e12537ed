"""Run mlx-lm's own model tests stock and with the offload installed on every model.

    pip download --no-deps --no-binary :all: mlx-lm==$(python -c "import mlx_lm; print(mlx_lm.__version__)") -d /tmp/mlxlm-sdist
    tar xzf /tmp/mlxlm-sdist/mlx_lm-*.tar.gz -C /tmp/mlxlm-sdist
    PYTHONPATH=. python tests/peer/run_mlx_lm_models.py /tmp/mlxlm-sdist/mlx_lm-*/ [-k moe] [--modes stock onnx]

Each mode runs in its own pytest process (the plugin patches mlx_lm's model classes
at import). Prints, per mode, how many tests pass, and every test that passes stock
but not with the offload, with its last error line; ``--json`` keeps everything.
Slow (minutes): never part of the default test run.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
HALF_MESSAGE = "expert weights need MLX's GPU (Metal)"


def run(sdist: Path, mode: str, half_check: str, k, tmp: Path) -> dict:
    out = tmp / f"{mode}-{half_check}.json"
    env = {**os.environ, "NPUMOE_PEER_MODE": mode, "NPUMOE_PEER_HALF_CHECK": half_check,
           "NPUMOE_PEER_OUT": str(out), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parents[1]), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "pytest", str(sdist / "tests" / "test_models.py"), "-p", "npumoe_peer",
           "-q", "-p", "no:cacheprovider"] + (["-k", k] if k else [])
    subprocess.run(cmd, env=env, cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return json.loads(out.read_text())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sdist", type=Path, help="unpacked mlx-lm sdist (holds tests/test_models.py)")
    ap.add_argument("-k", help="pytest -k expression (a subset of the tests)")
    ap.add_argument("--modes", nargs="+", default=["stock", "onnx"], choices=["stock", "onnx", "mlx"])
    ap.add_argument("--json", type=Path, help="write every outcome and counter here")
    args = ap.parse_args(argv)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes:
            checks = ["on"] if mode == "stock" else ["on", "off"]
            for half in checks:
                results[f"{mode}/half-check-{half}"] = run(args.sdist, mode, half, args.k, Path(tmp))
    stock = results.get("stock/half-check-on")
    for name, r in results.items():
        o = r["outcomes"]
        passed = {t for t, v in o.items() if v["outcome"] == "passed"}
        c = r["counts"]
        line = f"{name}: {len(passed)}/{len(o)} passed"
        if r["mode"] != "stock":
            line += (f"; {c['models']} models, {c['blocks']} expert blocks + {c['shared']} shared experts offloaded "
                     f"({c['skipped_blocks']} skipped), {c['offloaded_calls']}/{c['layer_calls']} calls ran programs "
                     f"({c['program_calls']} program calls, {c['executors_that_ran_programs']} executors), "
                     f"{c['notices']} weight-change notices, {len(c['faults'])} program faults")
        print(line)
        if stock and r is not stock:
            lost = sorted(t for t, v in stock["outcomes"].items() if v["outcome"] == "passed" and t not in passed)
            half = [t for t in lost if HALF_MESSAGE in o.get(t, {}).get("message", "")]
            other = [t for t in lost if t not in half]
            print(f"  passes stock, not here: {len(lost)} ({len(half)} with the CPU half-precision message)")
            for t in other:
                print(f"    {t}: {o.get(t, {}).get('outcome')} {o.get(t, {}).get('message', '')[:200]}")
            if half:
                print(f"    e.g. {half[0]}: {o[half[0]]['message'][:200]}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
