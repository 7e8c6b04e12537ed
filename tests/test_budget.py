"""Programs per process (issue 21, item 6): the backend's budget holds over the whole model,
counted in what the process compiles (on Core ML every tier function is its own ANE compile)."""

from dataclasses import replace

import pytest

from npumoe_mlx.backends.registry import program_budget
from npumoe_mlx.cli.doctor import backends, format_report
from npumoe_mlx.planning import plan as plan_mod
from npumoe_mlx.planning.cost import CostModel
from npumoe_mlx.planning.plan import PlanLimits, make_plan
from npumoe_mlx.planning.profiles import Profile
from npumoe_mlx.runtime.experts import ExpertBlock

from conftest import zipf_layer

LAYERS, E, K, D, H = 48, 16, 4, 256, 128


def _plan(backend: str, **limits):
    layer = zipf_layer(E, K, calls=6, n=512, skew=0.6)
    prof = Profile(None, "", "", 0, 512, [replace(layer, layer=l) for l in range(LAYERS)])
    blocks = {l: ExpertBlock(l, f"p{l}", "SwitchGLU", E, K, D, H, "swiglu", False, None, "float32") for l in range(LAYERS)}
    eager = CostModel(backend, 1e-9, 1e15, 1e15, 0.0, 1.0, 1.0, first_offload_tokens=1)  # offload all it can
    return make_plan(prof, blocks, eager, PlanLimits.for_backend(backend, **limits))


def _compiled(plan) -> int:
    """Tier functions a Core ML bundle of ``plan`` compiles: one per tier of every program."""
    return sum(len(g.tiers) for lp in plan.layers for g in lp.groups + lp.shared)


@pytest.fixture(scope="module")
def coreml_plan():
    return _plan("coreml")


def test_coreml_plan_never_exceeds_the_budget_over_the_whole_model(coreml_plan):
    budget, per_tier, source = program_budget("coreml")
    assert budget == 120 and per_tier and "unknown for Core ML" in source
    n = _compiled(coreml_plan)
    assert n <= budget, n
    assert n >= 0.9 * budget  # the budget is used, not left empty
    assert coreml_plan.compiled_programs == n
    on = [lp.layer for lp in coreml_plan.layers if lp.groups]
    assert len(on) > 1  # spread over the model, hottest groups of each layer first
    for lp in coreml_plan.layers:  # every expert still runs somewhere
        assert sorted([e for g in lp.groups for e in g.experts] + lp.cold) == list(range(E))


def test_counting_groups_instead_of_tier_functions_would_blow_the_budget(monkeypatch):
    """The wrong accounting (one per group, as before) plans more ANE compiles than the budget."""
    monkeypatch.setattr(plan_mod, "program_units", lambda tiers, backend: 1)
    wrong = _plan("coreml")
    assert _compiled(wrong) > program_budget("coreml")[0]


def test_onnx_counts_programs_and_max_programs_overrides():
    p = _plan("onnx", max_programs=20)
    assert p.num_programs == p.compiled_programs <= 20 < _compiled(p)


def test_doctor_shows_each_backends_budget():
    b = backends()
    assert b["coreml"]["program_budget"] == 120 and b["coreml"]["program_budget_unit"] == "tier function"
    assert b["onnx"]["program_budget"] == program_budget("onnx")[0]
    r = {"npumoe_version": "x", "offload_auto": "onnx", "backends": b, "model": None, "bench": [], "problems": [],
         "machine": {"chip": "c", "machine": "m", "os": "o", "cpus": 2, "memory_bytes": 1, "mlx_device": "cpu",
                     "chip_profile": None}}
    text = format_report(r)
    assert "120 (tier functions)" in text and "unknown for Core ML" in text
