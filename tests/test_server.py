"""`npumoe server` against the official openai client, next to stock `mlx_lm server` (issue 12).

Both servers run as subprocesses on 127.0.0.1 at free ports, started and stopped
here, every wait bounded. The model is a float32 tiny qwen3_moe whose onnx bundle
runs every expert call on programs.
"""

import contextlib
import http.client
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import openai
import pytest

import npumoe_mlx
from npumoe_mlx.bundle import bundle as bundles
from npumoe_mlx.cli import server
from npumoe_mlx.runtime.offload import OffloadError
from npumoe_mlx.runtime.options import OffloadOptions

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
# Programs always win: every call, decode included, goes through the programs.
START_TIMEOUT = 90
CHAT = [{"role": "user", "content": "The quick brown fox jumps over the lazy dog."}]
PROMPT = "Once upon a time, in a land far away,"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server subprocess on 127.0.0.1; its output goes to a log file (no pipe to fill)."""

    def __init__(self, cmd, log: Path, env=None):
        self.port = _free_port()
        self.log = log
        self._out = open(log, "wb")
        self.proc = subprocess.Popen(
            [*cmd, "--host", "127.0.0.1", "--port", str(self.port)],
            stdout=self._out, stderr=subprocess.STDOUT, env={**ENV, **(env or {})}, cwd=log.parent,
        )
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout=START_TIMEOUT):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.text()}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            time.sleep(0.2)
        raise TimeoutError(f"server not ready in {timeout} s:\n{self.text()}")

    def client(self):
        return openai.OpenAI(base_url=self.url + "/v1", api_key="not-needed", timeout=60, max_retries=0)

    def get(self, path):
        with urllib.request.urlopen(self.url + path, timeout=10) as r:
            return r.status, json.loads(r.read())

    def post_raw(self, path, body: bytes):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
            r = conn.getresponse()
            return r.status, r.read()
        finally:
            conn.close()

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self._out.close()


def _layer_files(bundle: Path, layer: int):
    man = json.loads((bundle / "manifest.json").read_text())
    return [bundle / rel for p in man["programs"] if p["layer"] == layer for rel in p["files"]]


@pytest.fixture(scope="module")
def models(eager_moe, tmp_path_factory):
    path = eager_moe
    faulty = tmp_path_factory.mktemp("srv") / "faulty"  # the same weights (same fingerprint); its layer-0 programs change under the server
    shutil.copytree(path, faulty)
    return path, faulty


@pytest.fixture(scope="module")
def servers(models, tmp_path_factory):
    path, _ = models
    logs = tmp_path_factory.mktemp("logs")
    (logs / "hub").mkdir()  # stock /v1/models needs a hub cache folder (without one it sends an empty body)
    ours = Server([sys.executable, "-m", "npumoe_mlx.cli.server", "--model", str(path), "--offload", "onnx"], logs / "ours.log",
                  env={"HF_HUB_CACHE": str(logs / "no-such-cache")})  # ours lists the model even so
    stock = Server([sys.executable, "-m", "mlx_lm", "server", "--model", str(path)], logs / "stock.log",
                   env={"HF_HUB_CACHE": str(logs / "hub")})
    try:
        yield ours.wait_ready(), stock.wait_ready()
    finally:
        ours.stop()
        stock.stop()


def _ask(client, kind, stream, model="default_model", prompt=None, max_tokens=12):
    """(text, finish_reason) of one request at temperature 0."""
    kw = dict(model=model, max_tokens=max_tokens, temperature=0.0, stream=stream)
    if kind == "chat":
        r = client.chat.completions.create(messages=prompt or CHAT, **kw)
        if not stream:
            return r.choices[0].message.content, r.choices[0].finish_reason
        parts, finish = [], None
        for chunk in r:
            if chunk.choices:
                parts.append(chunk.choices[0].delta.content or "")
                finish = chunk.choices[0].finish_reason or finish
        return "".join(parts), finish
    r = client.completions.create(prompt=prompt or PROMPT, **kw)
    if not stream:
        return r.choices[0].text, r.choices[0].finish_reason
    parts, finish = [], None
    for chunk in r:
        if chunk.choices:
            parts.append(chunk.choices[0].text or "")
            finish = chunk.choices[0].finish_reason or finish
    return "".join(parts), finish


def _offloaded(srv):
    _, st = srv.get(server.STATS_PATH)
    return st


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("kind", ["chat", "completion"])
def test_text_equals_mlx_lm_server(servers, kind, stream):
    ours, stock = servers
    before = _offloaded(ours)["total"]["program_calls"]
    got = _ask(ours.client(), kind, stream)
    want = _ask(stock.client(), kind, stream)
    assert got == want and len(got[0]) > 0 and got[1] == "length"
    st = _offloaded(ours)
    assert st["offload"] == "onnx" and Path(st["model"]) == Path(stock.client().models.list().data[-1].id)
    assert st["total"]["program_calls"] > before  # this request really ran programs
    assert {l["layer"] for l in st["layers"]} == {0, 1} and all(l["fallback"] == "" for l in st["layers"])


def test_usage_models_health_and_log(servers):
    ours, stock = servers
    kw = dict(model="default_model", messages=CHAT, max_tokens=8, temperature=0.0)
    a, b = ours.client().chat.completions.create(**kw), stock.client().chat.completions.create(**kw)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert (a.usage.prompt_tokens, a.usage.completion_tokens) == (b.usage.prompt_tokens, b.usage.completion_tokens)
    listed = [m.id for m in ours.client().models.list().data]
    assert listed == [m.id for m in stock.client().models.list().data] == [str(Path(_offloaded(ours)["model"]).resolve())]
    # (given as an absolute path, the id is that path; a relative one: test_models_lists_the_name_given)
    assert ours.get("/health") == stock.get("/health") == (200, {"status": "ok"})
    # the stats endpoint is read-only: POST is refused like any unknown path
    assert ours.post_raw(server.STATS_PATH, b"{}")[0] == 404
    log = ours.text()
    assert (f"npumoe offload onnx: 2 expert blocks and 0 shared experts offloaded; "
            f"stats at http://127.0.0.1:{ours.port}{server.STATS_PATH}") in log
    line = [l for l in log.splitlines() if "npumoe offload:" in l and "per layer:" in l][-1]
    assert re.search(r"MoE layer calls ran programs .* per layer: L0 \d+/\d+ calls \d+ prog", line), line


def test_models_lists_the_name_given_not_the_absolute_folder(models):
    """Issue 24: /v1/models listed `--model m` as /abs/path/to/m; a client sending that id back
    made the server load the model a second time."""
    path, _ = models
    srv = Server([sys.executable, "-m", "npumoe_mlx.cli.server", "--model", path.name, "--offload", "onnx"],
                 path.parent / "relative.log", env={"HF_HUB_CACHE": str(path.parent / "no-such-cache")})
    try:
        srv.wait_ready()
        assert [m.id for m in srv.client().models.list().data] == [path.name]
        r = srv.client().completions.create(model=path.name, prompt=PROMPT, max_tokens=4, temperature=0.0)
        assert r.choices[0].text and _offloaded(srv)["model"] == path.name  # the loaded model served it
        assert srv.text().count("expert blocks and 0 shared experts offloaded") == 1  # loaded once
    finally:
        srv.stop()


def test_concurrent_requests_all_complete_with_the_right_text(servers):
    ours, stock = servers
    reqs = [("chat", [{"role": "user", "content": f"Tell me about the number {i}."}]) for i in range(3)]
    reqs += [("completion", f"Item {i}: the weather today is") for i in range(3)]
    want = [_ask(stock.client(), kind, False, prompt=p) for kind, p in reqs]  # one at a time
    client = ours.client()
    with ThreadPoolExecutor(len(reqs)) as pool:
        futures = [pool.submit(_ask, client, kind, i % 2 == 1, "default_model", p) for i, (kind, p) in enumerate(reqs)]
        got = [f.result(timeout=120) for f in futures]
    assert got == want
    assert len(set(t for t, _ in got)) > 1  # different prompts, different answers


def _bare_copy(path, dest):
    shutil.copytree(path, dest, ignore=shutil.ignore_patterns("npumoe-*"))
    return dest


def test_bad_requests_get_4xx_json_and_the_server_keeps_serving(servers, models, tmp_path):
    ours, stock = servers
    body = b'{"model": "default_model", "messages": [{"role": "user", "content": "hi"}'
    for srv in (ours, stock):  # malformed JSON: 400 with a JSON error, as mlx_lm answers
        status, raw = srv.post_raw("/v1/chat/completions", body)
        assert status == 400 and "Invalid JSON in request body" in json.loads(raw)["error"]
    for srv in (ours, stock):  # a bad parameter: 400
        with pytest.raises(openai.BadRequestError) as e:
            srv.client().chat.completions.create(model="default_model", messages=CHAT, temperature=-1.0)
        assert e.value.status_code == 400
        assert e.value.response.json() == {"error": "temperature must be at least 0"}
        status, raw = srv.post_raw("/v1/completions", json.dumps({"prompt": "hi", "max_tokens": "ten"}).encode())
        assert status == 400 and json.loads(raw) == {"error": "max_tokens must be of type int"}
    for srv in (ours, stock):  # an unknown model: mlx_lm answers 404 with a JSON error
        with pytest.raises(openai.NotFoundError) as e:
            srv.client().chat.completions.create(model="no/such-model", messages=CHAT, max_tokens=4)
        assert e.value.status_code == 404 and e.value.response.json()["error"]
    assert "no such model folder no/such-model" in ours.post_raw(
        "/v1/completions", json.dumps({"model": "no/such-model", "prompt": "hi"}).encode())[1].decode()
    # a model named per request without a bundle, --offload onnx asked for explicitly: refused
    # with the build command (stock mlx_lm, which knows no bundles, serves it)
    bare = _bare_copy(models[0], tmp_path / "bare")
    status, raw = ours.post_raw("/v1/completions", json.dumps({"model": str(bare), "prompt": "hi"}).encode())
    assert status == 404 and f"build it with `npumoe build --model {bare} --backend onnx`" in json.loads(raw)["error"]
    assert stock.post_raw("/v1/completions", json.dumps({"model": str(bare), "prompt": "hi", "max_tokens": 2}).encode())[0] == 200
    # ...and both still serve, with the same text
    assert _ask(ours.client(), "completion", False) == _ask(stock.client(), "completion", False)
    assert ours.get("/health") == (200, {"status": "ok"})


def test_model_named_per_request_gets_its_bundle_and_a_program_fault_falls_back(servers, models):
    ours, stock = servers
    _, faulty = models
    # 1. a model named per request loads with its own bundle; a short request runs small tiers
    assert _ask(ours.client(), "chat", False, model=str(faulty)) == _ask(stock.client(), "chat", False, model=str(faulty))
    st = _offloaded(ours)
    assert st["model"] == str(faulty) and all(l["offloaded"] == l["calls"] > 0 and not l["fallback"] for l in st["layers"])
    before = {l["layer"]: l["offloaded"] for l in st["layers"]}
    # 2. layer 0's program files change under the running server (a rebuild in place): a program
    # that next opens a tier it has not run yet fails (the files are not the ones checked at load)
    files = _layer_files(faulty / "npumoe-onnx", 0)
    plan = bundles.read(faulty / "npumoe-onnx").plan
    assert files and all(len(g.tiers) > 1 for g in plan.layers[0].groups)  # larger tiers not run yet
    for f in files:
        os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    # 3. a long prompt needs the larger tiers: the fault happens inside this request's prefill
    long_prompt = "Once upon a time, in a land far away, there lived a fox. " * 12
    want = _ask(stock.client(), "completion", False, model=str(faulty), prompt=long_prompt, max_tokens=16)
    got = _ask(ours.client(), "completion", False, model=str(faulty), prompt=long_prompt, max_tokens=16)
    assert got == want  # the failed call reran on MLX; nothing wrong came out
    st = _offloaded(ours)
    layers = {l["layer"]: l for l in st["layers"]}
    assert "changed after the bundle was checked at load" in layers[0]["fallback"]
    assert layers[0]["offloaded"] == before[0] < layers[0]["calls"]  # programs ran before the fault, MLX after
    assert layers[1]["fallback"] == "" and layers[1]["offloaded"] == layers[1]["calls"] > before[1]  # still on programs
    assert st["total"]["fallbacks"] == {"0": layers[0]["fallback"]}
    # the next request on that model: still right, no second warning
    assert _ask(ours.client(), "completion", True, model=str(faulty)) == _ask(stock.client(), "completion", True, model=str(faulty))
    warnings = [l for l in ours.text().splitlines() if "program failed" in l]
    assert len(warnings) == 1 and warnings[0].startswith("[npumoe] layer 0: program failed (")
    # back to the --model model: its own bundle again, fresh counters, no fallback
    assert _ask(ours.client(), "chat", False) == _ask(stock.client(), "chat", False)
    st = _offloaded(ours)
    assert st["model"] != str(faulty) and all(l["fallback"] == "" and l["offloaded"] > 0 for l in st["layers"])


def test_parser_has_every_mlx_lm_server_flag():
    stock_help = io.StringIO()
    with contextlib.redirect_stdout(stock_help), pytest.raises(SystemExit):
        sys_argv, sys.argv = sys.argv, ["mlx_lm.server", "--help"]
        try:
            server.mlx_server.main()
        finally:
            sys.argv = sys_argv
    stock_flags = set(re.findall(r"(--[a-z][a-z-]+)", stock_help.getvalue()))
    parser = server.setup_arg_parser()
    ours = {s for a in parser._actions for s in a.option_strings}
    assert len(stock_flags) > 20 and stock_flags <= ours
    assert {"--offload", "--bundle", "--overflow", "--verify"} <= ours and "--stats" not in ours
    args = parser.parse_args(["--model", "m", "--offload", "mlx", "--decode-concurrency", "4"])
    assert (args.offload, args.decode_concurrency, args.port, args.bundle) == ("mlx", 4, 8080, None)


def _cli(*argv, timeout=60):
    r = subprocess.run([sys.executable, "-m", "npumoe_mlx.cli", "server", *argv, "--port", str(_free_port())],
                       capture_output=True, text=True, env=ENV, timeout=timeout)
    return r.returncode, r.stderr


def test_cli_errors_are_one_line_and_stop_the_server(models, tmp_path):
    rc, err = _cli("--model", str(tmp_path / "nope"))
    assert rc == 1 and err.strip().splitlines()[-1].startswith("npumoe server: error: no such model folder"), err
    bare = tmp_path / "bare"  # a model without a bundle, onnx asked for explicitly: no server
    shutil.copytree(models[0], bare, ignore=shutil.ignore_patterns("npumoe-*"))
    rc, err = _cli("--model", str(bare), "--offload", "onnx")
    last = err.strip().splitlines()[-1]
    assert rc == 1 and last.startswith("npumoe server: error: no onnx bundle for this model"), err
    assert f"`npumoe build --model {bare} --backend onnx`" in last and "Traceback" not in err


def test_bundle_flag_belongs_to_the_model_flag(models, tmp_path, monkeypatch):
    """--bundle is the --model model's bundle; a model named per request gets its own (or none)."""
    path, _ = models
    main = tmp_path / "main"
    shutil.copytree(path, main, ignore=shutil.ignore_patterns("npumoe-*"))
    other = tmp_path / "other"
    shutil.copytree(path, other, ignore=shutil.ignore_patterns("npumoe-*"))
    elsewhere = shutil.copytree(path / "npumoe-onnx", tmp_path / "bundles" / "main-onnx")
    args = server.setup_arg_parser().parse_args(["--model", str(main), "--offload", "onnx", "--bundle", str(elsewhere)])
    model, _, _ = server._offload_load(args, str(main), return_config=True)
    assert model.npumoe_bundle == str(elsewhere)
    seen = {}  # --verify and the other flags reach npumoe_mlx.load
    monkeypatch.setattr(server, "load", lambda path, **kw: seen.update(kw, path=path))
    server._offload_load(server.setup_arg_parser().parse_args(["--model", str(main), "--verify", "--overflow", "spill"]), str(main))
    # every option, whole (was: the four keywords offload/bundle/overflow/verify)
    assert seen == {"path": str(main), "options": OffloadOptions(offload="auto", bundle=None, overflow="spill", verify=True)}
    monkeypatch.undo()
    assert [l["layer"] for l in npumoe_mlx.stats(model)["layers"]] == [0, 1]
    with pytest.raises(OffloadError, match=re.escape(f"build it with `npumoe build --model {other} --backend onnx`")):
        server._offload_load(args, str(other))
