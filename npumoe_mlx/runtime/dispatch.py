"""Run one layer call's program calls: gather rows in, run, write rows out.

Programs that say they are ``concurrent`` (onnxruntime sessions: a run releases the GIL
and a fresh IO binding per call makes it thread-safe) can run on several threads at
once (``CostModel.workers``, which ``tune`` picks), the largest calls first (each worker
takes the next call as it frees up: longest processing time first). Measured on this
2-core machine (OLMoE dims, q4, the 64 calls of a 512-token layer call): 2 at once took
1.39x less wall time at load 6 (onnxruntime's own threads idle at every operator's
barrier when another process holds a core), but 6% more at load 1.5. Outputs go
straight into the caller's buffer (no copy per call).

Host passes per program row (``host_bytes``, what the cost model prices): rows are gathered
once into the layout the program takes (``Program.input_layout``): (G, C, D), one pass; or
(G, D, C) for Core ML's channels-first programs, gathered by the executor on MLX (the GPU
on a Mac; ``gather`` here does it per expert, a gather then a transposed write, for callers
without MLX rows). ``checked`` reads the output once. Every host pass goes through ``moved`` so that
a test can count the bytes the real path moves (tests/test_copies.py): per element of a program
row, or (``pair=True``) per element of a routed pair's output row.

The executor's last step (``finish_bytes``) puts the programs' rows in pair order on MLX. Where
MLX's arrays live decides how: on a GPU the slot buffer goes over in one copy (8 B per program
row element) and MLX takes each pair's row on the device; on the CPU (``finish_on_host``: MLX's
memory is the host's, no device copy to save) numpy takes each pair's row (8 B per pair
element) and that (P, D) array goes over in one copy (8). The slot buffer's copy and MLX's take
made two MLX buffers per call past MLX's CPU buffer cache (32 MiB here), each mapped fresh and
page-faulted: the host path took 1.41x the CPU time (Qwen3 dims, 512 tokens; benchmarks/README.md).
"""

import os
from concurrent.futures import ThreadPoolExecutor
from typing import List, Optional, Sequence, Tuple

import numpy as np

MAX_WORKERS = 2  # what `tune` tries (CostModel.workers); NPUMOE_WORKERS overrides both
_POOLS = {}
COUNTER: Optional[list] = None  # [row bytes, pair bytes]: host bytes read + written, while a test counts
# The finish's host bytes (read + written) per element: (program row, routed pair) by where MLX's arrays live.
FINISH_BYTES = {"device": (8, 0), "host": (0, 16)}


def moved(nbytes: int, pair: bool = False) -> None:
    """Count one host pass's bytes (read + written) when a counter is installed: a pass over
    program rows, or (``pair``) over the call's routed pairs."""
    c = COUNTER
    if c is not None:
        c[1 if pair else 0] += int(nbytes)


def finish_on_host() -> bool:
    """MLX's default device is the CPU: its arrays are host memory, so the executor puts the
    programs' rows in pair order with numpy before the one copy (one MLX buffer per call, not two)."""
    import mlx.core as mx

    return mx.default_device().type == mx.DeviceType.cpu


def finish_bytes(on_host: Optional[bool] = None) -> Tuple[int, int]:
    """Host bytes (read + written) the executor's finish moves per element: (of a program row,
    of a routed pair); ``on_host`` None: this process's MLX device (``finish_on_host``)."""
    return FINISH_BYTES["host" if (finish_on_host() if on_host is None else on_host) else "device"]


def gather(x_np: np.ndarray, src: np.ndarray, G: int, C: int, layout: str = "GCD") -> np.ndarray:
    """Rows ``src`` (G*C,) of x_np (N, D) float32 in a program's layout: (G, C, D) in one
    pass (8 B per element), or (G, D, C) per expert: a gather into a (C, D) block that stays
    in cache, then its transposed write (16 B; numpy's strided gather straight into the
    transposed view took 11x longer: 57 vs 5 ms at (8, 256, 2048) here)."""
    D = x_np.shape[1]
    if layout == "GCD":
        out = np.take(x_np, src, axis=0).reshape(G, C, D)
        moved(2 * out.nbytes)
        return out
    if layout != "GDC":
        raise ValueError(f"unknown program input layout {layout!r}")
    out = np.empty((G, D, C), np.float32)
    s2 = src.reshape(G, C)
    for g in range(G):
        out[g] = np.take(x_np, s2[g], axis=0).T
    moved(4 * out.nbytes)
    return out


def copy_into(dst: np.ndarray, y: np.ndarray) -> None:
    """dst[...] = y, counted (a program that returns a fresh array: its rows into the call's buffer)."""
    dst[...] = y
    moved(dst.nbytes + y.nbytes)


class ProgramError(RuntimeError):
    pass


def checked(y, shape: tuple) -> np.ndarray:
    """A program's output, or ProgramError when its shape is wrong or a value is not finite."""
    if getattr(y, "shape", None) != shape:
        raise ProgramError(f"returned shape {getattr(y, 'shape', None)}, expected {shape}")
    moved(y.nbytes)  # one read: a sum is NaN/Inf when a value is (fp32 sums of fp16-range values stay finite)
    if not np.isfinite(y.sum()) and not np.isfinite(y).all():
        raise ProgramError("returned NaN or Inf")
    return y


def workers(default: int = 1) -> int:
    """Calls in flight at once: NPUMOE_WORKERS if set, else ``default`` (the cost model's)."""
    w = os.environ.get("NPUMOE_WORKERS", "")
    return max(1, int(w)) if w.strip().isdigit() else max(1, int(default or 1))


def _pool(n: int) -> ThreadPoolExecutor:
    p = _POOLS.get(n)
    if p is None:
        p = _POOLS[n] = ThreadPoolExecutor(n, thread_name_prefix="npumoe-program")
    return p


def run_calls(programs: Sequence, calls: List[tuple], x_np: np.ndarray, outs: np.ndarray, n_workers: int = 0,
              inputs: Optional[dict] = None) -> int:
    """calls: (group index, expert ids (G,), capacity C, source token rows (G*C,)) as
    ``tiers.plan_slots`` lists them; x_np: (N, D) float32; outs: (>= sum G*C, D) float32.
    Call i's output rows are outs[sum of the earlier calls' G*C :][: G*C]. ``inputs``: call
    index -> its rows already gathered in the program's layout (the executor gathers (G, D, C)
    rows on MLX: ``OffloadExecutor._gather_on_mlx``). Returns the rows written. Raises
    ProgramError on a wrong shape or non-finite values."""
    D = x_np.shape[1]
    offsets = np.concatenate([[0], np.cumsum([len(ids) * cap for _, ids, cap, _ in calls])]).astype(int)

    def one(i: int) -> None:
        gi, ids, cap, src = calls[i]
        G, prog = len(ids), programs[gi]
        layout = prog.input_layout
        xg = inputs[i] if inputs and i in inputs else gather(x_np, src, G, cap, layout)  # once, in its layout
        dst = outs[offsets[i] : offsets[i + 1]].reshape(G, cap, D)
        if layout == "GCD" and prog.concurrent:
            checked(prog.run_into(xg, cap, dst), xg.shape)  # written in place: no output copy
        elif layout == "GCD":
            copy_into(dst, checked(prog.run(xg, cap), xg.shape))
        else:  # (G, D, C) out: transposed back as it is copied into the call's rows
            copy_into(dst, checked(prog.run_layout(xg, cap), xg.shape).transpose(0, 2, 1))

    n = workers(n_workers)
    order = sorted(range(len(calls)), key=lambda i: -(offsets[i + 1] - offsets[i]))  # largest first
    if n <= 1 or len(calls) < 2 or not all(programs[c[0]].concurrent for c in calls):
        for i in order:
            one(i)
    else:
        list(_pool(n).map(one, order))  # re-raises the first failure
    return int(offsets[-1])
