"""Backends and the mlx_lm bridge: programs equal a real SwitchGLU; build-programs CLI."""

import json
import os
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.models.activations import SwigluOAI
from mlx_lm.models.switch_layers import SwitchGLU

from ane_kernels.milrun import rel_err
from ane_kernels.onnx import save_onnx
from ane_kernels.spec import random_spec, reference_ffn
from npumoe_mlx.backends import BackendError, load_backend, pick_tier
from npumoe_mlx.backends import coreml as coreml_backend
from npumoe_mlx.build.programs import main as build_programs
from npumoe_mlx.build.programs import spec_from_dense_mlp, spec_from_switch_glu

os.environ.setdefault("HF_HUB_OFFLINE", "1")

D, H, E, K, N = 64, 32, 8, 2, 24
GROUP = (1, 3, 4, 6)


def _switch_glu(case):
    mx.random.seed(11)
    oai = case.startswith("oai")
    if case.startswith("geglu"):
        from mlx_lm.models.gemma4_text import GeGLU

        m = SwitchGLU(D, H, E, activation=GeGLU())
    else:
        m = SwitchGLU(D, H, E, activation=SwigluOAI(), bias=True) if oai else SwitchGLU(D, H, E)
    if oai:  # SwitchLinear starts with zero biases; make them matter
        for lin in (m.gate_proj, m.up_proj, m.down_proj):
            lin.bias = mx.random.normal(lin.bias.shape) * 0.5
    bits = {"q4": 4, "q8": 8}.get(case.split("_")[-1])
    if bits:
        nn.quantize(m, group_size=32, bits=bits)
    mx.eval(m.parameters())
    return m


def _routed(module, scale=1.0):
    """Run the module on random tokens; per group expert, its rows and the module's outputs."""
    x = mx.random.normal((N, D), key=mx.random.key(5)) * scale
    inds = mx.random.randint(0, E, (N, K), key=mx.random.key(6)).astype(mx.uint32)
    y = np.array(module(x, inds))  # (N, K, D)
    xs, inds = np.array(x), np.array(inds)
    rows = [np.argwhere(inds == e) for e in GROUP]  # (n_e, 2): token, slot
    C = max(len(r) for r in rows)
    X = np.zeros((len(GROUP), C, D), np.float32)
    for g, r in enumerate(rows):
        X[g, : len(r)] = xs[r[:, 0]]
    return X, rows, y


def _check_rows(Y, rows, y, tol):
    for g, r in enumerate(rows):
        got, want = Y[g, : len(r)], y[r[:, 0], r[:, 1]]
        assert rel_err(got, want) < tol, (g, rel_err(got, want))


CASES = ("float", "q4", "q8", "oai_float", "oai_q4", "geglu_float")
ACT = {"oai": "swiglu_oai", "geglu": "geglu"}


@pytest.mark.parametrize("case", CASES)
def test_spec_and_backends_equal_switch_glu(case):
    module = _switch_glu(case)
    spec = spec_from_switch_glu(module, layer=3, expert_ids=GROUP, tiers=(32,))
    assert spec.activation == ACT.get(case.split("_")[0], "swiglu")
    assert spec.has_bias == case.startswith("oai")
    assert spec.quantized == (not case.endswith("float"))
    X, rows, y = _routed(module, scale=4.0 if case.startswith("oai") else 1.0)
    _check_rows(reference_ffn(spec, X), rows, y, 1e-5)
    _check_rows(load_backend("mlx").load(spec).run(X), rows, y, 1e-5)
    _check_rows(load_backend("onnx", threads=1).load(spec).run(X), rows, y, 1e-5)


@pytest.mark.parametrize("bits", (None, 4))
def test_shared_expert_mlp(bits):
    from mlx_lm.models.qwen2_moe import MLP

    mx.random.seed(2)
    mlp = MLP(D, 96)
    if bits:
        nn.quantize(mlp, group_size=32, bits=bits)
    spec = spec_from_dense_mlp(mlp, layer=0, tiers=(32,))
    assert (spec.G, spec.H, spec.expert_ids) == (1, 96, (-1,))
    x = mx.random.normal((20, D), key=mx.random.key(1))
    want = np.array(mlp(x))
    got = load_backend("onnx").load(spec).run(np.array(x)[None])[0]
    assert rel_err(got, want) < 1e-5
    assert rel_err(reference_ffn(spec, np.array(x)[None])[0], want) < 1e-5


def test_oai_clamps_are_exercised():
    module = _switch_glu("oai_float")
    spec = spec_from_switch_glu(module, layer=0, expert_ids=GROUP, tiers=(32,))
    X, _, _ = _routed(module, scale=4.0)
    from ane_kernels.spec import dequantize

    gate = X @ dequantize(spec.gate).transpose(0, 2, 1) + spec.gate_bias[:, None]
    assert (gate > spec.limit).any()


def test_unknown_activation_and_bad_ids():
    m = SwitchGLU(D, H, E, activation=nn.ReLU())
    with pytest.raises(ValueError, match="unsupported SwitchGLU activation ReLU"):
        spec_from_switch_glu(m, layer=0, expert_ids=(0,), tiers=(32,))
    with pytest.raises(ValueError, match="must be distinct and in 0..7"):
        spec_from_switch_glu(_switch_glu("float"), layer=0, expert_ids=(0, 8), tiers=(32,))


def test_onnx_backend_sources_padding_and_threads(tmp_path):
    spec = random_spec(G=2, D=64, H=32, tiers=(32, 64), bits=4, seed=2)
    paths = save_onnx(spec, tmp_path)
    backend = load_backend("onnx", providers=["CPUExecutionProvider"], threads=1)
    x = np.random.default_rng(0).standard_normal((2, 40, 64)).astype(np.float32)
    ref = reference_ffn(spec, x)
    for src in (paths, tmp_path, tmp_path / spec.name, list(paths.values())):
        prog = backend.load(src)
        assert prog.tiers == (32, 64) and (prog.G, prog.D) == (2, 64)
        assert rel_err(prog.run(x), ref) < 1e-5  # 40 rows -> tier 64, padded, cropped
    y1 = prog.run(x[:, :32], 32)
    assert rel_err(y1, ref[:, :32]) < 1e-5
    with pytest.raises(ValueError, match="exceed"):
        prog.run(np.zeros((2, 65, 64), np.float32))
    with pytest.raises(ValueError, match="tier 48 not in"):
        prog.run(x[:, :32], 48)
    with pytest.raises(BackendError, match="no .onnx programs"):
        backend.load(tmp_path / "nothing")
    assert pick_tier((32, 64, 128), 33) == 64


@pytest.mark.skipif(sys.platform == "darwin", reason="checks the off-macOS error")
def test_coreml_backend_off_macos_raises_clearly():
    with pytest.raises(BackendError, match="Core ML programs can be built here but run only on macOS"):
        load_backend("coreml")


@pytest.mark.skipif(
    not coreml_backend.available(),
    reason="Core ML programs can be built here but run only on macOS 15+ (Apple Silicon); this test loads "
    "a Qwen3-30B-A3B-shape group (D=2048, H=768, 4 experts, 4-bit) big enough for Core ML to place on the "
    "Neural Engine and requires MLComputePlan to show every op of every tier function there",
)
def test_coreml_backend_runs_on_ane(tmp_path):
    # Tiny programs (D=128) are placed on the CPU (aosama/astronomical #540; larql #312: reduction
    # depth); a real expert shape is what the NE must take.
    spec = random_spec(G=4, D=2048, H=768, tiers=(64, 256), bits=4, group_size=64, seed=3)
    backend = load_backend("coreml", cache=str(tmp_path / "cache"))  # check_placement on: refuses off-NE ops
    entry = backend.build(spec, tmp_path)
    prog = backend.load(entry, tmp_path)
    x = np.random.default_rng(0).standard_normal((4, 256, 2048)).astype(np.float32)
    assert rel_err(prog.run(x, 256), reference_ffn(spec, x)) < 2e-2  # int8-channel, the default format
    assert backend.compile(tmp_path / entry["package"]) == prog.compiled  # compiled once, cached


# ---- npumoe build-programs ----


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    tiny = pytest.importorskip("npumoe_mlx.tools.tiny")
    return tiny.make_tiny_model(tmp_path_factory.mktemp("m") / "qwen3q4", "qwen3_moe", q_bits=4)


def test_build_programs_cli(tiny_model, tmp_path, capsys):
    base = ["--model", str(tiny_model), "--layer", "1", "--experts", "0,2,5", "--tiers", "32,64"]
    assert build_programs(base + ["--format", "onnx", "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "layer1_e0-2-5.c32.onnx" in out and "rel err" in out
    assert len(list((tmp_path / "o").glob("*.onnx"))) == 2

    assert build_programs(base + ["--format", "coreml", "--out", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    assert "ANE static checks: passed" in out and "function c64" in out
    assert "weight format int8-channel: max relative error" in out  # the default Core ML format
    assert (tmp_path / "c" / "layer1_e0-2-5.mlpackage").is_dir()

    assert build_programs(base + ["--format", "coreml", "--weight-format", "palette", "--out", str(tmp_path / "p")]) == 0
    assert "weight format palette: max relative error" in capsys.readouterr().out
    assert build_programs(base + ["--format", "onnx", "--weight-format", "palette", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert "--weight-format sets how Core ML programs store weights" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize(
    "args, msg",
    [
        (["--layer", "9", "--experts", "0"], "layer 9 has no SwitchGLU experts"),
        (["--layer", "0", "--experts", "0,99"], "must be distinct"),
        (["--layer", "0", "--experts", "0", "--tiers", "48"], "not a multiple of 32"),
    ],
)
def test_build_programs_cli_bad_input(tiny_model, tmp_path, capsys, args, msg):
    argv = ["--model", str(tiny_model), "--format", "coreml", "--out", str(tmp_path)] + args
    assert build_programs(argv) == 2
    err = capsys.readouterr().err.strip()
    assert msg in err and len(err.splitlines()) == 1


def test_build_programs_cli_missing_model(tmp_path, capsys):
    argv = ["--model", str(tmp_path / "none"), "--layer", "0", "--experts", "0", "--out", str(tmp_path)]
    assert build_programs(argv) == 2
    assert "no model at" in capsys.readouterr().err


def test_onnx_one_session_per_program_on_dynamic_providers(tmp_path):
    """CPU: one session (one resident copy of the weights) serves every tier of a
    program, from disk and in memory; static mode (NPU/Core ML providers) one per tier."""
    spec = random_spec(G=2, D=64, H=32, tiers=(8, 32, 64), bits=8, seed=4)
    paths = save_onnx(spec, tmp_path)
    x = np.random.default_rng(0).standard_normal((2, 64, 64)).astype(np.float32)
    ref = reference_ffn(spec, x)
    assert load_backend("onnx").dynamic and not load_backend("onnx", providers=["QNNExecutionProvider"]).dynamic
    for src in (paths, spec):
        for shapes, n_sessions in (("auto", 1), ("static", 3)):
            prog = load_backend("onnx", shapes=shapes, threads=1).load(src)
            for t in prog.tiers:
                assert rel_err(prog.run(x[:, :t], t), ref[:, :t]) < 3e-6
            assert len({id(s) for s in prog.sessions.values()}) == n_sessions
            assert prog.dynamic == (n_sessions == 1)
            # each tier keeps its own output buffer even when the session is shared
            y8, y32 = prog.run(x[:, :8], 8), prog.run(x[:, :32], 32)
            assert rel_err(y8, ref[:, :8]) < 3e-6 and y32.shape == (2, 32, 64)
    with pytest.raises(ValueError, match="shapes must be one of"):
        load_backend("onnx", shapes="ragged")


def test_bench_layer_reports_one_row_call_and_pairs_on_mlx():
    """bench layer on a small shape: exact vs stock, the 1-row call measured against dense
    float32, and pairs left on MLX = 100% when a call stays on MLX."""
    from npumoe_mlx.tools.bench_layer import bench_shape, format_table

    shape = {"hidden": 64, "expert_intermediate": 64, "experts": 8, "top_k": 2}
    rows = bench_shape("tiny", shape, [1, 64], q_bits=4, repeats=1, log=lambda *_: None)
    assert [r["tokens"] for r in rows] == [1, 64]
    for r in rows:
        assert r["max_rel_err"] < 1e-5
        assert r["one_row_program_ms"] > 0 and r["one_row_dense_ms"] > 0
        assert r["one_row_ratio"] == pytest.approx(r["one_row_program_ms"] / r["one_row_dense_ms"])
        assert r["mlx_pairs_pct"] == (r["spill_pct"] if r["offloaded"] else 100.0)
    assert "pairs on MLX %" in format_table(rows)


# ---- one build/load interface for every backend ----


@pytest.mark.parametrize("name", ["onnx", "mlx"])
def test_build_then_load_from_the_entry(name, tmp_path):
    """Backend.build writes the program's files and returns a JSON entry (its files and
    metadata); load(entry, folder) runs the same FFN as the spec; the files can be renamed
    away from the program's name (identity is metadata, never parsed from a name)."""
    from npumoe_mlx.backends import backend_class

    spec = random_spec(G=2, D=64, H=32, tiers=(8, 32), bits=4, seed=5)
    entry = backend_class(name).build(spec, tmp_path)
    assert json.loads(json.dumps(entry)) == entry  # a manifest keeps it as is
    assert sorted(entry["files"]) == sorted(p.name for p in tmp_path.iterdir())
    assert (entry["name"], entry["layer"], entry["expert_ids"], entry["tiers"]) == (spec.name, spec.layer, [0, 1], [8, 32])
    x = np.random.default_rng(1).standard_normal((2, 32, 64)).astype(np.float32)
    prog = load_backend(name).load(entry, tmp_path)
    assert (prog.name, prog.G, prog.D, prog.tiers) == (spec.name, 2, 64, (8, 32))
    assert prog.meta["expert_ids"] == [0, 1] and prog.meta["layer"] == spec.layer
    assert rel_err(prog.run(x), reference_ffn(spec, x)) < 1e-5
    checked, tiers = backend_class(name).checker(entry, tmp_path)
    assert tiers == [8, 32] and rel_err(checked.run(x[:, :8], 8), reference_ffn(spec, x[:, :8])) < 1e-5

    moved = tmp_path / "moved"
    moved.mkdir()
    if name == "onnx":  # the graphs find their weight file by its own name
        renamed = {k: f"tier{k}.onnx" for k in entry["graphs"]}
        for k, f in entry["graphs"].items():
            (tmp_path / f).rename(moved / renamed[k])
        (tmp_path / f"{spec.name}.weights").rename(moved / f"{spec.name}.weights")
        loose = moved
        entry = {**entry, "graphs": renamed}
    else:
        (tmp_path / entry["weights"]).rename(moved / "w.safetensors")
        loose = moved / "w.safetensors"
        entry = {**entry, "weights": "w.safetensors"}
    for prog in (load_backend(name).load(entry, moved), load_backend(name).load(loose)):
        assert prog.name == spec.name and prog.meta["expert_ids"] == [0, 1]
        assert rel_err(prog.run(x), reference_ffn(spec, x)) < 1e-5


@pytest.mark.parametrize("name", ["onnx", "mlx"])
def test_load_refuses_files_of_another_program_or_outside_the_folder(name, tmp_path):
    from npumoe_mlx.backends import backend_class

    build = backend_class(name).build
    a = build(random_spec(G=2, D=64, H=32, tiers=(8,), bits=4, seed=5), tmp_path)
    other = random_spec(G=2, D=64, H=32, tiers=(8,), bits=4, seed=6)
    other.expert_ids = (3, 4)
    b = build(other, tmp_path)
    key = "graphs" if name == "onnx" else "weights"
    with pytest.raises(BackendError, match=r"holds program layer0_e3-4 \(expert_ids \[3, 4\]\), the entry names layer0_e0-1"):
        load_backend(name).load({**a, key: b[key]}, tmp_path)
    bad = {"8": "../x.onnx"} if name == "onnx" else "../w.safetensors"
    with pytest.raises(BackendError, match="is not a plain name inside"):
        load_backend(name).load({**a, key: bad}, tmp_path)


def test_coreml_build_and_check_off_macos(tmp_path):
    """Core ML programs build anywhere; the checker runs them in the numpy MIL interpreter."""
    from npumoe_mlx.backends import backend_class

    coreml = backend_class("coreml")
    spec = random_spec(G=2, D=64, H=32, tiers=(32, 64), bits=4, seed=7)
    entry = coreml.build(spec, tmp_path)
    assert entry["files"] == [f"{spec.name}.mlpackage"] == [p.name for p in tmp_path.iterdir()]
    assert entry["functions"] == {"32": "c32", "64": "c64"} and json.loads(json.dumps(entry)) == entry
    prog, tiers = coreml.checker(entry, tmp_path)
    assert tiers == [32] and (prog.name, prog.G, prog.D, prog.tiers) == (spec.name, 2, 64, (32, 64))
    x = np.random.default_rng(2).standard_normal((2, 32, 64)).astype(np.float32)
    assert rel_err(prog.run(x, 32), reference_ffn(spec, x)) < 1e-2
    other = random_spec(G=2, D=64, H=32, tiers=(32,), bits=4, seed=8)
    other.expert_ids = (5, 6)
    b = coreml.build(other, tmp_path)
    with pytest.raises(BackendError, match="holds program layer0_e5-6"):
        coreml.checker({**entry, "package": b["package"]}, tmp_path)
    if sys.platform != "darwin":
        with pytest.raises(BackendError, match="run only on macOS"):
            load_backend("coreml")
