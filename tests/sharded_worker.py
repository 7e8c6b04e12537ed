"""One rank of the mlx.launch tests in test_sharded.py (not a test module itself).

    python sharded_worker.py {tensor,pipeline} MODEL [MODEL ...]

Per model: a bundle missing on the ranks, or one whose build lock another process holds,
is a clear error on every rank (first model only), sharded_load(build=True) builds each rank's bundle, greedy tokens are generated,
a second build=True load reuses the bundles and a bundle lost on rank 1 is rebuilt
there alone (first model only), and every rank prints
one JSON line: its rank, shard, tokens, bundle and every rank's offload stats.
"""

import json
import os
import shutil
import sys
import time
from pathlib import Path

import mlx.core as mx
from mlx_lm import stream_generate
from mlx_lm.sample_utils import make_sampler

from npumoe_mlx.planning.cost import CostModel
from npumoe_mlx.runtime import sharded
from npumoe_mlx.runtime.offload import OffloadError

PROMPT = "The quick brown fox jumps over the lazy dog. " * 3
# Programs always win, so every call (decode included) runs them on every rank.
EAGER = CostModel("onnx", 1e-9, 1e15, 1e15, 0.0, 1.0, 1.0, first_offload_tokens=1, source="test: offload everything")
BUILD = dict(corpus=["long-context"], tokens=256, chunk_size=128, cost=EAGER)


def main(scheme: str, paths) -> None:
    world = mx.distributed.init()
    groups = (world, None) if scheme == "pipeline" else (None, world)
    for i, path in enumerate(paths):
        out = {"rank": world.rank(), "model": path}
        if i == 0:
            try:
                sharded.sharded_load(path, *groups, offload="onnx", quiet=True)
                out["missing_error"] = None
            except OffloadError as e:
                out["missing_error"] = str(e)
            # another live process builds rank 1's bundle: both ranks fail at once, none hangs
            lock = Path(path) / f"npumoe-onnx-{'pp' if scheme == 'pipeline' else 'tp'}2-r1.lock"
            if world.rank() == 1:
                lock.write_text(str(os.getppid()))  # the launcher: alive
            try:
                sharded.sharded_load(path, *groups, offload="onnx", build=True, build_options=BUILD, quiet=True)
                out["locked_error"] = None
            except Exception as e:
                out["locked_error"] = f"{type(e).__name__}: {e}"
            lock.unlink(missing_ok=True)
        model, tok = sharded.sharded_load(path, *groups, offload="onnx", build=True, build_options=BUILD, quiet=True)
        shard = sharded.shard_of(model)
        out["shard"] = shard.key
        out["tokens"] = [r.token for r in stream_generate(model, tok, PROMPT, max_tokens=8, sampler=make_sampler(0.0))]
        out["stats"] = sharded.rank_stats(model)
        bundle = Path(path) / f"npumoe-onnx-{shard.key}"
        out["bundle"] = str(bundle)
        if i == 0:  # a second build=True load finds every bundle valid and builds nothing
            before = (bundle / "manifest.json").stat().st_mtime_ns
            time.sleep(0.01)
            sharded.sharded_load(path, *groups, offload="onnx", build=True, build_options=BUILD, quiet=True)
            out["rebuilt"] = (bundle / "manifest.json").stat().st_mtime_ns != before
            # rank 1 loses its bundle: build=True rebuilds only that one; rank 0 just follows the
            # calibration passes (its collectives must match rank 1's) and keeps its bundle
            if world.rank() == 1:
                shutil.rmtree(bundle)
            model, tok = sharded.sharded_load(path, *groups, offload="onnx", build=True, build_options=BUILD, quiet=True)
            out["rebuilt_alone"] = (bundle / "manifest.json").stat().st_mtime_ns != before
            out["tokens_after_rebuild"] = [
                r.token for r in stream_generate(model, tok, PROMPT, max_tokens=8, sampler=make_sampler(0.0))]
            sharded.settle()
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
