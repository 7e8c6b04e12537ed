"""Resident bytes per unit (MLX, programs) and the memory budget a build must fit.

The programs of an onnx bundle hold a copy of the experts they serve (one session per
program since bundle format 2; onnxruntime prepacks the 4-bit codes and float32 scales,
about the quantized bytes). MLX keeps its own copy of an expert only while some call may
still run it there: a layer whose program experts are served by programs at every call
size (``program_only``: decode too, overflow rerunning the ladder) releases them from
MLX (release.py; onnx, unless ``keep_mlx_experts``). So a plan costs ``model bytes -
released experts' bytes + offloaded experts' bytes`` resident, before activations. ``npumoe build`` refuses a plan that exceeds ``--memory-budget``
(default: 80% of this machine's RAM) with a one-line error, before compiling anything.
"""

import os
from typing import Dict, Optional, Tuple

from mlx.utils import tree_flatten

from ..backends import registry

BUDGET_FRACTION = 0.8  # of physical RAM: room for activations, the OS and other work
# A measured decode step (tune.measure_decode) on programs may cost this much more than on MLX
# and the layer still releases: within the timing noise of that measurement on a busy machine
# (the demo model's two sides came out within +-5% of each other across runs), where the bytes
# released are certain.
DECODE_TOLERANCE = 1.05


def module_bytes(module) -> int:
    """Bytes of a module's parameters (quantized codes, scales and biases as stored)."""
    return sum(int(v.nbytes) for _, v in tree_flatten(module.parameters()))


def physical_memory() -> Optional[int]:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def default_memory_budget() -> Optional[int]:
    ram = physical_memory()
    return None if ram is None else int(BUDGET_FRACTION * ram)


def program_only(lp, cost, dynamic: bool = True) -> Tuple[bool, str]:
    """(True, why) when a layer's program experts can leave MLX: programs then serve them at
    every call size, so a decode call (1 token, ``top_k`` pairs) must cost no more there
    than on MLX. Priced at its worst: each pair in a different group (the largest ones),
    at 1 row (dynamic programs take any row count) or else the group's smallest tier.
    Where ``tune`` timed decode in mlx_lm's loop (``cost.decode_k``: host sync and lost
    pipelining included, which the per-call terms miss), that decides: its per-layer step
    cost on each side, scaled to this layer's ``top_k``, plus what the plan's larger groups
    compute beyond 1-expert calls, on average: decode tok/s is a mean over tokens, and a pair
    lands in a group in proportion to its size (the plan keeps no per-expert loads; hot experts
    sit alone, so real routing pays less). The worst case (every pair in a largest group)
    kept the demo's MLX copy (3.37 vs 2.85 ms; the mean: 2.72-2.94 ms): 1.72x peak RSS, not 1.15x."""
    if not lp.groups:
        return False, "no experts on programs"
    k = max(int(lp.top_k or 1), 1)
    hit = sorted(lp.groups, key=lambda g: -len(g.experts))[:k]
    rows = lambda g: 1 if dynamic else g.tiers[0]  # noqa: E731
    if cost.decode_k > 0 and dynamic:
        prog, mlx = cost.decode_step_s(k, [len(g.experts) for g in lp.groups], lp.D, lp.H)
        if prog <= DECODE_TOLERANCE * mlx:
            return True, (f"a decode step per layer (measured in mlx_lm's loop) on programs {prog * 1e3:.2f} ms, "
                          f"MLX {mlx * 1e3:.2f} ms (programs within 5%)")
        return False, f"a decode step per layer (measured in mlx_lm's loop) on programs {prog * 1e3:.2f} ms > MLX {mlx * 1e3:.2f} ms"
    prog = cost.sync_s + cost.finish_s(k, lp.D) + sum(cost.program_s(len(g.experts), rows(g), lp.D, lp.H) for g in hit)
    mlx = cost.mlx_s(k, lp.D, lp.H)
    how = "decode"
    if prog <= mlx:
        return True, f"{how} on programs {prog * 1e3:.2f} ms <= MLX {mlx * 1e3:.2f} ms"
    return False, f"{how} on programs {prog * 1e3:.2f} ms > MLX {mlx * 1e3:.2f} ms"


def releases(plan, cost, keep_mlx_experts: bool = False, dynamic: bool = True) -> Dict[int, list]:
    """{layer: expert ids} whose MLX copy goes by cost alone: plans of a backend that releases
    (onnx), program-only layers."""
    if keep_mlx_experts or not registry.releases_mlx_experts(plan.backend) or cost is None:
        return {}
    return {lp.layer: sorted(e for g in lp.groups for e in g.experts)
            for lp in plan.layers if program_only(lp, cost, dynamic)[0]}


def plan_resident(plan, model, blocks: Dict[int, object], cost=None, keep_mlx_experts: bool = True,
                  budget: Optional[int] = None, dynamic: bool = True) -> dict:
    """{"mlx", "programs", "total", "released": bytes, "per_layer": {layer: program bytes},
    "units": {layer: {"mlx", "programs", "mlx_copy": why}}, "release": {layer: expert ids}}.

    ``blocks``: {layer: ExpertBlock} with ``.module`` (the SwitchGLU) and ``.num_experts``.
    With a ``cost`` model and ``keep_mlx_experts=False``, an onnx plan releases MLX's copy
    of the program experts of program-only layers (``program_only``), and, while the total
    is over ``budget``, of the other offloaded layers too, the most bytes first (their
    decode then runs on programs even where MLX would be faster: memory first).
    """
    mods = {s.path: s.module for b in blocks.values() for s in b.shared}  # shared experts' MLPs (no model walk)
    gone = releases(plan, cost, keep_mlx_experts, dynamic)
    per_layer, per_expert = {}, {}
    for lp in plan.layers:
        b = blocks[lp.layer]
        per_expert[lp.layer] = module_bytes(b.module) / max(b.num_experts, 1)
        n = sum(len(g.experts) for g in lp.groups)
        shared = sum(module_bytes(mods[sp.path]) for sp in lp.shared if sp.path in mods)
        per_layer[lp.layer] = int(n * per_expert[lp.layer]) + shared
    total = module_bytes(model) + sum(per_layer.values())
    need = lambda: total - sum(int(len(ids) * per_expert[l]) for l, ids in gone.items()) - budget
    forced = set()
    if budget is not None and cost is not None and not keep_mlx_experts and registry.releases_mlx_experts(plan.backend):
        rest = sorted((lp for lp in plan.layers if lp.groups and lp.layer not in gone),
                      key=lambda lp: (-sum(len(g.experts) for g in lp.groups) * per_expert[lp.layer], lp.layer))
        for lp in rest:
            if need() <= 0:
                break
            gone[lp.layer] = sorted(e for g in lp.groups for e in g.experts)
            forced.add(lp.layer)
    units, released = {}, 0
    for lp in plan.layers:
        block = module_bytes(blocks[lp.layer].module)
        out = int(len(gone.get(lp.layer, ())) * per_expert[lp.layer])
        released += out
        if keep_mlx_experts:
            why = "kept (--keep-mlx-experts)"
        elif not registry.releases_mlx_experts(plan.backend) or cost is None:
            why = f"kept (only {', '.join(n for n in registry.names() if registry.releases_mlx_experts(n))} bundles release)"
        elif lp.layer in forced:
            why = f"released to fit the memory budget ({program_only(lp, cost, dynamic)[1]})"
        else:
            why = ("released: " if lp.layer in gone else "kept: ") + program_only(lp, cost, dynamic)[1]
        units[lp.layer] = {"mlx": block - out, "programs": int(sum(len(g.experts) for g in lp.groups) * per_expert[lp.layer]),
                           "mlx_copy": why}
    mlx = module_bytes(model) - released
    programs = sum(per_layer.values())
    return {"mlx": mlx, "programs": programs, "total": mlx + programs, "released": released,
            "per_layer": per_layer, "units": units, "release": gone}


def model_resident(model) -> dict:
    """What a loaded model holds now, per unit: {"mlx", "released", "programs" (0: not
    known from the model alone), "units": {layer: {"mlx", "released", "on_programs"}}}."""
    from ..runtime import release
    from ..runtime.experts import installed_blocks

    units, released = {}, 0
    for m in installed_blocks(model):
        rec = release.record_of(m)
        gone = rec.nbytes if rec is not None else 0
        plan = getattr(m.executor, "plan", None)
        layer = plan.layer if plan is not None else len(units)
        n = sum(len(g.experts) for g in plan.groups) if plan is not None else 0
        per_expert = module_bytes(m) / max(m["gate_proj"]["weight"].shape[0], 1)
        units[layer] = {"mlx": module_bytes(m) - gone, "released": gone, "on_programs": int(n * per_expert)}
        released += gone
    return {"mlx": module_bytes(model) - released, "released": released, "units": units}


def check_budget(resident: dict, budget: Optional[int]) -> None:
    """ValueError (one line) when the plan's resident bytes exceed ``budget``."""
    if budget is not None and resident["total"] > budget:
        raise ValueError(
            f"the plan needs {size(resident['total'])} resident (MLX {size(resident['mlx'])} + "
            f"programs {size(resident['programs'])}), over the memory budget of {size(budget)}; "
            f"raise --memory-budget or offload fewer experts (--max-programs)"
        )


def size(n: float) -> str:
    """Bytes as GB, or MB below 0.1 GB."""
    return f"{n / 1e9:.2f} GB" if abs(n) >= 1e8 else f"{n / 1e6:.2f} MB"


def describe(resident: dict) -> str:
    gone = resident.get("released", 0)
    return (f"resident: MLX {size(resident['mlx'])} + programs {size(resident['programs'])} "
            f"= {size(resident['total'])}"
            + (f" (MLX releases {size(gone)} of program-only experts; "
               f"{size(resident['total'] + gone)} with --keep-mlx-experts)" if gone else ""))


def describe_units(res: dict) -> str:
    """One line of ``model_resident`` (with "programs" filled in)."""
    return (f"resident: MLX {size(res['mlx'])}, programs {size(res.get('programs', 0))}"
            + (f", {size(res['released'])} of program-only experts released from MLX" if res.get("released") else ""))
