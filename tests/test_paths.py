"""One cache root (paths.py) for bundles, compiled Core ML programs and the demo."""

from pathlib import Path

from npumoe_mlx.backends import coreml
from npumoe_mlx.bundle import bundle as bundles
from npumoe_mlx.bundle.paths import cache_root
from npumoe_mlx.tools import demo


def test_every_cache_lives_under_npumoe_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("NPUMOE_CACHE", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    assert bundles.cache_root() == cache_root()
    assert bundles.cached_bundle_dir("unused", "onnx", fingerprint="ab" * 16) == tmp_path / "c" / "bundles" / f"{'ab' * 8}-onnx"
    assert coreml.cache_dir() == tmp_path / "c" / "coreml"
    assert demo.default_out() == tmp_path / "c" / "demo"


def test_without_the_variable_the_root_is_the_same_on_every_platform(monkeypatch, tmp_path):
    monkeypatch.delenv("NPUMOE_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    want = Path(tmp_path) / ".cache" / "npumoe"
    assert cache_root() == want
    assert coreml.cache_dir() == want / "coreml"  # was ~/Library/Caches/npumoe: a second rule
    monkeypatch.setenv("NPUMOE_CACHE", "")  # empty counts as unset
    assert cache_root() == want
