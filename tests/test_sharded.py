"""Offload on mlx_lm's sharded models: tensor and pipeline parallel over `mlx.launch --backend ring -n 2`
on 127.0.0.1, and the single-process path of sharded_load."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
from mlx_lm import generate as stock_generate
from mlx_lm import load as stock_load

import npumoe_mlx
from npumoe_mlx.build.calibrate import Profile
from npumoe_mlx.bundle import bundle as bundles
from npumoe_mlx.bundle.fingerprint import model_fingerprint
from npumoe_mlx.runtime import sharded
from npumoe_mlx.runtime.executor import offload_stats, summarize
from npumoe_mlx.tools.tiny import make_tiny_model

from conftest import PROMPT, greedy
from sharded_worker import BUILD  # tests/ is on sys.path under pytest: the workers' eager cost model

HERE = Path(__file__).parent
# Installed beside this interpreter (a venv's bin/ need not be on PATH), else anywhere on PATH.
LAUNCH = shutil.which("mlx.launch", path=os.path.dirname(sys.executable)) or shutil.which("mlx.launch")
pytestmark = pytest.mark.skipif(LAUNCH is None, reason="mlx.launch is not installed beside Python or on PATH")


def _free_port_pair() -> int:
    """A port p with p and p+1 free on 127.0.0.1 (the ring backend listens on one per rank)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", p + 1))
            return p
        except OSError:
            continue
    raise RuntimeError("no two consecutive free ports on 127.0.0.1")


def _launch(*cmd, timeout=150) -> subprocess.CompletedProcess:
    """Two ranks on loopback only: --hosts 127.0.0.1 (mlx.launch runs local ranks without ssh)."""
    argv = [LAUNCH, "--backend", "ring", "--hosts", "127.0.0.1", "-n", "2", "--starting-port", str(_free_port_pair()),
            "--python", sys.executable, "--", *cmd]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks
        out, err = proc.communicate()
        pytest.fail(f"mlx.launch timed out after {timeout} s:\n{out[-2000:]}\n{err[-4000:]}")
    assert proc.returncode == 0, f"mlx.launch failed ({proc.returncode}):\n{out[-2000:]}\n{err[-4000:]}"
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def _rows(out: str):
    return [json.loads(l) for l in out.splitlines() if l.startswith("{")]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two families with `shard` support, float32 and 4-bit, and their single-process stock tokens."""
    root = tmp_path_factory.mktemp("sharded")
    m = {
        # tensor parallel: each expert's H=64 splits into 2 x 32 (= the q4 group size)
        "ds": make_tiny_model(root / "ds", "deepseek_v3", seed=3),  # dense layer 0, MoE layer 1, shared expert
        "qw4": make_tiny_model(root / "qw4", "qwen3_moe", seed=3, q_bits=4),
        # pipeline: rank 1 runs the first half of the layers, rank 0 the second
        "qw": make_tiny_model(root / "qw", "qwen3_moe", seed=3),
        "ds4q": make_tiny_model(root / "ds4q", "deepseek_v3", seed=3, q_bits=4, num_layers=4),
        # the other tiny families whose mlx_lm model has `shard` (gpt_oss, minimax: no pipeline)
        **{f: make_tiny_model(root / f, f, seed=3) for f in ("deepseek_v2", "glm4_moe", "gpt_oss", "minimax")},
    }
    want = {}
    for k, p in m.items():
        model, tok = stock_load(str(p))
        want[k] = greedy(model, tok, n=8)
    return m, want


def _check_scheme(rows, models, want, names, key_of, stock_ranks=()):
    """stock_ranks: (name, rank) pairs that hold no MoE layer (pipeline), so run no program."""
    m, _ = models
    assert sorted((r["model"], r["rank"]) for r in rows) == sorted((str(m[n]), r) for n in names for r in (0, 1))
    for r in rows:
        name = next(n for n in names if str(m[n]) == r["model"])
        assert r["tokens"] == want[name], (name, r["rank"])  # same greedy tokens as one process, stock
        assert r["shard"] == key_of(r["rank"])
        assert r["bundle"] == str(m[name] / f"npumoe-onnx-{key_of(r['rank'])}")
        # every rank's own programs ran (stats gathered from both ranks)
        assert [s["rank"] for s in r["stats"]] == [0, 1]
        for s in r["stats"]:
            if (name, s["rank"]) in stock_ranks:
                assert s["layers"] == 0 and s["program_calls"] == 0
            else:
                assert s["program_calls"] > 0 and s["offloaded_calls"] > 0 and not s["fallbacks"], (name, s)
    first = sorted((r for r in rows if "missing_error" in r), key=lambda r: r["rank"])
    assert len(first) == 2
    name = next(n for n in names if str(m[n]) == first[0]["model"])
    for r in first:  # an explicit backend with no bundle fails on every rank, with the rank's shard named
        assert r["missing_error"] and "build=True" in r["missing_error"]
        # rank 1's build lock is held by a live process: rank 1 says so, rank 0 fails with it
        assert r["locked_error"].startswith("BuildInProgress: build in progress" if r["rank"] == 1 else "OffloadError: another rank")
        assert not r["rebuilt"]
        assert r["tokens_after_rebuild"] == want[name]
    assert [r["rebuilt_alone"] for r in first] == [False, True]  # only rank 1 lost (and rebuilt) its bundle


def _manifest(path):
    return json.loads((Path(path) / "manifest.json").read_text())


TENSOR = ("ds", "qw4", "deepseek_v2", "glm4_moe", "gpt_oss", "minimax")


@pytest.fixture(scope="module")
def tensor_run(models):
    """One launch: build, generate and stats for every tensor-parallel model (bundles stay)."""
    m, _ = models
    return _rows(_launch(str(HERE / "sharded_worker.py"), "tensor", *(str(m[n]) for n in TENSOR)).stdout)


def test_tensor_parallel_two_ranks(models, tensor_run):
    m, want = models
    names, rows = TENSOR, tensor_run
    _check_scheme(rows, models, want, names, lambda r: f"tp2-r{r}")
    for name in ("ds", "qw4"):
        mans = [_manifest(m[name] / f"npumoe-onnx-tp2-r{r}") for r in (0, 1)]
        plans = [bundles.read(m[name] / f"npumoe-onnx-tp2-r{r}").plan for r in (0, 1)]
        # each rank's bundle is keyed by its own weights, never by the whole model's files
        fps = {man["model_fingerprint"] for man in mans}
        assert len(fps) == 2 and model_fingerprint(m[name]) not in fps
        # programs built from the rank's slice: H = 64 / 2 for every MoE layer, all layers on both ranks
        for plan in plans:
            assert plan.layers and all(lp.H == 32 and lp.D == 64 for lp in plan.layers)
        assert [lp.layer for lp in plans[0].layers] == [lp.layer for lp in plans[1].layers]
        # calibration saw the routing each rank sees: under tensor parallel, the same on both
        profiles = [Profile.load(m[name] / f"npumoe-onnx-tp2-r{r}" / "profile.json") for r in (0, 1)]
        assert [l.counts for l in profiles[0].layers] == [l.counts for l in profiles[1].layers]
        assert sum(sum(l.counts) for l in profiles[0].layers) > 0
    # deepseek's shared expert is split the same way and runs on programs on both ranks
    for r in (0, 1):
        plan = bundles.read(m["ds"] / f"npumoe-onnx-tp2-r{r}").plan
        assert [sp.H for lp in plan.layers for sp in lp.shared] == [32]


def test_pipeline_two_ranks(models):
    m, want = models
    names = ("qw", "ds4q", "glm4_moe")
    res = _launch(str(HERE / "sharded_worker.py"), "pipeline", *(str(m[n]) for n in names))
    rows = _rows(res.stdout)
    # glm4_moe's rank 1 holds only the dense layer 0: no bundle, stock MLX, yet it ran the
    # others' calibration passes with them (else the build would hang)
    _check_scheme(rows, models, want, names, lambda r: f"pp2-r{r}", stock_ranks={("glm4_moe", 1)})
    assert not (m["glm4_moe"] / "npumoe-onnx-pp2-r1").exists()
    # each rank's bundle covers exactly the MoE layers it holds: rank 1 the first half
    held = {"qw": {1: [0], 0: [1]}, "ds4q": {1: [1], 0: [2, 3]}, "glm4_moe": {0: [1]}}  # layer 0 dense in ds4q, glm4_moe
    for name, by_rank in held.items():
        for r, layers in by_rank.items():
            plan = bundles.read(m[name] / f"npumoe-onnx-pp2-r{r}").plan
            assert [lp.layer for lp in plan.layers] == layers
            # calibration recorded only the layers this rank holds
            profile = Profile.load(m[name] / f"npumoe-onnx-pp2-r{r}" / "profile.json")
            assert [l.layer for l in profile.layers] == layers and all(sum(l.counts) > 0 for l in profile.layers)
            assert all(lp.H == 64 for lp in plan.layers)  # pipeline ranks keep whole experts


def test_generate_cli_under_mlx_launch(models, tensor_run):
    """`npumoe generate` under mlx.launch: tensor parallel with the per-rank bundles tensor_run
    built; only rank 0 prints; --stats lists every rank's program calls."""
    m, _ = models
    prompt = "The quick brown fox jumps over the lazy dog."
    res = _launch("-m", "npumoe_mlx.cli", "generate", "--model", str(m["ds"]), "--prompt", prompt,
                  "--max-tokens", "8", "--offload", "onnx", "--stats", "--ignore-chat-template")
    model, tok = stock_load(str(m["ds"]))
    text = stock_generate(model, tok, prompt, max_tokens=8)
    assert res.stdout.count("Prompt:") == 1 and res.stdout.count("==========") == 2  # rank 0 only
    assert f"==========\n{text}\n==========" in res.stdout
    calls = {int(r): int(c) for r, c in re.findall(r"rank (\d): offload: \d+/\d+ MoE layer calls ran programs \((\d+) program calls", res.stdout)}
    assert sorted(calls) == [0, 1] and all(c > 0 for c in calls.values()), res.stdout


def test_single_process_sharded_load_uses_the_model_bundle(models, tmp_path):
    """One rank: sharded_load is load with build: the model's own bundle, fingerprint of its files."""
    m, want = models
    path = make_tiny_model(tmp_path / "m", "qwen3_moe", seed=3)
    model, tok = npumoe_mlx.sharded_load(str(path), offload="onnx", build=True, build_options=BUILD, quiet=True)
    assert sharded.shard_of(model).key == "tp1-r0" and not sharded.shard_of(model).sharded
    assert _manifest(path / "npumoe-onnx")["model_fingerprint"] == model_fingerprint(path)
    assert greedy(model, tok, n=8) == want["qw"]
    assert summarize(offload_stats(model))["program_calls"] > 0
    assert [s["rank"] for s in sharded.rank_stats(model)] == [0]


def test_shard_keys():
    assert sharded.Shard(tensor_size=2, tensor_rank=1).key == "tp2-r1"
    assert sharded.Shard(pipeline_size=4, pipeline_rank=3).key == "pp4-r3"
    assert sharded.Shard(2, 0, 2, 1).key == "pp2-r1-tp2-r0"


def test_shard_fingerprint_follows_the_rank_weights_and_shard(models, monkeypatch):
    """The key of a rank's bundle changes with its weights (a sampled slice) and with the shard."""
    m, _ = models
    monkeypatch.setattr(sharded, "FULL_ELEMS", 4096)  # tiny tensors: sample them like large ones
    model, _, config = stock_load(str(m["qw"]), return_config=True)
    one = sharded.Shard(tensor_size=2, tensor_rank=0)
    fp = sharded.shard_fingerprint(model, config, one)
    assert fp == sharded.shard_fingerprint(model, config, one)
    assert fp != sharded.shard_fingerprint(model, config, sharded.Shard(tensor_size=2, tensor_rank=1))
    w = model.model.layers[1].mlp.switch_mlp.down_proj.weight  # (E, D, H): sampled, not whole
    assert w.size > sharded.FULL_ELEMS
    model.model.layers[1].mlp.switch_mlp.down_proj.weight = w.at[0, 0, 0].add(1.0)
    assert fp != sharded.shard_fingerprint(model, config, one)


def test_server_under_mlx_launch(models, tensor_run, tmp_path):
    """`npumoe server` under mlx.launch: mlx_lm.server's distributed mode (rank 0 serves HTTP)
    with each rank's experts on its own per-rank programs (built by tensor_run); the text at
    temperature 0 equals single-process stock mlx_lm, and rank 0's programs ran."""
    import urllib.request

    m, _ = models
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [LAUNCH, "--backend", "ring", "--hosts", "127.0.0.1", "-n", "2", "--starting-port", str(_free_port_pair()),
            "--python", sys.executable, "--", "-m", "npumoe_mlx.cli.server", "--model", str(m["ds"]), "--offload", "onnx",
            "--host", "127.0.0.1", "--port", str(port)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"),
           "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    log = open(tmp_path / "server.log", "wb")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def get(path):
        with urllib.request.urlopen(url + path, timeout=10) as r:
            return json.loads(r.read() or b"null")

    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text(errors="replace")[-4000:]
            try:
                get("/health")
                break
            except OSError:
                assert time.monotonic() < deadline, (tmp_path / "server.log").read_text(errors="replace")[-4000:]
                time.sleep(0.3)
        body = json.dumps({"prompt": PROMPT, "max_tokens": 8, "temperature": 0.0}).encode()
        req = urllib.request.Request(url + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            text = json.loads(r.read())["choices"][0]["text"]
        st = get("/v1/npumoe/stats")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks
        proc.wait(timeout=30)
        log.close()
    model, tok = stock_load(str(m["ds"]))
    assert text == stock_generate(model, tok, PROMPT, max_tokens=8)
    assert st["total"]["program_calls"] > 0 and not st["total"]["fallbacks"], st
