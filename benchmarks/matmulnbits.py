"""onnxruntime MatMulNBits paths vs dense float32 MatMul at one expert linear's shape.

Why the onnx programs use 4-bit MatMulNBits WITHOUT zero points (plus an exact
correction): float zero points send onnxruntime down a slow path, and its 8-bit float
kernel is slow at few rows. Interleaved runs, median per case; K=2048, N=1536, block 64.

    python benchmarks/matmulnbits.py --json benchmarks/results/matmulnbits-i15.json
"""

import argparse
import json
import os
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

K, N, BS = 2048, 1536, 64


def _session(rows, kind, rng, threads):
    """kind: dense | q4_zp_float | q4 | q8 | q4x2 (the 8-bit nibble planes: K doubled)."""
    k = 2 * K if kind == "q4x2" else K
    if kind == "dense":
        inits = [numpy_helper.from_array(rng.standard_normal((K, N)).astype(np.float32), "W")]
        node = helper.make_node("MatMul", ["x", "W"], ["y"])
    else:
        bits = 8 if kind == "q8" else 4
        nb = k // BS
        B = rng.integers(0, 256, (N, nb, BS * bits // 8), dtype=np.uint8)
        inits = [numpy_helper.from_array(B, "B"),
                 numpy_helper.from_array(rng.uniform(0.01, 0.02, N * nb).astype(np.float32), "S")]
        ins = ["x", "B", "S"]
        if kind == "q4_zp_float":
            inits.append(numpy_helper.from_array(rng.uniform(0, 15, N * nb).astype(np.float32), "Z"))
            ins.append("Z")
        node = helper.make_node("MatMulNBits", ins, ["y"], domain="com.microsoft", K=k, N=N, bits=bits, block_size=BS)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [rows, N])], initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    m.ir_version = 8
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    s = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return s, rng.standard_normal((rows, k)).astype(np.float32)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="1,32,512")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json")
    args = p.parse_args()
    rng = np.random.default_rng(0)
    kinds = ("q4_zp_float", "q4", "q8", "q4x2", "dense")
    out = {"K": K, "N": N, "block": BS, "onnxruntime": ort.__version__, "loadavg": os.getloadavg(), "rows": {}}
    for rows in [int(r) for r in args.rows.split(",")]:
        ss = {k: _session(rows, k, rng, args.threads) for k in kinds}
        ts = {k: [] for k in kinds}
        for s, x in ss.values():
            s.run(None, {"x": x})
        for _ in range(args.repeats if rows < 512 else max(args.repeats // 3, 3)):
            for k, (s, x) in ss.items():
                t = time.perf_counter()
                s.run(None, {"x": x})
                ts[k].append(time.perf_counter() - t)
        out["rows"][rows] = {k: float(np.median(v)) * 1e3 for k, v in ts.items()}
        print(rows, "  ".join(f"{k} {v:.2f} ms" for k, v in out["rows"][rows].items()), flush=True)
    out["loadavg_end"] = os.getloadavg()
    if args.json:
        with open(args.json + ".tmp", "w") as f:
            json.dump(out, f, indent=1)
        os.replace(args.json + ".tmp", args.json)


if __name__ == "__main__":
    main()
