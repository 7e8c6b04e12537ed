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
from npumoe_mlx.build.build import build as build_bundle
from npumoe_mlx.bundle import bundle as bundles
from npumoe_mlx.planning.cost import CostModel
from npumoe_mlx.planning.plan import format_plan
from npumoe_mlx.tools.tiny import make_tiny_model

from conftest import build, file_tree, rehash, run_cli


REPO = Path(__file__).resolve().parents[1]


# --- 1. data loss --------------------------------------------------------------


def test_tiny_model_never_deletes_user_files(tmp_path, capsys):
    x = tmp_path / "X"
    assert run_cli(capsys, "tiny-model", "--family", "qwen3_moe", "--out", x)[0] == 0
    (x / "npumoe-onnx").mkdir()
    (x / "npumoe-onnx" / "manifest.json").write_text("{}")
    (x / "notes.txt").write_text("mine")
    before = file_tree(x)
    rc, out, err = run_cli(capsys, "tiny-model", "--family", "mixtral", "--out", x)
    assert rc == 2 and file_tree(x) == before  # refused, nothing changed
    assert re.search(r"holds files npumoe tiny-model did not write \(notes\.txt, npumoe-onnx\); nothing was "
                     r"changed: pass --force", err)
    rc, out, err = run_cli(capsys, "tiny-model", "--family", "mixtral", "--out", x, "--force")
    assert rc == 0, err
    assert json.loads((x / "config.json").read_text())["model_type"] == "mixtral"
    assert (x / "notes.txt").read_text() == "mine" and (x / "npumoe-onnx" / "manifest.json").read_text() == "{}"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left
    # a folder the factory did not write is refused even with --force
    y = tmp_path / "Y"
    y.mkdir()
    (y / "config.json").write_text("{}")
    rc, _, err = run_cli(capsys, "tiny-model", "--family", "mixtral", "--out", y, "--force")
    assert rc == 2 and "was not written by npumoe tiny-model (no npumoe_tiny.json)" in err
    assert (y / "config.json").read_text() == "{}"


def test_demo_rerun_keeps_user_files(tmp_path, capsys):
    from npumoe_mlx.tools.demo import main

    d = tmp_path / "D"
    args = ["--out", str(d), "--small", "--prompt-tokens", "64", "--max-tokens", "2", "--layers", "1"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "random weights" in printed and "gibberish" in printed  # says the model is random
    assert main(args) == 0  # a rerun over its own output needs no --force
    (d / "model" / "notes.txt").write_text("mine")
    (d / "notes.txt").write_text("mine too")
    before = file_tree(d)
    rc, _, err = run_cli(capsys, "demo", *args)
    assert rc == 1 and file_tree(d) == before
    assert "holds files npumoe demo did not write (model/notes.txt, notes.txt)" in err
    assert main(args + ["--force"]) == 0
    assert (d / "model" / "notes.txt").read_text() == "mine" and (d / "notes.txt").read_text() == "mine too"
    assert (d / "model" / "npumoe-onnx" / "manifest.json").is_file()
    # a folder the demo did not write is refused
    e = tmp_path / "E"
    e.mkdir()
    (e / "thesis.tex").write_text("x")
    rc, _, err = run_cli(capsys, "demo", "--out", e, "--small")
    assert rc == 1 and "was not written by npumoe demo (no npumoe_demo.json)" in err


def test_build_out_never_replaces_a_non_bundle_folder(eager_moe, tmp_path, capsys):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "thesis.tex").write_text("x")
    rc, _, err = run_cli(capsys, "build", "--model", eager_moe, "--out", docs, "--no-tune", "--tokens", "64", "--force")
    assert rc == 1 and "is not an npumoe bundle folder (it holds thesis.tex)" in err
    assert (docs / "thesis.tex").read_text() == "x"


def test_created_files_honour_umask(tmp_path):
    old = os.umask(0o022)
    try:
        m = make_tiny_model(tmp_path / "m", "mixtral")
        b = build(m, tokens=64)
    finally:
        os.umask(old)
    assert stat.S_IMODE(m.stat().st_mode) == 0o755
    assert stat.S_IMODE(b.stat().st_mode) == 0o755
    assert stat.S_IMODE((b / "manifest.json").stat().st_mode) == 0o644


# --- 2. the wrong model ----------------------------------------------------------


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    a = make_tiny_model(root / "A", "qwen3_moe", hf_layout=True, seed=6)
    b = make_tiny_model(root / "B", "qwen3_moe", hf_layout=True, seed=7)
    return a, b


def test_convert_never_uses_the_wrong_model(hf_pair, tmp_path, capsys):
    from npumoe_mlx.cli.convert import convert

    a, b = hf_pair
    p = tmp_path / "P"
    common = ["--no-tune", "--tokens", "64"]
    rc, out, err = run_cli(capsys, "convert", "--hf-path", a, "--mlx-path", p, *common)
    assert rc == 0, err
    weights = (p / "model.safetensors").read_bytes()
    (p / "notes.txt").write_text("mine")

    rc, out, err = run_cli(capsys, "convert", "--hf-path", b, "--mlx-path", p, *common)
    assert rc == 1 and f"{p} holds a conversion of another model (from {a})" in err
    assert "nothing was changed" in err and (p / "model.safetensors").read_bytes() == weights

    rc, out, err = run_cli(capsys, "convert", "--hf-path", a, "--mlx-path", p, "-q", "--q-bits", "4", *common)
    assert rc == 1 and "holds a conversion of other settings" in err and "quantize False -> True" in err

    rc, out, err = run_cli(capsys, "convert", "--hf-path", a, "--mlx-path", p, *common)  # same source and settings
    assert rc == 0 and "converted with the same settings: using it" in out and "up to date" in out

    r = convert(str(b), str(p), force=True, tune=False, tokens=64)  # --force converts again, keeps the user's file
    assert (p / "model.safetensors").read_bytes() != weights and (p / "notes.txt").read_text() == "mine"
    assert r == p and r.model == p and r.bundle == p / "npumoe-onnx" and r.converted  # the result names both
    assert (r.bundle / "manifest.json").is_file() and os.fspath(r) == str(p)

    foreign = tmp_path / "F"
    foreign.mkdir()
    (foreign / "config.json").write_text("{}")
    rc, out, err = run_cli(capsys, "convert", "--hf-path", a, "--mlx-path", foreign, "--force", *common)
    assert rc == 1 and "already exists and was not written by npumoe convert" in err
    assert (foreign / "config.json").read_text() == "{}"


def test_killed_conversion_leaves_no_partial_model(hf_pair, tmp_path):
    a, _ = hf_pair
    p = tmp_path / "P"
    code = (
        "import os, signal, sys; from npumoe_mlx.bundle import owned; "
        "owned.publish = lambda *a: os.kill(os.getpid(), signal.SIGKILL); "
        "from npumoe_mlx.cli.convert import main; main(sys.argv[1:])"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-c", code, "--hf-path", str(a), "--mlx-path", str(p), "--no-tune"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == -9, r.stderr
    assert not p.exists()  # killed after converting, before publishing: nothing at P
    assert [x.name for x in tmp_path.iterdir() if x.name.startswith(".tmp-P-")]  # only a hidden temp folder
    from npumoe_mlx.cli.convert import convert

    out = convert(str(a), str(p), tune=False, tokens=64)
    assert out.model == p and (p / "config.json").is_file()
    assert not [x for x in tmp_path.iterdir() if x.name.startswith(".")]  # the next run cleaned up


# --- 3. one bundle lookup ----------------------------------------------------------


def _hint_cmd(err: str) -> list:
    """The `npumoe build ...` command an error message prints, as argv."""
    m = re.search(r"`npumoe (build [^`]+)`", err)
    assert m, err
    return m.group(1).split()


def test_compare_finds_the_bundle_generate_uses(tmp_path, monkeypatch):
    from npumoe_mlx.tools.compare import ensure_bundle
    from npumoe_mlx.cli.convert import convert

    monkeypatch.setenv("NPUMOE_CACHE", str(tmp_path / "cache"))
    m = make_tiny_model(tmp_path / "m", "mixtral", seed=8)
    r = convert(str(m), tune=False, tokens=64)  # an MLX model: its bundle goes where `npumoe build` puts it
    assert r.bundle == bundles.build_target(m, "onnx") == m / "npumoe-onnx"
    assert bundles.locate_bundle(m, "onnx") == r.bundle
    assert ensure_bundle(str(m), m, "onnx", None, False, 512, print) == r.bundle  # no second copy, no error
    model, _ = npumoe_mlx.load(str(m), offload="onnx", quiet=True)
    assert model.npumoe_bundle == str(r.bundle)


def test_bad_bundle_error_names_path_and_its_fix_fixes_it(eager_moe, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("NPUMOE_CACHE", str(tmp_path / "cache"))
    m = tmp_path / "m"
    shutil.copytree(eager_moe, m)
    (m / "npumoe-onnx" / "cost.json").write_text("{}")  # corrupt the bundle beside the model
    rc, out, err = run_cli(capsys, "generate", "--model", m, "--offload", "onnx", "--prompt", "hi", "--max-tokens", "2")
    assert rc == 1 and f"{m / 'npumoe-onnx'}: cost.json is corrupt" in err
    cmd = _hint_cmd(err)
    assert cmd == ["build", "--model", str(m), "--backend", "onnx", "--force"]
    assert run_cli(capsys, *cmd, "--no-tune", "--tokens", "64")[0] == 0
    assert npumoe_mlx.load(str(m), offload="onnx", quiet=True)[0].npumoe_bundle == str(m / "npumoe-onnx")

    # an explicit --bundle: the fix names that folder
    other = tmp_path / "other"
    shutil.copytree(eager_moe / "npumoe-onnx", other)
    (other / "plan.json").write_text("{}")
    rc, out, err = run_cli(capsys, "generate", "--model", m, "--bundle", other, "--offload", "onnx",
                            "--prompt", "hi", "--max-tokens", "2")
    cmd = _hint_cmd(err)
    assert rc == 1 and cmd[-3:] == ["--out", str(other), "--force"]
    assert run_cli(capsys, *cmd, "--no-tune", "--tokens", "64")[0] == 0
    npumoe_mlx.load(str(m), offload="onnx", bundle=str(other), quiet=True)


def test_read_only_model_folder_fix_is_one_that_works(eager_moe, tmp_path, capsys, monkeypatch):
    """Tests run as root (permissions are not enforced), so the folder is made read-only
    by telling npumoe it is not writable, as os.access would for a user."""
    monkeypatch.setenv("NPUMOE_CACHE", str(tmp_path / "cache"))
    m = tmp_path / "ro"
    shutil.copytree(eager_moe, m)
    (m / "npumoe-onnx" / "cost.json").write_text("{}")  # a broken bundle in a folder we cannot write
    inside = lambda p: m in [Path(p), *Path(p).absolute().parents]
    real_w, real_ro = bundles._writable, bundles._read_only
    monkeypatch.setattr(bundles, "_writable", lambda p: real_w(p) and not inside(p))
    monkeypatch.setattr(bundles, "_read_only", lambda p: real_ro(p) or Path(p) == m)
    gen = ["generate", "--model", m, "--offload", "onnx", "--prompt", "hi", "--max-tokens", "2"]
    rc, out, err = run_cli(capsys, *gen)
    assert rc == 1 and f"{m / 'npumoe-onnx'}: cost.json is corrupt" in err
    assert "the model folder is read-only: it goes to the cache" in err
    cmd = _hint_cmd(err)
    assert cmd == ["build", "--model", str(m), "--backend", "onnx", "--force"]
    assert run_cli(capsys, *cmd, "--no-tune", "--tokens", "64")[0] == 0  # the printed fix...
    cached = bundles.cached_bundle_dir(m, "onnx")
    assert (cached / "manifest.json").is_file()
    rc, out, err = run_cli(capsys, *gen, "--stats")  # ...fixes what generate uses: the cache's bundle
    assert rc == 0 and f"bundle: {cached}" in out, err
    # an explicit bundle in a read-only place: build one elsewhere and pass it
    rc, _, err = run_cli(capsys, *gen, "--bundle", m / "npumoe-onnx")
    assert rc == 1 and "cannot be rebuilt in place (its folder is read-only)" in err and "`--bundle DIR`" in err
    rc, _, err = run_cli(capsys, "build", "--model", m, "--out", m / "npumoe-onnx", "--force", "--no-tune")
    assert rc == 1 and f"cannot write the bundle {m / 'npumoe-onnx'}: its folder is read-only" in err


# --- 4. programs verified against the model ------------------------------------------


def _tamper(d: Path, program: int) -> str:
    """Scale part of one program's weights and fix the manifest's hashes, as an attacker would."""
    import numpy as np

    man = json.loads((d / "manifest.json").read_text())
    prog = man["programs"][program]
    rel = next(f for f in prog["files"] if f.endswith(".weights"))
    w = np.fromfile(d / rel, np.float32)
    w[: w.size // 4] *= 1.5
    w.tofile(d / rel)
    rehash(d, rel)
    return prog["dir"]


def test_program_weights_changed_are_refused(eager_moe, tmp_path, capsys):
    d = tmp_path / "b"
    shutil.copytree(eager_moe / "npumoe-onnx", d)
    rel = _tamper(d, 0)  # layer 0's first (hottest) group: checked at every load
    msg = rf"{re.escape(rel)} \(layer0_e[\d-]+\) does not compute the model's experts \(tier \d+: relative error"
    with pytest.raises(bundles.BundleError, match=msg):
        npumoe_mlx.load(str(eager_moe), offload="onnx", bundle=str(d), quiet=True)
    rc, out, err = run_cli(capsys, "generate", "--model", eager_moe, "--bundle", d, "--offload", "onnx",
                            "--prompt", "hi", "--max-tokens", "2")
    assert rc == 1 and re.search(msg, err) and len(err.strip().splitlines()) == 1

    e = tmp_path / "c"
    shutil.copytree(eager_moe / "npumoe-onnx", e)
    man = json.loads((e / "manifest.json").read_text())
    last = max(i for i, p in enumerate(man["programs"]) if p["group"] != 0)
    rel = _tamper(e, last)  # any program: every one is checked with --verify
    rc, out, err = run_cli(capsys, "generate", "--model", eager_moe, "--bundle", e, "--offload", "onnx", "--verify",
                            "--prompt", "hi", "--max-tokens", "2")
    assert rc == 1 and f"{rel} (" in err and "does not compute the model's experts" in err


def test_verify_checks_whole_file_hashes(eager_moe, tmp_path, monkeypatch):
    monkeypatch.setattr(bundles, "SAMPLES", 2)  # tiny files: sample them as big ones are
    monkeypatch.setattr(bundles, "SAMPLE_BYTES", 1024)
    d = tmp_path / "b"
    shutil.copytree(eager_moe / "npumoe-onnx", d)
    man = json.loads((d / "manifest.json").read_text())
    for p in man["programs"]:
        for f, v in p["files"].items():
            v[bundles.SAMPLE_KEY] = bundles.files_under(d, Path(f))[f][bundles.SAMPLE_KEY]
    (d / "manifest.json").write_text(json.dumps(man))
    rel = next(f for p in man["programs"] for f, v in p["files"].items() if f.endswith(".weights"))
    raw = bytearray((d / rel).read_bytes())
    raw[len(raw) // 2 // 4 * 4] ^= 0x01  # a float's lowest mantissa bit, between the samples
    (d / rel).write_bytes(bytes(raw))
    # a load's sampled hashes miss it, but a program probed at load reads (and hashes) all its bytes
    with pytest.raises(bundles.BundleError, match=re.escape(f"{Path(rel).name} is damaged or changed since the build")):
        npumoe_mlx.load(str(eager_moe), offload="onnx", bundle=str(d), quiet=True)  # (issue 22)
    with pytest.raises(bundles.BundleError, match=re.escape(f"{rel} is corrupt (size or sha256 differs)")):
        npumoe_mlx.load(str(eager_moe), offload="onnx", bundle=str(d), quiet=True, verify=True)


def test_program_file_replaced_after_load_is_not_used(eager_moe, tmp_path):
    from mlx_lm import load as stock_load
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_sampler

    from npumoe_mlx.runtime.executor import offload_stats, summarize

    m = tmp_path / "m"
    shutil.copytree(eager_moe, m)
    ours, tok = npumoe_mlx.load(str(m), offload="onnx", quiet=True)
    _tamper(m / "npumoe-onnx", 0)  # after load: sessions not yet opened read the new file
    prompt = "The quick brown fox jumps over the lazy dog. " * 3
    greedy = lambda model: [r.token for r in stream_generate(model, tok, prompt, max_tokens=12, sampler=make_sampler(0.0))]
    stock, _ = stock_load(str(m))
    assert greedy(ours) == greedy(stock)
    s = summarize(offload_stats(ours))
    assert any("changed after the bundle was checked at load" in why for why in s["fallbacks"].values())


@pytest.mark.parametrize("backend", ["onnx", "coreml"])
def test_build_checks_every_program_against_the_model(eager_moe, tmp_path, monkeypatch, backend):
    from npumoe_mlx.build import build as builds
    from npumoe_mlx.build import programs

    real = programs.spec_from_switch_glu

    def shifted(module, layer, expert_ids, tiers):  # a builder bug: the weights of the next experts
        E = module.gate_proj.weight.shape[0]
        return real(module, layer=layer, expert_ids=[(e + 1) % E for e in expert_ids], tiers=tiers)

    monkeypatch.setattr(builds, "spec_from_switch_glu", shifted)  # where build() looks it up
    with pytest.raises(bundles.BundleError, match=r"build refused: program programs/L000/g00 .* does not compute"):
        build_bundle(str(eager_moe), backend, str(tmp_path / "b"), corpus=["qa"], tokens=64, chunk_size=64,
                      cost=CostModel(backend, 1e-9, 1e15, 1e15, 0.0, 1.0, 1.0, first_offload_tokens=1, source="test"), log=lambda m: None)
    assert not (tmp_path / "b").exists()


# --- 5./6. errors that say what is wrong; inputs refused ----------------------------


def _edit_config(d, **kw):
    p = d / "config.json"
    c = json.loads(p.read_text())
    c.update(kw)
    p.write_text(json.dumps(c))


CONFIG_FAULTS = {
    "top-k-string": ({"num_experts_per_tok": "2"},
                     'num_experts_per_tok is "2" (a string), but it must be an integer >= 1 (experts per token)'),
    "top-k-above-experts": ({"num_experts_per_tok": 24},
                            "num_experts_per_tok is 24 (an integer), but it must be <= the number of experts (8)"),
    "layers-null": ({"num_hidden_layers": None}, "num_hidden_layers is null, but it must be an integer >= 1"),
    "experts-float": ({"num_experts": 8.5}, "num_experts is 8.5 (a number), but it must be an integer >= 0"),
}


@pytest.mark.parametrize("case", list(CONFIG_FAULTS))
def test_config_error_names_field_value_and_rule(eager_moe, tmp_path, capsys, case):
    edit, msg = CONFIG_FAULTS[case]
    m = tmp_path / "m"
    shutil.copytree(eager_moe, m, ignore=shutil.ignore_patterns("npumoe-*"))
    _edit_config(m, **edit)
    for cmd in (["generate", "--model", m, "--prompt", "hi", "--max-tokens", "2"], ["info", "--model", m]):
        rc, out, err = run_cli(capsys, *cmd)
        assert rc == 1 and f"{m / 'config.json'}: {msg}; fix config.json" in err, err


def test_missing_expert_tensor_and_tokenizer_are_named(tmp_path, capsys):
    import mlx.core as mx

    m = make_tiny_model(tmp_path / "hf", "qwen3_moe", hf_layout=True)
    w = mx.load(str(m / "model.safetensors"))
    del w["model.layers.0.mlp.experts.3.up_proj.weight"]
    mx.save_safetensors(str(m / "model.safetensors"), w, metadata={"format": "pt"})
    rc, _, err = run_cli(capsys, "generate", "--model", m, "--prompt", "hi", "--max-tokens", "2")
    assert rc == 1 and "tensor model.layers.0.mlp.experts.3.up_proj.weight is missing from model*.safetensors" in err

    t = make_tiny_model(tmp_path / "t", "mixtral")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (t / f).unlink()
    rc, _, err = run_cli(capsys, "generate", "--model", t, "--prompt", "hi", "--max-tokens", "2")
    assert rc == 1 and f"{t}: no tokenizer (none of tokenizer.json" in err
    assert run_cli(capsys, "info", "--model", t)[0] == 0  # info needs no tokenizer


FLAG_FAULTS = {
    "prefill-step-0": (["generate", "--prompt", "hi", "--prefill-step-size", "0"],
                       "--prefill-step-size must be an integer >= 1 (tokens per prefill chunk), got 0"),
    "max-tiers-0": (["build", "--max-tiers", "0"], "--max-tiers must be an integer >= 1 (tiers per group), got 0"),
    "tokens-negative": (["build", "--tokens", "-5", "--force"], "--tokens must be an integer >= 1 (calibration tokens), got -5"),
    "max-capacity-1": (["build", "--max-capacity", "1", "--force"],
                       "--max-capacity must be an integer >= 8 (the smallest tier onnx programs have), got 1"),
    "coreml-off-macos": (["generate", "--prompt", "hi", "--offload", "coreml"], "Core ML runs only on macOS"),
    "convert-tokens-0": (["convert", "--tokens", "0", "--force"], "--tokens must be an integer >= 1 (calibration tokens), got 0"),
    "tune-repeats-0": (["tune", "--repeats", "0"], "--repeats must be an integer >= 1 (timed runs per shape), got 0"),
}


@pytest.mark.parametrize("case", list(FLAG_FAULTS))
def test_bad_flag_is_refused_before_anything_changes(eager_moe, capsys, case):
    if case == "coreml-off-macos" and sys.platform == "darwin":
        pytest.skip("Core ML runs here")
    argv, msg = FLAG_FAULTS[case]
    before = file_tree(eager_moe / "npumoe-onnx")
    rc, out, err = run_cli(capsys, argv[0], "--model", eager_moe, *argv[1:])
    assert rc == 1 and f"error: {msg}" in err and len(err.strip().splitlines()) == 1, err
    assert file_tree(eager_moe / "npumoe-onnx") == before  # the good bundle is untouched


def test_cost_file_not_json_names_the_file(eager_moe, tmp_path, capsys):
    bad = tmp_path / "cost.txt"
    bad.write_text("hello")
    rc, _, err = run_cli(capsys, "build", "--model", eager_moe, "--cost", bad, "--force")
    assert rc == 1 and f"--cost {bad}: not JSON (Expecting value" in err


def test_bundle_format_string_says_the_type(eager_moe, tmp_path):
    d = tmp_path / "b"
    shutil.copytree(eager_moe / "npumoe-onnx", d)
    man = json.loads((d / "manifest.json").read_text())
    man["format"] = "1"
    (d / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(bundles.BundleError, match=r'bundle format "1" \(a JSON str, not an integer\)'):
        npumoe_mlx.load(str(eager_moe), offload="onnx", bundle=str(d), quiet=True)


# --- 7. easier to read -----------------------------------------------------------------


def test_stats_say_which_bundle_and_why_calls_stayed_on_mlx(tmp_path, capsys):
    m = make_tiny_model(tmp_path / "m", "qwen3_moe", seed=1)
    build_bundle(str(m), "onnx", corpus=["qa"], tokens=128, chunk_size=64, tune=False, log=lambda s: None)
    # (MLX's copies kept: released layers run every call on programs, see test_release.py)
    rc, out, err = run_cli(capsys, "generate", "--model", m, "--prompt", "hi", "--max-tokens", "3", "--stats",
                            "--keep-mlx-experts")
    assert rc == 0, err
    assert f"bundle: {m / 'npumoe-onnx'}" in out
    assert re.search(r"\d+ MoE layer calls stayed on MLX: the plan runs programs only for calls of at least \d+ tokens", out)


def test_plan_prints_the_bundles_plan(eager_moe, tmp_path, capsys):
    want = format_plan(bundles.read(eager_moe / "npumoe-onnx").plan, verbose=True)
    rc, out, _ = run_cli(capsys, "plan", "--model", eager_moe)
    assert rc == 0 and f"plan of the onnx bundle {eager_moe / 'npumoe-onnx'} (the one generate uses):" in out
    assert want in out
    m = tmp_path / "m"
    shutil.copytree(eager_moe, m, ignore=shutil.ignore_patterns("npumoe-*"))
    rc, out, _ = run_cli(capsys, "plan", "--model", m, "--tokens", "64")
    assert rc == 0 and "no onnx bundle for" in out and "parametric costs" in out


def test_progress_is_line_per_step_off_a_terminal(capsys):
    import io

    from npumoe_mlx.build.progress import progress_bar

    buf = io.StringIO()
    for _ in progress_bar(range(3), desc="programs", unit="prog", file=buf):
        pass
    text = buf.getvalue()
    assert "\r" not in text and text.splitlines()[-1].startswith("programs: 3/3 prog")
    bar = progress_bar(total=10, desc="calibrating", unit="tok", file=buf)
    for _ in range(10):
        bar.update(1)
    bar.close()
    assert "\r" not in buf.getvalue() and "calibrating: 10/10 tok" in buf.getvalue()
    assert len(buf.getvalue().splitlines()) <= 4  # throttled: not one line per update


def test_convert_result_loads_like_a_path(tmp_path):
    m = make_tiny_model(tmp_path / "m", "olmoe", seed=9)
    r = npumoe_mlx.convert(str(m), in_place=True, tune=False, tokens=64)
    assert r.bundle == m / "npumoe-onnx" and r.backend == "onnx" and not r.converted
    model, _ = npumoe_mlx.load(r, quiet=True)
    assert model.npumoe_bundle == str(r.bundle)
