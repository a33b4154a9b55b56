"""The validation objective: how well a model separates the validation set's anomalies from its normals
(:mod:`mapl_ray.data.validation`: labeled data and simulated anomalies only, never a test file).

Every choice of a setting is made on it: the patch bank's share in the anomaly map
(:func:`choose_knn_fusion`), the image head's weight in the image score (:func:`choose_q_weight`),
checkpoints and hyperparameters (Ray Tune reports it), the defaults. The objective
(:func:`objective`) is the mean of the image AUROC of the image score and the pixel AUROC over the
validation masks: on the runs of seeds 110-112 its Spearman correlation with test image AUROC was 0.64,
against 0.50 for image AUROC alone (the rule fixed beforehand in docs/results.md). The AUROC per anomaly
source (simulated, labeled) is reported beside it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ..config import Config
from ..data.validation import SOURCE_LABELED_ANOMALY, SOURCE_NORMAL, SOURCE_SIMULATED, ValidationSet
from ..model.anomaly_map import anomaly_maps, fuse_maps, topk_mean, tta_views
from ..model.network import MAPLModel
from ..tensors import pad_rows, to_tensor
from .metrics import image_auroc, pixel_auroc


def objective(image: float, pixel: float | None) -> float:
    """The validation objective: the mean of validation image AUROC and pixel AUROC, in [0, 1]; the image
    AUROC alone where the validation set has no defect pixel (pixel AUROC ``None``).

    Source: docs/results.md, "Seeds 110-112" (rule 1, fixed before those runs).
    """
    return float(image) if pixel is None else (float(image) + float(pixel)) / 2


def _pixel_auroc_or_none(masks: np.ndarray, maps: np.ndarray) -> float | None:
    """Pixel AUROC of ``maps`` over ``masks`` ``(V, H, W)``, or None when no validation pixel is a defect
    (labeled anomalies given without masks and no simulated ones): nothing to localise."""
    m = np.asarray(masks)
    return pixel_auroc(m, maps) if m.any() and not m.all() else None


def choose_q_weight(
    labels: np.ndarray, map_scores: np.ndarray, q: np.ndarray, grid: tuple[float, ...]
) -> tuple[float, dict[str, float]]:
    """The weight ``w`` of the image head in ``score = map_score + w * q`` with the highest validation
    image AUROC (ties: the smallest ``w``), and the AUROC of every candidate. ``q`` leaves the map and its
    pixel AUROC unchanged, so this is also the ``w`` with the highest :func:`objective`.

    Args:
        labels: int ``(V,)`` 0 / 1; map_scores, q: float ``(V,)`` (top-k map score, head probability).
        grid: candidate weights >= 0 (``eval.q_weight_grid``).

    Raises:
        ValueError: the labels hold one class only (no AUROC).
    """
    aurocs = {float(w): image_auroc(labels, map_scores + w * q) for w in sorted(grid)}
    best = max(aurocs.items(), key=lambda kv: (round(kv[1], 12), -kv[0]))[0]
    return best, {f"{w:g}": a for w, a in aurocs.items()}


def choose_knn_fusion(
    labels: np.ndarray,
    masks: np.ndarray,
    maps: np.ndarray,
    knn_maps: np.ndarray,
    top_k: int,
    weight: float | None,
    grid: tuple[float, ...],
) -> tuple[dict[str, float], dict[str, dict[str, float | None]]]:
    """The patch bank's share ``w`` in the fused map (:func:`~mapl_ray.model.anomaly_map.fuse_maps`) with the
    highest validation :func:`objective` (image AUROC of its top-k score and pixel AUROC of the fused map;
    ties: the smallest ``w``), and each candidate's figures.

    The scales are the mean top-k score of the validation normals under each map; the fusion brings the
    patch bank's distances into the decoder map's units with them, so ``w`` weighs like with like.

    Args:
        labels: int ``(V,)`` 0 / 1 (both present); masks: uint8 ``(V, H, W)`` in {0, 1};
        maps, knn_maps: float ``(V, H, W)`` (decoder, patch bank).
        top_k: the image score's top-k; weight: a fixed ``w`` (``eval.knn_weight``) or None to choose.
        grid: candidate weights in [0, 1] (``eval.knn_weight_grid``).

    Returns:
        ``({"weight", "map_scale", "knn_scale"}, {"image_auroc" | "pixel_auroc" | "objective": {"<w>": value}})``
        (pixel AUROC None without defect pixels).

    Raises:
        ValueError: the labels hold one class only (no AUROC).
    """
    normal = labels == 0
    fusion = {
        "weight": 0.0,
        "map_scale": max(float(np.mean(topk_mean(maps[normal], top_k))), 1e-12),
        "knn_scale": max(float(np.mean(topk_mean(knn_maps[normal], top_k))), 1e-12),
    }
    by: dict[str, dict[float, float | None]] = {"image_auroc": {}, "pixel_auroc": {}, "objective": {}}
    for w in sorted(set(grid) | ({float(weight)} if weight is not None else set())):
        fused = fuse_maps(maps, knn_maps, {**fusion, "weight": w})
        img = image_auroc(labels, np.asarray(topk_mean(fused, top_k), dtype=np.float64))
        pix = _pixel_auroc_or_none(masks, fused)
        by["image_auroc"][float(w)], by["pixel_auroc"][float(w)] = img, pix
        by["objective"][float(w)] = objective(img, pix)
    if weight is None:
        fusion["weight"] = max(by["objective"].items(), key=lambda kv: (round(kv[1], 12), -kv[0]))[0]
    else:
        fusion["weight"] = float(weight)
    return fusion, {name: {f"{w:g}": v for w, v in vals.items()} for name, vals in by.items()}


def validation_metrics(
    vset: ValidationSet,
    maps: np.ndarray,
    q: np.ndarray,
    top_k: int,
    q_weight: float | None,
    grid: tuple[float, ...],
    knn_maps: np.ndarray | None = None,
    knn_weight: float | None = None,
    knn_grid: tuple[float, ...] = (0.0,),
) -> dict[str, Any]:
    """The validation objective and its parts from a model's maps ``(V, H, W)`` and head probabilities ``(V,)``.

    With the patch bank's maps ``knn_maps`` ``(V, H, W)``, the fusion of the two maps is chosen first
    (:func:`choose_knn_fusion`; ``knn_weight`` None chooses ``w`` from ``knn_grid``) and everything below
    is computed on the fused map. ``q_weight`` None chooses it on this set (:func:`choose_q_weight`).
    Returns ``objective`` (:func:`objective` of the two below), ``image_auroc`` (of the image score, with
    the weights used), ``image_auroc_map`` (map score alone), ``q_weight``, ``image_auroc_by_q_weight``,
    ``pixel_auroc`` (None without defect pixels), ``image_auroc_simulated`` / ``image_auroc_labeled_anomalies``
    (each source against the normals, where present), the counts, and with ``knn_maps`` ``knn_fusion``,
    ``image_auroc_by_knn_weight``, ``pixel_auroc_by_knn_weight`` and ``objective_by_knn_weight``.

    Raises:
        ValueError: the validation labels hold one class only (no AUROC).
    """
    labels = vset.labels.astype(np.int64)
    fusion_out: dict[str, Any] = {}
    if knn_maps is not None:
        fusion, by_knn = choose_knn_fusion(labels, vset.masks, maps, knn_maps, top_k, knn_weight, knn_grid)
        fusion_out = {
            "knn_fusion": fusion,
            "knn_weight_chosen_on_validation": knn_weight is None,
            **{f"{name}_by_knn_weight": vals for name, vals in by_knn.items()},
        }
        maps = fuse_maps(maps, knn_maps, fusion)
    map_scores = np.asarray(topk_mean(maps, top_k), dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    chosen, by_weight = choose_q_weight(labels, map_scores, q, grid)
    w = chosen if q_weight is None else float(q_weight)
    scores = map_scores + w * q
    image, pixel = image_auroc(labels, scores), _pixel_auroc_or_none(vset.masks, maps)
    out: dict[str, Any] = {
        "objective": objective(image, pixel),
        "image_auroc": image,
        "image_auroc_map": image_auroc(labels, map_scores),
        "q_weight": w,
        "q_weight_chosen_on_validation": q_weight is None,
        "image_auroc_by_q_weight": by_weight,
        "pixel_auroc": pixel,
        **fusion_out,
    }
    normal = vset.sources == SOURCE_NORMAL
    for name, src in (("simulated", SOURCE_SIMULATED), ("labeled_anomalies", SOURCE_LABELED_ANOMALY)):
        sel = normal | (vset.sources == src)
        if (vset.sources == src).any():
            out[f"image_auroc_{name}"] = image_auroc(labels[sel], scores[sel])
    out.update(vset.description)
    return out


def score_validation_set(
    predict: Callable[[np.ndarray], dict[str, np.ndarray]], vset: ValidationSet, batch_size: int = 16
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``(maps (V, H, W), q (V,), knn_maps (V, H, W) or None)`` of the validation images through ``predict``
    (uint8 batch -> numpy ``maps``, ``q`` and, where it gives them, the patch bank's ``knn_maps``; e.g.
    :meth:`mapl_ray.inference.Predictor.predict_arrays` of a ``parts=True`` predictor)."""
    parts: dict[str, list[np.ndarray]] = {"maps": [], "q": [], "knn_maps": []}
    for i in range(0, len(vset), batch_size):
        out = predict(vset.images[i : i + batch_size])
        for k in parts:
            if k in out:
                parts[k].append(out[k])
    knn = np.concatenate(parts["knn_maps"]) if parts["knn_maps"] else None
    return np.concatenate(parts["maps"]), np.concatenate(parts["q"]), knn


class Validator:
    """Validation passes during training (every ``eval.validate_every`` steps): the network as it is,
    its training memory bank, the run's test-time augmentation. Reports :func:`validation_metrics`.

    Args:
        vset: the run's validation set; cfg: its configuration; device: the model's device; batch_size: images
            per pass (default ``eval.batch_size``; the loop gives its step's batch, whose convolution plans the
            first steps built), a short last batch padded on CUDA.
    """

    def __init__(self, vset: ValidationSet, cfg: Config, device: torch.device, batch_size: int | None = None):
        self.vset, self.cfg, self.device = vset, cfg, device
        self.batch_size = batch_size or cfg.eval.batch_size
        self.views = tta_views(cfg.eval.tta)
        self.usable = len(vset) > 0 and 0 < int(vset.labels.sum()) < len(vset)

    @torch.no_grad()
    def __call__(self, model: MAPLModel) -> dict[str, Any]:
        """Validation metrics of ``model`` (restored to its training mode after); {} without both classes."""
        if not self.usable:
            return {}
        was = model.training
        model.eval()

        def predict(images: np.ndarray) -> dict[str, np.ndarray]:
            n = len(images)
            if self.device.type == "cuda":
                images = pad_rows(images, self.batch_size)
            out = anomaly_maps(
                model, to_tensor(images, self.device), self.views, 1, self.cfg.train.amp, self.cfg.train.channels_last
            )
            return {k: v[:n].float().cpu().numpy() for k, v in out.items()}

        maps, q, _ = score_validation_set(predict, self.vset, self.batch_size)
        model.train(was)
        e = self.cfg.eval
        return validation_metrics(self.vset, maps, q, e.top_k, e.q_weight, e.q_weight_grid)
