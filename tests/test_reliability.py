"""Reliability and safety (issue 6): bad input gets a clear error, faults fall back
without wrong output, interrupted or concurrent builds lose nothing, no pickle."""

import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm import load as stock_load

import npumoe_mlx
from npumoe_mlx.atomic import clean_stale
from npumoe_mlx.backends import Program
from npumoe_mlx.build.workloads import prompt_of_tokens
from npumoe_mlx.bundle import bundle as bundles
from npumoe_mlx.bundle.checks import ModelError
from npumoe_mlx.bundle.lock import BuildInProgress
from npumoe_mlx.planning.plan import PlanLimits
from npumoe_mlx.runtime.executor import OffloadExecutor, offload_stats, summarize
from npumoe_mlx.runtime.experts import installed_blocks
from npumoe_mlx.tools.tiny import make_tiny_model

from conftest import EAGER, PROMPT, build, greedy, rehash, run_cli, tight_limits


REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
NPUMOE = [sys.executable, "-m", "npumoe_mlx.cli"]
STOCK = [sys.executable, "-m", "mlx_lm", "generate"]


def _one_line_error(err: str, sub: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"npumoe {sub}: error: ") and lines[0].endswith("(rerun with --debug for details)")
    return lines[0]


@pytest.fixture(scope="module")
def stock(eager_moe):
    return stock_load(str(eager_moe))


# --- 1. bad model input ------------------------------------------------------


def _copy_model(moe, d, skip=()):
    shutil.copytree(moe, d, ignore=shutil.ignore_patterns("npumoe-*", *skip))
    return d


def _edit_config(d, **kw):
    c = json.loads((d / "config.json").read_text())
    c.update(kw)
    (d / "config.json").write_text(json.dumps(c))


def _no_config(moe, d):
    _copy_model(moe, d, skip=("config.json",))
    return d, ["no config.json", "not an mlx_lm model folder"]


def _unknown_type(moe, d):
    _edit_config(_copy_model(moe, d), model_type="foo_moe")
    return d, ["config.json", "model_type 'foo_moe' is not supported by mlx-lm", "pip install -U mlx-lm"]


def _truncated(moe, d):
    st = _copy_model(moe, d) / "model.safetensors"
    os.truncate(st, st.stat().st_size // 2)
    return d, ["model.safetensors", "truncated safetensors file", "re-download"]


def _corrupt(moe, d):
    st = _copy_model(moe, d) / "model.safetensors"
    raw = bytearray(st.read_bytes())
    raw[8:40] = b"x" * 32  # the JSON header
    st.write_bytes(bytes(raw))
    return d, ["model.safetensors", "corrupt safetensors file", "re-download"]


def _shape_mismatch(moe, d):
    _edit_config(_copy_model(moe, d), hidden_size=96)
    return d, ["config.json does not match the weights", "model.embed_tokens.weight", "re-download"]


def _layer_mismatch(moe, d):
    _edit_config(_copy_model(moe, d), num_hidden_layers=1)
    return d, ["config.json does not match the weights", "not in model", "model.layers.1."]


def _pickle_only(moe, d):
    _copy_model(moe, d, skip=("*.safetensors",))
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04N.")
    return d, ["pytorch_model.bin", "pickle", "npumoe loads only model*.safetensors", "mlx_lm.convert"]


def _missing_folder(moe, d):
    return d, ["no such model folder", "HF_HUB_OFFLINE is set"]


def _not_cached_repo(moe, d):
    return "npumoe-test/absent-model", ["no such model folder", "not in the Hugging Face cache", "HF_HUB_OFFLINE"]


BAD = {
    "no-config": _no_config, "unknown-model-type": _unknown_type, "truncated-safetensors": _truncated,
    "corrupt-safetensors": _corrupt, "config-shape-mismatch": _shape_mismatch,
    "config-layers-mismatch": _layer_mismatch, "pickle-weights-only": _pickle_only,
    "missing-folder": _missing_folder, "repo-not-in-cache": _not_cached_repo,
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_model_one_line_error_naming_file_and_fix(eager_moe, tmp_path, capsys, case, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path, needles = BAD[case](eager_moe, tmp_path / "bad")
    extra = {"generate": ["--max-tokens", "4"], "info": [], "build": ["--no-tune", "--tokens", "64"]}
    for sub, more in extra.items():
        rc, _, err = run_cli(capsys, sub, "--model", str(path), *more)
        assert rc == 1, (sub, err)
        line = _one_line_error(err, sub)
        assert str(path) in line, line
        for n in needles:
            assert n in line, (sub, line)
    with pytest.raises(ModelError):
        npumoe_mlx.load(str(path), quiet=True)
    assert not list(tmp_path.glob("**/npumoe-onnx*"))  # a failed build writes nothing


def test_bad_model_traceback_only_with_debug(eager_moe, tmp_path):
    d, _ = _no_config(eager_moe, tmp_path / "bad")
    (rc, out, err), (rc_debug, _, err_debug) = _both(
        [*NPUMOE, "info", "--model", str(d)], [*NPUMOE, "info", "--model", str(d), "--debug"])
    assert rc == 1 and out == ""
    assert err == f"npumoe info: error: {d}: no config.json, so this is not an mlx_lm model folder; pass the " \
        "folder that holds config.json and model*.safetensors, or convert a Hugging Face model with " \
        "`mlx_lm.convert --hf-path REPO` (rerun with --debug for details)\n"
    assert rc_debug != 0 and "Traceback" in err_debug and "ModelError" in err_debug


@pytest.fixture(scope="module")
def dense(eager_moe, tmp_path_factory):
    """A tiny dense llama (no MoE layers) with the MoE model's tokenizer."""
    from mlx_lm.models import llama
    from mlx_lm.utils import save_config, save_model

    args = dict(model_type="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, vocab_size=512)
    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs(**args))
    mx.eval(model.parameters())
    d = tmp_path_factory.mktemp("dense") / "m"
    d.mkdir()
    save_model(d, model)
    save_config({**args, "eos_token_id": 1, "bos_token_id": 0, "tie_word_embeddings": True}, d / "config.json")
    for f in eager_moe.glob("*token*"):
        shutil.copy(f, d / f.name)
    return d


def test_dense_model_runs_on_stock_mlx_and_says_so(dense, capsys):
    stock_model, tok = stock_load(str(dense))
    want = greedy(stock_model, tok, PROMPT, 12)
    for mode in ("auto", "onnx", "mlx"):
        model, tok2 = npumoe_mlx.load(str(dense), offload=mode)
        assert "no supported MoE expert blocks: the model runs on stock MLX" in capsys.readouterr().err, mode
        assert greedy(model, tok2, PROMPT, 12) == want
    rc, out, err = run_cli(capsys, "generate", "--model", str(dense), "--prompt", "hi", "--max-tokens", "4")
    assert rc == 0 and "runs on stock MLX" in err and "Generation: 4 tokens" in out
    rc, out, _ = run_cli(capsys, "info", "--model", str(dense))
    assert rc == 0 and "MoE layers: 0" in out and "no MoE expert blocks found: this model runs on stock MLX" in out
    rc, _, err = run_cli(capsys, "build", "--model", str(dense), "--no-tune", "--tokens", "64")
    assert rc == 1 and "no supported MoE expert blocks; nothing to offload (it runs on stock MLX)" in _one_line_error(err, "build")
    assert not (dense / "npumoe-onnx").exists()


# --- 2. bundle faults --------------------------------------------------------


def _edit_json(d, name, fn):
    p = d / name
    obj = json.loads(p.read_text())
    fn(obj)
    p.write_text(json.dumps(obj))


def _onnx_file(d):
    man = json.loads((d / "manifest.json").read_text())
    return next(f for f in man["programs"][0]["files"] if f.endswith(".onnx"))


def _layer_99(d):
    _edit_json(d, "plan.json", lambda p: p["layers"][0].update(layer=99))
    _edit_json(d, "manifest.json", lambda m: [p.update(layer=99) for p in m["programs"] if p["layer"] == 0])
    rehash(d, "plan.json")


def _expert_999(d):
    _edit_json(d, "plan.json", lambda p: p["layers"][0]["groups"][0]["experts"].__setitem__(0, 999))
    rehash(d, "plan.json")


def _experts_swapped(d):
    """A plan that passes every file check but gives program 0 other experts."""
    _edit_json(d, "plan.json", lambda p: p["layers"][0]["groups"][0]["experts"].reverse())
    rehash(d, "plan.json")


def _tiers_4096(d):
    """Tiers live in plan.json only: a plan asking program 0 for a tier it lacks is refused at load."""
    _edit_json(d, "plan.json", lambda p: p["layers"][0]["groups"][0]["tiers"].append(4096))
    rehash(d, "plan.json")


def _entry_swaps_tiers(d):
    """Program 0's entry names its two smallest tiers' graphs the other way round."""
    def swap(m):
        graphs = m["programs"][0]["program"]["graphs"]
        a, b = sorted(graphs, key=int)[:2]
        graphs[a], graphs[b] = graphs[b], graphs[a]
    _edit_json(d, "manifest.json", swap)


def _symlinked_file(d):
    rel = _onnx_file(d)
    outside = d.parent / (d.name + "-outside.onnx")
    shutil.move(d / rel, outside)
    (d / rel).symlink_to(outside)  # same bytes, same hash: refused for being a link


def _symlinked_dir(d):
    prog = d / "programs" / "L000"
    outside = d.parent / (d.name + "-L000")
    shutil.move(prog, outside)
    prog.symlink_to(outside, target_is_directory=True)


def _truncated_onnx(d):
    p = d / _onnx_file(d)
    os.truncate(p, p.stat().st_size // 2)


def _truncated_onnx_rehashed(d):
    _truncated_onnx(d)
    rehash(d, _onnx_file(d))


def _manifest_not_json(d):
    p = d / "manifest.json"
    p.write_text(p.read_text()[:-20])


BUNDLE_FAULTS = {
    "plan-names-layer-99": (_layer_99, bundles.BundleError, "plan names layer 99, which has no offloadable expert block"),
    "plan-names-expert-999": (_expert_999, bundles.BundleError, r"plan names expert 999, which the model's layer 0 \(E=8\) lacks"),
    "plan-swaps-experts": (_experts_swapped, bundles.BundleError, r"holds program layer0_e0-1-3-7 .* but the plan wants layer0_e7-3-1-0"),
    "entry-swaps-tiers": (_entry_swaps_tiers, bundles.BundleError,
                          r"cannot load program programs/L000/g00 \(\S+\.onnx is the tier \d+ graph, the entry says tier \d+\)"),
    "entry-escapes-folder": (lambda d: _edit_json(d, "manifest.json", lambda m: m["programs"][0]["program"].update(
        graphs={"8": "../../x.onnx"})), bundles.BundleError, r"cannot load program programs/L000/g00 \(program file name "
                             r"'\.\./\.\./x\.onnx' is not a plain name inside"),
    "symlinked-program-file": (_symlinked_file, bundles.BundleError, "goes through a link"),
    "symlinked-program-dir": (_symlinked_dir, bundles.BundleError, "goes through a link"),
    "truncated-onnx": (_truncated_onnx, bundles.BundleError, r"\.onnx is corrupt \(size or sha256 differs\)"),
    "truncated-onnx-rehashed": (_truncated_onnx_rehashed, bundles.BundleError, r"cannot load program programs/L000/g00 \(.*\); rebuild it"),
    "manifest-not-json": (_manifest_not_json, bundles.BundleError, "unreadable manifest"),
    "manifest-other-kind": (lambda d: _edit_json(d, "manifest.json", lambda m: m.update(kind="other")),
                            bundles.BundleError, "not an npumoe bundle manifest"),
    "manifest-drops-program": (lambda d: _edit_json(d, "manifest.json", lambda m: m["programs"].pop()),
                               bundles.BundleError, "manifest programs do not match the plan"),
    "manifest-other-group": (lambda d: _edit_json(d, "manifest.json", lambda m: m["programs"][0].update(group=7)),
                             bundles.BundleError, "manifest programs do not match the plan"),
    "plan-other-tiers": (_tiers_4096, bundles.BundleError, r"holds program layer0_e[\d-]+ .* but the plan wants .*4096\]"),
    "other-format": (lambda d: _edit_json(d, "manifest.json", lambda m: m.update(format=2)),
                     bundles.BundleError, "bundle format 2 .* is not format 3[^0-9].*; rebuild it with .*--force"),
}


@pytest.mark.parametrize("case", list(BUNDLE_FAULTS))
def test_bundle_fault_is_refused_before_any_program_runs(eager_moe, tmp_path, capsys, case):
    edit, exc, msg = BUNDLE_FAULTS[case]
    d = tmp_path / "b"
    shutil.copytree(eager_moe / "npumoe-onnx", d)
    edit(d)
    with pytest.raises(exc, match=msg):
        npumoe_mlx.load(str(eager_moe), offload="onnx", bundle=str(d), quiet=True)
    rc, out, err = run_cli(capsys, "generate", "--model", str(eager_moe), "--bundle", str(d), "--offload", "onnx",
                            "--max-tokens", "4", "--prompt", "hi")
    assert rc == 1 and out == "" and re.search(msg, _one_line_error(err, "generate"))


# --- 3. runtime faults -------------------------------------------------------


class Faulty(Program):
    """Wraps a program: the first ``good`` runs pass through, then every run fails as ``kind``."""

    def __init__(self, program, kind, good=3):
        self.p, self.kind, self.good, self.runs = program, kind, good, 0

    def run(self, x, tier=None):
        self.runs += 1
        y = self.p.run(x, tier)
        if self.runs <= self.good:
            return y
        if self.kind == "raises":
            raise RuntimeError("device lost")
        y = np.array(y)
        if self.kind == "shape":
            return y[:, :-1]
        y[0, 0, 0] = np.nan if self.kind == "nan" else np.inf
        return y


@pytest.mark.parametrize("kind", ["raises", "nan", "inf", "shape"])
def test_program_fault_mid_generation_falls_back_once(eager_moe, stock, capsys, kind):
    stock_model, tok = stock
    want = greedy(stock_model, tok, PROMPT, 24)
    model, tok2 = npumoe_mlx.load(str(eager_moe), offload="onnx", quiet=True)
    ex = {e.plan.layer: e for e in (b.executor for b in installed_blocks(model))}
    assert isinstance(ex[0], OffloadExecutor)
    bad = ex[0].programs[0] = Faulty(ex[0].programs[0], kind)
    capsys.readouterr()
    assert greedy(model, tok2, PROMPT, 24) == want  # the faulty call reran on MLX; nothing wrong came out
    warnings = [l for l in capsys.readouterr().err.splitlines() if "program failed" in l]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("[npumoe] layer 0: program failed (")
    assert warnings[0].endswith("); layer falls back to MLX for the rest of the run")
    assert bad.runs == bad.good + 1  # never called again after the fault
    st = {s.layer: s for s in offload_stats(model)}
    assert st[0].fallback and 1 < st[0].offloaded < st[0].calls - 10  # failed while decoding, then MLX
    assert st[1].fallback == "" and st[1].offloaded == st[1].calls  # the other layer keeps its programs
    assert summarize(offload_stats(model))["fallbacks"] == {0: st[0].fallback}


# --- 4. interrupted and concurrent builds -----------------------------------


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """4 layers x 32 experts, one expert per program: 128 programs, a build long enough to interrupt."""
    root = tmp_path_factory.mktemp("wide")
    path = make_tiny_model(root / "m", "qwen3_moe", seed=4, num_layers=4, num_experts=32)
    cost = root / "eager.json"
    EAGER.save(str(cost))
    return path, cost


def _build_cmd(path, cost):
    return [*NPUMOE, "build", "--model", str(path), "--cost", str(cost), "--corpus", "qa", "--tokens", "256",
            "--chunk-size", "128", "--max-group", "1", "--force"]


def _visible(path):
    return sorted(p.name for p in path.iterdir() if not p.name.startswith("."))


def test_killed_build_keeps_previous_bundle_and_next_build_cleans_up(wide, capsys):
    path, cost = wide
    bundle = path / "npumoe-onnx"
    build(path, limits=PlanLimits.for_backend("onnx", max_group=1))
    manifest = (bundle / "manifest.json").read_bytes()
    visible = _visible(path)
    lock = path / "npumoe-onnx.lock"
    for when in ("when it holds the lock", "when the temp folder appears"):
        p = subprocess.Popen(_build_cmd(path, cost), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        t0 = time.monotonic()
        while time.monotonic() - t0 < 60:  # a fixed delay raced a fast build: wait for a state instead
            if when.endswith("lock") and lock.exists() and lock.read_text() == str(p.pid):
                break
            if when.endswith("appears") and list(path.glob(".tmp-npumoe-onnx-*/programs")):
                break
            time.sleep(0.005)
        p.send_signal(signal.SIGKILL)
        assert p.wait(30) == -signal.SIGKILL, when
        assert (bundle / "manifest.json").read_bytes() == manifest, when  # the previous bundle, untouched
        assert [n for n in _visible(path) if n != "npumoe-onnx.lock"] == visible, when  # no partial bundle
        bundles.read(bundle, path)  # and it still validates
    assert list(path.glob(".tmp-npumoe-onnx-*"))  # the killed builds' leftovers: hidden folders ...
    assert (path / "npumoe-onnx.lock").read_text() == str(p.pid)  # ... and a stale lock
    model, _ = npumoe_mlx.load(str(path), offload="auto", quiet=True)  # ... and loaders ignore them
    mx.eval(model(mx.array([[5, 6, 7, 8] * 16])))
    assert summarize(offload_stats(model))["offloaded_calls"] == 4
    # a build killed between its two renames left the old bundle as .old-*: put back
    stash = path / ".old-npumoe-onnx-crashed"
    bundle.rename(stash)
    clean_stale(bundle)
    assert (bundle / "manifest.json").read_bytes() == manifest and not stash.exists()
    (path / ".old-npumoe-onnx-dead").mkdir()
    # the next build removes every leftover of the dead ones
    rc, _, err = run_cli(capsys, "build", "--model", str(path), "--cost", str(cost), "--corpus", "qa",
                          "--tokens", "256", "--chunk-size", "128", "--max-group", "1", "--force")
    assert rc == 0, err
    assert [p.name for p in path.iterdir() if p.name.startswith(".")] == []
    assert _visible(path) == visible
    assert (bundle / "manifest.json").read_bytes() != manifest
    bundles.read(bundle, path)


def test_concurrent_build_is_refused_and_stale_lock_taken_over(wide, capsys):
    path, cost = wide
    lock = path / "npumoe-onnx.lock"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.write_text(str(dead.pid))  # a build that died holding the lock
    first = subprocess.Popen(_build_cmd(path, cost), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    t0 = time.monotonic()
    while time.monotonic() - t0 < 60:
        try:
            if lock.read_text() == str(first.pid):
                break  # the first build took the stale lock over
        except OSError:
            pass
        assert first.poll() is None, first.stderr.read()
        time.sleep(0.005)
    rc, _, err = run_cli(capsys, "build", "--model", str(path), "--cost", str(cost), "--max-group", "1", "--force")
    line = _one_line_error(err, "build")
    assert rc == 1 and f"build in progress for {path / 'npumoe-onnx'} (pid {first.pid})" in line
    with pytest.raises(BuildInProgress, match="build in progress"):  # the Python API too
        build(path, limits=PlanLimits.for_backend("onnx", max_group=1))
    assert first.wait(120) == 0, first.stderr.read()
    assert not lock.exists()
    bundles.read(path / "npumoe-onnx", path)


def test_build_inside_callers_lock(eager_moe, tmp_path):
    """build() is the one taker of the lock (not re-entrant): inside a held lock it refuses,
    from this thread or another; a caller that took it on purpose (sharded) says lock_held."""
    import threading

    from npumoe_mlx.bundle.lock import build_lock

    out = tmp_path / "b"
    errors = []
    with build_lock(out):
        with pytest.raises(BuildInProgress, match="this process holds its lock"):
            build(eager_moe, out)
        t = threading.Thread(target=lambda: errors.append(pytest.raises(BuildInProgress, build, eager_moe, out)))
        t.start()
        t.join()
        assert not (out / "manifest.json").exists()
        build(eager_moe, out, lock_held=True)
        assert (tmp_path / "b.lock").exists()
    assert len(errors) == 1 and "this process holds its lock" in str(errors[0].value)
    assert not (tmp_path / "b.lock").exists()
    bundles.read(out, eager_moe)


# --- 5. prompts and sizes ----------------------------------------------------


def _both(stock_args, ours_args):
    """Run two commands at once (e.g. npumoe with and without --debug): [(rc, stdout, stderr)] * 2."""
    ps = [subprocess.Popen(a, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
          for a in (stock_args, ours_args)]
    out = []
    for p in ps:
        so, se = p.communicate(timeout=60)
        out.append((p.returncode, so, se))
    return out


def _stock_and_ours(capsys, stock_args, ours_args):
    """Stock mlx_lm in its own interpreter beside `npumoe ...` in this one: [(rc, stdout, stderr)] * 2."""
    p = subprocess.Popen(stock_args, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ours = run_cli(capsys, *ours_args)
    so, se = p.communicate(timeout=60)
    return [(p.returncode, so, se), ours]


def test_empty_prompt_like_mlx_lm(eager_moe, capsys):
    args = ["--model", str(eager_moe), "--prompt", "", "--max-tokens", "12", "--verbose", "False"]
    (rc_s, out_s, _), (rc_o, out_o, err_o) = _stock_and_ours(capsys, [*STOCK, *args], ["generate", *args, "--offload", "onnx"])
    assert rc_s == 0 and rc_o == 0, err_o
    assert out_s.strip() and out_o == out_s


@pytest.fixture(scope="module")
def stops(eager_moe, tmp_path_factory):
    """The tiny model with eos set to a token greedy decoding reaches after a few steps, and its bundle."""
    model, tok = stock_load(str(eager_moe))
    text = tok.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False, add_generation_prompt=True)
    toks = greedy(model, tok, tok.encode(text, add_special_tokens=False), 16)  # as mlx_lm's CLI prompts
    eos = next(t for i, t in enumerate(toks) if i >= 3 and t not in toks[:i])
    d = _copy_model(eager_moe, tmp_path_factory.mktemp("eos") / "m")
    _edit_config(d, eos_token_id=eos)
    build(d)
    return d


def test_max_tokens_zero_and_negative_like_mlx_lm(stops, capsys):
    args = ["--model", str(stops), "--prompt", "hello", "--verbose", "False"]
    # -1: no limit, both stop at eos
    (rc_s, out_s, _), (rc_o, out_o, err_o) = _stock_and_ours(
        capsys, [*STOCK, *args, "--max-tokens", "-1"], ["generate", *args, "--max-tokens", "-1", "--offload", "onnx"])
    assert rc_s == rc_o == 0, err_o
    assert out_s.strip() and out_o == out_s
    # 0: mlx_lm refuses; so do we, with its message on one line and the same exit code
    (rc_s, _, err_s), (rc_o, out_o, err_o) = _stock_and_ours(
        capsys, [*STOCK, *args, "--max-tokens", "0"], ["generate", *args, "--max-tokens", "0", "--offload", "onnx"])
    msg = "Maximum number of tokens must be non-zero (use -1 for no limit)."
    assert rc_s == rc_o == 1 and msg in err_s
    assert _one_line_error(err_o, "generate") == f"npumoe generate: error: {msg} (rerun with --debug for details)"


def test_prompt_past_top_tier_and_prefill_chunk_runs_overflow_rounds(eager_moe, stock, tmp_path):
    """Top tier 16, 512-token prefill chunks of a 1300-token prompt: ~128 pairs per expert per chunk."""
    out = build(eager_moe, tmp_path / "tight", limits=tight_limits())
    stock_model, tok = stock
    prompt = prompt_of_tokens(tok, 1300, seed=3)
    want = greedy(stock_model, tok, prompt, 8, prefill_step_size=512)
    model, tok2 = npumoe_mlx.load(str(eager_moe), offload="onnx", bundle=str(out), quiet=True)
    assert greedy(model, tok2, prompt, 8, prefill_step_size=512) == want
    s = summarize(offload_stats(model))
    groups = sum(len(lp.groups) for lp in bundles.read(out).plan.layers)
    assert s["offloaded_calls"] == s["layer_calls"] and s["drop_pct"] == 0
    assert s["program_calls"] > 3 * groups * 4  # 3 prefill chunks x layers' groups x several rounds each


def test_32k_prompt_peak_memory_bounded(tmp_path, record_property):
    """A 32K-token prompt, prefilled in 512-token chunks with a 512-token rotating KV cache.

    Per chunk MLX holds the attention scores (4 heads x 512 x 1024 x 4 B = 8 MB), the
    cache (~0.3 MB) and the expert rows (512 x 2 x 64 x 4 B = 0.25 MB); weights are ~1 MB.
    Bound: 64 MB. Unchunked, the scores alone would be 4 x 32768^2 x 4 B = 17 GB.
    """
    path = make_tiny_model(tmp_path / "one", "qwen3_moe", seed=2, num_layers=1)
    build(path)
    ids = np.random.default_rng(0).integers(3, 300, 32 * 1024).tolist()
    kw = dict(prefill_step_size=512, max_kv_size=512)
    stock_model, tok = stock_load(str(path))
    want = greedy(stock_model, tok, ids, 2, **kw)
    model, tok2 = npumoe_mlx.load(str(path), offload="onnx", quiet=True)
    mx.clear_cache()
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    got = greedy(model, tok2, ids, 2, **kw)
    peak = mx.get_peak_memory()
    record_property("peak_mb", peak / 1e6)
    print(f"32K-token prompt: {time.perf_counter() - t0:.1f} s, MLX peak memory {peak / 1e6:.1f} MB")
    assert got == want
    s = summarize(offload_stats(model))
    assert s["offloaded_calls"] == s["layer_calls"] >= 64  # every 512-token chunk went through the programs
    assert 0 < peak < 64e6


# --- 7. safety ---------------------------------------------------------------


class _Trap:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_weights_only_from_safetensors_never_unpickled(eager_moe, tmp_path):
    d = _copy_model(eager_moe, tmp_path / "m")
    marker = tmp_path / "unpickled"
    payload = pickle.dumps(_Trap(str(marker)))  # creates `marker` if anything ever unpickles it
    for name in ("pytorch_model.bin", "model.pt", "consolidated.pth"):
        (d / name).write_bytes(payload)
    model, tok = npumoe_mlx.load(str(d), offload="off", quiet=True)
    greedy(model, tok, "hi", 2)
    assert not marker.exists()
    for st in d.glob("*.safetensors"):
        st.unlink()
    with pytest.raises(ModelError, match="weights only in consolidated.pth, model.pt, pytorch_model.bin"):
        npumoe_mlx.load(str(d), quiet=True)
    assert not marker.exists()


PICKLE_MAGIC = re.compile(rb"^\x80[\x02-\x05]")


def test_no_pickle_in_bundles_or_source(eager_moe):
    files = [p for p in (eager_moe / "npumoe-onnx").rglob("*") if p.is_file()]
    assert files and {p.suffix for p in files} <= {".json", ".onnx", ".weights"}
    for p in files:
        head = p.read_bytes()[:4]
        assert not PICKLE_MAGIC.match(head) and head != b"PK\x03\x04", p  # no pickle, no torch zip
    bad = re.compile(r"^\s*(import|from)\s+(c?pickle|dill|joblib|cloudpickle|torch)\b|pickle\.loads?\(|torch\.load\("
                     r"|allow_pickle\s*=\s*True|\.load_state_dict\(|np\.load\(", re.M)
    hits = [f"{p}: {m.group(0)}" for pkg in ("npumoe_mlx", "ane_kernels") for p in (REPO / pkg).rglob("*.py")
            for m in bad.finditer(p.read_text())]
    assert hits == []


def test_trust_remote_code_off_unless_asked(eager_moe, tmp_path, monkeypatch, capsys):
    from mlx_lm import utils as mlx_utils

    seen = []
    real = mlx_utils.load_model

    def spy(*a, **kw):
        seen.append(kw.get("trust_remote_code"))
        return real(*a, **kw)

    monkeypatch.setattr(mlx_utils, "load_model", spy)
    npumoe_mlx.load(str(eager_moe), offload="off", quiet=True)
    npumoe_mlx.load(str(eager_moe), offload="off", quiet=True, trust_remote_code=True)
    assert seen == [False, True]
    seen.clear()
    assert run_cli(capsys, "generate", "--model", str(eager_moe), "--max-tokens", "2", "--offload", "off")[0] == 0
    assert run_cli(capsys, "info", "--model", str(eager_moe))[0] == 0
    assert seen == [False, False]
    # a model that asks to run its own code: refused, the code never runs
    d = _copy_model(eager_moe, tmp_path / "custom")
    marker = tmp_path / "ran"
    (d / "custom_model.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    _edit_config(d, model_file="custom_model.py")
    for sub, more in (("generate", ["--max-tokens", "2"]), ("info", [])):
        rc, _, err = run_cli(capsys, sub, "--model", str(d), *more)
        assert rc == 1 and "config.json asks to run custom model code" in _one_line_error(err, sub)
        assert "--trust-remote-code" in err
    assert not marker.exists()
