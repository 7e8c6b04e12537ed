"""A cheap fingerprint of a model folder, to tie profiles and bundles to their weights.

Hashing 20 GB of weights would take minutes, so we hash what identifies them:
config.json, and per safetensors file its name, size, header (tensor names,
dtypes, shapes, offsets) and its tensor data: all of it up to 64 MiB, beyond that
16 evenly spaced 64 KiB samples. Any re-quantization, conversion or fine-tune
changes the header or the samples; a single flipped byte in a large file may not.
Files are read as bytes; nothing is deserialized beyond the size field.
"""

import hashlib
import struct
from pathlib import Path
from typing import List, Tuple

SAMPLES = 16
SAMPLE_BYTES = 64 * 1024
FULL_HASH_BYTES = 64 * 1024 * 1024  # tensor data up to this size is hashed whole
CHUNK = 1 << 24  # whole runs are read this much at a time


def sample_spans(length: int, samples: int, span: int, whole_up_to: int,
                 spacing: str = "even") -> List[Tuple[int, int]]:
    """[(offset, size)] to hash of a ``length``-long run of bytes (or elements): the whole run up
    to ``whole_up_to``, else ``samples`` pieces of ``span``. The one sampling rule of every
    sampled hash in npumoe. ``spacing`` places the pieces; each is a scheme whose hashes are
    recorded (manifests, bundle names, compile caches), so none may change:

    - ``"even"``: ``int(i * (length - span) / (samples - 1))``: model and shard fingerprints;
    - ``"floor"``: ``i * ((length - span) // (samples - 1))``: bundle files' ``sha256_4x16KiB``;
    - ``"ends"``: head, middle (``length // 2``) and tail (``length - span``): Core ML compile-cache
      keys (``samples`` is 3).
    """
    if length <= whole_up_to:
        return [(0, length)]
    if spacing == "even":
        step = (length - span) / (samples - 1)
        offsets = [int(i * step) for i in range(samples)]
    elif spacing == "floor":
        step = (length - span) // (samples - 1)
        offsets = [i * step for i in range(samples)]
    elif spacing == "ends" and samples == 3:
        offsets = [0, length // 2, length - span]
    else:
        raise ValueError(f"unknown sample spacing {spacing!r} for {samples} samples")
    return [(o, span) for o in offsets]


def update_sampled(h, f, start: int, length: int, samples: int, span: int, whole_up_to: int,
                   spacing: str = "even") -> None:
    """Feed ``h`` the ``sample_spans`` of the ``length`` bytes of open file ``f`` from ``start``."""
    for off, n in sample_spans(length, samples, span, whole_up_to, spacing):
        f.seek(start + off)
        while n > 0:
            chunk = f.read(min(n, CHUNK))
            if not chunk:
                break
            h.update(chunk)
            n -= len(chunk)


def _hash_safetensors(h, path: Path) -> None:
    size = path.stat().st_size
    h.update(f"{path.name}\0{size}\0".encode())
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (n_header,) = struct.unpack("<Q", raw)
        if 8 + n_header > size:
            raise ValueError(f"{path}: not a safetensors file (header length {n_header} > file size)")
        h.update(f.read(n_header))
        start = 8 + n_header
        update_sampled(h, f, start, size - start, SAMPLES, SAMPLE_BYTES, max(FULL_HASH_BYTES, SAMPLES * SAMPLE_BYTES))


def model_fingerprint(model_path) -> str:
    """sha256 hex over config.json and sampled safetensors contents of ``model_path``."""
    root = Path(model_path)
    config = root / "config.json"
    if not config.is_file():
        raise ValueError(f"cannot fingerprint {root}: no config.json")
    h = hashlib.sha256()
    h.update(b"npumoe-fingerprint-1\0")
    h.update(config.read_bytes())
    for path in sorted(root.glob("*.safetensors")):
        _hash_safetensors(h, path)
    return h.hexdigest()
