"""`npumoe demo` at a reduced size: model, bundle, offloaded generation, compare outputs."""

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from npumoe_mlx.tools import compare as cmp
from npumoe_mlx.tools.demo import main

SMALL = ["--small", "--prompt-tokens", "96", "--max-tokens", "4", "--layers", "2"]


def test_demo_small_in_the_cache_three_lines_and_reuse(tmp_path, capsys, monkeypatch):
    """Issue 24: the demo wrote ./npumoe-demo into the checkout, rebuilt everything on every run,
    and never said plainly whether the tokens matched."""
    monkeypatch.setenv("NPUMOE_CACHE", str(tmp_path / "cache"))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    assert main(SMALL) == 0
    printed = capsys.readouterr().out
    out = tmp_path / "cache" / "demo"
    assert list(cwd.iterdir()) == []  # nothing in the current folder
    manifest = out / "model" / "npumoe-onnx" / "manifest.json"
    assert manifest.is_file()
    for name in ("compare.json", "compare.md", "compare.png"):
        assert (out / "compare" / name).stat().st_size > 0
    r = json.loads((out / "compare" / "compare.json").read_text())
    assert r["token_agreement"] == 1.0 and r["devices"]["offload"] == "ONNX Runtime CPU"
    tail = printed.strip().splitlines()[-5:]
    assert tail[0].startswith("tokens:  identical to stock MLX (4 greedy tokens")
    pre = r["offload"]["prefill_tps"] / r["stock"]["prefill_tps"]
    assert tail[1].startswith(f"speed:   prefill {pre:.2f}x, decode ")
    mem = r["offload"]["peak_mem_gb"] / r["stock"]["peak_mem_gb"]
    assert tail[2].startswith("memory:  peak ") and f"({mem:.2f}x)" in tail[2]
    assert tail[3] == f"report:  {out / 'compare' / 'compare.md'}, compare.json, compare.png"
    assert "dispatch" not in printed and "GFLOP/s" not in printed  # no cost-model jargon

    built = manifest.stat().st_mtime_ns
    assert main(SMALL) == 0  # again: the model and bundle are current, so they are reused
    again = capsys.readouterr().out
    assert "reusing the model and its onnx bundle" in again and "1/4 model" not in again
    assert manifest.stat().st_mtime_ns == built
    assert main([*SMALL[:-1], "3"]) == 0  # other settings (3 layers): built afresh
    assert "1/4 model: qwen3_moe, 3 layers" in capsys.readouterr().out
    assert manifest.stat().st_mtime_ns != built


def test_compare_plot_has_memory_and_no_duplicate_mean():
    side = {"prefill_tps": 2.0, "decode_tps": 1.0, "ttft_s": 0.5, "cpu_s_per_token": 0.1, "peak_mem_gb": 0.4}
    one = {"prompts": [{"name": "512 tokens", "offload": side, "stock": side}], "offload": side, "stock": side}
    panels = cmp.plot_panels(one)
    assert "peak memory (GB)" in [p[0] for p in panels]
    assert all(labels == ["512 tokens"] for _, _, labels, _ in panels)  # no "mean" repeating the same bars
    two = {**one, "prompts": one["prompts"] * 2}
    assert all(labels[-1] == "mean" and len(labels) == 3 for _, _, labels, _ in cmp.plot_panels(two))


def test_compare_without_matplotlib_says_how_to_get_plots(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed (it is optional: [plot])
    side = {"prefill_tps": 2.0, "decode_tps": 1.0, "ttft_s": 0.5, "cpu_s_per_token": 0.1, "peak_mem_gb": 0.4}
    said = []
    assert cmp.plot({"prompts": [], "offload": side, "stock": side}, tmp_path / "x.png") is False
    monkeypatch.setattr(cmp, "format_markdown", lambda r: "table\n")
    cmp.write_outputs({"prompts": []}, tmp_path, said.append)
    assert said == ["plot skipped: matplotlib is not installed (pip install 'npumoe-mlx[plot]')"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["compare.json", "compare.md", "npumoe_compare.json"]


def test_compare_says_in_one_line_why_offload_was_slower():
    fast = {"prefill_tps": 100.0, "decode_tps": 50.0}
    stats = {"offloaded_calls": 4, "program_calls": 8, "program_s": 0.004}
    r = {"offload": {"prefill_tps": 58.0, "decode_tps": 50.0}, "stock": fast, "machine": {"loadavg_at_start": [1.5]},
         "prompts": [{"offload": {"offload_stats": stats}}]}
    line = cmp.why_slower(r)
    assert line.startswith("prefill slower than stock (0.58x): 4 offloaded layer calls made 8 program calls of 0.50 ms")
    assert "fixed cost" in line and "\n" not in line
    r["offload"]["decode_tps"] = 30.0
    assert cmp.why_slower(r).startswith("prefill and decode slower than stock: ")
    r["prompts"][0]["offload"]["offload_stats"] = {"offloaded_calls": 0, "program_calls": 0}
    assert "no MoE layer call ran programs" in cmp.why_slower(r)
    assert cmp.why_slower({**r, "offload": {"prefill_tps": 99.0, "decode_tps": 49.0}}) is None  # within 5 %: not slower
