"""What ran where: one record of a layer's offloaded calls, and one rule for its percentages.

The executor counts into ``LayerStats`` as it runs; ``npumoe replay`` tallies the same counters
from traces (``replay.Tally`` adds its predictions); ``--stats``, ``stats(model)``, the server,
``bench layer`` and the re-planner read the percentages from here. No mlx: replay uses it too.
"""

from dataclasses import asdict, dataclass, fields

COUNTS = ("calls", "offloaded", "program_calls", "slots", "padded", "pairs", "spilled", "dropped", "overflow",
          "synced_pairs")


def pct(part, whole) -> float:
    """``100 * part / whole``, 0 for an empty whole: every rate in the stats (padding of slots, ...)."""
    return 100.0 * part / whole if whole else 0.0


@dataclass
class LayerStats:
    layer: int
    calls: int = 0  # layer calls
    offloaded: int = 0  # layer calls that ran programs
    program_calls: int = 0
    slots: int = 0  # program rows
    padded: int = 0  # program rows with no pair
    pairs: int = 0  # routed pairs in offloaded calls
    spilled: int = 0  # pairs of offloaded calls run on MLX (cold experts + overflow)
    dropped: int = 0  # pairs dropped (--overflow drop only)
    overflow: int = 0  # pairs of synced calls past their group's top tier
    synced_pairs: int = 0  # pairs of calls that reached the host sync (the overflow rate's base)
    program_s: float = 0.0
    offload_call_s: float = 0.0  # wall time of offloaded calls from the sync to the lazy result
    fallback: str = ""  # why the layer fell back to MLX for the rest of the run

    @property
    def padding_pct(self) -> float:
        """Program rows that carried no pair: the one padding formula."""
        return pct(self.padded, self.slots)

    @property
    def spill_pct(self) -> float:
        return pct(self.spilled, self.pairs)

    @property
    def drop_pct(self) -> float:
        return pct(self.dropped, self.pairs)

    @property
    def overflow_pct(self) -> float:
        return pct(self.overflow, self.synced_pairs)

    def to_dict(self) -> dict:
        return asdict(self)

    def since(self, before: "LayerStats") -> "LayerStats":
        """The counters added after ``before`` (a copy taken earlier: ``dataclasses.replace``)."""
        return LayerStats(self.layer, **{f: getattr(self, f) - getattr(before, f) for f in COUNTS},
                          program_s=self.program_s - before.program_s,
                          offload_call_s=self.offload_call_s - before.offload_call_s)


def total(stats) -> LayerStats:
    """The sum of several layers' counters and times (layer -1)."""
    tot = LayerStats(-1)
    for s in stats:
        for f in (*COUNTS, "program_s", "offload_call_s"):
            setattr(tot, f, getattr(tot, f) + getattr(s, f))
    return tot


assert set(COUNTS) < {f.name for f in fields(LayerStats)}
