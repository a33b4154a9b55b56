"""Exponential moving average of the trainable weights (``train.ema_decay``)."""

from __future__ import annotations

import contextlib

import torch


class WeightEMA:
    """Exponential moving average of the trainable parameters (``ema = decay * ema + (1 - decay) * p``).

    The averaged weights are what is saved and evaluated (smoother than the last iterate of a short,
    noisy run); the raw weights travel in ``optimizer.pt`` so ``--resume`` continues exactly.
    """

    def __init__(self, params: list[torch.nn.Parameter], decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"train.ema_decay must be in (0, 1) or 0 to disable, got {decay}")
        self.params, self.decay = params, decay
        self.shadow = [p.detach().clone() for p in params]

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1.0 - self.decay)

    def raw_copy(self) -> list[torch.Tensor]:
        return [r.cpu().clone() for r in self._raw]

    @torch.no_grad()
    def copy_to_params(self) -> None:
        for p, e in zip(self.params, self.shadow):
            p.copy_(e)

    @torch.no_grad()
    def resume(self, raw: list[torch.Tensor] | None) -> None:
        """After loading a checkpoint (averaged weights in the params): shadow <- params, params <- raw."""
        self.shadow = [p.detach().clone() for p in self.params]
        if raw is not None:
            for p, r in zip(self.params, raw):
                p.copy_(r.to(p.device))

    @contextlib.contextmanager
    def swapped(self):
        """Within the block the parameters hold the averaged weights; the raw ones are restored after."""
        self._raw = [p.detach().clone() for p in self.params]
        self.copy_to_params()
        try:
            yield
        finally:
            with torch.no_grad():
                for p, r in zip(self.params, self._raw):
                    p.copy_(r)
