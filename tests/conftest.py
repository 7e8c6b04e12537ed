"""Shared test helpers and tiny-model fixtures.

Test modules import the helpers by name (``from conftest import greedy``): under pytest tests/ is
on sys.path (no __init__.py), as for ``sharded_worker``. The session fixtures build a tiny model
and its bundle once for every module that asks; they are shared read-only (a test that edits one
works on a copy, ``copy_model``), and the session's end checks that no test changed them.
"""

import json
import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
from mlx_lm import stream_generate
from mlx_lm.sample_utils import make_sampler

from npumoe_mlx import cli
from npumoe_mlx.build.build import build as build_bundle
from npumoe_mlx.bundle import bundle as bundles
from npumoe_mlx.planning.cost import CostModel
from npumoe_mlx.planning.plan import PlanLimits
from npumoe_mlx.planning.profiles import LayerCounts
from npumoe_mlx.tools.tiny import make_tiny_model

PROMPT = "The quick brown fox jumps over the lazy dog. " * 3
# Programs always win: every call, decode included, goes through the programs.
EAGER = CostModel("onnx", 1e-9, 1e15, 1e15, 0.0, 1.0, 1.0, first_offload_tokens=1, source="test: offload everything")


def structure():
    """benchmarks/structure.py (the ast import graph: nothing imported), loaded by path."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("npumoe_structure", Path(__file__).resolve().parents[1]
                                                  / "benchmarks" / "structure.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def greedy(model, tok, prompt=PROMPT, n=16, **kw) -> list:
    """Token ids of an n-token greedy generation (as mlx_lm's CLI at --temp 0)."""
    return [r.token for r in stream_generate(model, tok, prompt, max_tokens=n, sampler=make_sampler(0.0), **kw)]


def build(path, out=None, *, corpus=("qa",), tokens=256, chunk_size=128, cost=EAGER, **kw) -> Path:
    """An onnx bundle of the model at ``path`` (at ``out``, else where `npumoe build` puts it), quiet
    unless ``log`` is given."""
    kw.setdefault("log", lambda m: None)
    return build_bundle(str(path), "onnx", None if out is None else str(out), corpus=list(corpus), tokens=tokens,
                        chunk_size=chunk_size, cost=cost, **kw)


def run_cli(capsys, *argv):
    """`npumoe ...` in this process: (exit code, stdout, stderr)."""
    rc = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def tight_limits() -> PlanLimits:
    """One tier of 16 rows per group: a plan made for tiny calls, which longer prompts overflow."""
    tight = PlanLimits.for_backend("onnx", max_tiers=1)
    tight.capacities = [16]
    return tight


def zipf_layer(E=8, k=2, calls=40, n=128, seed=0, skew=1.0) -> LayerCounts:
    """Layer 0's counts over ``calls`` calls of ``n`` tokens, each routed to k of E experts by a
    Zipf(skew) popularity: a calibration profile without a model."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, E + 1) ** skew
    chunks = []
    for i in range(calls):
        c = np.zeros(E, int)
        for _ in range(n):
            c[rng.choice(E, k, replace=False, p=p / p.sum())] += 1
        chunks.append({"tokens": n, "counts": c.tolist(), "seq": i})
    return LayerCounts(0, "p", E, k, np.sum([c["counts"] for c in chunks], axis=0).tolist(), chunks)


def copy_model(src, dst, bundles=True) -> Path:
    """A copy of a shared model (with its bundles unless ``bundles`` is False) for a test to change."""
    shutil.copytree(src, dst, ignore=None if bundles else shutil.ignore_patterns("npumoe-*"))
    return Path(dst)


def rehash(bundle, rel: str) -> None:
    """Update the manifest's entry of bundle file ``rel`` (size and hashes, as a build writes
    them), as a careful hand edit or an attacker would."""
    bundle = Path(bundle)
    man = json.loads((bundle / "manifest.json").read_text())
    entry = bundles.files_under(bundle, Path(rel))[rel]
    if rel in man["meta"]:
        man["meta"][rel] = entry
    for prog in man["programs"]:
        if rel in prog["files"]:
            prog["files"][rel] = entry
    (bundle / "manifest.json").write_text(json.dumps(man))


def file_tree(root: Path) -> dict:
    """Every file below ``root``: its bytes by relative path (to show nothing changed)."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _snapshot(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def _unchanged(path: Path, before: dict) -> None:
    after = _snapshot(path)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"a test changed the shared model {path} (use copy_model): {changed[:5]}"


def _shared(request, root: Path, path: Path) -> Path:
    """Check at the session's end that the tests left ``root`` as it was built."""
    before = _snapshot(root)
    request.addfinalizer(lambda: _unchanged(root, before))
    return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """``get(family, **kw)``: make_tiny_model's model, made once per session and shared read-only."""
    root = tmp_path_factory.mktemp("tiny-shared")
    made = {}

    def get(family, **kw):
        key = (family, *sorted(kw.items()))
        if key not in made:
            name = "-".join([family, *(f"{k}{v}" for k, v in sorted(kw.items()))])
            path = make_tiny_model(root / name, family, **kw)
            made[key] = path, _snapshot(path)
        return made[key][0]

    yield get
    for path, before in made.values():
        _unchanged(path, before)


@pytest.fixture(scope="session")
def eager_moe(tmp_path_factory, request):
    """A float32 tiny qwen3_moe (seed 1, 2 layers) with an onnx bundle at the default place where
    programs win every call (EAGER): the reliability, chat, doctor and server tests' model."""
    root = tmp_path_factory.mktemp("eager")
    path = make_tiny_model(root / "m", "qwen3_moe", seed=1)
    build(path)
    return _shared(request, path, path)  # beside it (root) tests may write, e.g. a server's log


@pytest.fixture(scope="session")
def eager_qwen2(tmp_path_factory, request):
    """A float32 tiny qwen2_moe (seed 2: routed and shared experts, a router per layer) with an
    EAGER onnx bundle beside it: the API and load-walk tests' model."""
    path = make_tiny_model(tmp_path_factory.mktemp("eager-qwen2") / "m", "qwen2_moe", seed=2)
    build(path)
    return _shared(request, path, path)


@pytest.fixture(scope="session")
def tight_skewed(tmp_path_factory, request):
    """A skewed tiny qwen3_moe (16 experts) and its tight bundle (top tier 16: 300-token prompts
    overflow it), built once; tests that change them take ``tight_copy``."""
    root = tmp_path_factory.mktemp("tight")
    path = make_tiny_model(root / "m", "qwen3_moe", skew=2.0, seed=1, num_experts=16)
    out = build(path, root / "b", limits=tight_limits())
    return _shared(request, root, path), out


@pytest.fixture
def tight_copy(tight_skewed, tmp_path):
    """``copy(bundle_at)``: a fresh copy of ``tight_skewed`` in this test's folder, the bundle at
    ``bundle_at`` (relative to the model folder, e.g. "npumoe-onnx", or "../b"): (model, bundle)."""
    path, out = tight_skewed

    def copy(bundle_at="../b"):
        m = copy_model(path, tmp_path / "m", bundles=False)
        b = (m / bundle_at).resolve()
        shutil.copytree(out, b)
        return m, b

    return copy


@pytest.fixture(autouse=True, scope="session")
def _npumoe_console():
    """npumoe's log records as the npumoe command shows them (`[npumoe] ...` on stderr or stdout):
    the tests read that output. Library users get plain logging (test_log.py)."""
    from npumoe_mlx.log import console

    console()
    yield
