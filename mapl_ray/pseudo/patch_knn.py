"""Patch nearest-neighbour scores of the frozen encoder, for the pseudo-labeler (``pseudo.features=knn``).

A real defect is a patch that no other image has; a normal patch has close neighbours in the other
normal images, labeled or not. So each image of the labeled normals plus the unlabeled pool is scored
against the patches of the *other* images (folds: images of fold ``k`` against a reference drawn from the
images outside fold ``k``), the leave-one-out idea of SPADE's data refinement applied to the
locally aware patch features of PatchCore (Roth et al., CVPR 2022, sec. 3.1: 3x3 average pooling of
the stride-8 and stride-16 levels, the coarser one upsampled, concatenated). The few-per-cent anomalies
of a pool sit in the reference too, but a defect is rarely repeated, so they barely lower each other's
scores. Image-level statistics of the patch distances (:func:`image_statistics`) are what the OCCs see.

How well they rank real pool anomalies, and what that does to the detector: docs/results.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import KNN_REFERENCE_SOURCES

#: image statistics of the patch distances: max, mean of the top 1 % of patches, mean
STAT_NAMES = ("max", "top1pct", "mean")
_QUERY_BLOCK = 2048  # query patches per distance GEMM: block x reference floats stay ~128 MB at 16k references


def patch_embeddings(levels: list[torch.Tensor]) -> torch.Tensor:
    """Locally aware patch features (PatchCore sec. 3.1) of encoder levels ``[f0, f1, f2, f3]``.

    Args:
        levels: the encoder's four maps ``(B, C_l, H / s_l, W / s_l)`` at strides 2, 4, 8, 16
            (:meth:`mapl_ray.model.network.MAPLModel.encode`).

    Returns:
        float32 ``(B, P, C2 + C3)``, one row per stride-8 position (P = H W / 64): 3x3 average pools of
        ``f2`` and of ``f3`` (bilinearly upsampled to ``f2``'s grid), concatenated.
    """
    f2 = F.avg_pool2d(levels[2].float(), 3, 1, 1)
    f3 = F.avg_pool2d(levels[3].float(), 3, 1, 1)
    f3 = F.interpolate(f3, size=f2.shape[2:], mode="bilinear", align_corners=False)
    return torch.cat([f2, f3], 1).flatten(2).transpose(1, 2).contiguous()


def nearest_distances(query: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Euclidean distance of each query row to its nearest reference row (batched GEMM, exact).

    Args:
        query: float32 ``(M, C)``; reference: float32 ``(R, C)``, R >= 1, same device.

    Returns:
        float32 ``(M,)`` on the query's device.
    """
    # min_j ||q - b_j||^2 = ||q||^2 + min_j (||b_j||^2 - 2 q.b_j): the GEMM takes the reference norms as its
    # bias, so the block x reference matrix is written once and read once (its row minimum), not built in
    # four passes; clamped after the minimum (the GEMM form rounds an exact match to about -1e-6 relative)
    ref_sq = reference.pow(2).sum(1)[None]
    out = []
    for i in range(0, query.shape[0], _QUERY_BLOCK):
        q = query[i : i + _QUERY_BLOCK]
        part = torch.addmm(ref_sq, q, reference.T, alpha=-2.0).amin(1).float()
        out.append((part + q.float().pow(2).sum(1)).clamp_min_(0).sqrt_())
    return torch.cat(out) if out else query.new_zeros(0)


def sample_reference(patches: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """``size`` patch rows drawn without replacement from ``patches`` ``(N, P, C)`` (all when fewer):
    float32 ``(min(size, N P), C)``. ``generator`` is a CPU generator, so every device draws the same rows."""
    flat = patches.reshape(-1, patches.shape[-1])
    if flat.shape[0] <= size:
        return flat
    rows = torch.randperm(flat.shape[0], generator=generator)[:size]
    return flat.index_select(0, rows.to(flat.device))


def fold_out_distances(
    patches: torch.Tensor,
    owner: torch.Tensor,
    folds: int,
    reference_size: int,
    generator: torch.Generator,
    usable: torch.Tensor | None = None,
    image_folds: torch.Tensor | None = None,
) -> torch.Tensor:
    """Distance of every patch row to a reference drawn from the patches of the images outside its fold,
    so no patch meets itself or another patch of its own image.

    Args:
        patches: float32 ``(M, C)`` patch rows of several images.
        owner: int ``(M,)`` image of each row (any integers; the rows of one image share one).
        folds: number of folds (2 <= folds <= images); the images are dealt to folds at random.
        reference_size: patches drawn from the other folds as each fold's reference.
        generator: CPU generator for the fold assignment and the reference draws.
        usable: bool ``(M,)``, rows that may enter a reference (None: all); every row is scored.
        image_folds: int ``(images,)``, the fold of each image (in the order of ``torch.unique(owner)``) as
            an earlier pass dealt them; None: dealt here from ``generator``.

    Returns:
        float32 ``(M,)`` on the patches' device (:func:`nearest_distances`).

    Raises:
        ValueError: ``owner`` or ``usable`` not of shape ``(M,)``, ``folds`` outside [2, images], or a fold
            with no usable row outside it.
    """
    if owner.shape != patches.shape[:1]:
        raise ValueError(f"fold_out_distances: owner of shape {tuple(owner.shape)}, need ({patches.shape[0]},)")
    images, image_of_row = torch.unique(owner.cpu(), return_inverse=True)
    if image_folds is None:
        image_folds = _deal_folds(len(images), folds, generator)
    fold = image_folds.cpu()[image_of_row].to(patches.device)
    out = torch.empty(patches.shape[0], dtype=torch.float32, device=patches.device)
    if usable is not None and usable.shape != patches.shape[:1]:
        raise ValueError(f"fold_out_distances: usable of shape {tuple(usable.shape)}, need ({patches.shape[0]},)")
    for k in range(folds):
        inside = fold == k
        allowed = ~inside if usable is None else ~inside & usable.to(patches.device)
        if not bool(allowed.any()):
            raise ValueError(f"fold_out_distances: fold {k} has no usable reference row outside it")
        ref = sample_reference(patches[allowed], reference_size, generator)
        out[inside] = nearest_distances(patches[inside], ref)
    return out


def _deal_folds(images: int, folds: int, generator: torch.Generator) -> torch.Tensor:
    """The fold of each of ``images`` images, int64 ``(images,)``, dealt at random from ``generator``.

    Raises:
        ValueError: ``folds`` outside [2, images].
    """
    if not 2 <= folds <= images:
        raise ValueError(
            f"leave-fold-out patch distances need 2 <= folds <= images, got {folds} folds of {images} images"
        )
    return torch.randperm(images, generator=generator) % folds


def _ranking_scores(distances: torch.Tensor) -> torch.Tensor:
    """What a pass ranks images by: the mean of each image's top 1 % patch distances, float32 ``(N,)`` on the CPU."""
    return statistics_of(distances, ("top1pct",))[:, 0].cpu()


def leave_fold_out_distances(
    patches: torch.Tensor,
    folds: int,
    reference_size: int,
    generator: torch.Generator,
    refine: float = 0.0,
    keep_first: int = 0,
    reference_from: str = "all",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Patch distances of every image to the patches of the images outside its fold
    (:func:`fold_out_distances` with the same number of patches per image).

    With ``refine`` > 0 (data refinement, as SPADE refines its one-class training data; ``pseudo.knn_refine``),
    a first pass scores every image (mean of its top 1 % patch distances); the ``refine`` share of the
    images after the first ``keep_first`` (the labeled normals) that score highest is then left out of every
    reference, and all images are scored again, in the same folds, against references of the others. A defect
    hidden by a like one in an image that stands out then no longer finds its like in the reference.

    ``reference_from`` (``pseudo.knn_reference_from``, docs/results.md rule 7) says what the references are
    drawn from: ``all`` the images (as above); ``labeled`` the first ``keep_first`` alone (the labeled
    normals: the others are scored against all of them, they against each other, leave-one-out), so that no
    pool image can hide a like defect; ``labeled_closest`` that first, then a second pass, leave-fold-out,
    whose references hold the labeled normals and the half of the other images closest to them (mean of the
    top 1 % patch distances); ``labeled_matched`` the labeled normals, each image against as many of them
    (all but one; with ``labeled`` a labeled normal meets one normal fewer than a pool image does). Rules 7
    and 8 of docs/results.md kept ``all`` as the default. With ``keep_first`` < 2 every choice is ``all``.

    Args:
        patches: float32 ``(N, P, C)`` (:func:`patch_embeddings` of N images), N >= 2.
        folds: number of folds (2 <= folds <= N); image ``i`` is in fold ``perm[i] % folds``.
        reference_size: patches drawn from the other folds as each fold's reference.
        generator: CPU generator for the fold assignment and the reference draws.
        refine: share in [0, 1) of the images after ``keep_first`` left out of the references (0: one pass).
        keep_first: images never left out (the labeled normals come first).
        reference_from: one of :data:`~mapl_ray.config.KNN_REFERENCE_SOURCES`.

    Returns:
        ``(distances float32 (N, P), a reference of the N images' patches (reference_size, C))``, the
        images left out by ``refine`` excepted; the second scores images outside the set
        (:func:`nearest_distances`).

    Raises:
        ValueError: fewer than 2 images, ``folds`` outside [2, N], ``refine`` outside [0, 1), an unknown
            ``reference_from``, or a fold left without a usable reference image.
    """
    if not 0.0 <= refine < 1.0:
        raise ValueError(f"refine: expected a share in [0, 1), got {refine}")
    if reference_from not in KNN_REFERENCE_SOURCES:
        raise ValueError(f"reference_from: expected one of {', '.join(KNN_REFERENCE_SOURCES)}, got {reference_from!r}")
    n, p = patches.shape[:2]
    owner = torch.arange(n).repeat_interleave(p)
    flat = patches.reshape(n * p, -1)
    if reference_from != "all" and keep_first >= 2:
        return _from_labeled(patches, flat, owner, keep_first, folds, reference_size, generator, reference_from)
    image_folds = _deal_folds(n, folds, generator)  # both passes keep these folds
    out = fold_out_distances(flat, owner, folds, reference_size, generator, image_folds=image_folds).reshape(n, p)
    drop = int(round(refine * (n - keep_first)))
    if drop == 0:
        return out, sample_reference(patches, reference_size, generator)
    left_out = keep_first + torch.argsort(_ranking_scores(out[keep_first:]), descending=True, stable=True)[:drop]
    usable = torch.ones(n, dtype=torch.bool)
    usable[left_out] = False
    # the first pass's folds: each image's reference can only lose rows, so no patch comes out closer
    out = fold_out_distances(
        flat, owner, folds, reference_size, generator, usable=usable[owner], image_folds=image_folds
    ).reshape(n, p)
    return out, sample_reference(patches[usable.to(patches.device)], reference_size, generator)


def _from_labeled(
    patches: torch.Tensor,
    flat: torch.Tensor,
    owner: torch.Tensor,
    labeled: int,
    folds: int,
    reference_size: int,
    generator: torch.Generator,
    reference_from: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`leave_fold_out_distances` with ``reference_from`` ``labeled`` / ``labeled_closest`` /
    ``labeled_matched``; ``labeled`` (>= 2) images come first."""
    n, p = patches.shape[:2]
    if reference_from == "labeled_matched":
        # labeled normal j alone in fold j (leave-one-out); each pool image in one of those folds, dealt evenly,
        # so it too is scored against labeled - 1 normals
        image_folds = torch.cat([torch.arange(labeled), torch.randperm(n - labeled, generator=generator) % labeled])
        usable = torch.zeros(n, dtype=torch.bool)
        usable[:labeled] = True
        out = fold_out_distances(
            flat, owner, labeled, reference_size, generator, usable=usable[owner], image_folds=image_folds
        ).reshape(n, p)
        # images outside the set (positives, validation) meet labeled - 1 normals as well
        keep = torch.randperm(labeled, generator=generator)[: labeled - 1].sort().values
        return out, sample_reference(patches[keep.to(patches.device)], reference_size, generator)
    rows = labeled * p
    out = torch.empty(n * p, dtype=torch.float32, device=patches.device)
    out[:rows] = fold_out_distances(flat[:rows], owner[:rows], labeled, reference_size, generator)  # one out
    ref = sample_reference(patches[:labeled], reference_size, generator)
    out[rows:] = nearest_distances(flat[rows:], ref)
    out = out.reshape(n, p)
    if reference_from == "labeled" or n - labeled < 2:
        return out, ref
    closest = labeled + torch.argsort(_ranking_scores(out[labeled:]), stable=True)[: (n - labeled) // 2]
    usable = torch.zeros(n, dtype=torch.bool)
    usable[:labeled] = True
    usable[closest] = True
    out = fold_out_distances(flat, owner, folds, reference_size, generator, usable=usable[owner]).reshape(n, p)
    return out, sample_reference(patches[usable.to(patches.device)], reference_size, generator)


#: named statistics of an image's patch distances: scale-dependent (``max``, ``top1pct``, ``mean``, ``median``)
#: and scale-free ratios to the image's median patch distance (how far its worst patches stand out of the
#: image itself, whatever its overall distance to the other images)
STATISTICS = ("max", "top1pct", "mean", "median", "max_over_median", "top1pct_over_median", "p90_over_median")
#: the statistic sets compared by bench/occ_features.py (``default`` is :data:`STAT_NAMES`)
STAT_SETS = {
    "default": STAT_NAMES,
    "default_contrast": (*STAT_NAMES, "max_over_median", "top1pct_over_median"),
    "contrast": ("max_over_median", "top1pct_over_median", "p90_over_median"),
}


def statistics_of(distances: torch.Tensor, names: tuple[str, ...]) -> torch.Tensor:
    """Image-level statistics ``names`` (each one of :data:`STATISTICS`) of patch distances ``(N, P)``:
    float32 ``(N, len(names))`` on their device.

    Raises:
        ValueError: an unknown statistic name.
    """
    unknown = [n for n in names if n not in STATISTICS]
    if unknown:
        raise ValueError(f"unknown patch-distance statistic(s) {unknown}; known: {', '.join(STATISTICS)}")
    d = distances.float()
    eps = 1e-12
    done: dict[str, torch.Tensor] = {}

    def stat(name: str) -> torch.Tensor:  # each computed once, and only when asked for (the refits ask for 3)
        if name not in done:
            if name == "max":
                done[name] = d.amax(1)
            elif name == "top1pct":
                done[name] = d.topk(max(1, d.shape[1] // 100), dim=1).values.mean(1)
            elif name == "mean":
                done[name] = d.mean(1)
            elif name == "median":
                done[name] = d.median(1).values
            elif name == "p90_over_median":
                done[name] = torch.quantile(d, 0.9, dim=1) / (stat("median") + eps)
            else:  # max_over_median, top1pct_over_median
                done[name] = stat(name.split("_over_")[0]) / (stat("median") + eps)
        return done[name]

    return torch.stack([stat(n) for n in names], 1)


def image_statistics(distances: torch.Tensor) -> torch.Tensor:
    """Image-level statistics of patch distances ``(N, P)``: float32 ``(N, 3)`` (:data:`STAT_NAMES`)."""
    return statistics_of(distances, STAT_NAMES)


__all__ = [
    "STATISTICS",
    "STAT_NAMES",
    "STAT_SETS",
    "fold_out_distances",
    "image_statistics",
    "leave_fold_out_distances",
    "nearest_distances",
    "patch_embeddings",
    "sample_reference",
    "statistics_of",
]
