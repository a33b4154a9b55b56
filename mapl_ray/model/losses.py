"""The losses of MAPL: 0.6 L1 + 0.4 focal on the anomaly map (MemSeg sec. 3.6, MAPL eq. 14) and BCE of the
image head on labeled (L_Yl) and pseudo-labeled (L_Yu) images (MAPL eqs. 15-17), assembled per batch.

Every term is computed on logits with the autograd graph intact (a loss built from detached scores
trains nothing), and samples are selected by 0/1 weights rather than boolean indexing, so the
training step never waits for the GPU."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import Config


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


def focal_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    gamma: float = 4.0,
    alpha: float | None = None,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
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


def segmentation_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    l1_weight: float = 0.6,
    focal_weight: float = 0.4,
    gamma: float = 4.0,
    alpha: float | None = None,
    weights: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """``{"l1", "focal", "seg"}`` with ``seg = l1_weight * l1 + focal_weight * focal`` (scalars).

    ``weights``: optional per-sample weights ``(B,)``; with 0/1 weights the result equals the loss of
    the selected samples alone.
    """
    l1 = l1_loss(logits, target, weights)
    focal = focal_loss(logits, target, gamma, alpha, weights)
    return {"l1": l1, "focal": focal, "seg": l1_weight * l1 + focal_weight * focal}


def masked_bce(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean BCE-with-logits over the samples where ``mask`` is true, without host-device syncs.

    The training step's form of eqs. 15-17: no validation and no boolean indexing, so the GPU
    queue never waits for the host. Inputs are trusted (built by the training loop).

    Args:
        logits: float ``(B,)`` image-level logits with gradient.
        targets: ``(B,)`` numbers in {0, 1} where ``mask`` is true (anything elsewhere).
        mask: bool ``(B,)``.

    Returns:
        Scalar tensor; a graph-attached 0 when ``mask`` selects nothing.
    """
    logits = logits.float().reshape(-1)
    w = mask.to(logits.dtype)
    t = targets.to(logits.dtype).clamp(0, 1)
    per = F.binary_cross_entropy_with_logits(logits, t, reduction="none")
    return (per * w).sum() / w.sum().clamp_min(1.0)


def compute_losses(
    out: dict[str, torch.Tensor],
    masks: torch.Tensor,
    kind: torch.Tensor,
    label: torch.Tensor,
    pseudo: torch.Tensor,
    cfg: Config,
) -> dict[str, torch.Tensor]:
    """All loss terms of one batch (scalars with gradient; MAPL eq. 14 and eqs. 15-17).

    Args:
        out: model output (``logits`` ``(B, 1, H, W)``, ``q`` ``(B,)``).
        masks: float ``(B, 1, H, W)`` targets of the anomaly map (zeros for normals).
        kind: int ``(B,)`` 0 normal (labeled, or a pool image pseudo-labeled normal), 1 simulated,
            2 pool image in the pseudo-labeled slots, 3 labeled anomaly.
        label: int ``(B,)`` image labels: 0 / 1, and for ``kind`` 2 the pool image's pseudo-label
            (1 / 0 / -1 unknown).
        pseudo: int ``(B,)`` on-device pseudo-labels of the batch (1 / 0 / -1,
            :meth:`~mapl_ray.pseudo.labeler.PseudoLabeler.predict`); only simulated images use them.

    The segmentation loss (0.6 L1 + 0.4 focal) uses the images with known masks (kinds 0, 1, 3),
    except simulated images that the pseudo-labeler calls normal (0) when ``pseudo.filter_simulations``:
    simulations that failed to look anomalous. L_Yl (eqs. 15-16) trains the image head on the
    labeled images: normals -> 0, labeled and (kept) simulated anomalies -> 1. L_Yu (eq. 17) trains it
    on the pool images with a pseudo-label (kind 2, label 0 or 1). Samples are selected by 0/1
    weights rather than boolean indexing, so the step never waits for the GPU.
    """
    L = cfg.loss
    known = kind != 2
    if cfg.pseudo.filter_simulations:
        known = known & ~((kind == 1) & (pseudo == 0))
    seg = segmentation_loss(
        out["logits"], masks, L.l1_weight, L.focal_weight, L.focal_gamma, L.focal_alpha, weights=known
    )
    l_yl = masked_bce(out["q"], label, known)
    l_yu = masked_bce(out["q"], label, (kind == 2) & (label != -1))
    total = seg["seg"] + L.labeled_bce_weight * l_yl + L.pseudo_bce_weight * l_yu
    return {"loss": total, "l1": seg["l1"], "focal": seg["focal"], "l_yl": l_yl, "l_yu": l_yu}
