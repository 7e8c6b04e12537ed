"""The import graph of npumoe_mlx and ane_kernels (function-local imports counted) is acyclic,
and ane_kernels never imports npumoe_mlx (DESIGN.md: programs do not know the scheduler).

The graph comes from benchmarks/structure.py (ast only, nothing imported), loaded by path."""

from pathlib import Path

from conftest import structure

ROOT = Path(__file__).resolve().parent.parent


S = structure()

# Edges allowed to close a cycle for now, each with why (none today: keep the set, and the
# stale-entry test, so a later allowance has to name itself).
KNOWN = set()


def _edges():
    edges, _ = S.graph(S.modules())
    return edges


def test_import_graph_is_acyclic_counting_function_local_imports():
    edges = _edges()
    pruned = {m: {t for t in ts if (m, t) not in KNOWN} for m, ts in edges.items()}
    cycles = S.cycles(pruned)
    detail = ["  " + " <-> ".join(c) + ": " + "; ".join(f"{m} -> {', '.join(sorted(t for t in pruned[m] if t in c))}"
                                                          for m in c) for c in cycles]
    assert not cycles, "import cycles (function-local imports count):\n" + "\n".join(detail)


def test_known_cycle_edges_still_exist():
    """An allowance whose import is gone must be deleted, or it would hide a new cycle."""
    edges = _edges()
    stale = sorted(e for e in KNOWN if e[1] not in edges.get(e[0], set()))
    assert not stale, f"delete these from tests/test_imports.py KNOWN (the import is gone): {stale}"


def test_ane_kernels_never_imports_npumoe_mlx():
    edges = _edges()
    assert any(m.startswith("ane_kernels") for m in edges)
    bad = sorted((m, t) for m, ts in edges.items() if m.startswith("ane_kernels")
                 for t in ts if t.split(".")[0] == "npumoe_mlx")
    assert not bad, f"ane_kernels imports the scheduler: {bad}"


def test_graph_sees_a_cycle_through_a_function_local_import(tmp_path):
    """The checker itself: a cycle closed only inside a function body is found and counted."""
    pkg = tmp_path / "pkga"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text("def f():\n    from .a import g\n    return g\n")
    (pkg / "c.py").write_text("import pkga.b\n")
    edges, local = S.graph(S.modules(tmp_path, ("pkga",)))
    assert local == 1
    assert edges["pkga.c"] == {"pkga.b"}
    assert S.cycles(edges) == [["pkga.a", "pkga.b"]]
