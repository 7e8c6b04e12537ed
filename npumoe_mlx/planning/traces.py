"""Routing traces on disk: ``layerN`` -> (T, k) expert ids of every token, in order.

``npumoe calibrate --save-routes`` writes them from a real model; ``npumoe replay`` reads
them (format: ``benchmarks/routing/README.md``). Its own module so calibration does not
import the planner through replay.
"""

import os
import tempfile
import zipfile
from pathlib import Path
from typing import Dict

import numpy as np


def load_trace(path) -> Dict[int, np.ndarray]:
    """layer -> (T, k) expert ids of one trace file."""
    path = Path(path)
    arrays = {}
    try:  # an .npz is a zip of .npy files; read them with pickles refused
        with zipfile.ZipFile(path) as z:
            for member in z.namelist():
                name = member[:-4] if member.endswith(".npy") else member
                if name.startswith("layer") and name[5:].isdigit():
                    with z.open(member) as f:
                        arrays[name] = np.lib.format.read_array(f, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise ValueError(f"cannot read routing trace {path}: {e}") from None
    out = {}
    for name, a in arrays.items():
        if a.ndim != 2 or a.shape[1] < 1 or not np.issubdtype(a.dtype, np.integer) or (a.size and a.min() < 0):
            raise ValueError(f"{path}: {name} must be (tokens, k) non-negative expert ids, got {a.shape} {a.dtype}")
        out[int(name[5:])] = a
    if not out:
        raise ValueError(f"{path}: no layerN arrays; not a routing trace")
    return out


def save_routes(path, routes: Dict[int, np.ndarray]) -> None:
    """Write ``layerN`` -> (T, k) expert ids as a trace (temp file, then rename)."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez_compressed(f, **{f"layer{l}": np.asarray(a, np.uint8 if np.max(a, initial=0) < 256 else np.uint16)
                                      for l, a in sorted(routes.items())})
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
