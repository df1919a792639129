"""Stopping on a signal at an iteration boundary (preemption), and DataLoader workers that leave with it.

:class:`StopRequest` turns SIGINT / SIGTERM / SIGUSR1 into a flag the training loop reads once per step
(engine.py); the loop then raises :class:`Preempted` after the hooks, so the checkpoint hook has saved the
iteration. Loader workers ignore the signals (:func:`ignore_stop_signals`) and are shut down by the main
process (:func:`worker_batches`).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any, Callable, Dict, Optional

import torch
import torch.distributed as dist

import distributed

STOP_SIGNALS = ("SIGINT", "SIGTERM", "SIGUSR1")  # Ctrl-C, kill / scancel / torchrun, SLURM's --signal


class Preempted(Exception):
    """A stop signal ended training at an iteration boundary (after the checkpoint was written)."""

    def __init__(self, signum: int, epoch: int, iteration: int, n_iters: int):
        super().__init__(f"{signal.Signals(signum).name} at epoch {epoch}, iteration {iteration}/{n_iters}")
        self.signum, self.epoch, self.iteration, self.n_iters = signum, epoch, iteration, n_iters


class StopRequest:
    """While installed, SIGINT / SIGTERM / SIGUSR1 only set a flag, which the training loop reads at
    each iteration boundary: no KeyboardInterrupt in the middle of a step. The previous handlers come
    back on ``restore`` (or leaving the ``with`` block)."""

    def __init__(self) -> None:
        self.signum = 0  # the first stop signal received; 0: none
        self._previous: Dict[int, Any] = {}

    def _handle(self, signum: int, frame) -> None:
        self.signum = self.signum or signum  # async-signal context: set a flag, nothing else

    def install(self) -> "StopRequest":
        if threading.current_thread() is not threading.main_thread():
            return self  # Python lets only the main thread set handlers; the defaults stay
        for name in STOP_SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()

    def __enter__(self) -> "StopRequest":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.restore()

    def agreed(self) -> int:
        """The signal every rank stops for (the largest number any rank received; 0: none). Collective."""
        if not distributed.is_dist():
            return self.signum
        flag = torch.tensor([float(self.signum)], device=_collective_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())


def _collective_device() -> torch.device:
    backend = dist.get_backend()
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def ignore_stop_signals(worker_id: int, then: Optional[Callable[[int], None]] = None) -> None:
    """A DataLoader worker's init: the stop signals reach the whole process group (Ctrl-C, SLURM), but
    only the main process acts on them and shuts its workers down; SIGUSR1 would kill them outright."""
    for name in STOP_SIGNALS:
        sig = getattr(signal, name, None)
        if sig is not None:
            signal.signal(sig, signal.SIG_IGN)
    if then is not None:
        then(worker_id)


@contextlib.contextmanager
def worker_batches(loader):
    """Iterate ``loader``; its worker processes are shut down when the block is left, by an error too.

    Otherwise a traceback that keeps the iterator alive (an error caught and reported as one line)
    keeps its workers alive: they ignore the stop signals (:func:`ignore_stop_signals`), so the
    interpreter would wait for them at exit.
    """
    it = iter(loader)
    try:
        yield it
    finally:
        shutdown = getattr(it, "_shutdown_workers", None)  # torch's multi-process iterator only
        if shutdown is not None:
            shutdown()
