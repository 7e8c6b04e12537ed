"""Reliability, round two (issue 11): never delete a user's files, never use the wrong
model or bundle, verify programs against the model, errors that say what is wrong."""

import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

import npumoe_mlx
from npumoe_mlx import bundle as bundles
from npumoe_mlx import cli
from npumoe_mlx.cost import CostModel
from npumoe_mlx.tiny import make_tiny_model

REPO = Path(__file__).resolve().parents[1]
EAGER = CostModel("onnx", 1e-9, 1e15, 1e15, 0.0, 1.0, 1.0, source="test: offload everything")


def _build(path, out=None, tokens=256, **kw):
    return bundles.build(str(path), "onnx", None if out is None else str(out), corpus=["qa"], tokens=tokens,
                         chunk_size=128, cost=EAGER, log=lambda m: None, **kw)


def _run_cli(capsys, *argv):
    rc = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _tree(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    """A float32 tiny qwen3_moe with an onnx bundle beside it (every call offloaded)."""
    path = make_tiny_model(tmp_path_factory.mktemp("r2") / "m", "qwen3_moe", seed=1)
    _build(path)
    return path


# --- 1. data loss --------------------------------------------------------------


def test_tiny_model_never_deletes_user_files(tmp_path, capsys):
    x = tmp_path / "X"
    assert _run_cli(capsys, "tiny-model", "--family", "qwen3_moe", "--out", x)[0] == 0
    (x / "npumoe-onnx").mkdir()
    (x / "npumoe-onnx" / "manifest.json").write_text("{}")
    (x / "notes.txt").write_text("mine")
    before = _tree(x)
    rc, out, err = _run_cli(capsys, "tiny-model", "--family", "mixtral", "--out", x)
    assert rc == 2 and _tree(x) == before  # refused, nothing changed
    assert re.search(r"holds files npumoe tiny-model did not write \(notes\.txt, npumoe-onnx\); nothing was "
                     r"changed: pass --force", err)
    rc, out, err = _run_cli(capsys, "tiny-model", "--family", "mixtral", "--out", x, "--force")
    assert rc == 0, err
    assert json.loads((x / "config.json").read_text())["model_type"] == "mixtral"
    assert (x / "notes.txt").read_text() == "mine" and (x / "npumoe-onnx" / "manifest.json").read_text() == "{}"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left
    # a folder the factory did not write is refused even with --force
    y = tmp_path / "Y"
    y.mkdir()
    (y / "config.json").write_text("{}")
    rc, _, err = _run_cli(capsys, "tiny-model", "--family", "mixtral", "--out", y, "--force")
    assert rc == 2 and "was not written by npumoe tiny-model (no npumoe_tiny.json)" in err
    assert (y / "config.json").read_text() == "{}"


def test_demo_rerun_keeps_user_files(tmp_path, capsys):
    from npumoe_mlx.demo import main

    d = tmp_path / "D"
    args = ["--out", str(d), "--small", "--prompt-tokens", "64", "--max-tokens", "2", "--layers", "1"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "random weights" in printed and "gibberish" in printed  # says the model is random
    (d / "model" / "notes.txt").write_text("mine")
    (d / "notes.txt").write_text("mine too")
    before = _tree(d)
    rc, _, err = _run_cli(capsys, "demo", *args)
    assert rc == 1 and _tree(d) == before
    assert "holds files npumoe demo did not write (model/notes.txt, notes.txt)" in err
    assert main(args + ["--force"]) == 0
    assert (d / "model" / "notes.txt").read_text() == "mine" and (d / "notes.txt").read_text() == "mine too"
    assert (d / "model" / "npumoe-onnx" / "manifest.json").is_file()
    # a folder the demo did not write is refused
    e = tmp_path / "E"
    e.mkdir()
    (e / "thesis.tex").write_text("x")
    rc, _, err = _run_cli(capsys, "demo", "--out", e, "--small")
    assert rc == 1 and "was not written by npumoe demo (no npumoe_demo.json)" in err


def test_build_out_never_replaces_a_non_bundle_folder(moe, tmp_path, capsys):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "thesis.tex").write_text("x")
    rc, _, err = _run_cli(capsys, "build", "--model", moe, "--out", docs, "--no-tune", "--tokens", "64", "--force")
    assert rc == 1 and "is not an npumoe bundle folder (it holds thesis.tex)" in err
    assert (docs / "thesis.tex").read_text() == "x"


def test_created_files_honour_umask(tmp_path):
    old = os.umask(0o022)
    try:
        m = make_tiny_model(tmp_path / "m", "mixtral")
        b = _build(m, tokens=64)
    finally:
        os.umask(old)
    assert stat.S_IMODE(m.stat().st_mode) == 0o755
    assert stat.S_IMODE(b.stat().st_mode) == 0o755
    assert stat.S_IMODE((b / "manifest.json").stat().st_mode) == 0o644
