"""Command-line values checked up front, each with an error naming the flag, the value and the rule."""

import json

from ane_kernels.formats import DEFAULT_FORMAT

from ..backends import registry
from ..planning.cost import CostModel
from ..planning.plan import PlanLimits
from ..runtime.options import DENSE_HELP


def at_least(flag: str, value, low: int, what: str = "") -> None:
    """ValueError unless ``value`` is None or an integer >= ``low``."""
    if value is not None and (type(value) is not int or value < low):
        more = f" ({what})" if what else ""
        raise ValueError(f"{flag} must be an integer >= {low}{more}, got {value}")


def load_cost(path: str):
    """A CostModel from ``path``, or a ValueError that names the file and what is wrong with it."""
    try:
        cost = CostModel.load(path)
    except OSError as e:
        raise ValueError(f"--cost {path}: cannot read it ({e.strerror or e})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"--cost {path}: not JSON ({e}); give a cost model written by `npumoe tune --out FILE`") from None
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(
            f"--cost {path}: not a cost model ({type(e).__name__}: {e}); give one written by `npumoe tune --out FILE`"
        ) from None
    return cost


def choose_cost(backend: str, path=None, chip=None, tune=None, D: int = 0, H: int = 0, bits: int = 16,
                weight_format=DEFAULT_FORMAT) -> CostModel:
    """The cost model to plan with (build, plan, replay): ``--cost`` FILE, else ``--chip``'s
    prediction for experts of D x H at ``bits``, else ``tune()`` (measured here), else the
    backend's parametric defaults."""
    if path:
        return load_cost(path)
    if chip:
        return registry.chip_cost(chip, backend, D, H, bits, weight_format)
    if tune is not None:
        return tune()
    return registry.default_cost(backend)


def limits_from_flags(backend: str, max_tiers=None, max_group=None, max_programs=None, max_capacity=None):
    """PlanLimits for ``backend`` with the build flags applied, each checked."""
    at_least("--max-tiers", max_tiers, 1, "tiers per group")
    at_least("--max-group", max_group, 1, "experts per program")
    at_least("--max-programs", max_programs, 1, "resident programs")
    limits = PlanLimits.for_backend(backend, max_tiers=max_tiers, max_group=max_group, max_programs=max_programs)
    if max_capacity is not None:
        smallest = min(limits.capacities)
        at_least("--max-capacity", max_capacity, smallest, f"the smallest tier {backend} programs have")
        limits.capacities = [c for c in limits.capacities if c <= max_capacity]
    return limits




def add_dense_flag(parser):
    """``--dense-programs`` (dense.py), shared by generate, server, compare and bench e2e."""
    parser.add_argument("--dense-programs", action="store_true", help=DENSE_HELP)
    return parser
