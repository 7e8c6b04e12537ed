"""`npumoe chat`: mlx_lm.chat with the offload — same flags, same loop, same tokens."""

import os
import re
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from npumoe_mlx import chat
from npumoe_mlx.build import build as build_bundle
from npumoe_mlx.cost import CostModel
from npumoe_mlx.tools.tiny import make_tiny_model

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200",
       "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
EAGER = CostModel("onnx", 1e-9, 1e15, 1e15, 0.0, 1.0, 1.0, first_offload_tokens=1, source="test: offload everything")
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]|[\x01\x02]")


def _chat(cmd, turns):
    """The conversation as the user sees it, minus the speed figures (they differ run to run)."""
    r = subprocess.run(cmd, input="".join(t + "\n" for t in turns), capture_output=True, text=True, env=ENV,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    lines = ANSI.sub("", r.stdout).splitlines()
    return [l for l in lines if "tok/s" not in l], r.stderr


def test_chat_has_every_mlx_lm_chat_flag():
    stock = {a for act in chat._stock_arg_parser()._actions for a in act.option_strings}
    ours = {a for act in chat.setup_arg_parser()._actions for a in act.option_strings}
    assert stock <= ours
    assert {"--offload", "--bundle", "--overflow", "--keep-mlx-experts", "--verify", "--stats"} <= ours


def test_chat_tokens_equal_mlx_lm_chat_and_run_programs(tmp_path):
    path = make_tiny_model(tmp_path / "m", "qwen3_moe", seed=1)
    build_bundle(str(path), "onnx", corpus=["qa"], tokens=256, chunk_size=128, cost=EAGER, log=lambda m: None)
    turns = ["The quick brown fox jumps over the lazy dog.", "h", "And then?", "r", "Once more", "q"]
    flags = ["--model", str(path), "--max-tokens", "12", "--system-prompt", "Be brief."]
    want, _ = _chat([sys.executable, "-m", "mlx_lm", "chat", *flags], turns)
    got, _ = _chat([sys.executable, "-m", "npumoe_mlx.cli", "chat", *flags, "--offload", "onnx", "--stats"], turns)
    stats = got[len(want):]  # --stats: printed after the chat, like `npumoe generate --stats`
    assert got[:len(want)] == want
    assert sum(1 for l in want if l.strip() and "tokens" not in l) > 5  # three replies, help, reset, bye
    ran = re.search(r"(\d+)/(\d+) MoE layer calls ran programs", "\n".join(stats))
    assert ran and int(ran.group(1)) > 0, stats  # the experts really ran on programs


def test_chat_bad_flags_one_line(tmp_path, capsys):
    from npumoe_mlx import cli

    assert cli.main(["chat", "--model", str(tmp_path / "nope"), "--max-tokens", "0"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--max-tokens must be an integer >= 1" in err[0]
