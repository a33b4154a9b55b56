"""Partial matching of score distributions (SPADE threshold selection).

SPADE (Yoon et al., "SPADE: Semi-supervised Anomaly Detection under
Distribution Mismatch", TMLR 2023) picks each one-class classifier's
pseudo-labeling thresholds without assuming a known anomaly ratio: the
threshold is the cut of the *unlabeled* score distribution whose one-sided
part (above it for positives, below it for negatives) looks most like the
score distribution of the *labeled* samples of that class. MAPL (Chen & Kang,
arXiv 2405.06198, eqs. 3-4) reuses this rule; the distance between the two
distributions is the 1-D Wasserstein distance (the quantity of
:func:`scipy.stats.wasserstein_distance`, here computed for all candidate cuts in one vectorised pass).
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np

__all__ = ["partial_matching_threshold", "quantile_levels"]


def quantile_levels(quantiles: np.ndarray | int) -> np.ndarray:
    """Turn a quantile specification into sorted levels in the open interval (0, 1).

    Args:
        quantiles: either an ``int`` ``n >= 1`` -- giving the ``n`` evenly spaced
            levels ``i / (n + 1)`` for ``i = 1..n`` (``99`` -> 1 %, 2 %, ..., 99 %) --
            or a 1-D array-like of explicit levels, each strictly inside (0, 1).

    Returns:
        float64 array ``(n,)`` of unique, ascending levels.

    Raises:
        ValueError: if ``quantiles`` is an int < 1, an empty array, not 1-D,
            or holds a level outside (0, 1) / NaN.
    """
    if isinstance(quantiles, (int, np.integer)) and not isinstance(quantiles, bool):
        n = int(quantiles)
        if n < 1:
            raise ValueError(f"quantiles: expected an int >= 1 or an array of levels in (0, 1), got {n}")
        return np.arange(1, n + 1, dtype=np.float64) / (n + 1)
    levels = np.asarray(quantiles, dtype=np.float64)
    if levels.ndim != 1 or levels.size == 0:
        raise ValueError(f"quantiles: expected a non-empty 1-D array of levels in (0, 1), got shape {levels.shape}")
    if not np.all((levels > 0.0) & (levels < 1.0)):  # also rejects NaN
        raise ValueError("quantiles: every level must lie strictly inside (0, 1)")
    return np.unique(levels)


def _check_scores(x: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array of scores, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name}: expected at least one score, got an empty array")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name}: scores must be finite (found NaN or inf)")
    return arr


def partial_matching_threshold(
    unlabeled_scores: np.ndarray,
    reference_scores: np.ndarray,
    side: Literal["above", "below"],
    quantiles: np.ndarray | int = 99,
    min_fraction: float = 0.05,
) -> tuple[float, float]:
    """Choose a threshold by partial matching (SPADE; MAPL eqs. 3-4).

    Candidate thresholds ``t`` are the ``quantiles`` of ``unlabeled_scores``.
    For ``side="above"`` the matched part is ``{u : u > t}`` (pseudo-positives,
    ``reference_scores`` = scores of labeled or simulated anomalies); for
    ``side="below"`` it is ``{u : u < t}`` (pseudo-negatives, reference = labeled
    normals). The returned threshold minimises the Wasserstein distance between
    the matched part and ``reference_scores``. The strict inequalities match
    the consensus vote in :meth:`mapl_ray.pseudo.OCCEnsemble.predict`.

    Candidates whose matched part holds fewer than
    ``max(2, ceil(min_fraction * M))`` samples are skipped, because a distance
    estimated from a handful of extreme scores is noise (a tiny tail can match
    a narrow reference by chance). Exact ties go to the more conservative
    threshold (the highest for ``"above"``, the lowest for ``"below"``).
    If no candidate qualifies (e.g. all unlabeled scores equal) the most
    conservative threshold is returned -- ``max(unlabeled_scores)`` for
    ``"above"``, ``min(unlabeled_scores)`` for ``"below"``, so nothing gets
    pseudo-labeled -- with distance ``inf``.

    Args:
        unlabeled_scores: float array ``(M,)``, anomaly scores of the unlabeled set
            (higher = more anomalous).
        reference_scores: float array ``(R,)``, scores of the labeled reference
            class (positives for ``"above"``, negatives for ``"below"``).
        side: ``"above"`` or ``"below"``.
        quantiles: int count of evenly spaced candidate levels (99 -> 1 %..99 %)
            or an explicit 1-D array of levels in (0, 1); see :func:`quantile_levels`.
        min_fraction: minimum share of the unlabeled set on the matched side, in [0, 1).

    Returns:
        ``(threshold, distance)`` as Python floats.

    Raises:
        ValueError: naming the argument, if a score array is empty, not 1-D or
            holds NaN/inf; if ``side`` is not ``"above"``/``"below"``; if
            ``min_fraction`` is outside [0, 1); if ``quantiles`` is invalid.
    """
    u = _check_scores(unlabeled_scores, "unlabeled_scores")
    ref = _check_scores(reference_scores, "reference_scores")
    if side not in ("above", "below"):
        raise ValueError(f"side: expected 'above' or 'below', got {side!r}")
    if not (0.0 <= float(min_fraction) < 1.0):
        raise ValueError(f"min_fraction: expected a value in [0, 1), got {min_fraction}")
    levels = quantile_levels(quantiles)

    u_sorted = np.sort(u)
    m = u_sorted.size
    min_count = max(2, math.ceil(float(min_fraction) * m))
    candidates = np.unique(np.quantile(u_sorted, levels))
    # Visit candidates from most to least conservative so argmin's
    # first-occurrence rule resolves exact ties conservatively.
    if side == "above":
        candidates = candidates[::-1]
        # u_sorted is sorted, so each one-sided part is a contiguous slice: u_sorted[start:]
        start = np.searchsorted(u_sorted, candidates, side="right")
        size = m - start
    else:  # u_sorted[:end]
        start = np.zeros(candidates.size, dtype=np.int64)
        size = np.searchsorted(u_sorted, candidates, side="left")
    keep = size >= min_count
    if not keep.any():
        t = u_sorted[-1] if side == "above" else u_sorted[0]
        return float(t), math.inf
    dist = _sliced_wasserstein(u_sorted, np.sort(ref), start[keep], size[keep])
    # exact ties, as the distances' rounding leaves them (1e-12 relative), go to the most conservative cut
    best = int(np.flatnonzero(dist <= dist.min() * (1 + 1e-12) + 1e-300)[0])
    return float(candidates[keep][best]), float(dist[best])


def _sliced_wasserstein(
    u_sorted: np.ndarray, ref_sorted: np.ndarray, start: np.ndarray, size: np.ndarray
) -> np.ndarray:
    """1-D Wasserstein distances ``(C,)`` between each slice ``u_sorted[start[c] : start[c] + size[c]]`` and
    ``ref_sorted``, all at once: the integral of the absolute difference of the two empirical CDFs, as
    :func:`scipy.stats.wasserstein_distance` computes it for one pair (``_cdf_distance`` with p = 1), on the
    breakpoints of the whole of ``u_sorted`` and ``ref_sorted`` (breakpoints outside a slice add intervals where
    both CDFs are 0 or both 1). Float64; equal to scipy's up to summation order (~1e-15 relative)."""
    x = np.concatenate([u_sorted, ref_sorted])
    x.sort(kind="mergesort")
    dx = np.diff(x)  # (L - 1,)
    at = x[:-1]
    cdf_ref = np.searchsorted(ref_sorted, at, side="right") / ref_sorted.size
    below = np.searchsorted(u_sorted, at, side="right")  # values of u_sorted <= each breakpoint
    inside = np.clip(below[None, :] - start[:, None], 0, size[:, None])  # (C, L - 1)
    cdf_part = inside / size[:, None]
    return np.abs(cdf_part - cdf_ref[None, :]) @ dx
