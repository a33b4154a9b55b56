"""Image-level classification losses of MAPL (Chen & Kang, arXiv 2405.06198, eqs. 15-17).

Both losses apply :func:`torch.nn.functional.binary_cross_entropy_with_logits`
to the image head's *logits* with the autograd graph intact: a loss computed
from detached scores would train nothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["labeled_bce", "masked_bce", "pseudo_label_bce"]


def _flat_logits(logits: Tensor, name: str = "logits") -> Tensor:
    if not isinstance(logits, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(logits).__name__}")
    if not logits.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point tensor, got dtype {logits.dtype}")
    # Accept (B, 1) as well as (B,): a 1-unit linear head yields (B, 1).
    if logits.ndim == 2 and logits.shape[1] == 1:
        logits = logits.reshape(-1)
    if logits.ndim != 1:
        raise ValueError(f"{name}: expected shape (B,) or (B, 1), got {tuple(logits.shape)}")
    return logits


def _zero_like_loss(logits: Tensor) -> Tensor:
    # A 0 that is still attached to the graph, so `loss = a + b` always backprops.
    return logits.sum() * 0.0


def masked_bce(logits: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
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


def labeled_bce(logits: Tensor, targets: Tensor) -> Tensor:
    """BCE on labeled samples, L_Yl (MAPL eqs. 15-16).

    Args:
        logits: float tensor ``(B,)`` or ``(B, 1)``, image-level anomaly logits
            (pre-sigmoid), with gradient.
        targets: tensor ``(B,)`` (any numeric/bool dtype) with values in {0, 1}
            (1 = anomalous).

    Returns:
        Scalar tensor, mean BCE over the batch; a graph-attached zero when B = 0.

    Raises:
        TypeError: if ``logits`` is not a tensor.
        ValueError: naming the argument, if ``logits`` is not floating point or
            not ``(B,)``/``(B, 1)``, or ``targets`` has a different length or
            values outside {0, 1}.
    """
    logits = _flat_logits(logits)
    targets = torch.as_tensor(targets, device=logits.device)
    if targets.ndim != 1 or targets.shape[0] != logits.shape[0]:
        raise ValueError(
            f"targets: expected shape ({logits.shape[0]},) to match logits, got {tuple(targets.shape)}"
        )
    if logits.shape[0] == 0:
        return _zero_like_loss(logits)
    targets = targets.to(logits.dtype)
    if not bool(((targets == 0) | (targets == 1)).all()):
        raise ValueError("targets: expected values in {0, 1}")
    return masked_bce(logits, targets, torch.ones_like(targets, dtype=torch.bool))


def pseudo_label_bce(logits: Tensor, pseudo_labels: Tensor) -> Tensor:
    """BCE on pseudo-labeled unlabeled samples, L_Yu (MAPL eq. 17).

    Samples whose pseudo-label is -1 (no OCC consensus, see
    :meth:`mapl_ray.pseudo.OCCEnsemble.predict`) are excluded; the loss is the
    mean BCE over the remaining ones.

    Args:
        logits: float tensor ``(B,)`` or ``(B, 1)``, image-level logits with gradient.
        pseudo_labels: integer tensor ``(B,)`` with values in {1, 0, -1}.

    Returns:
        Scalar tensor. When no sample has a 0/1 pseudo-label it is
        ``logits.sum() * 0``: zero, but carrying ``grad_fn`` so callers can add
        it to the total loss unconditionally.

    Raises:
        TypeError: if ``logits`` is not a tensor.
        ValueError: naming the argument, if shapes mismatch, ``pseudo_labels`` is
            floating point, or holds values outside {1, 0, -1}.
    """
    logits = _flat_logits(logits)
    pseudo_labels = torch.as_tensor(pseudo_labels, device=logits.device)
    if pseudo_labels.ndim != 1 or pseudo_labels.shape[0] != logits.shape[0]:
        raise ValueError(
            f"pseudo_labels: expected shape ({logits.shape[0]},) to match logits, "
            f"got {tuple(pseudo_labels.shape)}"
        )
    if pseudo_labels.is_floating_point():
        raise ValueError(f"pseudo_labels: expected an integer tensor, got dtype {pseudo_labels.dtype}")
    pseudo_labels = pseudo_labels.long()
    if not bool(((pseudo_labels >= -1) & (pseudo_labels <= 1)).all()):
        raise ValueError("pseudo_labels: expected values in {1, 0, -1}")
    return masked_bce(logits, pseudo_labels, pseudo_labels != -1)
