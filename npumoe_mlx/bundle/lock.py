"""One build of a bundle at a time: an exclusive lock file beside the bundle folder."""

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path


class BuildInProgress(RuntimeError):
    pass


_held = set()  # lock paths this process holds


@contextmanager
def build_lock(bundle_dir):
    """Hold ``<bundle>.lock`` for the build; a stale lock of a dead process is taken over.

    The lock file is written whole under a temp name and hard-linked into place
    (atomic, fails if it exists), so no one ever reads a lock without its pid.
    """
    lock = Path(str(Path(bundle_dir).absolute()) + ".lock")
    if lock in _held:  # not re-entrant: build() is the one taker (sharded.py passes lock_held)
        raise BuildInProgress(f"build in progress for {bundle_dir} (this process holds its lock)")
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=lock.parent, prefix=f".{lock.name}-")
    try:
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        for _ in range(3):
            try:
                _link(tmp, lock)
                break
            except FileExistsError:
                try:
                    pid = int(lock.read_text().strip() or 0)
                except (OSError, ValueError):
                    pid = 0
                if pid and _alive(pid):
                    raise BuildInProgress(
                        f"build in progress for {bundle_dir} (pid {pid}); wait for it to finish, "
                        f"or remove {lock} if no build is running"
                    ) from None
                lock.unlink(missing_ok=True)  # the process that held it is gone
        else:
            raise BuildInProgress(f"could not take the build lock {lock}")
    finally:
        os.unlink(tmp)
    _held.add(lock)
    try:
        yield
    finally:
        _held.discard(lock)
        lock.unlink(missing_ok=True)


def _link(src: str, dst: Path) -> None:
    try:
        os.link(src, dst)
    except FileExistsError:
        raise
    except OSError:  # no hard links here (e.g. exFAT): O_EXCL create, then write
        fd = os.open(dst, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        with os.fdopen(fd, "wb") as f:
            f.write(Path(src).read_bytes())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
