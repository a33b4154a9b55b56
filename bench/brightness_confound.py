"""Data check: how well does mean image brightness alone separate good from defective test images?

A value far from 0.5 means the test split's image AUROC can be inflated by a detector that reacts to
global brightness rather than to defects. Writes ``bench/results/brightness_confound.json``.

    python bench/brightness_confound.py [--data-root ../shared/data]
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
    args = p.parse_args()
    out = {"what": "image AUROC of the mean grey level alone (256x256 inputs), and mean grey level per split"}
    for cat, ds in CATEGORIES.items():
        index = scan_category(Path(args.data_root) / ds, cat)
        test = load_records(index.test, 256)
        train = load_records(index.train_good, 256)
        labels = np.array([r.label for r in test.records])
        means = test.images.reshape(len(labels), -1).mean(1)
        out[cat] = {"brightness_only_auroc": image_auroc(labels, means),
                    "mean_grey_train_good": float(train.images.mean()),
                    "mean_grey_test_good": float(means[labels == 0].mean()),
                    "mean_grey_test_defective": float(means[labels == 1].mean())}
        print(cat, json.dumps(out[cat]))
    (here / "results" / "brightness_confound.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
