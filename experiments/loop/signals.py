"""Interruption: SIGINT/SIGTERM only set a flag.

The loop stops at the next chunk boundary, drops the unfinished epoch, checkpoints the last
completed one if needed, and the command line exits with 128 + the signal number (130 for
Ctrl-C), printing the ``--resume`` command.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator


class StopFlag:
    """Set by a signal handler (or a test); the loop stops at the next chunk boundary."""

    def __init__(self) -> None:
        self.signum: int | None = None

    @property
    def requested(self) -> bool:
        """Whether a stop was asked for."""
        return self.signum is not None

    def request(self, signum: int = signal.SIGINT) -> None:
        """Asks the loop to stop; ``signum`` decides the exit code (128 + signum)."""
        if self.signum is None:
            self.signum = signum


@contextlib.contextmanager
def handle_signals(flag: StopFlag) -> Iterator[StopFlag]:
    """Routes SIGINT and SIGTERM to ``flag`` while the block runs.

    The first signal only sets the flag, so the current chunk ends and a checkpoint of the
    last completed epoch is written; the handler then steps aside, so a second signal acts
    as usual (Ctrl-C twice aborts at once). Outside the main thread nothing is installed.
    """
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def on_signal(signum: int, frame: object) -> None:
        flag.request(signum)
        signal.signal(signum, previous[signum])
        print(
            f"\n{signal.Signals(signum).name} received: stopping at the next chunk boundary "
            "(send it again to abort without saving).",
            file=sys.stderr,
            flush=True,
        )

    for s in previous:
        signal.signal(s, on_signal)
    try:
        yield flag
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
