"""What a response makes of an anomaly map: a PNG heatmap and defect regions."""

from __future__ import annotations

import base64
import io
import math

import numpy as np
from PIL import Image
from scipy import ndimage


def encode_map_png(amap: np.ndarray, size: tuple[int, int] | None = None) -> str:
    """Anomaly map float ``(h, w)`` in [0, 1] -> base64 of an 8-bit grey PNG (0 normal .. 255 anomalous),
    resized (Pillow BILINEAR) to ``size`` = ``(H, W)`` of the original image when given."""
    buf = io.BytesIO()
    img = Image.fromarray(np.clip(np.rint(amap * 255.0), 0, 255).astype(np.uint8))
    if size is not None and tuple(size) != amap.shape:
        img = img.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def defect_regions(
    amap: np.ndarray, threshold: float, size: tuple[int, int] | None = None, max_regions: int = 50
) -> tuple[list[dict[str, float | int]], int]:
    """Bounding boxes of the connected regions where the anomaly map reaches ``threshold``.

    Regions are the 8-connected components of ``amap >= threshold`` (``scipy.ndimage.label``); each
    box is scaled from the map's grid to the image's ``size`` and rounded outwards, so it covers the
    region's pixels in the image.

    Args:
        amap: float ``(h, w)`` anomaly map in [0, 1], in the image's own frame.
        threshold: map value at which a pixel counts as defective (same units as the map).
        size: ``(H, W)`` of the image the boxes refer to; None: the map's own grid.
        max_regions: keep the regions with the highest maxima, at most this many.

    Returns:
        (regions, total): regions sorted by ``max_score`` descending, each ``x``, ``y``, ``width``,
        ``height`` (pixels of the image, x to the right, y down), ``area_fraction`` (share of the image
        the region covers) and ``max_score`` / ``mean_score`` (map values inside it); ``total`` counts
        all regions found before ``max_regions`` was applied.
    """
    h, w = amap.shape
    H, W = size if size is not None else (h, w)
    mask = amap >= threshold
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if n == 0:
        return [], 0
    index = np.arange(1, n + 1)
    maxima = np.asarray(ndimage.maximum(amap, labels, index), dtype=np.float64)
    means = np.asarray(ndimage.mean(amap, labels, index), dtype=np.float64)
    areas = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    boxes = ndimage.find_objects(labels)
    sy, sx = H / h, W / w
    out = []
    for i in np.argsort(-maxima, kind="stable")[:max_regions]:
        ys, xs = boxes[i]
        x0, y0 = math.floor(xs.start * sx), math.floor(ys.start * sy)
        x1, y1 = min(W, math.ceil(xs.stop * sx)), min(H, math.ceil(ys.stop * sy))
        out.append(
            {
                "x": x0,
                "y": y0,
                "width": x1 - x0,
                "height": y1 - y0,
                "area_fraction": float(areas[i] / (h * w)),
                "max_score": float(maxima[i]),
                "mean_score": float(means[i]),
            }
        )
    return out, n
