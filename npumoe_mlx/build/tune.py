"""`npumoe tune`: measure this machine's costs and fit the cost model.

Measures, at the model's expert dims: per-call dispatch and per-tier run time of
the chosen backend's programs, the host copy rate of gathering rows, the host
sync of one layer call, and the stock MLX expert path as a function of routed
pairs. Core ML cannot run off macOS: there it returns the parametric defaults.

On macOS it also measures each unit's active power with powermetrics (power.py) while
the largest program call and the largest MLX call run back to back: the programs' unit
(the ANE for Core ML) and the GPU. The cost model's energy terms come from those watts.
powermetrics needs root; without it, the chip table's active power of this Mac's chip
(chips.py, every number sourced) is used instead, and tune says so in one line.
"""

import argparse
import platform
import sys
import time
from typing import Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.switch_layers import SwitchGLU

from ..backends import registry
from ..planning.chips import chip_profile, detect_chip
from ..planning.cost import CostModel, flops_per_row
from ..planning.plan import GroupPlan, LayerPlan
from ..planning.power import active_power, power_sampler
from ..runtime.dispatch import MAX_WORKERS, run_calls, workers
from ..runtime.executor import OffloadExecutor
from ..runtime.experts import stock_experts

def median_s(fn, repeats: int, warm_up: bool = True) -> float:
    """Median wall seconds of ``fn()`` over ``repeats`` runs (after one unmeasured run)."""
    if warm_up:
        fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def _module(D: int, H: int, G: int, quant: Optional[dict]) -> SwitchGLU:
    mx.random.seed(0)
    m = SwitchGLU(D, H, G)
    if quant:
        nn.quantize(m, group_size=quant["group_size"], bits=quant["bits"])
    mx.eval(m.parameters())
    return m


def _dense_mlp(D: int, H: int, quant: Optional[dict]):
    from mlx_lm.models.qwen2_moe import MLP  # the plain gated MLP shared experts use

    mx.random.seed(0)
    mlp = MLP(D, H)
    if quant:
        nn.quantize(mlp, group_size=quant["group_size"], bits=quant["bits"])
    mx.eval(mlp.parameters())
    return mlp


def measure(
    backend: str,
    D: int,
    H: int,
    quant: Optional[dict] = None,
    groups: Sequence[int] = (1, 4),
    tiers: Sequence[int] = (16, 64, 256),
    pairs: Sequence[int] = (16, 128, 512),
    repeats: int = 5,
    backend_opts: Optional[dict] = None,
    progress: bool = False,
    power: Optional[bool] = None,
    log=print,
    top_k: int = 8,
) -> dict:
    """Raw timings (seconds) at these dims, and on macOS (``power``: default there) the
    units' active power; ``fit`` turns them into a CostModel."""
    from .progress import progress_bar

    from ..backends import load_backend
    from .programs import spec_from_switch_glu

    be = load_backend(backend, **(backend_opts or {}))
    # Dispatch: one call of a program too small for its compute to matter, the way
    # the executor makes it (gather rows, run, copy rows out), Python included.
    tiny = be.load(spec_from_switch_glu(_module(32, 32, 1, None), layer=0, expert_ids=[0], tiers=[16]))
    x_rows = np.zeros((64, 32), np.float32)
    src, out = np.arange(16) % 64, np.empty((16, 32), np.float32)

    def one_call():
        out[:] = tiny.run(x_rows[src].reshape(1, 16, 32), 16).reshape(-1, 32)

    dispatch_s = median_s(one_call, 8 * repeats)
    n_workers = _pick_workers(be, D, H, quant, repeats)
    prog_rows = []
    bar = progress_bar(total=len(groups) * len(tiers) + 2 * len(pairs), desc="tuning", disable=not progress, leave=False)
    for G in groups:
        m = _module(D, H, G, quant)
        spec = spec_from_switch_glu(m, layer=0, expert_ids=range(G), tiers=tiers)
        program = be.load(spec)
        for C in tiers:
            x = np.random.default_rng(C).standard_normal((G, C, D)).astype(np.float32)
            prog_rows.append((G, C, _call_s(program, x, C, repeats, n_workers)))
            biggest_program = lambda program=program, x=x, C=C: program.run(x, C)  # noqa: E731
            bar.update()

    last = (program, x, C)  # the largest program call measured, for the overlap below
    m = _module(D, H, 8, quant)
    small, x1, e1 = _module(32, 32, 8, None), mx.zeros((1, 32)), mx.zeros((1, 1), mx.uint32)
    mlx_fixed_s = median_s(lambda: mx.eval(stock_experts(small, x1, e1)), 4 * repeats)
    mlx_rows = []
    for n in pairs:
        x = mx.random.normal((n, D))
        e = mx.random.randint(0, 8, (n, 1)).astype(mx.uint32)
        mx.eval(x, e)
        mlx_rows.append((n, median_s(lambda: mx.eval(stock_experts(m, x, e)), repeats)))
        biggest_mlx = lambda x=x, e=e: mx.eval(stock_experts(m, x, e))  # noqa: E731
        bar.update()

    overlap = _measure_overlap(last, m, mlx_rows, D, repeats)
    mlp = _dense_mlp(D, H, quant)
    dense_rows = []
    for n in pairs:
        x = mx.random.normal((n, D))
        mx.eval(x)
        dense_rows.append((n, median_s(lambda: mx.eval(mlp(x)), repeats)))
        bar.update()
    bar.close()

    n = max(pairs)
    xs = mx.random.normal((n, D))
    inds = mx.random.randint(0, 8, (n, 2)).astype(mx.uint32)

    def sync():
        flat = inds.reshape(-1)
        order, counts = mx.argsort(flat), mx.zeros((8,), mx.int32).at[flat].add(1)
        mx.eval(order, counts, xs)
        np.array(order), np.array(counts), np.asarray(xs)

    sync_s = median_s(sync, repeats)
    x_np = np.asarray(xs)
    src = np.random.default_rng(0).integers(0, n, 4 * n)
    copy_s = median_s(lambda: mx.eval(mx.array(x_np[src])), repeats)
    raw = {
        "backend": backend, "D": D, "H": H, "quant": quant,
        "dispatch_s": dispatch_s, "programs": prog_rows, "mlx_fixed_s": mlx_fixed_s, "mlx": mlx_rows,
        "mlx_dense": dense_rows,
        "sync_s": sync_s, "copy_bytes": 2 * 4 * n * D * 4, "copy_s": 2 * copy_s, "overlap": overlap,
        "workers": n_workers,
    }
    if top_k > 0 and getattr(be, "dynamic", False):  # 1-row decode calls need a symbolic row count
        raw["decode"] = measure_decode(be, D, H, top_k, quant, repeats=max(repeats, 3))
    if (sys.platform == "darwin") if power is None else power:
        raw["power"] = unit_power(backend, biggest_program, biggest_mlx)
        log(f"      power: {raw['power']['source']}")
    return raw


DECODE_LAYERS = 2  # layers of the decode loop ``measure_decode`` runs
DECODE_STEPS = 4  # tokens per timed run of it
DECODE_BUDGET_S = 3.0  # timed rounds stop after this long (MLX's CPU q4 decode step is ~0.1 s per layer at Qwen3 dims here)


def measure_decode(be, D: int, H: int, k: int, quant, repeats: int = 3, n_workers: int = 0,
                   steps: int = DECODE_STEPS, layers: int = DECODE_LAYERS) -> dict:
    """Seconds per layer per token of a decode loop run as mlx_lm runs it (the next token's
    graph is built and started before the current one is read), its k routed experts on
    MLX (stock SwitchGLU) or on programs the way a released layer runs them (one host sync
    of x and the indices per layer, k 1-row calls, one array back). Both loops do the same
    other work per layer (a router and two dense matmuls standing in for attention), so
    their difference is what decode on programs costs or saves: host sync, lost pipelining
    and per-call Python included, which a single timed call does not see (the demo model:
    1-row program calls measured cheaper than MLX's, decode 0.84x stock). The programs' side
    runs one call at a time and ``n_workers`` (default MAX_WORKERS) at once, in turns; the
    faster (2 only when 5% faster) is kept as ``workers`` (CostModel.decode_workers)."""
    from .programs import spec_from_switch_glu

    m = _module(D, H, k, quant)  # (k experts: every pair its own program, the worst case)
    progs = [be.load(spec_from_switch_glu(m, layer=0, expert_ids=[e], tiers=[1])) for e in range(k)]
    attn, caches, router = _decode_layers(D, k, quant, layers)
    # the executor's own small-call path, as a released layer runs it (one 1-expert group per program)
    lp = LayerPlan(0, "tune", k, k, D, H, [GroupPlan([e], [1]) for e in range(k)], [], min_tokens=1)
    exs = {w: OffloadExecutor(lp, progs, CostModel("onnx", 0, 1, 1, 0, 0, 1, workers=w, decode_workers=w))
           for w in sorted({1, n_workers if n_workers else MAX_WORKERS})}

    def on_programs(h, inds, ex):  # (1, 1, D), (1, 1, k) -> (1, 1, k, D)
        c = ex._prepare_small(h, inds.reshape(-1), tuple(inds.shape), True)  # the host sync
        return ex._finish(c, ex._run_programs(c), None)

    def on_mlx(h, inds):
        return stock_experts(m, h, inds)

    def step(h, experts):  # h: (1, 1, D)
        for a, c in zip(attn, caches):
            h = h + a(mx.fast.rms_norm(h, None, 1e-6), cache=c)
            x = mx.fast.rms_norm(h, None, 1e-6)
            inds = mx.argsort(-router(x), axis=-1).astype(mx.uint32)  # (1, 1, k): every expert, router order
            h = h + experts(x, inds).sum(-2) / k
        return h

    h0 = mx.random.normal((1, 1, D))
    mx.eval(h0)

    def loop(experts):
        y = step(h0, experts)
        mx.async_eval(y)
        for _ in range(steps):
            nxt = step(y, experts)
            mx.async_eval(nxt)
            mx.eval(y)  # the token read
            y = nxt
        mx.eval(y)

    runs = {**{w: (lambda ex=ex: loop(lambda h, i: on_programs(h, i, ex))) for w, ex in exs.items()},
            "mlx_s": lambda: loop(on_mlx)}
    ts = {key: [] for key in runs}
    for fn in runs.values():
        fn()  # warm-up (sessions open, buffers allocated)
    start = time.perf_counter()
    for _ in range(repeats):  # in turns: the load moves between separately timed medians
        for key, fn in runs.items():
            t = time.perf_counter()
            fn()
            ts[key].append((time.perf_counter() - t) / ((steps + 1) * layers))
        if time.perf_counter() - start > DECODE_BUDGET_S:
            break
    med = {key: float(np.median(v)) for key, v in ts.items()}
    best = min((w for w in exs), key=lambda w: (med[w] if w == 1 else med[w] / 0.95, w))  # 2 only if 5% faster
    return {"k": k, "program_s": med[best], "mlx_s": med["mlx_s"], "workers": best,
            "by_workers": {str(w): med[w] for w in exs}}


def _decode_layers(D: int, k: int, quant, layers: int, context: int = 32):
    """mlx_lm's own qwen3_moe attention (heads of 64 or 128, a KV cache already holding
    ``context`` tokens) for each layer of ``measure_decode``'s loop, and a router (D -> k)."""
    from mlx_lm.models.cache import KVCache
    from mlx_lm.models.qwen3_moe import Attention, ModelArgs

    hd = 128 if D >= 1024 else 64
    heads = max(D // hd, 1)
    args = ModelArgs(model_type="qwen3_moe", hidden_size=D, num_hidden_layers=layers, intermediate_size=4 * D,
                     num_attention_heads=heads, num_experts=k, num_experts_per_tok=k, decoder_sparse_step=1,
                     mlp_only_layers=[], moe_intermediate_size=4 * D, rms_norm_eps=1e-6, vocab_size=256,
                     num_key_value_heads=max(heads // 4, 1), head_dim=hd, rope_theta=1e6,
                     tie_word_embeddings=False, max_position_embeddings=4096, norm_topk_prob=True)
    mx.random.seed(1)
    attn, caches = [Attention(args, i) for i in range(layers)], [KVCache() for _ in range(layers)]
    router = nn.Linear(D, k, bias=False)
    for mod in attn + [router]:
        if quant:
            nn.quantize(mod, group_size=quant["group_size"], bits=quant["bits"])
        mx.eval(mod.parameters())
    ctx = mx.random.normal((1, context, D)) * 0.1
    for a, c in zip(attn, caches):
        mx.eval(a(ctx, mask="causal", cache=c), c.state)
    return attn, caches, router


def unit_power(backend: str, run_programs, run_mlx, min_s: float = 1.0, make_sampler=power_sampler,
               chip: Optional[str] = None) -> dict:
    """Active power (W) of the programs' unit and of the GPU: {"program_w", "mlx_w", "source"}.

    Measured with powermetrics while ``run_programs()`` and then ``run_mlx()`` run back to
    back for ``min_s`` each. When powermetrics cannot run (not root) or reports no such
    rail, the chip table's active power of ``chip`` (default: this Mac's) is used, and
    ``source`` says why in one line; {"source": why} (no watts) if there is neither.
    """
    unit = registry.get(backend).unit  # the powermetrics rail its programs run on
    sampler, why = make_sampler()
    if sampler is not None:
        prog, gpu = active_power(sampler, run_programs, min_s), active_power(sampler, run_mlx, min_s)
        if prog and gpu and prog.get(unit) and gpu.get("gpu"):
            return {"program_w": prog[unit], "mlx_w": gpu["gpu"],
                    "source": f"measured with powermetrics: {unit} {prog[unit]:.2f} W under the programs, "
                              f"gpu {gpu['gpu']:.2f} W under MLX"}
        why = f"powermetrics reported no {unit} and gpu power for the benchmarks"
    name = chip or detect_chip()
    if name is None:
        return {"source": f"{why}; this chip has no profile in the chip table, so the cost model has no energy terms"}
    if unit != "ane":
        return {"source": f"{why}; the chip table has no {unit} power ({backend} programs), so no energy terms"}
    c = chip_profile(name)
    return {"program_w": c.ane_power_w, "mlx_w": c.gpu_power_w,
            "source": f"{why}; using the chip table's active power of {c.name} instead (ANE {c.ane_power_w:.2f} W, "
                      f"GPU {c.gpu_power_w:.2f} W; npumoe_mlx/data/chips.json)"}


def _pick_workers(be, D: int, H: int, quant, repeats: int) -> int:
    """Program calls in flight at once for this machine: 2 where a typical call (one
    expert, 64 rows) then costs less than 95% of one at a time, else 1."""
    from .programs import spec_from_switch_glu

    program = be.load(spec_from_switch_glu(_module(D, H, 1, quant), layer=0, expert_ids=[0], tiers=[64]))
    if not program.concurrent:
        return 1
    x = np.random.default_rng(64).standard_normal((1, 64, D)).astype(np.float32)
    ts = {1: [], MAX_WORKERS: []}
    _call_s(program, x, 64, 1, MAX_WORKERS)  # warm-up
    for _ in range(max(repeats, 3)):  # in turns: the load moves between separately timed medians
        for n in ts:
            ts[n].append(_call_s(program, x, 64, 1, n))
    return MAX_WORKERS if np.median(ts[MAX_WORKERS]) < 0.95 * np.median(ts[1]) else 1


def _call_s(program, x: np.ndarray, C: int, repeats: int, n_workers: int = 1) -> float:
    """Seconds one program call adds to a layer call, made the executor's way: the rows
    gathered in and written out by ``dispatch.run_calls``, and where calls run several at
    once (``n_workers``), that many copies in flight: the wall time per call."""
    G, _, D = x.shape
    n = workers(n_workers) if program.concurrent else 1
    x2 = x.reshape(G * C, D)
    calls = [(0, np.arange(G), C, np.arange(G * C))] * n
    outs = np.empty((n * G * C, D), np.float32)
    return median_s(lambda: run_calls([program], calls, x2, outs, n), repeats) / n


def _measure_overlap(last, m: SwitchGLU, mlx_rows, D: int, repeats: int) -> dict:
    """Seconds of a program call alone, an MLX expert call of similar length alone, and
    both started together the way the executor starts them (MLX async, then the program):
    how much of one hides under the other on this machine (``fit``: ``overlap``)."""
    program, xp, C = last
    t_prog = median_s(lambda: program.run(xp, C), 1)
    n = min(mlx_rows, key=lambda r: abs(r[1] - t_prog))[0]  # the MLX call closest in length
    x = mx.random.normal((n, D))
    e = mx.random.randint(0, 8, (n, 1)).astype(mx.uint32)
    mx.eval(x, e)

    def both():
        y = stock_experts(m, x, e)
        mx.async_eval(y)
        program.run(xp, C)
        mx.eval(y)

    # interleaved rounds, one estimate per round (``fit_overlap`` takes their median): a load
    # change between separately timed medians fakes an overlap
    runs = {"program_s": lambda: program.run(xp, C), "mlx_s": lambda: mx.eval(stock_experts(m, x, e)), "both_s": both}
    ts = {k: [] for k in runs}
    for _ in range(max(repeats, 5)):
        for k, fn in runs.items():
            t = time.perf_counter()
            fn()
            ts[k].append(time.perf_counter() - t)
    return ts


def fit_overlap(o: Optional[dict]) -> float:
    """The fraction of the shorter side hidden under the longer: both = max + (1 - overlap) * min."""
    if not o:
        return 1.0
    a, b, both = (np.asarray(o[k], float) for k in ("program_s", "mlx_s", "both_s"))  # scalars or rounds
    est = (a + b - both) / np.maximum(np.minimum(a, b), 1e-12)
    return float(np.clip(np.median(est), 0.0, 1.0))


def fit_slope(xs, ys) -> float:
    """Least-squares slope through the origin, floored so rates stay finite."""
    xs, ys = np.asarray(xs, float), np.maximum(np.asarray(ys, float), 0.0)
    return max(float((xs * ys).sum() / max((xs * xs).sum(), 1e-30)), 1e-16)


def fit_two(xs, ys) -> tuple:
    """Non-negative least squares ``y = a*x0 + b*x1`` (2 unknowns: solve, clamp, refit)."""
    X, y = np.asarray(xs, float), np.maximum(np.asarray(ys, float), 0.0)
    (a, b), *_ = np.linalg.lstsq(X, y, rcond=None)
    if a < 0:
        a, b = 0.0, fit_slope(X[:, 1], y)
    elif b <= 0:
        a, b = max(fit_slope(X[:, 0], y), 0.0), 1e-16
    return float(a), max(float(b), 1e-16)


def fit(raw: dict) -> CostModel:
    D, H = raw["D"], raw["H"]
    f = flops_per_row(D, H)
    copy_bps = raw["copy_bytes"] / max(raw["copy_s"], 1e-9)
    dispatch, mlx_fixed = raw["dispatch_s"], raw["mlx_fixed_s"]
    expert_s, per_flop = fit_two(
        [(G, G * C * f) for G, C, _ in raw["programs"]], [t - dispatch for _, _, t in raw["programs"]]
    )
    mlx_per_flop = fit_slope([n * f for n, _ in raw["mlx"]], [t - mlx_fixed for _, t in raw["mlx"]])
    dense_per_flop = fit_slope([n * f for n, _ in raw["mlx_dense"]], [t - mlx_fixed for _, t in raw["mlx_dense"]])
    cost = CostModel(
        backend=raw["backend"],
        dispatch_s=dispatch,
        expert_s=expert_s,
        program_flops=1.0 / per_flop,
        copy_bps=copy_bps,
        sync_s=raw["sync_s"],
        mlx_fixed_s=mlx_fixed,
        mlx_flops=1.0 / mlx_per_flop,
        mlx_dense_flops=1.0 / dense_per_flop,
        overlap=fit_overlap(raw.get("overlap")),
        workers=int(raw.get("workers", 1)),
        decode_k=int((raw.get("decode") or {}).get("k", 0)),
        decode_program_s=float((raw.get("decode") or {}).get("program_s", 0.0)),
        decode_mlx_s=float((raw.get("decode") or {}).get("mlx_s", 0.0)),
        decode_workers=int((raw.get("decode") or {}).get("workers", 0)),
        host_bytes_per_element=registry.get(raw["backend"]).host_bytes(),
        host_bytes_per_pair=registry.get(raw["backend"]).host_bytes_per_pair(),
        source=f"measured on {platform.node() or 'this machine'} ({platform.machine()}, D={D}, H={H})",
    )
    pw = raw.get("power") or {}
    if pw.get("program_w") and pw.get("mlx_w"):
        with_energy(cost, pw["program_w"], pw["mlx_w"])
        cost.source += f"; energy: {pw['source']}"
    return cost


def with_energy(cost: CostModel, program_w: float, mlx_w: float) -> CostModel:
    """Energy terms from each unit's active power (W), as ``cost.chip_cost_model`` derives them:
    busy power per FLOP at the fitted rate, and busy power x the fixed time per call."""
    cost.program_j_per_flop = program_w / cost.program_flops
    cost.program_j_per_call = program_w * cost.dispatch_s
    cost.mlx_j_per_flop = mlx_w / cost.mlx_flops
    cost.mlx_j_per_call = mlx_w * cost.mlx_fixed_s
    return cost


def tune(backend: str, D: int, H: int, quant: Optional[dict] = None, **kw) -> CostModel:
    ok, why = registry.get(backend).available()
    if not ok:
        cost = registry.default_cost(backend)
        cost.source = f"parametric ({why}; run `npumoe tune` where it runs)"
        return cost
    return fit(measure(backend, D, H, quant, **kw))


def main(argv=None) -> int:
    from mlx_lm import utils as mlx_utils

    from ..atomic import write_json
    from ..planning.cost import describe
    from ..runtime.experts import find_expert_blocks

    p = argparse.ArgumentParser(prog="npumoe tune", description="Measure costs and fit the cost model.")
    p.add_argument("--model", required=True)
    p.add_argument("--backend", choices=registry.names(), default=registry.DEFAULT)
    p.add_argument("--out", help="Where to write the cost model JSON (default: ./npumoe-cost-<backend>.json)")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    from .args import at_least
    from ..bundle.checks import explain_load_errors, resolve_model

    at_least("--repeats", args.repeats, 1, "timed runs per shape")
    from ..outputs import check_file

    check_file(args.out or f"npumoe-cost-{args.backend}.json", "--out")  # before the measurements, not after
    local = resolve_model(args.model, need_tokenizer=False)
    with explain_load_errors(args.model):
        model, config = mlx_utils.load_model(local, lazy=True)  # shapes only: no tokenizer
    blocks = [b for b in find_expert_blocks(model, config) if b.supported]
    if not blocks:
        raise ValueError(f"{args.model}: no supported MoE expert blocks to tune for")
    b = blocks[0]
    cost = tune(args.backend, b.dims, b.hidden, b.quant, repeats=args.repeats, top_k=b.top_k or 8)
    print(describe(cost))
    out = args.out or f"npumoe-cost-{args.backend}.json"
    write_json(out, cost.to_dict())
    print(f"wrote {out}")
    return 0
