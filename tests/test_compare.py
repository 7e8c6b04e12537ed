"""`npumoe compare` and `npumoe bench e2e` on tiny models: files, keys, measured numbers, agreement."""

import json
import math
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from npumoe_mlx.build.build import build as build_bundle
from npumoe_mlx.bundle import bundle as bundles
from npumoe_mlx.tools import bench_e2e
from npumoe_mlx.tools import compare as cmp
from npumoe_mlx.tools.tiny import make_tiny_model

from conftest import EAGER

# Programs always win, so even short prompts (and decode) run through them.
SIDE_KEYS = ("ttft_s", "prefill_tps", "decode_tps", "cpu_s_per_token", "peak_mem_gb", "energy_j")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("cmp") / "m", "qwen3_moe", seed=3)


@pytest.fixture(scope="module")
def built(tiny):
    build_bundle(str(tiny), "onnx", corpus=["long-context"], tokens=192, chunk_size=96, cost=EAGER,
                  log=lambda m: None)
    return tiny


def _positive(v):
    return isinstance(v, (int, float)) and math.isfinite(v) and v > 0


def test_compare_writes_matching_measured_results(built, tmp_path):
    out = tmp_path / "out"
    r = cmp.compare(str(built), prompt_tokens=(40, 96), max_tokens=6, backend="onnx", out_dir=out,
                    prefill_step=64, log=lambda m: None)
    for name in ("compare.json", "compare.md", "compare.png"):
        assert (out / name).stat().st_size > 0, name
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp-")]
    data = json.loads((out / "compare.json").read_text())
    for k in ("offload", "stock", "token_agreement", "max_logit_diff_rel", "devices", "prompts", "placement",
              "model", "backend", "machine"):
        assert k in data, k
    assert data["backend"] == "onnx" and data["model"] == str(built)
    for side in ("offload", "stock"):
        for k in SIDE_KEYS[:-1]:
            assert _positive(data[side][k]), (side, k, data[side][k])
        e = data[side]["energy_j"]
        assert (e is None and data[side]["energy_note"]) or _positive(e)
    assert data["token_agreement"] == 1.0
    assert 0 <= data["max_logit_diff_rel"] <= 1e-4
    assert [p["prompt_tokens"] for p in data["prompts"]] == [40, 96]
    for p in data["prompts"]:
        assert p["token_agreement"] == 1.0 and p["first_divergence"] is None
        assert p["offload"]["tokens"] == p["stock"]["tokens"] and len(p["stock"]["tokens"]) >= 2
        assert p["offload"]["offload_stats"]["program_calls"] > 0
    if sys.platform.startswith("linux"):
        assert data["devices"]["offload"] == "ONNX Runtime CPU"
        assert data["devices"]["stock"] == "MLX CPU"
    lp = data["placement"]
    assert [l["layer"] for l in lp] == [l.layer for l in bundles.read(built / "npumoe-onnx").plan.layers]
    assert all(l["offloaded_calls"] > 0 and l["experts_on_programs"] + len(l["cold"]) == l["num_experts"] for l in lp)
    assert all(0 <= l["padding_pct"] < 100 and l["spill_pct"] >= 0 for l in lp)
    md = (out / "compare.md").read_text()
    assert "ONNX Runtime CPU" in md and "prefill tok/s" in md and r["token_agreement"] == 1.0


def test_compare_without_bundle_names_npumoe_build(tiny, tmp_path, capsys):
    other = make_tiny_model(tmp_path / "nob", "qwen3_moe", seed=4)
    with pytest.raises(cmp.CompareError, match="npumoe build --model"):
        cmp.compare(str(other), prompt_tokens=(16,), backend="onnx", out_dir=tmp_path / "o", log=lambda m: None)
    assert cmp.main(["--model", str(other), "--backend", "onnx", "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "npumoe build --model" in err[0] and "--build" in err[0]
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("bad", ["12,abc", "0", "-5", ","])
def test_bad_prompt_tokens_is_a_one_line_error(tiny, bad, capsys):
    assert cmp.main(["--model", str(tiny), f"--prompt-tokens={bad}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--prompt-tokens" in err[0]


def test_token_agreement_and_logit_diff():
    assert cmp.token_agreement([1, 2, 3, 4], [1, 2, 5, 4]) == (0.75, 2)
    assert cmp.token_agreement([1, 2], [1, 2, 3, 4]) == (0.5, 2)
    import numpy as np

    b = np.array([[1.0, -4.0]])
    assert cmp.max_logit_diff_rel(b + [[0.0, 0.4]], b) == pytest.approx(0.1)


def test_bench_e2e_rows(tmp_path, capsys):
    js, png = tmp_path / "e2e.json", tmp_path / "e2e.png"
    rc = bench_e2e.main(["e2e", "--shape", "qwen3_moe", "--prompt-tokens", "48,96", "--layers", "2",
                         "--q-bits", "4", "--max-tokens", "4", "--prefill-step", "64", "--calib-tokens", "128",
                         "--no-tune", "--json", str(js), "--plot", str(png)])
    assert rc == 0
    data = json.loads(js.read_text())
    assert png.stat().st_size > 0
    keys = ("shape", "prompt_tokens", "offload_prefill_tps", "stock_prefill_tps", "prefill_speedup",
            "offload_decode_tps", "stock_decode_tps", "token_agreement", "padding_pct", "program_calls")
    assert [r["prompt_tokens"] for r in data["rows"]] == [48, 96]
    for row in data["rows"]:
        assert all(k in row for k in keys)
        assert row["shape"] == "qwen3_moe"
        for k in keys[2:7]:
            assert _positive(row[k]), (k, row[k])
        assert row["prefill_speedup"] == pytest.approx(row["offload_prefill_tps"] / row["stock_prefill_tps"])
        assert 0 <= row["token_agreement"] <= 1 and row["program_calls"] >= 0
    assert data["dims"]["D"] == 64 and data["model"]["q_bits"] == 4
    assert "| qwen3_moe | 48 |" in capsys.readouterr().out


def test_bench_e2e_rejects_unknown_shape(capsys):
    assert bench_e2e.main(["--shape", "no-such-model"]) == 2
    assert "unknown --shape" in capsys.readouterr().err
