"""Each Core ML weight format at one expert shape: bytes held and error vs the experts.

    python benchmarks/coreml_formats.py [--D 2048 --H 768 --G 8 --bits 4] [--json out.json]

Builds one group (random MLX-style affine weights, smallest tier 32) per format with the
coreml backend's ``build`` (which refuses a format past its tolerance) and reports the
weight bytes of one function, the package bytes, what the cost model prices per expert,
and the max relative error against the experts (numpy MIL interpreter, seeded rows).
Runs anywhere coremltools installs (no Mac needed).
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ane_kernels import formats  # noqa: E402
from ane_kernels.coreml import read_metadata  # noqa: E402
from ane_kernels.milrun import format_error, load_package  # noqa: E402
from ane_kernels.spec import ProgramSpec, random_spec  # noqa: E402


def measure(spec: ProgramSpec, fmt: str, folder: Path, rows: int = 8) -> dict:
    from ane_kernels.limits import _const_bytes
    from npumoe_mlx.backends import backend_class

    t0 = time.perf_counter()
    entry = backend_class("coreml").build(spec, folder, weight_format=fmt)
    pkg = folder / entry["package"]
    func = next(iter(load_package(pkg).functions.values()))
    wbytes = sum(_const_bytes(op.outputs[0].val, op.outputs[0].dtype) for op in func.operations if op.op_type == "const")
    return {
        "weight_bytes": int(wbytes),
        "package_bytes": int(sum(p.stat().st_size for p in pkg.rglob("*") if p.is_file())),
        "priced_bytes_per_expert": formats.expert_bytes(fmt, spec.D, spec.H),
        "max_rel_err": entry["max_rel_err"],
        "max_rel_err_16_rows": format_error(pkg, spec, rows=rows * 2, seed=1),
        "tolerance": formats.TOLERANCE[fmt],
        "layout": read_metadata(pkg)["layout"],
        "seconds": round(time.perf_counter() - t0, 1),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--D", type=int, default=2048)
    p.add_argument("--H", type=int, default=768)
    p.add_argument("--G", type=int, default=8)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--formats", nargs="+", default=list(formats.WEIGHT_FORMATS))
    p.add_argument("--json", help="Also write the results here.")
    a = p.parse_args(argv)
    spec = random_spec(G=a.G, D=a.D, H=a.H, tiers=(32,), bits=a.bits, group_size=a.group_size, seed=0)
    out = {"shape": {"G": a.G, "D": a.D, "H": a.H, "bits": a.bits, "group_size": a.group_size},
           "source_bytes": spec.weight_bytes, "formats": {}}
    print(f"G={a.G} D={a.D} H={a.H}, MLX q{a.bits}g{a.group_size} source: {spec.weight_bytes / 1e6:.1f} MB")
    print("| format | weights in program (MB) | package (MB) | priced per expert (MB) | max rel err | tolerance |")
    print("|---|---|---|---|---|---|")
    for fmt in a.formats:
        with tempfile.TemporaryDirectory() as tmp:
            r = out["formats"][fmt] = measure(spec, fmt, Path(tmp))
        print(f"| {fmt} | {r['weight_bytes'] / 1e6:.1f} | {r['package_bytes'] / 1e6:.1f} | "
              f"{r['priced_bytes_per_expert'] / 1e6:.2f} | {max(r['max_rel_err'], r['max_rel_err_16_rows']):.2e} | "
              f"{r['tolerance']:g} |", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
