"""`npumoe info`: the expert-block seam of a model, as a table or JSON."""

import argparse
import sys

from mlx_lm import utils as mlx_utils

from ..atomic import write_json
from ..bundle.checks import explain_load_errors, resolve_model
from ..hints import build_cmd
from ..runtime.experts import find_expert_blocks


def _quant_str(q):
    return "-" if q is None else f"{q['mode']} {q['bits']}b g{q['group_size']}"


def format_table(blocks) -> str:
    head = ("layer", "path", "E", "k", "D", "H", "activation", "bias", "quant", "dtype", "shared", "status")
    rows = [head]
    for b in blocks:
        shared = ",".join(f"{s.path.rsplit('.', 1)[-1]}(H={s.hidden})" for s in b.shared) or "-"
        rows.append(
            (
                str(b.layer), b.path, str(b.num_experts), str(b.top_k), str(b.dims), str(b.hidden),
                b.activation, "yes" if b.bias else "no", _quant_str(b.quant), b.dtype, shared,
                "offloadable" if b.supported else f"stock MLX: {b.reason}",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="npumoe info", description="List the MoE expert blocks of a model.")
    p.add_argument("--model", required=True, help="Local folder or Hugging Face repo of an mlx_lm model.")
    p.add_argument("--json", metavar="PATH", help="Also write the description as JSON.")
    p.add_argument("--trust-remote-code", action="store_true")
    args = p.parse_args(argv)
    if args.json:
        from ..outputs import check_file

        check_file(args.json, "--json")
    local = resolve_model(args.model, need_tokenizer=False)
    with explain_load_errors(args.model):
        model, config = mlx_utils.load_model(local, lazy=True, trust_remote_code=args.trust_remote_code)  # no tokenizer needed
    blocks = find_expert_blocks(model, config)
    print(f"model: {args.model}  model_type: {config.get('model_type')}  MoE layers: {len(blocks)}")
    if blocks:
        print(format_table(blocks))
    else:
        print("no MoE expert blocks found: this model runs on stock MLX")
    if any(b.supported for b in blocks):
        from ..bundle import bundle as bundles
        from ..runtime.offload import resolve

        backend = resolve("auto")
        path = bundles.locate_bundle(local, backend)
        if (path / "manifest.json").is_file():
            print(f"{backend} bundle: {path} (the one generate uses)")
        else:
            print(f"no {backend} bundle yet (`{build_cmd(args.model, backend)}` writes it to {bundles.build_target(local, backend)})")
    if args.json:
        write_json(
            args.json,
            {"model": args.model, "model_type": config.get("model_type"), "blocks": [b.to_dict() for b in blocks]},
        )
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    from ..log import console

    console()  # `[npumoe] ...` lines, as the npumoe command shows them
    sys.exit(main())
