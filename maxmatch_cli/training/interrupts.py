"""Ctrl-C and SIGTERM during training: both take one path, which saves the last completed step for ``--resume``.

SIGTERM (``kill``, SLURM preemption, Kubernetes before SIGKILL) is raised as :class:`Terminated`, a
KeyboardInterrupt, inside :func:`sigterm_interrupts`; the end of a step is applied whole (:func:`sigint_deferred`);
the save of an interrupted run is not interrupted again (:func:`sigint_ignored`); DataLoader workers ignore SIGTERM
(:func:`worker_ignores_sigterm`, :func:`workers_started`). Handlers are only touched in the main thread, and the
previous ones are put back.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

__all__ = ["Terminated", "sigint_deferred", "sigint_ignored", "sigterm_interrupts", "worker_ignores_sigterm",
           "workers_started"]


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextmanager
def _handled(signums: list[int], handler: Callable | int) -> Iterator[None]:
    """``handler`` for ``signums`` within the block (main thread only), the previous handlers afterwards."""
    if not _main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, handler) for signum in signums}
    try:
        yield
    finally:
        for signum, old in previous.items():  # None: set outside Python
            signal.signal(signum, signal.SIG_DFL if old is None else old)


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, SLURM preemption, Kubernetes before SIGKILL), raised where Ctrl-C raises
    KeyboardInterrupt so that it takes the same path: the run saves its last step boundary and releases its lock.
    The command then exits with ``exit_status`` (128 + 15)."""

    exit_status = 128 + signal.SIGTERM


def _raise_terminated(signum, frame):
    raise Terminated


@contextmanager
def sigterm_interrupts():
    """Within the block, SIGTERM raises :class:`Terminated` (main thread only; the previous handler is put back
    afterwards). Under torchrun every worker gets the SIGTERM torchrun forwards, and each takes Ctrl-C's path."""
    with _handled([signal.SIGTERM], _raise_terminated):
        yield


def worker_ignores_sigterm(worker_id: int) -> None:
    """DataLoader workers ignore SIGTERM: SLURM (and process-group kills) send it to every process, and a worker
    killed by it makes PyTorch raise "DataLoader worker ... is killed by signal" in the main process at any point,
    even during the save of the interrupted run. The main process takes SIGTERM's path and stops its workers
    itself (they also exit when it does). Changes no random draw."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})  # blocked since the fork (workers_started)


@contextmanager
def workers_started():
    """Block SIGTERM while the DataLoader forks its workers: they inherit the mask, so one that arrives before a
    worker ignores it (:func:`worker_ignores_sigterm`) waits and is then dropped; the main process gets it when
    the block ends."""
    if not _main_thread():
        yield
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})


def _interrupt_signals() -> list[int]:
    """SIGINT, and SIGTERM where :func:`sigterm_interrupts` made it an interrupt."""
    return [signal.SIGINT] + ([signal.SIGTERM] if signal.getsignal(signal.SIGTERM) is _raise_terminated else [])


@contextmanager
def sigint_ignored():
    """Ignore Ctrl-C (and SIGTERM) while the interrupted run is saved: torchrun forwards the SIGINT it receives to
    every worker, so a worker gets a second one right after the terminal's, which would abort the save (torchrun
    still kills workers that take longer than its shutdown timeout); SLURM sends SIGTERM to every process of a job
    step, torchrun forwards it once more."""
    with _handled(_interrupt_signals(), signal.SIG_IGN):
        yield


@contextmanager
def sigint_deferred():
    """Hold a Ctrl-C (or SIGTERM) back until the block ends: the end of a step (optimiser update, counters, loss
    records) is applied whole or not at all, so the step boundary a checkpoint saves is always a consistent one."""
    received: list[int] = []
    with _handled(_interrupt_signals(), lambda signum, _: received.append(signum)):
        yield
    if received:
        raise Terminated if signal.SIGTERM in received else KeyboardInterrupt
