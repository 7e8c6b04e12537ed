"""Host copies per program row: the bytes the executor's real path moves, counted, against the
bytes the cost model prices (issue 21, item 4). A backend whose path changes without its
``HOST_BYTES_PER_ELEMENT`` following fails here.

The count comes from running ``OffloadExecutor`` on a real layer call: every host pass of
dispatch.py, executor.py and the programs goes through ``dispatch.moved``, which a counter
installed here sums. Core ML cannot run off macOS, so its compiled model is a fake that
handles arrays the way coremltools' bridge does (coreml-evidence.md Q3, read from
coremltools' source): fp16 in is cast back to fp32, Core ML converts fp32 to the model's fp16
input, the fp16 output to fp32, and that is copied into a py::array.
"""

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.switch_layers import SwitchGLU

from ane_kernels.spec import reference_ffn
from npumoe_mlx import dispatch
from npumoe_mlx.backends import load_backend
from npumoe_mlx.backends.coreml import HOST_BYTES_PER_ELEMENT as COREML_BYTES
from npumoe_mlx.backends.coreml import CoreMLProgram, host_bytes
from npumoe_mlx.cost import CostModel
from npumoe_mlx.backends.registry import default_cost
from npumoe_mlx.executor import OffloadExecutor
from npumoe_mlx.plan import GroupPlan, LayerPlan
from npumoe_mlx.programs import spec_from_switch_glu

E, D, H, N, K = 8, 64, 32, 256, 2
TIERS = [64, 128, 256]


class FakeCompiledModel:
    """coremltools' ``CompiledMLModel.predict`` as its bridge moves arrays; the FFN itself (the
    Neural Engine's work, not a host pass) is the numpy reference in fp16."""

    def __init__(self, spec, layout: str):
        self.spec, self.layout, self.seen = spec, layout, []

    def predict(self, feeds: dict) -> dict:
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
        y16 = reference_ffn(self.spec, gcd.astype(np.float32)).astype(np.float16)
        y16 = y16 if self.layout == "GCD" else np.ascontiguousarray(y16.transpose(0, 2, 1))
        y32 = y16.astype(np.float32)  # CoreMLPythonUtils.mm: fp16 MLMultiArray -> fp32
        dispatch.moved(6 * y16.size)
        y = np.array(y32)  # ... then into a py::array
        dispatch.moved(8 * y.size)
        return {"y": y}


class ChannelsFirstCoreMLProgram(CoreMLProgram):
    """The program as the channels-first graph takes it (x, y: (G, D, C); coreml-prog's change)."""

    input_layout = "GDC"


def _layer(seed=0):
    mx.random.seed(seed)
    glu = SwitchGLU(D, H, E)
    mx.eval(glu.parameters())
    rng = np.random.default_rng(seed)
    inds = mx.array(np.stack([rng.choice(E, K, replace=False) for _ in range(N)]).astype(np.uint32))[None]
    x = mx.array(rng.standard_normal((1, N, D)).astype(np.float32))
    groups = [GroupPlan([0, 1, 2], TIERS), GroupPlan([3, 4, 5], TIERS)]  # experts 6, 7: MLX (cold)
    lp = LayerPlan(0, "p", E, K, D, H, groups=groups, cold=[6, 7], min_tokens=1)
    return glu, x, inds, lp


def _programs(backend: str, glu, lp):
    specs = [spec_from_switch_glu(glu, layer=0, expert_ids=g.experts, tiers=g.tiers) for g in lp.groups]
    if backend in ("onnx", "mlx"):
        return [load_backend(backend).load(s) for s in specs]
    cls = CoreMLProgram if backend == "coreml" else ChannelsFirstCoreMLProgram
    return [cls(s.name, {t: FakeCompiledModel(s, cls.input_layout) for t in s.tiers}, s.G, s.D, Path("unused"),
                functions={t: f"c{t}" for t in s.tiers}, meta=s.describe()) for s in specs]


def counted_bytes_per_element(backend: str):
    """Run one offloaded layer call on ``backend`` with every host pass counted: (bytes per
    element of a program row, the call's output, the stock output, the programs)."""
    glu, x, inds, lp = _layer()
    progs = _programs(backend, glu, lp)
    eager = CostModel(backend, 1e-9, 1e15, 1e15, 0.0, 1.0, 1.0, first_offload_tokens=1, source="test")
    ex = OffloadExecutor(lp, progs, eager, overflow="rerun")
    ex.notice = lambda m: None
    dispatch.COUNTER = [0]
    try:
        y = ex(glu, x, inds)
        mx.eval(y)
        counted = dispatch.COUNTER[0]
    finally:
        dispatch.COUNTER = None
    assert ex.stats.offloaded == 1 and ex.stats.spilled > 0  # programs and MLX both ran
    return counted / (ex.stats.slots * D), y, glu(x, inds), progs


@pytest.mark.parametrize("backend", ["onnx", "mlx", "coreml"])
def test_priced_copy_bytes_match_the_counted_path(backend):
    per_elem, y, ref, _ = counted_bytes_per_element(backend)
    priced = default_cost(backend).copy_bytes
    assert abs(priced - per_elem) <= 0.1 * per_elem, f"{backend}: priced {priced} B, counted {per_elem:.2f} B"
    # the old flat 8 B per element would fail this test on every backend
    assert abs(8 - per_elem) > 0.1 * per_elem
    tol = 1e-5 if backend != "coreml" else 2e-2  # Core ML: fp16 in the fake's FFN
    assert float(mx.abs(y - ref).max()) <= tol * max(1.0, float(mx.abs(ref).max()))


def test_channels_first_program_gets_its_layout_and_is_priced():
    """A (G, D, C) program (Core ML without in-graph transposes) gets fp32 (G, D, C) rows
    gathered on MLX (no host pass, no fp16 round trip) and its copies are what ``host_bytes`` says."""
    per_elem, y, ref, progs = counted_bytes_per_element("coreml-gdc")
    want = host_bytes("GDC")
    assert abs(want - per_elem) <= 0.1 * per_elem, f"priced {want} B, counted {per_elem:.2f} B"
    seen = [s for p in progs for m in p.models.values() for s in m.seen]
    assert seen and all(dt == np.float32 and shape[1] == D and shape[2] in TIERS for shape, dt in seen)
    assert float(mx.abs(y - ref).max()) <= 2e-2 * max(1.0, float(mx.abs(ref).max()))


def test_coreml_program_passes_fp32_rows_in_its_layout():
    _, _, _, progs = counted_bytes_per_element("coreml")
    seen = [s for p in progs for m in p.models.values() for s in m.seen]
    assert seen and all(dt == np.float32 and s[1] == D for s, dt in seen)  # (G, D, C), no host astype(float16)
    assert default_cost("coreml").copy_bytes == COREML_BYTES


def test_cost_model_prices_each_backends_bytes():
    """The copy term scales with the backend's counted bytes, not a flat 8."""
    on, cm = default_cost("onnx"), default_cost("coreml")
    base = dict(dispatch_s=0.0, program_flops=1e30, copy_bps=1e9, sync_s=0.0, mlx_fixed_s=0.0, mlx_flops=1.0)
    for c in (on, cm):
        t = CostModel(c.backend, **base, host_bytes_per_element=c.copy_bytes).programs_s(2, 1, 100, D, H)
        assert t == pytest.approx(2 * 100 * D * c.copy_bytes / 1e9)
    assert cm.copy_bytes > on.copy_bytes


def test_host_gather_in_either_layout():
    """dispatch.gather (callers without MLX rows): the same rows, (G, C, D) or (G, D, C), counted."""
    x = np.random.default_rng(0).standard_normal((50, D)).astype(np.float32)
    src = np.random.default_rng(1).integers(0, 50, 3 * 16)
    dispatch.COUNTER = [0]
    try:
        gcd = dispatch.gather(x, src, 3, 16, "GCD")
        assert dispatch.COUNTER[0] == 8 * gcd.size
        gdc = dispatch.gather(x, src, 3, 16, "GDC")
        assert dispatch.COUNTER[0] == 8 * gcd.size + 16 * gdc.size
    finally:
        dispatch.COUNTER = None
    np.testing.assert_array_equal(gcd, x[src].reshape(3, 16, D))
    np.testing.assert_array_equal(gdc, gcd.transpose(0, 2, 1))
    with pytest.raises(ValueError, match="layout"):
        dispatch.gather(x, src, 3, 16, "DGC")
