"""Pre-emption: SIGTERM (SLURM, Kubernetes, torchrun shutting down) or SIGUSR1 (``sbatch --signal=USR1@120``)
asks the run to checkpoint at the next step boundary and exit cleanly.

The handler only sets a flag; the Trainer all-reduces it at every step boundary, because the signal may reach
one rank before the others and every rank must stop after the same step.
"""
from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """A flag raised by a stop signal; install() it for the duration of training."""

    def __init__(self) -> None:
        self.signum: int | None = None

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signum = signum

    @contextmanager
    def installed(self) -> Iterator[StopRequest]:
        """Route the stop signals here (main thread only: Python delivers signals there), restore afterwards."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
