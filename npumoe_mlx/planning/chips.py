"""Apple chip profiles: what the planner predicts ANE and GPU time and energy from.

The numbers need Apple hardware, which this project cannot measure everywhere, so they
are data taken from public measurements (``data/chips.json``), each with its source and,
where a number is derived from others, a note saying how. ``--chip NAME`` on plan /
build / replay predicts for that chip from any machine; ``npumoe chips`` prints the table.

File format (SI units)::

    {"format": 1, "chips": {"m2-max": {"ane_tflops": {"value": 2.5, "source": "url", "note": "..."}, ...}}}
"""

import argparse
import json
import math
import os
import platform
import re
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from ..atomic import write_json

FORMAT = 1
DEFAULT_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "chips.json")

# field -> (unit, what it is); the order is the table's column order
FIELDS = {
    "ane_tflops": ("TFLOP/s", "fp16 FLOP/s the ANE achieves on large expert GEMMs (not peak TOPS)"),
    "ane_bw_gbs": ("GB/s", "DRAM bandwidth the ANE reaches"),
    "ane_dispatch_s": ("s", "fixed cost of one Core ML program call"),
    "ane_power_w": ("W", "ANE power while busy"),
    "gpu_tflops": ("TFLOP/s", "fp16 FLOP/s MLX matmuls achieve on the GPU"),
    "gpu_bw_gbs": ("GB/s", "unified-memory bandwidth the GPU reaches"),
    "gpu_dispatch_s": ("s", "fixed cost of one MoE layer's MLX kernels"),
    "gpu_power_w": ("W", "GPU power under LLM work"),
    "sync_s": ("s", "one host sync (MLX eval -> numpy)"),
    "both_bw_factor": ("x", "useful bandwidth of ANE + GPU together / the faster one alone"),
}
# Optional fields (0 = no public measurement): the CPU, for the paper's Core ML CPU-only and
# ANEMLL (experts on CPU) baselines in `npumoe replay`.
OPTIONAL_FIELDS = {
    "cpu_tflops": ("TFLOP/s", "FLOP/s Core ML's CPU path (Accelerate, AMX) achieves on large GEMMs"),
    "cpu_power_w": ("W", "CPU power while it runs them"),
}
# A field may also carry "single_benchmark": true (its value comes from one small benchmark)
# and "uncertain": "why" (a public source disagrees with it); both show in `npumoe chips`.


@dataclass
class ChipProfile:
    name: str
    ane_tflops: float
    ane_bw_gbs: float
    ane_dispatch_s: float
    ane_power_w: float
    gpu_tflops: float
    gpu_bw_gbs: float
    gpu_dispatch_s: float
    gpu_power_w: float
    sync_s: float
    both_bw_factor: float
    sources: Dict[str, str] = field(default_factory=dict)  # field -> source (url or citation)
    notes: Dict[str, str] = field(default_factory=dict)  # field -> how a derived number was derived
    cpu_tflops: float = 0.0  # 0: no public measurement (OPTIONAL_FIELDS)
    cpu_power_w: float = 0.0
    caveats: Dict[str, str] = field(default_factory=dict)  # field -> "single small benchmark" / why uncertain


def normalize_name(name: str) -> str:
    """'Apple M2 Max', 'M2 Max', 'm2_max', 'M2MAX' -> 'm2-max'."""
    s = str(name).strip().lower()
    s = re.sub(r"^apple\s+", "", s)
    s = re.sub(r"[\s_]+", "-", s)
    s = re.sub(r"^(m\d+)-?(pro|max|ultra)$", r"\1-\2", s)
    return s


def _load_raw(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except OSError as e:
        raise ValueError(f"chip profiles {path}: cannot read ({e.strerror or e})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"chip profiles {path}: not JSON ({e.msg} at line {e.lineno})") from None


def load_chips(path: Optional[str] = None) -> Dict[str, ChipProfile]:
    """Read and check a chips file; every chip needs every field, positive, with a source."""
    path = path or DEFAULT_PATH
    raw = _load_raw(path)
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        got = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
        raise ValueError(f"chip profiles {path}: format must be {FORMAT}, got {got!r}")
    chips = raw.get("chips")
    if not isinstance(chips, dict) or not chips:
        raise ValueError(f"chip profiles {path}: 'chips' must be a non-empty object")
    out = {}
    for name, entry in chips.items():
        where = f"chip profiles {path}: chip {name!r}"
        if normalize_name(name) != name:
            raise ValueError(f"{where}: name must be written {normalize_name(name)!r}")
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: must be an object of fields")
        values, sources, notes, caveats = {}, {}, {}, {}
        for fname in list(FIELDS) + list(OPTIONAL_FIELDS):
            item = entry.get(fname)
            if item is None and fname in OPTIONAL_FIELDS:
                continue
            if not isinstance(item, dict):
                raise ValueError(f"{where}: field {fname!r} is missing")
            value = item.get("value")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ValueError(f"{where}: field {fname!r} value must be a positive number, got {value!r}")
            source = item.get("source")
            if not isinstance(source, str) or not source.strip():
                raise ValueError(f"{where}: field {fname!r} has no source")
            values[fname] = float(value)
            sources[fname] = source.strip()
            if item.get("note"):
                notes[fname] = str(item["note"])
            said = [c for c in ("single small benchmark" if item.get("single_benchmark") else "",
                                f"uncertain: {item['uncertain']}" if item.get("uncertain") else "") if c]
            if said:
                caveats[fname] = "; ".join(said)
        unknown = sorted(set(entry) - set(FIELDS) - set(OPTIONAL_FIELDS))
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {', '.join(unknown)}")
        out[name] = ChipProfile(name=name, sources=sources, notes=notes, caveats=caveats, **values)
    return out


def _known_names() -> List[str]:
    return list(load_chips())


CHIP_NAMES: List[str] = _known_names()


def chip_profile(name: str, path: Optional[str] = None) -> ChipProfile:
    """The profile of ``name`` ('M2 Max', 'm2-max', 'm2_max'); ValueError lists the known names."""
    chips = load_chips(path)
    key = normalize_name(name)
    if key not in chips:
        raise ValueError(f"unknown chip {name!r}; known chips: {', '.join(chips)}")
    return chips[key]


def _sysctl_brand() -> str:
    return subprocess.run(
        ["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True, timeout=5, check=True
    ).stdout.strip()


def detect_chip() -> Optional[str]:
    """This Mac's chip name ('Apple M2 Max' -> 'm2-max'); None off Apple Silicon macOS or if unknown."""
    if sys.platform != "darwin" or platform.machine() != "arm64":
        return None
    try:
        brand = _sysctl_brand()
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.match(r"^\s*Apple\s+(M\d+(?:\s+(?:Pro|Max|Ultra))?)\s*$", brand, re.IGNORECASE)
    return normalize_name(m.group(1)) if m else None


def profile_entry(p: ChipProfile) -> dict:
    """One chip as it is written in a chips file (what ``load_chips`` reads back)."""
    out = {}
    for f in list(FIELDS) + [f for f in OPTIONAL_FIELDS if getattr(p, f)]:
        out[f] = {"value": getattr(p, f), "source": p.sources[f]}
        if f in p.notes:
            out[f]["note"] = p.notes[f]
        c = p.caveats.get(f, "")  # "single small benchmark", then "uncertain: <why>" (which may hold "; ")
        if c.startswith("single small benchmark"):
            out[f]["single_benchmark"] = True
            c = c[len("single small benchmark"):].lstrip("; ")
        if c.startswith("uncertain: "):
            out[f]["uncertain"] = c[len("uncertain: "):]
    return out


def _fmt(v: float) -> str:
    return f"{v:.3g}" if v >= 1e-3 else f"{v * 1e6:.3g}u"


def format_chips(rows) -> str:
    """A markdown table of profiles (seconds below 1 ms shown in microseconds with 'u')."""
    head = ["chip"] + [f"{f} ({FIELDS[f][0]})" for f in FIELDS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in rows:  # "*": from a single small benchmark or uncertain (``caveats``; `--chip` says which)
        lines.append("| " + " | ".join([p.name] + [_fmt(getattr(p, f)) + ("*" if f in p.caveats else "")
                                                    for f in FIELDS]) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="npumoe chips", description="Apple chip profiles the planner predicts with (each number with its source)."
    )
    p.add_argument("--chip", help="Show one chip with the source of each number (e.g. 'M2 Max').")
    p.add_argument("--file", metavar="PATH", help="Read profiles from this file instead of the shipped table.")
    p.add_argument("--json", metavar="PATH", help="Write the profiles (values, sources, notes) as JSON instead of printing them.")
    args = p.parse_args(argv)
    if args.json:
        from ..outputs import check_file

        check_file(args.json, "--json")  # before the work
    chips = load_chips(args.file)
    rows = [chip_profile(args.chip, args.file)] if args.chip else list(chips.values())
    if args.json:  # the file is the output: one line, not the table as well
        write_json(args.json, {"format": FORMAT, "chips": {r.name: profile_entry(r) for r in rows}})
        print(f"wrote {args.json} ({len(rows)} chip profile{'s' if len(rows) != 1 else ''})")
        return 0
    here = detect_chip()
    print(format_chips(rows))
    if args.chip:
        prof = rows[0]
        print()
        for f in [f for f in FIELDS] + [f for f in OPTIONAL_FIELDS if getattr(prof, f)]:
            note = f" ({prof.notes[f]})" if f in prof.notes else ""
            caveat = f" [{prof.caveats[f]}]" if f in prof.caveats else ""
            unit = {**FIELDS, **OPTIONAL_FIELDS}[f][0]
            print(f"- {f} = {getattr(prof, f):g} {unit}: {prof.sources[f]}{note}{caveat}")
    elif any(p.caveats for p in rows):
        print("\n* from a single small benchmark, or uncertain: `npumoe chips --chip NAME` says which and why")
    if here:
        print(f"\nthis machine: {here}")
    return 0


if __name__ == "__main__":
    from ..log import console

    console()  # `[npumoe] ...` lines, as the npumoe command shows them
    sys.exit(main())
