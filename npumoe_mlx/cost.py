"""Costs of the two places an expert call can run: the programs, or MLX.

A small linear model, fitted by ``npumoe tune`` on this machine or taken from
parametric defaults for targets that cannot be measured here (Core ML on a Mac):

    program call (G experts, capacity C):  dispatch_s + G*expert_s            (per expert: its weights stream in)
                                            + G*C*flops_per_row / program_flops
                                            + G*C*D*bytes / copy_bps   (gather in, scatter out)
    MLX on n pairs:                         mlx_fixed_s + n*flops_per_row / mlx_flops
    offloaded layer call:                   sync_s + the program calls, MLX spill at the same time:
                                            makespan = max(P, M) + (1 - overlap) * min(P, M)

``overlap`` is how much of the shorter side hides under the longer: 1 when programs and
MLX run on separate units (ANE and GPU), ~0 when they share the same cores (onnxruntime
CPU and MLX CPU here: measured, a 512-token OLMoE call took programs + spill, not the max).

``flops_per_row = 6*D*H`` (gate, up and down matmuls of one token through one expert).
"""

import json
from dataclasses import asdict, dataclass, fields
from typing import Dict, Optional

import numpy as np

from .atomic import write_json
from .chips import ChipProfile, chip_profile


def flops_per_row(D: int, H: int) -> float:
    return 6.0 * D * H


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
        return rounds * self.dispatch_s + body + G * rows * D * 8 / self.copy_bps

    def row_s(self, D: int, H: int) -> float:
        """Seconds per program row (compute plus the host copies in and out)."""
        return flops_per_row(D, H) / self.program_flops + D * 8 / self.copy_bps

    def mlx_s(self, pairs: int, D: int, H: int) -> float:
        if pairs <= 0:
            return 0.0
        return self.mlx_fixed_s + pairs * flops_per_row(D, H) / self.mlx_flops

    def mlx_dense_s(self, rows: int, D: int, H: int) -> float:
        """MLX time of a dense gated MLP (a shared expert) over ``rows`` tokens."""
        if rows <= 0:
            return 0.0
        return self.mlx_fixed_s + rows * flops_per_row(D, H) / (self.mlx_dense_flops or self.mlx_flops)

    def program_j(self, G: int, C: int, D: int, H: int) -> float:
        """Joules of one program call (padded rows compute too)."""
        return self.program_j_per_call + G * C * flops_per_row(D, H) * self.program_j_per_flop

    def mlx_j(self, pairs: int, D: int, H: int) -> float:
        if pairs <= 0:
            return 0.0
        return self.mlx_j_per_call + pairs * flops_per_row(D, H) * self.mlx_j_per_flop

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
                    "decode_workers"}
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


# Parametric defaults. coreml: ANE numbers from shared/reference/ane-constraints.md
# (Core ML predict ~0.2-0.4 ms per call; 2.3 TFLOPS on one 2048ch x 64 conv, so
# ~2 TFLOPS achieved on small grouped convs) against MLX on an Apple GPU (a few
# TFLOPS on gather_mm). Host copies (copy_bps, also every --chip profile's): one CPU
# core's memcpy, 50.5 GB/s on an M2 Max (ggml-org/whisper.cpp #89, `bench` memcpy with
# 1 thread); M3 Ultra 47.9 GB/s (tinymembench C copy, geerlingguy/sbc-reviews #95), M1
# Ultra 36.6 GB/s (whisper.cpp #89). onnx/mlx: this kind of 2-core x86 machine
# (measured once with `npumoe tune`; run it on yours).
DEFAULTS: Dict[str, CostModel] = {
    # Energy: ANE ~2-2.8 W busy, GPU ~20 W on LLM work (maderix/ANE; ANEForge, in
    # ane-constraints.md), per FLOP at the throughputs above.
    "coreml": CostModel("coreml", 3e-4, 2.0e12, 50e9, 5e-5, 5e-5, 3.0e12, mlx_dense_flops=5.0e12,
                        program_j_per_flop=2.5 / 2.0e12, program_j_per_call=2.5 * 3e-4,
                        mlx_j_per_flop=20.0 / 3.0e12, mlx_j_per_call=20.0 * 5e-5),
    # onnx/mlx here: programs and MLX share the CPU's cores (overlap 0, as `tune` measures).
    "onnx": CostModel("onnx", 5e-5, 6.0e10, 5e9, 5e-5, 1e-4, 2.0e9, mlx_dense_flops=8.0e9, overlap=0.0),
    "mlx": CostModel("mlx", 1e-4, 8.0e9, 5e9, 5e-5, 1e-4, 2.0e9, mlx_dense_flops=8.0e9, overlap=0.0),
}


def default_cost(backend: str) -> CostModel:
    if backend not in DEFAULTS:
        raise ValueError(f"no cost model for backend {backend!r}")
    return CostModel.from_dict(DEFAULTS[backend].to_dict())


def chip_cost(name, backend: str = "coreml", D: int = 0, H: int = 0, bits: int = 16) -> CostModel:
    """Predicted costs on an Apple chip (``chips.py`` profiles): Core ML programs on the
    ANE, MLX on the GPU, running at the same time.

    Program call: ANE dispatch + the larger of its weights streamed at the ANE's bandwidth
    (3*D*H*bits/8 bytes per expert, when D and H are given) and its rows at the ANE's
    FLOP/s (roofline). MLX: the
    GPU's per-layer kernel overhead + FLOPs at its rate. Energy: each unit's busy power
    per FLOP, and power x its fixed time per call. Host copies keep the coreml default.
    ``name`` may be a ChipProfile itself (``npumoe selftest``'s measured one).
    """
    if backend != "coreml":
        raise ValueError(f"--chip predicts Core ML programs on the ANE; use --backend coreml, not {backend!r}")
    c = name if isinstance(name, ChipProfile) else chip_profile(name)
    base = DEFAULTS["coreml"]
    return CostModel(
        backend="coreml",
        dispatch_s=c.ane_dispatch_s,
        program_flops=c.ane_tflops * 1e12,
        copy_bps=base.copy_bps,
        sync_s=c.sync_s,
        mlx_fixed_s=c.gpu_dispatch_s,
        mlx_flops=c.gpu_tflops * 1e12,
        source=f"chip profile {c.name} (npumoe_mlx/data/chips.json)",
        mlx_dense_flops=c.gpu_tflops * 1e12,
        expert_s=(3 * D * H * bits / 8) / (c.ane_bw_gbs * 1e9) if D and H else 0.0,
        weights_overlap=True,
        program_j_per_flop=c.ane_power_w / (c.ane_tflops * 1e12),
        program_j_per_call=c.ane_power_w * c.ane_dispatch_s,
        mlx_j_per_flop=c.gpu_power_w / (c.gpu_tflops * 1e12),
        mlx_j_per_call=c.gpu_power_w * c.gpu_dispatch_s,
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
