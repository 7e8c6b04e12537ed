"""One build of a bundle at a time: an exclusive lock file beside the bundle folder."""

import os
from contextlib import contextmanager
from pathlib import Path


class BuildInProgress(RuntimeError):
    pass


@contextmanager
def build_lock(bundle_dir):
    """Hold ``<bundle>.lock`` (O_EXCL) for the build; a stale lock of a dead process is taken over."""
    lock = Path(str(Path(bundle_dir).absolute()) + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            try:
                pid = int(lock.read_text().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid and _alive(pid):
                raise BuildInProgress(
                    f"build in progress for {bundle_dir} (pid {pid}); wait for it, or remove {lock} if it is stale"
                ) from None
            lock.unlink(missing_ok=True)  # the process that held it is gone
    else:
        raise BuildInProgress(f"could not take the build lock {lock}")
    try:
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        yield
    finally:
        lock.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
