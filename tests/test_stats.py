"""Adapt to the user's workload: per-call loads saved, a re-plan from them, a run-time notice."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import mlx.core as mx
import numpy as np

import npumoe_mlx
from npumoe_mlx.build.build import build as build_bundle
from npumoe_mlx.build.calibrate import Profile
from npumoe_mlx.build.workloads import prompt_of_tokens
from npumoe_mlx.cli import plan_cli
from npumoe_mlx.planning import plan as plans
from npumoe_mlx.planning.cost import CostModel
from npumoe_mlx.runtime.executor import OffloadExecutor, offload_stats, stats_profile, summarize
from npumoe_mlx.runtime.experts import find_expert_blocks, installed_blocks

from conftest import EAGER, build, copy_model



def _served(path, bundle, tokens, stats):
    """Load ``path`` with ``bundle``, run one ``tokens``-token prompt (it must overflow the plan),
    save the per-call loads to ``stats``: (model, prompt ids)."""
    model, tok = npumoe_mlx.load(str(path), offload="onnx", bundle=str(bundle), quiet=True)
    ids = mx.array(prompt_of_tokens(tok, tokens, seed=3))[None]
    mx.eval(model(ids))
    assert summarize(offload_stats(model))["overflow_pct"] > 5
    stats_profile(model, "qwen3_moe").save(stats)
    return model, ids


def test_overflow_notice_stats_file_and_replan(tight_skewed, tmp_path, capsys):
    path, out = tight_skewed  # a plan made for tiny calls: 300-token prompts overflow it
    model, tok = npumoe_mlx.load(str(path), offload="onnx", bundle=str(out), quiet=True)
    notes = []
    for m in installed_blocks(model):
        m.executor.notice = notes.append
    ids = mx.array(prompt_of_tokens(tok, 300, seed=3))[None]
    mx.eval(model(ids))
    s = summarize(offload_stats(model))
    assert s["overflow_pct"] > 5 and len(notes) >= 1
    assert "overflow their group's top tier" in notes[0] and "npumoe plan --from-stats" in notes[0]
    assert "npumoe convert --hf-path M --refresh FILE" in notes[0]  # issue 10 item 5's refresh command
    assert "npumoe build --model M --from-stats FILE" in notes[0]
    mx.eval(model(ids))
    over = [m.executor.plan.layer for m in installed_blocks(model) if m.executor.stats.overflow]
    assert len(over) > 1 and len(notes) == 1  # once per model: not per call, not per layer

    f = tmp_path / "stats.json"
    stats_profile(model, "qwen3_moe").save(f)
    prof = Profile.load(f)
    execs = [m.executor for m in installed_blocks(model) if isinstance(m.executor, OffloadExecutor)]
    assert [l.layer for l in prof.layers] == [e.plan.layer for e in execs]
    assert all([c["tokens"] for c in l.chunks] == [300, 300] for l in prof.layers)

    # re-planned for this workload: the new top tiers hold the calls that overflowed
    blocks = {b.layer: b for b in find_expert_blocks(model)}
    plan = plans.make_plan(prof, blocks, EAGER, plans.PlanLimits.for_backend("onnx"))
    for lp, ex in zip(plan.layers, execs):
        for n, k, counts in ex.loads:
            assert sum(int(np.maximum(counts[g.experts] - g.tiers[-1], 0).sum()) for g in lp.groups) == 0

    assert plan_cli.main(["--model", str(path), "--from-stats", str(f), "--backend", "onnx"]) == 0
    assert "tiers" in capsys.readouterr().out


def test_build_from_stats_resizes_the_bundle(tight_copy, tmp_path, capsys):
    """`npumoe build --from-stats FILE`: the saved per-call loads replace the calibration's for the
    layers they cover, and the rebuilt bundle no longer overflows on that workload."""
    from npumoe_mlx import cli

    path, out = tight_copy()  # rebuilt below: this test's own copy
    f = tmp_path / "stats.json"
    _, ids = _served(path, out, 300, f)
    cost = tmp_path / "eager.json"
    EAGER.save(str(cost))
    rc = cli.main(["build", "--model", str(path), "--out", str(out), "--cost", str(cost), "--corpus", "qa",
                   "--tokens", "256", "--chunk-size", "128", "--from-stats", str(f)])
    assert rc == 0, capsys.readouterr().err
    assert "re-sizing layers [0, 1] for the saved workload" in capsys.readouterr().out
    saved = Profile.load(out / "profile.json")  # the plan was made from the workload's calls
    assert [[c["tokens"] for c in l.chunks] for l in saved.layers] == [[300], [300]]
    again, _ = npumoe_mlx.load(str(path), offload="onnx", bundle=str(out), quiet=True)
    mx.eval(again(ids))
    s = summarize(offload_stats(again))
    assert s["offloaded_calls"] > 0 and s["overflow_pct"] == 0
    rc = cli.main(["build", "--model", str(path), "--out", str(out), "--from-stats", str(tmp_path / "nope.json")])
    assert rc == 1 and "nope.json" in capsys.readouterr().err


def test_convert_refresh_resizes_a_converted_models_bundle(tight_skewed, tmp_path, capsys):
    """`npumoe convert --refresh STATS` (= `npumoe build --from-stats STATS` for a converted model):
    a bad stats file fails with its name before anything changes; a good one rebuilds the bundle
    with ladders sized for the saved calls, planned with the costs the bundle already had."""
    from npumoe_mlx import cli
    from npumoe_mlx.planning.plan import Plan

    path = copy_model(tight_skewed[0], tmp_path / "m", bundles=False)
    out = build(path, path / "npumoe-onnx")  # where `convert --in-place` keeps an MLX model's bundle
    before = Plan.load(out / "plan.json")
    # calls far larger than the calibration's: 128-token chunks, batched calls of up to 4 x 128 (issue 23)
    f = tmp_path / "stats.json"
    _, ids = _served(path, out, 1200, f)
    common = ["convert", "--hf-path", str(path), "--in-place", "--backend", "onnx", "--tokens", "256",
              "--chunk-size", "128"]

    bad = tmp_path / "bad.json"
    bad.write_text('{"kind": "something else"}')
    manifest = (out / "manifest.json").read_bytes()
    for stats, why in ((bad, "not a valid npumoe profile"), (tmp_path / "nope.json", "cannot read profile")):
        rc = cli.main([*common, "--refresh", str(stats)])
        err = capsys.readouterr().err
        assert rc == 1 and str(stats) in err and why in err, err
    assert (out / "manifest.json").read_bytes() == manifest  # untouched

    rc = cli.main([*common, "--refresh", str(f)])  # no --no-tune: the bundle's cost.json is reused, not re-measured
    text = capsys.readouterr()
    assert rc == 0, text.err
    assert "re-sizing layers [0, 1] for the saved workload" in text.out and "measuring costs" not in text.out
    assert CostModel.load(out / "cost.json").source == EAGER.source
    saved = Profile.load(out / "profile.json")
    assert [[c["tokens"] for c in l.chunks] for l in saved.layers] == [[1200], [1200]]
    after = Plan.load(out / "plan.json")
    assert max(t for lp in after.layers for g in lp.groups for t in g.tiers) == 1200  # the top tier: the saved call
    assert max(t for lp in before.layers for g in lp.groups for t in g.tiers) == 4 * 128  # batched headroom
    again, _ = npumoe_mlx.load(str(path), offload="onnx", bundle=str(out), quiet=True)
    mx.eval(again(ids))
    s = summarize(offload_stats(again))
    assert s["offloaded_calls"] > 0 and s["overflow_pct"] == 0


def test_plan_from_stats_finds_the_bundle_and_previews_what_build_builds(tight_copy, tmp_path, capsys):
    """Issue 24: `npumoe plan --from-stats` said "no onnx bundle" beside M/npumoe-onnx and previewed
    another plan (other costs, no calibration) than `npumoe build --from-stats` then built."""
    import json

    from npumoe_mlx import cli

    path, out = tight_copy("npumoe-onnx")  # where `npumoe build` puts it
    model, tok = npumoe_mlx.load(str(path), offload="onnx", quiet=True)
    mx.eval(model(mx.array(prompt_of_tokens(tok, 300, seed=3))[None]))
    f = tmp_path / "stats.json"
    stats_profile(model, "qwen3_moe").save(f)
    same = ["--corpus", "qa", "--tokens", "256", "--chunk-size", "128", "--from-stats", str(f)]

    assert cli.main(["plan", "--model", str(path), *same, "--json", str(tmp_path / "preview.json")]) == 0
    text = capsys.readouterr().out
    assert "no onnx bundle" not in text and f"the costs of the bundle {out}" in text
    assert cli.main(["build", "--model", str(path), *same]) == 0
    assert "measuring costs" not in capsys.readouterr().out  # re-sized with the bundle's costs, as previewed
    assert json.loads((tmp_path / "preview.json").read_text()) == json.loads((out / "plan.json").read_text())
    assert CostModel.load(out / "cost.json").source == EAGER.source


def test_build_without_the_backends_toolkit_names_the_extra(tmp_path, monkeypatch):
    """coremltools is an extra off macOS ([coreml]): a Core ML build without it says how to get it."""
    import importlib.util

    import pytest

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "coremltools" else real(n, *a))
    with pytest.raises(ValueError, match=r"needs coremltools, which is not installed: pip install 'npumoe-mlx\[coreml\]'"):
        build_bundle(str(tmp_path / "m"), "coreml", str(tmp_path / "b"))
    assert not (tmp_path / "b").exists()
