"""Training progress on the console: tqdm's bar on a terminal, plain log lines elsewhere.

A redirected stderr (``mapl train ... > log 2>&1``) gets no bar, whose frames are carriage returns, but
one line per tenth of the steps and one per phase (logger ``mapl_ray.progress``, INFO).
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
    ``step 12/120 (10%), loss 0.1234, 0.52 s/step`` each ``every`` of the steps and each phase.
    """

    def __init__(self, total: int, initial: int = 0, every: float = 0.1):
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True, disable=None)
        self.total, self.n, self.loss = total, initial, None
        self._t0, self._n0 = time.perf_counter(), initial
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
        if loss is not None:
            self.loss = loss
            self.bar.set_postfix(loss=f"{loss:.4f}")
        if self.plain and self.n >= self._next and self.n > self._n0:
            self._next = (
                min((self.n // self._stride + 1) * self._stride, self.total) if self.n < self.total else math.inf
            )
            rate = (time.perf_counter() - self._t0) / (self.n - self._n0)
            loss_text = f", loss {self.loss:.4f}" if self.loss is not None else ""
            log.info(
                "step %d/%d (%d%%)%s, %.2f s/step", self.n, self.total, 100 * self.n // self.total, loss_text, rate
            )

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
