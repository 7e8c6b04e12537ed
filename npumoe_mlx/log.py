"""npumoe's notices through the standard ``logging`` module.

Every module logs on a child of the ``npumoe`` logger (``get(__name__)``: ``npumoe.runtime.executor``,
``npumoe.runtime.release``, ...): warnings for a degraded path (a program fault, a stale bundle, a
block left on MLX), info for progress. A library user configures them like any library's
(``logging.getLogger("npumoe")``); with no configuration Python shows warnings on stderr.

The ``npumoe`` command (``cli.main`` and each ``python -m npumoe_mlx.X``) installs ``console()``:
``[npumoe] message`` lines on stderr, or on stdout for the records logged with ``extra=STDOUT``
(progress a command always printed there), as the CLI printed them before it used logging.
"""

import logging
import sys

ROOT = "npumoe"
STDOUT = {"npumoe_stdout": True}  # extra= of a record the console writes to stdout


def get(module: str) -> logging.Logger:
    """The logger of a module: ``npumoe_mlx.runtime.executor`` -> ``npumoe.runtime.executor``."""
    return logging.getLogger(ROOT + module[len("npumoe_mlx"):] if module.startswith("npumoe_mlx") else ROOT)


class ConsoleHandler(logging.Handler):
    """``[npumoe] message`` on the current sys.stderr (sys.stdout for ``STDOUT`` records), looked
    up at each record so redirections (pytest's capsys, contextlib.redirect_stderr) see it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = sys.stdout if getattr(record, "npumoe_stdout", False) else sys.stderr
            stream.write(f"[npumoe] {record.getMessage()}\n")
            stream.flush()
        except Exception:
            self.handleError(record)


def console(enable: bool = True) -> None:
    """Show npumoe's records as the CLI does (``ConsoleHandler`` on the ``npumoe`` logger, INFO and
    up, not passed on to the root logger's handlers); ``enable=False`` restores standard logging."""
    logger = logging.getLogger(ROOT)
    for h in [h for h in logger.handlers if isinstance(h, ConsoleHandler)]:
        logger.removeHandler(h)
    if enable:
        logger.addHandler(ConsoleHandler())
        logger.setLevel(logging.INFO)
        logger.propagate = False
    else:
        logger.setLevel(logging.NOTSET)
        logger.propagate = True
