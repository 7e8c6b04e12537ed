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

SAMPLES = 16
SAMPLE_BYTES = 64 * 1024
FULL_HASH_BYTES = 64 * 1024 * 1024  # tensor data up to this size is hashed whole


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
        data = size - start
        if data <= max(FULL_HASH_BYTES, SAMPLES * SAMPLE_BYTES):
            while chunk := f.read(1 << 24):  # small file: all of it
                h.update(chunk)
            return
        step = (data - SAMPLE_BYTES) / (SAMPLES - 1)
        for i in range(SAMPLES):
            f.seek(start + int(i * step))
            h.update(f.read(SAMPLE_BYTES))


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
