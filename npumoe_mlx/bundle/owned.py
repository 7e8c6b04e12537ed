"""Folders a tool writes, without ever deleting what the user put there.

A tool that writes a whole folder (``tiny-model --out``, ``demo --out``, ``convert
--mlx-path``) lists what it wrote, as glob patterns relative to the folder, in a
marker file inside it. An existing folder is replaced whole only if it is empty or
holds nothing but what its marker lists; anything else in it makes the tool refuse
(nothing changed), and ``force`` then replaces only the listed paths and keeps the rest.
A folder without the marker is never written into.
"""

import json
import os
import shutil
import uuid
from fnmatch import fnmatchcase
from pathlib import Path
from typing import List, Optional, Sequence


class FolderInUse(FileExistsError):
    """The output folder holds something the tool did not write; nothing was changed."""


def read_marker(root: Path, marker: str) -> Optional[dict]:
    p = Path(root) / marker
    if not p.is_file():
        return None
    try:
        info = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def _covered(rel: str, patterns: Sequence[str]) -> bool:
    return any(fnmatchcase(rel, p) for p in patterns)


def _walk(root: Path, patterns: Sequence[str], rel: str = ""):
    """(rel, covered) for every entry under ``root``, down to the level patterns reach."""
    for entry in sorted(os.listdir(root / rel if rel else root)):
        r = f"{rel}/{entry}" if rel else entry
        if _covered(r, patterns):
            yield r, True
        elif (root / r).is_dir() and not (root / r).is_symlink() and any(p.startswith(r + "/") for p in patterns):
            yield from _walk(root, patterns, r)
        else:
            yield r, False


def unowned(root, patterns: Sequence[str]) -> List[str]:
    """Paths under ``root`` that no pattern covers (the user's)."""
    return [r for r, ok in _walk(Path(root), patterns) if not ok]


def owned_paths(root, patterns: Sequence[str]) -> List[str]:
    return [r for r, ok in _walk(Path(root), patterns) if ok]


def _names(paths: List[str]) -> str:
    return ", ".join(paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")


def check(root, marker: str, tool: str, force: bool = False, legacy: Sequence[str] = ()) -> Optional[List[str]]:
    """May ``tool`` write ``root``? Returns the patterns it owns there (None: new or empty folder).

    Raises FolderInUse, naming what is in the way, when ``root`` is a file, a
    folder without ``marker``, or (without ``force``) holds paths the marker
    does not list. ``legacy``: the patterns of a marker written before markers
    listed files.
    """
    root = Path(root)
    if not root.exists():
        return None
    if not root.is_dir():
        raise FolderInUse(f"{root} exists and is not a folder; nothing was changed: choose another output folder")
    if not any(root.iterdir()):
        return None
    info = read_marker(root, marker)
    if info is None:
        raise FolderInUse(
            f"{root} is not empty and was not written by npumoe {tool} (no {marker}); nothing was changed: "
            f"choose a new or empty folder"
        )
    patterns = info.get("files")
    if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
        patterns = list(legacy)
    patterns = sorted(set(patterns) | {marker})
    extra = unowned(root, patterns)
    if extra and not force:
        raise FolderInUse(
            f"{root} holds files npumoe {tool} did not write ({_names(extra)}); nothing was changed: "
            f"pass --force to replace only its own files (listed in {marker}) and keep the rest, "
            f"or choose a new folder"
        )
    return patterns


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    elif p.exists() or p.is_symlink():
        p.unlink()


def publish(tmp, root, old: Optional[List[str]]) -> None:
    """Put the finished folder ``tmp`` at ``root``.

    ``old``: what ``check`` returned. A new, empty or wholly owned ``root`` is
    swapped whole (readers never see a half-written folder); one that also holds
    the user's files gets only the tool's paths replaced, the rest kept.
    """
    tmp, root = Path(tmp), Path(root)
    if not root.exists():
        os.replace(tmp, root)
        return
    if not any(root.iterdir()):
        root.rmdir()
        os.replace(tmp, root)
        return
    if old is None:
        raise FolderInUse(f"{root} was filled while writing it; nothing was changed: choose a new folder")
    if not unowned(root, old):
        parked = root.with_name(f".old-{root.name}-{uuid.uuid4().hex[:8]}")  # clean_stale restores it
        os.replace(root, parked)
        os.replace(tmp, root)
        shutil.rmtree(parked, ignore_errors=True)
        return
    for rel in owned_paths(root, old):  # the tool's own previous output only
        _remove(root / rel)
    for entry in os.listdir(tmp):
        os.replace(tmp / entry, root / entry)
    shutil.rmtree(tmp, ignore_errors=True)
