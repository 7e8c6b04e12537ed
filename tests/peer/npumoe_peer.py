"""pytest plugin: mlx-lm's own model tests with the offload installed on every model they build.

Loaded with ``-p npumoe_peer`` by ``run_mlx_lm_models.py`` (never by the default test
run). Every ``mlx_lm.models.<family>.Model`` gets its supported expert blocks (and
SwiGLU shared experts) offloaded right after construction, as ``npumoe_mlx.load``
would: ``NPUMOE_PEER_MODE=onnx`` builds real onnx programs from the model's weights in
memory (contiguous groups of 8 experts, tiers 4/16/64, every call offloaded),
``mlx`` installs the static-tier reference executor, ``stock`` installs nothing.
``NPUMOE_PEER_HALF_CHECK=off`` disables the CPU half-precision message (to see what
else the tests exercise). Outcomes and offload counters go to ``NPUMOE_PEER_OUT``.
"""

import importlib
import json
import os
import pkgutil

import mlx_lm.models

from npumoe_mlx.backends import load_backend
from npumoe_mlx.build.build import offloadable_shared
from npumoe_mlx.build.programs import spec_from_dense_mlp, spec_from_switch_glu
from npumoe_mlx.planning.cost import CostModel
from npumoe_mlx.planning.plan import GroupPlan, LayerPlan, SharedPlan
from npumoe_mlx.runtime import experts, guard
from npumoe_mlx.runtime.executor import OffloadExecutor, SharedExecutor
from npumoe_mlx.runtime.reference import StaticTierReference, contiguous_groups

MODE = os.environ.get("NPUMOE_PEER_MODE", "onnx")
TIERS = (4, 16, 64)
EAGER = CostModel("onnx", 1e-9, 1e15, 1e15, 0.0, 1.0, 1.0, first_offload_tokens=1, source="peer: offload everything")
COUNTS = {"models": 0, "blocks": 0, "shared": 0, "skipped_blocks": 0, "notices": 0, "faults": []}
EXECUTORS = []
OUTCOMES = {}
_depth = 0


class _CountingNotice(guard.Notice):
    def show(self, where):
        if not self.shown:
            COUNTS["notices"] += 1
        super().show(where)


def _fault(msg):
    COUNTS["faults"].append(msg)


def _routed_executor(be, blk):
    groups = [GroupPlan(list(g), list(TIERS)) for g in contiguous_groups(blk.num_experts, 8)]
    try:
        programs = [
            be.load(spec_from_switch_glu(blk.module, layer=blk.layer, expert_ids=g.experts, tiers=g.tiers))
            for g in groups
        ]
    except ValueError:  # a weight format programs do not take (e.g. a global scale): stays on MLX
        COUNTS["skipped_blocks"] += 1
        return None
    lp = LayerPlan(blk.layer, blk.path, blk.num_experts, blk.top_k or 1, blk.dims, blk.hidden, groups, min_tokens=0)
    ex = OffloadExecutor(lp, programs, EAGER, warn=_fault)
    EXECUTORS.append(ex)
    COUNTS["blocks"] += 1
    return ex


def offload(model):
    """Install the offload on a freshly built model, the way ``npumoe_mlx.load`` does."""
    COUNTS["models"] += 1
    if MODE == "mlx":
        COUNTS["blocks"] += len(experts.install(model, lambda blk: StaticTierReference(), quiet=True))
        return
    be = load_backend("onnx", threads=1)
    notice = _CountingNotice("npumoe build --model PEER --force")
    blocks = experts.install(model, lambda blk: _routed_executor(be, blk), quiet=True, notice=notice)
    mods = dict(model.named_modules())
    for blk in blocks:
        for s in blk.shared:
            mlp = mods.get(s.path)
            if not offloadable_shared(mlp, s):
                continue
            try:
                prog = be.load(spec_from_dense_mlp(mlp, layer=blk.layer, tiers=TIERS))
            except ValueError:
                continue
            ex = SharedExecutor(blk.layer, SharedPlan(s.path, s.hidden, list(TIERS), min_tokens=0), prog, warn=_fault)
            EXECUTORS.append(ex)
            experts.install_dense(mlp, ex, f"layer {blk.layer} shared expert", notice)
            COUNTS["shared"] += 1


def _wrap(cls):
    init = cls.__init__
    if getattr(init, "_npumoe_peer", False):
        return

    def __init__(self, *args, **kwargs):
        global _depth
        _depth += 1
        try:
            init(self, *args, **kwargs)
        finally:
            _depth -= 1
        if _depth == 0:
            offload(self)

    __init__._npumoe_peer = True
    cls.__init__ = __init__


def _patch_families():
    for info in pkgutil.iter_modules(mlx_lm.models.__path__):
        try:
            mod = importlib.import_module(f"mlx_lm.models.{info.name}")
        except (Exception, SystemExit):  # optional dependencies of a family (olmo exits)
            continue
        cls = getattr(mod, "Model", None)
        if isinstance(cls, type):
            _wrap(cls)


if MODE != "stock":
    _patch_families()
if os.environ.get("NPUMOE_PEER_HALF_CHECK", "on") == "off":
    guard.cpu_half_error = lambda block, linears: None


def pytest_runtest_logreport(report):
    if report.when == "call" or report.outcome != "passed":
        prev = OUTCOMES.get(report.nodeid, {}).get("outcome")
        if prev in ("failed", "error"):
            return
        msg = ""
        if report.outcome == "failed":
            text = str(report.longrepr)
            lines = [l for l in text.splitlines() if l.startswith("E ")]
            msg = lines[-1][1:].strip() if lines else text.strip().splitlines()[-1]
        OUTCOMES[report.nodeid] = {"outcome": report.outcome if report.when == "call" else f"{report.outcome}:{report.when}",
                                   "message": msg}


def pytest_sessionfinish(session, exitstatus):
    out = os.environ.get("NPUMOE_PEER_OUT")
    if not out:
        return
    stats = [e.stats for e in EXECUTORS]
    counts = dict(COUNTS)
    counts["offloaded_calls"] = sum(s.offloaded for s in stats)
    counts["program_calls"] = sum(s.program_calls for s in stats)
    counts["layer_calls"] = sum(s.calls for s in stats)
    counts["executors_that_ran_programs"] = sum(1 for s in stats if s.offloaded)
    with open(out, "w") as f:
        json.dump({"mode": MODE, "half_check": os.environ.get("NPUMOE_PEER_HALF_CHECK", "on"),
                   "counts": counts, "outcomes": OUTCOMES}, f, indent=1)
