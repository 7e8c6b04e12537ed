"""`npumoe chat`: mlx_lm.chat with the offload — same flags, same loop, same tokens."""

import io
import os
import re
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from mlx_lm import chat as mlx_chat

from npumoe_mlx.cli import chat
from npumoe_mlx import cli

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]|[\x01\x02]")


def _screen(text):
    """The conversation as the user sees it, minus the speed figures (they differ run to run)."""
    return [l for l in ANSI.sub("", text).splitlines() if "tok/s" not in l]


def _stock_chat(flags, turns):
    """mlx_lm.chat in its own interpreter, started now: ``finish()`` -> its screen."""
    p = subprocess.Popen([sys.executable, "-m", "mlx_lm", "chat", *flags], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)

    def finish():
        out, err = p.communicate("".join(t + "\n" for t in turns), timeout=300)
        assert p.returncode == 0, err
        return _screen(out)

    return finish


def _our_chat(argv, turns, monkeypatch, capsys):
    """`npumoe chat` in this process, the turns on its stdin: (exit code, screen, stderr)."""
    from mlx_lm import cli_ui

    monkeypatch.setenv("COLUMNS", ENV["COLUMNS"])  # the console's width, as the stock side's
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(t + "\n" for t in turns)))
    cli_ui.make_console.cache_clear()  # made once per process: remade at this width
    try:
        rc = cli.main(["chat", *argv])
    finally:
        cli_ui.make_console.cache_clear()
    out = capsys.readouterr()
    return rc, _screen(out.out), out.err


def test_chat_has_every_mlx_lm_chat_flag():
    stock = {a for act in mlx_chat.setup_arg_parser()._actions for a in act.option_strings}
    ours = {a for act in chat.setup_arg_parser()._actions for a in act.option_strings}
    assert stock <= ours
    assert {"--offload", "--bundle", "--overflow", "--keep-mlx-experts", "--verify", "--stats"} <= ours


def test_chat_tokens_equal_mlx_lm_chat_and_run_programs(eager_moe, monkeypatch, capsys):
    turns = ["The quick brown fox jumps over the lazy dog.", "h", "And then?", "r", "Once more", "q"]
    flags = ["--model", str(eager_moe), "--max-tokens", "12", "--system-prompt", "Be brief."]
    stock = _stock_chat(flags, turns)  # runs beside ours
    rc, got, err = _our_chat([*flags, "--offload", "onnx", "--stats"], turns, monkeypatch, capsys)
    want = stock()
    assert rc == 0, err
    stats = got[len(want):]  # --stats: printed after the chat, like `npumoe generate --stats`
    assert got[:len(want)] == want
    assert sum(1 for l in want if l.strip() and "tokens" not in l) > 5  # three replies, help, reset, bye
    ran = re.search(r"(\d+)/(\d+) MoE layer calls ran programs", "\n".join(stats))
    assert ran and int(ran.group(1)) > 0, stats  # the experts really ran on programs


def test_chat_bad_flags_one_line(tmp_path, capsys):
    assert cli.main(["chat", "--model", str(tmp_path / "nope"), "--max-tokens", "0"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--max-tokens must be an integer >= 1" in err[0]
