"""The per-image answer of ``POST /v1/predict`` (an :class:`~mapl_ray.serving.schema.ImageResult`), made by
the HTTP front from the model replica's record and the upload as decoded."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..data.io import DecodedUpload
from .maps import defect_regions, encode_map_png


def image_result(
    record: dict[str, Any],
    amap: np.ndarray | None,
    decoded: DecodedUpload,
    opts: dict[str, Any],
    threshold: float | None,
    version: str,
    max_regions: int,
    q_weight: float = 0.0,
) -> dict[str, Any]:
    """One image's answer.

    Args:
        record: :meth:`mapl_ray.inference.Predictor.predict_images`'s record (``path`` is the upload's name).
        amap: float32 ``(S, S)`` anomaly map in [0, 1] on the image as scored (aligned when the run uses
            ``data.align``); needed only when ``opts`` asks for ``heatmap`` or ``regions``.
        decoded: the upload as :func:`mapl_ray.data.io.decode_upload` decoded it (size, format, pose).
        opts: ``heatmap`` (bool), ``regions`` (bool), ``region_threshold`` (float in [0, 1] or None: the
            map value at which this image's score reaches the run's ``threshold``, ``threshold - q_weight * q``,
            so an image labelled anomalous has at least one region).
        threshold: the run's decision threshold on the image score (None when it has none).
        version: the served model's version string.
        max_regions: most regions listed (the largest maxima first).
        q_weight: the run's weight of the image head's ``q`` in the image score (``Predictor.q_weight``):
            the score is the top-k mean of the map plus ``q_weight * q``, the map alone is cut.

    Returns:
        the :class:`~mapl_ray.serving.schema.ImageResult` fields; the heatmap (base64 PNG) and the
        regions (pixel boxes) are on the image as sent: the map is turned back by the upload's pose and
        resized to its original ``(H, W)``.

    Raises:
        ValueError: ``opts`` asks for a heatmap or regions and ``amap`` is None.
    """
    h, w = decoded.original_size
    label = record["label"]
    warnings = decoded.warnings()
    out = {
        "name": record["path"],
        "score": record["score"],
        "normalised_score": record["normalised_score"],
        "q": record["q"],
        "label": label,
        "anomalous": None if label is None else bool(label),
        "threshold": threshold,
        "image_size": [h, w],
        "source": {
            "format": decoded.format,
            "mode": decoded.mode,
            "frames": decoded.frames,
            "exif_orientation": decoded.orientation,
        },
        "model_version": version,
        "warnings": warnings,
    }
    if not (opts.get("heatmap") or opts.get("regions")):
        return out
    if amap is None:
        raise ValueError("a heatmap or regions were asked for but no anomaly map was given")
    if decoded.pose is not None:
        amap = decoded.pose.invert_map(amap)  # the map on the image as sent
    if opts.get("heatmap"):
        out["heatmap_png_base64"] = encode_map_png(amap, (h, w))
    if opts.get("regions"):
        t = opts.get("region_threshold")
        if t is None and threshold is not None:  # the map part of the decision threshold, for this image's q
            t = min(1.0, max(0.0, threshold - q_weight * record["q"]))
        if t is None:
            warnings.append("no regions: the run has no decision threshold; pass region_threshold")
        else:
            out["regions"], out["regions_total"] = defect_regions(amap, t, (h, w), max_regions)
            out["region_threshold"] = t
    return out
