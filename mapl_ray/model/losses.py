"""Segmentation losses on the anomaly map: 0.6 L1 + 0.4 focal (MemSeg sec. 3.6, MAPL eq. 14)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 4.0, alpha: float | None = None) -> torch.Tensor:
    """Binary focal loss (Lin et al., ICCV 2017), mean over pixels.

    Args:
        logits: ``(B, 1, H, W)`` float anomaly logits.
        target: ``(B, 1, H, W)`` float in {0, 1} (ground-truth or simulated mask).
        gamma: focusing parameter (MAPL: 4).
        alpha: optional weight of the anomalous class in [0, 1].

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
    return loss.mean()


def l1_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference between ``sigmoid(logits)`` and the mask (both ``(B, 1, H, W)``)."""
    return (torch.sigmoid(logits.float()) - target).abs().mean()


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, l1_weight: float = 0.6, focal_weight: float = 0.4,
                      gamma: float = 4.0, alpha: float | None = None) -> dict[str, torch.Tensor]:
    """``{"l1", "focal", "seg"}`` with ``seg = l1_weight * l1 + focal_weight * focal`` (scalars)."""
    l1 = l1_loss(logits, target)
    focal = focal_loss(logits, target, gamma, alpha)
    return {"l1": l1, "focal": focal, "seg": l1_weight * l1 + focal_weight * focal}
