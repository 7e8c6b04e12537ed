"""Structure counts for issue 20's before/after table (ast only, no imports run).

    python benchmarks/structure.py [--json out.json]

Longest functions, widest parameter lists, function-local imports and import cycles
(module graph counting function-local imports) over npumoe_mlx/ and ane_kernels/.
"""

import argparse
import ast
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("npumoe_mlx", "ane_kernels")


def modules(root: Path = ROOT, packages=PACKAGES):
    """{dotted name: path} for every module of our two packages (tests/test_imports.py loads
    this file by path and checks the graph on every run)."""
    out = {}
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _resolve(name, node, mods):
    """Dotted targets of one import node that are our own modules."""
    pkg = name if mods[name].name == "__init__.py" else name.rsplit(".", 1)[0]
    if isinstance(node, ast.Import):
        wanted = [a.name for a in node.names]
    else:
        if node.level:
            base = pkg.split(".")
            base = base[: len(base) - node.level + 1]
            base = ".".join(base + ([node.module] if node.module else []))
        else:
            base = node.module or ""
        # `from pkg import mod` depends on mod; `from mod import name` on mod
        wanted = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
    out = set()
    for t in wanted:
        while t and t not in mods:
            t = t.rsplit(".", 1)[0] if "." in t else ""
        if t and t != name:
            out.add(t)
    return out


def graph(mods):
    """({module: {our modules it imports, at module level or inside a function}}, how many imports
    are function-local)."""
    edges, local = {}, 0
    for name, path in mods.items():
        tree = ast.parse(path.read_text())
        edges[name] = set()
        funcs = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        inner = {id(n) for f in funcs for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                targets = _resolve(name, node, mods)
                if id(node) in inner and targets:
                    local += 1
                edges[name] |= targets
    return edges, local


def cycles(edges):
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def functions(mods):
    rows = []
    for name, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = node.args
                n_params = len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs)
                n_params -= 1 if a.args and a.args[0].arg in ("self", "cls") else 0
                lines = node.end_lineno - node.lineno + 1
                rows.append((f"{name}.{node.name}", lines, n_params))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", help="write the counts here too")
    p.add_argument("--top", type=int, default=8)
    args = p.parse_args(argv)
    mods = modules()
    edges, local = graph(mods)
    rows = functions(mods)
    longest = sorted(rows, key=lambda r: -r[1])[: args.top]
    widest = sorted(rows, key=lambda r: -r[2])[: args.top]
    cyc = cycles(edges)
    counts = {
        "modules": len(mods),
        "function_local_imports": local,
        "import_cycles": cyc,
        "longest": [{"function": f, "lines": n} for f, n, _ in longest],
        "widest": [{"function": f, "params": k} for f, _, k in widest],
    }
    print(f"modules {len(mods)}, function-local imports of our modules {local}, "
          f"import cycles {len(cyc)}")
    for c in cyc:
        print("  cycle:", " <-> ".join(c))
    print("longest functions:")
    for f, n, _ in longest:
        print(f"  {n:4d} lines  {f}")
    print("widest parameter lists:")
    for f, _, k in widest:
        print(f"  {k:4d} params {f}")
    if args.json:
        Path(args.json).write_text(json.dumps(counts, indent=1) + "\n")


if __name__ == "__main__":
    main()
