"""Batch scoring of decoded images (``mapl score``): the output table and the anomaly-map files.

:func:`score_table` scores rows in the shard layout (:mod:`mapl_ray.data.shards`: raw pixels at the
run's size, pose JSON) with a :class:`~mapl_ray.inference.Predictor`, exactly as ``mapl predict`` scores
files (same decoder, same network, same normalisation and threshold). The Ray Data wiring (actor pool,
resumable output files) is :mod:`mapl_ray.pipelines.ray_data`; nothing here imports Ray.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image

from .data.io import DecodeLimits, ImageLimitError
from .data.shards import images_from_arrow, pose_from_json
from .inference import Predictor

__all__ = ["SCORE_SCHEMA", "heatmap_name", "save_map_png", "score_table"]

#: One row per image. ``label`` is the decision at the run's threshold (1 anomalous, null without a
#: threshold), as in ``mapl predict``; ``known_label`` the source's label (0 / 1, null when unknown);
#: ``error`` says why an image could not be read (its scores are then null).
SCORE_SCHEMA = pa.schema(
    [
        pa.field("path", pa.string(), nullable=False),
        pa.field("score", pa.float64()),
        pa.field("normalised_score", pa.float64()),
        pa.field("q", pa.float64()),
        pa.field("label", pa.int8()),
        pa.field("threshold", pa.float64()),
        pa.field("known_label", pa.int8()),
        pa.field("map", pa.string()),
        pa.field("error", pa.string()),
    ]
)


def heatmap_name(path: str) -> str:
    """``<stem>_<8 hex of the absolute path>.png``: the same image always maps to the same file, and
    images that share a name in different folders (``good/000.png``, ``crack/000.png``) do not collide."""
    p = Path(path)
    return f"{p.stem}_{hashlib.sha1(str(p.resolve()).encode()).hexdigest()[:8]}.png"


def save_map_png(amap: np.ndarray, path: str | Path) -> Path:
    """An anomaly map float ``(H, W)`` in [0, 1] as an 8-bit grey PNG (value = round(255 * map))."""
    path = Path(path)
    Image.fromarray(np.rint(np.clip(amap, 0.0, 1.0) * 255.0).astype(np.uint8), mode="L").save(path)
    return path


def _limit_errors(
    image_size: int, paths: list[str], widths: list[int | None], heights: list[int | None], errors: list[str | None]
) -> list[str | None]:
    """``errors`` with, for each readable image whose original size :meth:`DecodeLimits.for_model` refuses,
    the limit's reason (as ``mapl predict`` and ``mapl serve`` give it)."""
    limits = DecodeLimits.for_model(image_size)
    out = list(errors)
    for i, (w, h) in enumerate(zip(widths, heights)):
        if out[i] is None and w is not None and h is not None:
            try:
                limits.check(paths[i], int(w), int(h))
            except ImageLimitError as e:
                out[i] = e.reason
    return out


def score_table(pred: Predictor, rows: pa.Table, maps_dir: str | Path | None = None) -> pa.Table:
    """Score a table of shard rows; returns :data:`SCORE_SCHEMA` rows in the same order.

    Args:
        pred: the run's predictor.
        rows: columns ``path``, ``image`` (raw uint8 at the run's size; null for an unreadable image),
            optional ``label`` (source label), ``pose`` (JSON, turns the map back onto the file's frame),
            ``error``, and ``orig_height`` / ``orig_width`` (the file's size: an image that ``mapl predict``'s
            limits refuse, :meth:`DecodeLimits.for_model`, gets their reason as its ``error`` and no score).
        maps_dir: write each anomaly map as ``maps_dir/<heatmap_name>`` (:func:`save_map_png`), in the
            file's own frame like ``mapl predict``'s heatmaps.

    Raises:
        LayoutError: an ``image`` cell is not ``(H, W, 3)`` at the run's size.
    """
    n = rows.num_rows
    # every column but the images as Python values; the images straight from the Arrow buffer
    col = {name: rows.column(name).to_pylist() for name in rows.column_names if name != "image"}
    paths, errors = col["path"], list(col.get("error", [None] * n))
    if "orig_height" in col and "orig_width" in col:
        errors = _limit_errors(pred.image_size, paths, col["orig_width"], col["orig_height"], errors)
    ok = [i for i, (v, e) in enumerate(zip(rows.column("image").is_valid().to_pylist(), errors)) if v and e is None]
    if ok:
        cells = rows.column("image")
        cells = cells if len(ok) == n else cells.take(ok)  # every row readable (the usual case): no copy here
        images = images_from_arrow(cells, (pred.image_size, pred.image_size))
        res = pred.predict_arrays(images, maps=maps_dir is not None)
        norm = pred.normalise(res["scores"])
    thr = pred.threshold
    out = {f.name: [None] * n for f in SCORE_SCHEMA}
    out["path"], out["error"] = paths, errors
    for j, i in enumerate(ok):
        s = float(res["scores"][j])
        out["score"][i], out["normalised_score"][i], out["q"][i] = s, float(norm[j]), float(res["q"][j])
        out["label"][i], out["threshold"][i] = (None, None) if thr is None else (int(s >= thr), float(thr))
        if maps_dir is not None:
            amap = pred.to_original_frame(res["maps"][j], pose_from_json(col.get("pose", [None] * n)[i]))
            out["map"][i] = str(save_map_png(amap, Path(maps_dir) / heatmap_name(paths[i])))
    known = col.get("label", [None] * n)
    out["known_label"] = [None if v is None or v < 0 else int(v) for v in known]
    return pa.table(out, schema=SCORE_SCHEMA)
