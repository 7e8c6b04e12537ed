"""`npumoe demo` at a reduced size: model, bundle, offloaded generation, compare outputs."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from npumoe_mlx.tools.demo import main


def test_demo_small(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["--out", str(out), "--small", "--prompt-tokens", "96", "--max-tokens", "4", "--layers", "2"]) == 0
    printed = capsys.readouterr().out
    assert "[demo] done in" in printed and str(out / "compare" / "compare.png") in printed
    assert (out / "model" / "npumoe-onnx" / "manifest.json").is_file()
    for name in ("compare.json", "compare.md", "compare.png"):
        assert (out / "compare" / name).stat().st_size > 0
    r = json.loads((out / "compare" / "compare.json").read_text())
    assert r["token_agreement"] == 1.0
    assert r["devices"]["offload"] == "ONNX Runtime CPU"
