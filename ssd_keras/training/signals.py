"""SIGINT/SIGTERM while training.

One job: turn a first signal into a clean stop (the step in progress finishes, a
checkpoint is written, ``fit`` raises ``Stopped``) and a second one into an immediate exit
with code 128 + signum (``_stop_at_once``). docs/EXIT_CODES.md lists the codes.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Callable, Iterable


class Stopped(Exception):
    """Training was stopped by a signal after writing a checkpoint."""

    def __init__(self, message: str, signum: int | None = None):
        super().__init__(message)
        self.signum = signum


class StopSignals:
    """The SIGINT/SIGTERM handlers of a training run and what they received.

    ``requested``: the signal this process received (None: none yet). ``agreed``: data
    parallel, the signal all ranks agreed to stop on (the data-parallel step sets it from
    the ranks' all-reduce); ``stop`` is the one to act on. ``step()`` names the step in
    progress in the message; ``directories`` are cleaned of temporary files by a second
    signal.
    """

    def __init__(self, step: Callable[[], int], directories: Iterable[Path], data_parallel: bool):
        self._step = step
        self._directories = tuple(directories)
        self._data_parallel = data_parallel
        self._previous = None  # while ours are installed: the handlers they replaced
        self.requested = None
        self.agreed = None

    @property
    def stop(self):
        """The signal to stop on: this process's, or (data parallel) the ranks' agreed one,
        so that all ranks leave the loop at the same step."""
        return self.agreed if self._data_parallel else self.requested

    def install(self) -> None:
        """SIGINT/SIGTERM, from ``fit`` until it returns or, once a signal came, until
        ``close()`` (a second signal during the data loader's shutdown still counts).

        The first signal sets a flag: the step in progress finishes, a checkpoint is
        written and ``fit`` raises ``Stopped``. The second one ends the process at once
        (``_stop_at_once``). No-op outside the main thread (Python runs handlers there).
        """
        self.requested = None
        self.agreed = None
        if self._previous is not None:
            return
        previous = {}
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: no signal handling
            pass
        self._previous = previous

    def restore(self) -> None:
        """Give back the handlers ``install`` replaced."""
        previous, self._previous = self._previous, None
        for sig, h in (previous or {}).items():
            signal.signal(sig, h)

    def _handle(self, signum, frame) -> None:
        if self.requested:
            _stop_at_once(signum, self._directories)
        self.requested = signum
        message = (f"\n{signal.Signals(signum).name} received: finishing step {self._step() + 1}, "
                   f"writing a checkpoint and stopping (send it again to stop at once)\n")
        try:  # os.write: safe even if the signal interrupted a print to stderr
            os.write(2, message.encode())
        except OSError:
            pass


def _stop_at_once(signum: int, directories: Iterable[Path]) -> None:
    """A second SIGINT/SIGTERM: end the process now with exit code 128 + signum.

    From the handler itself, not by raising an exception: Python raises a handler's
    exception in whatever code runs when the signal is handled, and code that catches
    everything swallows it. Keras does, in every forward pass (``Functional`` checks
    its inputs inside a bare ``except:``), so the run went on as if the second signal
    never came (it finished the step, wrote a checkpoint and exited 130). Checkpoint
    writes are atomic: the temporary file of a write in progress is removed, every
    checkpoint under its final name is complete.
    """
    for directory in directories:
        try:
            leftovers = list(directory.glob(".tmp-*"))
        except OSError:
            leftovers = []
        for leftover in leftovers:
            try:
                leftover.unlink()
            except OSError:
                pass
    for stream in (sys.stdout, sys.stderr):  # what was printed before still shows
        try:
            stream.flush()
        except Exception:  # e.g. the signal came in the middle of a print
            pass
    message = (f"\nerror: {signal.Signals(signum).name} received as a second signal: "
               f"stopped at once; the checkpoints already written are intact\n")
    try:
        os.write(2, message.encode())
    except OSError:
        pass
    os._exit(128 + signum)
