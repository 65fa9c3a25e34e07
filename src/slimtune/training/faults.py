"""Stopping a run cleanly: preemption signals and numeric faults end in a saved checkpoint and an exit code.

``RunStopped`` carries the message and exit code the CLI uses (130 for SIGINT, 143 for SIGTERM, 3 for a
non-finite loss or gradient under ``train.on_nonfinite: stop``).
"""

from __future__ import annotations

import os
import signal
import sys
import threading

EXIT_NONFINITE = 3


class RunStopped(Exception):
    """The run stopped before its last step with its state saved; ``exit_code`` is what the CLI returns."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class StopSignals:
    """While active (a context manager), the first SIGINT or SIGTERM only sets :attr:`received`: the training
    loop finishes the current step, saves a checkpoint and stops. A second one exits at once with 128 + signal
    (checkpoints are published by rename, so an exit at any moment leaves the previous one intact).

    Handlers are installed only in the main thread (Python delivers signals there); elsewhere this is inert.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.received is not None:
            sys.stderr.write(f"\nslimtune: {name} again: exiting now; the last saved checkpoint is intact\n")
            sys.stderr.flush()
            os._exit(128 + signum)
        self.received = signum
        sys.stderr.write(
            f"\nslimtune: {name}: finishing this step, then saving a checkpoint and stopping "
            f"({name} again exits at once)\n"
        )
        sys.stderr.flush()

    @staticmethod
    def exit_code(signum: int) -> int:
        return 128 + signum


def stopped_by(signum: int, step: int, steps: int, run_dir) -> RunStopped:
    """The stop of a run a signal ended after ``step`` of ``steps``, its checkpoint saved in ``run_dir``."""
    return RunStopped(
        f"stopped by {signal.Signals(signum).name} after step {step} of {steps}; checkpoint saved in "
        f"{run_dir / 'checkpoint'}; continue with `slimtune train --resume {run_dir}`",
        StopSignals.exit_code(signum),
    )
