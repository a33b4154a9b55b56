"""Anomaly map and image score of a trained network (used by calibration, evaluation, predict and serve).

Map: the sigmoid of the decoder logits, averaged over the memory-bank ensemble
(:meth:`~mapl_ray.model.network.MAPLModel.predict`) and, with test-time augmentation (``eval.tta``),
over flipped / rotated views of the image, each turned back onto the image grid. Image score: the
mean of the ``top_k`` largest map pixels plus ``q_weight`` times the image head's probability.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..config import ORIENTATION_MODES
from ..tensors import autocast_context
from .network import MAPLModel


def tta_views(mode: str) -> list[tuple[int, bool]]:
    """Test-time augmentation views as (quarter turns k, horizontal flip) pairs.

    ``none`` -> the identity; ``flip`` -> identity and horizontal flip; ``rot90`` -> the 8 flips and
    90-degree rotations (the dihedral group D4, the same transforms as ``train.augment=rot90``).

    Raises:
        ValueError: an unknown mode (names ``eval.tta``).
    """
    if mode == "none":
        return [(0, False)]
    if mode == "flip":
        return [(0, False), (0, True)]
    if mode == "rot90":
        return [(k, f) for k in range(4) for f in (False, True)]
    raise ValueError(f"eval.tta must be one of {ORIENTATION_MODES}, got {mode!r}")


def apply_view(x: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    """Rotate ``(..., H, W)`` by ``k`` quarter turns, then flip horizontally when ``flip`` (H == W for odd k)."""
    y = torch.rot90(x, k, dims=(-2, -1)) if k else x
    return torch.flip(y, dims=(-1,)) if flip else y


def invert_view(y: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    """Inverse of :func:`apply_view`: maps computed on a view back onto the original image grid."""
    y = torch.flip(y, dims=(-1,)) if flip else y
    return torch.rot90(y, -k, dims=(-2, -1)) if k else y


def topk_mean(maps: Any, k: int):
    """Image score = mean of the ``k`` largest pixels of each anomaly map.

    Args:
        maps: (N, H, W) ``np.ndarray`` or ``torch.Tensor`` (any device).
        k: number of top pixels, int >= 1; clipped to ``H * W``.

    Returns:
        (N,) of the same type as ``maps``: numpy float (input float dtype kept,
        ints promoted to float64) or a torch float tensor on the same device
        (differentiable through ``torch.topk``).

    Raises:
        ValueError: ``maps`` not 3-D, or ``k`` not an int >= 1.

    Source: top-k mean pooling of anomaly maps, a common image-score rule
    (e.g. MemSeg / anomalib post-processing); ``torch.topk`` / ``np.partition``.
    """
    if isinstance(k, bool) or int(k) != k or k < 1:
        raise ValueError(f"k: expected an int >= 1, got {k!r}")
    k = int(k)
    if hasattr(maps, "topk") and hasattr(maps, "flatten"):  # torch.Tensor
        if maps.dim() != 3:
            raise ValueError(f"maps: expected shape (N, H, W), got {tuple(maps.shape)}")
        flat = maps.flatten(1)
        if not flat.is_floating_point():
            flat = flat.float()
        k = min(k, flat.shape[1])
        return flat.topk(k, dim=1).values.mean(dim=1)
    arr = np.asarray(maps)
    if arr.ndim != 3:
        raise ValueError(f"maps: expected shape (N, H, W), got {arr.shape}")
    flat = arr.reshape(arr.shape[0], -1)
    if not np.issubdtype(flat.dtype, np.floating):
        flat = flat.astype(np.float64)
    k = min(k, flat.shape[1])
    top = np.partition(flat, flat.shape[1] - k, axis=1)[:, flat.shape[1] - k :]
    return top.mean(axis=1)


def anomaly_maps(
    model: MAPLModel,
    x: torch.Tensor,
    views: list[tuple[int, bool]],
    num_banks: int | None = None,
    amp: str = "auto",
    channels_last: bool = False,
    cache: bool = True,
    knn: bool = False,
) -> dict[str, torch.Tensor]:
    """Anomaly maps and head probabilities of images, averaged over the TTA ``views`` and memory banks.

    Args:
        model: a trained network in eval mode, its memory banks filled.
        x: float32 ``(B, 3, H, W)`` in [0, 1] on the model's device (H == W when a view turns by 90 degrees).
        views: ``(quarter turns, flip)`` pairs from :func:`tta_views`; all views go through one forward pass.
        num_banks: average over the first this many memory banks (None: all).
        amp: ``auto`` / ``off`` / ``bf16`` autocast (:func:`~mapl_ray.tensors.autocast_context`).
        channels_last: keep the stacked views channels-last (CUDA).
        cache: autocast's weight-cast cache (off inside a CUDA-graph capture).
        knn: also the patch bank's map (when the model's bank is filled), averaged over the same views.

    Returns:
        ``"maps"`` float32 ``(B, H, W)`` in [0, 1] and ``"q"`` float32 ``(B,)``; with ``knn`` and a
        filled patch bank ``"knn_maps"`` float32 ``(B, H, W)`` (:class:`~mapl_ray.model.patch_bank.PatchBank`).
    """
    b = x.shape[0]
    if len(views) > 1:  # all views in one batch: one forward pass (one CUDA graph)
        x = torch.cat([apply_view(x, k, f) for k, f in views])
        if x.device.type == "cuda" and channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
    with autocast_context(x.device, amp, cache_enabled=cache):
        out = model.predict(x, num_banks, knn_images=x.shape[0] if knn else 0)

    def view_mean(m: torch.Tensor) -> torch.Tensor:  # each view's map turned back, then their mean
        return torch.stack([invert_view(m[i * b : (i + 1) * b], k, f) for i, (k, f) in enumerate(views)]).mean(0)

    maps, q = out["maps"], out["q"]
    knn_maps = out["knn_maps"].float() if "knn_maps" in out else None
    if len(views) > 1:
        maps = view_mean(maps)
        q = q.view(len(views), b).mean(0)
        knn_maps = view_mean(knn_maps) if knn_maps is not None else None
    return {"maps": maps, "q": q} | ({"knn_maps": knn_maps} if knn_maps is not None else {})


def fuse_maps(maps: Any, knn_maps: Any, fusion: dict[str, float] | None):
    """The fused anomaly map ``(1 - w) maps + w (s_map / s_knn) knn_maps`` (``w`` = ``fusion["weight"]``).

    ``s_map`` and ``s_knn`` are the mean top-k scores of the validation normals under each map
    (``fusion["map_scale"]``, ``fusion["knn_scale"]``, :func:`mapl_ray.eval.validation.choose_knn_fusion`):
    the patch bank's distances are brought into the decoder map's units, so ``w`` weighs two maps of like
    units and a normal image scores about as before (in [0, 1]); a patch far from every normal one can
    exceed 1 (heatmap PNGs clip it at 255). ``fusion`` None or ``w`` 0: ``maps`` unchanged.

    Args:
        maps, knn_maps: ``(N, H, W)`` numpy arrays or torch tensors (``knn_maps`` may be None when ``w`` is 0).

    Raises:
        ValueError: ``w`` > 0 without ``knn_maps``.

    Source: score fusion of two detectors after normalising each on normal data (as PatchCore's ensemble
    normalises each member's scores).
    """
    w = float(fusion["weight"]) if fusion else 0.0
    if w == 0:
        return maps
    if knn_maps is None:
        raise ValueError("fusing anomaly maps with a weight > 0 needs the patch bank's maps")
    return (1.0 - w) * maps + w * float(fusion["map_scale"]) / float(fusion["knn_scale"]) * knn_maps


def image_scores(maps: torch.Tensor, q: torch.Tensor, top_k: int, q_weight: float = 0.0) -> torch.Tensor:
    """Image score ``(B,)``: mean of the ``top_k`` largest pixels of each map ``(B, H, W)`` plus
    ``q_weight`` times the head probability ``q`` ``(B,)``."""
    return topk_mean(maps, top_k) + q_weight * q
