"""Resident bytes per unit (MLX, programs) and the memory budget a build must fit.

MLX keeps every expert (cold experts and spill run there); the programs of an onnx
bundle hold one more copy of the experts they serve (one session per program since
bundle format 2; onnxruntime prepacks the 4-bit codes and float32 scales, about the
quantized bytes). So a plan costs ``model bytes + offloaded experts' bytes`` resident,
before activations. ``npumoe build`` refuses a plan that exceeds ``--memory-budget``
(default: 80% of this machine's RAM) with a one-line error, before compiling anything.
"""

import os
from typing import Dict, Optional

from mlx.utils import tree_flatten

BUDGET_FRACTION = 0.8  # of physical RAM: room for activations, the OS and other work


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


def plan_resident(plan, model, blocks: Dict[int, object]) -> dict:
    """{"mlx": bytes, "programs": bytes, "total": bytes, "per_layer": {layer: program bytes}}.

    ``blocks``: {layer: ExpertBlock} with ``.module`` (the SwitchGLU) and ``.num_experts``.
    """
    mods = dict(model.named_modules())
    per_layer = {}
    for lp in plan.layers:
        b = blocks[lp.layer]
        per_expert = module_bytes(b.module) / max(b.num_experts, 1)
        n = sum(len(g.experts) for g in lp.groups)
        shared = sum(module_bytes(mods[sp.path]) for sp in lp.shared if sp.path in mods)
        per_layer[lp.layer] = int(n * per_expert) + shared
    mlx = module_bytes(model)
    programs = sum(per_layer.values())
    return {"mlx": mlx, "programs": programs, "total": mlx + programs, "per_layer": per_layer}


def check_budget(resident: dict, budget: Optional[int]) -> None:
    """ValueError (one line) when the plan's resident bytes exceed ``budget``."""
    if budget is not None and resident["total"] > budget:
        raise ValueError(
            f"the plan needs {resident['total'] / 1e9:.2f} GB resident (MLX {resident['mlx'] / 1e9:.2f} GB + "
            f"programs {resident['programs'] / 1e9:.2f} GB), over the memory budget of {budget / 1e9:.2f} GB; "
            f"raise --memory-budget or offload fewer experts (--max-programs)"
        )


def describe(resident: dict) -> str:
    return (f"resident: MLX {resident['mlx'] / 1e9:.2f} GB + programs {resident['programs'] / 1e9:.2f} GB "
            f"= {resident['total'] / 1e9:.2f} GB")
