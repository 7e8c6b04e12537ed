"""Issue 23: tiers that fit the workloads people run. Calls smaller than the plan was sized for
(a prompt cache's remainder) are priced on a cover near their loads and never pad badly; batched
and chat-like calls in calibration and replay; re-planning while serving."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import mlx.core as mx
import numpy as np
import pytest

import npumoe_mlx
from npumoe_mlx.backends.registry import default_cost
from npumoe_mlx.build.build import build as build_bundle
from npumoe_mlx.build.workloads import prompt_of_tokens
from npumoe_mlx.planning.cost import CostModel
from npumoe_mlx.planning.plan import GroupPlan, LayerPlan, PlanLimits, below_ladder_tiers
from npumoe_mlx.planning.tiers import small_ladders, undersized
from npumoe_mlx.runtime import release
from npumoe_mlx.runtime.experts import installed_blocks
from npumoe_mlx.tools.tiny import make_tiny_model

from conftest import EAGER



# onnx's parametric costs with the per-call cost a program call has here: 3 calls of a tiny model's
# 5-token remainder took 2.8 ms (LayerStats.program_s), not the parametric 3 x 0.05 ms
MEASURED = CostModel.from_dict({**default_cost("onnx").to_dict(), "dispatch_s": 9e-4, "source": "test: onnx, measured dispatch"})


def _cost(program_speedup: float) -> CostModel:
    """Programs ``program_speedup`` x MLX's FLOP/s, small fixed costs, one set of cores (overlap 0)."""
    return CostModel("onnx", 1e-6, 1e9 * program_speedup, 1e15, 1e-6, 1e-6, 1e9, overlap=0.0,
                     first_offload_tokens=1, source="test")


def test_small_call_is_priced_on_a_cover_near_its_loads():
    # one group of 4 experts sized for big calls (bottom tier 64); a 14-pair call
    lp = LayerPlan(0, "p", 4, 2, 64, 128, [GroupPlan([0, 1, 2, 3], [64, 128])], [], min_tokens=1)
    counts = np.array([4, 3, 4, 3])
    assert undersized(counts, [np.arange(4)], [[64, 128]])
    assert not undersized(np.array([70, 3, 4, 3]), [np.arange(4)], [[64, 128]])
    assert small_ladders([[64, 128]], [1, 2, 4, 8, 64, 256]) == [[1, 2, 4, 8, 64, 128]]
    # programs 3x MLX's speed: the bottom-tier cover (256 rows for 14 pairs, 95% padding) costs more
    # than MLX, so the call stays on MLX ...
    slow = _cost(3.0)
    d = lp.decide(slow, counts)
    assert not d.offload and d.caps == [[64]]
    # ... the decode tiers cover it at 4 rows (16 slots, 12.5% padding): programs win
    d = lp.decide(slow, counts, extra_tiers=[1, 2, 4, 8])
    assert d.offload and d.caps == [[4]]
    # priced, not a threshold: programs 100x faster make even the padded bottom tier worth it
    assert lp.decide(_cost(100.0), counts).offload
    # the onnx grid (decode tiers, multiples of 8) holds the same closest cover
    assert lp.decide(_cost(100.0), counts, extra_tiers=below_ladder_tiers(PlanLimits.for_backend("onnx"))).caps == [[4]]
    # Core ML packages run only the built ladders: no extra tiers
    assert below_ladder_tiers(PlanLimits.for_backend("coreml")) == []


def _tiny(root, cost):
    path = make_tiny_model(root / "m", "qwen3_moe", seed=1, num_experts=16, skew=1.0)
    out = build_bundle(str(path), "onnx", str(root / "b"), corpus=["qa", "code"], tokens=1024, chunk_size=512,
                       cost=cost, log=lambda m: None)
    return path, out


# kept: MLX holds every expert, the cost model decides each call; released: decode on programs
# pays (EAGER), so MLX drops the program experts and every call runs programs (small-call path)
@pytest.mark.parametrize("keep", [True, False], ids=["kept", "released"])
def test_prompt_cache_remainders_pad_at_most_half_and_tokens_match(tmp_path, keep):
    """After a 300-token prompt in the cache, a remainder of 1..15 tokens either stays on MLX (the
    cost model's call) or runs programs at <= 50% padding in every layer (before: 95% at the
    ladders' bottom tiers); a released layer runs every call on programs. Logits are stock mlx_lm's."""
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.utils import load as mlx_load

    path, out = _tiny(tmp_path, MEASURED if keep else EAGER)
    model, tok = npumoe_mlx.load(str(path), offload="onnx", bundle=str(out), quiet=True, keep_mlx_experts=keep)
    stock, _ = mlx_load(str(path))
    head = mx.array(prompt_of_tokens(tok, 300, seed=3))[None]
    ran = 0
    for n in (1, 5, 11, 15):
        caches = make_prompt_cache(model), make_prompt_cache(stock)
        mx.eval(model(head, cache=caches[0]), stock(head, cache=caches[1]))
        for m in installed_blocks(model):
            m.executor.stats.__init__(m.executor.plan.layer)
        tail = mx.array(prompt_of_tokens(tok, n, seed=4))[None]
        y, want = model(tail, cache=caches[0]), stock(tail, cache=caches[1])
        assert mx.allclose(y, want, atol=1e-4, rtol=1e-4).item()
        assert (mx.argmax(y, -1) == mx.argmax(want, -1)).all().item()
        for m in installed_blocks(model):
            st = m.executor.stats
            assert st.offloaded == (1 if release.record_of(m) is not None else st.offloaded), (n, st)
            assert st.padded <= 0.5 * st.slots, (n, st.layer, st.padded, st.slots)
            ran += st.offloaded
    assert ran > 0 or keep  # released layers run every call on programs (kept: these stay on MLX by cost)


def test_workload_calls_shapes():
    from npumoe_mlx.build.workloads import workload_calls

    with pytest.raises(ValueError, match="workload must be one of"):
        workload_calls([100], "server")
    chat = workload_calls([2048, 1000], "chat", 2048, seed=1)
    # chat: consecutive requests inside each document, 20-800 tokens (the last one may be shorter)
    for d, n in enumerate([2048, 1000]):
        segs = [c[0] for c in chat if c[0][0] == d]
        assert [s[1] for s in segs] == list(np.cumsum([0] + [s[2] for s in segs[:-1]]))
        assert sum(s[2] for s in segs) == n and all(s[2] <= 800 for s in segs)
    assert all(len(c) == 1 for c in chat)
    batch = workload_calls([2048, 2048, 2048], "batch", 2048, seed=1)
    assert {len(c) for c in batch[:-1]} == {2, 4}  # 2 or 4 prompts per call (the last: what is left)
    assert all(200 <= s[2] <= 800 for c in batch for s in c[:-1])
    assert sum(s[2] for c in batch for s in c) == 3 * 2048  # every token once
    assert workload_calls([2048], "chat", seed=3) == workload_calls([2048], "chat", seed=3)  # seeded


def test_replay_workloads_size_ladders_for_batched_calls(tmp_path):
    """A plan for single 128-token calls overflows 2-4 prompt batched calls; the batch workload's plan
    (batched calls recorded whole, as calibrate(batched=True) does) does not."""
    from npumoe_mlx.cli import replay as rp

    rng = np.random.default_rng(0)
    E, k, T = 8, 2, 4096
    p = 1.0 / np.arange(1, E + 1)
    routes = np.stack([rng.choice(E, k, replace=False, p=p / p.sum()) for _ in range(T)])
    lim = PlanLimits.for_backend("onnx")
    cost = _cost(30.0)
    single = rp.replay([{0: routes}], [{0: routes}], 64, 128, cost, lim, tokens=(128,), seq_len=2048)
    lp = single["plan"].layers[0]
    counts, n = rp.workload_counts(routes, E, "batch", 2048, 128)
    assert n.max() > 128 and counts.sum() == T * k
    t = rp.replay_calls(lp, cost, counts, n)
    assert t.overflow > 0.05 * t.pairs  # the single-call plan: batched loads pass its top tiers
    out = rp.replay([{0: routes}], [{0: routes}], 64, 128, cost, lim, tokens=(128,), seq_len=2048, workload="batch")
    s = out["summary"]["0"]
    assert s["overflow_pct"] <= 2.0 and s["padding_pct"] <= 25.0, s
    assert max(g.tiers[-1] for g in out["plan"].layers[0].groups) >= 2 * 128
    chat = rp.replay([{0: routes}], [{0: routes}], 64, 128, cost, lim, tokens=(128,), seq_len=2048, workload="chat")
    assert chat["summary"]["0"]["overflow_pct"] <= 2.0 and chat["summary"]["0"]["padding_pct"] <= 25.0
    with pytest.raises(ValueError, match="--workload must be one of"):
        rp.replay([{0: routes}], [{0: routes}], 64, 128, cost, lim, workload="server")


def test_calibration_records_batched_calls_whole_and_plans_cover_them(tight_skewed):
    from mlx_lm.utils import load as mlx_load

    from npumoe_mlx.build.calibrate import calibrate
    from npumoe_mlx.runtime.experts import find_expert_blocks
    from npumoe_mlx.planning.plan import make_plan, prefill_call_sizes
    from npumoe_mlx.build.workloads import GENERATION_SIZES, corpus_documents

    path = tight_skewed[0]  # the model only (read, never changed)
    model, tok, config = mlx_load(str(path), return_config=True)
    docs, _ = corpus_documents(["qa", "code"], 1200, 0)
    prof = calibrate(model, tok, config, docs, chunk_size=512, max_tokens=1200, batched=True)
    plain = calibrate(model, tok, config, docs, chunk_size=512, max_tokens=1200)
    lay, lay0 = prof.layers[0], plain.layers[0]
    whole = [c for c in lay.chunks if c.get("call")]
    assert whole and not any(c.get("call") for c in lay0.chunks)
    assert [c for c in lay.chunks if not c.get("call")] == lay0.chunks  # the prefill record is unchanged
    assert lay.counts == (np.sum([c["counts"] for c in lay.chunks], 0)).tolist()  # popularity: all calls
    assert max(c["tokens"] for c in whole) > 512  # B prompts in one call: more tokens than a chunk
    assert all(sum(c["counts"]) == c["tokens"] * lay.top_k for c in whole)
    assert {128, 256} == {n for n in GENERATION_SIZES if n < 512 and n % 128 == 0}
    assert {128, 256, 512} <= set(prefill_call_sizes(lay, 512))  # chat sizes in whole 128-token blocks
    blocks = {b.layer: b for b in find_expert_blocks(model, config)}
    plan = make_plan(prof, blocks, EAGER, PlanLimits.for_backend("onnx"))
    for lp, lc in zip(plan.layers, prof.layers):
        for c in (c for c in lc.chunks if c.get("call")):  # no recorded batched call overflows its plan
            cnt = np.asarray(c["counts"])
            assert all(cnt[g.experts].max() <= g.tiers[-1] for g in lp.groups)


def test_batch_generate_of_four_prompts_overflows_at_most_two_percent(tight_skewed, tmp_path):
    """The default build (2048 calibration tokens, 2048-token chunks, batched calls recorded) holds
    batch_generate's one call of 4 right-padded prompts of 200-800 tokens under its top tiers."""
    from mlx_lm import batch_generate

    from npumoe_mlx.runtime.executor import offload_stats, summarize

    path = tight_skewed[0]  # the model only (its default bundle goes to this test's folder)
    out = build_bundle(str(path), "onnx", str(tmp_path / "b"), cost=EAGER, log=lambda m: None)
    model, tok = npumoe_mlx.load(str(path), offload="onnx", bundle=str(out), quiet=True)
    rng = np.random.default_rng(1)
    prompts = [prompt_of_tokens(tok, int(n), seed=i) for i, n in enumerate(rng.integers(200, 801, 4))]
    batch_generate(model, tok, prompts, max_tokens=2)
    s = summarize(offload_stats(model))
    assert s["offloaded_calls"] > 0 and s["overflow_pct"] <= 2.0, s


def test_replan_while_serving_swaps_ladders_between_calls_and_persists(tight_copy):
    """A plan made for 16-token calls meets 300-token calls: after MIN_CALLS the observed overflow
    passes the prediction, ``auto`` re-plans the ladders (same groups, same programs) from the
    served calls, the next call runs on them with stock logits and no overflow, and
    ``replan.json`` (written atomically) is applied by the next load."""
    from mlx_lm.utils import load as mlx_load

    from npumoe_mlx.runtime import replan

    path, out = tight_copy()  # replan.json is written into the bundle: this test's own copy
    model, tok = npumoe_mlx.load(str(path), offload="onnx", bundle=str(out), quiet=True)
    stock, _ = mlx_load(str(path))
    logs = []
    with pytest.raises(ValueError, match="--replan must be one of"):
        replan.Replanner(model, "sometimes")
    r = replan.attach(model, "auto", out, log=logs.append)
    assert r.generation == 0 and all(l["predicted_overflow_pct"] is not None for l in r.to_dict()["layers"])
    groups_before = [[g.experts for g in ex.plan.groups] for ex in r.execs]
    prompts = [mx.array(prompt_of_tokens(tok, 300, seed=s))[None] for s in range(replan.MIN_CALLS)]
    for ids in prompts[:-1]:
        mx.eval(model(ids))
        r.check(wait=True)
    assert r.generation == 0  # fewer than MIN_CALLS calls: no drift counted yet
    mx.eval(model(prompts[-1]))
    pre = r.to_dict()
    assert all(l["overflow_pct"] > l["predicted_overflow_pct"] + replan.OVERFLOW_MARGIN for l in pre["layers"])
    r.check(wait=True)
    d = r.to_dict()
    assert d["generation"] == 1 and d["last_replan"] is not None and "re-planned" in logs[-1]
    assert all(l["offloaded_calls"] == 0 for l in d["layers"])  # drift counts the calls since the swap
    assert all(ex.pending_tiers is not None for ex in r.execs)
    for ex in r.execs:
        ex.stats.__init__(ex.plan.layer)
    ids = mx.array(prompt_of_tokens(tok, 300, seed=99))[None]
    y = model(ids)
    assert mx.allclose(y, stock(ids), atol=1e-4, rtol=1e-4).item()
    for ex, before in zip(r.execs, groups_before):
        assert ex.pending_tiers is None and [g.experts for g in ex.plan.groups] == before  # same programs
        assert len(ex.plan.groups[0].tiers) >= 1 and ex.stats.offloaded == 1 and ex.stats.overflow == 0
    saved = replan.load_replan(out)
    assert saved["generation"] == 1 and set(saved["layers"]) == {str(ex.plan.layer) for ex in r.execs}
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp")]
    again, _ = npumoe_mlx.load(str(path), offload="onnx", bundle=str(out), quiet=True)
    r2 = replan.attach(again, "notify", out, log=logs.append)
    assert r2.generation == 1
    mx.eval(again(ids))
    assert [[g.tiers for g in ex.plan.groups] for ex in r2.execs] == [[g.tiers for g in ex.plan.groups] for ex in r.execs]
    assert all(ex.stats.overflow == 0 for ex in r2.execs)
    assert replan.attach(again, "off", out) is None


def _tight(tmp_path):
    """A tiny model and a bundle sized for 16-token calls (one 16-row tier per group)."""
    from npumoe_mlx.planning import plan as plans

    path = make_tiny_model(tmp_path / "m", "qwen3_moe", skew=2.0, seed=1, num_experts=16)
    tight = plans.PlanLimits.for_backend("onnx", max_tiers=1)
    tight.capacities = [16]
    out = build_bundle(str(path), "onnx", str(tmp_path / "b"), corpus=["qa"], tokens=256, chunk_size=128,
                       cost=EAGER, limits=tight, log=lambda m: None)
    return path, out


def test_replan_regroups_experts_into_new_programs_and_a_restart_uses_them(tmp_path):
    """Uneven loads inside a group pad whatever its ladder: with the model's files to read released
    experts from, ``auto`` re-plans the groups themselves (make_plan on the served calls, within the
    program budget), builds and checks their programs in the background, swaps the layer's executor,
    and the new groups pad less on the next calls with stock logits. ``replan.json`` names the new
    programs (in ``replan/gNNN``, written whole) and the next load of the bundle runs on them."""
    from mlx_lm.utils import load as mlx_load

    from npumoe_mlx.runtime import replan
    from npumoe_mlx.planning.plan import Plan

    path, out = _tight(tmp_path)
    model, tok = npumoe_mlx.load(str(path), offload="onnx", bundle=str(out), quiet=True)
    stock, _ = mlx_load(str(path))
    logs = []
    r = replan.attach(model, "auto", out, log=logs.append, model_path=path)
    before = {ex.plan.layer: [list(g.experts) for g in ex.plan.groups] for ex in r.execs}
    olds = list(r.execs)
    rng = np.random.default_rng(5)
    for i, n in enumerate(rng.integers(100, 600, replan.MIN_CALLS)):
        mx.eval(model(mx.array(prompt_of_tokens(tok, int(n), seed=i))[None]))
    pre = {ex.plan.layer: (ex.stats.padded, ex.stats.slots) for ex in r.execs}
    r.check(wait=True)
    d = r.to_dict()
    assert d["generation"] == 1 and d["regrouped_layers"], (d, logs)
    for l in d["regrouped_layers"]:
        ex = next(e for e in r.execs if e.plan.layer == l)
        assert [list(g.experts) for g in ex.plan.groups] != before[l]  # new groups ...
        assert ex not in olds and any(m.executor is ex for m in installed_blocks(model))  # ... on a new executor
        assert all(p.program.meta["expert_ids"] == g.experts for p, g in zip(ex.programs, ex.plan.groups))
    budget = Plan.load(out / "plan.json").limits.max_programs
    assert sum(len(ex.plan.groups) for ex in r.execs) <= budget
    for i in range(4):  # the next calls: stock logits, less padding than the plan in place had
        ids = mx.array(prompt_of_tokens(tok, 300 + 50 * i, seed=50 + i))[None]
        assert mx.allclose(model(ids), stock(ids), atol=1e-4, rtol=1e-4).item()
    for ex in r.execs:
        if ex.plan.layer in d["regrouped_layers"]:
            p0, s0 = pre[ex.plan.layer]
            base = r.base[ex.plan.layer]
            after = (ex.stats.padded - base["padded"]) / max(ex.stats.slots - base["slots"], 1)
            assert ex.stats.slots > base["slots"] and after < p0 / s0 and after <= 0.25, (after, p0 / s0)
            assert ex.stats.overflow - base["overflow"] == 0
    saved = replan.load_replan(out)
    assert saved["generation"] == 1 and saved["plan_sha256"]
    for l in d["regrouped_layers"]:
        progs = saved["layers"][str(l)]["programs"]
        assert progs and all((out / p["dir"]).is_dir() and all((out / f).is_file() for f in p["files"]) for p in progs)
    assert not [p for p in out.rglob(".tmp*")] and not [p for p in out.rglob(".old*")]
    groups_now = {ex.plan.layer: [list(g.experts) for g in ex.plan.groups] for ex in r.execs}
    # a restart: the same bundle, the re-planned groups on the saved programs, stock logits, no new build
    again, _ = npumoe_mlx.load(str(path), offload="onnx", bundle=str(out), quiet=True)
    r2 = replan.attach(again, "notify", out, log=logs.append, model_path=path)
    assert r2.generation == 1
    assert {ex.plan.layer: [list(g.experts) for g in ex.plan.groups] for ex in r2.execs} == groups_now
    ids = mx.array(prompt_of_tokens(tok, 400, seed=77))[None]
    assert mx.allclose(again(ids), stock(ids), atol=1e-4, rtol=1e-4).item()
    assert all(ex.stats.offloaded == 1 and not ex.stats.fallback for ex in r2.execs)
    # a re-planned program changed on disk after it was saved: refused before its first call (the
    # layer falls back to MLX with stock logits), never run
    f = out / next(iter(saved["layers"][str(d["regrouped_layers"][0])]["programs"][0]["files"]))
    f.write_bytes(f.read_bytes()[:-64] + bytes(64))
    bad, _ = npumoe_mlx.load(str(path), offload="onnx", bundle=str(out), quiet=True)
    rb = replan.attach(bad, "notify", out, log=logs.append, model_path=path)
    assert mx.allclose(bad(ids), stock(ids), atol=1e-4, rtol=1e-4).item()
    lost = next(ex for ex in rb.execs if ex.plan.layer == d["regrouped_layers"][0])
    refused = "cannot be used" in logs[-1] and [list(g.experts) for g in lost.plan.groups] == before[lost.plan.layer]
    assert refused or lost.stats.fallback, (logs[-1], lost.stats)  # refused at load, or before its first call
    # a rebuilt bundle (another plan.json) does not take an earlier build's re-plan
    man = __import__("json").loads((out / "manifest.json").read_text())
    saved["plan_sha256"] = "0" * 64
    from npumoe_mlx.atomic import write_json

    write_json(out / replan.REPLAN_FILE, saved)
    third, _ = npumoe_mlx.load(str(path), offload="onnx", bundle=str(out), quiet=True)
    r3 = replan.attach(third, "notify", out, log=logs.append, model_path=path)
    assert {ex.plan.layer: [list(g.experts) for g in ex.plan.groups] for ex in r3.execs} == before
    assert "earlier build" in logs[-1] and man["meta"]["plan.json"]["sha256"] != saved["plan_sha256"]



def test_replan_keeps_its_groups_when_new_programs_would_pass_the_memory_budget(tmp_path):
    """New groups' programs load beside the old ones until the swap: a re-plan whose new programs
    would take the process past its memory budget keeps the groups it has (new ladders at most),
    says so in one line, and the model still gives stock logits."""
    from mlx_lm.utils import load as mlx_load

    from npumoe_mlx.planning.residency import model_resident
    from npumoe_mlx.runtime import replan

    path, out = _tight(tmp_path)
    model, tok = npumoe_mlx.load(str(path), offload="onnx", bundle=str(out), quiet=True)
    logs = []
    r = replan.attach(model, "auto", out, log=logs.append, model_path=path)
    now = model_resident(model)
    r.memory_budget = now["mlx"] + sum(u["on_programs"] for u in now["units"].values()) + 1024  # 1 KB to spare
    before = {ex.plan.layer: [list(g.experts) for g in ex.plan.groups] for ex in r.execs}
    rng = np.random.default_rng(5)  # the traffic that regroups in the test above
    for i, n in enumerate(rng.integers(100, 600, replan.MIN_CALLS)):
        mx.eval(model(mx.array(prompt_of_tokens(tok, int(n), seed=i))[None]))
    r.check(wait=True)
    assert r.to_dict()["regrouped_layers"] == [], logs
    assert {ex.plan.layer: [list(g.experts) for g in ex.plan.groups] for ex in r.execs} == before
    said = [m for m in logs if "over the memory budget" in m]
    assert said and all(m.startswith("re-plan: new groups for layer ") and m.endswith("new ladders only") for m in said)
    assert "(0.00 MB left)" in said[0], said[0]
    stock, _ = mlx_load(str(path))
    ids = mx.array(prompt_of_tokens(tok, 300, seed=50))[None]
    assert mx.allclose(model(ids), stock(ids), atol=1e-4, rtol=1e-4).item()


def test_replan_swap_never_lands_inside_a_call_and_never_blocks_one(tmp_path, monkeypatch):
    """The re-plan builds in a background thread while calls keep running on the plan in place (a
    build held back does not hold them); a swap that lands while a call is in flight (here: from
    inside a program run of that call) leaves that call on the executor it started with, and the
    next call starts on the new one. Logits are stock's throughout. A build that fails leaves no
    partial folder and no replan.json entry naming missing programs."""
    import threading

    from mlx_lm.utils import load as mlx_load

    from npumoe_mlx.runtime import replan
    from npumoe_mlx.backends import backend_class

    path, out = _tight(tmp_path)
    model, tok = npumoe_mlx.load(str(path), offload="onnx", bundle=str(out), quiet=True)
    stock, _ = mlx_load(str(path))
    r = replan.attach(model, "auto", out, log=lambda m: None, model_path=path)
    for i in range(replan.MIN_CALLS):
        mx.eval(model(mx.array(prompt_of_tokens(tok, 200 + 20 * i, seed=i))[None]))
    assert r.drifted()
    # 1. a build that fails half-way: nothing half-written, the groups stay (ladders only)
    compiler = backend_class("onnx")
    real_build, n_built = compiler.build, [0]

    def failing(spec, where, **kw):
        n_built[0] += 1
        if n_built[0] == 2:
            raise OSError("disk full")
        return real_build(spec, where, **kw)

    monkeypatch.setattr(compiler, "build", staticmethod(failing))
    groups0 = {ex.plan.layer: [list(g.experts) for g in ex.plan.groups] for ex in r.execs}
    r.replan(list(r.execs))
    assert not (out / replan.REPLAN_DIR).exists() or not list((out / replan.REPLAN_DIR).iterdir())
    assert not [p for p in out.rglob(".tmp*")]
    saved = replan.load_replan(out)
    assert not any(v.get("programs") for v in saved["layers"].values())
    assert {ex.plan.layer: [list(g.experts) for g in ex.plan.groups] for ex in r.execs} == groups0
    # 2. a build held back: calls run meanwhile on the executors in place
    gate, started = threading.Event(), threading.Event()

    def held(spec, where, **kw):
        started.set()
        assert gate.wait(120)
        return real_build(spec, where, **kw)

    monkeypatch.setattr(compiler, "build", staticmethod(held))
    execs0 = list(r.execs)
    t = threading.Thread(target=r.replan, args=(list(r.execs),), daemon=True)
    t.start()
    assert started.wait(120)
    ids = mx.array(prompt_of_tokens(tok, 333, seed=91))[None]
    calls0 = [ex.stats.offloaded for ex in execs0]
    assert mx.allclose(model(ids), stock(ids), atol=1e-4, rtol=1e-4).item()  # not blocked by the build
    assert [m.executor for m in installed_blocks(model)] == execs0
    assert [ex.stats.offloaded for ex in execs0] == [c + 1 for c in calls0]
    # 3. the swap lands inside a call: release the build from the first program run of the next call
    seen = []
    first = execs0[0]
    real_run = first._run_programs

    def run_and_swap(c):
        if not seen:
            gate.set()
            t.join(120)  # the swap is done while this call is in flight
            seen.append([m.executor for m in installed_blocks(model)])
        return real_run(c)

    first._run_programs = run_and_swap
    ids = mx.array(prompt_of_tokens(tok, 444, seed=92))[None]
    y = model(ids)
    assert seen and not t.is_alive() and r.regrouped
    assert seen[0][0] is not first  # the block's executor changed while layer 0's call ran ...
    assert mx.allclose(y, stock(ids), atol=1e-4, rtol=1e-4).item()  # ... which finished on the old one
    news = [m.executor for m in installed_blocks(model)]
    n_new = [len(e.loads) for e in news]
    ids = mx.array(prompt_of_tokens(tok, 222, seed=93))[None]
    assert mx.allclose(model(ids), stock(ids), atol=1e-4, rtol=1e-4).item()  # the next call: the new executors
    assert all(e.programs is not o.programs for e, o in zip(news, execs0) if e is not o)
    assert [m.executor for m in installed_blocks(model)] == news and [len(e.loads) for e in news] == [n + 1 for n in n_new]


def _overflow(st: dict) -> tuple:
    """(pairs past top tiers, pairs) so far, over the routed layers of a /v1/npumoe/stats answer."""
    routed = [l for l in st["layers"] if l["kind"] == "routed"]
    return sum(l["overflow"] for l in routed), sum(l["synced_pairs"] for l in routed)


def test_server_chat_traffic_replans_once_with_stock_tokens(tight_copy, tmp_path):
    """`npumoe server --replan auto` (127.0.0.1) under 40 chat requests of 20-800 tokens from the
    openai client, on a plan made for 16-token calls: the overflow drifts past the prediction, one
    re-plan (new groups on new programs) runs in the background while requests keep coming, and the
    text equals `mlx_lm.server`'s at temperature 0 on every request, before, during and after the
    swap; after it, overflow <= 2% and padding <= 25%.
    /v1/npumoe/stats shows the generation, the last re-plan time, predicted vs observed figures."""
    import sys

    from test_server import Server

    from npumoe_mlx.runtime import replan
    from npumoe_mlx.build.workloads import long_context

    path, out = tight_copy("npumoe-onnx")  # the server re-plans into it: this test's own copy
    (tmp_path / "hub").mkdir()
    ours = Server([sys.executable, "-m", "npumoe_mlx.cli.server", "--model", str(path), "--offload", "onnx",
                   "--replan", "auto"], tmp_path / "ours.log", env={"HF_HUB_CACHE": str(tmp_path / "no-cache")})
    stock = Server([sys.executable, "-m", "mlx_lm", "server", "--model", str(path)], tmp_path / "stock.log",
                   env={"HF_HUB_CACHE": str(tmp_path / "hub")})
    try:
        ours.wait_ready(), stock.wait_ready()
        rng = np.random.default_rng(23)
        sizes = np.exp(rng.uniform(np.log(20), np.log(800), 40)).astype(int)
        at_swap, gens = None, []
        for i, n in enumerate(sizes):
            msg = [{"role": "user", "content": long_context(int(n), seed=i)[: int(n) * 4]}]
            got, want = ([ch.message.content for ch in s.client().chat.completions.create(
                model="default_model", messages=msg, max_tokens=3, temperature=0.0).choices] for s in (ours, stock))
            assert got == want, (i, n)
            _, st = ours.get("/v1/npumoe/stats")
            gens.append(st["replan"]["generation"])
            if at_swap is None and gens[-1] == 1:
                at_swap = _overflow(st)
                at_pad = [sum(l[f] for l in st["layers"] if l["kind"] == "routed") for f in ("slots", "padded")]
        r = st["replan"]
        assert r["mode"] == "auto" and max(gens) == 1 and r["last_replan"] is not None, (gens, r["layers"])  # one re-plan
        assert at_swap is not None and gens.index(1) < len(gens) - 5  # requests kept coming after it
        assert all("predicted_padding_pct" in l and "padding_pct" in l for l in r["layers"])
        assert at_swap[0] > 0.05 * at_swap[1]  # the tight plan overflowed before the swap ...
        over, pairs = (a - b for a, b in zip(_overflow(st), at_swap))
        assert pairs > 0 and over <= 0.02 * pairs, (over, pairs)  # ... and after it, at most 2%
    finally:
        ours.stop()
        stock.stop()
    saved = replan.load_replan(out)
    assert saved["generation"] == 1 and "re-planned layers" in (tmp_path / "ours.log").read_text()
    # uneven loads inside the tight plan's groups: the re-plan regrouped them onto new programs ...
    assert r["regrouped_layers"] and all(saved["layers"][str(l)]["programs"] for l in r["regrouped_layers"])
    slots, padded = (sum(l[f] for l in st["layers"] if l["kind"] == "routed") - at for f, at in
                     zip(("slots", "padded"), at_pad))
    assert slots > 0 and padded <= 0.25 * slots, (padded, slots)  # ... which pad <= 25% after the swap
