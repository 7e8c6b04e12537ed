"""CLI parity with mlx_lm.generate, `npumoe info`, and clear errors."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from npumoe_mlx.tools.tiny import make_tiny_model

from conftest import run_cli

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
    """`mlx_lm generate ...` in its own interpreter, started now: ``finish()`` -> its stdout."""
    p = subprocess.Popen([sys.executable, "-m", "mlx_lm", "generate", *args], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=ENV)

    def finish():
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        return out

    return finish


def _npumoe(*args, check=True):
    assert NPUMOE, "the npumoe console script is not installed (pip install -e .)"
    return run(NPUMOE, *args, check=check)


def _ours(capsys, *args):
    """`npumoe ...` in this process (the stock side is the subprocess): its stdout."""
    rc, out, err = run_cli(capsys, *args)
    assert rc == 0, err
    return out


def test_generate_offload_off_is_byte_identical(model, capsys):
    args = ("--model", model, "--prompt", "hello world", "--max-tokens", "24", "--verbose", "False")
    stock = _stock(*args)  # both interpreters run beside this one's
    as_module = subprocess.Popen([sys.executable, "-m", "npumoe_mlx.cli.generate", *args, "--offload", "mlx"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    off = _ours(capsys, "generate", *args, "--offload", "off")
    # the static-tier reference on MLX gives the same text too; so does `python -m`
    mlx = _ours(capsys, "generate", *args, "--offload", "mlx")
    want = stock()
    assert want.strip()
    assert off == want
    assert mlx == want
    out, err = as_module.communicate(timeout=300)
    assert as_module.returncode == 0, err
    assert out == want


def test_generate_verbose_format_matches(model, capsys):
    args = ("--model", model, "--prompt", "the fox", "--max-tokens", "16", "--temp", "0.0")
    numbers = re.compile(r"\d+\.\d+")
    stock = _stock(*args)
    got = numbers.sub("N", _ours(capsys, "generate", *args, "--offload", "off"))
    want = numbers.sub("N", stock())
    assert got == want
    assert "==========" in got and "Generation: 16 tokens" in got


def test_generate_help_has_every_mlx_lm_flag():
    stock = run(sys.executable, "-m", "mlx_lm", "generate", "--help").stdout
    ours = _npumoe("generate", "--help").stdout
    flags = set(re.findall(r"(--[a-z][a-z0-9-]+)", stock))
    assert flags and flags <= set(re.findall(r"(--[a-z][a-z0-9-]+)", ours))
    assert "--offload" in ours


def test_generate_without_bundle_and_bad_mode_fail_clearly(model, capsys):
    rc, _, err = run_cli(capsys, "generate", "--model", model, "--offload", "onnx")
    assert rc != 0
    assert err.strip().count("\n") == 0
    assert "no onnx bundle for this model" in err and "npumoe build --model" in err
    with pytest.raises(SystemExit) as e:  # argparse's exit, as the console script exits
        run_cli(capsys, "generate", "--model", model, "--offload", "gpu")
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_info_table_and_json(model, tmp_path, capsys):
    out = tmp_path / "seam.json"
    text = _ours(capsys, "info", "--model", model, "--json", str(out))
    assert "MoE layers: 2" in text
    assert "model.layers.0.mlp.switch_mlp" in text and "shared_expert(H=" in text
    d = json.loads(out.read_text())
    assert [b["layer"] for b in d["blocks"]] == [0, 1]
    b = d["blocks"][0]
    assert b["activation"] == "swiglu" and b["supported"] is True
    assert b["shared"] and b["shared"][0]["path"].endswith("mlp.shared_expert")


def test_missing_model_is_one_line_error(tmp_path):
    """Through the console script: its exit code and stderr are what a shell sees."""
    p = _npumoe("info", "--model", str(tmp_path / "nope"), check=False)
    assert p.returncode != 0
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("npumoe info: error:")
