"""SIGTERM (a scheduler's or `kill`'s stop) ends a run like Ctrl-C: the run is recorded KILLED in
summary.json and MLflow instead of being left RUNNING by a process that died without cleanup."""
from __future__ import annotations

import contextlib
import signal
import threading


class Interrupted(KeyboardInterrupt):
    """SIGTERM, turned into the same clean stop as Ctrl-C; str() is the signal's name."""


received: list[str] = []   # signal names, in order: a signal's exception may be replaced by another


def _raise_interrupt(signum, frame):
    received.append(signal.Signals(signum).name)
    raise Interrupted(signal.Signals(signum).name)


@contextlib.contextmanager
def sigterm_as_interrupt():
    """SIGTERM raises Interrupted inside the block (main thread only: signals go there)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def exit_code(e: KeyboardInterrupt) -> tuple[str, int]:
    """(signal name, the shell's exit code for it: 128 + signal number): SIGINT -> 130, SIGTERM -> 143."""
    name = str(e) if isinstance(e, Interrupted) else "SIGINT"
    return name, 128 + getattr(signal, name)
