"""How long a ``@serve.batch`` batch collects images, set from the load the replica sees.

Ray Serve (2.60, since ray-project/ray#53096) forms the next batch as soon as the previous one was
*formed*, not when it finished: with ``max_concurrent_batches=1`` and a batch wait of 0, every image
that arrives while a forward pass runs becomes a batch of its own and waits in line for the pass, so
under load the passes are one image each (seen on the 2-core machine: 8 concurrent clients, batches of
1; docs/serving.md, "Batching under load"). :class:`BatchWait` uses the decorator's own setter
(``set_batch_wait_timeout_s``) so that, while images are waiting, the next batch collects for as
long as the last pass took, and a lone image (nothing else waiting) does not wait at all.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

#: the longest a batch collects under load (seconds), whatever the last pass took
MAX_BUSY_WAIT_S = 0.1

#: ``ServeSettings.graph_batch_sizes`` values: the batch sizes a CUDA-graph replica captures
GRAPH_BATCH_SIZES = ("pow2", "fine")


def graph_buckets(max_batch: int, kind: str = "pow2") -> list[int]:
    """The batch sizes a CUDA-graph predictor captures for serving; a batch is padded to the next one.

    ``pow2``: powers of 2 below ``max_batch``, then ``max_batch`` (a batch of 9 runs as a pass of 16).
    ``fine``: also 1.5 times powers of 2 (3, 6, 12, 24, ...), so a padded pass is at most 1.5 times its
    batch, at the cost of more graphs to capture when a replica starts.

    Args:
        max_batch: the largest batch, >= 1.
        kind: ``pow2`` or ``fine`` (:data:`GRAPH_BATCH_SIZES`).

    Returns:
        ascending sizes: ``[1, 2, 4, 8, 16, 32]`` / ``[1, 2, 3, 4, 6, 8, 12, 16, 24, 32]`` for 32.

    Raises:
        ValueError: ``max_batch`` < 1 or an unknown ``kind``.
    """
    if max_batch < 1:
        raise ValueError(f"max_batch: expected >= 1, got {max_batch}")
    if kind not in GRAPH_BATCH_SIZES:
        raise ValueError(f"graph_batch_sizes: expected one of {', '.join(GRAPH_BATCH_SIZES)}, got {kind!r}")
    steps = {2**k for k in range(max_batch.bit_length())}
    if kind == "fine":
        steps |= {3 * 2 ** (k - 1) for k in range(1, max_batch.bit_length())}
    return sorted({s for s in steps if s < max_batch} | {max_batch})


class BatchWait:
    """The batch wait of one ``@serve.batch`` method of one replica, in place of a fixed one.

    Callers of the method count themselves with :meth:`waiting` around their ``await``; the batch
    function runs each batch inside :meth:`batch`. While a batch runs, the wait is the last batch's
    duration (at least ``idle_s``, at most :data:`MAX_BUSY_WAIT_S`); when a batch ends with nobody
    else waiting, it goes back to ``idle_s``.

    Args:
        method: the bound ``@serve.batch`` method (anything with ``set_batch_wait_timeout_s(float)``).
        idle_s: the wait with no load (``ServeSettings.batch_wait_timeout_s``), seconds >= 0.
        adaptive: False keeps ``idle_s`` under load too (Serve's fixed wait;
            ``ServeSettings.adaptive_batch_wait``).

    Raises:
        ValueError: ``idle_s`` negative or not finite.
    """

    def __init__(self, method: Any, idle_s: float, adaptive: bool = True):
        if not 0.0 <= idle_s < float("inf"):
            raise ValueError(f"batch wait must be a finite number of seconds >= 0, got {idle_s!r}")
        self.method, self.idle_s, self.adaptive = method, float(idle_s), bool(adaptive)
        self.pending = 0  # callers awaiting the method (queued, collecting or in a running batch)
        self.last_s = 0.0  # duration of the last batch
        self.method.set_batch_wait_timeout_s(self.idle_s)

    @contextmanager
    def waiting(self, n: int = 1) -> Iterator[None]:
        """Around a caller's ``await`` of the method for ``n`` items."""
        self.pending += n
        try:
            yield
        finally:
            self.pending -= n

    @contextmanager
    def batch(self, n: int) -> Iterator[None]:
        """Around the batch function's work on ``n`` items: the next batch collects meanwhile."""
        self.method.set_batch_wait_timeout_s(self.wait_s)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.last_s = time.perf_counter() - t0
            if self.pending <= n:  # only this batch's callers: the next image comes alone
                self.method.set_batch_wait_timeout_s(self.idle_s)
            else:
                self.method.set_batch_wait_timeout_s(self.wait_s)

    @property
    def wait_s(self) -> float:
        """The wait under load: the last batch's duration, within ``[idle_s, MAX_BUSY_WAIT_S]``
        (``idle_s`` when not adaptive)."""
        if not self.adaptive:
            return self.idle_s
        return max(self.idle_s, min(MAX_BUSY_WAIT_S, self.last_s))
