"""The public offload API for models built elsewhere: install, remove, stats (issue 9 item 7, issue 14 item 3)."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
from mlx_lm import load as stock_load

import npumoe_mlx
from npumoe_mlx.runtime.executor import format_stats, offload_stats, summarize
from npumoe_mlx.runtime.experts import OffloadedSwitchGLU, installed_blocks
from npumoe_mlx.runtime.offload import OffloadError

from conftest import greedy



@pytest.fixture(scope="module")
def want(eager_qwen2):
    model, tok = stock_load(str(eager_qwen2))
    return greedy(model, tok)


def test_install_on_mlx_lm_model_then_remove(eager_qwen2, want):
    model, tok = stock_load(str(eager_qwen2))  # built elsewhere: plain mlx_lm
    assert npumoe_mlx.stats(model) == {"layers": [], "total": npumoe_mlx.stats(model)["total"]}
    assert npumoe_mlx.stats(model)["total"]["offloaded_calls"] == 0
    assert npumoe_mlx.install(model, "onnx", model_path=str(eager_qwen2), quiet=True) == "onnx"
    n_blocks = len(installed_blocks(model))
    assert n_blocks == 2
    assert greedy(model, tok) == want
    st = npumoe_mlx.stats(model)
    json.dumps(st)  # JSON-ready, as the server serves it
    routed = [l for l in st["layers"] if l["kind"] == "routed"]
    shared = [l for l in st["layers"] if l["kind"] == "shared"]
    assert [l["layer"] for l in routed] == [0, 1] and [l["layer"] for l in shared] == [0, 1]
    for l in st["layers"]:
        assert l["offloaded"] == l["calls"] > 0 and l["program_calls"] >= l["offloaded"]
        assert l["padding_pct"] == pytest.approx(100.0 * l["padded"] / l["slots"])
        assert l["fallback"] == ""
    assert all(l["spill_pct"] == pytest.approx(100.0 * l["spilled"] / l["pairs"]) for l in routed)
    # the totals are what `npumoe generate --stats` prints
    total = summarize(offload_stats(model))
    assert st["total"]["program_calls"] == total["program_calls"] == sum(l["program_calls"] for l in st["layers"])
    assert format_stats(total).startswith(f"offload: {total['offloaded_calls']}/{total['layer_calls']} MoE layer calls")

    # installing again replaces (fresh counters, same blocks), never stacks
    assert npumoe_mlx.install(model, "onnx", model_path=str(eager_qwen2), quiet=True) == "onnx"
    assert len(installed_blocks(model)) == n_blocks
    assert npumoe_mlx.stats(model)["total"]["layer_calls"] == 0

    assert npumoe_mlx.remove(model) == 4  # 2 routed blocks + 2 shared experts
    assert not any(isinstance(m, OffloadedSwitchGLU) for _, m in model.named_modules())
    assert npumoe_mlx.stats(model)["layers"] == []
    assert greedy(model, tok) == want
    assert npumoe_mlx.remove(model) == 0


def test_install_with_bundle_only_and_config_from_the_model(eager_qwen2, want):
    model, tok = stock_load(str(eager_qwen2))
    # no model_path: the bundle is named, the config comes from model.args
    assert npumoe_mlx.install(model, "onnx", bundle=str(eager_qwen2 / "npumoe-onnx"), quiet=True) == "onnx"
    assert greedy(model, tok) == want
    assert npumoe_mlx.stats(model)["total"]["offloaded_calls"] > 0


def test_install_modes_and_errors(eager_qwen2, capsys):
    model, _ = stock_load(str(eager_qwen2))
    # nothing says where the bundle is: auto stays on stock MLX and says so; onnx is an error
    capsys.readouterr()
    assert npumoe_mlx.install(model, "auto") == "off"
    assert "offload auto: no onnx bundle for this model; experts run on stock MLX" in capsys.readouterr().err
    with pytest.raises(OffloadError, match=r"no onnx bundle for this model; build it with `npumoe build"):
        npumoe_mlx.install(model, "onnx")
    with pytest.raises(OffloadError, match="unknown offload mode 'gpu'"):
        npumoe_mlx.install(model, "gpu")
    with pytest.raises(ValueError, match="unknown overflow 'sometimes'"):
        npumoe_mlx.install(model, "onnx", model_path=str(eager_qwen2), overflow="sometimes")
    assert npumoe_mlx.stats(model)["layers"] == []  # failed installs leave the model stock
    assert npumoe_mlx.install(model, "mlx", model_path=str(eager_qwen2), quiet=True) == "mlx"
    assert len(installed_blocks(model)) == 2
    assert npumoe_mlx.install(model, "auto", model_path=str(eager_qwen2), quiet=True) == "onnx"  # auto = onnx on Linux
    assert npumoe_mlx.stats(model)["layers"]
    assert npumoe_mlx.install(model, "off", model_path=str(eager_qwen2)) == "off"  # off takes the offload away
    assert installed_blocks(model) == [] and npumoe_mlx.stats(model)["layers"] == []
