"""Ending a run cleanly on SIGTERM (SLURM pre-emption, ``scancel``, a time limit).

Python's default for SIGTERM is to die at once, in the middle of whatever the process was doing:
no resume state, a run lock left to the kernel, maybe half a line in ``metrics.jsonl``. Recipes
handle it in one of two ways, chosen by what their unit of saved work is:

* **Stop at a step boundary** (fine-tuning): :class:`StopAtStep` only records the signal; the
  training loop asks :meth:`StopAtStep.agreed` after every optimiser step, all processes agree
  (one all-reduce of a flag, so every rank stops after the same step even when the signal
  reached them at different moments), the resume state is written and the run exits.
* **Abandon the unit in progress** (extraction chunks, kernel splits): under
  :func:`exit_on_sigterm` the signal raises :class:`Terminated` wherever the program is, like
  Ctrl-C does; atomic writes leave no half-written file, finished units stay on disk for the
  next run, and the process ends with one line on stderr.

Either way the exit status is :data:`EXIT_STATUS` (143 = 128 + SIGTERM, what a shell reports for
a process killed by SIGTERM), so SLURM and job scripts see a run that did not finish and may
requeue it; started again with the same command, the run continues where it stopped.

A second SIGTERM does nothing more: SLURM follows the first with SIGKILL after its grace period
(``KillWait``, 30 s by default; ``sbatch --signal=TERM@120`` sends SIGTERM earlier). Handlers are
installed only in the main thread, where Python runs them; elsewhere the default stays.

Example::

    >>> with StopAtStep() as stop:
    ...     stop.requested
    False
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

import torch

EXIT_STATUS = 128 + signal.SIGTERM
"""Exit status of a run that stopped on SIGTERM (143), as the shell reports a killed process."""


class Terminated(BaseException):
    """SIGTERM arrived under :func:`exit_on_sigterm`.

    A ``BaseException``, like ``KeyboardInterrupt``, so that no ``except Exception`` on the way
    swallows it.
    """


def _say(line: str) -> None:
    # os.write, not print: a signal handler may run in the middle of another print
    os.write(2, (line + "\n").encode())


def _in_main_thread() -> bool:
    # signal.signal works there only; Python runs every handler in the main thread anyway
    return threading.current_thread() is threading.main_thread()


def _restore(previous: Any) -> None:
    # signal.signal returns None for a handler installed outside Python: the default then
    signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


class StopAtStep:
    """Record SIGTERM while inside; the loop stops at the next step boundary all ranks agree on.

    Attributes:
        requested: whether this process received SIGTERM.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None
        self._installed = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if not self.requested:
            _say("SIGTERM received: stopping after this step, once the resume state is saved.")
        self.requested = True

    def __enter__(self) -> StopAtStep:
        if _in_main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
            self._installed = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self._installed:
            _restore(self._previous)
            self._installed = False

    def agreed(self, device: torch.device | str = "cpu") -> bool:
        """Whether any process received SIGTERM; a collective: every process must call it.

        Args:
            device: where the flag is reduced (the process's accelerator: NCCL needs CUDA).

        Returns:
            The same answer on every process.
        """
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return self.requested
        flag = torch.tensor([float(self.requested)], device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())


def _raise(signum: int, frame: FrameType | None) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not interrupt the exit
    raise Terminated()


@contextmanager
def exit_on_sigterm(kept: str) -> Iterator[None]:
    """Inside, SIGTERM abandons the work in progress and ends the process with status 143.

    The output-folder locks this process holds are released (``adaptlab.rundir``) and one line
    says what was kept.

    Args:
        kept: what stays on disk for the next run, e.g. ``"finished chunks in out/.parts"``.

    Raises:
        SystemExit: with :data:`EXIT_STATUS`, when SIGTERM arrived.
    """
    from adaptlab.rundir import release_all

    installed = _in_main_thread()
    previous = signal.signal(signal.SIGTERM, _raise) if installed else None
    try:
        yield
    except Terminated:
        release_all()
        _say(f"stopped by SIGTERM; {kept} are kept: run the same command to continue.")
        raise SystemExit(EXIT_STATUS) from None
    finally:
        if installed:
            _restore(previous)
