"""`npumoe <subcommand>`: each subcommand is a module with ``main(argv) -> int``."""

import importlib
import sys

from ..hints import one_line
from ..interrupt import caused_by, exit_code, keep_ctrl_c
from ..log import console

SUBCOMMANDS = {
    "generate": ("npumoe_mlx.cli.generate", "generate text (mlx_lm.generate flags plus --offload)"),
    "chat": ("npumoe_mlx.cli.chat", "chat in the terminal (mlx_lm.chat flags plus --offload)"),
    "server": ("npumoe_mlx.cli.server", "OpenAI-compatible server (mlx_lm.server flags plus --offload)"),
    "doctor": ("npumoe_mlx.cli.doctor", "what runs here, and whether a model and its bundle fit and are current"),
    "info": ("npumoe_mlx.cli.info", "list a model's MoE expert blocks"),
    "tiny-model": ("npumoe_mlx.tools.tiny", "write a random tiny MoE checkpoint (offline)"),
    "calibrate": ("npumoe_mlx.build.calibrate", "count tokens per layer x expert on a corpus -> profile"),
    "tune": ("npumoe_mlx.build.tune", "measure this machine's costs -> cost model"),
    "plan": ("npumoe_mlx.cli.plan_cli", "print the offload plan (groups, tiers, residency) of a model"),
    "replay": ("npumoe_mlx.cli.replay", "plan from routing traces and replay them through the executor's decisions"),
    "build": ("npumoe_mlx.build.build", "calibrate -> tune -> plan -> compile into a bundle"),
    "convert": ("npumoe_mlx.cli.convert", "Hugging Face or MLX model -> MLX weights + offload bundle"),
    "build-programs": ("npumoe_mlx.build.programs", "build one expert group's static-tier programs"),
    "compare": ("npumoe_mlx.tools.compare", "offload vs stock MLX: speed, CPU, memory, energy, agreement"),
    "bench": ("npumoe_mlx.tools.bench", "benchmarks: `bench layer` (one MoE layer), `bench e2e` (whole model)"),
    "chips": ("npumoe_mlx.planning.chips", "Apple chip profiles the planner predicts with (each number with its source)"),
    "demo": ("npumoe_mlx.tools.demo", "build a demo MoE model and bundle, generate, compare"),
    "selftest": ("npumoe_mlx.cli.selftest", "check the Core ML path on this machine in minutes (run it first on a Mac)"),
}


def _usage() -> str:
    lines = ["usage: npumoe <subcommand> [options]", "", "subcommands:"]
    lines += [f"  {name:<16}{help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    lines += ["", "Pass --help to a subcommand for its options, e.g. npumoe generate --help"]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        from .. import __version__

        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"npumoe: unknown subcommand {name!r}; choose from {', '.join(SUBCOMMANDS)}", file=sys.stderr)
        return 2
    debug = "--debug" in rest
    keep_ctrl_c()
    console()  # npumoe's log records as `[npumoe] ...` lines (library users get plain logging)
    rest = [a for a in rest if a != "--debug"]
    try:
        module = importlib.import_module(SUBCOMMANDS[name][0])  # (seconds: mlx, mlx_lm; Ctrl-C may come here)
        return module.main(rest) or 0
    except KeyboardInterrupt:
        return exit_code(f"npumoe {name}")
    except Exception as e:  # one line for the user; --debug shows the traceback
        if caused_by(e):  # e.g. ImportError("initialization failed") from Ctrl-C in an extension's import
            return exit_code(f"npumoe {name}")
        if debug:
            raise
        msg = one_line(e)
        print(f"npumoe {name}: error: {msg} (rerun with --debug for details)", file=sys.stderr)
        return 1
