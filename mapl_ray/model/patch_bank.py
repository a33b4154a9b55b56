"""Patch nearest-neighbour anomaly maps of the frozen encoder, fused with the decoder's map at inference.

The decoder's map is learned from simulated anomalies; a real defect unlike them (a low-contrast crack on
a textured tile) can stay faint in it. A patch that no normal image has is far from every normal patch
whatever it looks like: PatchCore's score (Roth et al., CVPR 2022: locally aware patch features, a
greedy coreset of the normal patches, the nearest-neighbour distance upsampled and blurred with a
Gaussian of sigma 4). :class:`PatchBank` holds that coreset in the checkpoint;
:func:`~mapl_ray.model.anomaly_map.fuse_maps` mixes the two maps with a weight chosen on the validation
objective (:func:`mapl_ray.eval.validation.choose_knn_fusion`; 0 keeps the decoder's map alone).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..pseudo.patch_knn import fold_out_distances, nearest_distances, patch_embeddings

#: Gaussian blur of the upsampled distance map (PatchCore sec. 3.3)
BLUR_SIGMA = 4.0
#: coreset selection runs on random projections of this many dimensions (PatchCore's Johnson-Lindenstrauss step)
PROJECTION_DIM = 128
#: with no trusted (labeled) patch to set the cut, pool patches above this quantile of their own distances are dropped
POOL_PATCH_QUANTILE = 0.99


@torch.no_grad()
def greedy_coreset(patches: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """Indices of ``size`` rows of ``patches`` chosen by greedy k-center selection (PatchCore sec. 3.2):
    each next row is the one farthest from the rows chosen so far, so rare normal patches are kept.

    Args:
        patches: float32 ``(N, C)`` on any device.
        size: rows to keep, >= 1; all N when N <= size.
        generator: CPU generator (random projection and the first row), so every device chooses alike.

    Returns:
        int64 ``(min(size, N),)`` on ``patches``' device.

    Raises:
        ValueError: ``size`` < 1 or no rows.
    """
    n = patches.shape[0]
    if size < 1 or n < 1:
        raise ValueError(f"coreset: need size >= 1 and at least one patch, got size {size} of {n}")
    if n <= size:
        return torch.arange(n, device=patches.device)
    x = patches.float()
    if x.shape[1] > PROJECTION_DIM:
        proj = torch.randn(x.shape[1], PROJECTION_DIM, generator=generator) / math.sqrt(PROJECTION_DIM)
        x = x @ proj.to(x.device)
    chosen = torch.empty(size, dtype=torch.int64, device=x.device)
    chosen[0] = int(torch.randint(n, (1,), generator=generator))
    x_sq = x.pow(2).sum(1)
    nearest = torch.full((n,), float("inf"), device=x.device)
    # a CPU BLAS's product is 4x faster over the rows held column by column (MKL, 65536 x 128, 2 cores: 1.3
    # against 5.4 ms; the same rows chosen, bench/results/coreset_cpu.json); a GPU keeps them as they are
    rows = x.t().contiguous().t() if x.device.type == "cpu" else x
    for i in range(size):
        if i:
            chosen[i] = nearest.argmax()  # stays on the device: no synchronisation per step
        c = chosen[i]
        # ||x - x_c||^2 by one matrix-vector product over the projected rows (memory-bound: one read of x)
        torch.minimum(nearest, (x_sq + x_sq[c]).sub_(torch.mv(rows, x[c]), alpha=2.0), out=nearest)
    return chosen


@torch.no_grad()
def trusted_patch_mask(
    patches: torch.Tensor,
    owner: torch.Tensor,
    trusted: torch.Tensor,
    reference_size: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, float]:
    """Which candidate patches may enter the bank when some come from unlabeled images: every patch of a
    trusted (labeled normal) image, and an untrusted one only if it is no farther from the patches of the
    *other* images than the farthest trusted patch is (without trusted patches: the
    :data:`POOL_PATCH_QUANTILE` of the untrusted distances).

    The patch-level noise discrimination of SoftPatch (Jiang et al., NeurIPS 2022), with a nearest-neighbour
    outlier score in place of its LOF: a pool defect is a patch that no other image has, so it is far from
    them, while a normal pool patch has neighbours among them; the labeled normals say how far normal
    patches may be. Images are split in two folds and each fold is scored against a reference drawn from
    the other, so no patch meets itself or its own image.

    Args:
        patches: float32 ``(N, C)`` candidate patch features.
        owner: int64 ``(N,)`` image index of each patch (any integers; patches of one image share one).
        trusted: bool ``(N,)``, True for patches of labeled normals.
        reference_size: patches drawn from the other fold as each fold's reference (>= 1).
        generator: CPU generator (fold assignment and reference draws).

    Returns:
        ``(keep bool (N,) on patches' device, the distance cut)``; all True when every patch is trusted
        or the candidates come from one image.

    Raises:
        ValueError: shapes disagree or ``reference_size`` < 1.
    """
    n = patches.shape[0]
    if owner.shape != (n,) or trusted.shape != (n,) or reference_size < 1:
        raise ValueError(
            f"trusted_patch_mask: need owner and trusted of shape ({n},) and reference_size >= 1, got "
            f"{tuple(owner.shape)}, {tuple(trusted.shape)}, {reference_size}"
        )
    keep = torch.ones(n, dtype=torch.bool, device=patches.device)
    images = torch.unique(owner.cpu())
    if bool(trusted.all()) or len(images) < 2:
        return keep, float("inf")
    dist = fold_out_distances(patches.float(), owner, 2, reference_size, generator)
    trusted = trusted.to(patches.device)
    if trusted.any():
        cut = float(dist[trusted].max())
    else:
        cut = float(torch.quantile(dist[~trusted], POOL_PATCH_QUANTILE))
    keep = trusted | (dist <= cut)
    return keep, cut


def gaussian_blur(maps: torch.Tensor, sigma: float = BLUR_SIGMA) -> torch.Tensor:
    """Separable Gaussian blur of ``(B, H, W)`` float maps (kernel radius 4 sigma, reflect padding)."""
    radius = int(4 * sigma + 0.5)
    t = torch.arange(-radius, radius + 1, dtype=maps.dtype, device=maps.device)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    x = maps[:, None]
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), k.view(1, 1, -1, 1))
    return x[:, 0]


class PatchBank(nn.Module):
    """A coreset of normal patch features (:func:`~mapl_ray.pseudo.patch_knn.patch_embeddings`) and the
    patch nearest-neighbour map of new images against it.

    The buffer ``patches`` float32 ``(R, C)`` is part of the state dict, so the checkpoint carries it;
    ``(0, 0)`` while empty (a run trained before the bank existed loads with it empty, and is then
    scored with the decoder's map alone).
    """

    def __init__(self):
        super().__init__()
        self.register_buffer("patches", torch.zeros(0, 0))

    @property
    def filled(self) -> bool:
        return self.patches.shape[0] > 0

    @torch.no_grad()
    def fill(self, embeddings: torch.Tensor, size: int, generator: torch.Generator) -> None:
        """Keep a greedy coreset (:func:`greedy_coreset`) of ``size`` rows of ``embeddings`` ``(..., C)``
        (patch features of normal images: ``(N, P, C)`` of N images, or rows already drawn ``(M, C)``).

        Raises:
            ValueError: no patch or ``size`` < 1.
        """
        flat = embeddings.reshape(-1, embeddings.shape[-1]).float()
        keep = greedy_coreset(flat, size, generator)
        self.patches = flat.index_select(0, keep).contiguous()

    def distance_maps(self, levels: list[torch.Tensor], out_size: tuple[int, int]) -> torch.Tensor:
        """Nearest-normal-patch distance of every patch of ``B`` images, upsampled to ``out_size`` and
        blurred (PatchCore's anomaly map).

        Args:
            levels: the encoder's four maps of the images (:meth:`MAPLModel.encode`).
            out_size: ``(H, W)`` of the map.

        Returns:
            float32 ``(B, H, W)``, in units of feature distance (>= 0).

        Raises:
            RuntimeError: the bank is empty.
        """
        if not self.filled:
            raise RuntimeError("the patch bank is empty: fill it from normal images first")
        emb = patch_embeddings(levels)
        b, _, c = emb.shape
        h, w = levels[2].shape[2], levels[2].shape[3]
        d = nearest_distances(emb.reshape(-1, c), self.patches.to(emb.device)).reshape(b, 1, h, w)
        d = F.interpolate(d, size=out_size, mode="bilinear", align_corners=False)[:, 0]
        return gaussian_blur(d)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        key = prefix + "patches"
        if key in state_dict:  # take the checkpoint's shape (the buffer starts empty)
            self.patches = torch.empty_like(state_dict[key], device=self.patches.device)
        else:  # a checkpoint from before the patch bank: load with it empty
            state_dict[key] = torch.zeros(0, 0)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


__all__ = ["BLUR_SIGMA", "POOL_PATCH_QUANTILE", "PatchBank", "gaussian_blur", "greedy_coreset", "trusted_patch_mask"]
