"""A bundle's JSON files checked by type and range before anything reads them.

A plan.json edited by hand (its hashes updated) used to fail deep inside the planner
with Python's own words (``'<' not supported between instances of 'int' and 'str'``,
``min() arg is an empty sequence``), or load and then fail every generate. Here each
field is checked against its dataclass annotation, then the ranges the executor relies
on; ``SchemaError`` names the field by its path, e.g. ``layers[0].groups[1].tiers[2]``.
"""

import math
import typing
from dataclasses import MISSING, fields, is_dataclass
from typing import Any, Dict, List


class SchemaError(ValueError):
    """A JSON value of the wrong type or out of range; the message names its field."""


def _kind(v) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "a boolean", list: "a list",
            dict: "an object", type(None): "null"}.get(type(v), type(v).__name__)


def _show(v) -> str:
    import json

    try:
        s = json.dumps(v)
    except (TypeError, ValueError):
        s = repr(v)
    return s if len(s) <= 40 else s[:37] + "..."


def _join(where: str, key) -> str:
    return f"{where}.{key}" if where else str(key)


def _bad(where: str, v, want: str) -> SchemaError:
    return SchemaError(f"{where or 'its top level'} is {_show(v)} ({_kind(v)}), but it must be {want}")


def check(tp, v, where: str) -> None:
    """Raise SchemaError unless JSON value ``v`` fits annotation ``tp`` (recursively)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return
    if origin is typing.Union:
        if v is None and type(None) in args:
            return
        inner = [a for a in args if a is not type(None)]
        return check(inner[0], v, where) if len(inner) == 1 else None
    if origin in (list, List):
        if not isinstance(v, list):
            raise _bad(where, v, "a list")
        for i, x in enumerate(v):
            check(args[0] if args else Any, x, f"{where}[{i}]")
        return
    if origin in (dict, Dict):
        if not isinstance(v, dict):
            raise _bad(where, v, "an object")
        for k, x in v.items():
            check(args[1] if args else Any, x, _join(where, k))
        return
    if is_dataclass(tp):
        if not isinstance(v, dict):
            raise _bad(where, v, "an object")
        hints = typing.get_type_hints(tp)
        names = {f.name for f in fields(tp)}
        extra = sorted(set(v) - names)
        if extra:
            raise SchemaError(_join(where, extra[0]) + f" is not a field of {tp.__name__}")
        for f in fields(tp):
            if f.name not in v:
                if f.default is MISSING and f.default_factory is MISSING:
                    raise SchemaError(_join(where, f.name) + " is missing")
                continue
            check(hints[f.name], v[f.name], _join(where, f.name))
        return
    if tp is bool:
        if type(v) is not bool:
            raise _bad(where, v, "true or false")
    elif tp is int:
        if type(v) is not int:
            raise _bad(where, v, "an integer")
    elif tp is float:
        if type(v) not in (int, float) or not math.isfinite(v):
            raise _bad(where, v, "a finite number")
    elif tp is str:
        if not isinstance(v, str):
            raise _bad(where, v, "a string")


def _at_least(v, lo, where: str) -> None:
    if v < lo:
        raise _bad(where, v, f">= {lo}")


def check_plan(d, plan_type) -> None:
    """plan.json (``plan_type``: ``plan.Plan``, passed in: the planner imports this module): types,
    then the ranges the planner and executor rely on."""
    check(plan_type, d, "")
    if d["limits"]["backend"] != d["backend"]:
        raise _bad("limits.backend", d["limits"]["backend"], f"the plan's backend, {_show(d['backend'])}")
    lim = d["limits"]
    if not lim["capacities"]:
        raise SchemaError("limits.capacities is empty, but it must list at least one tier")
    for i, c in enumerate(lim["capacities"]):
        _at_least(c, 1, f"limits.capacities[{i}]")
    for k in ("max_tiers", "max_group", "max_program_bytes", "max_programs"):
        if k in lim:
            _at_least(lim[k], 1, f"limits.{k}")
    for li, lp in enumerate(d["layers"]):
        w = f"layers[{li}]"
        for k in ("num_experts", "top_k", "D", "H"):
            _at_least(lp[k], 1, f"{w}.{k}")
        _at_least(lp["layer"], 0, f"{w}.layer")
        for k in ("min_tokens", "max_calls"):
            if k in lp:
                _at_least(lp[k], 0, f"{w}.{k}")
        if lp.get("objective", "time") not in ("time", "energy"):
            raise _bad(f"{w}.objective", lp["objective"], '"time" or "energy"')
        if lp.get("energy_bound", "time") not in ("time", "gpu"):
            raise _bad(f"{w}.energy_bound", lp["energy_bound"], '"time" or "gpu"')
        if "slack" in lp and not lp["slack"] > 0:
            raise _bad(f"{w}.slack", lp["slack"], "> 0")
        for gi, g in enumerate(lp.get("groups", [])):  # (expert ids against the model's: installer.install)
            _nonempty_ints(g["experts"], 0, f"{w}.groups[{gi}].experts")
            _tiers(g["tiers"], f"{w}.groups[{gi}].tiers")
        for e, x in enumerate(lp.get("cold", [])):
            _at_least(x, 0, f"{w}.cold[{e}]")
        for si, sp in enumerate(lp.get("shared", [])):
            _at_least(sp["H"], 1, f"{w}.shared[{si}].H")
            _tiers(sp["tiers"], f"{w}.shared[{si}].tiers")
            if "min_tokens" in sp:
                _at_least(sp["min_tokens"], 0, f"{w}.shared[{si}].min_tokens")


def _nonempty_ints(xs, lo, where: str) -> None:
    if not xs:
        raise SchemaError(f"{where} is empty, but it must list at least one")
    for i, x in enumerate(xs):
        _at_least(x, lo, f"{where}[{i}]")


def _tiers(xs, where: str) -> None:
    _nonempty_ints(xs, 1, where)
    if list(xs) != sorted(set(xs)):
        raise _bad(where, xs, "ascending, each tier once")


def check_cost(d) -> None:
    """cost.json (``cost.CostModel``): every field of its type, every number finite and >= 0."""
    from .cost import CostModel

    check(CostModel, d, "")
    for k, v in d.items():
        if type(v) in (int, float) and v < 0:
            raise _bad(k, v, ">= 0")


FILE_ENTRY = {"bytes": int, "sha256": str}


def check_manifest(man: dict, sample_key: str) -> None:
    """manifest.json (``bundle.Manifest``): the fields a load reads, by type."""
    if not isinstance(man, dict):
        raise _bad("", man, "an object")
    check(str, man.get("model_fingerprint", ""), "model_fingerprint")
    check(str, man.get("backend", "onnx"), "backend")
    for k in ("npumoe_version", "model_type", "created"):
        check(typing.Optional[str], man.get(k), k)
    if not isinstance(man.get("meta"), dict):
        raise _bad("meta", man.get("meta"), "an object")
    for rel, want in man["meta"].items():
        _file_entry(want, f"meta.{rel}", sample_key)
    progs = man.get("programs")
    if not isinstance(progs, list):
        raise _bad("programs", progs, "a list")
    for i, p in enumerate(progs):
        w = f"programs[{i}]"
        if not isinstance(p, dict):
            raise _bad(w, p, "an object")
        for k in ("layer", "group", "dir", "files", "program"):
            if k not in p:
                raise SchemaError(f"{w}.{k} is missing")
        check(int, p["layer"], f"{w}.layer")
        _at_least(p["layer"], 0, f"{w}.layer")
        g = p["group"]
        if not ((type(g) is int and g >= 0) or (isinstance(g, str) and g[:1] == "s" and g[1:].isdigit())):
            raise _bad(f"{w}.group", g, 'a group index >= 0 or "s<i>" (a shared expert)')
        check(str, p["dir"], f"{w}.dir")
        if not isinstance(p["program"], dict):
            raise _bad(f"{w}.program", p["program"], "an object")
        if not isinstance(p["files"], dict) or not p["files"]:
            raise _bad(f"{w}.files", p["files"], "an object listing the program's files")
        for rel, want in p["files"].items():
            _file_entry(want, f"{w}.files.{rel}", sample_key)


def _file_entry(want, where: str, sample_key: str) -> None:
    if not isinstance(want, dict):
        raise _bad(where, want, "an object (bytes, sha256)")
    for k, tp in FILE_ENTRY.items():
        if k not in want:
            raise SchemaError(f"{where}.{k} is missing")
        check(tp, want[k], _join(where, k))
    _at_least(want["bytes"], 0, f"{where}.bytes")
    if sample_key in want:
        check(str, want[sample_key], f"{where}.{sample_key}")
