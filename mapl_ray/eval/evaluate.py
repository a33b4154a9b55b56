"""Calibrate a trained run on held-out labeled normals and evaluate it on the test split.

Calibration (score normalisation and decision threshold) sees labeled normal validation images only;
the test split is read only here, after training, and never chooses a checkpoint or hyperparameter.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..data.io import load_records
from ..data.split import Split
from ..data.validation import ValidationSet
from ..inference import Predictor
from ..runfolder import SPLIT_FILE, checkpoint_dir
from .metrics import compute_metrics, decision_counts, fit_normalisation, threshold_from_normals
from .report import map_threshold, write_report
from .validation import score_validation_set, validation_metrics


def calibrate(run_dir: str | Path, validation: ValidationSet | np.ndarray, device: str = "auto") -> dict[str, Any]:
    """Choose the patch bank's share in the map and the image head's weight on the validation set, then fit
    the z-score normalisation and the decision threshold on its normals (scored as the run will score);
    update ``state.json``.

    Args:
        validation: the run's :class:`~mapl_ray.data.validation.ValidationSet`, or plain uint8 normals
            ``(V, H, W, 3)`` (no objective then; the weight stays ``eval.q_weight``). Fewer than 2
            normals: no threshold (``predict`` then reports scores without labels).

    Returns:
        the updated state dict (``knn_fusion``, ``q_weight``, ``validation`` metrics, ``normalisation``,
        ``threshold``).
    """
    pred = Predictor(run_dir, device=device, parts=True, fixed_batch=True)
    state = dict(pred.state)
    cfg = pred.cfg
    vset = validation if isinstance(validation, ValidationSet) else None
    normals = validation.normals if vset is not None else np.asarray(validation)
    if vset is not None and 0 < int(vset.labels.sum()) < len(vset):
        maps, q, knn_maps = score_validation_set(pred.predict_arrays, vset, pred.batch_size)
        e = cfg.eval
        state["validation"] = validation_metrics(
            vset, maps, q, e.top_k, e.q_weight, e.q_weight_grid, knn_maps, e.knn_weight, e.knn_weight_grid
        )
        state["q_weight"] = state["validation"]["q_weight"]
        state["knn_fusion"] = state["validation"].get("knn_fusion")
    pred.state, pred.parts = state, False
    if len(normals) >= 2:
        scores = pred.predict_arrays(normals)["scores"]
        state["normalisation"] = fit_normalisation(scores)
        state["threshold"] = threshold_from_normals(scores, cfg.eval.threshold_quantile)
        state["threshold_source"] = (
            f"{cfg.eval.threshold_quantile:.2f} quantile of {len(scores)} held-out labeled normal images (no test data)"
        )
    else:
        state["threshold"] = None
        state["threshold_source"] = "none: fewer than 2 held-out labeled normal images"
    (checkpoint_dir(run_dir) / "state.json").write_text(json.dumps(state, indent=2))
    return state


def _sample_indices(labels: np.ndarray, defect_types: list[str], n: int, seed: int) -> list[int]:
    """Up to ``n`` test images for heatmaps: spread over 'good' and each defect type."""
    rng = np.random.default_rng(seed)
    groups: dict[str, list[int]] = {}
    for i, t in enumerate(defect_types):
        groups.setdefault(t, []).append(i)
    picks: list[int] = []
    per = max(1, n // max(1, len(groups)))
    for t in sorted(groups):
        idx = groups[t]
        picks += list(rng.choice(idx, size=min(per, len(idx)), replace=False))
    return sorted(int(i) for i in picks[:n])


def score_test_split(pred: Predictor, records: list, skip_bad: bool = False):
    """Score test records with a trained run, for metrics.

    Returns ``(loaded, res, masks, maps)``: the :class:`~mapl_ray.data.io.LoadedImages` as scored,
    :meth:`Predictor.predict_arrays`'s output on them, and masks and maps in the files' own frame. Under
    ``data.align`` the images are scored in their canonical pose, the masks are read as stored and the
    maps are turned back; ``loaded.images`` is then in the files' frame too, for overlays.

    Raises:
        ImageReadError / LayoutError: a test image or mask is unreadable (unless ``skip_bad``) or misfits.
    """
    loaded = load_records(records, pred.image_size, skip_bad=skip_bad, with_masks=True, align=pred.pose_estimator)
    res = pred.predict_arrays(loaded.images)
    masks, maps = loaded.masks, res["maps"]
    if pred.pose_estimator is not None:
        plain = load_records(loaded.records, pred.image_size, with_masks=True)
        masks = plain.masks
        maps = np.stack([pred.to_original_frame(m, pose) for m, pose in zip(maps, loaded.poses)]) if len(maps) else maps
        loaded.images = plain.images
    return loaded, res, masks, maps


def evaluate_run(run_dir: str | Path, device: str = "auto", extra_info: dict[str, Any] | None = None) -> dict[str, Any]:
    """Score the run's test split; write ``metrics.json``, ``report.md``, ``plots/``, ``heatmaps/``.

    Returns the metrics dict (``overall`` and ``per_defect``: image AUROC, pixel AUROC, AUPRO, F1-max).

    Raises:
        CheckpointError / LayoutError: the run folder or the test images are missing or unreadable.
    """
    run_dir = Path(run_dir)
    pred = Predictor(run_dir, device=device, fixed_batch=True)
    cfg = pred.cfg
    split = Split.from_json(run_dir / SPLIT_FILE)
    t0 = time.perf_counter()
    # pixel metrics and heatmaps on the images as they are stored (maps turned back under data.align)
    loaded, res, masks, maps = score_test_split(pred, split.test, skip_bad=cfg.data.skip_bad_images)
    eval_s = time.perf_counter() - t0
    labels = np.array([r.label for r in loaded.records], dtype=np.int64)
    types = [r.defect_type for r in loaded.records]
    metrics = compute_metrics(labels, res["scores"], types, masks, maps)
    thr = pred.threshold
    if thr is not None:
        metrics["decisions"] = decision_counts(labels, res["scores"], types, thr)
        metrics["overall"]["threshold"] = float(thr)
        metrics["overall"]["accuracy_at_threshold"] = metrics["decisions"]["accuracy"]
    sample = [
        {
            "image": loaded.images[i],
            "map": maps[i],
            "mask": masks[i],
            "path": loaded.records[i].path,
            "defect_type": types[i],
            "score": float(res["scores"][i]),
            "label": int(labels[i]),
        }
        for i in _sample_indices(labels, types, cfg.eval.heatmaps, cfg.data.seed)
    ]
    info = {
        "category": cfg.data.category,
        "data_root": cfg.data.root,
        "encoder": cfg.model.encoder,
        "image_size": cfg.data.image_size,
        "steps": cfg.train.steps,
        "batch": f"{cfg.train.batch_normal} normal + {cfg.train.batch_simulated} simulated",
        "memory_backend": pred.state.get("memory_backend"),
        # maps averaged over this many memory banks (model.memory_banks; the checkpoint holds them)
        "memory_banks": len(pred.model.banks),
        "image_score": f"mean of top-{cfg.eval.top_k} anomaly-map pixels"
        + (
            f" (map: {1 - pred.fusion['weight']:g} decoder + {pred.fusion['weight']:g} patch nearest-neighbour, "
            "the latter in the former's units by the validation normals; weight chosen on validation)"
            if pred.fusion
            else ""
        )
        + (f" + {pred.q_weight:g} * q (weight chosen on validation)" if pred.q_weight else ""),
        "threshold": pred.state.get("threshold_source", "none"),
        "split": split.summary(),
        "test_images_scored": int(len(labels)),
        "test_images_skipped": len(loaded.skipped),
        "eval_s": round(eval_s, 2),
        "device": str(pred.device),
    }
    if cfg.data.align != "none":
        info["pose_normalisation"] = (
            f"data.align={cfg.data.align}: test images were scored in the object's canonical "
            "pose and their anomaly maps turned back; pixel metrics and heatmaps are in "
            "the images' own frame"
        )
    if extra_info is None and (run_dir / "metrics.json").is_file():
        # a re-evaluation keeps what only training knew (timings, skipped images)
        previous = json.loads((run_dir / "metrics.json").read_text()).get("run", {})
        extra_info = {k: previous[k] for k in ("training", "data") if k in previous}
    if extra_info:
        info.update(extra_info)
    write_scores(run_dir / "scores.csv", [r.path for r in loaded.records], types, labels, res["scores"], thr)
    if pred.state.get("validation"):  # the objective settings are chosen on (labeled data, never test)
        metrics["validation"] = pred.state["validation"]
    write_report(
        run_dir,
        metrics,
        info,
        labels=labels,
        scores=res["scores"],
        threshold=thr,
        sample=sample,
        map_threshold=map_threshold(thr, pred.q_weight),
    )
    return metrics


def write_scores(
    path: Path, paths: list[str], types: list[str], labels: np.ndarray, scores: np.ndarray, threshold: float | None
) -> Path:
    """Per-image results of an evaluation as CSV, highest score first: ``path, defect_type, label, score,
    anomalous`` (``anomalous`` = score >= the run's decision threshold; empty without one).

    Lets a user see which good images were flagged and which defects were missed.
    """
    import csv

    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "defect_type", "label", "score", "anomalous"])
        for i in order:
            decided = "" if threshold is None else int(scores[i] >= threshold)
            w.writerow([paths[i], types[i], int(labels[i]), f"{float(scores[i]):.8g}", decided])
    return path
