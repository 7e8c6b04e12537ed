"""Run one layer call's program calls: gather rows in, run, write rows out.

Programs that say they are ``concurrent`` (onnxruntime sessions: a run releases the GIL
and a fresh IO binding per call makes it thread-safe) can run on several threads at
once (``CostModel.workers``, which ``tune`` picks), the largest calls first (each worker
takes the next call as it frees up: longest processing time first). Measured on this
2-core machine (OLMoE dims, q4, the 64 calls of a 512-token layer call): 2 at once took
1.39x less wall time at load 6 (onnxruntime's own threads idle at every operator's
barrier when another process holds a core), but 6% more at load 1.5. Outputs go
straight into the caller's buffer (no copy per call).
"""

import os
from concurrent.futures import ThreadPoolExecutor
from typing import List, Sequence

import numpy as np

MAX_WORKERS = 2  # what `tune` tries (CostModel.workers); NPUMOE_WORKERS overrides both
_POOLS = {}


class ProgramError(RuntimeError):
    pass


def checked(y, shape: tuple) -> np.ndarray:
    """A program's output, or ProgramError when its shape is wrong or a value is not finite."""
    if getattr(y, "shape", None) != shape:
        raise ProgramError(f"returned shape {getattr(y, 'shape', None)}, expected {shape}")
    if not np.isfinite(y).all():
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


def run_calls(programs: Sequence, calls: List[tuple], x_np: np.ndarray, outs: np.ndarray, n_workers: int = 0) -> int:
    """calls: (group index, expert ids (G,), capacity C, source token rows (G*C,)) as
    ``tiers.plan_slots`` lists them; x_np: (N, D) float32; outs: (>= sum G*C, D) float32.
    Call i's output rows are outs[sum of the earlier calls' G*C :][: G*C]. Returns the rows
    written. Raises ProgramError on a wrong shape or non-finite values."""
    D = x_np.shape[1]
    offsets = np.concatenate([[0], np.cumsum([len(ids) * cap for _, ids, cap, _ in calls])]).astype(int)

    def one(i: int) -> None:
        gi, ids, cap, src = calls[i]
        G = len(ids)
        xg = x_np[src].reshape(G, cap, D)  # (G, C, D): the gather copies the rows once
        dst = outs[offsets[i] : offsets[i + 1]].reshape(G, cap, D)
        prog = programs[gi]
        if prog.concurrent:
            checked(prog.run_into(xg, cap, dst), xg.shape)
        else:
            dst[...] = checked(prog.run(xg, cap), xg.shape)

    n = workers(n_workers)
    order = sorted(range(len(calls)), key=lambda i: -(offsets[i + 1] - offsets[i]))  # largest first
    if n <= 1 or len(calls) < 2 or not all(programs[c[0]].concurrent for c in calls):
        for i in order:
            one(i)
    else:
        list(_pool(n).map(one, order))  # re-raises the first failure
    return int(offsets[-1])
