"""Progress on the console: tqdm's bar on a terminal, plain log lines elsewhere.

A redirected stderr (``mapl train ... > log 2>&1``, a cluster batch job's log) gets no bar, whose frames
are carriage returns, but one line per tenth of the work (training steps, :class:`TrainProgress`, with
one per phase; images of ``mapl prepare`` / ``mapl score``, :class:`CountProgress`) through the logger
``mapl_ray.progress`` (INFO).
"""

from __future__ import annotations

import logging
import math
import time

log = logging.getLogger("mapl_ray.progress")


class TrainProgress:
    """The progress of ``total`` training steps, starting at step ``initial``.

    On a terminal: tqdm's bar (``train``, steps, the last loss; :meth:`phase` in its description). Elsewhere
    tqdm draws nothing (its ``disable=None``: off when stderr is not a TTY) and this logs
    ``step 12/120 (10%), loss 0.1234, 0.52 s/step`` each ``every`` of the steps and each phase; the s/step
    is the pace since the previous line (from the first step done: start-up is not a step).
    """

    def __init__(self, total: int, initial: int = 0, every: float = 0.1):
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True, disable=None)
        self.total, self.n, self.loss = total, initial, None
        self._n0 = initial
        # the pace is measured from the first step done on, between log lines: the start-up before it (data,
        # memory-bank fill) made early lines read several times the real s/step
        self._t_last: float | None = None
        self._n_last = initial
        self._stride = max(1, math.ceil(total * every))
        self._next = min((initial // self._stride + 1) * self._stride, total)

    @property
    def plain(self) -> bool:
        """No bar is drawn (stderr is not a TTY): progress goes out as log lines."""
        return bool(self.bar.disable)

    def update(self, step: int, loss: float | None = None) -> None:
        """Steps ``0 .. step`` (1-based count) are done; ``loss``: the last logged loss, if read."""
        if step > self.n:
            self.bar.update(step - self.n)
            self.n = step
            if self._t_last is None:
                self._t_last, self._n_last = time.perf_counter(), self.n
        if loss is not None:
            self.loss = loss
            self.bar.set_postfix(loss=f"{loss:.4f}")
        if self.plain and self.n >= self._next and self.n > self._n0:
            self._next = (
                min((self.n // self._stride + 1) * self._stride, self.total) if self.n < self.total else math.inf
            )
            now = time.perf_counter()
            done = self.n - self._n_last
            rate = f", {(now - self._t_last) / done:.2f} s/step" if done and self._t_last is not None else ""
            self._t_last, self._n_last = now, self.n
            loss_text = f", loss {self.loss:.4f}" if self.loss is not None else ""
            log.info("step %d/%d (%d%%)%s%s", self.n, self.total, 100 * self.n // self.total, loss_text, rate)

    def phase(self, text: str) -> None:
        """Say what the run does now between steps (e.g. ``saving the final checkpoint``): the bar's
        description on a terminal, a log line elsewhere; ``""``: the phase is over."""
        if not self.plain:
            self.bar.set_description(f"train: {text}" if text else "train")
        elif text:
            log.info("%s", text)

    def close(self) -> None:
        """End the bar (its last frame stays, described as ``train``)."""
        if not self.plain:
            self.bar.set_description("train", refresh=False)
        self.bar.close()


class CountProgress:
    """Progress of a count of items (``mapl prepare``'s and ``mapl score``'s images): tqdm's bar on a terminal;
    elsewhere (no TTY: a batch job's log) a plain line ``desc: 2500/25000 img (10%), 850 img/s`` each tenth
    of ``total``, or each ``interval_s`` seconds when ``total`` is None (logger ``mapl_ray.progress``, INFO).
    The same ``update(n)`` / ``close()`` calls as a tqdm bar."""

    def __init__(self, total: int | None, desc: str, unit: str = "img", every: float = 0.1, interval_s: float = 30.0):
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, disable=None)
        self.total, self.desc, self.unit, self.n = total, desc, unit, 0
        self._t0 = self._last = time.perf_counter()
        self._stride = max(1, math.ceil(total * every)) if total else None
        self._next = self._stride
        self._interval = interval_s
        self._logged = 0  # the count of the last line

    def update(self, n: int) -> None:
        """``n`` more items are done."""
        self.bar.update(n)
        self.n += n
        if not self.bar.disable:
            return
        now = time.perf_counter()
        due = self.n >= self._next if self._stride else now - self._last >= self._interval
        if due:
            if self._stride:
                self._next = (self.n // self._stride + 1) * self._stride
            self._last = now
            self._log(now)

    def _log(self, now: float) -> None:
        self._logged = self.n
        rate = self.n / max(now - self._t0, 1e-9)
        of = f"/{self.total} {self.unit} ({100 * self.n // self.total}%)" if self.total else f" {self.unit}"
        log.info("%s: %d%s, %s %s/s", self.desc, self.n, of, f"{rate:.0f}" if rate >= 10 else f"{rate:.2g}", self.unit)

    def close(self) -> None:
        """End the bar; without one, a last line when the count ended between two lines."""
        if self.bar.disable and self.n != self._logged:
            self._log(time.perf_counter())
        self.bar.close()
