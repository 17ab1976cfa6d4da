"""Stop requests by signal: checkpoint at the next step boundary, then exit cleanly.

A signal handler may run between any two bytecodes, in the middle of a collective, so it only
sets a flag. The training loop asks :meth:`StopSignal.should_stop` once per step; that call
all-reduces the flag so every rank stops after the same step, writes the checkpoint together
and leaves the loop.

Handled by default: SIGTERM (``kill``, ``scancel``, torchrun shutting down) and SIGUSR1 (a
user asking for a checkpoint and exit). Under submitit the launcher also routes its preemption
signal (SIGUSR2 unless ``SUBMITIT_PREEMPT_SIGNAL`` says otherwise) here; see
:mod:`dinov2.run.submit` for the requeue that follows.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Callable, Dict, Iterable, Optional

from dinov2 import distributed

logger = logging.getLogger("dinov2")

DEFAULT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopSignal:
    """Flag set by signals; ``should_stop()`` is the collective check at a step boundary."""

    def __init__(self, signals: Iterable[int] = DEFAULT_SIGNALS, callback: Optional[Callable[[], None]] = None):
        """``callback`` (e.g. ``SSLTrainer.request_stop``) is called from the handler; it must
        only set a flag."""
        self.signals = tuple(signals)
        self.callback = callback
        self.received: Optional[int] = None  # the first signal number caught, if any
        self.previous: Dict[int, Callable] = {}
        self._installed = False

    def install(self) -> "StopSignal":
        """Install the handlers (main thread only; elsewhere a warning and no handlers)."""
        if threading.current_thread() is not threading.main_thread():
            logger.warning("stop signals not installed: not in the main thread")
            return self
        for signum in self.signals:
            self.previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._handle)
        self._installed = True
        return self

    def uninstall(self) -> None:
        if not self._installed:
            return
        for signum, handler in self.previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._installed = False

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signum
        if self.callback is not None:
            self.callback()
        # logging from a handler can deadlock on the logging lock; a plain write is safe enough
        try:
            import os

            os.write(
                2, f"[dinov2] received {signal.Signals(signum).name}: checkpoint at the next step boundary\n".encode()
            )
        except OSError:
            pass

    def request(self, signum: int = signal.SIGUSR1) -> None:
        """Ask for a stop as if ``signum`` had been received (tests, programmatic use)."""
        self._handle(signum, None)

    @property
    def requested(self) -> bool:
        """This rank has received a stop signal (no communication)."""
        return self.received is not None

    def should_stop(self) -> bool:
        """True on every rank if any rank received a signal. All ranks must call it together."""
        return distributed.any_rank(self.requested)

    def __enter__(self) -> "StopSignal":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()
