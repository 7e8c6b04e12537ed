"""`npumoe server`: mlx_lm.server (OpenAI-compatible HTTP API) with the expert offload.

Nothing of mlx_lm's server is copied: its own ``main`` runs, with five names in
its module pointed at ours while it runs:
- ``argparse``: its parser (every flag it has) gets --offload/--bundle/--overflow/--verify;
- ``load``: ``npumoe_mlx.load``, so every model it loads, the --model one and any
  named per request, gets its bundle the way ``load`` finds it;
- ``ModelProvider``: a bad model name in a request fails before the loaded model is
  dropped, and a --model that cannot load stops the server with a one-line error;
- ``_run_http_server``: the handler also answers ``GET /v1/npumoe/stats`` (JSON,
  read-only) and logs the offload statistics after each request;
- ``scan_cache_dir``: without a Hugging Face cache folder mlx_lm's ``/v1/models``
  sends an empty body (the scan raises); here it lists the --model model.
"""

import argparse
import atexit
import functools
import importlib
import json
import logging
import os
import sys
import threading
import types

from huggingface_hub.utils import CacheNotFound  # also there in the oldest hub we allow

from ..backends import registry
from ..bundle import checks
from ..runtime.executor import format_stats
from ..runtime.experts import installed_blocks
from ..runtime.loading import load, stats
from ..runtime.options import OffloadOptions
from ..runtime.sharded import sharded_load
from .generate import _patched, add_offload_args

# `mlx_lm.server` is the module (mlx_lm has no attribute of that name to shadow it).
mlx_server = importlib.import_module("mlx_lm.server")

STATS_PATH = "/v1/npumoe/stats"
_exit_code = [0]


class _Captured(Exception):
    def __init__(self, parser):
        self.parser = parser


def _parser_module(parse_args):
    """A stand-in for mlx_lm.server's ``argparse``: its ArgumentParser's parse_args is ours."""

    class ArgumentParser(argparse.ArgumentParser):
        pass

    ArgumentParser.parse_args = parse_args
    return types.SimpleNamespace(ArgumentParser=ArgumentParser, Namespace=argparse.Namespace)


def setup_arg_parser() -> argparse.ArgumentParser:
    """mlx_lm.server's own parser (built by its ``main``, stopped at parse_args) plus ours."""

    def capture(self, *a, **kw):
        raise _Captured(self)

    with _patched(mlx_server, argparse=_parser_module(capture)):
        try:
            mlx_server.main()
        except _Captured as c:
            parser = c.parser
            parser.__class__ = argparse.ArgumentParser  # drop the stand-in's parse_args
        else:  # pragma: no cover - mlx_lm changed how main() starts
            raise RuntimeError("mlx_lm.server.main() did not parse arguments; this mlx-lm is not supported")
    parser.prog = "npumoe server"
    parser.description = "OpenAI-compatible MoE server with expert offload (mlx_lm.server flags plus --offload)"
    add_offload_args(parser, stats=False)
    parser.add_argument("--replan", choices=("off", "notify", "auto"), default="off",
                        help="Re-plan the expert groups and tier ladders from the served calls when their padding or overflow drifts "
                             "past the plan's prediction: off (default), notify (log it), auto (re-plan groups and ladders in the "
                             "background, swap them in between calls, save <bundle>/replan.json for restarts).")
    return parser


def _options(args, model_path) -> OffloadOptions:
    """The offload options of the flags; --bundle belongs to the --model model only."""
    opts = OffloadOptions.from_args(args)
    return opts if opts.bundle and str(model_path) == str(args.model) else opts.replace(bundle=None)


def _offload_load(args, model_path, **kw):
    """mlx_lm.server's ``load``, through npumoe_mlx.load."""
    return load(model_path, options=_options(args, model_path), **kw)


def _offload_sharded_load(args, model_path, pipeline_group=None, tensor_group=None, return_config=False, **kw):
    """mlx_lm.server's ``sharded_load`` (under mlx.launch): each rank offloads the expert
    blocks it holds with its own per-rank bundle (see sharded.py); --bundle may hold ``{shard}``."""
    return sharded_load(model_path, pipeline_group, tensor_group, return_config=return_config,
                        options=_options(args, model_path), **kw)


def _skip_native_teardown():
    """Exit without C++ static teardown: MLX (0.32, CPU) aborts there ("terminate called
    without an active exception", status -6) once arrays were freed on another thread,
    and mlx_lm's generation thread frees the models (stock mlx_lm.server aborts on Ctrl-C)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_exit_code[0])


class OffloadModelProvider(mlx_server.ModelProvider):
    """mlx_lm's ModelProvider; models load through ``npumoe_mlx.load`` (mlx_lm.server.load)."""

    def __init__(self, cli_args):
        super().__init__(cli_args)
        self.default_loaded = threading.Event()
        self.default_error = None
        atexit.register(_skip_native_teardown)  # the generation thread starts next


    def _load(self, model_path, adapter_path=None, draft_model_path=None):
        # mlx_lm drops the loaded model before loading the next; a name that does not
        # resolve fails here instead, so the server keeps the model it has.
        if not self.is_distributed:
            checks.resolve_model(model_path)
        super()._load(model_path, adapter_path, draft_model_path)
        self.replanner = _replanner(self.cli_args, model_path, self.model)

    def load_default(self):
        try:
            super().load_default()
        except Exception as e:  # reported by the main thread, which stops the server
            self.default_error = e
        finally:
            self.default_loaded.set()


def _replanner(args, model_path, model):
    """``--replan`` notify/auto: a Replanner over the loaded model and its bundle (replan.py)."""
    mode = getattr(args, "replan", "off")
    if mode == "off" or model is None or not installed_blocks(model):
        return None
    from ..bundle import bundle as bundles
    from ..runtime.replan import attach

    want = registry.preferred() if args.offload == "auto" else args.offload
    backend = want if want in registry.names(bundles=True) else registry.DEFAULT  # the bundle it loaded
    local = checks.resolve_model(model_path)
    found = bundles.locate_bundle(local, backend, _options(args, model_path).bundle)
    return attach(model, mode, found if (found / "manifest.json").exists() else None,
                  model_path=local)  # logs on npumoe.replan; released experts are read back from model_path


def server_stats(provider) -> dict:
    """What /v1/npumoe/stats returns: the loaded model, the offload asked for, ``stats(model)``,
    and with ``--replan`` the plan generation, predicted vs observed padding/overflow per layer and
    when it last re-planned (``"replan"``)."""
    model, key = provider.model, provider.model_key
    out = {"model": key[0] if key else None, "offload": provider.cli_args.offload}
    if model is None:
        return {**out, "layers": [], "total": None}
    r = getattr(provider, "replanner", None)
    return {**out, **stats(model), **({"replan": r.to_dict()} if r is not None else {})}


def log_stats(provider) -> None:
    s = server_stats(provider)
    if not s["layers"]:
        return
    per_layer = "; ".join(
        f"L{l['layer']}{'s' if l['kind'] == 'shared' else ''} {l['offloaded']}/{l['calls']} calls "
        f"{l['program_calls']} prog pad {l['padding_pct']:.0f}% spill {l['spill_pct']:.0f}%"
        + (" FELL BACK" if l["fallback"] else "")
        for l in s["layers"]
    )
    summary = {**s["total"], "fallbacks": {int(k): v for k, v in s["total"]["fallbacks"].items()}}
    logging.info("npumoe %s | per layer: %s", format_stats(summary).replace("\n", " | "), per_layer)


class OffloadAPIHandler(mlx_server.APIHandler):
    """mlx_lm's handler plus ``GET /v1/npumoe/stats`` and a stats line in the log per request."""

    def do_GET(self):
        if self.path.split("?", 1)[0].rstrip("/") == STATS_PATH:
            body = json.dumps(server_stats(self.response_generator.model_provider)).encode()
            self._set_completion_headers(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            self.wfile.flush()
            return
        super().do_GET()

    def handle_completion(self, request, stop_words):
        try:
            super().handle_completion(request, stop_words)
        finally:
            provider = self.response_generator.model_provider
            log_stats(provider)
            r = getattr(provider, "replanner", None)
            if r is not None:  # drift: notify, or re-plan in the background (swapped in between calls)
                r.check()

    def handle_models_request(self):
        """mlx_lm's list, with the ``--model`` model under the name the user gave, not its absolute
        folder (which would leak the path, and a client sending it back would load the model again)."""
        import io
        from pathlib import Path

        wfile, self.wfile = self.wfile, io.BytesIO()  # mlx_lm writes headers and body here
        try:
            super().handle_models_request()
            head, _, body = self.wfile.getvalue().partition(b"\r\n\r\n")
        finally:
            self.wfile = wfile
        given = self.response_generator.cli_args.model
        if given and body:
            listing = json.loads(body)
            for m in listing["data"]:
                if Path(given).exists() and m["id"] == str(Path(given).resolve()):
                    m["id"] = given
            body = json.dumps(listing).encode()
        self.wfile.write(head + b"\r\n\r\n" + body)
        self.wfile.flush()


def _run_http_server(host, port, response_generator, **kw):
    """Serve once the --model model is loaded; if it cannot load, stop with its error."""
    provider = response_generator.model_provider
    try:
        provider.default_loaded.wait()
    except KeyboardInterrupt:
        response_generator.stop_and_join()
        raise
    if provider.default_error is not None:
        response_generator.stop_and_join()
        raise provider.default_error
    blocks = len(installed_blocks(provider.model)) if provider.model is not None else 0
    shared = sum(l["kind"] == "shared" for l in server_stats(provider)["layers"])
    where = f"{blocks} expert blocks and {shared} shared experts offloaded" if blocks else "experts on stock MLX"
    logging.info(f"npumoe offload {provider.cli_args.offload}: {where}; stats at http://{host}:{port}{STATS_PATH}")
    _stock_run_http_server(host, port, response_generator, handler_class=OffloadAPIHandler)


_stock_run_http_server = mlx_server._run_http_server
_stock_scan_cache_dir = mlx_server.scan_cache_dir


def _scan_cache_dir(*a, **kw):
    """The hub cache's models; none (not an error) when there is no cache folder."""
    try:
        return _stock_scan_cache_dir(*a, **kw)
    except CacheNotFound:
        return types.SimpleNamespace(repos=frozenset())  # all /v1/models reads of it


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = setup_arg_parser().parse_args(argv)
    if args.model is not None:  # fail before the server starts, with the fix in the message
        checks.resolve_model(args.model)

    def given(self, *a, **kw):
        return args

    try:
        with _patched(
            mlx_server,
            argparse=_parser_module(given),
            load=functools.partial(_offload_load, args),
            sharded_load=functools.partial(_offload_sharded_load, args),
            ModelProvider=OffloadModelProvider,
            _run_http_server=_run_http_server,
            scan_cache_dir=_scan_cache_dir,
        ):
            mlx_server.main()
    except BaseException:
        _exit_code[0] = 1  # the caller prints the error; the exit status stays non-zero
        raise
    return 0


if __name__ == "__main__":
    from ..log import console

    console()  # `[npumoe] ...` lines, as the npumoe command shows them
    sys.exit(main())
