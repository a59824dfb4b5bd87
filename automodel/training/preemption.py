"""Preemption: SIGTERM / SIGUSR1 ask the loop to finish its step, save and exit 0."""

from __future__ import annotations

import logging
import signal
import threading

logger = logging.getLogger("automodel")

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionHandler:
    """Context manager that records a stop request instead of dying; restores the old handlers on exit."""

    def __init__(self):
        self.requested: str | None = None
        self._previous = {}

    def _handle(self, signum, frame):
        self.requested = signal.Signals(signum).name
        logger.warning("received %s: finishing this step, then saving and exiting", self.requested)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signals only reach the main thread
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False
