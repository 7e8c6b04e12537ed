"""Host bytes per program row, counted on the executor's real path (issue 21, item 4).

One offloaded layer call runs through ``OffloadExecutor`` with ``dispatch.COUNTER`` installed:
every host pass of dispatch.py, executor.py and the programs goes through ``dispatch.moved``,
counted per element of a program row, or of a routed pair (the executor's finish into pair
order when MLX runs on the CPU).
Core ML cannot run off macOS, so its compiled model is a fake that handles arrays the way
coremltools' bridge does (coreml-evidence.md Q3, read from coremltools' source): fp16 in is
cast back to fp32, Core ML converts fp32 to the model's fp16 input, the fp16 output to fp32,
and that is copied into a py::array. Used by tests/test_copies.py and ``npumoe selftest``.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from ..runtime import dispatch


class FakeCompiledModel:
    """coremltools' ``CompiledMLModel.predict`` as its bridge moves arrays; the FFN itself (the
    Neural Engine's work, not a host pass) is the numpy reference in fp16."""

    def __init__(self, spec, layout: str):
        self.spec, self.layout, self.seen = spec, layout, []

    def predict(self, feeds: dict) -> dict:
        from ane_kernels.spec import reference_ffn

        x = feeds["x"]
        self.seen.append((x.shape, x.dtype))
        if x.dtype == np.float16:  # models/model.py: _update_float16_multiarray_input_to_float32
            x = x.astype(np.float32)
            dispatch.moved(6 * x.size)
        if x.dtype != np.float32:  # CoreMLPythonArray.mm:dataTypeOf: int32, fp32, fp64 only
            raise TypeError(f"coremltools takes no {x.dtype} input")
        xh = x.astype(np.float16)  # Core ML: fp32 MLMultiArray -> the model's fp16 input
        dispatch.moved(6 * x.size)
        gcd = xh if self.layout == "GCD" else xh.transpose(0, 2, 1)
        y16 = reference_ffn(self.spec, gcd.astype(np.float32), dtype=np.float32).astype(np.float16)
        y16 = y16 if self.layout == "GCD" else np.ascontiguousarray(y16.transpose(0, 2, 1))
        y32 = y16.astype(np.float32)  # CoreMLPythonUtils.mm: fp16 MLMultiArray -> fp32
        dispatch.moved(6 * y16.size)
        y = np.array(y32)  # ... then into a py::array
        dispatch.moved(8 * y.size)
        return {"y": y}


@dataclass
class CopyCount:
    bytes_per_element: float  # host bytes (read + written) per element of a program row
    bytes_per_pair_element: float  # host bytes per element of a routed pair's output row (the finish)
    y: object  # the offloaded call's output (mx.array)
    ref: object  # stock SwitchGLU's output on the same input
    programs: list
    stats: object  # the executor's LayerStats


def _layer(E: int, D: int, H: int, N: int, K: int, tiers, seed: int = 0):
    """A float32 SwitchGLU, N tokens routed to K of E experts, a plan with two offloaded groups
    of three and the rest cold (on MLX)."""
    import mlx.core as mx
    from mlx_lm.models.switch_layers import SwitchGLU

    from ..planning.plan import GroupPlan, LayerPlan

    mx.random.seed(seed)
    glu = SwitchGLU(D, H, E)
    mx.eval(glu.parameters())
    rng = np.random.default_rng(seed)
    inds = mx.array(np.stack([rng.choice(E, K, replace=False) for _ in range(N)]).astype(np.uint32))[None]
    x = mx.array(rng.standard_normal((1, N, D)).astype(np.float32))
    groups = [GroupPlan([0, 1, 2], list(tiers)), GroupPlan([3, 4, 5], list(tiers))]
    lp = LayerPlan(0, "p", E, K, D, H, groups=groups, cold=list(range(6, E)), min_tokens=1)
    return glu, x, inds, lp


def count_copies(backend: str = "coreml", D: int = 64, H: int = 32, program_cls=None, E: int = 8, N: int = 256,
                 K: int = 2, tiers=(64, 128, 256), on_host: Optional[bool] = None) -> CopyCount:
    """Run one offloaded layer call (x: (1, N, D)) on `backend` with every host pass counted.
    "coreml" runs ``program_cls`` (default backends.coreml.CoreMLProgram) over fake compiled
    models; "onnx" and "mlx" load their real programs. The executor's finish takes the side
    ``on_host`` says (None: the backend descriptor's ``finish_on_host``, else this process's
    MLX device; Core ML: a Mac's GPU side), as the registry prices it."""
    import mlx.core as mx

    from ..runtime import executor
    from ..backends import load_backend, registry
    from ..planning.cost import CostModel
    from ..runtime.executor import OffloadExecutor
    from ..build.programs import spec_from_switch_glu

    side = registry.get(backend).finish_on_host if on_host is None else on_host

    glu, x, inds, lp = _layer(E, D, H, N, K, tiers)
    specs = [spec_from_switch_glu(glu, layer=0, expert_ids=g.experts, tiers=g.tiers) for g in lp.groups]
    if backend == "coreml":
        if program_cls is None:
            from ..backends.coreml import CoreMLProgram as program_cls
        progs = [program_cls(s.name, {t: FakeCompiledModel(s, program_cls.input_layout) for t in s.tiers}, s.G, s.D,
                             Path("unused"), functions={t: f"c{t}" for t in s.tiers}, meta=s.describe())
                 for s in specs]
    else:
        progs = [load_backend(backend).load(s) for s in specs]
    eager = CostModel(backend, 1e-9, 1e15, 1e15, 0.0, 1.0, 1.0, first_offload_tokens=1, source="copy count")
    ex = OffloadExecutor(lp, progs, eager, overflow="rerun")
    ex.notice = lambda m: None
    dispatch.COUNTER = [0, 0]
    here = executor.finish_on_host
    if side is not None:
        executor.finish_on_host = lambda: side
    try:
        y = ex(glu, x, inds)
        mx.eval(y)
        rows, pairs = dispatch.COUNTER
    finally:
        dispatch.COUNTER = None
        executor.finish_on_host = here
    return CopyCount(rows / (ex.stats.slots * D), pairs / (ex.stats.pairs * D), y, glu(x, inds), progs, ex.stats)
