"""The on-disk bundle: manifest, profile, plan, cost model and programs. Atomic, validated.

    <bundle>/manifest.json   kind, format, npumoe version, backend, model fingerprint, and
                             per program (layer, group) its folder and files with sizes and sha256
    <bundle>/profile.json    calibration (profiles.py)
    <bundle>/plan.json       limits, groups, tier ladders, residency, thresholds (plan.py): the
                             one place groups and tiers are written; the manifest refers to them
    <bundle>/cost.json       the cost model (cost.py)
    <bundle>/programs/L<layer>/g<group>/...   the backend's files (.onnx per tier, or one
                             .mlpackage); the manifest's entry keeps what its build returned

Here: where bundles live, the manifest's file records, read and validate. The
build pipeline is build.py (a temp folder renamed into place: an interrupted build
leaves the previous bundle intact); installing a bundle's programs into a model is
installer.py. Reading checks everything before a single
program runs: format, fingerprint, files (inside the bundle, present, hashes),
and that the plan fits the model; any mismatch is a clear error, never wrong output.
"""

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from .._version import __version__
from ..backends import registry
from ..planning.cost import CostModel
from .fingerprint import model_fingerprint, update_sampled
from ..hints import build_cmd
from .paths import CACHE_ENV, cache_root  # noqa: F401 (bundle.cache_root: callers' name)
from ..planning.plan import Plan
from ..planning import schema

BUNDLE_FORMAT = 3  # 3: groups, tiers and limits only in plan.json; the manifest names each program's
# (layer, group), its files and its backend's build entry ("program": files + metadata);
# 2: quantized programs without zero points (fast kernel), one session per program
KIND = "npumoe-bundle"


class BundleError(ValueError):
    """A bundle that cannot be used for this model; the message says what to do."""


def _writable(path: Path) -> bool:
    """Can a build put a folder at ``path`` (rename into its parent)?"""
    parent = Path(path).absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    return os.access(parent, os.W_OK)


def _own_hint(model: str, backend: str, model_path) -> str:
    """The fix for a bundle that belongs to another model: build one for this model where
    its loads look (never over the other model's bundle)."""
    where = build_target(model_path, backend) if model_path is not None else None
    into = f" (it goes to {where})" if where is not None else ""
    return (f"build one for this model with `{build_cmd(model, backend)}`{into} and load "
            f"without --bundle, or pass the model this bundle was built for")


def other_models_bundle(path, model_path) -> Optional[str]:
    """The fingerprint in the manifest at ``path`` when it is not ``model_path``'s and ``path`` is not
    where this model's own bundle lives (``--bundle`` naming another model's bundle), else None."""
    if path is None or model_path is None:
        return None
    try:
        man = json.loads((Path(path) / "manifest.json").read_text())
        fp = man.get("model_fingerprint") if isinstance(man, dict) else None
        backend = man.get("backend") if isinstance(man.get("backend"), str) else "onnx"
    except (OSError, ValueError):
        return None
    if not isinstance(fp, str) or Path(path).absolute() == locate_bundle(model_path, backend).absolute():
        return None
    try:
        return fp if fp != model_fingerprint(model_path) else None
    except (OSError, ValueError):
        return None


def _built_beside(root: Path, fp) -> bool:
    """Whether the model folder holding bundle ``root`` is the one it was built for (fingerprint ``fp``)."""
    try:
        return (root.parent / "config.json").is_file() and model_fingerprint(root.parent) == fp
    except (OSError, ValueError):
        return False


def rebuild_hint(model: str, backend: str, path=None, model_path=None) -> str:
    """The command that rebuilds the bundle at ``path`` so that loads of ``model`` then use it;
    for another model's bundle (``other_models_bundle``), one that builds this model's elsewhere."""
    if other_models_bundle(path, model_path) is not None:
        return _own_hint(model, backend, model_path)
    if path is None or (model_path is not None and Path(path).absolute() == locate_bundle(model_path, backend).absolute()):
        if path is not None and model_path is not None and _read_only(Path(model_path)):
            where = f" (the model folder is read-only: it goes to the cache, {cached_bundle_dir(model_path, backend)}, which loads then use)"
        else:
            where = ""
        return f"rebuild it with `{build_cmd(model, backend, force=True)}`{where}"
    if not _writable(Path(path)):
        return (f"{path} cannot be rebuilt in place (its folder is read-only): build one elsewhere with "
                f"`{build_cmd(model, backend, out='DIR')}` and load it with `--bundle DIR`")
    return f"rebuild it with `{build_cmd(model, backend, out=path, force=True)}`"


def cached_bundle_dir(model_path, backend: str, fingerprint: Optional[str] = None) -> Path:
    """``$NPUMOE_CACHE/bundles/<fingerprint>-<backend>``: where hub models' bundles live."""
    fp = fingerprint or model_fingerprint(model_path)
    return cache_root() / "bundles" / f"{fp[:16]}-{backend}"


def _read_only(model_path: Path) -> bool:
    """A model folder npumoe must not (hub snapshot) or cannot write a bundle into."""
    return "snapshots" in Path(model_path).parts or not os.access(model_path, os.W_OK)


def locate_bundle(model_path, backend: str, explicit=None, new_in_cache: Optional[bool] = None) -> Path:
    """The bundle folder loaders use for this model (whether or not it exists yet).

    1. ``explicit`` (``--bundle``) wins;
    2. else the first that holds a bundle of ``<model>/npumoe-<backend>`` and
       ``$NPUMOE_CACHE/bundles/<fingerprint>-<backend>``: beside first, but the cache
       first for a read-only model folder (or a hub snapshot), where builds write;
    3. else where a new one goes: beside a writable local model, else the cache
       (``new_in_cache`` forces either).
    Builds write to ``build_target``, which is this path or, for a read-only model
    folder, the cache's (then first in line), so the fix an error prints
    (``npumoe build --force``) always replaces the bundle the next load uses.
    """
    if explicit:
        return Path(explicit)
    model_path = Path(model_path)
    beside = model_path / f"npumoe-{backend}"
    read_only = _read_only(model_path)
    if not read_only and (beside / "manifest.json").exists():
        return beside  # (without fingerprinting the weights for the cache's name)
    cached = cached_bundle_dir(model_path, backend)
    for path in ((cached, beside) if read_only else (cached,)):
        if (path / "manifest.json").exists():
            return path
    if new_in_cache is None:
        new_in_cache = read_only
    return cached if new_in_cache else beside


def build_target(model_path, backend: str, explicit=None) -> Path:
    """Where ``npumoe build`` writes (``--out`` wins): the bundle loads use, or the
    cache's for a read-only model folder (loads look there first)."""
    if explicit:
        return Path(explicit)
    if _read_only(Path(model_path)):
        return cached_bundle_dir(model_path, backend)
    return locate_bundle(model_path, backend)


def default_bundle_dir(model_path, backend: str, fingerprint: Optional[str] = None) -> Path:
    """Where a new bundle goes: beside a writable local model (``<model>/npumoe-<backend>``),
    in the cache (keyed by the weights' fingerprint) for hub snapshots and read-only folders."""
    model_path = Path(model_path)
    if _read_only(model_path):
        return cached_bundle_dir(model_path, backend, fingerprint)
    return model_path / f"npumoe-{backend}"


BUNDLE_ENTRIES = ("manifest.json", "profile.json", "plan.json", "cost.json", "programs", "dense-costs.json")


def check_target(out: Path) -> None:
    """A build replaces ``out`` whole: refuse unless it is missing, empty or a bundle
    (holds nothing but what a build writes), so a wrong ``--out`` never deletes a folder."""
    out = Path(out)
    if not out.exists():
        return
    if not out.is_dir():
        raise BundleError(f"{out} exists and is not a folder; nothing was changed: choose another --out")
    other = sorted(p.name for p in out.iterdir() if p.name not in BUNDLE_ENTRIES)
    if other:
        raise BundleError(
            f"{out} is not an npumoe bundle folder (it holds {', '.join(other[:3])}); a build replaces its "
            f"folder whole, so nothing was changed: choose a new or empty --out"
        )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


SAMPLES, SAMPLE_BYTES = 4, 16 * 1024
SAMPLE_KEY = "sha256_4x16KiB"  # the manifest key of _sample_sha256 (names the scheme: a new one gets a new key)


def _sample_sha256(path: Path) -> str:
    """sha256 of a file's size and 4 evenly spaced 16 KiB samples (all of a file up to 64 KiB):
    what every load checks; the whole-file sha256 is checked with ``verify``."""
    size = path.stat().st_size
    h = hashlib.sha256(f"{size}\0".encode())
    with open(path, "rb") as f:
        update_sampled(h, f, 0, size, SAMPLES, SAMPLE_BYTES, SAMPLES * SAMPLE_BYTES, "floor")
    return h.hexdigest()


def files_under(root: Path, rel: Path) -> Dict[str, dict]:
    out = {}
    base = root / rel
    paths = [base] if base.is_file() else sorted(p for p in base.rglob("*") if p.is_file())
    for p in paths:
        out[p.relative_to(root).as_posix()] = {
            "bytes": p.stat().st_size, "sha256": _sha256(p), SAMPLE_KEY: _sample_sha256(p)}
    return out


def safe_path(root: Path, rel: str) -> Path:
    """``root/rel`` if it stays inside ``root`` through no link; else BundleError."""
    if not isinstance(rel, str) or not rel or os.path.isabs(rel) or "\\" in rel:
        raise BundleError(f"manifest path {rel!r} is not a relative path inside the bundle")
    parts = Path(rel).parts
    if ".." in parts:
        raise BundleError(f"manifest path {rel!r} escapes the bundle folder")
    cur = root
    for part in parts:
        cur = cur / part
        if cur.is_symlink():
            raise BundleError(f"manifest path {rel!r} goes through a link ({cur.name}); refused")
    if not str(cur.resolve()).startswith(str(root.resolve()) + os.sep):
        raise BundleError(f"manifest path {rel!r} escapes the bundle folder")
    return cur


# --- manifest ----------------------------------------------------------------


@dataclass
class ProgramEntry:
    """One program of manifest.json: which (layer, group) it serves (its experts and tiers are
    plan.json's), its folder, the backend's build entry (files and metadata, as the backend's
    ``build`` returned it) and every file's size and hashes."""

    layer: int
    group: Union[int, str]  # the group's index in the layer's plan, or "s<i>": shared expert i
    dir: str  # the program's folder, relative to the bundle
    program: Dict[str, Any]  # the backend's build entry
    files: Dict[str, Dict[str, Any]]  # relative path -> {"bytes", "sha256", SAMPLE_KEY}

    @property
    def key(self) -> tuple:
        return (self.layer, self.group)

    @property
    def weight_format(self) -> Optional[str]:
        return self.program.get("weight_format")


@dataclass(kw_only=True)
class Manifest:
    """manifest.json: what a build wrote and a load checks first. ``to_dict``/``from_dict`` keep
    bundle format 3's keys, so bundles on disk read unchanged."""

    kind: str = KIND
    format: int = BUNDLE_FORMAT
    npumoe_version: Optional[str] = None
    backend: Optional[str] = None  # (missing: the folder's name says)
    model_fingerprint: Optional[str] = None
    model_type: Optional[str] = None
    created: Optional[str] = None
    meta: Dict[str, Dict[str, Any]] = field(default_factory=dict)  # profile/plan/cost.json -> size and hashes
    programs: List[ProgramEntry] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d) -> "Manifest":
        """Checked by type and range first (schema.check_manifest): a SchemaError names the field."""
        schema.check_manifest(d, SAMPLE_KEY)
        names = {f.name for f in fields(cls)} - {"programs"}
        progs = [ProgramEntry(p["layer"], p["group"], p["dir"], p["program"], p["files"]) for p in d["programs"]]
        return cls(**{k: v for k, v in d.items() if k in names}, programs=progs)

    def total_bytes(self) -> int:
        """The programs' files: one copy of each program's bytes."""
        return sum(f["bytes"] for p in self.programs for f in p.files.values())


# --- load --------------------------------------------------------------------


@dataclass
class Bundle:
    path: Path
    manifest: Manifest
    plan: Plan
    cost: CostModel
    model_name: str = "MODEL"
    model_path: Optional[Path] = None


def read(path, model_path=None, model_name: str = "MODEL", verify: bool = False,
         fingerprint: Optional[str] = None) -> Bundle:
    """Validate a bundle folder (and, given ``model_path`` or ``fingerprint``, the weights it was built for).

    Every listed file is checked for size and a sampled sha256 (whole sha256 with
    ``verify``, or for bundles that list no sampled hash). Errors name the folder
    and the command that rebuilds that very folder. ``fingerprint``: the expected one
    (a shard's, see sharded.py) instead of the fingerprint of ``model_path``'s files.
    """
    root = Path(path)
    mpath = root / "manifest.json"
    backend = registry.of_folder(root.name)
    _hint = lambda b: LazyHint(model_name, b, root, model_path)
    if not mpath.is_file():
        raise BundleError(f"{root}: not an npumoe bundle (no manifest.json); build one with `{build_cmd(model_name)}`")
    try:
        man = json.loads(mpath.read_text())
    except (OSError, ValueError) as e:
        raise BundleError(f"{mpath}: unreadable manifest ({e}); {_hint(backend)}") from None
    if not isinstance(man, dict) or man.get("kind") != KIND:
        raise BundleError(f"{mpath}: not an npumoe bundle manifest; {_hint(backend)}")
    backend = man.get("backend", backend)
    fmt = man.get("format")
    if type(fmt) is not int or fmt != BUNDLE_FORMAT:
        got = f"{json.dumps(fmt)} (a JSON {type(fmt).__name__}, not an integer)" if type(fmt) is not int else str(fmt)
        raise BundleError(
            f"{root}: bundle format {got} (written by npumoe {man.get('npumoe_version')}) is not format "
            f"{BUNDLE_FORMAT}, the one npumoe {__version__} reads; {_hint(backend)}"
        )
    try:
        manifest = Manifest.from_dict(man)
    except schema.SchemaError as e:
        raise BundleError(f"{mpath}: {e}; {_hint(backend)}") from None
    if model_path is not None or fingerprint is not None:
        here = fingerprint or model_fingerprint(model_path)
        theirs = manifest.model_fingerprint
        if theirs != here:
            shown = str(theirs)[:12] if isinstance(theirs, str) else json.dumps(theirs)
            if fingerprint is None and other_models_bundle(root, model_path) is not None:
                fix = _own_hint(model_name, backend, model_path)
                if _built_beside(root, theirs):
                    raise BundleError(f"{root}: built for another model ({root.parent}): fingerprint {shown}, "
                                      f"this model {here[:12]}; {fix}")
                raise BundleError(
                    f"{root}: built for other weights (model fingerprint differs: {shown} in the bundle, {here[:12]} "
                    f"here: another model's bundle, or this model changed after the build); {fix}"
                )
            raise BundleError(
                f"{root}: built for other weights (model fingerprint differs: {shown} in the bundle, {here[:12]} "
                f"here: the model changed after the build); {_hint(backend)}"
            )
    try:
        for name, want in manifest.meta.items():
            _check_file(root, name, want, _hint(backend), True)  # small, and they define the plan
        for prog in manifest.programs:
            for rel, want in prog.files.items():
                _check_file(root, rel, want, _hint(backend), verify)
        plan = _typed(root, "plan.json", Plan.from_dict, _hint(backend))
        cost = _typed(root, "cost.json", _cost, _hint(backend))
    except BundleError:
        raise
    except (KeyError, TypeError, ValueError) as e:
        raise BundleError(f"{root}: malformed bundle ({type(e).__name__}: {e}); {_hint(backend)}") from None
    if plan.backend != backend:
        raise BundleError(f"{root}: plan is for {plan.backend}, manifest says {backend}; {_hint(backend)}")
    listed = [p.key for p in manifest.programs]
    needed = [(lp.layer, gi) for lp in plan.layers for gi in range(len(lp.groups))]
    needed += [(lp.layer, f"s{si}") for lp in plan.layers for si in range(len(lp.shared))]
    if sorted(listed, key=repr) != sorted(needed, key=repr):  # one program per planned group, no other
        raise BundleError(f"{root}: manifest programs do not match the plan; {_hint(backend)}")
    return Bundle(root, manifest, plan, cost, model_name, model_path)


def _typed(root: Path, name: str, make, hint):
    """``make`` of ``root/name``'s JSON, which checks it by type and range first (schema.py): a
    BundleError naming the file and the field."""
    p = safe_path(root, name)
    try:
        return make(json.loads(p.read_text()))
    except (OSError, ValueError) as e:  # (SchemaError is a ValueError)
        raise BundleError(f"{p}: {e}; {hint}") from None


def _cost(d) -> CostModel:
    schema.check_cost(d)
    return CostModel.from_dict(d)


class LazyHint:
    """rebuild_hint's text, computed only when an error prints it (it fingerprints the model)."""

    def __init__(self, *args):
        self.args = args

    def __str__(self) -> str:
        return rebuild_hint(*self.args)

    __format__ = lambda self, spec: format(str(self), spec)


def _check_file(root: Path, rel: str, want: dict, hint, full: bool) -> None:
    p = safe_path(root, rel)
    if not p.is_file():
        raise BundleError(f"{root}: missing file {rel}; {hint}")
    sampled = want.get(SAMPLE_KEY) if not full else None
    if p.stat().st_size != want["bytes"] or (
        _sample_sha256(p) != sampled if sampled else _sha256(p) != want["sha256"]
    ):
        raise BundleError(f"{root}: {rel} is corrupt (size or sha256 differs); {hint}")
