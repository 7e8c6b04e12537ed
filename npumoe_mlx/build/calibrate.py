"""Count how many tokens each expert of each MoE layer gets on a corpus -> Profile.

The planner needs to know which experts are hot and how large a call's per-expert
load gets, so calibration records, per MoE layer, the routed (token, expert) pair
counts over the whole corpus and per call ("chunk"). The recording sits on the
expert seam (``experts.install``) and computes the stock output, so the model
behaves exactly like mlx_lm while it is being watched. Documents are prefilled in
chunks like ``mlx_lm.generate`` does, so chunk loads match what the executor sees.
"""

import argparse
import math
import os
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import mlx.core as mx
import numpy as np
from mlx_lm import utils as mlx_utils
from mlx_lm.models.cache import make_prompt_cache

from ..bundle.checks import resolve_model
from ..bundle.fingerprint import model_fingerprint
from ..hints import one_line
from ..log import get as _get_log
from ..planning.profiles import RANGE_KEYS, LayerCounts, Profile
from ..planning.traces import save_routes
from ..runtime import experts
from . import host_ffn
from .progress import progress_bar
from .workloads import corpus_documents, workload_calls

_log = _get_log(__name__)

# ---------------------------------------------------------------------------
# Statistics


def skew(layer) -> dict:
    """How concentrated one layer's routing is.

    top10_share: share of pairs on the top 10% experts (at least one expert);
    top1_share: share on the single hottest expert; gini over experts (0 uniform);
    max_over_mean: hottest expert's load over the mean load.
    """
    counts = layer["counts"] if isinstance(layer, dict) else layer.counts
    c = np.sort(np.asarray(counts, dtype=np.float64))[::-1]  # [E] descending
    total = float(c.sum())
    if total == 0:
        return {"pairs": 0, "top10_share": 0.0, "top1_share": 0.0, "gini": 0.0, "max_over_mean": 0.0}
    n_top = max(1, int(math.ceil(0.1 * len(c))))
    asc = c[::-1]
    n = len(c)
    gini = float((2 * np.arange(1, n + 1) - n - 1) @ asc / (n * total))
    return {
        "pairs": int(total),
        "top10_share": float(c[:n_top].sum() / total),
        "top1_share": float(c[0] / total),
        "gini": gini,
        "max_over_mean": float(c[0] / (total / n)),
    }


def _ranks(v: np.ndarray) -> np.ndarray:
    """1-based ranks, ties get their average rank."""
    order = np.argsort(v, kind="stable")
    sorted_v = v[order]
    ranks = np.empty(len(v), dtype=np.float64)
    i = 0
    while i < len(v):
        j = i
        while j + 1 < len(v) and sorted_v[j + 1] == sorted_v[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(a, b) -> float:
    """Spearman rank correlation; nan when either side is constant."""
    ra, rb = _ranks(np.asarray(a, dtype=np.float64)), _ranks(np.asarray(b, dtype=np.float64))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = math.sqrt(float(ra @ ra) * float(rb @ rb))
    return float(ra @ rb / denom) if denom > 0 else float("nan")


def rank_correlation(profile_a: Profile, profile_b: Profile) -> Dict[int, float]:
    """Per layer present in both profiles: Spearman rho of the expert counts."""
    b_layers = {l.layer: l for l in profile_b.layers}
    out = {}
    for la in profile_a.layers:
        lb = b_layers.get(la.layer)
        if lb is None:
            continue
        if lb.num_experts != la.num_experts:
            raise ValueError(f"layer {la.layer}: {la.num_experts} vs {lb.num_experts} experts")
        out[la.layer] = spearman(la.counts, lb.counts)
    return out


# ---------------------------------------------------------------------------
# Recording


class Recorder:
    """Executor that counts routed pairs per expert and computes the stock output.

    Counts are kept per block of ``block`` consecutive tokens of a call, tagged with
    the document (``seq``): the planner sums consecutive blocks into calls of any
    size the user's prefill will make, without crossing a document.
    """

    def __init__(self, num_experts: int, block: int = 128, host: bool = False):
        self.num_experts = num_experts
        self.host = host  # the FFN output on numpy's BLAS (host_ffn), not MLX's
        self.block = block
        self.max_abs = np.zeros(3)  # |gate|, |up|, |down out| so far (profiles.RANGE_KEYS)
        self.top_k = None
        self.seq = 0  # the document being prefilled
        self.pending: List[tuple] = []  # (tokens, counts mx [blocks * E], seq, inds) not yet evaluated
        self.chunks: List[dict] = []
        self.routes: Optional[List[np.ndarray]] = None  # [(N, k)] expert ids per call, when kept
        self.whole = False  # record each call as one chunk, tagged "call" (batched prefill)

    def __call__(self, module, x: mx.array, inds: mx.array) -> mx.array:
        k = self.top_k = inds.shape[-1]
        E = self.num_experts
        n = inds.size // max(1, k)  # tokens of this call
        nb = -(-n // self.block)
        blk = (mx.arange(n) // self.block)[:, None] * E  # (N, 1) block offset of each token
        idx = (blk + inds.reshape(n, k).astype(mx.int32)).reshape(-1)
        counts = mx.zeros((nb * E,), dtype=mx.int32).at[idx].add(1)  # per-block bincount, [nb * E]
        if self.host:
            y, rng = host_ffn.experts_ffn(module, x, inds, range_sample(n))
            rng = mx.array(rng.astype(np.float32))
        else:
            y, rng = experts.stock_experts(module, x, inds), ffn_max_abs(module, x.reshape(n, -1), inds.reshape(n, k))
        self.pending.append((n, counts, self.seq, inds.reshape(n, k) if self.routes is not None else None, rng))
        return y

    def flush(self) -> None:
        """Move evaluated counts to the host (call after mx.eval of the chunk)."""
        E = self.num_experts
        for n, counts, seq, inds, rng in self.pending:
            if inds is not None:
                self.routes.append(np.array(inds))
            self.max_abs = np.maximum(self.max_abs, np.array(rng.astype(mx.float32)))
            c = np.array(counts).astype(int).reshape(-1, E)
            for b, row in enumerate(c):
                tokens = min(self.block, n - b * self.block)
                self.chunks.append({"tokens": int(tokens), "counts": row.tolist(), "seq": int(seq),
                                    **({"call": True} if self.whole else {})})
        self.pending = []


RANGE_FIRST, RANGE_SPREAD = 64, 192  # tokens of a call whose FFN range is measured: the first ones, then spread


def range_sample(n: int) -> list:
    """The tokens of an n-token call whose FFN range is measured (sorted indices)."""
    return sorted(set(range(min(n, RANGE_FIRST))) | set(range(0, n, max(1, n // RANGE_SPREAD))))


def ffn_max_abs(module, x: mx.array, inds: mx.array) -> mx.array:
    """(3,) max |gate|, |up|, |down output| of ``module``'s expert FFN (a SwitchGLU) over a sample
    of the call's tokens: the first RANGE_FIRST (outlier activations gather at a document's
    first tokens) and RANGE_SPREAD spread over the rest; x: (N, D), inds: (N, k). Lazy: it
    is evaluated with the call. ANE fp16 saturates near 32759 (ANEForge op quirks)."""
    sel = mx.array(range_sample(x.shape[0]), dtype=mx.int32)
    xs = mx.expand_dims(x[sel], (-2, -3))  # (S, 1, 1, D)
    idx = inds[sel]
    up, gate = module.up_proj(xs, idx), module.gate_proj(xs, idx)
    down = module.down_proj(module.activation(up, gate), idx)
    return mx.stack([mx.abs(gate).max(), mx.abs(up).max(), mx.abs(down).max()]).astype(mx.float32)


DENSE_WORTH_S = 20.0  # timing each linear shape and opening its sessions takes seconds: below this, MLX keeps them
SLOW_FLOPS = 0.5e9  # below any CPU rate MLX's linears run at: a model under DENSE_WORTH_S even at it skips the timing


def mlx_linear_flops(rows: int = 64, d: int = 1024) -> float:
    """The rate of ``nn.Linear`` on MLX here (FLOP/s): ``x @ W.T``, (rows, d) x (d, d) float32, the
    best of two after a warm-up (~0.2 s). MLX's Linux wheel links a reference BLAS: on this
    2-core VM 2.4-2.5 GFLOP/s for ``x @ W.T`` at every size tried, 6 for an untransposed
    ``x @ W`` (a constant of 6e9 once kept a 4-layer Qwen3-30B-A3B's linears on MLX: 36 s where
    onnxruntime took a few)."""
    x, w = mx.ones((rows, d)), mx.ones((d, d))  # (not mx.random: the caller's random state stays as it was)
    mx.eval(x, w, x @ w.T)
    best = float("inf")
    for _ in range(2):
        t0 = time.perf_counter()
        mx.eval(x @ w.T)
        best = min(best, time.perf_counter() - t0)
    return 2 * rows * d * d / max(best, 1e-9)


def _dense_linears(model, tokens: int) -> bool:
    """The attention's (and dense layers') linears on onnxruntime where its measured cost wins,
    when MLX would spend more than ``DENSE_WORTH_S`` on them over ``tokens`` (at the rate
    ``mlx_linear_flops`` times here); removed with the recorders (``experts.remove``). Without
    onnxruntime they stay on MLX. True if installed."""
    from ..runtime import dense

    flops = 2 * sum(_linear_weights(lin) for _, lin in dense.find_linears(model)) * tokens
    if flops / SLOW_FLOPS <= DENSE_WORTH_S or flops / mlx_linear_flops() <= DENSE_WORTH_S:
        return False
    try:
        dense.install(model, quiet=True, heads=False)
    except (ImportError, dense.DenseError) as e:
        _log.info(f"calibration's linears stay on MLX ({one_line(e)})")
        return False
    return True


def _linear_weights(lin) -> int:
    """in x out of an nn.Linear / nn.QuantizedLinear."""
    if "scales" in lin:
        return lin["scales"].shape[0] * lin["scales"].shape[-1] * lin.group_size
    return int(np.prod(lin["weight"].shape))


def _cap(lengths: List[int], max_tokens: Optional[int]) -> List[int]:
    """Shrink document lengths proportionally so they sum to at most ``max_tokens``."""
    total = sum(lengths)
    if max_tokens is None or total <= max_tokens:
        return list(lengths)
    out = [n * max_tokens // total for n in lengths]
    short = max_tokens - sum(out)
    for i in range(len(out)):  # hand the rounding remainder to the first documents
        if short == 0:
            break
        if out[i] < lengths[i]:
            out[i] += 1
            short -= 1
    return out


_LONG = "sequence-length-is-longer-than-the-specified-maximum"


def encode_documents(tokenizer, docs: Sequence[str]) -> List[List[int]]:
    """Each document's ids, whole. They are prefilled in chunks, so transformers' one-time warning
    that a text is longer than the model's maximum length is noise here: it is held back while
    these are encoded (and left as it was for the caller's own use of the tokenizer)."""
    hf = getattr(tokenizer, "_tokenizer", tokenizer)  # mlx_lm's TokenizerWrapper holds the HF tokenizer
    warned = getattr(hf, "deprecation_warnings", None)
    if not isinstance(warned, dict):
        return [list(tokenizer.encode(d)) for d in docs]
    before = warned.get(_LONG)
    warned[_LONG] = True
    try:
        return [list(tokenizer.encode(d)) for d in docs]
    finally:
        if before is None:
            warned.pop(_LONG, None)
        else:
            warned[_LONG] = before


CALIBRATE_WITH = {"auto": None, "numpy": True, "mlx": False}  # --calibrate-with -> calibrate(host=)


def add_calibrate_with_flag(parser):
    """``--calibrate-with`` (``calibrate``'s ``host``), shared by calibrate, build and convert."""
    parser.add_argument(
        "--calibrate-with", choices=tuple(CALIBRATE_WITH), default="auto",
        help="What computes the expert FFNs while calibrating: numpy's BLAS (auto's choice when MLX runs "
             "on the CPU: several times faster there, MLX's output up to rounding) or MLX (bit for bit as "
             "generation computes them; auto's choice on a GPU).")
    return parser


def calibrate(
    model,
    tokenizer,
    config: dict,
    docs: List[str],
    *,
    chunk_size: int = 2048,
    block_size: int = 128,
    max_tokens: Optional[int] = None,
    model_path=None,
    description: str = "",
    progress: bool = False,
    routes: Optional[Dict[int, np.ndarray]] = None,
    batched: bool = False,
    host: Optional[bool] = None,
) -> Profile:
    """Prefill ``docs`` through ``model`` in chunks and count routed pairs per layer x expert.

    Chunks of ``chunk_size`` tokens plus a remainder per document, as mlx_lm prefills
    (``prefill_step_size``, 2048 by default); counts are recorded per ``block_size``
    tokens of each chunk with the document index (``"seq"``). With ``max_tokens``
    every document is cut proportionally so the total fits.
    ``model_path`` (a local folder) adds the weights' fingerprint to the profile.
    ``routes``, a dict, receives layer -> (T, k) expert ids of every token (a routing
    trace for ``npumoe replay``).
    ``batched`` also prefills the documents as ``batch_generate`` does (``workloads.workload_calls``
    "batch": the documents cut into prompts of 200-800 tokens, 2 or 4 per call, right-padded
    with token 0 to the longest, ``chunk_size`` tokens of each per call; each prompt prefilled
    from an empty cache) and records each such call whole (``"call": true``): its
    loads, pad tokens included, size the ladders' top tiers (3 prompts of 300-600 tokens overflowed
    a single-sequence plan by 33%).
    ``host`` (None: when MLX runs on the CPU, ``host_ffn.wanted``): the expert FFNs run on numpy's
    BLAS (``host_ffn``) and the attention's linears on onnxruntime (``dense.install``, where its
    measured cost wins), the routers stay on MLX; MLX's output up to rounding, several times faster.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk size must be >= 1, got {chunk_size}")
    if block_size < 1:
        raise ValueError(f"block size must be >= 1, got {block_size}")
    if experts.installed_blocks(model):
        raise ValueError("calibrate needs a stock model: load it without offload (offload='off')")
    blocks = experts.find_expert_blocks(model, config)
    if not blocks:
        raise ValueError(f"no MoE expert blocks in model (model_type {config.get('model_type')})")
    if not any(b.supported for b in blocks):
        raise ValueError(f"no MoE expert blocks that can be recorded: {blocks[0].reason}")
    docs_ids = encode_documents(tokenizer, docs)
    lengths = _cap([len(ids) for ids in docs_ids], max_tokens)
    if sum(lengths) == 0:
        raise ValueError("the corpus has no tokens")

    recorders: Dict[str, Recorder] = {}
    host = host_ffn.wanted() if host is None else host

    def executor_for(blk):
        on_host = host and host_ffn.supported(blk.module) is None
        recorders[blk.path] = Recorder(blk.num_experts, min(block_size, chunk_size), host=on_host)
        if routes is not None:
            recorders[blk.path].routes = []
        return recorders[blk.path]

    installed = experts.install(model, executor_for, config, quiet=True)
    try:
        if host:
            _dense_linears(model, sum(lengths) * (2 if batched else 1))  # batched: the documents again
        bar = progress_bar(total=sum(lengths), desc="calibrating", unit="tok", disable=not progress, leave=False)
        for seq, (ids, n) in enumerate(zip(docs_ids, lengths)):
            if n == 0:
                continue
            for r in recorders.values():
                r.seq = seq
            tokens = mx.array(ids[:n])
            cache = make_prompt_cache(model)
            for start in range(0, n, chunk_size):
                model(tokens[start : start + chunk_size][None], cache=cache)  # [1, L] -> logits
                mx.eval([c.state for c in cache] + [a for r in recorders.values() for p in r.pending for a in (p[1], p[4])])
                for r in recorders.values():
                    r.flush()
                bar.update(min(chunk_size, n - start))
            mx.clear_cache()
        if batched:
            kept = {path: r.routes for path, r in recorders.items()}  # a routing trace is the documents' tokens only
            for r in recorders.values():
                r.block, r.whole, r.routes = 1 << 30, True, None
            for i, call in enumerate(workload_calls(lengths, "batch", chunk_size)):
                for r in recorders.values():
                    r.seq = len(docs_ids) + i  # a sequence of its own (after the documents')
                rows = [docs_ids[d][s : s + m] for d, s, m in call]
                L = max(len(x) for x in rows)
                tokens = mx.array([x + [0] * (L - len(x)) for x in rows])  # (B, L), as _right_pad_prompts
                model(tokens, cache=make_prompt_cache(model))
                mx.eval([p[1] for r in recorders.values() for p in r.pending])
                for r in recorders.values():
                    r.flush()
                mx.clear_cache()
            for path, r in recorders.items():
                r.routes = kept[path]
        bar.close()
    finally:
        experts.remove(model)

    layers = []
    for blk in installed:
        r = recorders[blk.path]
        total = np.zeros(blk.num_experts, dtype=np.int64)
        for c in r.chunks:
            total += c["counts"]
        top_k = r.top_k or blk.top_k or 0
        layers.append(LayerCounts(blk.layer, blk.path, blk.num_experts, int(top_k), total.tolist(), r.chunks,
                                  dict(zip(RANGE_KEYS, (float(v) for v in r.max_abs)))))
        if routes is not None and r.routes:
            routes[blk.layer] = np.concatenate(r.routes)
    fingerprint = None
    if model_path is not None and Path(model_path).is_dir():
        fingerprint = model_fingerprint(model_path)
    return Profile(
        model_fingerprint=fingerprint,
        model_type=str(config.get("model_type", "")),
        corpus=description,
        tokens=sum(lengths),
        chunk_size=chunk_size,
        layers=layers,
    )


# ---------------------------------------------------------------------------
# CLI


def format_table(profile: Profile) -> str:
    rows = [("layer", "experts", "pairs", "top-10% share", "top-1 share")]
    for l in profile.layers:
        s = skew(l)
        rows.append(
            (str(l.layer), str(l.num_experts), str(s["pairs"]), f"{s['top10_share']:.3f}", f"{s['top1_share']:.3f}")
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _resolve_model_path(model: str) -> Path:
    return resolve_model(model)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="npumoe calibrate",
        description="Count tokens per MoE layer x expert on a corpus and write a profile.",
    )
    p.add_argument("--model", required=True, help="Local folder or Hugging Face repo of an mlx_lm model.")
    p.add_argument(
        "--corpus", nargs="+", action="extend", metavar="NAME_OR_FILE",
        help="Built-in corpus (long-context, qa, code) or a .txt/.jsonl file. Default: long-context.",
    )
    p.add_argument("--tokens", type=int, default=2048, help="Token budget over the corpus (default 2048).")
    p.add_argument("--chunk-size", type=int, default=2048,
                   help="Prefill chunk size: your mlx_lm prefill_step_size (default 2048, mlx_lm's).")
    p.add_argument("--seed", type=int, default=0, help="Seed of the built-in corpora.")
    p.add_argument("--out", help="Profile path (default <model>/npumoe-profile.json for a local model).")
    p.add_argument(
        "--compare-corpus", nargs="+", action="extend", metavar="NAME_OR_FILE",
        help="Also calibrate on this corpus and print the per-layer rank correlation.",
    )
    p.add_argument("--save-routes", metavar="FILE.npz",
                   help="Also write every token's experts per layer (a routing trace for `npumoe replay`).")
    p.add_argument("--trust-remote-code", action="store_true")
    add_calibrate_with_flag(p)
    args = p.parse_args(argv)
    if args.tokens < 1:
        raise ValueError(f"--tokens must be >= 1, got {args.tokens}")
    if args.chunk_size < 1:
        raise ValueError(f"--chunk-size must be >= 1, got {args.chunk_size}")

    # Check the corpora before the (slow) model load.
    docs, desc = corpus_documents(args.corpus or [], args.tokens, args.seed)
    compare = corpus_documents(args.compare_corpus, args.tokens, args.seed) if args.compare_corpus else None
    out = args.out or (
        os.path.join(args.model, "npumoe-profile.json") if os.path.isdir(args.model) else "npumoe-profile.json"
    )
    from ..outputs import check_file

    check_file(out, "--out")  # before the calibration, not after it
    if args.save_routes:
        check_file(args.save_routes, "--save-routes")


    model_path = _resolve_model_path(args.model)
    model, tokenizer, config = mlx_utils.load(
        str(model_path), return_config=True, trust_remote_code=args.trust_remote_code
    )
    kw = dict(chunk_size=args.chunk_size, max_tokens=args.tokens, model_path=model_path,
              host=CALIBRATE_WITH[args.calibrate_with])
    routes = {} if args.save_routes else None
    profile = calibrate(model, tokenizer, config, docs, description=desc, routes=routes, **kw)
    profile.save(out)
    if routes is not None:
        save_routes(args.save_routes, routes)
        print(f"routes of {profile.tokens} tokens x {len(routes)} layers written to {args.save_routes}")
    print(f"model: {args.model}  model_type: {profile.model_type}  MoE layers: {len(profile.layers)}")
    print(f"corpus: {desc}  tokens: {profile.tokens}  chunk size: {profile.chunk_size}")
    print(format_table(profile))
    print(f"profile written to {out}")

    if compare is not None:
        other = calibrate(model, tokenizer, config, compare[0], description=compare[1], **kw)
        rho = rank_correlation(profile, other)
        print(f"\nrank correlation (Spearman) of expert counts vs {compare[1]} ({other.tokens} tokens):")
        print("layer  rho")
        for layer, r in rho.items():
            print(f"{layer:>5}  {'n/a' if math.isnan(r) else f'{r:+.3f}'}")
        finite = [r for r in rho.values() if not math.isnan(r)]
        if finite:
            print(f"mean   {sum(finite) / len(finite):+.3f}")
    return 0
