"""`npumoe bench layer|e2e`: the benchmarks (performance targets live in benchmarks/)."""

import importlib
import sys

KINDS = {"layer": "npumoe_mlx.tools.bench_layer", "e2e": "npumoe_mlx.tools.bench_e2e"}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in KINDS:
        print(f"usage: npumoe bench {{{','.join(KINDS)}}} [options]  (pass --help after the kind)", file=sys.stderr)
        return 2
    return importlib.import_module(KINDS[argv[0]]).main(argv[1:])
