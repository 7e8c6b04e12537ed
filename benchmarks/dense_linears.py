"""One non-expert linear at a real model's attention dims: stock MLX vs its dense program.

Times ``dense.measure`` (the numbers ``--dense-programs`` decides with: host sync and copies
included) for the attention projections of a preset in ``data/model-shapes.json``
(q: D -> heads*head_dim, k/v: D -> kv_heads*head_dim, o: heads*head_dim -> D), float32 and
MLX affine 4/8-bit, at a few row counts. Small (one linear at a time): no big-run lock.

    python benchmarks/dense_linears.py --shape qwen3-30b-a3b --rows 1,128,512 \
        --out benchmarks/results/dense-linears-qwen3-dense.json
"""

import argparse
import os

import mlx.core as mx
import mlx.nn as nn

from npumoe_mlx.atomic import write_json
from npumoe_mlx.backends.onnx import Backend
from npumoe_mlx.cli.replay import load_shape_presets
from npumoe_mlx.runtime import dense
from npumoe_mlx.tools.report import loadavg_at_end, machine_info


def attention_dims(preset: dict) -> dict:
    D, heads, kv, hd = preset["hidden"], preset["heads"], preset["kv_heads"], preset["head_dim"]
    return {"q": (D, heads * hd), "kv": (D, kv * hd), "o": (heads * hd, D)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="qwen3-30b-a3b")
    p.add_argument("--rows", default="1,128,512")
    p.add_argument("--bits", default="0,4,8", help="0 = float32")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    rows = [int(r) for r in a.rows.split(",")]
    dims = attention_dims(load_shape_presets()[a.shape])
    be, out, machine = Backend(), [], machine_info()
    for name, (i, o) in dims.items():
        for bits in (int(b) for b in a.bits.split(",")):
            lin = nn.Linear(i, o, bias=False)
            if bits:
                lin = nn.QuantizedLinear.from_linear(lin, group_size=64, bits=bits)
            mx.eval(lin.parameters())
            m = dense.measure(lin, dense.LinearProgram(lin, be._session), rows)
            row = {"proj": name, "key": dense.shape_key(lin), **m,
                   "speedup": [ms / ps for ms, ps in zip(m["mlx_s"], m["program_s"])],
                   "min_rows": dense.crossover([rows[0], rows[-1]], [m["mlx_s"][0], m["mlx_s"][-1]],
                                               [m["program_s"][0], m["program_s"][-1]])}
            out.append(row)
            print(row["key"], {n: f"MLX {ms * 1e3:.1f} ms / program {ps * 1e3:.2f} ms" for n, ms, ps in
                               zip(rows, m["mlx_s"], m["program_s"])}, flush=True)
    write_json(a.out, {"shape": a.shape, "dims": dims, "rows": rows, "results": out,
                       "machine": {**machine, **loadavg_at_end()}, "threads": os.cpu_count(),
                       "command": f"python benchmarks/dense_linears.py --shape {a.shape} --rows {a.rows} "
                                  f"--bits {a.bits} --out {a.out}"})


if __name__ == "__main__":
    main()
