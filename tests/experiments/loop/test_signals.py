"""Tests of experiments.loop.signals."""

import os
import signal
import threading

from experiments.loop.signals import StopFlag, handle_signals


def test_first_signal_sets_the_flag_then_the_previous_handler_returns() -> None:
    calls: list[int] = []

    def previous(signum: int, frame: object) -> None:
        calls.append(signum)

    saved = {s: signal.signal(s, previous) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        flag = StopFlag()
        with handle_signals(flag):
            assert signal.getsignal(signal.SIGINT) is not previous
            assert signal.getsignal(signal.SIGTERM) is not previous
            os.kill(os.getpid(), signal.SIGTERM)
            assert flag.signum == signal.SIGTERM and calls == []
            # The handler stepped aside for SIGTERM only: a second one goes the old way.
            assert signal.getsignal(signal.SIGTERM) is previous
            assert signal.getsignal(signal.SIGINT) is not previous
            os.kill(os.getpid(), signal.SIGTERM)
            assert calls == [signal.SIGTERM]
            os.kill(os.getpid(), signal.SIGINT)
            assert calls == [signal.SIGTERM]  # still the loop's: only the flag is touched
            assert flag.signum == signal.SIGTERM  # the first signal decides the exit code
        assert signal.getsignal(signal.SIGINT) is previous
        assert signal.getsignal(signal.SIGTERM) is previous
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)


def test_nothing_is_installed_outside_the_main_thread() -> None:
    before = signal.getsignal(signal.SIGINT)
    seen: list[object] = []

    def worker() -> None:
        with handle_signals(StopFlag()) as flag:
            seen.append(signal.getsignal(signal.SIGINT))
            seen.append(flag.requested)

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen == [before, False]


def test_stop_flag_keeps_the_first_request() -> None:
    flag = StopFlag()
    assert not flag.requested and flag.signum is None
    flag.request(signal.SIGTERM)
    flag.request(signal.SIGINT)
    assert flag.requested and flag.signum == signal.SIGTERM
    plain = StopFlag()
    plain.request()
    assert plain.signum == signal.SIGINT
