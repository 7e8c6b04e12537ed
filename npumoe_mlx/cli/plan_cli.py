"""`npumoe plan`: print the offload plan of a model (its bundle's, one computed from a profile
or a calibration, or `--from-stats`'s preview of what `build --from-stats` builds).

The command line lives here, not in plan.py, so the planner imports no bundle, calibration or
argument code: profiles + costs + limits -> Plan, nothing else.
"""

import argparse
import os
from dataclasses import replace

from ..backends import registry
from ..planning.cost import CostModel
from ..planning.plan import Plan, PlanLimits, format_plan, make_plan
from ..planning.profiles import Profile


def _print_resident(plan: Plan, cost: CostModel, local, keep: bool, model=None, blocks=None) -> None:
    """Resident bytes per unit (MLX, programs), in all and per layer (the model read lazily: shapes only)."""
    from mlx_lm import utils as mlx_utils

    from ..runtime import experts
    from ..planning.residency import default_memory_budget, describe, plan_resident, size

    if model is None:
        model, _, config = mlx_utils.load(str(local), lazy=True, return_config=True)
        blocks = {b.layer: b for b in experts.find_expert_blocks(model, config) if b.supported}
    res = plan_resident(plan, model, blocks, cost, keep_mlx_experts=keep, budget=default_memory_budget())
    print(describe(res))
    for layer, u in sorted(res["units"].items()):
        print(f"  layer {layer}: MLX {size(u['mlx'])}, programs {size(u['programs'])}; MLX copy of program experts "
              f"{u['mlx_copy']}")


def main(argv=None) -> int:
    """`npumoe plan`: the plan for a model from its profile (calibrated now if none given)."""
    from mlx_lm import utils as mlx_utils

    from ..runtime import experts
    from ..build.calibrate import calibrate
    from ..build.workloads import corpus_documents

    p = argparse.ArgumentParser(prog="npumoe plan", description="Print the offload plan of a model.")
    p.add_argument("--model", required=True)
    p.add_argument("--backend", choices=registry.names(bundles=True), default=registry.DEFAULT)
    p.add_argument("--profile", help="Profile JSON (default: <model>/npumoe-profile.json, else calibrate now).")
    p.add_argument("--from-stats", metavar="FILE",
                   help="Plan for the per-call loads `npumoe generate --stats FILE` saved (your own workload).")
    p.add_argument("--cost", help="Cost model JSON (default: the backend's parametric costs).")
    p.add_argument("--chip", help="Plan with the predicted costs of this Apple chip (coreml; see `npumoe chips`).")
    p.add_argument("--objective", choices=("time", "energy"), default="time")
    p.add_argument("--tokens", type=int, default=2048, help="Calibration tokens when calibrating now.")
    p.add_argument("--json", metavar="PATH", help="Also write the plan as JSON.")
    p.add_argument("--bundle", help="Bundle whose plan to print (default: the model's, as generate finds it).")
    p.add_argument("--keep-mlx-experts", action="store_true",
                   help="Count MLX's copy of program-only experts as kept (as generate --keep-mlx-experts).")
    p.add_argument("--corpus", nargs="+", action="extend", metavar="NAME_OR_FILE",
                   help="With --from-stats: calibration corpora, as `npumoe build --corpus` (default: the three built-ins).")
    p.add_argument("--chunk-size", type=int, default=2048, help="With --from-stats: as `npumoe build --chunk-size`.")
    for flag in ("--max-tiers", "--max-group", "--max-programs", "--max-capacity"):
        p.add_argument(flag, type=int, help=f"With --from-stats: as `npumoe build {flag}`.")
    args = p.parse_args(argv)
    from ..bundle import bundle as bundles
    from ..build.args import at_least, choose_cost
    from ..bundle.checks import resolve_model
    from ..outputs import check_file

    if args.json:
        check_file(args.json, "--json")

    at_least("--tokens", args.tokens, 1, "calibration tokens")
    local = resolve_model(args.model)
    found = bundles.locate_bundle(local, args.backend, args.bundle)
    if args.from_stats:
        return _preview_from_stats(args, local, found)
    if (found / "manifest.json").exists() and not (args.profile or args.cost or args.chip):
        b = bundles.read(found, local, args.model)
        plan = b.plan  # the plan generate runs
        print(f"plan of the {args.backend} bundle {found} (the one generate uses):")
        print(format_plan(plan, verbose=True))
        _print_resident(plan, b.cost, local, args.keep_mlx_experts)
        if args.json:
            plan.save(args.json)
            print(f"wrote {args.json}")
        return 0
    if args.bundle:
        raise ValueError(f"{found}: not an npumoe bundle (no manifest.json)")
    why = (f"not the plan of the {args.backend} bundle {found}" if (found / "manifest.json").exists()
           else f"no {args.backend} bundle for {args.model}")
    print(f"{why}: computing a plan from "
          f"{'the profile ' + args.profile if args.profile else 'a calibration'} and "
          f"{'the costs in ' + args.cost if args.cost else 'parametric costs'} (`npumoe build` measures "
          f"this machine's costs, so its plan may differ)")
    model, tokenizer, config = mlx_utils.load(str(local), return_config=True)
    blocks = {b.layer: b for b in experts.find_expert_blocks(model, config) if b.supported}
    if not blocks:
        raise ValueError(f"{args.model}: no supported MoE expert blocks; it runs on stock MLX")
    prof_path = args.profile or os.path.join(local, "npumoe-profile.json")
    if os.path.exists(prof_path):
        profile = Profile.load(prof_path)
    else:
        docs, desc = corpus_documents(["long-context", "qa", "code"], args.tokens, 0)
        profile = calibrate(model, tokenizer, config, docs, max_tokens=args.tokens, model_path=local, description=desc)
    b0 = next(iter(blocks.values()))
    cost = choose_cost(args.backend, args.cost, args.chip, D=b0.dims, H=b0.hidden, bits=(b0.quant or {}).get("bits", 16))
    routed = {l: replace(b, shared=[]) for l, b in blocks.items()}  # routed experts only (build also plans shared ones)
    plan = make_plan(profile, routed, cost, PlanLimits.for_backend(args.backend), objective=args.objective)
    return _show(plan, cost, local, args, model, blocks)


def _show(plan, cost, local, args, model, blocks) -> int:
    print(format_plan(plan, verbose=True))
    _print_resident(plan, cost, local, args.keep_mlx_experts, model, blocks)
    if args.json:
        plan.save(args.json)
        print(f"wrote {args.json}")
    return 0


def _preview_from_stats(args, local, found) -> int:
    """`plan --from-stats`: what `build --from-stats` builds, by the same path (build.plan_model)
    with the same inputs: its calibration, the saved workload, the bundle's costs, the flags' limits."""
    from mlx_lm import utils as mlx_utils

    from ..runtime import experts
    from ..build.args import limits_from_flags, load_cost
    from ..build.build import plan_model, workload_cost
    from ..backends.registry import default_cost

    workload = Profile.load(args.from_stats)  # a bad file fails before the model loads
    limits = limits_from_flags(args.backend, args.max_tiers, args.max_group, args.max_programs, args.max_capacity)
    cost, costs = (load_cost(args.cost), f"the costs in {args.cost}") if args.cost else (None, f"--chip {args.chip}")
    if cost is None and not args.chip:
        cost, costs = workload_cost(found), f"the costs of the bundle {found}"
        if cost is None:
            cost, costs = default_cost(args.backend), "parametric costs"
            print(f"note: no {args.backend} bundle with costs at {found}: `npumoe build --from-stats` would measure "
                  f"this machine's costs first, so its plan may differ from this one")
    model, tokenizer, config = mlx_utils.load(str(local), return_config=True)
    blocks = {b.layer: b for b in experts.find_expert_blocks(model, config) if b.supported}
    if not blocks:
        raise ValueError(f"{args.model}: no supported MoE expert blocks; it runs on stock MLX")
    _, cost, plan = plan_model(model, tokenizer, config, blocks, args.backend, corpus=args.corpus or
                               ("long-context", "qa", "code"), tokens=args.tokens, chunk_size=args.chunk_size,
                               cost=cost, chip=args.chip, tune=False, objective=args.objective, limits=limits,
                               workload=workload, log=lambda m: None)
    print(f"plan for the workload saved in {args.from_stats}, as `npumoe build --model {args.model} --from-stats "
          f"{args.from_stats}` builds it (calibration + that workload, {costs}):")
    return _show(plan, cost, local, args, model, blocks)
