"""The calibration profile: per MoE layer, routed pair counts over a corpus and per call.

``calibrate`` records one from a model, ``replay`` from routing traces, and
``generate --stats`` from a workload; the planner (plan.py) reads these objects,
never dicts. JSON lives only at the file edge (``Profile.save`` / ``Profile.load``).
"""

import json
from dataclasses import asdict, dataclass, field, replace
from typing import Dict, List, Optional

import numpy as np

from ..atomic import write_json

# Calls real use makes besides single-sequence prefill chunks (build/workloads.py makes them;
# the planner sizes ladders for them):
BATCH_SEQS = (2, 4)  # prompts per batched prefill call (batch_generate, the server's batch)
# Call sizes (tokens) a plan covers besides the prefill step and its remainders: chat requests and
# prompt-cache remainders (plan.prefill_call_sizes adds those below the step).
GENERATION_SIZES = (32, 64, 128, 256, 512, 1024)

FORMAT = 1
KIND = "npumoe-profile"
RANGE_KEYS = ("gate", "up", "down")  # LayerCounts.max_abs


@dataclass
class LayerCounts:
    """Routed pair counts of one MoE layer: over the corpus and per call."""

    layer: int
    path: str
    num_experts: int
    top_k: int
    counts: List[int]  # [E] pairs per expert over the whole corpus
    chunks: List[dict] = field(default_factory=list)  # per call: [{"tokens": int, "counts": [E], "seq": int}] ("seq" optional)
    # Largest |value| seen in the expert FFN on the calibration corpus (a sample of each call's
    # tokens): {"gate": .., "up": .., "down": ..} (down: the FFN's output); None: not measured.
    # The planner keeps a layer past fp16's safe range on MLX for fp16 backends (Core ML).
    max_abs: Optional[Dict[str, float]] = None


@dataclass
class Profile:
    model_fingerprint: Optional[str]
    model_type: str
    corpus: str
    tokens: int
    chunk_size: int
    layers: List[LayerCounts]

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "kind": KIND,
            "model_fingerprint": self.model_fingerprint,
            "model_type": self.model_type,
            "corpus": self.corpus,
            "tokens": self.tokens,
            "chunk_size": self.chunk_size,
            "layers": [asdict(l) for l in self.layers],
        }

    def save(self, path) -> None:
        """Write atomically: a temp file beside ``path``, then rename."""
        write_json(path, self.to_dict())

    @classmethod
    def from_dict(cls, obj, where: str = "profile") -> "Profile":
        def bad(msg):
            return ValueError(f"{where}: not a valid npumoe profile: {msg}")

        if not isinstance(obj, dict) or obj.get("kind") != KIND:
            raise bad(f"'kind' is not {KIND!r}")
        if obj.get("format") != FORMAT:
            raise bad(f"unsupported format {obj.get('format')!r} (expected {FORMAT})")
        for key, types in (
            ("model_type", str), ("corpus", str), ("tokens", int), ("chunk_size", int), ("layers", list),
        ):
            if not isinstance(obj.get(key), types):
                raise bad(f"missing or wrong type for {key!r}")
        fp = obj.get("model_fingerprint")
        if fp is not None and not isinstance(fp, str):
            raise bad("'model_fingerprint' must be a string or null")
        layers = []
        for i, l in enumerate(obj["layers"]):
            if not isinstance(l, dict):
                raise bad(f"layers[{i}] is not an object")
            for key, types in (("layer", int), ("path", str), ("num_experts", int), ("top_k", int)):
                if not isinstance(l.get(key), types):
                    raise bad(f"layers[{i}]: missing or wrong type for {key!r}")
            E = l["num_experts"]
            if not _is_counts(l.get("counts"), E):
                raise bad(f"layers[{i}]: 'counts' must be {E} non-negative integers")
            chunks = l.get("chunks", [])
            if not isinstance(chunks, list):
                raise bad(f"layers[{i}]: 'chunks' must be a list")
            total = np.zeros(E, dtype=np.int64)
            for j, c in enumerate(chunks):
                if not (isinstance(c, dict) and isinstance(c.get("tokens"), int) and _is_counts(c.get("counts"), E)):
                    raise bad(f"layers[{i}].chunks[{j}]: needs 'tokens' and {E} 'counts'")
                if "seq" in c and not (isinstance(c["seq"], int) and c["seq"] >= 0):
                    raise bad(f"layers[{i}].chunks[{j}]: 'seq' must be a non-negative integer")
                total += c["counts"]
            if chunks and total.tolist() != l["counts"]:
                raise bad(f"layers[{i}]: chunk counts do not add up to the layer counts")
            rng = l.get("max_abs")
            if rng is not None and not (isinstance(rng, dict) and all(
                    k in RANGE_KEYS and isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0
                    for k, v in rng.items())):
                raise bad(f"layers[{i}]: 'max_abs' must map {', '.join(RANGE_KEYS)} to non-negative numbers")
            layers.append(LayerCounts(l["layer"], l["path"], E, l["top_k"], list(l["counts"]), list(chunks),
                                      None if rng is None else {k: float(v) for k, v in rng.items()}))
        return cls(fp, obj["model_type"], obj["corpus"], obj["tokens"], obj["chunk_size"], layers)

    @classmethod
    def load(cls, path) -> "Profile":
        try:
            with open(path) as f:
                obj = json.load(f)
        except OSError as e:
            raise ValueError(f"cannot read profile {path}: {e.strerror}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not a valid npumoe profile: bad JSON ({e})") from None
        return cls.from_dict(obj, str(path))


def with_workload(base: Profile, seen: Profile) -> Profile:
    """``base`` (a calibration) with each layer ``seen`` recorded (``generate --stats FILE``: the
    per-call loads of the user's own workload) in place of its own, so a build sizes ladders
    for the calls that really happen; layers the workload never offloaded keep ``base``'s."""
    mine = {l.layer: l for l in base.layers}
    for l in seen.layers:
        if l.layer not in mine or mine[l.layer].num_experts != l.num_experts:
            raise ValueError(f"the stats file's layer {l.layer} (E={l.num_experts}) is not an MoE layer of this "
                             f"model; save stats with `npumoe generate --stats FILE` on this model")
    by_layer = {l.layer: l for l in seen.layers}
    layers = [replace(by_layer[l.layer], max_abs=by_layer[l.layer].max_abs or l.max_abs) if l.layer in by_layer
              else l for l in base.layers]  # the calibration's ranges stay
    return Profile(base.model_fingerprint, base.model_type, f"{base.corpus} + {seen.corpus}", base.tokens,
                   max(base.chunk_size, seen.chunk_size), layers)


def _is_counts(v, n: int) -> bool:
    return (
        isinstance(v, list)
        and len(v) == n
        and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v)
    )
