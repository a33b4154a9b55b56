"""Data check: how well does mean image brightness alone separate good from defective test images?

A value far from 0.5 means the test split's image AUROC can be inflated by a detector that reacts to
global brightness rather than to defects. With ``--runs``, each trained run folder's test split is also
scored twice: as is, and brightness-matched (every test image's grey levels scaled so its mean equals
the mean of the category's train/good images). A detector of defects keeps its image AUROC on the
matched images; one that ranks images by brightness loses it. Writes (merges into)
``bench/results/brightness_confound.json``.

    python bench/brightness_confound.py [--data-root ../shared/data] [--runs RUN ...] [--skip-data]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from mapl_ray.data.io import load_records
from mapl_ray.data.layout import scan_category
from mapl_ray.eval.metrics import image_auroc

CATEGORIES = {"screw": "mvtec_ad", "magnetic_tile": "magnetic_tile", "metal_plate": "mpdd"}


def main() -> None:
    here = Path(__file__).resolve().parent
    p = argparse.ArgumentParser()
    p.add_argument("--data-root", default=str(here.parent.parent / "shared" / "data"))
    p.add_argument("--runs", nargs="*", default=[], help="trained run folders to score as is and brightness-matched")
    p.add_argument("--skip-data", action="store_true", help="keep the stored per-category data figures")
    args = p.parse_args()
    path = here / "results" / "brightness_confound.json"
    out = json.loads(path.read_text()) if path.is_file() else {}
    out["what"] = "image AUROC of the mean grey level alone (256x256 inputs), and mean grey level per split"
    if args.runs:
        import sys

        out["runs_command"] = "python bench/brightness_confound.py " + " ".join(sys.argv[1:])
    from mapl_ray.runfolder import CheckpointError, require_run_folder

    try:
        runs = [require_run_folder(r) for r in args.runs]  # every folder checked before any scoring
    except CheckpointError as e:
        raise SystemExit(f"brightness_confound.py: error: {e}") from None
    for run in runs:
        out.setdefault("runs", {})[str(run)] = score_run(run)
        print(run, json.dumps(out["runs"][str(run)]))
        path.write_text(json.dumps(out, indent=2))
    for cat, ds in ({} if args.skip_data else CATEGORIES).items():
        index = scan_category(Path(args.data_root) / ds, cat)
        test = load_records(index.test, 256)
        train = load_records(index.train_good, 256)
        labels = np.array([r.label for r in test.records])
        means = test.images.reshape(len(labels), -1).mean(1)
        out[cat] = {
            "brightness_only_auroc": image_auroc(labels, means),
            "mean_grey_train_good": float(train.images.mean()),
            "mean_grey_test_good": float(means[labels == 0].mean()),
            "mean_grey_test_defective": float(means[labels == 1].mean()),
        }
        print(cat, json.dumps(out[cat]))
    path.write_text(json.dumps(out, indent=2))


def brightness_matched(images: np.ndarray, target: float) -> np.ndarray:
    """uint8 ``(N, H, W, 3)`` -> same, each image's grey levels scaled so that its mean is ``target`` (clipped)."""
    means = images.reshape(len(images), -1).mean(1).astype(np.float32)
    gain = (target / np.maximum(means, 1.0))[:, None, None, None]
    return np.clip(np.rint(images.astype(np.float32) * gain), 0, 255).astype(np.uint8)


def score_run(run: Path) -> dict:
    """Image AUROC of a run on its test split as is and brightness-matched (the run's own scoring, TTA included)."""
    from scipy.stats import spearmanr

    from mapl_ray.config import Config
    from mapl_ray.data.pose import build_pose_estimator
    from mapl_ray.data.split import Split
    from mapl_ray.inference import Predictor
    from mapl_ray.runfolder import read_state

    cfg = Config.load_run(run / "config.yaml")
    split = Split.from_json(run / "split.json")
    align = build_pose_estimator(cfg)
    test = load_records(split.test, cfg.data.image_size, align=align)
    labels = np.array([r.label for r in test.records])
    normals = load_records(split.labeled_normal, cfg.data.image_size, align=align).images
    target = float(normals.mean())
    pred = Predictor(run)
    raw = pred.predict_arrays(test.images)["scores"]
    matched = pred.predict_arrays(brightness_matched(test.images, target))["scores"]
    grey = test.images.reshape(len(labels), -1).mean(1)
    return {
        "encoder": cfg.model.encoder,
        "steps_trained": int(read_state(run)["step"]),
        "eval_tta": cfg.eval.tta,
        "target_mean_grey": round(target, 2),
        "image_auroc": image_auroc(labels, raw),
        "image_auroc_brightness_matched": image_auroc(labels, matched),
        "score_brightness_spearman": float(spearmanr(raw, grey).statistic),
    }


if __name__ == "__main__":
    main()
