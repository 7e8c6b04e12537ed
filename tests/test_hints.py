"""hints.py: the one home of the `npumoe build` fix command and of one-line error text.
The exact texts the modules printed before (literals then) are pinned here."""

import pytest

from npumoe_mlx.hints import build_cmd, one_line


def test_build_cmd_gives_the_texts_the_modules_wrote_by_hand():
    assert build_cmd("MODEL", force=True) == "npumoe build --model MODEL --force"
    assert build_cmd("m", "onnx") == "npumoe build --model m --backend onnx"
    assert build_cmd("m", "onnx", force=True) == "npumoe build --model m --backend onnx --force"
    assert build_cmd("m", "coreml", out="DIR") == "npumoe build --model m --backend coreml --out DIR"
    assert build_cmd("m", "onnx", out="/b/x", force=True) == "npumoe build --model m --backend onnx --out /b/x --force"
    assert build_cmd("M", from_stats="FILE") == "npumoe build --model M --from-stats FILE"
    assert build_cmd("m") == "npumoe build --model m"
    assert (build_cmd("m", "onnx", force=True, extra="--max-programs 3")
            == "npumoe build --model m --backend onnx --force --max-programs 3")


@pytest.mark.parametrize("e, plain, typed", [
    (ValueError("bad input\nmore detail"), "bad input", "ValueError: bad input"),
    (RuntimeError("  padded  \n"), "padded", "RuntimeError:   padded  "),
    (KeyError(), "KeyError", "KeyError: "),
    (OSError(""), "OSError", "OSError: "),
])
def test_one_line(e, plain, typed):
    assert one_line(e) == plain
    assert one_line(e, typed=True) == typed


def test_cli_error_is_one_line_from_hints(capsys, tmp_path):
    from npumoe_mlx import cli

    rc = cli.main(["info", "--model", str(tmp_path / "missing")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and err[0].startswith("npumoe info: error: ")
