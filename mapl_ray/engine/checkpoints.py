"""In-loop checkpoints written beside training.

The training thread takes a :class:`~mapl_ray.runfolder.CheckpointSnapshot` (host copies of everything
the checkpoint holds, so the next step may change the weights), and a background thread writes it to
``RUN/checkpoint`` exactly as a synchronous save does (``checkpoint.tmp/`` swapped in,
:func:`~mapl_ray.runfolder.write_checkpoint`): writing a checkpoint (mostly the memory banks) no longer
stops training (measured in ``bench/results/checkpoint.json`` and ``train_phases.json``).

A finished checkpoint is handed to ``on_checkpoint`` (Ray Train's report) on the training thread, in the
order of the steps, on every rank: with one rank at the first step boundary after its write finished;
with several (DDP) when the next checkpoint is taken and at the end of training, the same steps on every
rank, as Ray Train's report is a barrier.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from ..runfolder import CheckpointSnapshot, write_checkpoint

log = logging.getLogger("mapl_ray.train")


def _signals_to_the_main_thread() -> None:
    """Block SIGINT / SIGTERM in this (writer) thread, so the kernel delivers them to a thread that does not
    block them: the main thread, whose waits they then interrupt (a signal that lands in another thread
    only sets Python's flag, and a main thread waiting on a lock sees it when the wait ends)."""
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})


class CheckpointWriter:
    """Writes checkpoints in a background thread, one at a time, and hands each one over when it is written.

    Args:
        run_dir: the run folder (``RUN/checkpoint`` is written there).
        on_checkpoint: called on the training thread with ``(step, the checkpoint folder)`` (None on ranks
            that write nothing) once that checkpoint is complete; None: nothing to hand over.
        lockstep: hand over only at :meth:`submit` and :meth:`drain`, never at :meth:`poll` (several ranks:
            every rank must hand over at the same step).
    """

    def __init__(
        self, run_dir: str | Path, on_checkpoint: Callable[[int, Path | None], None] | None, lockstep: bool = False
    ):
        self.run_dir, self.on_checkpoint, self.lockstep = Path(run_dir), on_checkpoint, lockstep
        self._executor: ThreadPoolExecutor | None = None
        #: the checkpoint not yet handed over: (its step, its write; None on a rank that writes nothing)
        self._pending: tuple[int, Future | None] | None = None

    def submit(self, step: int, snapshot: CheckpointSnapshot | None) -> None:
        """Hand over the previous checkpoint (:meth:`drain`: its write must finish first), then start writing
        ``snapshot``, the checkpoint of ``step`` (None: this rank writes nothing, it only hands over).

        Raises:
            the previous write's error (e.g. OSError).
        """
        self.drain()
        future = None
        if snapshot is not None:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(
                    1, thread_name_prefix="mapl-checkpoint", initializer=_signals_to_the_main_thread
                )
            future = self._executor.submit(write_checkpoint, self.run_dir, snapshot)
        self._pending = (step, future)

    def poll(self) -> None:
        """At a step boundary: hand the pending checkpoint over if its write has finished (not in lockstep).

        Raises:
            the write's error.
        """
        if self._pending is not None and not self.lockstep:
            future = self._pending[1]
            if future is None or future.done():
                self.drain()

    def drain(self) -> None:
        """Wait for the pending write, then hand the checkpoint over.

        Raises:
            the write's error (the checkpoint is then not handed over).
        """
        if self._pending is None:
            return
        step, future = self._pending
        self._pending = None
        path = future.result() if future is not None else None
        if self.on_checkpoint is not None:
            self.on_checkpoint(step, path)

    def abort(self) -> None:
        """An exception (a KeyboardInterrupt too) is leaving training: wait for a running write, so
        ``RUN/checkpoint`` is complete, and do not hand it over (the other ranks may not be there to report).
        A failed write is logged: the exception that is leaving stays the one raised."""
        if self._pending is None:
            return
        step, future = self._pending
        self._pending = None
        error = future.exception() if future is not None else None
        if error is not None:
            log.error("the checkpoint of step %d was not written: %r", step, error)

    def close(self) -> None:
        """Stop the writer thread (after :meth:`drain` or :meth:`abort`); a later :meth:`submit` starts another."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
