"""Host copies per program row: the bytes the executor's real path moves, counted, against the
bytes the cost model prices (issue 21, item 4). A backend whose path changes without its
``HOST_BYTES_PER_ELEMENT`` following fails here.

The count comes from running ``OffloadExecutor`` on a real layer call with every host pass
counted (``npumoe_mlx.copies.count_copies``, which `npumoe selftest` also reports); Core ML's
compiled model is a fake that moves arrays as coremltools' bridge does.
"""

import mlx.core as mx
import numpy as np
import pytest

from npumoe_mlx import dispatch
from npumoe_mlx.backends.coreml import HOST_BYTES_PER_ELEMENT as COREML_BYTES
from npumoe_mlx.backends.coreml import CoreMLProgram, host_bytes
from npumoe_mlx.backends.registry import default_cost
from npumoe_mlx.copies import count_copies
from npumoe_mlx.cost import CostModel

D, H = 64, 32
TIERS = [64, 128, 256]


class ChannelsFirstCoreMLProgram(CoreMLProgram):
    """The program as the channels-first graph takes it (x, y: (G, D, C); coreml-prog's change)."""

    input_layout = "GDC"


def counted_bytes_per_element(backend: str):
    """One offloaded layer call on ``backend``, every host pass counted (npumoe_mlx.copies):
    (bytes per element of a program row, the call's output, the stock output, the programs)."""
    cls = ChannelsFirstCoreMLProgram if backend == "coreml-gdc" else None
    c = count_copies("coreml" if cls else backend, D, H, program_cls=cls, tiers=TIERS)
    assert c.stats.offloaded == 1 and c.stats.spilled > 0  # programs and MLX both ran
    return c.bytes_per_element, c.y, c.ref, c.programs


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
