"""Helpers the tools share for their reports: machine facts, atomic text and figure
files, and an argparse that reports bad input as one line."""

import argparse
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Tuple

import mlx.core as mx
import mlx_lm

from ..atomic import honour_umask


def mlx_device_label() -> str:
    dev = mx.default_device()
    if dev.type == mx.gpu:
        return "GPU (MLX Metal)" if sys.platform == "darwin" else "GPU (MLX CUDA)"
    return "MLX CPU"


def machine_info() -> dict:
    cpu = platform.processor()
    try:  # Linux: the CPU model name
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {
        "system": platform.system(),
        "release": platform.release(),
        "machine": platform.machine(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "mlx": mx.__version__,
        "mlx_lm": mlx_lm.__version__,
        "mlx_device": str(mx.default_device()),
    }
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    if hasattr(os, "getloadavg"):
        info["loadavg_at_start"] = [round(x, 2) for x in os.getloadavg()]  # other work on the machine
    return info


def loadavg_at_end() -> dict:
    return {"loadavg_at_end": [round(x, 2) for x in os.getloadavg()]} if hasattr(os, "getloadavg") else {}


def parse_token_list(text: str) -> Tuple[int, ...]:
    """'1024,4096' -> (1024, 4096); raises ValueError with a one-line reason."""
    try:
        vals = tuple(int(t) for t in str(text).split(",") if t.strip())
    except ValueError:
        raise ValueError(f"expected comma-separated positive integers like 1024,4096, got {text!r}") from None
    if not vals or any(v < 1 for v in vals):
        raise ValueError(f"expected comma-separated positive integers like 1024,4096, got {text!r}")
    return vals


def write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    try:
        honour_umask(tmp)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


PLOT_MISSING = "plot skipped: matplotlib is not installed (pip install 'npumoe-mlx[plot]')"


def pyplot():
    """matplotlib.pyplot on the Agg backend, or None: plots are optional (the ``[plot]`` extra)."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> None:
    """savefig to a temp file beside ``path``, then rename (no half-written PNG)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".png")
    os.close(fd)
    try:
        honour_umask(tmp)
        fig.savefig(tmp, dpi=120)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


class ArgError(Exception):
    pass


class Parser(argparse.ArgumentParser):
    """argparse that reports bad input as one line (raises ArgError; main returns 2)."""

    def error(self, message):
        raise ArgError(message)


def token_list(text: str):
    """argparse ``type=``: parse_token_list with argparse's error."""
    try:
        return parse_token_list(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
