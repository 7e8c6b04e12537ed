"""Ctrl-C in the CLI: ``<prog>: interrupted`` and exit code 130 (128 + SIGINT), at any moment.

Three CPython/extension behaviours lose or disguise it during the seconds of imports:
a KeyboardInterrupt raised inside ``exec`` of a string (dataclasses and namedtuple build
methods that way) makes CPython 3.11 kill the process with SIGINT however it was caught;
one raised inside a weakref callback (importlib's module locks) is printed as "Exception
ignored" and the run goes on; one raised inside a pybind11 module's init becomes
``ImportError: initialization failed`` (onnxruntime)."""

import sys


def caused_by(e: BaseException) -> bool:
    """Whether Ctrl-C is behind ``e`` (itself, or anywhere in its cause/context chain)."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, KeyboardInterrupt):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


def exit_code(prog: str) -> int:
    """Print ``<prog>: interrupted``; return 130 (and make sure the process exits with it)."""
    print(f"{prog}: interrupted", file=sys.stderr)
    exec("")  # an exec of a string resets CPython's "unhandled KeyboardInterrupt" flag (pythonrun.c)
    return 130


def _unraisable(hook):
    def unraisable(info) -> None:
        if isinstance(info.exc_value, KeyboardInterrupt):  # swallowed where it was raised: raise it again,
            import _thread  # from another thread, so it lands after this hook (swallowed again, it comes again)

            try:
                _thread.start_new_thread(_thread.interrupt_main, ())
                return
            except RuntimeError:  # no new threads at interpreter shutdown: Python's own report then
                pass
        hook(info)
    return unraisable


def keep_ctrl_c() -> None:
    """For the CLI process only (library users keep Python's hooks): a Ctrl-C that lands
    where Python cannot raise it (a weakref callback, a ``__del__``) is raised again in the
    main thread instead of being printed and ignored."""
    if not getattr(sys.unraisablehook, "npumoe", False):
        sys.unraisablehook = _unraisable(sys.unraisablehook)
        sys.unraisablehook.npumoe = True
