"""Costs of the two places an expert call can run: the programs, or MLX.

A small linear model, fitted by ``npumoe tune`` on this machine or taken from
parametric defaults (each backend's, in ``backends/registry.py``) for targets that
cannot be measured here (Core ML on a Mac). Every function takes scalars or numpy arrays
(the planner prices all calibration samples at once):

    program call (G experts, capacity C):  dispatch_s + G*expert_s            (per expert: its weights stream in)
                                            + G*C*flops_per_row / program_flops
                                            + G*C*D*copy_bytes / copy_bps   (host copies in and out)
    MLX on n pairs:                         mlx_fixed_s + n*flops_per_row / mlx_flops
    offloaded layer call:                   sync_s + P*D*pair_bytes / copy_bps (P routed pairs into
                                            pair order on the host) + the program calls, MLX spill at the same time:
                                            makespan = max(P, M) + (1 - overlap) * min(P, M)

``overlap`` is how much of the shorter side hides under the longer: 1 when programs and
MLX run on separate units (ANE and GPU), ~0 when they share the same cores (onnxruntime
CPU and MLX CPU here: measured, a 512-token OLMoE call took programs + spill, not the max).

``flops_per_row = 6*D*H`` (gate, up and down matmuls of one token through one expert).
``copy_bytes`` is the host bytes (read + written) the executor's path moves per element of a
program row on that backend: each backend module's ``HOST_BYTES_PER_ELEMENT``, counted on
the real path by tests/test_copies.py (it was a flat 8: Core ML moved ~7x that), plus the
executor's finish. ``pair_bytes`` (``host_bytes_per_pair``) is that finish's per routed pair
where MLX runs on the CPU (numpy takes each pair's row: 16; 0 on a GPU): ``dispatch.finish_bytes``.
"""

import json
from dataclasses import asdict, dataclass, fields
from typing import Optional

import numpy as np

from ane_kernels.formats import DEFAULT_FORMAT, expert_bytes

from ..atomic import write_json
from .chips import ChipProfile, chip_profile


def flops_per_row(D: int, H: int) -> float:
    return 6.0 * D * H


def _like(y):
    """``y`` as a float where it is a scalar (JSON-ready), else the array."""
    return float(y) if np.ndim(y) == 0 else y


@dataclass
class CostModel:
    backend: str
    dispatch_s: float  # fixed cost of one program call
    program_flops: float  # achieved FLOP/s inside a program
    copy_bps: float  # host bytes/s to gather rows in and scatter them out
    sync_s: float  # the one host sync of an offloaded layer call
    mlx_fixed_s: float  # fixed cost of one stock MLX expert call
    mlx_flops: float  # achieved FLOP/s of the stock MLX expert path
    source: str = "parametric"  # "parametric" or "measured on <host>"
    mlx_dense_flops: float = 0.0  # MLX on a dense MLP (shared experts); 0 = same as mlx_flops
    expert_s: float = 0.0  # per expert per program call, whatever C (weights read once)
    # Energy of each unit (0 = unknown): joules per FLOP computed and per call made.
    program_j_per_flop: float = 0.0
    program_j_per_call: float = 0.0
    mlx_j_per_flop: float = 0.0
    mlx_j_per_call: float = 0.0
    # True: a program streams its weights while it computes (roofline: the larger of the
    # two counts); False: the fitted sum (what ``tune`` measures on CPU backends).
    weights_overlap: bool = False
    # Calls of fewer tokens stay on MLX whatever the terms above say. A 1-token call is
    # decode: its host sync stalls mlx_lm's pipelined loop (the next step's graph is built
    # while this one computes), which no per-call term prices: the demo model decoded at 77
    # vs 125 tok/s stock with decode on programs, each layer call alone within 0.3 ms of stock.
    first_offload_tokens: int = 2
    # Fraction of the shorter side (programs or MLX) that runs hidden under the longer
    # (``makespan``): 1 = separate units, 0 = one set of cores shared. ``tune`` measures it;
    # 1.0 for cost models saved before it existed (their decisions stay as they were).
    overlap: float = 1.0
    # Program calls of one layer call in flight at once (dispatch.run_calls): ``tune`` keeps
    # 2 where that is faster per call here (a busy machine: 1.4x), else 1 (quiet: 2 cost 6%).
    workers: int = 1
    # A decode step's seconds per layer in mlx_lm's loop with ``decode_k`` routed pairs per
    # layer on programs (a released layer: host sync, k 1-row calls) or on MLX, the rest of
    # the layer alike (tune.measure_decode; 0 = not measured: ``program_s`` and ``mlx_s`` price it).
    decode_k: int = 0
    decode_program_s: float = 0.0
    decode_mlx_s: float = 0.0
    decode_workers: int = 0  # program calls in flight at once in those small calls (0: ``workers``)
    # Host bytes a row element moves on its data path, in and out (the backend's
    # ``host_bytes_per_element``): float32 gathered in and scattered out.
    host_bytes_per_element: float = 8.0
    # Host bytes per element of each routed pair's output row of an offloaded call: the
    # executor's finish puts the rows in pair order with numpy when MLX runs on the CPU
    # (``dispatch.finish_bytes``: 16); 0 where MLX takes them on its device (a GPU).
    host_bytes_per_pair: float = 0.0

    def makespan(self, program_s, mlx_s):
        """Seconds of a call whose programs take ``program_s`` and whose MLX side takes ``mlx_s``
        (scalars or arrays), both started at once."""
        return np.maximum(program_s, mlx_s) + (1.0 - self.overlap) * np.minimum(program_s, mlx_s)

    def program_s(self, G: int, C: int, D: int, H: int) -> float:
        return float(self.programs_s(G, 1, C, D, H))

    def programs_s(self, G: int, rounds, rows, D: int, H: int):
        """Seconds of ``rounds`` program calls of G experts with ``rows`` rows per expert in all
        (scalars or arrays): dispatch per call, weights per expert per call, compute and copies."""
        weights = rounds * G * self.expert_s
        compute = G * rows * flops_per_row(D, H) / self.program_flops
        body = np.maximum(weights, compute) if self.weights_overlap else weights + compute
        return rounds * self.dispatch_s + body + G * rows * D * self.host_bytes_per_element / self.copy_bps

    def programs_j(self, G: int, rounds, rows, D: int, H: int):
        """Joules of ``rounds`` program calls of G experts, ``rows`` rows per expert in all
        (scalars or arrays; padded rows compute too)."""
        return rounds * self.program_j_per_call + G * rows * flops_per_row(D, H) * self.program_j_per_flop

    @property
    def copy_bytes(self) -> float:
        """Host bytes per element of a program row (read + written) on this backend's path."""
        return self.host_bytes_per_element

    def finish_s(self, pairs, D: int):
        """Seconds of the host passes over an offloaded call's ``pairs`` routed pairs (scalar or
        array): the executor's finish into pair order (``host_bytes_per_pair``; 0 on a GPU)."""
        return pairs * D * self.host_bytes_per_pair / self.copy_bps

    def row_s(self, D: int, H: int) -> float:
        """Seconds per program row (compute plus the host copies in and out)."""
        return flops_per_row(D, H) / self.program_flops + D * self.host_bytes_per_element / self.copy_bps

    def mlx_rate(self, D: int, H: int):
        """(seconds, joules) of one routed pair on MLX, fixed costs aside."""
        return flops_per_row(D, H) / self.mlx_flops, flops_per_row(D, H) * self.mlx_j_per_flop

    def mlx_work_s(self, pairs, D: int, H: int):
        """Seconds of ``pairs`` routed pairs (scalar or array) on MLX, its fixed cost aside."""
        return pairs * flops_per_row(D, H) / self.mlx_flops

    def mlx_work_j(self, pairs, D: int, H: int):
        """Joules of ``pairs`` routed pairs (scalar or array) on MLX, its fixed cost aside."""
        return pairs * flops_per_row(D, H) * self.mlx_j_per_flop

    def mlx_s(self, pairs, D: int, H: int):
        """Seconds of one MLX expert call on ``pairs`` pairs (scalar or array; 0 for none)."""
        return _like(np.where(np.asarray(pairs) > 0, self.mlx_fixed_s + self.mlx_work_s(pairs, D, H), 0.0))

    def mlx_dense_s(self, rows, D: int, H: int):
        """MLX time of a dense gated MLP (a shared expert) over ``rows`` tokens (scalar or array)."""
        t = self.mlx_fixed_s + rows * flops_per_row(D, H) / (self.mlx_dense_flops or self.mlx_flops)
        return _like(np.where(np.asarray(rows) > 0, t, 0.0))

    def program_j(self, G: int, C, D: int, H: int):
        """Joules of one program call (padded rows compute too)."""
        return _like(self.programs_j(G, 1, C, D, H))

    def mlx_j(self, pairs, D: int, H: int):
        """Joules of one MLX expert call on ``pairs`` pairs (scalar or array; 0 for none)."""
        return _like(np.where(np.asarray(pairs) > 0, self.mlx_j_per_call + self.mlx_work_j(pairs, D, H), 0.0))

    def decode_step_s(self, k: int, sizes, D: int, H: int):
        """(programs s, MLX s) of a decode step's layer with ``k`` routed pairs, from the step
        ``tune`` timed in mlx_lm's loop (``decode_k`` pairs; needs ``decode_k`` > 0) scaled to k,
        plus, on programs, what groups of ``sizes`` experts compute beyond 1-expert calls: a pair
        lands in a group in proportion to its size."""
        scale, n = k / self.decode_k, sum(sizes)
        prog = scale * self.decode_program_s + k * sum(
            G / n * (self.program_s(G, 1, D, H) - self.program_s(1, 1, D, H)) for G in sizes)
        return prog, scale * self.decode_mlx_s

    def call_s(self, program_s, mlx_s, idle: float = 0.0, finish_s=0.0):
        """Seconds of a whole offloaded layer call (scalars or arrays): ``program_s`` of program
        calls (a side above ``idle`` adds the host sync and ``finish_s``, the host passes over
        the call's pairs: ``finish_s(pairs, D)``) and ``mlx_s`` of MLX work (above 0 adds MLX's
        fixed cost), both started at once (``makespan``)."""
        prog = np.where(np.asarray(program_s) > idle, self.sync_s + finish_s + program_s, 0.0)
        mlx = np.where(np.asarray(mlx_s) > 0, self.mlx_fixed_s + mlx_s, 0.0)
        return _like(self.makespan(prog, mlx))

    def call_j(self, program_j, mlx_j, mlx_s):
        """Joules of that call: both sides' work plus MLX's fixed joules where it has work (``mlx_s`` > 0)."""
        return _like(program_j + mlx_j + (np.asarray(mlx_s) > 0) * self.mlx_j_per_call)

    @property
    def has_energy(self) -> bool:
        return self.program_j_per_flop > 0 and self.mlx_j_per_flop > 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "CostModel":
        names = {f.name for f in fields(cls)}
        optional = {"source", "mlx_dense_flops", "expert_s", "program_j_per_flop", "program_j_per_call",
                    "mlx_j_per_flop", "mlx_j_per_call", "weights_overlap", "first_offload_tokens",
                    "overlap", "workers", "decode_k", "decode_program_s", "decode_mlx_s",
                    "decode_workers", "host_bytes_per_element", "host_bytes_per_pair"}
        missing = names - set(d) - optional
        if missing:
            raise ValueError(f"cost model is missing {', '.join(sorted(missing))}")
        return cls(**{k: d[k] for k in names if k in d})

    def save(self, path: str) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str) -> "CostModel":
        with open(path) as f:
            d = json.load(f)
        if isinstance(d, dict) and isinstance(d.get("cost"), dict):  # an `npumoe selftest --json` report
            d = d["cost"]
        return cls.from_dict(d)


# Host copies (every backend's copy_bps default, every --chip profile's): one CPU core's
# memcpy, 50.5 GB/s on an M2 Max (ggml-org/whisper.cpp #89, `bench` memcpy with 1 thread);
# M3 Ultra 47.9 GB/s (tinymembench C copy, geerlingguy/sbc-reviews #95), M1 Ultra 36.6 GB/s
# (whisper.cpp #89). Each backend's parametric defaults: ``backends/registry.py``.
MEMCPY_BPS = 50e9


def chip_cost_model(name: str, backend: str, D: int = 0, H: int = 0, bits: int = 16, copy_bps: float = MEMCPY_BPS,
                    host_bytes_per_element: float = 8.0, weight_format: Optional[str] = DEFAULT_FORMAT) -> CostModel:
    """Predicted costs on an Apple chip (``chips.py`` profiles): programs on the ANE, MLX on
    the GPU, running at the same time (``backends.registry.chip_cost`` checks the backend).

    Program call: ANE dispatch + the larger of its weights streamed at the ANE's bandwidth
    (per expert: ``formats.expert_bytes(weight_format, D, H, bits)``, the bytes the Core ML
    weight format streams, default formats.DEFAULT_FORMAT; None: MLX's 3*D*H*bits/8) and its rows at the ANE's
    FLOP/s (roofline). MLX: the
    GPU's per-layer kernel overhead + FLOPs at its rate. Energy: each unit's busy power
    per FLOP, and power x its fixed time per call. Host copies keep the backend's default.
    ``name`` may be a ChipProfile itself (``npumoe selftest``'s measured one).
    """
    c = name if isinstance(name, ChipProfile) else chip_profile(name)
    return CostModel(
        backend=backend,
        dispatch_s=c.ane_dispatch_s,
        program_flops=c.ane_tflops * 1e12,
        copy_bps=copy_bps,
        sync_s=c.sync_s,
        mlx_fixed_s=c.gpu_dispatch_s,
        mlx_flops=c.gpu_tflops * 1e12,
        source=f"chip profile {c.name} (npumoe_mlx/data/chips.json)",
        mlx_dense_flops=c.gpu_tflops * 1e12,
        expert_s=expert_bytes(weight_format, D, H, bits) / (c.ane_bw_gbs * 1e9) if D and H else 0.0,
        weights_overlap=True,
        program_j_per_flop=c.ane_power_w / (c.ane_tflops * 1e12),
        program_j_per_call=c.ane_power_w * c.ane_dispatch_s,
        mlx_j_per_flop=c.gpu_power_w / (c.gpu_tflops * 1e12),
        mlx_j_per_call=c.gpu_power_w * c.gpu_dispatch_s,
        host_bytes_per_element=host_bytes_per_element,
    )


def describe(cost: Optional[CostModel]) -> str:
    if cost is None:
        return "none"
    return (
        f"{cost.backend} ({cost.source}): dispatch {cost.dispatch_s * 1e3:.3f} ms "
        f"+ {cost.expert_s * 1e3:.3f} ms per expert, "
        f"programs {cost.program_flops / 1e9:.1f} GFLOP/s, MLX {cost.mlx_flops / 1e9:.1f} GFLOP/s "
        f"+ {cost.mlx_fixed_s * 1e3:.3f} ms, sync {cost.sync_s * 1e3:.3f} ms, overlap {cost.overlap:.2f}"
        + (f", decode per layer ({cost.decode_k} pairs) programs {cost.decode_program_s * 1e3:.3f} ms vs MLX "
           f"{cost.decode_mlx_s * 1e3:.3f} ms, {cost.decode_workers or cost.workers} at once" if cost.decode_k else "")
    )
