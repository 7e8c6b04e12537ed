"""npumoe's notices go through `logging`; the CLI shows them as `[npumoe] ...` lines."""

import logging
import subprocess
import sys

from npumoe_mlx import log


def test_console_writes_the_cli_lines_where_they_went(capsys):
    log.console()
    log.get("npumoe_mlx.runtime.executor").warning("layer 0: program failed (x)")
    log.get("npumoe_mlx.cli.convert").info("converting a -> b with mlx_lm.convert", extra=log.STDOUT)
    out = capsys.readouterr()
    assert out.err == "[npumoe] layer 0: program failed (x)\n"
    assert out.out == "[npumoe] converting a -> b with mlx_lm.convert\n"


def test_library_users_get_standard_records(capsys):
    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append((record.name, record.levelno, record.getMessage()))

    keep = Keep()
    logging.getLogger().addHandler(keep)
    try:
        log.console(False)
        log.get("npumoe_mlx.runtime.release").warning("layer 1: keeping MLX's copy")
        assert seen == [("npumoe.runtime.release", logging.WARNING, "layer 1: keeping MLX's copy")]
        assert capsys.readouterr().err == ""  # no console line: the application's handlers decide
    finally:
        logging.getLogger().removeHandler(keep)
        log.console()  # what the other tests read (conftest)


def test_console_installs_once():
    log.console()
    log.console()
    assert sum(isinstance(h, log.ConsoleHandler) for h in logging.getLogger("npumoe").handlers) == 1


def test_an_unconfigured_script_sees_warnings_without_the_cli_prefix():
    code = ("from npumoe_mlx.log import get\n"
            "get('npumoe_mlx.runtime.offload').warning('offload auto: no onnx bundle')\n"
            "get('npumoe_mlx.runtime.dense').info('progress is not shown')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout == "" and r.stderr == "offload auto: no onnx bundle\n"
