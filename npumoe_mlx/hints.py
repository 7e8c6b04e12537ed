"""The text of fixes and failures, in one place: the ``npumoe build`` command an error names,
and an exception as one line (the CLI's rule: errors are one line, the fix in it)."""

from typing import Optional


def build_cmd(model, backend: Optional[str] = None, *, out=None, from_stats=None, force: bool = False,
              extra: str = "") -> str:
    """``npumoe build --model M [--backend B] [--out DIR] [--from-stats FILE] [--force] [extra]``."""
    cmd = f"npumoe build --model {model}"
    if backend:
        cmd += f" --backend {backend}"
    if out is not None:
        cmd += f" --out {out}"
    if from_stats is not None:
        cmd += f" --from-stats {from_stats}"
    if force:
        cmd += " --force"
    return f"{cmd} {extra}" if extra else cmd


def one_line(e: BaseException, typed: bool = False) -> str:
    """The first line of ``e``'s message (its type's name when it has none); ``typed``: prefixed
    with the type's name (``ValueError: ...``), for reports that keep the kind of failure."""
    if typed:
        return f"{type(e).__name__}: {e}".splitlines()[0]
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
