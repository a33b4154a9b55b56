"""Segmentation losses on the anomaly map: 0.6 L1 + 0.4 focal (MemSeg sec. 3.6, MAPL eq. 14)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _reduce(per_pixel: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Mean over pixels, or, with per-sample ``weights`` ``(B,)``, the weighted mean of per-sample means.

    Weights of 0 leave a sample out without boolean indexing (no host-device sync in the training
    step); with all weights 0 the result is a graph-attached 0.
    """
    if weights is None:
        return per_pixel.mean()
    per_sample = per_pixel.flatten(1).mean(1)
    w = weights.to(per_sample.dtype)
    return (per_sample * w).sum() / w.sum().clamp_min(1.0)


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 4.0, alpha: float | None = None,
               weights: torch.Tensor | None = None) -> torch.Tensor:
    """Binary focal loss (Lin et al., ICCV 2017), mean over pixels.

    Args:
        logits: ``(B, 1, H, W)`` float anomaly logits.
        target: ``(B, 1, H, W)`` float in {0, 1} (ground-truth or simulated mask).
        gamma: focusing parameter (MAPL: 4).
        alpha: optional weight of the anomalous class in [0, 1].
        weights: optional per-sample weights ``(B,)`` (0 / 1 selects samples; see :func:`_reduce`).

    Returns:
        scalar float tensor.
    """
    logits = logits.float()
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p = torch.sigmoid(logits)
    p_t = p * target + (1 - p) * (1 - target)
    loss = (1 - p_t).pow(gamma) * ce
    if alpha is not None:
        loss = loss * (alpha * target + (1 - alpha) * (1 - target))
    return _reduce(loss, weights)


def l1_loss(logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean absolute difference between ``sigmoid(logits)`` and the mask (both ``(B, 1, H, W)``);
    ``weights`` ``(B,)`` as in :func:`focal_loss`."""
    return _reduce((torch.sigmoid(logits.float()) - target).abs(), weights)


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, l1_weight: float = 0.6, focal_weight: float = 0.4,
                      gamma: float = 4.0, alpha: float | None = None, weights: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """``{"l1", "focal", "seg"}`` with ``seg = l1_weight * l1 + focal_weight * focal`` (scalars).

    ``weights``: optional per-sample weights ``(B,)``; with 0/1 weights the result equals the loss of
    the selected samples alone.
    """
    l1 = l1_loss(logits, target, weights)
    focal = focal_loss(logits, target, gamma, alpha, weights)
    return {"l1": l1, "focal": focal, "seg": l1_weight * l1 + focal_weight * focal}
