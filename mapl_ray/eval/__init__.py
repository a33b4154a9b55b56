"""Evaluation: image / pixel metrics (AUROC, F1-max, AUPRO) and run reports."""

from .metrics import (
    aupro,
    compute_metrics,
    f1_max,
    fit_normalisation,
    image_auroc,
    normalise_scores,
    pixel_auroc,
    pro_curve,
    threshold_from_normals,
)
from .report import save_heatmap_overlay, save_roc_plot, save_score_histogram, write_report

__all__ = [
    "aupro",
    "compute_metrics",
    "f1_max",
    "fit_normalisation",
    "image_auroc",
    "normalise_scores",
    "pixel_auroc",
    "pro_curve",
    "threshold_from_normals",
    "save_heatmap_overlay",
    "save_roc_plot",
    "save_score_histogram",
    "write_report",
]
