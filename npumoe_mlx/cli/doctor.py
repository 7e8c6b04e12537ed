"""`npumoe doctor`: what can run here, and whether a model and its bundle fit and are current.

Reports the platform (chip, OS, memory); which backends can run programs here and
why not; for a model: its expert blocks, its size in memory, the bundle of each
backend (present? current: format, version, fingerprint?), what the plan puts
where, and whether weights + programs fit this machine's memory; then a short
micro-benchmark of each unit that can run, next to what the cost model in use
predicts. Every problem comes with the command that fixes it.
"""

import argparse
import os
import platform
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import List, Optional

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm import utils as mlx_utils

from .._version import __version__
from ..atomic import write_json
from ..backends import registry
from ..backends.registry import package_version as _version
from ..build.tune import _module, median_s
from ..bundle import bundle as bundles
from ..bundle.checks import explain_load_errors, resolve_model
from ..hints import build_cmd, one_line
from ..outputs import check_file
from ..planning.chips import chip_profile, detect_chip
from ..planning.cost import CostModel, flops_per_row
from ..runtime.experts import find_expert_blocks, stock_experts
from ..runtime.offload import resolve

MEMORY_HEADROOM = 0.8  # without a GPU working-set limit: weights + programs may take this share of RAM
BENCH_G, BENCH_C = 4, 64  # one program call of the benchmark: 4 experts x 64 rows
BENCH_DIMS = (1024, 512)  # D, H without a model


def _chip() -> str:
    if sys.platform == "darwin":
        try:
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True,
                                  text=True, timeout=5).stdout.strip() or platform.machine()
        except (OSError, subprocess.SubprocessError):
            return platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _os_version() -> str:
    if sys.platform == "darwin":
        return f"macOS {platform.mac_ver()[0]}"
    try:
        name = platform.freedesktop_os_release().get("PRETTY_NAME", "")
    except (OSError, AttributeError):
        name = ""
    return f"{platform.system()} {platform.release()}" + (f" ({name})" if name else "")


def memory_bytes() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 0


def _chip_profile() -> Optional[str]:
    """The chips.json profile of this Mac's chip (what the planner's Apple numbers come from)."""
    name = detect_chip()
    if name is None:
        return None
    try:
        return chip_profile(name).name
    except ValueError:
        return None


def machine() -> dict:
    return {
        "chip_profile": _chip_profile(),
        "system": platform.system(),
        "machine": platform.machine(),
        "chip": _chip(),
        "os": _os_version(),
        "cpus": os.cpu_count(),
        "memory_bytes": memory_bytes(),
        "mlx_device": str(mx.default_device()),
        "python": platform.python_version(),
        "versions": {"npumoe": __version__, "mlx": _version("mlx"), "mlx-lm": _version("mlx-lm"),
                     "onnxruntime": _version("onnxruntime"), "coremltools": _version("coremltools")},
    }


def backends() -> dict:
    """Per backend (the registry's): can it run programs here, and if not, why not."""
    out = {}
    for name, info in registry.REGISTRY.items():
        ok, why = info.available()
        out[name] = {"can_run": ok, "why_not": why or None, "unit": info.unit, "format": info.program_format,
                     "version": _version(info.package) if info.package else None, **info.details()}
    for name, b in out.items():  # compiled programs a process may hold: what the planner keeps plans under
        b["program_budget"], per_tier, b["program_budget_source"] = registry.program_budget(name)
        b["program_budget_unit"] = "tier function" if per_tier else "program"
    return out


def _fix_of(message: str) -> Optional[str]:
    m = re.search(r"`(npumoe [^`]+)`", message)
    return m.group(1) if m else None


def _bundle_info(local: Path, name: str, backend: str, problems: list, preferred: bool) -> dict:
    path = bundles.locate_bundle(local, backend)  # the one loads use, or where a build would put it
    info = {"backend": backend, "path": str(path), "exists": (path / "manifest.json").exists()}
    if not info["exists"]:
        if preferred:
            problems.append({"problem": f"no {backend} bundle for this model: its experts run on stock MLX",
                             "fix": build_cmd(name, backend)})
        return info
    try:
        b = bundles.read(path, local, name, verify=True)  # every byte: a load samples, the first call checks the rest
    except bundles.BundleError as e:
        info.update(current=False, problem=str(e))
        problems.append({"problem": f"{backend} bundle is not usable: {e}",
                         "fix": _fix_of(str(e)) or build_cmd(name, backend, force=True)})
        return info
    man = b.manifest
    info.update(
        current=True, format=man.format, npumoe_version=man.npumoe_version,
        fingerprint=man.model_fingerprint, created=man.created,
        programs=len(man.programs), program_bytes=man.total_bytes(),
        # program memory once every tier is open: one copy of a program's files (one onnxruntime session
        # serves every tier on the CPU/CUDA providers; a Core ML package shares weights between its functions)
        resident_bytes=man.total_bytes(), cost=b.cost.to_dict(), plan=_plan_info(b.plan),
    )
    info["_bundle"] = b
    return info


def _plan_info(plan) -> dict:
    layers = []
    for lp in plan.layers:
        on_programs = sum(len(g.experts) for g in lp.groups)
        layers.append({
            "layer": lp.layer, "experts": lp.num_experts, "on_programs": on_programs, "on_mlx": len(lp.cold),
            "groups": [len(g.experts) for g in lp.groups], "tiers": sorted({t for g in lp.groups for t in g.tiers}),
            "min_tokens": lp.min_tokens if lp.groups else None,
            "shared_on_programs": len(lp.shared),
        })
    return {"backend": plan.backend, "programs": plan.num_programs, "max_programs": plan.limits.max_programs,
            "compiled_programs": plan.compiled_programs,
            "layers": layers}


def model_report(name: str, backend: str, problems: list, trust_remote_code: bool = False) -> dict:
    local = resolve_model(name)
    with explain_load_errors(name):
        model, _, config = mlx_utils.load(str(local), lazy=True, return_config=True,
                                          trust_remote_code=trust_remote_code)
    blocks = find_expert_blocks(model, config)
    model_bytes = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    rows = []
    for b in blocks:
        nbytes = sum(v.nbytes for _, v in tree_flatten(b.module.parameters()))
        rows.append({"layer": b.layer, "path": b.path, "experts": b.num_experts, "top_k": b.top_k, "D": b.dims,
                     "H": b.hidden, "quant": b.quant, "dtype": b.dtype, "bytes": nbytes,
                     "supported": b.supported, "reason": b.reason or None})
    supported = [b for b in blocks if b.supported]
    rep = {"path": name, "local": str(local), "model_type": config.get("model_type"), "bytes": model_bytes,
           "expert_bytes": sum(r["bytes"] for r in rows), "blocks": rows, "bundles": {}}
    if not supported:
        problems.append({"problem": "no offloadable MoE expert blocks: this model runs on stock MLX "
                                    + (f"({blocks[0].reason})" if blocks else "(not a MoE model)"),
                         "fix": None})
        return rep
    for be in registry.names(bundles=True):
        info = _bundle_info(local, name, be, problems, preferred=be == backend)
        if info["exists"] or be == backend:
            rep["bundles"][be] = info
    b0 = supported[0]
    rep["bench_dims"] = {"D": b0.dims, "H": b0.hidden, "quant": b0.quant}
    mem = memory_bytes()
    # On a Mac the GPU may wire at most the recommended working set; elsewhere a share of RAM.
    budget = int(mx.device_info().get("max_recommended_working_set_size") or MEMORY_HEADROOM * mem)
    used = rep["bundles"].get(backend, {})
    prog = used.get("resident_bytes", 0)
    fits = mem == 0 or model_bytes + prog <= budget
    rep["memory"] = {"model_bytes": model_bytes, "program_bytes": prog, "total_bytes": model_bytes + prog,
                     "machine_bytes": mem, "budget_bytes": budget, "fits": fits}
    if not fits:
        problems.append({
            "problem": f"model ({_gb(model_bytes)}) + {backend} programs ({_gb(prog)}) exceed "
                       f"the {_gb(budget)} this machine ({_gb(mem)}) can hold for them",
            "fix": build_cmd(name, backend, force=True,
                             extra=f"--max-programs {max(1, used.get('plan', {}).get('programs', 2) // 2)}"),
        })
    plan = used.get("plan")
    if plan and plan.get("compiled_programs", plan["programs"]) > plan["max_programs"]:
        problems.append({"problem": f"plan has {plan.get('compiled_programs', plan['programs'])} compiled programs, "
                                    f"over its budget of {plan['max_programs']}",
                         "fix": build_cmd(name, backend, force=True)})
    return rep


def _bench_program(backend: str, D: int, H: int, quant) -> float:
    """Median seconds of one (G=4, C=64) program call on ``backend``, built in memory."""
    from ..backends import load_backend
    from ..build.programs import spec_from_switch_glu

    spec = spec_from_switch_glu(_module(D, H, BENCH_G, quant), layer=0, expert_ids=range(BENCH_G), tiers=[BENCH_C])
    x = np.random.default_rng(0).standard_normal((BENCH_G, BENCH_C, D)).astype(np.float32)
    program = load_backend(backend).load(spec)  # Core ML: built into its cache, then compiled
    return median_s(lambda: program.run(x, BENCH_C), 5)


def _bench_mlx(D: int, H: int, quant) -> float:
    """Median seconds of stock MLX on G*C routed pairs over 8 experts."""
    m = _module(D, H, 8, quant)
    n = BENCH_G * BENCH_C
    x = mx.random.normal((n, D))
    e = mx.random.randint(0, 8, (n, 1)).astype(mx.uint32)
    mx.eval(x, e)
    return median_s(lambda: mx.eval(stock_experts(m, x, e)), 3)


def bench(units: List[str], costs: dict, D: int, H: int, quant=None) -> List[dict]:
    """Measured vs predicted seconds for one call per unit. costs: unit -> CostModel in use."""
    out = []
    flops = BENCH_G * BENCH_C * flops_per_row(D, H)
    for unit in units:
        cost: CostModel = costs[unit]
        try:
            if unit == "mlx":
                measured = _bench_mlx(D, H, quant)
                predicted = cost.mlx_s(BENCH_G * BENCH_C, D, H)
                what = f"stock MLX experts, {BENCH_G * BENCH_C} pairs over 8 experts"
            else:
                measured = _bench_program(unit, D, H, quant)
                predicted = cost.program_s(BENCH_G, BENCH_C, D, H)
                what = f"one program call, G={BENCH_G} experts x C={BENCH_C} rows"
        except Exception as e:  # a unit that fails to run is a finding, not a crash
            out.append({"unit": unit, "error": one_line(e, typed=True)})
            continue
        out.append({"unit": unit, "what": what, "D": D, "H": H, "measured_s": measured, "predicted_s": predicted,
                    "measured_gflops": flops / measured / 1e9, "ratio": measured / max(predicted, 1e-12),
                    "cost_source": cost.source})
    return out


def run(model: Optional[str] = None, backend: Optional[str] = None, run_bench: bool = True,
        trust_remote_code: bool = False) -> dict:
    backend = backend or resolve("auto")
    problems: List[dict] = []
    report = {"npumoe_version": __version__, "machine": machine(), "backends": backends(),
              "offload_auto": resolve("auto"), "backend": backend, "model": None, "bench": [], "problems": problems}
    runs = {n for n, b in report["backends"].items() if b["can_run"]}
    fallback = next((n for n in registry.names(bundles=True) if n in runs and registry.get(n).preferred_on()), "off")
    for name, b in report["backends"].items():  # a backend this machine prefers that cannot run
        info = registry.get(name)
        if info.preferred_on() and not b["can_run"]:
            fix = (f"pip install {info.package}" if info.package and _version(info.package) is None
                   else f"use --offload {fallback}")
            problems.append({"problem": f"{name} cannot run: {b['why_not']}", "fix": fix})
    if backend in report["backends"] and not report["backends"][backend]["can_run"]:
        problems.append({"problem": f"backend {backend}: {report['backends'][backend]['why_not']}",
                         "fix": f"use --offload {fallback} here"})
    D, H = BENCH_DIMS
    quant = None
    costs = {u: registry.default_cost(u) for u in registry.names()}
    if model is not None:
        report["model"] = rep = model_report(model, backend, problems, trust_remote_code)
        if "bench_dims" in rep:
            D, H, quant = rep["bench_dims"]["D"], rep["bench_dims"]["H"], rep["bench_dims"]["quant"]
        for be, info in rep["bundles"].items():
            b = info.pop("_bundle", None)
            if b is not None:  # the bundle's own cost model is the one in use
                costs[be] = b.cost
                if be == backend:
                    costs["mlx"] = b.cost
    if run_bench:
        units = ["mlx"] + [u for u in registry.names(bundles=True) if u in runs]  # "mlx": stock MLX experts
        report["bench"] = bench(units, costs, D, H, quant)
        for r in report["bench"]:
            if "error" in r:
                problems.append({"problem": f"{r['unit']} benchmark failed: {r['error']}", "fix": None})
            elif not 1 / 3 <= r["ratio"] <= 3:
                fix = (build_cmd(model, backend, force=True) if model and r["unit"] in (backend, "mlx")
                       else f"npumoe tune --model MODEL --backend {r['unit']}")
                problems.append({"problem": f"{r['unit']}: measured {r['measured_s'] * 1e3:.2f} ms vs "
                                            f"{r['predicted_s'] * 1e3:.2f} ms predicted ({r['cost_source']}): "
                                            f"the cost model is off by {max(r['ratio'], 1 / r['ratio']):.1f}x here",
                                 "fix": fix})
    return report


def _gb(n) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _table(rows: List[tuple]) -> List[str]:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def _groups(sizes: List[int]) -> str:
    """[1, 1, 1, 4] -> "3x1 + 1x4" (groups x experts each)."""
    counts = sorted(Counter(sizes).items())
    return " + ".join(f"{n}x{size}" for size, n in counts) or "-"


def format_report(r: dict) -> str:
    m = r["machine"]
    lines = [f"npumoe {r['npumoe_version']} doctor",
             f"machine: {m['chip']} ({m['machine']}), {m['os']}, {m['cpus']} CPUs, {_gb(m['memory_bytes'])}, "
             f"MLX on {m['mlx_device']}" + (f", chip profile {m['chip_profile']}" if m["chip_profile"] else ""),
             f"backends (--offload auto = {r['offload_auto']}):"]
    rows = [("backend", "runs here", "programs per process", "why not / details")]
    for name, b in r["backends"].items():
        detail = b["why_not"] or (f"providers {', '.join(b['providers'])}" if "providers" in b else f"{b.get('version')}")
        budget = f"{b['program_budget']} ({b['program_budget_unit']}s)" if "program_budget" in b else "?"
        rows.append((name, "yes" if b["can_run"] else "no", budget, detail))
    lines += _table(rows)
    lines += [f"  {name} program budget: {b['program_budget_source']}" for name, b in r["backends"].items()
              if "program_budget_source" in b]
    mo = r["model"]
    if mo:
        lines.append(f"model: {mo['path']} ({mo['model_type']}), {_gb(mo['bytes'])} in memory, "
                     f"experts {_gb(mo['expert_bytes'])}, {len(mo['blocks'])} expert blocks")
        if mo["blocks"]:
            rows = [("layer", "E", "k", "D", "H", "quant", "bytes", "status")]
            for b in mo["blocks"]:
                q = f"{b['quant']['bits']}b" if b["quant"] else b["dtype"]
                rows.append((b["layer"], b["experts"], b["top_k"], b["D"], b["H"], q, _gb(b["bytes"]),
                             "offloadable" if b["supported"] else f"stock MLX: {b['reason']}"))
            lines += _table(rows)
        for name, b in mo["bundles"].items():
            if b["exists"]:
                lines.append(f"bundle {name}: checked every program file's whole sha256 against its manifest")
            if not b["exists"]:
                lines.append(f"bundle {name}: none (would be {b['path']})")
            elif not b.get("current"):
                lines.append(f"bundle {name}: {b['path']}: NOT CURRENT")
            else:
                lines.append(f"bundle {name}: {b['path']}: current (format {b['format']}, npumoe {b['npumoe_version']}, "
                             f"fingerprint {b['fingerprint'][:12]}, {b['programs']} programs, {_gb(b['program_bytes'])})")
                rows = [("layer", "experts on programs", "on MLX", "groups x experts", "tiers", "from tokens")]
                for lp in b["plan"]["layers"]:
                    rows.append((lp["layer"], str(lp["on_programs"]) + (f" + {lp['shared_on_programs']} shared" if lp["shared_on_programs"] else ""),
                                 lp["on_mlx"], _groups(lp["groups"]),
                                 f"{lp['tiers'][0]}..{lp['tiers'][-1]}" if lp["tiers"] else "-",
                                 lp["min_tokens"] if lp["min_tokens"] is not None else "never"))
                lines += _table(rows)
        mem = mo.get("memory")
        if mem:
            lines.append(f"memory: model {_gb(mem['model_bytes'])} + programs {_gb(mem['program_bytes'])} = "
                         f"{_gb(mem['total_bytes'])} of {_gb(mem['budget_bytes'])} usable ({_gb(mem['machine_bytes'])} RAM): "
                         + ("fits" if mem["fits"] else "DOES NOT FIT"))
    if r["bench"]:
        lines.append("micro-benchmark (measured vs the cost model in use):")
        rows = [("unit", "call", "measured", "predicted", "ratio", "GFLOP/s")]
        for b in r["bench"]:
            if "error" in b:
                rows.append((b["unit"], "failed", b["error"], "", "", ""))
            else:
                rows.append((b["unit"], b["what"], f"{b['measured_s'] * 1e3:.3f} ms", f"{b['predicted_s'] * 1e3:.3f} ms",
                             f"{b['ratio']:.2f}x", f"{b['measured_gflops']:.1f}"))
        lines += _table(rows)
    if r["problems"]:
        lines.append(f"problems ({len(r['problems'])}):")
        for p in r["problems"]:
            lines.append(f"  - {p['problem']}")
            if p["fix"]:
                lines.append(f"    fix: {p['fix']}")
    else:
        lines.append("no problems found")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="npumoe doctor", description=__doc__.splitlines()[0])
    p.add_argument("--model", help="Local folder or Hugging Face repo of an mlx_lm model to check.")
    p.add_argument("--backend", choices=registry.names(bundles=True), help="Backend to check the bundle for (default: auto).")
    p.add_argument("--json", metavar="PATH", help="Also write the report as JSON (atomically).")
    p.add_argument("--no-bench", action="store_true", help="Skip the micro-benchmark.")
    p.add_argument("--trust-remote-code", action="store_true")
    args = p.parse_args(argv)
    if args.json:
        check_file(args.json, "--json")
    report = run(args.model, args.backend, run_bench=not args.no_bench, trust_remote_code=args.trust_remote_code)
    print(format_report(report))
    if args.json:
        write_json(args.json, report)
        print(f"wrote {args.json}")
    damaged = any(b["exists"] and not b.get("current") for b in ((report["model"] or {}).get("bundles") or {}).values())
    return 1 if report["problems"] or damaged else 0  # scripts and CI can act on "problems found"


if __name__ == "__main__":
    from ..log import console

    console()  # `[npumoe] ...` lines, as the npumoe command shows them
    sys.exit(main())
