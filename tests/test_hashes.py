"""One sampled-hash helper (fingerprint.sample_spans / update_sampled) behind the four schemes.

Hashes of every scheme are recorded (model fingerprints in profiles and manifests, shard
fingerprints, bundle files' ``sha256_4x16KiB``, Core ML compile-cache keys), so the helper must
give exactly what each scheme's own code gave. The ``_old_*`` functions below are those codes,
frozen as they were before the helper; each test compares on sizes around every boundary."""

import hashlib
import json
import struct

import numpy as np
import pytest

from npumoe_mlx.bundle import bundle, fingerprint
from npumoe_mlx.bundle.fingerprint import sample_spans


def _old_fingerprint_file(h, path, samples=16, sample_bytes=64 * 1024, full=64 * 1024 * 1024):
    size = path.stat().st_size
    h.update(f"{path.name}\0{size}\0".encode())
    with open(path, "rb") as f:
        (n_header,) = struct.unpack("<Q", f.read(8))
        h.update(f.read(n_header))
        start = 8 + n_header
        data = size - start
        if data <= max(full, samples * sample_bytes):
            while chunk := f.read(1 << 24):
                h.update(chunk)
            return
        step = (data - sample_bytes) / (samples - 1)
        for i in range(samples):
            f.seek(start + int(i * step))
            h.update(f.read(sample_bytes))


def _old_bundle_sample(path, samples=4, sample_bytes=16 * 1024):
    size = path.stat().st_size
    h = hashlib.sha256(f"{size}\0".encode())
    with open(path, "rb") as f:
        if size <= samples * sample_bytes:
            h.update(f.read())
        else:
            step = (size - sample_bytes) // (samples - 1)
            for i in range(samples):
                f.seek(i * step)
                h.update(f.read(sample_bytes))
    return h.hexdigest()


def _old_package_key(pkg):
    h = hashlib.sha256()
    for f in sorted(p for p in pkg.rglob("*") if p.is_file()):
        size = f.stat().st_size
        h.update(f"{f.relative_to(pkg)}:{size}".encode())
        with open(f, "rb") as fh:
            if size <= 3 << 20:
                h.update(fh.read())
            else:
                for off in (0, size // 2, size - (1 << 20)):
                    fh.seek(off)
                    h.update(fh.read(1 << 20))
    return h.hexdigest()[:24]


def _old_shard_slices(n, samples=16, elems=1024, full=4 * 16 * 1024):
    if n <= full:
        return [(0, n)]
    step = (n - elems) / (samples - 1)
    return [(int(i * step), elems) for i in range(samples)]


def _bytes(n, seed):
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def _safetensors(path, data: bytes):
    header = json.dumps({"w": {"dtype": "U8", "shape": [len(data)], "data_offsets": [0, len(data)]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)


@pytest.mark.parametrize("n", [0, 1000, 4096, 4097, 16 * 1024 * 3 + 17, 1_000_003])
def test_model_fingerprint_is_the_old_scheme(tmp_path, monkeypatch, n):
    # small thresholds stand in for 64 MiB so the sampled path runs on small files
    monkeypatch.setattr(fingerprint, "FULL_HASH_BYTES", 4096)
    monkeypatch.setattr(fingerprint, "SAMPLE_BYTES", 1024)
    (tmp_path / "config.json").write_text('{"model_type": "x"}')
    _safetensors(tmp_path / "model.safetensors", _bytes(n, n))
    want = hashlib.sha256(b"npumoe-fingerprint-1\0" + (tmp_path / "config.json").read_bytes())
    _old_fingerprint_file(want, tmp_path / "model.safetensors", 16, 1024, 4096)
    assert fingerprint.model_fingerprint(tmp_path) == want.hexdigest()


def test_model_fingerprint_at_its_real_constants(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    _safetensors(tmp_path / "a.safetensors", _bytes(3 << 20, 1))
    want = hashlib.sha256(b"npumoe-fingerprint-1\0{}")
    _old_fingerprint_file(want, tmp_path / "a.safetensors")
    assert fingerprint.model_fingerprint(tmp_path) == want.hexdigest()


@pytest.mark.parametrize("n", [0, 1, 65535, 65536, 65537, 100_001, 3 * 65536 + 5])
def test_bundle_sampled_sha256_is_the_old_scheme(tmp_path, n):
    f = tmp_path / "w.bin"
    f.write_bytes(_bytes(n, n))
    assert bundle._sample_sha256(f) == _old_bundle_sample(f)


@pytest.mark.parametrize("n", [10, 3 << 20, (3 << 20) + 1, (5 << 20) + 3])
def test_coreml_package_key_is_the_old_scheme(tmp_path, n):
    from npumoe_mlx.backends.coreml import _package_key

    pkg = tmp_path / "p.mlpackage"
    (pkg / "Data" / "weights").mkdir(parents=True)
    (pkg / "Manifest.json").write_text("{}")
    (pkg / "Data" / "weights" / "weight.bin").write_bytes(_bytes(n, 7))
    assert _package_key(pkg) == _old_package_key(pkg)


@pytest.mark.parametrize("n", [1, 65536, 65537, 1_000_000, 12_345_677])
def test_shard_slices_are_the_old_scheme(n):
    assert sample_spans(n, 16, 1024, 4 * 16 * 1024) == _old_shard_slices(n)


def test_sampled_hash_sees_a_byte_in_a_sample_and_its_size(tmp_path):
    """It can fail: a byte inside a sampled piece, or the size, changes the hash."""
    f = tmp_path / "w.bin"
    data = bytearray(_bytes(200_000, 3))
    f.write_bytes(bytes(data))
    before = bundle._sample_sha256(f)
    data[5] ^= 1
    f.write_bytes(bytes(data))
    assert bundle._sample_sha256(f) != before
    changed = bundle._sample_sha256(f)
    f.write_bytes(bytes(data) + b"\0")
    assert bundle._sample_sha256(f) not in (before, changed)


def test_unknown_spacing_is_refused():
    with pytest.raises(ValueError, match="unknown sample spacing"):
        sample_spans(10_000, 4, 16, 64, "middle")
