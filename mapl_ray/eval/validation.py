"""The validation objective: how well a model separates the validation set's anomalies from its normals
(:mod:`mapl_ray.data.validation`: labeled data and simulated anomalies only, never a test file).

Every choice of a setting is made on it: the image head's weight in the image score
(:func:`choose_q_weight`), checkpoints and hyperparameters (Ray Tune reports it), the defaults. The
objective is the image AUROC of the image score; pixel AUROC over the validation masks and the
AUROC per anomaly source (simulated, labeled) are reported beside it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ..config import Config
from ..data.validation import SOURCE_LABELED_ANOMALY, SOURCE_NORMAL, SOURCE_SIMULATED, ValidationSet
from ..model.anomaly_map import anomaly_maps, topk_mean, tta_views
from ..model.network import MAPLModel
from ..tensors import to_tensor
from .metrics import image_auroc, pixel_auroc


def choose_q_weight(
    labels: np.ndarray, map_scores: np.ndarray, q: np.ndarray, grid: tuple[float, ...]
) -> tuple[float, dict[str, float]]:
    """The weight ``w`` of the image head in ``score = map_score + w * q`` with the highest validation
    image AUROC (ties: the smallest ``w``), and the AUROC of every candidate.

    Args:
        labels: int ``(V,)`` 0 / 1; map_scores, q: float ``(V,)`` (top-k map score, head probability).
        grid: candidate weights >= 0 (``eval.q_weight_grid``).

    Raises:
        ValueError: the labels hold one class only (no AUROC).
    """
    aurocs = {float(w): image_auroc(labels, map_scores + w * q) for w in sorted(grid)}
    best = max(aurocs.items(), key=lambda kv: (round(kv[1], 12), -kv[0]))[0]
    return best, {f"{w:g}": a for w, a in aurocs.items()}


def validation_metrics(
    vset: ValidationSet, maps: np.ndarray, q: np.ndarray, top_k: int, q_weight: float | None, grid: tuple[float, ...]
) -> dict[str, Any]:
    """The validation objective and its parts from a model's maps ``(V, H, W)`` and head probabilities ``(V,)``.

    ``q_weight`` None chooses it on this set (:func:`choose_q_weight`). Returns ``image_auroc`` (the
    objective, with the weight used), ``image_auroc_map`` (map score alone), ``q_weight``,
    ``image_auroc_by_q_weight``, ``pixel_auroc``, ``image_auroc_simulated`` /
    ``image_auroc_labeled_anomalies`` (each source against the normals, where present), and the counts.
    """
    labels = vset.labels.astype(np.int64)
    map_scores = np.asarray(topk_mean(maps, top_k), dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    chosen, by_weight = choose_q_weight(labels, map_scores, q, grid)
    w = chosen if q_weight is None else float(q_weight)
    scores = map_scores + w * q
    out: dict[str, Any] = {
        "image_auroc": image_auroc(labels, scores),
        "image_auroc_map": image_auroc(labels, map_scores),
        "q_weight": w,
        "q_weight_chosen_on_validation": q_weight is None,
        "image_auroc_by_q_weight": by_weight,
        "pixel_auroc": pixel_auroc(vset.masks, maps),
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
) -> tuple[np.ndarray, np.ndarray]:
    """``(maps (V, H, W), q (V,))`` of the validation images through ``predict`` (uint8 batch -> numpy
    ``maps`` and ``q``, e.g. :meth:`mapl_ray.inference.Predictor.predict_arrays`)."""
    maps, q = [], []
    for i in range(0, len(vset), batch_size):
        out = predict(vset.images[i : i + batch_size])
        maps.append(out["maps"])
        q.append(out["q"])
    return np.concatenate(maps), np.concatenate(q)


class Validator:
    """Validation passes during training (every ``eval.validate_every`` steps): the network as it is,
    its training memory bank, the run's test-time augmentation. Reports :func:`validation_metrics`.

    Args:
        vset: the run's validation set; cfg: its configuration; device: the model's device.
    """

    def __init__(self, vset: ValidationSet, cfg: Config, device: torch.device):
        self.vset, self.cfg, self.device = vset, cfg, device
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
            out = anomaly_maps(
                model, to_tensor(images, self.device), self.views, 1, self.cfg.train.amp, self.cfg.train.channels_last
            )
            return {k: v.float().cpu().numpy() for k, v in out.items()}

        maps, q = score_validation_set(predict, self.vset, self.cfg.eval.batch_size)
        model.train(was)
        e = self.cfg.eval
        return validation_metrics(self.vset, maps, q, e.top_k, e.q_weight, e.q_weight_grid)
