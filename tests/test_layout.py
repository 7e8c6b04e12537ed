"""The folder layout's floors (DESIGN.md, "A layout that shows the architecture").

Arrows run down the floors: a module imports only modules on its own floor or below.

    5  cli/, tools/, npumoe_mlx/__init__.py (the public API)
    4  runtime/, build/, backends/      (side by side: they may import each other)
    3  bundle/
    2  planning/                        (never imports mlx or mlx_lm, not even through what it imports)
    1  npumoe_mlx/*.py leaves (_version, ...)
    0  ane_kernels/                     (never imports npumoe_mlx)

Function-local imports count (benchmarks/structure.py's ast graph; nothing is imported). The
package's own ``__init__`` (which imports mlx_lm for the public API) is not counted as an import of
the modules below it. Cycles are test_imports.py's job.

KNOWN_* list the edges that broke a rule on the day of the move (relayout.py wrote them): each must
go, and an entry that no longer happens fails too, so the lists only shrink.
"""

import ast
from pathlib import Path

from conftest import structure

ROOT = Path(__file__).resolve().parent.parent
PKG = "npumoe_mlx"
FLOORS = {"cli": 5, "tools": 5, "runtime": 4, "build": 4, "backends": 4, "bundle": 3, "planning": 2}
LEAF_FLOOR, TOP_FLOOR, KERNEL_FLOOR = 1, 5, 0
MLX = ("mlx", "mlx_lm")

# Left after the move, each with why (issue 20: the next structure step):
# - the registry (backends/) is the one place a backend is described; the planner and the bundle read
#   its limits and costs. It sits beside the runtime because its device checks import mlx (function-local).
#   Splitting the pure table (planning) from the device probes (backends) removes 3 + 2 entries.
# - plan and residency take ExpertBlock (runtime/experts.py: a plain record of D, H and quantization,
#   found by walking an mlx model); residency also measures a loaded model (release, mlx.utils).
# - runtime/replan.py prices observed calls with cli/replay.py's replay_calls (the executor's decision
#   path on recorded counts): it belongs in planning with its Tally.
KNOWN_LAYER = {
    ('npumoe_mlx.bundle.bundle', 'npumoe_mlx.backends.registry'),
    ('npumoe_mlx.planning.plan', 'npumoe_mlx.backends.registry'),
    ('npumoe_mlx.planning.plan', 'npumoe_mlx.runtime.experts'),
    ('npumoe_mlx.planning.residency', 'npumoe_mlx.backends.registry'),
    ('npumoe_mlx.planning.residency', 'npumoe_mlx.runtime.experts'),
    ('npumoe_mlx.planning.residency', 'npumoe_mlx.runtime.release'),
    ('npumoe_mlx.runtime.replan', 'npumoe_mlx.cli.replay'),
}

KNOWN_MLX = {  # the same edges, seen from "planning never imports mlx"
    ('npumoe_mlx.planning.plan', 'npumoe_mlx.backends.registry'),
    ('npumoe_mlx.planning.plan', 'npumoe_mlx.runtime.experts'),
    ('npumoe_mlx.planning.residency', 'mlx.utils'),
    ('npumoe_mlx.planning.residency', 'npumoe_mlx.backends.registry'),
    ('npumoe_mlx.planning.residency', 'npumoe_mlx.runtime.experts'),
    ('npumoe_mlx.planning.residency', 'npumoe_mlx.runtime.release'),
}


S = structure()
MODS = S.modules()
EDGES, _ = S.graph(MODS)


def floor(name, mods=None):
    """The floor of one dotted module, or None for a module that has no place."""
    mods = MODS if mods is None else mods
    parts = name.split(".")
    if parts[0] == "ane_kernels":
        return KERNEL_FLOOR
    if name == PKG:
        return TOP_FLOOR
    if len(parts) == 2 and mods[name].name != "__init__.py":
        return LEAF_FLOOR
    return FLOORS.get(parts[1])


def unplaced_modules():
    return sorted(m for m in MODS if floor(m) is None)


def layer_violations(mods=None, edges=None):
    """(importer, imported) pairs whose arrow runs up a floor."""
    mods, edges = (MODS, EDGES) if mods is None else (mods, edges)
    fl = {m: floor(m, mods) for m in mods}
    return {(a, b) for a, ts in edges.items() for b in ts
            if a.startswith(PKG) and fl[a] is not None and fl[b] is not None and fl[b] > fl[a]}


def kernel_violations():
    return {(a, b) for a, ts in EDGES.items() for b in ts if a.startswith("ane_kernels") and b.startswith(PKG)}


def _mlx_imports(path):
    """Top-level names of mlx/mlx_lm that one module imports (function-local ones too)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] in MLX}
        elif isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] in MLX:
            out.add(node.module)
    return out


def _reaches_mlx(name, mods, edges, seen=None):
    """One import path from a module to an mlx/mlx_lm import ([] when there is none)."""
    seen = set() if seen is None else seen
    seen.add(name)
    direct = sorted(_mlx_imports(mods[name]))
    if direct:
        return [name, direct[0]]
    for t in sorted(edges.get(name, ())):
        if t not in seen and t != PKG:
            path = _reaches_mlx(t, mods, edges, seen)
            if path:
                return [name] + path
    return []


def mlx_violations(mods=None, edges=None):
    """(planning module, what it imports) for each mlx/mlx_lm import of a planning module and each
    import of a module outside planning that reaches mlx (a planning module reached is judged itself)."""
    mods, edges = (MODS, EDGES) if mods is None else (mods, edges)
    out = set()
    for m in sorted(m for m in mods if floor(m, mods) == FLOORS["planning"]):
        out |= {(m, imp) for imp in _mlx_imports(mods[m])}
        out |= {(m, t) for t in edges[m] if floor(t, mods) != FLOORS["planning"] and _reaches_mlx(t, mods, edges)}
    return out


def mlx_path(edge):
    """'a -> b -> mlx.core' for one violation, for the messages."""
    m, t = edge
    return " -> ".join([m] + (_reaches_mlx(t, MODS, EDGES) if t in MODS else [t]))


def _say(rows):
    return "\n".join("  " + " -> ".join(r) for r in sorted(rows))


def test_every_module_has_a_floor():
    assert unplaced_modules() == [], "put each in a folder (relayout.py's MOVES): " + ", ".join(unplaced_modules())


def test_flat_root_holds_only_the_api_and_leaves():
    """A new npumoe_mlx/x.py is a leaf (floor 1): it may import nothing of ours but leaves and ane_kernels."""
    for name in MODS:
        if name.startswith(PKG + ".") and floor(name) == LEAF_FLOOR:
            assert all(floor(t) <= LEAF_FLOOR for t in EDGES[name]), (name, sorted(EDGES[name]))


def test_ane_kernels_never_imports_npumoe_mlx():
    assert kernel_violations() == set(), _say(kernel_violations())


def test_arrows_run_down():
    found = layer_violations()
    assert found - KNOWN_LAYER == set(), "imports that run up a floor:\n" + _say(found - KNOWN_LAYER)
    assert KNOWN_LAYER - found == set(), "gone (delete from KNOWN_LAYER):\n" + _say(KNOWN_LAYER - found)


def test_planning_never_imports_mlx():
    found = mlx_violations()
    assert found - KNOWN_MLX == set(), "planning reaches mlx:\n" + "\n".join(
        "  " + mlx_path(e) for e in sorted(found - KNOWN_MLX))
    assert KNOWN_MLX - found == set(), "gone (delete from KNOWN_MLX):\n" + _say(KNOWN_MLX - found)


def test_the_checks_catch_a_planted_upward_import(tmp_path):
    """A function-local ``from ..runtime import r`` in planning, r importing mlx: both checks name it."""
    pkg = tmp_path / PKG
    files = {PKG: "__init__.py", f"{PKG}.planning": "planning/__init__.py", f"{PKG}.runtime": "runtime/__init__.py",
             f"{PKG}.planning.p": "planning/p.py", f"{PKG}.planning.q": "planning/q.py", f"{PKG}.runtime.r": "runtime/r.py"}
    text = {"planning/p.py": "def f():\n    from ..runtime import r\n", "planning/q.py": "from . import p\n",
            "runtime/r.py": "import mlx.core as mx\n"}
    mods = {}
    for name, rel in files.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(text.get(rel, ""))
        mods[name] = pkg / rel
    edges, local = S.graph(mods)
    p, r = f"{PKG}.planning.p", f"{PKG}.runtime.r"
    assert local == 1
    assert layer_violations(mods, edges) == {(p, r)}
    assert mlx_violations(mods, edges) == {(p, r)}  # q reaches mlx only through p, which is named


def test_public_api_unchanged_by_the_cli_modules():
    """``npumoe_mlx.generate``/``convert`` stay the public functions after the CLI modules load
    (before the move, importing the CLI module npumoe_mlx.generate rebound the name to the module)."""
    import importlib

    import npumoe_mlx
    import npumoe_mlx.cli.convert  # noqa: F401
    import npumoe_mlx.cli.generate  # noqa: F401

    assert npumoe_mlx.generate is importlib.import_module("mlx_lm.generate").generate
    assert callable(npumoe_mlx.convert) and npumoe_mlx.convert.__module__ == f"{PKG}.cli.convert"
    for name in npumoe_mlx.__all__:  # no public name is shadowed by a submodule of the same name
        assert not isinstance(getattr(npumoe_mlx, name), type(npumoe_mlx)), name
