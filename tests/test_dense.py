"""Dense programs (dense.py): non-expert linears on onnxruntime, decided by measured cost."""

import json
import os
import re

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm import load as stock_load

import npumoe_mlx
from npumoe_mlx.build.build import build as build_bundle
from npumoe_mlx.runtime import dense
from npumoe_mlx.tools.tiny import make_tiny_model

from conftest import copy_model

from conftest import EAGER, PROMPT, build, greedy

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _win(keys, mlx=(1.0, 1.0), prog=(0.1, 0.1)) -> dense.DenseCosts:
    """Injected costs: the program wins (or loses) at both row counts for every key."""
    return dense.DenseCosts({k: {"rows": [1, 128], "mlx_s": list(mlx), "program_s": list(prog)} for k in keys})


def _keys(model):
    return ({dense.shape_key(m) for _, m in dense.find_linears(model)}
            | {dense.shape_key(m) + "@head" for _, m in dense.find_heads(model)})


@pytest.mark.parametrize(
    "family,q_bits,bundle",
    [("qwen3_moe", 4, True), ("mixtral", None, False), ("olmoe", 8, False), ("deepseek_v3", 4, False)],
    ids=["qwen3-q4-bundle", "mixtral-f32", "olmoe-q8", "deepseek_v3-q4"],
)
def test_tokens_match_mlx_lm(tiny_models, tmp_path, family, q_bits, bundle):
    path = tiny_models(family, q_bits=q_bits, seed=3)  # test_parity's, shared
    if bundle:  # experts on programs too: a copy, its bundle where `npumoe build` puts it
        path = copy_model(path, tmp_path / "m")
        build(path, corpus=["long-context"])
    stock, tok = stock_load(str(path))
    want = greedy(stock, tok, n=12)
    ours, tok2 = npumoe_mlx.load(str(path), offload="onnx" if bundle else "auto", quiet=True,
                                 dense_programs=_win(_keys(stock)))
    assert greedy(ours, tok2, n=12) == want
    s = dense.summary(ours)
    # every non-expert linear but routers runs on a program, prefill and decode (lm_head: decode)
    assert s["linears"] == len(dense.find_linears(stock)) + len(dense.find_heads(stock)) > 0
    assert not s["fallbacks"]
    ex = dense.installed(ours)
    assert all(e.stats.offloaded == e.stats.calls > 0 for e in ex if e.max_rows is None)
    assert all(e.stats.offloaded > 0 for e in ex)  # lm_head: its decode calls
    if q_bits is None:
        ids = mx.array(tok.encode(PROMPT * 4)[:64])[None]
        a, b = np.array(ours(ids)), np.array(stock(ids))
        assert np.abs(a - b).max() / np.abs(b).max() <= 1e-4


def test_routers_and_lm_head_stay_on_mlx(tmp_path):
    path = make_tiny_model(tmp_path / "m", "qwen3_moe", q_bits=4, seed=1)
    model, _ = stock_load(str(path))
    found = [p for p, _ in dense.find_linears(model)]
    names = {p.rsplit(".", 1)[-1] for p in found}
    assert names == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert not any(p.endswith("mlp.gate") or p == "lm_head" for p in found)


def test_crossover_decisions():
    rows = [1, 128]
    assert dense.crossover(rows, [1.0, 10.0], [2.0, 20.0]) is None  # MLX wins everywhere
    assert dense.crossover(rows, [0.01, 1.0], [0.001, 2.0]) is None  # MLX wins at the large count
    assert dense.crossover(rows, [0.02, 6.0], [0.001, 0.05]) == 1  # program wins by far: decode too
    assert dense.crossover(rows, [0.02, 6.0], [0.015, 0.05]) == 2  # wins at 1 row, not by the decode margin
    # program slower at 1 row, faster at 128: the linear fits cross at 1 + 127 * 1 / (1 + 3) = 32.75
    assert dense.crossover(rows, [1.0, 5.0], [2.0, 2.0]) == 33
    head = lambda mlx, prog: dense.DenseCosts({"8x8/f32@head": {"rows": [1], "mlx_s": [mlx], "program_s": [prog]}})
    assert head(1.0, 0.1).min_rows("8x8/f32@head") == 1  # lm_head: 1-row win by the decode margin, or MLX
    assert head(1.0, 0.9).min_rows("8x8/f32@head") is None
    assert head(1.0, 2.0).min_rows("8x8/f32@head") is None


def test_cost_decision_keeps_mlx_winners(tmp_path):
    path = make_tiny_model(tmp_path / "m", "qwen3_moe", q_bits=4, seed=2)
    model, _ = stock_load(str(path))
    keys = sorted(_keys(model))
    assert keys == ["64x32/q4g32", "64x512/q4g32@head", "64x64/q4g32"]
    costs = dense.DenseCosts({
        "64x512/q4g32@head": {"rows": [1], "mlx_s": [1.0], "program_s": [0.9]},  # not by the decode margin
        "64x64/q4g32": {"rows": [1, 128], "mlx_s": [1.0, 5.0], "program_s": [2.0, 2.0]},  # programs from 33 rows
        "64x32/q4g32": {"rows": [1, 128], "mlx_s": [0.1, 1.0], "program_s": [0.2, 3.0]},  # MLX wins
    })
    got = dense.install(model, costs=costs, quiet=True)
    assert got == {"64x64/q4g32": 33, "64x32/q4g32": None, "64x512/q4g32@head": None}
    assert type(model.lm_head) is nn.QuantizedLinear
    for p, m in tree_flatten(model.leaf_modules(), is_leaf=lambda m: isinstance(m, nn.Module)):
        if p.endswith(("k_proj", "v_proj")):
            assert type(m) is nn.QuantizedLinear and "executor" not in m.__dict__
        elif p.endswith(("q_proj", "o_proj")):
            assert isinstance(m, nn.QuantizedLinear) and type(m) is not nn.QuantizedLinear
            assert m.executor.min_rows == 33
    ex = dense.installed(model)
    assert len(ex) == 4
    model(mx.array([[1, 2, 3, 4]]))  # 4 rows < 33: stays on MLX
    assert sum(e.stats.offloaded for e in ex) == 0
    model(mx.array([list(range(40))]))
    assert all(e.stats.offloaded == 1 for e in ex)


def test_costs_saved_beside_bundle_and_reused(tmp_path, monkeypatch):
    path = make_tiny_model(tmp_path / "m", "mixtral", seed=4)
    folder = tmp_path / "bundle"
    folder.mkdir()
    model, _ = stock_load(str(path))
    keys = _keys(model)
    dense.install(model, bundle=str(folder), quiet=True)  # measures this machine
    saved = json.loads((folder / dense.COSTS_FILE).read_text())
    assert saved["format"] == dense.FORMAT and set(saved["shapes"]) == keys == {"64x64/f32", "64x32/f32", "64x512/f32@head"}
    for k, c in saved["shapes"].items():  # lm_head: timed at 1 row only (decode)
        assert c["rows"] == (list(dense.ROWS[:1]) if k.endswith("@head") else list(dense.ROWS))
        assert len(c["mlx_s"]) == len(c["program_s"]) == len(c["rows"])

    def no_measure(*a, **k):
        raise AssertionError("costs were measured again")

    monkeypatch.setattr(dense, "measure", no_measure)
    again, _ = stock_load(str(path))
    first = dense.install(again, bundle=str(folder), quiet=True)
    assert first == {k: dense.DenseCosts(saved["shapes"]).min_rows(k) for k in saved["shapes"]}
    saved["host"] = "another-host"  # costs of another machine are measured afresh
    (folder / dense.COSTS_FILE).write_text(json.dumps(saved))
    with pytest.raises(AssertionError, match="measured again"):
        dense.install(stock_load(str(path))[0], bundle=str(folder), quiet=True)


def test_remove_restores_modules(tmp_path):
    path = make_tiny_model(tmp_path / "m", "mixtral", seed=5)
    model, _ = stock_load(str(path))
    ids = mx.array([list(range(20))])
    want = np.array(model(ids))
    before = {p: (type(m), id(m)) for p, m in model.named_modules()}
    params = {k: id(v) for k, v in tree_flatten(model.parameters())}
    npumoe_mlx.install(model, offload="auto", dense_programs=_win(_keys(model)), quiet=True)
    assert len(dense.installed(model)) == 9  # 8 attention projections and lm_head
    assert {k: id(v) for k, v in tree_flatten(model.parameters())} == params  # same parameters and keys
    assert npumoe_mlx.remove(model) == 9
    assert {p: (type(m), id(m)) for p, m in model.named_modules()} == before
    assert not dense.installed(model)
    assert np.array_equal(np.array(model(ids)), want)


def test_grad_and_compile_fall_back_to_mlx(tmp_path):
    path = make_tiny_model(tmp_path / "m", "mixtral", seed=6)
    stock, _ = stock_load(str(path))
    ours, _ = stock_load(str(path))
    dense.install(ours, costs=_win(_keys(ours)), quiet=True)
    ids = mx.array([list(range(24))])

    def loss(m):
        return m(ids).astype(mx.float32).square().mean()

    l1, g1 = nn.value_and_grad(stock, lambda: loss(stock))()
    l2, g2 = nn.value_and_grad(ours, lambda: loss(ours))()
    assert sum(e.stats.offloaded for e in dense.installed(ours)) > 0  # the forward ran the programs
    assert abs(l1.item() - l2.item()) <= 1e-5 * abs(l1.item())
    a, b = dict(tree_flatten(g1)), dict(tree_flatten(g2))
    assert a.keys() == b.keys()
    for k in a:
        assert np.allclose(np.array(a[k]), np.array(b[k]), rtol=1e-3, atol=1e-6), k
    n = sum(e.stats.offloaded for e in dense.installed(ours))
    y = mx.compile(lambda x: ours(x))(ids)  # compile refuses host reads: the call runs stock MLX
    assert sum(e.stats.offloaded for e in dense.installed(ours)) == n
    assert np.allclose(np.array(y), np.array(stock(ids)), rtol=1e-5, atol=1e-5)


def test_program_fault_falls_back(tmp_path, capfd):
    path = make_tiny_model(tmp_path / "m", "mixtral", seed=7)
    stock, _ = stock_load(str(path))
    ours, _ = stock_load(str(path))
    dense.install(ours, costs=_win(_keys(ours)), quiet=True)
    ex = dense.installed(ours)[0]

    def broken(x):
        raise RuntimeError("session lost")

    ex.program = type("P", (), {"__call__": lambda self, x: broken(x), "out": ex.program.out, "nbytes": 0})()
    ids = mx.array([list(range(16))])
    assert np.allclose(np.array(ours(ids)), np.array(stock(ids)), rtol=1e-4, atol=1e-5)
    assert ex.disabled and "session lost" in ex.stats.fallback
    assert "falls back to MLX" in capfd.readouterr().err
    assert dense.summary(ours)["fallbacks"] == {ex.stats.path: ex.stats.fallback}


def test_onnx_only(tmp_path):
    with pytest.raises(dense.DenseError, match="onnx backend only.*Core ML"):
        dense.check_mode("coreml")
    with pytest.raises(dense.DenseError, match="not with --offload off"):
        dense.check_mode("off")
    path = make_tiny_model(tmp_path / "m", "mixtral", seed=8)
    with pytest.raises(ValueError, match="not with --offload mlx"):
        npumoe_mlx.load(str(path), offload="mlx", dense_programs=True)


def test_generate_cli_flag(tmp_path, capsys):
    from npumoe_mlx import cli

    path = make_tiny_model(tmp_path / "m", "mixtral", seed=9)
    assert cli.main(["generate", "--model", str(path), "--prompt", PROMPT, "--max-tokens", "3",
                     "--dense-programs", "--stats"]) == 0
    out = capsys.readouterr()
    assert re.search(r"dense programs: \d+ linears, \d+ of \d+ calls on onnxruntime", out.out)  # --stats (measured costs)
    assert "dense programs:" in out.err and "of 9 linears on onnxruntime" in out.err
    assert cli.main(["generate", "--model", str(path), "--prompt", "hi", "--offload", "off", "--dense-programs"]) == 1
    assert "runs on the onnx backend only, not with --offload off" in capsys.readouterr().err


def test_rebuild_replaces_saved_costs(tmp_path):
    """dense-costs.json is part of the bundle folder: a rebuild replaces it (costs measured afresh)."""
    path = make_tiny_model(tmp_path / "m", "qwen3_moe", q_bits=4, seed=10)
    out = build_bundle(str(path), "onnx", corpus=["long-context"], tokens=128, chunk_size=128, cost=EAGER,
                       log=lambda m: None)
    model, _ = npumoe_mlx.load(str(path), offload="onnx", quiet=True, dense_programs=True)
    assert (out / dense.COSTS_FILE).is_file()
    assert build_bundle(str(path), "onnx", corpus=["long-context"], tokens=128, chunk_size=128, cost=EAGER,
                        log=lambda m: None) == out
    assert (out / "manifest.json").is_file() and not (out / dense.COSTS_FILE).exists()


def test_lm_head_runs_programs_only_at_decode(tmp_path):
    path = make_tiny_model(tmp_path / "m", "mixtral", seed=11)
    stock, tok = stock_load(str(path))
    ours, _ = stock_load(str(path))
    got = dense.install(ours, costs=_win(_keys(ours)), quiet=True)
    assert got["64x512/f32@head"] == 1
    ex = ours.lm_head.executor
    assert ex.max_rows == dense.HEAD_ROWS
    h = mx.random.normal((1, dense.HEAD_ROWS + 1, 64), key=mx.random.key(0))
    ours.lm_head(h)  # a prefill chunk: stays on MLX (lazy: never evaluated by mlx_lm)
    assert ex.stats.offloaded == 0
    one = h[:, :1]
    assert np.allclose(np.array(ours.lm_head(one)), np.array(stock.lm_head(one)), rtol=1e-5, atol=1e-5)
    assert ex.stats.offloaded == 1
    assert greedy(ours, tok, n=12) == greedy(stock, tok, n=12)
