"""Write files and folders so that nothing is ever half-written: temp path, then rename."""

import glob
import json
import os
import shutil
import tempfile
from contextlib import contextmanager


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def honour_umask(path) -> None:
    """Give a ``mkstemp`` file or ``mkdtemp`` folder (always 0600/0700) the mode that
    ``open``/``mkdir`` would have given it under the user's umask."""
    mode = 0o777 if os.path.isdir(path) else 0o666
    os.chmod(path, mode & ~_umask())


def write_json(path, obj) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=".json")
    try:
        honour_umask(tmp)
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


@contextmanager
def folder(path):
    """Yield a temp folder beside ``path``; on success it replaces ``path`` whole.

    An interrupted or failed build leaves ``path`` as it was (old bundle intact)
    and only a hidden ``.tmp-*`` folder that readers never look at and the next
    build removes (``clean_stale``).
    """
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".tmp-{os.path.basename(path)}-")
    honour_umask(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if os.path.exists(path):
        old = tempfile.mkdtemp(dir=parent, prefix=f".old-{os.path.basename(path)}-")
        os.rmdir(old)
        os.replace(path, old)
    os.replace(tmp, path)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def clean_stale(path) -> None:
    """Remove the hidden ``.tmp-*``/``.old-*`` siblings that killed writes of ``path`` left.

    Call it only while holding ``path``'s build lock (no live writer then). A
    write killed between its two renames leaves ``path`` missing and the
    previous folder as ``.old-*``: that one is put back first.
    """
    path = os.path.abspath(path)
    parent, name = os.path.split(path)
    pattern = lambda kind: os.path.join(glob.escape(parent), f".{kind}-{glob.escape(name)}-*")
    olds = sorted(glob.glob(pattern("old")), key=os.path.getmtime)
    if olds and not os.path.exists(path):
        os.replace(olds.pop(), path)
    for p in glob.glob(pattern("tmp")) + olds:
        shutil.rmtree(p, ignore_errors=True)
