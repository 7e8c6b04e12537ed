"""`npumoe convert`: HF-layout and MLX sources -> MLX weights + bundle; generate finds it."""

import os
import re

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
from mlx_lm import load as stock_load

import npumoe_mlx
from npumoe_mlx.build.workloads import prompt_of_tokens
from npumoe_mlx.cli.convert import is_mlx_layout, main
from npumoe_mlx.runtime.executor import offload_stats, summarize
from npumoe_mlx.tools.tiny import make_tiny_model

from conftest import greedy


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("hf") / "m", "qwen3_moe", hf_layout=True, seed=6, skew=1.0)


@pytest.mark.parametrize("quant", [[], ["-q", "--q-bits", "4", "--q-group-size", "32"]], ids=["f32", "q4"])
def test_convert_hf_layout_then_generate(hf_model, tmp_path, quant, capsys):
    assert not is_mlx_layout(hf_model)
    out = tmp_path / "mlx"
    assert main(["--hf-path", str(hf_model), "--mlx-path", str(out), "--no-tune", "--tokens", "256", *quant]) == 0
    assert is_mlx_layout(out) and (out / "npumoe-onnx" / "manifest.json").is_file()
    printed = capsys.readouterr().out
    assert "bundle written to" in printed
    assert re.search(r"time per stage: load [\d.]+ s, calibrate [\d.]+ s, costs [\d.]+ s, plan [\d.]+ s, "
                     r"compile [\d.]+ s\n", printed)

    stock, tok = stock_load(str(out))
    ours, tok2 = npumoe_mlx.load(str(out), quiet=True)  # offload auto finds the bundle beside it
    ids = prompt_of_tokens(tok, 300, seed=2)
    assert greedy(ours, tok2, ids, 24) == greedy(stock, tok, ids, 24)
    assert summarize(offload_stats(ours))["offloaded_calls"] > 0


def test_convert_mlx_model_bundle_goes_where_build_puts_it_and_is_idempotent(tmp_path, monkeypatch, capsys):
    """Issue 24: `build` wrote beside the model, `convert --model` into the cache; one rule now."""
    from npumoe_mlx.bundle import bundle as bundle_rule

    monkeypatch.setenv("NPUMOE_CACHE", str(tmp_path / "cache"))
    model = make_tiny_model(tmp_path / "m", "mixtral", seed=8)
    args = ["--model", str(model), "--no-tune", "--tokens", "256"]
    assert main(args) == 0
    bundles = [model / "npumoe-onnx"]
    assert bundle_rule.build_target(model, "onnx") == bundles[0]  # where `npumoe build` writes
    assert (bundles[0] / "manifest.json").is_file() and not (tmp_path / "cache" / "bundles").exists()
    manifest = (bundles[0] / "manifest.json").read_text()
    inode = bundles[0].stat().st_ino
    capsys.readouterr()

    assert main(args) == 0  # second run: nothing to do
    assert "up to date; nothing to do" in capsys.readouterr().out
    assert (bundles[0] / "manifest.json").read_text() == manifest

    assert main(args + ["--force"]) == 0  # --force rebuilds
    assert "bundle written to" in capsys.readouterr().out
    assert bundles[0].stat().st_ino != inode  # a new folder was renamed into place

    ours, _ = npumoe_mlx.load(str(model), quiet=True)  # found where convert put it
    from npumoe_mlx.runtime.experts import installed_blocks

    assert installed_blocks(ours)

    assert main(args + ["--in-place"]) == 0  # the old flag still works: same place
    assert "up to date; nothing to do" in capsys.readouterr().out
    import shutil

    snap = tmp_path / "hub" / "snapshots" / "0123abc"  # a hub snapshot: the cache, for build and convert alike
    shutil.copytree(model, snap, ignore=shutil.ignore_patterns("npumoe-*"))
    assert main(["--model", str(snap), "--no-tune", "--tokens", "256"]) == 0
    cached = list((tmp_path / "cache" / "bundles").iterdir())
    assert cached == [bundle_rule.build_target(snap, "onnx")] and not (snap / "npumoe-onnx").exists()


def test_convert_python_api(tmp_path):
    model = make_tiny_model(tmp_path / "m", "olmoe", seed=9)
    out = npumoe_mlx.convert(str(model), in_place=True, tune=False, tokens=256)
    assert out == model and (model / "npumoe-onnx" / "manifest.json").is_file()
