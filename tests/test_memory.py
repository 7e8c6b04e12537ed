"""Memory mechanics of the onnx path (issue 15, peak RSS target): what a process that runs
programs imports, keeps per run, and hands back to the OS. Each RSS check runs in a fresh
subprocess and compares growth against a bound far from both the fixed and the old
behaviour (measured numbers in the comments), never against timings."""

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import onnx
import pytest

from ane_kernels import onnx_wire
from ane_kernels.onnx import ROWS, dynamic_bytes, graph_info, make_dynamic, read_metadata, graph_tier, save_onnx
from ane_kernels.spec import random_spec
from npumoe_mlx.backends import BackendError
from npumoe_mlx.backends import onnx as onnx_backend
from npumoe_mlx.build.build import build as build_bundle
from npumoe_mlx.planning.cost import CostModel
from npumoe_mlx.runtime import heap, release
from npumoe_mlx.tools.tiny import make_tiny_model

ROOT = Path(__file__).resolve().parents[1]
LINUX = sys.platform.startswith("linux")


def _python(code: str) -> dict:
    """Run ``code`` in a fresh interpreter with this tree first on the path; it prints one JSON line."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


ANON = '''
def anon():
    kb, name = 0, ""
    for line in open("/proc/self/smaps"):
        head = line.split(" ", 1)[0]
        if "-" in head and all(c in "0123456789abcdef-" for c in head):
            parts = line.split()
            name = parts[5] if len(parts) > 5 else ""
        elif line.startswith("Rss:") and (not name or name.startswith("[")):
            kb += int(line.split()[1])
    return kb * 1024
'''


# --- graphs read without the onnx package ------------------------------------------------


@pytest.mark.parametrize("bits", [None, 4, 8])
def test_graph_bytes_read_and_made_dynamic_as_onnx_does(tmp_path, bits):
    """graph_info / dynamic_bytes (protobuf wire level) give what onnx's read_metadata,
    graph_tier and make_dynamic give, byte for byte."""
    spec = random_spec(G=2, D=64, H=32, tiers=(8, 40), bits=bits, group_size=32, bias=bits == 8)
    for tier, path in save_onnx(spec, tmp_path).items():
        data = path.read_bytes()
        m = onnx.load(str(path), load_external_data=False)
        assert graph_info(data) == (read_metadata(m), graph_tier(m)) == (spec.describe(), tier)
        assert dynamic_bytes(data) == make_dynamic(m).SerializeToString()
        dims = onnx_wire.value_dims(dynamic_bytes(data), "y")
        assert dims == [("value", 2), ("param", ROWS), ("value", 64)]


def test_graph_bytes_errors(tmp_path):
    spec = random_spec(G=1, D=32, H=16, tiers=(8,))
    path = save_onnx(spec, tmp_path)[8]
    m = onnx.load(str(path), load_external_data=False)
    del m.metadata_props[:]
    with pytest.raises(ValueError, match="not an npumoe expert program"):
        graph_info(m.SerializeToString())
    with pytest.raises(ValueError, match="fixed tier"):
        graph_info(dynamic_bytes(path.read_bytes()))
    with pytest.raises(onnx_wire.WireError):
        graph_info(b"\x0a\xff\xff\xff")  # a length past the end
    bad = tmp_path / "bad.c8.onnx"
    bad.write_bytes(b"\x0a\xff\xff\xff")
    with pytest.raises(BackendError, match="bad.c8.onnx"):
        onnx_backend.Backend().load(str(bad))


@pytest.fixture(scope="module")
def q4_model(tmp_path_factory):
    path = make_tiny_model(tmp_path_factory.mktemp("mem") / "q4", "qwen3_moe", seed=1, q_bits=4)
    eager = CostModel("onnx", 1e-9, 1e15, 1e15, 0.0, 1.0, 1.0, first_offload_tokens=2, source="test: programs win")
    build_bundle(str(path), "onnx", corpus=["qa"], tokens=256, chunk_size=128, cost=eager, log=lambda m: None)
    return path


def test_running_programs_imports_no_onnx(q4_model):
    """Loading an onnx bundle and generating imports onnxruntime, never the onnx package
    (protobuf) or coremltools: ~8 MB of RSS in every process that only runs programs."""
    got = _python(f'''
import json, sys
import npumoe_mlx
model, tok = npumoe_mlx.load({str(q4_model)!r}, offload="onnx", quiet=True, verify=True)
text = npumoe_mlx.generate(model, tok, "The quick brown fox jumps over the lazy dog. " * 3, max_tokens=4)
ran = npumoe_mlx.stats(model)["total"]["program_calls"]
print(json.dumps({{"ran": ran, "modules": sorted({{m.split(".")[0] for m in sys.modules}})}}))
''')
    assert got["ran"] > 0  # programs really ran
    assert "onnxruntime" in got["modules"]
    assert not {"onnx", "google", "coremltools"} & set(got["modules"])


# --- per-run state ----------------------------------------------------------------------


@pytest.mark.skipif(not LINUX, reason="reads /proc/self/smaps")
def test_program_runs_keep_nothing_per_tier():
    """Runs at many row counts keep nothing per tier. An onnxruntime IO binding kept per
    tier kept its last input alive (measured: 200 tiers of 100-300 rows grew anon RSS by
    ~41 MB, every tier's input); with a fresh binding per run, < 2 MB."""
    got = _python(ANON + '''
import json
import numpy as np
from ane_kernels.spec import random_spec
from npumoe_mlx.backends.onnx import Backend
prog = Backend().load(random_spec(G=1, D=256, H=512, tiers=(512,), seed=0))
prog.add_tiers(range(1, 512))
rng = np.random.default_rng(0)
for t in range(500, 300, -1):  # warm: onnxruntime's per-shape state and arena
    prog.run(rng.random((1, t, 256), np.float32), t)
a0 = anon()
for t in range(300, 100, -1):
    prog.run(rng.random((1, t, 256), np.float32), t)
print(json.dumps({"grew": anon() - a0}))
''')
    assert got["grew"] < 10e6, got


# --- freed heap back to the OS --------------------------------------------------------------


@pytest.mark.skipif(not LINUX, reason="glibc malloc_trim")
def test_heap_trim_returns_freed_heap_pages():
    """After a large free raises glibc's mmap threshold, freed MB-sized blocks stay in the
    heap (RSS does not drop) until heap.trim() hands them back."""
    got = _python(ANON + '''
import ctypes, json
from npumoe_mlx.runtime import heap
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
big = libc.malloc(16 << 20); ctypes.memset(big, 1, 16 << 20); libc.free(big)  # threshold -> 16 MB
blocks = [libc.malloc(1 << 20) for _ in range(96)]
for b in blocks: ctypes.memset(b, 1, 1 << 20)
keep = libc.malloc(1 << 20); ctypes.memset(keep, 1, 1 << 20)  # pins the heap top
for b in blocks: libc.free(b)
before = anon()
ok = heap.trim()
print(json.dumps({"ok": ok, "freed": before - anon()}))
''')
    assert got["ok"] and got["freed"] > 64e6, got


def test_release_and_compare_trim_the_heap(monkeypatch, q4_model):
    """release_model (after freeing MLX's experts) trims the heap; so does compare between sides."""
    import mlx_lm

    from npumoe_mlx.runtime.experts import installed_blocks
    from npumoe_mlx.tools import compare

    calls = []
    monkeypatch.setattr(heap, "trim", lambda: calls.append(1) or True)
    model, tok = mlx_lm.load(str(q4_model))
    import npumoe_mlx
    npumoe_mlx.install(model, offload="onnx", model_path=str(q4_model), quiet=True)
    released = [m for m in installed_blocks(model) if release.record_of(m) is not None]
    assert released and calls, "a release happened and trimmed the heap"
    calls.clear()
    compare.measure_side(str(q4_model), "off", [("p", [1, 2, 3, 4])], max_tokens=2, logit_prompt=None,
                         log=lambda m: None)
    assert calls


def test_load_checks_programs_without_keeping_the_experts(monkeypatch, q4_model):
    """``load`` reads a releasing model lazily; checking programs against its experts must not
    leave their stacked arrays evaluated until the release (the old load's RSS peak held every
    checked layer's experts: MLX active memory at the release was >= their bytes)."""
    import mlx.core as mx

    import npumoe_mlx
    from npumoe_mlx.runtime import installer
    from npumoe_mlx.runtime.experts import installed_blocks
    from mlx.utils import tree_flatten

    seen = {}
    real = installer.release_model

    def spy(model, path, blocks, log=None):
        seen["active"] = mx.get_active_memory()
        seen["experts"] = sum(v.nbytes for m, _, _ in blocks.values() for _, v in tree_flatten(m.parameters()))
        return real(model, path, blocks, log)

    monkeypatch.setattr(installer, "release_model", spy)
    gc.collect()
    mx.clear_cache()
    base = mx.get_active_memory()  # arrays other tests of this process still hold
    model, tok = npumoe_mlx.load(str(q4_model), offload="onnx", quiet=True, verify=True)  # every program checked
    assert seen["experts"] > 0 and any(installed_blocks(model))
    assert seen["active"] - base < seen["experts"] / 2, (seen, base)
