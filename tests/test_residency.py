"""Resident bytes per unit and the build's memory budget (bundle format 2: one copy per program)."""

import os

import pytest

from npumoe_mlx import cli
from npumoe_mlx.bundle import bundle as bundles
from npumoe_mlx.tools.tiny import make_tiny_model

from conftest import build

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def q4(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("res") / "m", "qwen3_moe", q_bits=4, seed=3)


def _build(model, out, **kw):
    logs = []
    build(model, out, tokens=128, chunk_size=64, log=logs.append, **kw)
    return logs


def test_bundle_holds_the_offloaded_experts_quantized_bytes_once(q4, tmp_path):
    """Every program's tiers share one weight file, and that file is the experts' MLX
    quantized bytes (codes, scales, biases): the bundle is ~1.0x what it offloads."""
    logs = _build(q4, tmp_path / "b", memory_budget=None)
    assert any("resident: MLX" in l and "+ programs" in l for l in logs)
    weights = sum(p.stat().st_size for p in (tmp_path / "b").rglob("*.weights"))
    assert weights > 0
    man = bundles.read(tmp_path / "b")
    from mlx_lm.utils import load

    from npumoe_mlx.runtime.experts import find_expert_blocks
    from npumoe_mlx.planning.residency import plan_resident

    model, _, config = load(str(q4), return_config=True)
    blocks = {b.layer: b for b in find_expert_blocks(model, config) if b.supported}
    res = plan_resident(man.plan, model, blocks)
    assert res["programs"] == pytest.approx(weights, rel=0.01)  # graphs: a few KB each, on top
    assert res["total"] == res["mlx"] + res["programs"] and sum(res["per_layer"].values()) == res["programs"]


def test_memory_budget_refuses_a_plan_that_does_not_fit(q4, tmp_path, capsys):
    with pytest.raises(ValueError, match=r"needs .* MB resident .* over the memory budget of 0.00 MB"):
        _build(q4, tmp_path / "b", memory_budget=1000)
    assert not (tmp_path / "b").exists()  # refused before compiling anything
    rc = cli.main(["build", "--model", str(q4), "--out", str(tmp_path / "c"), "--no-tune", "--tokens", "64",
                   "--memory-budget", "0.000001"])
    err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("npumoe build: error:")]
    assert rc == 1 and len(err) == 1 and "over the memory budget" in err[0] and "--memory-budget" in err[0]
    assert not (tmp_path / "c" / "manifest.json").exists()
    rc = cli.main(["build", "--model", str(q4), "--out", str(tmp_path / "c"), "--memory-budget", "-1"])
    assert rc == 1 and "--memory-budget must be a number of GB >= 0" in capsys.readouterr().err
