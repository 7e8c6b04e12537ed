"""The backend registry: every backend choice, limit, cost, tolerance and capability is read from it,
and the cost model's array functions agree with its scalar ones."""

import importlib
import re
import sys
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest

from npumoe_mlx.backends import BACKENDS, Program, load_backend, registry
from npumoe_mlx.build import verify
from npumoe_mlx.cli import SUBCOMMANDS
from npumoe_mlx.build.args import choose_cost
from npumoe_mlx.planning import residency
from npumoe_mlx.planning.cost import CostModel
from npumoe_mlx.planning.plan import GroupPlan, LayerPlan, Plan, PlanLimits
from npumoe_mlx.runtime import dispatch, offload

BUNDLED = registry.names(bundles=True)

# (subcommand, argv before the bad value, the option, the names it must offer)
CHOICES = [
    ("build", [], "--backend", BUNDLED),
    ("plan", [], "--backend", BUNDLED),
    ("replay", [], "--backend", BUNDLED),
    ("doctor", [], "--backend", BUNDLED),
    ("convert", [], "--backend", BUNDLED),
    ("tune", [], "--backend", registry.names()),
    ("build-programs", [], "--format", registry.names()),
    ("compare", [], "--backend", ("auto", *BUNDLED)),
    ("bench", ["e2e"], "--backend", ("auto", *BUNDLED)),
    ("bench", ["layer"], "--backend", registry.runnable()),
    ("generate", [], "--offload", ("auto", *registry.names(), "off")),
    ("server", [], "--offload", ("auto", *registry.names(), "off")),
]


@pytest.mark.parametrize("sub, pre, flag, want", CHOICES, ids=[f"{c[0]}{''.join(c[1])}{c[2]}" for c in CHOICES])
def test_every_cli_backend_choice_is_the_registrys(sub, pre, flag, want, capsys):
    """argparse lists the registry's names (in its order) and nothing else, on every subcommand."""
    main = importlib.import_module(SUBCOMMANDS[sub][0]).main
    try:
        code = main([*pre, flag, "no-such-backend"])
    except SystemExit as e:
        code = e.code
    assert code == 2
    listed = re.search(r"invalid choice: 'no-such-backend' \(choose from (.*)\)", capsys.readouterr().err).group(1)
    assert tuple(x.strip().strip("'") for x in listed.split(",")) == tuple(want)


def test_registry_entries_say_what_the_code_did_before():
    """The values the string tables held (limits, tolerances, units, release, auto) now live in the descriptors."""
    on = {n: registry.get(n) for n in registry.names()}
    assert BACKENDS == registry.names() == ("coreml", "onnx", "mlx", "onnx-coreml")
    assert {n: b.tolerance for n, b in on.items()} == {"coreml": 1e-2, "onnx": 1e-4, "mlx": 1e-4, "onnx-coreml": 1e-2}
    assert {n: b.unit for n, b in on.items()} == {"coreml": "ane", "onnx": "cpu", "mlx": "gpu", "onnx-coreml": "ane"}
    assert [n for n, b in on.items() if b.releases_mlx_experts] == ["onnx"]
    assert [n for n, b in on.items() if not b.bundles] == ["mlx"]
    assert {n: b.program_format for n, b in on.items()} == {"coreml": "coreml", "onnx": "onnx", "mlx": "mlx",
                                                           "onnx-coreml": "onnx"}
    # host bytes per row element as counted on each format's path (tests/test_copies.py; was a flat 8):
    # with MLX on a GPU (a Mac) the slot buffer's copy to MLX is per row element; with MLX on the
    # CPU the executor's finish is priced per routed pair instead (16 B per element, numpy's take)
    assert {n: b.host_bytes(on_host=False) for n, b in on.items()} == {"coreml": 40, "onnx": 20, "mlx": 44,
                                                                       "onnx-coreml": 20}
    assert {n: b.host_bytes(on_host=True) for n, b in on.items()} == {"coreml": 32, "onnx": 12, "mlx": 36,
                                                                      "onnx-coreml": 12}
    assert {b.host_bytes_per_pair(on_host=False) for b in on.values()} == {0.0}
    assert {b.host_bytes_per_pair(on_host=True) for b in on.values()} == {16.0}
    here = dispatch.finish_on_host()  # onnx and mlx price this process's path; Core ML a Mac's wherever it is asked
    assert {n: b.host_bytes() for n, b in on.items()} == {n: b.host_bytes(here) for n, b in on.items()
                                                         if b.finish_on_host is None} | {"coreml": 40, "onnx-coreml": 20}
    coreml, onnx = PlanLimits.for_backend("coreml"), PlanLimits.for_backend("onnx")
    assert (coreml.capacities[:2], coreml.capacities[-1], coreml.max_tiers, coreml.max_programs) == ([32, 64], 4096, 12, 120)
    assert (onnx.capacities[:2], onnx.capacities[-1], onnx.max_tiers, onnx.max_programs) == ([8, 16], 4096, 12, 4096)
    assert PlanLimits.for_backend("mlx").capacities == onnx.capacities
    with pytest.raises(ValueError, match="unknown backend 'npu'; choose from coreml, onnx, mlx, onnx-coreml"):
        PlanLimits.for_backend("npu")


def test_default_costs_are_the_old_table():
    onnx, mlx, coreml = (registry.default_cost(n) for n in ("onnx", "mlx", "coreml"))
    assert (onnx.dispatch_s, onnx.program_flops, onnx.copy_bps, onnx.overlap) == (5e-5, 6.0e10, 5e9, 0.0)
    assert (mlx.dispatch_s, mlx.program_flops, mlx.mlx_flops) == (1e-4, 8.0e9, 2.0e9)
    assert (coreml.dispatch_s, coreml.program_flops, coreml.copy_bps, coreml.overlap) == (3e-4, 2.0e12, 50e9, 1.0)
    assert coreml.program_j_per_flop == 2.5 / 2.0e12 and coreml.mlx_j_per_call == 20.0 * 5e-5
    a = registry.default_cost("onnx")
    a.dispatch_s = 1.0  # a copy: changing it leaves the registry's alone
    assert registry.default_cost("onnx").dispatch_s == 5e-5
    with pytest.raises(ValueError, match="no cost model for backend 'npu'"):
        registry.default_cost("npu")


def test_a_provider_descriptor_has_its_own_tolerance_limits_costs_and_availability(monkeypatch):
    """onnx-coreml shares the onnx program format but not the CPU's tolerance, and runs only
    where onnxruntime lists the CoreML provider."""
    lin = SimpleNamespace(down_proj=SimpleNamespace(weight=mx.zeros((2, 2), dtype=mx.float32)))
    assert verify.tolerance("onnx", lin) == 1e-4
    assert verify.tolerance("onnx-coreml", lin) == 1e-2
    assert PlanLimits.for_backend("onnx-coreml").backend == "onnx-coreml"
    cost = registry.default_cost("onnx-coreml")
    assert cost.backend == "onnx-coreml" and "not measured" in cost.source
    be = load_backend("onnx-coreml")
    assert type(be).__module__ == "npumoe_mlx.backends.onnx"
    assert be.providers == ["CoreMLExecutionProvider", "CPUExecutionProvider"] and not be.dynamic
    assert load_backend("onnx").providers == ["CPUExecutionProvider"]
    ort = pytest.importorskip("onnxruntime")
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    ok, why = registry.get("onnx-coreml").available()
    assert not ok and "lists no CoreMLExecutionProvider" in why
    assert registry.get("onnx").available() == (True, "")
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CoreMLExecutionProvider", "CPUExecutionProvider"])
    assert registry.get("onnx-coreml").available() == (True, "")


def test_offload_modes_auto_and_refusals_come_from_the_registry(monkeypatch):
    assert offload.MODES == ("auto", *registry.names(), "off")
    assert offload.resolve("auto") == registry.preferred()
    monkeypatch.setitem(registry.REGISTRY, "coreml",
                        registry.REGISTRY["coreml"].__class__(**{**registry.REGISTRY["coreml"].__dict__,
                                                                 "preferred_on": lambda: True}))
    assert offload.resolve("auto") == "coreml"
    ort = pytest.importorskip("onnxruntime")
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(offload.OffloadError, match="lists no CoreMLExecutionProvider.*use --offload coreml"):
        offload.resolve("onnx-coreml", check_runs=True)
    assert offload.resolve("onnx-coreml") == "onnx-coreml"  # without check_runs: named as asked


def test_the_preferred_backend_refused_points_to_stock_mlx(monkeypatch):
    """Naming the backend that just failed as the fix ("use --offload onnx (or auto)" for onnx) helps no one."""
    info = registry.REGISTRY["onnx"]
    monkeypatch.setitem(registry.REGISTRY, "onnx", info.__class__(**{**info.__dict__,
                                                                      "available": lambda: (False, "onnxruntime cannot be imported (x)")}))
    monkeypatch.setattr(registry, "preferred", lambda: "onnx")
    with pytest.raises(offload.OffloadError) as e:
        offload.resolve("onnx", check_runs=True)
    assert str(e.value) == "onnxruntime cannot be imported (x); use --offload off (stock MLX) here"


@pytest.mark.skipif(sys.platform == "darwin", reason="checks the refusal off macOS")
def test_coreml_is_refused_off_macos_with_the_reason():
    with pytest.raises(offload.OffloadError, match="Core ML runs only on macOS.*use --offload onnx \\(or auto\\)"):
        offload.resolve("coreml", check_runs=True)


def test_only_backends_that_release_drop_mlx_experts():
    """A plan of onnx-coreml (same program format as onnx) keeps MLX's experts: releasing is the descriptor's."""
    lp = LayerPlan(0, "x", 4, 1, 8, 8, [GroupPlan([0, 1, 2, 3], [8])], [], min_tokens=1)
    eager = CostModel("onnx", 1e-9, 1e15, 1e15, 0.0, 1.0, 1.0, source="test: programs win")
    assert residency.releases(Plan("onnx", PlanLimits.for_backend("onnx"), [lp]), eager) == {0: [0, 1, 2, 3]}
    for name in ("onnx-coreml", "coreml", "mlx"):
        assert residency.releases(Plan(name, PlanLimits.for_backend(name), [lp]), eager) == {}
    assert [registry.releases_mlx_experts(m) for m in ("onnx", "onnx-coreml", "off", "auto")] == [True, False, False, False]


def test_bundle_folder_names_map_to_their_backend():
    assert registry.of_folder("npumoe-onnx-coreml") == "onnx-coreml"
    assert registry.of_folder("abc123-coreml") == "coreml"
    assert registry.of_folder("npumoe-onnx") == "onnx"
    assert registry.of_folder("my-bundle") == registry.DEFAULT == "onnx"


def test_program_capabilities_are_declared_on_the_base_class():
    p = Program()
    assert (p.concurrent, p.dynamic) == (False, False)
    p.tiers = (8,)
    p.add_tiers([1, 2])  # not dynamic: keeps its tiers
    assert p.tiers == (8,)
    from npumoe_mlx.backends.onnx import OnnxProgram

    assert OnnxProgram.concurrent is True


def test_chip_costs_only_for_backends_the_chip_table_predicts():
    assert registry.chip_cost("m2-max", "coreml", 2048, 768).source.startswith("chip profile")
    for name in ("onnx", "onnx-coreml"):
        with pytest.raises(ValueError, match=f"use --backend coreml, not '{name}'"):
            registry.chip_cost("m2-max", name)


def test_one_cost_chooser_file_then_chip_then_tune_then_default(tmp_path):
    f = tmp_path / "c.json"
    registry.default_cost("mlx").save(str(f))
    assert choose_cost("onnx", str(f), "m2-max", tune=lambda: 1 / 0).backend == "mlx"  # the file wins
    assert choose_cost("coreml", None, "m2-max", tune=lambda: 1 / 0).source.startswith("chip profile m2-max")
    tuned = CostModel("onnx", 1, 1, 1, 1, 1, 1, source="tuned")
    assert choose_cost("onnx", tune=lambda: tuned) is tuned
    assert choose_cost("onnx").to_dict() == registry.default_cost("onnx").to_dict()
    with pytest.raises(ValueError, match="--cost .*not JSON"):
        (tmp_path / "bad.json").write_text("{")
        choose_cost("onnx", str(tmp_path / "bad.json"))


CHIP = registry.chip_cost("m2-max", "coreml", 2048, 1024)


@pytest.mark.parametrize("cost", [registry.default_cost("onnx"), registry.default_cost("coreml"), CHIP],
                         ids=["onnx", "coreml", "chip"])
def test_cost_arrays_equal_the_scalar_results_elementwise(cost):
    """Each per-side function on an array equals itself on each element, zero pairs included (0 s, 0 J)."""
    D, H = 256, 512
    pairs = np.array([0, 1, 3, 0, 64, 1000])
    for fn in (cost.mlx_s, cost.mlx_j, cost.mlx_dense_s, cost.mlx_work_s, cost.mlx_work_j):
        got = fn(pairs, D, H)
        assert got.shape == pairs.shape
        assert got.tolist() == [fn(int(p), D, H) for p in pairs]
    assert cost.mlx_s(0, D, H) == 0.0 and cost.mlx_j(0, D, H) == 0.0 and cost.mlx_dense_s(0, D, H) == 0.0
    assert type(cost.mlx_s(3, D, H)) is float  # scalars stay JSON-ready
    C = np.array([0, 8, 32, 256])
    assert cost.program_j(4, C, D, H).tolist() == [cost.program_j(4, int(c), D, H) for c in C]
    assert cost.programs_s(4, 1, C, D, H).tolist() == [cost.program_s(4, int(c), D, H) for c in C]
    # a whole call, both sides at once: zero on a side adds none of its fixed costs
    tp, tm = np.array([0.0, 0.0, 1e-3, 2e-3]), np.array([0.0, 5e-4, 0.0, 1e-3])
    got = cost.call_s(tp, tm)
    for i in range(4):
        prog = cost.sync_s + tp[i] if tp[i] > 0 else 0.0
        mlx = cost.mlx_fixed_s + tm[i] if tm[i] > 0 else 0.0
        assert got[i] == cost.call_s(float(tp[i]), float(tm[i])) == float(cost.makespan(prog, mlx))
    assert got[0] == 0.0
    jp, jm = np.array([0.0, 0.0, 2.0, 1.0]), np.array([0.0, 3.0, 0.0, 1.0])
    assert cost.call_j(jp, jm, tm).tolist() == [jp[i] + jm[i] + (cost.mlx_j_per_call if tm[i] > 0 else 0.0)
                                                 for i in range(4)]


def test_host_bytes_per_element_prices_the_copies():
    """The per-row copy term is D * host_bytes_per_element / copy_bps: a backend that moves half the bytes pays half."""
    a = registry.default_cost("onnx")
    half = a.host_bytes_per_element / 2
    b = CostModel.from_dict({**a.to_dict(), "host_bytes_per_element": half})
    D, H = 512, 64
    assert a.row_s(D, H) - b.row_s(D, H) == pytest.approx(D * half / a.copy_bps)
    assert a.program_s(2, 16, D, H) - b.program_s(2, 16, D, H) == pytest.approx(2 * 16 * D * half / a.copy_bps)
    old = CostModel.from_dict({k: v for k, v in a.to_dict().items() if k != "host_bytes_per_element"})
    assert old.host_bytes_per_element == 8.0  # a file saved before the field: priced as it was planned


def test_a_descriptors_host_bytes_reach_every_cost_model_of_it(monkeypatch):
    """Default, --chip and measured cost models of a backend price copies with its descriptor's bytes."""
    from dataclasses import replace

    from npumoe_mlx.build import tune

    monkeypatch.setitem(registry.REGISTRY, "coreml", replace(registry.REGISTRY["coreml"], host_bytes_per_element=2.0))
    assert registry.default_cost("coreml").host_bytes_per_element == 2.0
    assert registry.chip_cost("m2-max", "coreml", 64, 64).host_bytes_per_element == 2.0
    here = dispatch.finish_on_host()  # onnx's own, counted: 20 per row element with MLX on a GPU; on the CPU 12 + 16 per pair
    assert registry.default_cost("onnx").host_bytes_per_element == (12.0 if here else 20.0)
    assert registry.default_cost("onnx").host_bytes_per_pair == (16.0 if here else 0.0)
    assert registry.chip_cost("m2-max", "coreml", 64, 64).host_bytes_per_pair == 0.0  # a Mac: MLX takes rows on its GPU
    raw = {"backend": "coreml", "D": 8, "H": 8, "copy_bytes": 1e6, "copy_s": 1e-3, "dispatch_s": 1e-4,
           "programs": [(1, 8, 2e-4), (2, 8, 3e-4), (1, 16, 3e-4)], "mlx_fixed_s": 1e-4,
           "mlx": [(8, 2e-4), (16, 3e-4)], "mlx_dense": [(8, 2e-4), (16, 3e-4)], "sync_s": 1e-5}
    assert tune.fit(raw).host_bytes_per_element == 2.0


def test_weight_formats_and_builder_are_read_from_the_descriptor():
    """--weight-format and the build's package check follow BackendInfo, not a backend's name: onnx-coreml
    shares onnx's program format (no weight formats) though its unit is the ANE."""
    from ane_kernels.formats import DEFAULT_FORMAT

    from npumoe_mlx.build.build import check_weight_format

    assert check_weight_format("coreml", None) == DEFAULT_FORMAT
    for name in ("onnx", "onnx-coreml"):
        assert check_weight_format(name, None) is None
        with pytest.raises(ValueError, match=f"the {name} backend keeps the model's own weights"):
            check_weight_format(name, DEFAULT_FORMAT)
    assert registry.get("coreml").builder == ("coremltools", "npumoe-mlx[coreml]")
    assert registry.get("onnx-coreml").builder == registry.get("onnx").builder == ("onnx", "onnx")
    assert registry.get("mlx").builder is None and not registry.get("mlx").weight_formats
