"""Learning-rate schedule: linear warm-up, then cosine to the floor (torch schedulers)."""

from __future__ import annotations

import torch


def make_scheduler(optimizer: torch.optim.Optimizer, steps: int, warmup_fraction: float, lr: float, min_lr: float):
    """Linear warm-up over ``warmup_fraction * steps``, then cosine to ``min_lr`` at ``steps`` (torch schedulers)."""
    from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR

    warm = max(1, int(round(warmup_fraction * steps)))
    if warm >= steps:
        return LinearLR(optimizer, start_factor=0.01, total_iters=steps)
    return SequentialLR(
        optimizer,
        [
            LinearLR(optimizer, start_factor=0.01, total_iters=warm),
            CosineAnnealingLR(optimizer, T_max=steps - warm, eta_min=min_lr),
        ],
        milestones=[warm],
    )


def fast_forward(scheduler, steps: int) -> None:
    """Advance ``scheduler`` by ``steps`` without optimizer steps (a resumed run whose length changed:
    the schedule is rebuilt for the new length and replayed up to the saved step)."""
    import warnings

    with warnings.catch_warnings():
        # torch warns about scheduler.step() without optimizer.step(); replaying the schedule is the intent
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
        for _ in range(steps):
            scheduler.step()
