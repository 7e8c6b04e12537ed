"""CLI parity with mlx_lm.generate, `npumoe info`, and clear errors."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from npumoe_mlx.tools.tiny import make_tiny_model

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
NPUMOE = shutil.which("npumoe", path=os.path.dirname(sys.executable)) or shutil.which("npumoe")


def run(*cmd, check=True):
    p = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    if check and p.returncode != 0:
        raise AssertionError(f"{cmd} failed ({p.returncode}):\n{p.stderr}")
    return p


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return str(make_tiny_model(tmp_path_factory.mktemp("cli") / "m", "qwen2_moe", seed=5))


def _stock(*args):
    return run(sys.executable, "-m", "mlx_lm", "generate", *args)


def _npumoe(*args, check=True):
    assert NPUMOE, "the npumoe console script is not installed (pip install -e .)"
    return run(NPUMOE, *args, check=check)


def test_generate_offload_off_is_byte_identical(model):
    args = ("--model", model, "--prompt", "hello world", "--max-tokens", "24", "--verbose", "False")
    want = _stock(*args).stdout
    assert want.strip()
    assert _npumoe("generate", *args, "--offload", "off").stdout == want
    # the static-tier reference on MLX gives the same text too; so does `python -m`
    assert _npumoe("generate", *args, "--offload", "mlx").stdout == want
    assert run(sys.executable, "-m", "npumoe_mlx.generate", *args, "--offload", "mlx").stdout == want


def test_generate_verbose_format_matches(model):
    args = ("--model", model, "--prompt", "the fox", "--max-tokens", "16", "--temp", "0.0")
    numbers = re.compile(r"\d+\.\d+")
    want = numbers.sub("N", _stock(*args).stdout)
    got = numbers.sub("N", _npumoe("generate", *args, "--offload", "off").stdout)
    assert got == want
    assert "==========" in got and "Generation: 16 tokens" in got


def test_generate_help_has_every_mlx_lm_flag():
    stock = run(sys.executable, "-m", "mlx_lm", "generate", "--help").stdout
    ours = _npumoe("generate", "--help").stdout
    flags = set(re.findall(r"(--[a-z][a-z0-9-]+)", stock))
    assert flags and flags <= set(re.findall(r"(--[a-z][a-z0-9-]+)", ours))
    assert "--offload" in ours


def test_generate_without_bundle_and_bad_mode_fail_clearly(model):
    p = _npumoe("generate", "--model", model, "--offload", "onnx", check=False)
    assert p.returncode != 0
    assert p.stderr.strip().count("\n") == 0
    assert "no onnx bundle for this model" in p.stderr and "npumoe build --model" in p.stderr
    p = _npumoe("generate", "--model", model, "--offload", "gpu", check=False)
    assert p.returncode == 2 and "invalid choice" in p.stderr


def test_info_table_and_json(model, tmp_path):
    out = tmp_path / "seam.json"
    p = _npumoe("info", "--model", model, "--json", str(out))
    assert "MoE layers: 2" in p.stdout
    assert "model.layers.0.mlp.switch_mlp" in p.stdout and "shared_expert(H=" in p.stdout
    d = json.loads(out.read_text())
    assert [b["layer"] for b in d["blocks"]] == [0, 1]
    b = d["blocks"][0]
    assert b["activation"] == "swiglu" and b["supported"] is True
    assert b["shared"] and b["shared"][0]["path"].endswith("mlp.shared_expert")


def test_missing_model_is_one_line_error(tmp_path):
    p = _npumoe("info", "--model", str(tmp_path / "nope"), check=False)
    assert p.returncode != 0
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("npumoe info: error:")
