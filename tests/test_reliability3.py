"""Reliability, round three (issue 22): no silent wrong output from a damaged or rewritten
bundle, no crash when files change under a running model, no overwritten user files, errors
that name the problem before the work. Everything happens in temp folders."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
from mlx_lm import load as stock_load
from mlx_lm import stream_generate
from mlx_lm.sample_utils import make_sampler

import npumoe_mlx
from npumoe_mlx.build import verify
from npumoe_mlx.bundle import bundle as bundles
from npumoe_mlx.runtime.executor import offload_stats
from npumoe_mlx.tools.tiny import make_tiny_model

from conftest import EAGER, PROMPT, build, copy_model, file_tree, greedy, rehash, run_cli


REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


@pytest.fixture(scope="module")
def want(eager_moe):
    model, tok = stock_load(str(eager_moe))
    return greedy(model, tok)


def _unsampled_weights(model_dir: Path) -> Path:
    """The weights file of layer 0's second group: outside the programs a load probes when
    LOAD_OTHERS is 0 (the first group of each layer is always probed)."""
    man = json.loads((model_dir / "npumoe-onnx" / "manifest.json").read_text())
    p = next(p for p in man["programs"] if (p["layer"], p["group"]) == (0, 1))
    return model_dir / "npumoe-onnx" / next(f for f in p["files"] if f.endswith(".weights"))


def _damage_between_windows(f: Path) -> None:
    """Overwrite 4 KiB between the 16 KiB windows the load's sampled hash reads (disk rot)."""
    size = f.stat().st_size
    step = (size - bundles.SAMPLE_BYTES) // (bundles.SAMPLES - 1)
    at = bundles.SAMPLE_BYTES + (step - bundles.SAMPLE_BYTES) // 2
    assert at + 4096 <= step  # inside the gap
    with open(f, "r+b") as fh:
        fh.seek(at)
        w = np.frombuffer(fh.read(4096), np.float32)
        fh.seek(at)
        fh.write((-3 * w).tobytes())  # finite: no NaN guard sees it


# --- 1. silent wrong output ----------------------------------------------------


def test_damage_between_hash_windows_never_reaches_the_output(eager_moe, want, tmp_path, monkeypatch, capsys):
    m = copy_model(eager_moe, tmp_path / "m")
    f = _unsampled_weights(m)
    _damage_between_windows(f)
    monkeypatch.setattr(verify, "LOAD_OTHERS", 0)  # the damaged program is outside the load's sample
    model, tok = npumoe_mlx.load(str(m), offload="onnx", quiet=True)  # the sampled hashes pass
    capsys.readouterr()
    assert greedy(model, tok) == want  # stock tokens: the damaged program never ran
    warnings = [l for l in capsys.readouterr().err.splitlines() if "program failed" in l]
    assert len(warnings) == 1, warnings
    assert f.name in warnings[0] and "is damaged or changed since the build" in warnings[0]
    assert "rebuild it with `npumoe build --model" in warnings[0] and warnings[0].endswith("for the rest of the run")
    st = {s.layer: s for s in offload_stats(model)}
    assert st[0].fallback and not st[1].fallback


def test_verify_and_doctor_find_the_same_damage(eager_moe, tmp_path, capsys):
    m = copy_model(eager_moe, tmp_path / "m")
    f = _unsampled_weights(m)
    _damage_between_windows(f)
    with pytest.raises(bundles.BundleError, match=re.escape(f.name) + r" is corrupt"):
        bundles.read(m / "npumoe-onnx", m, verify=True)
    rc, out, err = run_cli(capsys, "doctor", "--model", m, "--no-bench")
    assert rc != 0, out
    assert f.name in out and "is corrupt" in out and "every program file's whole sha256" in out
    rc, out, _ = run_cli(capsys, "doctor", "--model", eager_moe, "--no-bench")
    assert rc == 0 and "no problems found" in out and "every program file's whole sha256" in out


def test_program_probed_on_first_use_when_not_probed_at_load(eager_moe, want, tmp_path, monkeypatch, capsys):
    """Hashes updated to match (a hand-edited bundle): the probe before the first call catches it."""
    m = copy_model(eager_moe, tmp_path / "m")
    f = _unsampled_weights(m)
    _damage_between_windows(f)
    rehash(m / "npumoe-onnx", f.relative_to(m / "npumoe-onnx").as_posix())
    monkeypatch.setattr(verify, "LOAD_OTHERS", 0)
    model, tok = npumoe_mlx.load(str(m), offload="onnx", quiet=True)
    capsys.readouterr()
    assert greedy(model, tok) == want
    warnings = [l for l in capsys.readouterr().err.splitlines() if "program failed" in l]
    assert len(warnings) == 1 and "program programs/L000/g01 (layer0_e2-4-5-6)" in warnings[0], warnings
    assert re.search(r"does not compute the model's experts|gave a bad output", warnings[0])


@pytest.mark.parametrize("q_bits", [None, 4], ids=["float32", "q4"])
def test_every_program_probed_on_first_use_passes_on_a_good_bundle(tmp_path, monkeypatch, capsys, q_bits):
    """No program probed at load: each one's first call reads its experts' rows from the
    safetensors (release.rows_twin) and checks the program; a good bundle keeps every layer on it."""
    m = make_tiny_model(tmp_path / "m", "qwen3_moe", seed=3, q_bits=q_bits)
    build(m)
    monkeypatch.setattr(verify, "LOAD_LAYERS", 0)
    monkeypatch.setattr(verify, "LOAD_OTHERS", 0)
    model, tok = npumoe_mlx.load(str(m), offload="onnx", quiet=True)
    capsys.readouterr()
    assert greedy(model, tok) == greedy(*stock_load(str(m)))
    assert "program failed" not in capsys.readouterr().err
    st = offload_stats(model)
    assert st and all(s.offloaded == s.calls and not s.fallback for s in st)


# --- 2. files that change under a running model ------------------------------------


def _weights(model_dir: Path):
    return sorted((model_dir / "npumoe-onnx").rglob("*.weights"))


def test_program_rewritten_in_place_after_load_keeps_the_output(eager_moe, want, tmp_path, capsys):
    m = copy_model(eager_moe, tmp_path / "m")
    model, tok = npumoe_mlx.load(str(m), offload="onnx", quiet=True)
    assert greedy(model, tok) == want  # every program ran: its session is open
    for f in _weights(m):  # rsync --inplace / cp over: same inode, other bytes
        with open(f, "r+b") as fh:
            fh.write(np.full(f.stat().st_size // 4, 7.0, np.float32).tobytes())
    assert greedy(model, tok) == want
    assert greedy(model, tok, "Another prompt, to run other tiers. " * 5) == greedy(*stock_load(str(eager_moe)), "Another prompt, to run other tiers. " * 5)


SCRIPT = """
import sys, json
from pathlib import Path
import npumoe_mlx
from mlx_lm import stream_generate
from mlx_lm.sample_utils import make_sampler
m = sys.argv[1]
model, tok = npumoe_mlx.load(m, offload="onnx", quiet=True)
run = lambda p: [r.token for r in stream_generate(model, tok, p, max_tokens=8, sampler=make_sampler(0.0))]
first = run(sys.argv[2])
for f in sorted(Path(m, "npumoe-onnx").rglob("*")):
    if f.is_file() and f.suffix in (".weights", ".onnx"):
        open(f, "wb").close()  # truncated under the running model
print(json.dumps([first, run(sys.argv[2]), run(sys.argv[3])]))
"""


def test_truncated_program_after_load_never_kills_the_process(eager_moe, tmp_path):
    m = copy_model(eager_moe, tmp_path / "m")
    other = "Another prompt, to run other tiers. " * 5
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(m), PROMPT, other], capture_output=True, text=True,
                       env=ENV, timeout=300)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])  # not -7 (SIGBUS)
    first, again, then = json.loads(r.stdout.strip().splitlines()[-1])
    model, tok = stock_load(str(eager_moe))
    run = lambda p: [x.token for x in stream_generate(model, tok, p, max_tokens=8, sampler=make_sampler(0.0))]
    assert first == again == run(PROMPT) and then == run(other)


# --- 3. compare never overwrites what it did not write ------------------------------


class NoWork(Exception):
    """Raised by the slow step a command must not reach when its output path is bad."""


def _no_work(*a, **kw):
    raise NoWork("the work started")


def _one_line(err: str, sub: str) -> str:
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and "Traceback" not in err and "NoWork" not in err, err
    assert lines[0].startswith(f"npumoe {sub}: error: "), lines
    return lines[0]


def test_compare_never_overwrites_a_file_it_did_not_write(eager_moe, tmp_path, capsys, monkeypatch):
    from npumoe_mlx.tools import compare

    d = tmp_path / "notes"
    d.mkdir()
    (d / "compare.md").write_text("my own notes")
    monkeypatch.setattr(compare, "measure_side", _no_work)
    rc, _, err = run_cli(capsys, "compare", "--model", eager_moe, "--out", d, "--prompt-tokens", "16", "--max-tokens", "2")
    line = _one_line(err, "compare")
    assert rc == 1 and f"--out {d} holds compare.md, which npumoe compare did not write; nothing was run" in line
    assert (d / "compare.md").read_text() == "my own notes" and sorted(p.name for p in d.iterdir()) == ["compare.md"]


@pytest.mark.parametrize("where", ["root", "proc", "file"])
def test_compare_refuses_root_system_folders_and_a_file(eager_moe, tmp_path, capsys, monkeypatch, where):
    from npumoe_mlx.tools import compare

    f = tmp_path / "results.txt"
    f.write_text("mine")
    out = {"root": "/", "proc": "/proc/npumoe-x", "file": str(f)}[where]
    monkeypatch.setattr(compare, "measure_side", _no_work)
    monkeypatch.setattr(compare, "write_outputs", _no_work)
    rc, _, err = run_cli(capsys, "compare", "--model", eager_moe, "--out", out, "--prompt-tokens", "16", "--max-tokens", "2")
    line = _one_line(err, "compare")
    want = "exists and is not a folder" if where == "file" else "is a system folder"
    assert rc == 1 and f"--out {out} {want}; nothing was run or written" in line
    assert f.read_text() == "mine"


def test_compare_rerun_replaces_its_own_outputs(eager_moe, tmp_path, capsys):
    d = tmp_path / "c"
    args = ["compare", "--model", eager_moe, "--out", d, "--prompt-tokens", "16", "--max-tokens", "2", "--no-logits"]
    assert run_cli(capsys, *args)[0] == 0
    first = json.loads((d / "compare.json").read_text())
    assert run_cli(capsys, *args)[0] == 0  # its own files (listed in npumoe_compare.json): replaced
    assert json.loads((d / "npumoe_compare.json").read_text())["files"] == ["compare.json", "compare.md", "compare.png"]
    assert json.loads((d / "compare.json").read_text())["model"] == first["model"]


# --- 6. every output path checked before the work ------------------------------------


def _error_line(err: str, sub: str) -> str:
    """The one error line of a command that also logs progress (build)."""
    lines = [l for l in err.splitlines() if l.startswith(f"npumoe {sub}: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _patch(monkeypatch, dotted: str):
    import importlib

    mod, name = dotted.rsplit(".", 1)
    monkeypatch.setattr(importlib.import_module(mod), name, _no_work)


OUTPUT_CASES = {  # id: (argv after the model, flag, bad path kind, the slow step)
    "generate-stats-dir": (["generate", "--prompt", "hi", "--max-tokens", "2", "--stats", "{dir}"], "--stats", "is a folder",
                           "npumoe_mlx.cli.generate.load"),
    "doctor-json-dir": (["doctor", "--no-bench", "--json", "{dir}"], "--json", "is a folder", "npumoe_mlx.cli.doctor.run"),
    "doctor-json-root": (["doctor", "--no-bench", "--json", "/"], "--json", "is a folder", "npumoe_mlx.cli.doctor.run"),
    "info-json-proc": (["info", "--json", "/proc/npumoe-x.json"], "--json", "is in a system folder",
                       "npumoe_mlx.cli.info.find_expert_blocks"),
    "tune-out-root": (["tune", "--out", "/"], "--out", "is a folder", "npumoe_mlx.build.tune.tune"),
    "tune-out-proc": (["tune", "--out", "/proc/npumoe-x"], "--out", "is in a system folder", "npumoe_mlx.build.tune.tune"),
    "calibrate-routes-root": (["calibrate", "--tokens", "16", "--save-routes", "/"], "--save-routes", "is a folder",
                              "npumoe_mlx.build.calibrate.calibrate"),
    "calibrate-out-dir": (["calibrate", "--tokens", "16", "--out", "{dir}"], "--out", "is a folder",
                          "npumoe_mlx.build.calibrate.calibrate"),
    "build-out-proc": (["build", "--out", "/proc/npumoe-xx", "--force"], "--out", "is a system folder",
                       "npumoe_mlx.build.build.build"),
    "plan-json-dir": (["plan", "--json", "{dir}"], "--json", "is a folder", "npumoe_mlx.bundle.bundle.read"),
}


@pytest.mark.parametrize("case", sorted(OUTPUT_CASES))
def test_output_paths_checked_before_the_work(eager_moe, tmp_path, capsys, monkeypatch, case):
    argv, flag, why, slow = OUTPUT_CASES[case]
    _patch(monkeypatch, slow)
    argv = [a.replace("{dir}", str(tmp_path)) for a in argv]
    before = sorted(p.name for p in tmp_path.iterdir())
    rc, _, err = run_cli(capsys, argv[0], "--model", eager_moe, *argv[1:])
    line = _one_line(err, argv[0])
    bad = argv[argv.index(flag) + 1]
    assert rc != 0 and f"error: {flag} {bad} {why}" in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == before


# --- 5. another model's bundle --------------------------------------------------------


@pytest.fixture(scope="module")
def other(tmp_path_factory):
    """Another tiny qwen3_moe (same shapes, other weights) with its own valid bundle."""
    path = make_tiny_model(tmp_path_factory.mktemp("other") / "O", "qwen3_moe", seed=7)
    build(path, tokens=64)
    return path


def test_another_models_bundle_is_named_and_its_fix_never_overwrites_it(eager_moe, other, capsys):
    from npumoe_mlx.bundle.fingerprint import model_fingerprint

    theirs = other / "npumoe-onnx"
    before = file_tree(theirs)
    rc, _, err = run_cli(capsys, "generate", "--model", eager_moe, "--offload", "onnx", "--bundle", theirs,
                          "--prompt", "hi", "--max-tokens", "2")
    line = _one_line(err, "generate")
    a, b = model_fingerprint(other)[:12], model_fingerprint(eager_moe)[:12]
    assert rc == 1 and f"{theirs}: built for another model ({other}): fingerprint {a}, this model {b}" in line, line
    assert "changed after the build" not in line
    fix = re.findall(r"`(npumoe [^`]+)`", line)
    assert fix == [f"npumoe build --model {eager_moe} --backend onnx"], fix  # this model's own place, never --out theirs
    assert f"(it goes to {eager_moe / 'npumoe-onnx'})" in line
    assert file_tree(theirs) == before
    # the API says the same
    with pytest.raises(bundles.BundleError, match=re.escape(f"built for another model ({other}): fingerprint {a}")):
        npumoe_mlx.load(str(eager_moe), offload="onnx", bundle=str(theirs), quiet=True)


def test_the_model_changed_after_the_build_still_rebuilds_in_place(eager_moe, other, tmp_path, capsys):
    m = tmp_path / "m"
    shutil.copytree(other, m, ignore=shutil.ignore_patterns("npumoe-*"))
    shutil.copytree(eager_moe / "npumoe-onnx", m / "npumoe-onnx")  # its own place, other weights: a changed model
    with pytest.raises(bundles.BundleError) as e:
        npumoe_mlx.load(str(m), offload="onnx", quiet=True)
    assert "model fingerprint differs" in str(e.value) and "the model changed after the build" in str(e.value)
    assert f"rebuild it with `npumoe build --model {m} --backend onnx --force`" in str(e.value)


def test_missing_bundle_dir_fix_builds_into_that_dir(eager_moe, tmp_path, capsys):
    nob = tmp_path / "nob" / "b"
    rc, _, err = run_cli(capsys, "generate", "--model", eager_moe, "--offload", "onnx", "--bundle", nob,
                          "--prompt", "hi", "--max-tokens", "2")
    line = _one_line(err, "generate")
    assert rc == 1 and f"no onnx bundle for this model at {nob}" in line
    fix = re.findall(r"`(npumoe [^`]+)`", line)
    assert fix == [f"npumoe build --model {eager_moe} --backend onnx --out {nob}"], line


# --- 4. every bundle file validated by type at load -------------------------------------


def _edit(name, fn):
    def edit(d):
        p = d / name
        obj = json.loads(p.read_text())
        fn(obj)
        p.write_text(json.dumps(obj))
        if name != "manifest.json":
            rehash(d, name)
    return edit


def _set(path, value):
    def fn(obj):
        *head, last = path
        for k in head:
            obj = obj[k]
        obj[last] = value
    return fn


TYPE_CASES = {  # id: (file, edit, the field and what it must be)
    "tier-string": ("plan.json", _set(["layers", 0, "groups", 0, "tiers", 1], "16"),
                    'layers[0].groups[0].tiers[1] is "16" (a string), but it must be an integer'),
    "tiers-empty": ("plan.json", _set(["layers", 0, "groups", 0, "tiers"], []),
                    "layers[0].groups[0].tiers is empty, but it must list at least one"),
    "layer-a-list": ("plan.json", _set(["layers", 0], [1, 2]), "layers[0] is [1, 2] (a list), but it must be an object"),
    "min-tokens-x": ("plan.json", _set(["layers", 0, "min_tokens"], "x"),
                     'layers[0].min_tokens is "x" (a string), but it must be an integer'),
    "objective": ("plan.json", _set(["layers", 1, "objective"], "speed"),
                  'layers[1].objective is "speed" (a string), but it must be "time" or "energy"'),
    "capacities": ("plan.json", _set(["limits", "capacities"], "8,16"),
                   'limits.capacities is "8,16" (a string), but it must be a list'),
    "cost-string": ("cost.json", _set(["dispatch_s"], "fast"), 'dispatch_s is "fast" (a string), but it must be a finite number'),
    "cost-negative": ("cost.json", _set(["workers"], -2), "workers is -2 (an integer), but it must be >= 0"),
    "manifest-layer": ("manifest.json", _set(["programs", 0, "layer"], "0"),
                       'programs[0].layer is "0" (a string), but it must be an integer'),
    "manifest-bytes": ("manifest.json", lambda m: next(iter(m["programs"][0]["files"].values())).update(bytes="big"),
                       '.onnx.bytes is "big" (a string), but it must be an integer'),
    "manifest-programs": ("manifest.json", _set(["programs"], {"a": 1}),
                          'programs is {"a": 1} (an object), but it must be a list'),
}


@pytest.mark.parametrize("case", sorted(TYPE_CASES))
def test_bundle_json_checked_by_type_naming_file_field_and_fix(eager_moe, tmp_path, capsys, case):
    name, fn, msg = TYPE_CASES[case]
    d = tmp_path / "b"
    shutil.copytree(eager_moe / "npumoe-onnx", d)
    _edit(name, fn)(d)
    with pytest.raises(bundles.BundleError) as e:
        npumoe_mlx.load(str(eager_moe), offload="onnx", bundle=str(d), quiet=True)
    assert str(e.value).startswith(f"{d / name}: ") and msg in str(e.value), str(e.value)
    assert re.match(r"^\S+: programs\[0\]\.files\.programs/L000/g00/\S+\.onnx\.bytes is", str(e.value)) or case != "manifest-bytes"
    assert f"rebuild it with `npumoe build --model {eager_moe} --backend onnx --out {d} --force`" in str(e.value)
    rc, out, err = run_cli(capsys, "generate", "--model", eager_moe, "--bundle", d, "--offload", "onnx",
                            "--max-tokens", "2", "--prompt", "hi")
    assert rc == 1 and out == "" and msg in _one_line(err, "generate")


# --- 7. the other messages name the real problem ---------------------------------------


def test_config_field_missing_names_config_json(eager_moe, tmp_path, capsys):
    m = tmp_path / "m"
    shutil.copytree(eager_moe, m, ignore=shutil.ignore_patterns("npumoe-*"))
    cfg = json.loads((m / "config.json").read_text())
    del cfg["num_experts"]
    (m / "config.json").write_text(json.dumps(cfg))
    rc, _, err = run_cli(capsys, "generate", "--model", m, "--prompt", "hi", "--max-tokens", "2")
    line = _one_line(err, "generate")
    assert rc == 1 and f"{m}: config.json has no num_experts (the model's code needs it); restore or re-download" in line
    assert "ModelArgs" not in line


def test_moe_intermediate_size_zero_is_a_config_error(eager_moe, tmp_path, capsys):
    m = tmp_path / "m"
    shutil.copytree(eager_moe, m, ignore=shutil.ignore_patterns("npumoe-*"))
    cfg = json.loads((m / "config.json").read_text())
    cfg["moe_intermediate_size"] = 0
    (m / "config.json").write_text(json.dumps(cfg))
    rc, _, err = run_cli(capsys, "build", "--model", m, "--no-tune", "--tokens", "16")
    line = _one_line(err, "build")
    assert rc == 1 and "config.json: moe_intermediate_size is 0 (an integer), but it must be >= 1 in a MoE model (8 experts)" in line
    assert "division" not in line


def test_nan_weights_are_named_the_models(tmp_path, capsys):
    from safetensors.numpy import load_file, save_file

    m = make_tiny_model(tmp_path / "m", "qwen3_moe", seed=2)
    f = next(m.glob("model*.safetensors"))
    w = load_file(str(f))
    key = next(k for k in w if "layers.1" in k and "switch_mlp.down_proj.weight" in k)
    w[key] = w[key].copy()
    w[key][3, 5, 7] = np.nan  # one expert's one weight
    save_file(w, str(f), metadata={"format": "mlx"})
    rc, _, err = run_cli(capsys, "build", "--model", m, "--no-tune", "--tokens", "64", "--cost", _eager(tmp_path))
    line = _error_line(err, "build")
    assert rc == 1 and "the model's own experts of programs/L001/" in line
    assert "give NaN or Inf on a seeded probe (stock MLX): the model's weights hold NaN or Inf" in line
    assert "bug in npumoe" not in line


def _eager(tmp_path) -> Path:
    p = tmp_path / "eager.json"
    EAGER.save(str(p))
    return p


@pytest.mark.parametrize("value,want", [
    ("nan", "--memory-budget must be a number of GB >= 0 (0 = no check), got nan"),
    ("inf", "--memory-budget must be a number of GB >= 0 (0 = no check), got inf"),
    ("0.0001", "over the memory budget of 0.10 MB"),
])
def test_memory_budget_nan_and_tiny(eager_moe, tmp_path, capsys, value, want):
    rc, _, err = run_cli(capsys, "build", "--model", eager_moe, "--out", tmp_path / "b", "--no-tune", "--tokens", "16",
                          "--memory-budget", value)
    line = _error_line(err, "build")
    assert rc == 1 and want in line, line
    assert "0.00 GB" not in line and "convert float NaN" not in line


def test_install_on_something_that_is_not_a_model():
    with pytest.raises(TypeError, match=r"install needs a loaded model \(an mlx.nn.Module, e.g. from mlx_lm.load\), "
                                        r"got str 'not a model'; pass a path as model_path="):
        npumoe_mlx.install("not a model", offload="onnx")


# imports, load, generation (after Python's own start-up); 4000 tokens took about 10 s here, so
# 20000 keep a run going well past 5.0 s on a faster machine too: a lost Ctrl-C is exit 0, not a race
@pytest.mark.parametrize("after", [1.0, 2.5, 5.0])
def test_ctrl_c_at_any_moment_prints_interrupted_and_exits_130(eager_moe, after):
    import signal
    import time

    p = subprocess.Popen([sys.executable, "-m", "npumoe_mlx.cli", "generate", "--model", str(eager_moe), "--offload", "onnx",
                          "--prompt", PROMPT * 20, "--max-tokens", "20000"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV, text=True)
    time.sleep(after)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, (p.returncode, err[-2000:])
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "npumoe generate: interrupted", err[-2000:]



def _run_py(code: str, tmp_path=None) -> subprocess.CompletedProcess:
    """``python -c code``, or with ``tmp_path`` ``python -m`` of a module holding it (as ``python -m npumoe_mlx.cli``)."""
    if tmp_path is None:
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=120)
    (tmp_path / "ctrl_c_case.py").write_text(code)
    env = {**ENV, "PYTHONPATH": os.pathsep.join([str(tmp_path), ENV["PYTHONPATH"]])}
    return subprocess.run([sys.executable, "-m", "ctrl_c_case"], capture_output=True, text=True, env=env, timeout=120)


def test_ctrl_c_inside_exec_of_a_string_still_exits_130(tmp_path):
    # dataclasses build methods with exec(str): Ctrl-C there made CPython 3.11 end `python -m ...` by SIGINT (-2)
    # after "interrupted" was printed (seen in CI at 1.0 s)
    case = ("import sys\nfrom npumoe_mlx.interrupt import exit_code\n"
            "try:\n    exec('raise KeyboardInterrupt')\nexcept KeyboardInterrupt:\n    {exit}")
    r = _run_py(case.format(exit="sys.exit(exit_code('npumoe x'))"), tmp_path)
    assert r.returncode == 130, (r.returncode, r.stderr[-1000:])
    assert r.stderr.strip() == "npumoe x: interrupted"
    r = _run_py(case.format(exit="sys.exit(130)"), tmp_path)  # what Python does on its own
    assert r.returncode == -2


def test_ctrl_c_landing_in_a_weakref_callback_is_not_lost():
    # importlib's module locks are weakref callbacks: Ctrl-C there was "Exception ignored" and the run went on (exit 0)
    body = ("import sys, time, weakref\nfrom npumoe_mlx.interrupt import keep_ctrl_c, exit_code\n{keep}"
            "class A: pass\n"
            "def cb(_): raise KeyboardInterrupt\n"
            "a = A(); r = weakref.ref(a, cb)\n"
            "try:\n    del a\n    [time.sleep(0.01) for _ in range(50)]\n    sys.exit(0)\n"
            "except KeyboardInterrupt:\n    sys.exit(exit_code('npumoe x'))")
    r = _run_py(body.format(keep="keep_ctrl_c()\n"))
    assert r.returncode == 130 and r.stderr.strip() == "npumoe x: interrupted", (r.returncode, r.stderr[-1000:])
    r = _run_py(body.format(keep=""))  # what Python does on its own, which the hook changes
    assert r.returncode == 0 and "Exception ignored" in r.stderr


def test_ctrl_c_inside_an_extensions_import_is_an_interrupt_not_a_broken_install(tmp_path, monkeypatch, capsys):
    # pybind11 turns Ctrl-C in a module's init into ImportError("initialization failed") caused by it;
    # the CLI said "onnxruntime cannot be imported ...; use --offload onnx (or auto) here" and exited 1
    from npumoe_mlx import cli
    from npumoe_mlx.backends import registry

    (tmp_path / "fake_ext.py").write_text('raise ImportError("initialization failed") from KeyboardInterrupt()\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.SUBCOMMANDS, "generate", ("fake_ext", "generate"))
    assert cli.main(["generate"]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "npumoe generate: interrupted"

    class Interrupted:  # onnxruntime's import, interrupted
        def find_spec(self, name, path=None, target=None):
            if name == "onnxruntime":
                raise ImportError("initialization failed") from KeyboardInterrupt()

    monkeypatch.delitem(sys.modules, "onnxruntime", raising=False)
    monkeypatch.setattr(sys, "meta_path", [Interrupted()] + sys.meta_path)
    with pytest.raises(KeyboardInterrupt):
        registry.get("onnx").available()
    monkeypatch.setattr(sys, "meta_path", sys.meta_path[1:])
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # a missing package stays an answer, not an interrupt
    ok, why = registry.get("onnx").available()
    assert not ok and why.startswith("onnxruntime cannot be imported")


def test_bundle_copied_over_a_served_one_keeps_the_server_up_and_stock_equal(eager_moe, other, tmp_path):
    from mlx_lm import generate as stock_generate

    from tests.test_server import Server, _ask

    m = copy_model(eager_moe, tmp_path / "m")
    (tmp_path / "hub").mkdir()
    srv = Server([sys.executable, "-m", "npumoe_mlx.cli.server", "--model", str(m), "--offload", "onnx"], tmp_path / "srv.log",
                 env={"HF_HUB_CACHE": str(tmp_path / "hub")})
    try:
        srv.wait_ready()
        first = _ask(srv.client(), "completion", False, prompt=PROMPT, max_tokens=12)
        for f in _weights(m) + sorted((m / "npumoe-onnx").rglob("*.onnx")):
            open(f, "wb").close()  # `cp` truncates each file it writes over
        for f in sorted((other / "npumoe-onnx").rglob("*")):
            if f.is_file():
                dst = m / "npumoe-onnx" / f.relative_to(other / "npumoe-onnx")
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(f, dst)
        again = _ask(srv.client(), "completion", False, prompt=PROMPT, max_tokens=12)
        other_prompt = _ask(srv.client(), "completion", True, prompt="Another prompt, to run other tiers. " * 5,
                            max_tokens=12)
        assert srv.proc.poll() is None, srv.text()[-2000:]  # alive: no SIGBUS
    finally:
        srv.stop()
    model, tok = stock_load(str(eager_moe))
    sampler = make_sampler(0.0)
    assert first[0] == again[0] == stock_generate(model, tok, PROMPT, max_tokens=12, sampler=sampler)
    assert other_prompt[0] == stock_generate(model, tok, "Another prompt, to run other tiers. " * 5, max_tokens=12,
                                             sampler=sampler)
