"""How a Core ML program stores its expert weights: the formats, their encoders, their bytes.

The format decides whether the Neural Engine keeps the weights compressed, or whether
Core ML places the program on the NE at all, so it is a build choice:

    blockwise     the model's own MLX affine codes as `constexpr_blockwise_shift_scale`,
                  one scale/offset per block of `group_size` inputs: exact vs MLX.
                  Float experts: fp16 constants (nothing to keep).
    fp16          every weight decompressed to an fp16 constant.
    int8-channel  symmetric int8, one fp16 scale per output channel
                  (`constexpr_blockwise_shift_scale` with one block per row).
    palette       4-bit lookup table per group of 16 output channels
                  (`constexpr_lut_to_dense`, per-grouped-channel), centroids by 1-D k-means.

Why the default is int8-channel (sources):
- coremltools `opt-quantization-perf.md`: per-block scales give "latency gains ... when it is
  running on the GPU ... if the model is running on the NE, it is recommended to use the
  per-channel scales option"; `opt-overview.md`: "Weight palettization ... typically works the
  best on the Neural Engine"; ANEMLL README: "lack of Block Quantization on Apple Neural Engine".
- aosama/astronomical #540 (M5 Pro, measured): an fp16 conv model went entirely to the CPU;
  the same graph with INT8 weights returned to ~83% NE residency and ran 1.8-2.2x faster.
- Of the two NE-recommended formats, int8-channel is the closer to the model (see the
  measured errors in docs/apple-silicon.md); `palette` holds half its bytes. A Mac
  measurement (`npumoe selftest`) should override this default per chip.

Palette bits and group: coremltools `opt-palettization-perf.md`: "Typically, group size of 8 or
16 have been seen to give good accuracy, while still giving a speed-up over uncompressed
model" (per_grouped_channel, iOS18); 4 bits keeps the bytes of a 4-bit MLX model.

Pure numpy: this module never imports coremltools, mlx or npumoe_mlx.
"""

import math
from typing import Optional, Tuple

import numpy as np

WEIGHT_FORMATS = ("blockwise", "fp16", "int8-channel", "palette")
DEFAULT_FORMAT = "int8-channel"
PALETTE_BITS = 4
PALETTE_GROUP = 16  # output channels per lookup table
FIT_SAMPLES = 8192  # values per group the k-means fits on

# Largest relative error (max |program - model| / max |model|, the measure verify.py uses) a
# format may show against the model's own experts at build. blockwise and fp16 only round to
# fp16 (the Core ML backend's 1e-2); int8 adds <= half a step of 1/127 of each row's range;
# a 16-entry palette adds about a 4-bit quantizer's error (~7% of a row's rms for uniform
# weights), so its bound is looser and a model whose experts lose more is refused.
TOLERANCE = {"blockwise": 1e-2, "fp16": 1e-2, "int8-channel": 3e-2, "palette": 1.5e-1}


def check_format(name: str) -> str:
    if name not in WEIGHT_FORMATS:
        raise ValueError(f"unknown weight format {name!r} (known: {', '.join(WEIGHT_FORMATS)})")
    return name


def int8_channel(w: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """w: (N, K) float -> (q (N, K) int8, scale (N, 1) fp16), w ~ q * scale, symmetric per row."""
    w = np.asarray(w, np.float32)
    scale = (np.abs(w).max(axis=1, keepdims=True) / 127.0).astype(np.float16)
    s = np.maximum(scale.astype(np.float32), np.float32(2.0**-24))  # an all-zero row: any scale
    q = np.clip(np.rint(w / s), -127, 127).astype(np.int8)
    return q, np.where(scale == 0, np.float16(2.0**-24), scale).astype(np.float16)


def palettize(w: np.ndarray, bits: int = PALETTE_BITS, group: int = PALETTE_GROUP,
              iters: int = 12) -> Tuple[np.ndarray, np.ndarray]:
    """w: (N, K) float -> (indices (N, K) uint8, lut (N // group, 2**bits) fp16).

    One 2**bits-entry table per `group` consecutive rows (N % group == 0), fitted by 1-D
    k-means (Lloyd, quantile start) on up to FIT_SAMPLES of the group's values. All groups at once: each
    group's sorted values are shifted by a per-group offset so one `searchsorted` on the
    concatenation assigns every value, and cumulative sums give the new centroids.
    """
    w = np.asarray(w, np.float32)
    N, K = w.shape
    if N % group:
        raise ValueError(f"palette: {N} rows do not split into groups of {group}")
    n_g, n_c = N // group, 1 << bits
    v = w.reshape(n_g, group * K)
    step = max(1, v.shape[1] // FIT_SAMPLES)  # fit on a strided sample, assign every value
    vs = np.sort(v[:, ::step], axis=1).astype(np.float64)
    span = float(np.abs(vs).max()) * 2 + 1.0
    off = (np.arange(n_g) * span)[:, None]  # groups never overlap after the shift
    flat = (vs + off).ravel()
    csum = np.concatenate([[0.0], np.cumsum(vs.ravel())])
    M = vs.shape[1]
    cent = vs[:, ((np.arange(n_c) + 0.5) * M / n_c).astype(int)]  # (n_g, n_c) quantiles
    base = (np.arange(n_g) * M)[:, None]
    for _ in range(iters):
        mid = (cent[:, 1:] + cent[:, :-1]) / 2 + off  # (n_g, n_c - 1) boundaries
        cut = np.searchsorted(flat, mid.ravel()).reshape(n_g, n_c - 1)
        lo = np.concatenate([base, cut], axis=1)
        hi = np.concatenate([cut, base + M], axis=1)
        n = hi - lo
        sums = csum[hi] - csum[lo]
        cent = np.where(n > 0, sums / np.maximum(n, 1), cent)  # an empty cluster keeps its centroid
        cent = np.sort(cent, axis=1)
    lut = cent.astype(np.float16)
    c16 = lut.astype(np.float64)
    mid = (c16[:, 1:] + c16[:, :-1]) / 2 + off
    idx = np.empty((n_g, group * K), np.uint8)
    for g in range(n_g):  # per group: a 15-entry searchsorted, no (N*K) float64 temporaries
        idx[g] = np.searchsorted(mid[g] - off[g], v[g])
    return idx.reshape(N, K), lut


def expert_bytes(fmt: Optional[str], D: int, H: int, bits: Optional[int] = None) -> int:
    """Weight bytes one expert (gate, up, down: 3*D*H weights) streams and holds in `fmt`.

    `fmt` None prices MLX's own storage at `bits` (16 for float), as before formats existed.
    blockwise is priced as fp16 [est]: per-block scales are a GPU feature (coremltools
    opt-quantization-perf.md; ANEMLL README), so the NE most likely decompresses them at
    load; palettized weights are decompressed "just in time" on the NE (coremltools
    opt-palettization-perf.md), so they stream compressed, LUTs included.
    """
    n = 3 * D * H
    if fmt is None:
        return n * (bits or 16) // 8
    check_format(fmt)
    if fmt in ("fp16", "blockwise"):
        return 2 * n
    rows = 2 * H + D  # output channels of gate, up and down
    if fmt == "int8-channel":
        return n + 2 * rows
    return n * PALETTE_BITS // 8 + math.ceil(rows / PALETTE_GROUP) * (1 << PALETTE_BITS) * 2
