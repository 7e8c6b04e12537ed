"""Re-planning while serving: a loaded model's ladders re-sized from its own traffic.

A plan is sized for its calibration; a server meets other calls (chat requests of every size,
batched prefill). Every offloaded layer already keeps its last calls' per-expert loads
(``OffloadExecutor.loads``, what ``--stats FILE`` saves for ``--from-stats``). ``Replanner``
compares the padding and overflow those calls saw with what the plan predicts on its own
calibration and, once they drift past it, re-sizes each group's ladder from the observed loads
with the planner's own rule (``tiers.choose_ladder``, ``plan._spread``): same groups, same
programs, same tier count, so the program budget holds. ``notify`` only says so; ``auto`` stages
the new ladders, which each executor takes at the start of its next call (never inside one: a call
runs on one ladder) when its programs can serve them (a dynamic onnx session takes any row count,
``add_tiers``; a static program only the tiers it was built with). The re-planned ladders go to
``<bundle>/replan.json`` (temp + rename), which ``attach`` applies on the next load.
"""

import json
import threading
import time
from pathlib import Path
from typing import List, Optional

import numpy as np

from .atomic import write_json
from .experts import installed_blocks
from .executor import OffloadExecutor
from .plan import _spread
from .tiers import choose_ladder, ladder_rounds
from .log import get as _get_log
from .stats import pct

_log = _get_log(__name__)

REPLAN_MODES = ("off", "notify", "auto")
REPLAN_FILE = "replan.json"
MIN_CALLS = 16  # offloaded calls a layer must see before its drift counts
PAD_MARGIN = 10.0  # points of padding over the plan's prediction that count as drift
OVERFLOW_MARGIN = 2.0  # points of overflow over the prediction that count as drift
PREFILL_STEP = 2048  # mlx_lm.server's prefill_step_size: its largest single-sequence call


def ladder_tally(loads: List[tuple], groups, ladders) -> tuple:
    """(padding %, overflow %) of calls ``loads`` [(tokens, k, counts (E,))] covered by ``ladders``
    (every round of the ladder rule, as ``overflow=rerun`` runs them)."""
    slots = padded = over = pairs = 0
    for _, _, c in loads:
        for ids, lad in zip(groups, ladders):
            load = c[ids]
            if not load.any():
                continue
            rows = sum(ladder_rounds(load, lad))
            slots += len(ids) * rows
            padded += len(ids) * rows - int(load.sum())
            over += int(np.maximum(load - lad[-1], 0).sum())
        pairs += int(c.sum())
    return pct(padded, slots), pct(over, pairs)


def new_ladders(ex: OffloadExecutor, capacities: List[int], max_tiers: int, loads=None,
                step: int = PREFILL_STEP) -> List[List[int]]:
    """Each group's ladder re-sized for the executor's recorded calls (at most ``max_tiers``, or
    the old count). The top tier is headroom as the planner's is: the largest call the server
    makes (its prefill step), so no single-sequence call overflows, whatever its size."""
    out = []
    for ids, old, p in zip(ex._groups, ex._tiers, ex.programs):
        caps = capacities if p.dynamic else sorted(set(p.tiers))
        peaks = np.asarray([c[ids].max() for _, _, c in (ex.loads if loads is None else loads)], float)
        peaks = peaks[peaks > 0]
        if peaks.size == 0:
            out.append(list(old))
            continue
        top = min(max(int(peaks.max()), int(old[-1]), step), max(caps))
        out.append(choose_ladder(_spread(peaks, top), caps, max(max_tiers, len(old)), top=top))
    return out


class Replanner:
    """Watches a loaded model's offloaded layers; re-plans their ladders when traffic drifts."""

    def __init__(self, model, mode: str = "notify", bundle: Optional[Path] = None, log=None,
                 capacities: Optional[List[int]] = None, max_tiers: int = 12):
        if mode not in REPLAN_MODES:
            raise ValueError(f"--replan must be one of {', '.join(REPLAN_MODES)}, got {mode!r}")
        self.mode, self.bundle, self.log = mode, Path(bundle) if bundle else None, log or _log.info
        self.execs = [m.executor for m in installed_blocks(model) if isinstance(m.executor, OffloadExecutor)]
        self.capacities = capacities or list(range(8, 4096 + 1, 8))
        self.max_tiers = max_tiers
        self.generation, self.last_replan, self.predicted = 0, None, {}
        self._lock, self._thread, self.notified = threading.Lock(), None, False
        self.base = {}  # layer -> its stats when its ladders last changed (drift counts calls since)
        for ex in self.execs:  # the plan's own prediction: its ladders on the calls it has seen so far
            self.predicted[ex.plan.layer] = None

    FIELDS = ("slots", "padded", "overflow", "synced_pairs", "offloaded")

    def _observed(self, ex) -> dict:
        """Padding and overflow of the calls since the current ladders went in (or since load)."""
        base = self.base.get(ex.plan.layer, {})
        d = {f: getattr(ex.stats, f) - base.get(f, 0) for f in self.FIELDS}
        return {"padding_pct": pct(d["padded"], d["slots"]),
                "overflow_pct": pct(d["overflow"], d["synced_pairs"]), "offloaded_calls": d["offloaded"]}

    def drifted(self) -> List[OffloadExecutor]:
        """Layers whose observed padding or overflow passed the prediction by the margins."""
        out = []
        for ex in self.execs:
            o, p = self._observed(ex), self.predicted.get(ex.plan.layer)
            if o["offloaded_calls"] < MIN_CALLS:
                continue
            pad, over = p if p is not None else (0.0, 0.0)
            if o["padding_pct"] > pad + PAD_MARGIN or o["overflow_pct"] > over + OVERFLOW_MARGIN:
                out.append(ex)
        return out

    def set_prediction(self, profile_loads: dict) -> None:
        """layer -> [(tokens, k, counts)] of the calibration: the plan's predicted (padding, overflow)."""
        for ex in self.execs:
            loads = profile_loads.get(ex.plan.layer)
            if loads:
                self.predicted[ex.plan.layer] = ladder_tally(loads, ex._groups, ex._tiers)

    def check(self, wait: bool = False) -> None:
        """After a request: on drift, notify, or re-plan in a background thread (``wait``: join it)."""
        if self.mode == "off" or (self._thread is not None and self._thread.is_alive()):
            return
        drift = self.drifted()
        if not drift:
            return
        if self.mode == "notify":
            if not self.notified:
                self.notified = True
                self.log(f"layers {[ex.plan.layer for ex in drift]}: traffic pads or overflows past the "
                         f"plan's prediction; `--replan auto` re-plans the ladders from it while serving")
            return
        self._thread = threading.Thread(target=self.replan, args=(drift,), daemon=True)
        self._thread.start()
        if wait:
            self._thread.join()

    def replan(self, execs: List[OffloadExecutor]) -> dict:
        """New ladders for ``execs`` from their recorded calls, staged for their next call; written
        to ``<bundle>/replan.json``. Returns layer -> ladders."""
        new = {}
        for ex in execs:
            loads = list(ex.loads)  # a snapshot: the serving thread keeps appending
            lads = new_ladders(ex, self.capacities, self.max_tiers, loads)
            before = ladder_tally(loads, ex._groups, ex._tiers)
            after = ladder_tally(loads, ex._groups, lads)
            if after[0] + after[1] < before[0] + before[1]:  # only where the observed calls gain
                new[ex.plan.layer] = lads
                self.predicted[ex.plan.layer] = after
        with self._lock:
            if not new:
                return new
            for ex in execs:
                if ex.plan.layer in new:
                    stage(ex, new[ex.plan.layer])
                    self.base[ex.plan.layer] = {f: getattr(ex.stats, f) for f in self.FIELDS}
            self.generation += 1
            self.last_replan = time.time()
            if self.bundle is not None:
                saved = load_replan(self.bundle) or {"layers": {}}
                saved["layers"].update({str(l): lads for l, lads in new.items()})
                saved["generation"] = saved.get("generation", 0) + 1
                write_json(self.bundle / REPLAN_FILE, saved)
        self.log(f"re-planned the ladders of layers {sorted(new)} from {len(loads)} served calls "
                 f"(generation {self.generation})")
        return new

    def to_dict(self) -> dict:
        """What /v1/npumoe/stats shows under "replan"."""
        layers = []
        for ex in self.execs:
            p = self.predicted.get(ex.plan.layer)
            layers.append({"layer": ex.plan.layer, **self._observed(ex),
                           "predicted_padding_pct": None if p is None else p[0],
                           "predicted_overflow_pct": None if p is None else p[1]})
        return {"mode": self.mode, "generation": self.generation, "last_replan": self.last_replan,
                "layers": layers}


def stage(ex: OffloadExecutor, ladders: List[List[int]]) -> None:
    """Give the executor new ladders for its next call: programs learn the row counts first."""
    for p, lad in zip(ex.programs, ladders):
        p.add_tiers([t for t in lad if t not in p.tiers])  # a no-op on static programs
    ex.pending_tiers = [list(l) for l in ladders]


def load_replan(bundle: Path) -> Optional[dict]:
    f = Path(bundle) / REPLAN_FILE
    if not f.is_file():
        return None
    with open(f) as fh:
        return json.load(fh)


def attach(model, mode: str, bundle: Optional[Path], log=None) -> Optional[Replanner]:
    """A Replanner for a loaded model (None for ``off``); a saved ``replan.json`` is applied first
    (its groups must match the plan's)."""
    if mode == "off":
        return None
    r = Replanner(model, mode, bundle, log)
    saved = load_replan(bundle) if bundle is not None else None
    for ex in r.execs:
        lads = (saved or {}).get("layers", {}).get(str(ex.plan.layer))
        if lads and len(lads) == len(ex._groups) and all(p.dynamic or set(l) <= set(p.tiers)
                                                         for p, l in zip(ex.programs, lads)):
            stage(ex, lads)
    if saved:
        r.generation = int(saved.get("generation", 0))
    profile = bundle / "profile.json" if bundle is not None else None
    if profile is not None and profile.is_file():
        from .plan import call_loads
        from .profiles import Profile

        from .plan import prefill_call_sizes

        pr = Profile.load(profile)
        prof = {l.layer: l for l in pr.layers}
        sizes = lambda l: prefill_call_sizes(l, pr.chunk_size) if pr.chunk_size else None  # noqa: E731
        r.set_prediction({ex.plan.layer: [(0, 0, row) for row in call_loads(prof[ex.plan.layer],
                                                                               sizes(prof[ex.plan.layer]))[0]]
                          for ex in r.execs if ex.plan.layer in prof})
    return r
