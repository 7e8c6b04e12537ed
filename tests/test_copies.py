"""Host copies per program row: the bytes the executor's real path moves, counted, against the
bytes the cost model prices (issue 21, item 4). A backend whose path changes without its
``HOST_BYTES_PER_ELEMENT`` following fails here.

The count comes from running ``OffloadExecutor`` on a real layer call with every host pass
counted (``npumoe_mlx.tools.copies.count_copies``, which `npumoe selftest` also reports); Core ML's
compiled model is a fake that moves arrays as coremltools' bridge does.
"""

import mlx.core as mx
import numpy as np
import pytest

from npumoe_mlx.backends.coreml import HOST_BYTES_PER_ELEMENT as COREML_BYTES
from npumoe_mlx.backends.coreml import CoreMLProgram, host_bytes
from npumoe_mlx.backends.registry import default_cost
from npumoe_mlx.planning.cost import CostModel
from npumoe_mlx.runtime import dispatch
from npumoe_mlx.tools.copies import count_copies

D, H = 64, 32
TIERS = [64, 128, 256]


class ChannelsFirstCoreMLProgram(CoreMLProgram):
    """The program as the channels-first graph takes it (x, y: (G, D, C); coreml-prog's change)."""

    input_layout = "GDC"


def counted_bytes_per_element(backend: str, pairs: bool = False):
    """One offloaded layer call on ``backend``, every host pass counted (npumoe_mlx.tools.copies):
    (bytes per element of a program row, the call's output, the stock output, the programs);
    ``pairs``: bytes per element of a routed pair's row (the executor's finish) after the first."""
    cls = ChannelsFirstCoreMLProgram if backend == "coreml-gdc" else None
    c = count_copies("coreml" if cls else backend, D, H, program_cls=cls, tiers=TIERS)
    assert c.stats.offloaded == 1 and c.stats.spilled > 0  # programs and MLX both ran
    return (c.bytes_per_element,) + ((c.bytes_per_pair_element,) if pairs else ()) + (c.y, c.ref, c.programs)


@pytest.mark.parametrize("backend", ["onnx", "mlx", "coreml"])
def test_priced_copy_bytes_match_the_counted_path(backend):
    per_elem, per_pair, y, ref, _ = counted_bytes_per_element(backend, pairs=True)
    cost = default_cost(backend)
    priced = cost.copy_bytes
    assert abs(priced - per_elem) <= 0.1 * per_elem, f"{backend}: priced {priced} B, counted {per_elem:.2f} B"
    # the old flat 8 B per element would fail this test on every backend
    assert abs(8 - per_elem) > 0.1 * per_elem
    # the finish, per routed pair: priced as counted (16 with MLX on the CPU, as here; 0 on a GPU)
    assert cost.host_bytes_per_pair == pytest.approx(per_pair, rel=0.1, abs=0.01), \
        f"{backend}: priced {cost.host_bytes_per_pair} B per pair element, counted {per_pair:.2f} B"
    tol = 1e-5 if backend != "coreml" else 2e-2  # Core ML: fp16 in the fake's FFN
    assert float(mx.abs(y - ref).max()) <= tol * max(1.0, float(mx.abs(ref).max()))


@pytest.mark.parametrize("on_host", [True, False])
def test_the_finish_path_follows_mlxs_device_and_its_count(monkeypatch, on_host):
    """MLX on the CPU: numpy takes each pair's row (16 B per pair element, none per program row);
    MLX on a GPU (forced here): the slot buffer goes over in one copy (8 B per row element) and
    MLX takes the rows. Same output either way, each counted as the registry prices it."""
    from npumoe_mlx.runtime import executor
    from npumoe_mlx.backends import registry

    monkeypatch.setattr(executor, "finish_on_host", lambda: on_host)
    per_elem, per_pair, y, ref, _ = counted_bytes_per_element("onnx", pairs=True)
    info = registry.get("onnx")
    assert dispatch.finish_bytes(on_host) == ((0, 16) if on_host else (8, 0))
    assert per_elem == pytest.approx(info.host_bytes(on_host), rel=0.1)
    assert per_pair == pytest.approx(info.host_bytes_per_pair(on_host), abs=0.01)
    assert float(mx.abs(y - ref).max()) <= 1e-5 * max(1.0, float(mx.abs(ref).max()))


def test_channels_first_program_gets_its_layout_and_is_priced():
    """A (G, D, C) program (Core ML without in-graph transposes) gets fp32 (G, D, C) rows
    gathered on MLX (no host pass, no fp16 round trip) and its copies are what ``host_bytes`` says."""
    per_elem, y, ref, progs = counted_bytes_per_element("coreml-gdc")
    want = host_bytes("GDC") + dispatch.finish_bytes(on_host=False)[0]  # counted on a Mac's finish, as priced
    assert abs(want - per_elem) <= 0.1 * per_elem, f"priced {want} B, counted {per_elem:.2f} B"
    seen = [s for p in progs for m in p.models.values() for s in m.seen]
    assert seen and all(dt == np.float32 and shape[1] == D and shape[2] in TIERS for shape, dt in seen)
    assert float(mx.abs(y - ref).max()) <= 2e-2 * max(1.0, float(mx.abs(ref).max()))


def test_coreml_program_passes_fp32_rows_in_its_layout():
    _, _, _, progs = counted_bytes_per_element("coreml")
    seen = [s for p in progs for m in p.models.values() for s in m.seen]
    assert seen and all(dt == np.float32 and s[1] == D for s, dt in seen)  # (G, D, C), no host astype(float16)
    assert default_cost("coreml").copy_bytes == COREML_BYTES + dispatch.finish_bytes(on_host=False)[0]  # a Mac's: 40


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
    dispatch.COUNTER = [0, 0]
    try:
        gcd = dispatch.gather(x, src, 3, 16, "GCD")
        assert dispatch.COUNTER[0] == 8 * gcd.size
        gdc = dispatch.gather(x, src, 3, 16, "GDC")
        assert dispatch.COUNTER == [8 * gcd.size + 16 * gdc.size, 0]  # per program row, none per pair
    finally:
        dispatch.COUNTER = None
    np.testing.assert_array_equal(gcd, x[src].reshape(3, 16, D))
    np.testing.assert_array_equal(gdc, gcd.transpose(0, 2, 1))
    with pytest.raises(ValueError, match="layout"):
        dispatch.gather(x, src, 3, 16, "DGC")


def test_the_finish_is_priced_per_routed_pair():
    """An offloaded call pays its finish on the host per routed pair (MLX on the CPU): the
    executor's decision and the planner's call price see it; a cost file saved before the
    field prices none (as it was planned)."""
    from npumoe_mlx.planning.tiers import CallContext, decide_call

    base = dict(dispatch_s=1e-4, program_flops=1e12, copy_bps=1e9, sync_s=1e-4, mlx_fixed_s=1e-4, mlx_flops=1e9)
    cpu = CostModel("onnx", **base, host_bytes_per_element=12.0, host_bytes_per_pair=16.0)
    gpu = CostModel.from_dict({k: v for k, v in cpu.to_dict().items() if k != "host_bytes_per_pair"})
    assert gpu.host_bytes_per_pair == 0.0
    counts = np.array([40, 30, 0, 10])
    groups, cold = [np.array([0, 1]), np.array([3])], np.array([False, False, True, False])
    a, b = (decide_call(counts, CallContext(groups, [[64], [16]], cold, c, D, H, "rerun")) for c in (cpu, gpu))
    assert a.program_s - b.program_s == pytest.approx(counts.sum() * D * 16 / 1e9)
    assert cpu.finish_s(counts.sum(), D) == pytest.approx(counts.sum() * D * 16 / 1e9)
    assert cpu.call_s(1.0, 0.0, finish_s=0.5) == pytest.approx(cpu.sync_s + 1.5)
    assert cpu.call_s(0.0, 1.0, finish_s=0.5) == pytest.approx(cpu.mlx_fixed_s + 1.0)  # no programs: no finish
