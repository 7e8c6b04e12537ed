"""`npumoe doctor`: the machine, the backends, a model's bundle and plan, memory, costs (issue 12)."""

import json
import os
import shutil
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
from mlx.utils import tree_flatten
from mlx_lm import load as stock_load

from npumoe_mlx import cli
from npumoe_mlx.backends.registry import default_cost
from npumoe_mlx.bundle import bundle as bundles
from npumoe_mlx.bundle.fingerprint import model_fingerprint
from npumoe_mlx.cli import doctor
from npumoe_mlx.tools.tiny import make_tiny_model

from conftest import EAGER

# Programs always win, and absurdly so: the benchmark must call this cost model wrong.


def _doctor(capsys, tmp_path, *argv, rc=None):
    out = tmp_path / "doctor.json"
    got = cli.main(["doctor", *argv, "--json", str(out)])
    cap = capsys.readouterr()
    report = json.loads(out.read_text())
    assert got == (1 if report["problems"] else 0), cap.err  # exit status 1 when it lists a problem
    assert rc is None or got == rc, cap.err
    return report, cap.out


def _problem(report, text):
    hits = [p for p in report["problems"] if text in p["problem"]]
    assert len(hits) == 1, report["problems"]
    return hits[0]


def test_machine_backends_model_bundle_plan_memory_and_bench(eager_moe, capsys, tmp_path):
    r, screen = _doctor(capsys, tmp_path, "--model", str(eager_moe))
    m = r["machine"]
    assert m["cpus"] == os.cpu_count() and m["memory_bytes"] > 1e9 and m["chip"] and m["os"]
    assert r["backends"]["onnx"]["can_run"] and "CPUExecutionProvider" in r["backends"]["onnx"]["providers"]
    assert r["backends"]["mlx"]["can_run"]
    if sys.platform != "darwin":
        assert not r["backends"]["coreml"]["can_run"]
        assert "run only on macOS" in r["backends"]["coreml"]["why_not"]
        assert r["offload_auto"] == r["backend"] == "onnx" and m["chip_profile"] is None
    mo = r["model"]
    stock, _ = stock_load(str(eager_moe))
    assert mo["bytes"] == sum(v.nbytes for _, v in tree_flatten(stock.parameters()))
    assert [(b["layer"], b["experts"], b["top_k"], b["D"], b["H"], b["supported"]) for b in mo["blocks"]] == [
        (0, 8, 2, 64, 64, True), (1, 8, 2, 64, 64, True)]
    assert mo["expert_bytes"] == sum(b["bytes"] for b in mo["blocks"]) == 2 * 3 * 8 * 64 * 64 * 4
    b = mo["bundles"]["onnx"]
    assert b["exists"] and b["current"] and b["path"] == str(eager_moe / "npumoe-onnx")
    assert b["fingerprint"] == model_fingerprint(eager_moe) and b["format"] == bundles.BUNDLE_FORMAT
    plan = bundles.read(eager_moe / "npumoe-onnx").plan
    assert b["plan"]["programs"] == plan.num_programs == b["programs"]
    for lp, row in zip(plan.layers, b["plan"]["layers"]):
        assert row["on_programs"] == sum(len(g.experts) for g in lp.groups) and row["on_mlx"] == len(lp.cold)
        assert row["on_programs"] + row["on_mlx"] == 8 and row["min_tokens"] == lp.min_tokens
    assert "coreml" not in mo["bundles"]  # only the bundles that exist, plus the backend asked for
    mem = mo["memory"]
    assert mem["fits"] and mem["total_bytes"] == mem["model_bytes"] + mem["program_bytes"] > mem["model_bytes"]
    # the micro-benchmark: every unit that runs here, predicted by the bundle's own (absurd) cost model
    bench = {x["unit"]: x for x in r["bench"]}
    assert set(bench) == ({"mlx", "onnx", "coreml"} if sys.platform == "darwin" else {"mlx", "onnx"})
    assert bench["onnx"]["predicted_s"] == pytest.approx(EAGER.program_s(4, 64, 64, 64))
    assert bench["mlx"]["predicted_s"] == pytest.approx(EAGER.mlx_s(256, 64, 64))
    assert all(x["measured_s"] > 0 and x["cost_source"] == EAGER.source for x in bench.values())
    for unit in ("mlx", "onnx"):
        p = _problem(r, f"{unit}: measured")
        assert "the cost model is off by" in p["problem"]
        assert p["fix"] == f"npumoe build --model {eager_moe} --backend onnx --force"
    assert "bundle onnx: " in screen and f": current (format {bundles.BUNDLE_FORMAT}" in screen and "memory: model" in screen
    assert "fix: npumoe build --model" in screen


def test_without_bundle_says_how_to_build_it(eager_moe, capsys, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(eager_moe, bare, ignore=shutil.ignore_patterns("npumoe-*"))
    r, screen = _doctor(capsys, tmp_path, "--model", str(bare))
    b = r["model"]["bundles"]["onnx"]
    assert b == {"backend": "onnx", "path": str(bare / "npumoe-onnx"), "exists": False}
    p = _problem(r, "no onnx bundle for this model")
    assert p["fix"] == f"npumoe build --model {bare} --backend onnx"
    assert r["model"]["memory"]["program_bytes"] == 0 and r["model"]["memory"]["fits"]
    # no bundle: the parametric costs are the ones in use
    onnx = next(x for x in r["bench"] if x["unit"] == "onnx")
    assert onnx["cost_source"] == "parametric"
    assert onnx["predicted_s"] == pytest.approx(default_cost("onnx").program_s(4, 64, 64, 64))
    assert "bundle onnx: none" in screen


def test_stale_bundle_is_reported_with_its_fix(eager_moe, capsys, tmp_path):
    other = make_tiny_model(tmp_path / "other", "qwen3_moe", seed=7)  # same shapes, other weights
    shutil.copytree(eager_moe / "npumoe-onnx", other / "npumoe-onnx")
    r, screen = _doctor(capsys, tmp_path, "--model", str(other), "--no-bench", rc=1)  # a bundle loads refuse
    b = r["model"]["bundles"]["onnx"]
    assert b["exists"] and b["current"] is False and "built for other weights" in b["problem"]
    p = _problem(r, "onnx bundle is not usable")
    assert "model fingerprint differs" in p["problem"]
    assert p["fix"] == f"npumoe build --model {other} --backend onnx --force"
    assert r["bench"] == [] and "NOT CURRENT" in screen


def test_exit_status_says_whether_problems_were_found(eager_moe, capsys, tmp_path):
    """Issue 24: doctor exited 0 while listing problems."""
    bare = tmp_path / "bare"
    shutil.copytree(eager_moe, bare, ignore=shutil.ignore_patterns("npumoe-*"))
    assert cli.main(["doctor", "--model", str(bare), "--no-bench"]) == 1
    assert "problems (1):" in capsys.readouterr().out
    assert cli.main(["doctor", "--no-bench"]) == 0
    assert "no problems found" in capsys.readouterr().out


def test_without_model(capsys, tmp_path):
    r, screen = _doctor(capsys, tmp_path, "--no-bench")
    assert r["model"] is None and r["bench"] == [] and r["backends"]["onnx"]["can_run"]
    assert screen.startswith("npumoe 0.1.0 doctor\nmachine: ")


def test_json_written_atomically(eager_moe, capsys, tmp_path, monkeypatch):
    out = tmp_path / "report.json"
    out.write_text('{"old": true}')
    real = doctor.run
    monkeypatch.setattr(doctor, "run", lambda *a, **kw: {**real(*a, **kw), "zz_unserializable": object()})
    rc = cli.main(["doctor", "--no-bench", "--json", str(out)])
    assert rc == 1 and "is not JSON serializable" in capsys.readouterr().err
    assert json.loads(out.read_text()) == {"old": True}  # the old file, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]  # no temp file left behind


def test_bad_model_one_line_error(tmp_path, capsys):
    rc = cli.main(["doctor", "--model", str(tmp_path / "nope")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1
    assert err[0].startswith(f"npumoe doctor: error: no such model folder {tmp_path / 'nope'}")
    assert err[0].endswith("(rerun with --debug for details)")


def test_model_and_programs_that_do_not_fit(eager_moe, monkeypatch):
    monkeypatch.setattr(doctor, "memory_bytes", lambda: 1_000_000)  # a 1 MB machine
    r = doctor.run(str(eager_moe), run_bench=False)
    mem = r["model"]["memory"]
    assert mem["budget_bytes"] == int(doctor.MEMORY_HEADROOM * 1_000_000) < mem["total_bytes"] and not mem["fits"]
    p = _problem(r, "programs")
    assert "exceed the 0.8 MB this machine (1.0 MB) can hold" in p["problem"]
    assert p["fix"].startswith(f"npumoe build --model {eager_moe} --backend onnx --force --max-programs ")
    assert "DOES NOT FIT" in doctor.format_report(r)
    monkeypatch.setattr(doctor, "memory_bytes", lambda: 30_000_000)
    assert doctor.run(str(eager_moe), run_bench=False)["model"]["memory"]["fits"]
