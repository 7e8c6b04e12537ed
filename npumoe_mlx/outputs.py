"""Output paths checked before the work: a run that takes minutes (calibrate, tune, compare,
a generate with ``--stats``) must not find out at the end that it cannot write its result.

``check_file(path, flag)``: a file the command will write (made atomically, parent folders
created); ``check_dir(path, flag)``: a folder it will write files into. Either raises
OutputError with one line naming the flag, before anything runs or is written.
"""

import os
from pathlib import Path

# Folders no npumoe output belongs in (the filesystem root, the OS's own); their subfolders
# too for the kernel's virtual filesystems.
SYSTEM = ("/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/proc", "/run", "/sbin", "/sys", "/usr",
          "/var", "/System", "/Library", "/Applications", "/private", "/cores", "/Volumes")
VIRTUAL = ("/proc", "/sys", "/dev")


class OutputError(ValueError):
    """An output path the command cannot or must not write; nothing was run or written."""


def system_folder(path) -> bool:
    p = os.path.abspath(os.fspath(path))
    real = os.path.realpath(p)
    return any(q == os.path.dirname(q) or q in SYSTEM or any(q.startswith(v + "/") for v in VIRTUAL)
               for q in {p, real})


def _existing(path: Path) -> Path:
    """``path`` or its nearest existing ancestor (what a write creates the rest under)."""
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _writable_under(path: Path, flag: str, shown) -> None:
    anc = _existing(path)
    if not anc.is_dir():
        raise OutputError(f"{flag} {shown}: {anc} is a file, so no folder can be made there; choose another {flag}")
    if system_folder(anc) and anc != path.absolute():
        raise OutputError(f"{flag} {shown} is inside the system folder {anc}; nothing was run: choose a path of your own")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise OutputError(f"{flag} {shown}: {anc} is not writable; nothing was run: choose a writable {flag}")


def check_file(path, flag: str) -> Path:
    """A file ``flag`` names, to be written at the end: not a folder, not in a system folder,
    under a writable folder."""
    if path is None or str(path) == "":
        raise OutputError(f"{flag} needs a file path")
    p = Path(os.path.expanduser(os.fspath(path)))
    if p.is_dir():
        raise OutputError(f"{flag} {path} is a folder; pass a file path (e.g. {Path(path) / 'out.json'})")
    if system_folder(p) or system_folder(p.absolute().parent):
        raise OutputError(f"{flag} {path} is in a system folder; nothing was run: choose a path of your own")
    if p.exists() and not p.is_file():
        raise OutputError(f"{flag} {path} exists and is not a regular file; choose another {flag}")
    _writable_under(p.parent if str(p.parent) else Path("."), flag, path)
    return p


def check_dir(path, flag: str) -> Path:
    """A folder ``flag`` names, to write files into: not a file, not a system folder, writable."""
    if path is None or str(path) == "":
        raise OutputError(f"{flag} needs a folder path")
    p = Path(os.path.expanduser(os.fspath(path)))
    if system_folder(p):
        raise OutputError(f"{flag} {path} is a system folder; nothing was run or written: choose a folder of your own")
    if p.exists() and not p.is_dir():
        raise OutputError(f"{flag} {path} exists and is not a folder; nothing was run or written: choose another {flag}")
    _writable_under(p, flag, path)
    return p
