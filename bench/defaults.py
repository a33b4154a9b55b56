"""Re-choose the defaults and category presets on the validation objective alone.

Runs the design choices that matter as variants of each category's run, on choice seeds (never the
seeds bench/semi.py reports), ranks them by the mean validation objective (mean of validation image
and pixel AUROC, mapl_ray.eval.validation.objective; labeled data and simulated anomalies only) and names the winner. Test figures are recorded beside the ranking for the
validation-test correlation; nothing is chosen on them. Writes bench/results/defaults.json.

Variants (on the clean split unless named pool_*: the semi-supervision issue's pool setting, where the
pseudo-labeler matters):
  general      the general defaults, no category preset (8-view rotation TTA, 8 memory rotations)
  preset       the category's current preset (screw: pose normalisation, 10 memory banks)
  no_rotation  no rotation augmentation / TTA / memory rotations (the paper's setting)
  banks5       the general defaults with 5 memory banks
  topk10       image score from the top-10 pixels instead of 100
  pool_map / pool_pooled / pool_both   pseudo.features in the pool setting
  pool_head_trunk  the BCE terms train the trunk too (model.head_detach=false), pool setting

    python bench/defaults.py --data-root DATA --textures DTD [--categories ...] [--seeds 1,2] [--variants ...]
        [--gpus-per-trial 0.2 --cpus-per-trial 3] [--out bench/results/defaults.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from common import add_grid_arguments, category_base, machine, stats, val_test_correlation  # noqa: E402

from mapl_ray.config import Config  # noqa: E402
from mapl_ray.pipelines.grid import Trial, run_grid  # noqa: E402
from mapl_ray.presets import CATEGORY_PRESETS  # noqa: E402

POOL = {"data.labeled_normals": 10, "data.pool_anomaly_share": 0.1, "eval.validation_normals": 4}
NO_ROTATION = {"train.augment": "none", "eval.tta": "none", "model.memory_rotations": 1}
VARIANTS = {
    "general": ({}, False),
    "preset": ({}, True),
    "no_rotation": (NO_ROTATION, False),
    "banks5": ({"model.memory_banks": 5}, False),
    "topk10": ({"eval.top_k": 10}, True),
    "pool_map": ({**POOL, "pseudo.features": "map"}, True),
    "pool_pooled": ({**POOL, "pseudo.features": "pooled"}, True),
    "pool_both": ({**POOL, "pseudo.features": "both"}, True),
    "pool_head_trunk": ({**POOL, "model.head_detach": False}, True),
}


def make_trials(args: argparse.Namespace) -> list[Trial]:
    trials = []
    for category in args.categories.split(","):
        for variant in args.variants.split(","):
            over, preset = VARIANTS[variant]
            if variant == "preset" and category not in CATEGORY_PRESETS:
                continue
            base = category_base(
                category, args.data_root, args.textures, args.steps, args.cpus_per_trial, args.weights, preset
            )
            for seed in (int(s) for s in args.seeds.split(",")):
                cfg = Config().override({**base, **over, "data.seed": seed, "train.seed": seed}).validate()
                trials.append(
                    Trial(
                        f"{category}-{variant}-{seed}",
                        cfg.to_dict(),
                        {"category": category, "variant": variant, "seed": seed},
                    )
                )
    return trials


def rank(records: list[dict]) -> dict:
    """Per category: every variant's validation and test statistics, the clean and pool variants ranked
    by the mean validation objective (the choice), and the validation-test Spearman correlation."""
    out: dict = {}
    ok = [r for r in records if "error" not in r]
    for cat in sorted({r["category"] for r in ok}):
        rows = {}
        for variant in VARIANTS:
            rs = [r for r in ok if r["category"] == cat and r["variant"] == variant]
            if rs:
                rows[variant] = {
                    k: stats([r.get(k) for r in rs])
                    for k in (
                        "validation_objective",
                        "validation_image_auroc",
                        "image_auroc",
                        "pixel_auroc",
                        "aupro",
                        "pseudo_label_precision",
                        "pseudo_label_recall",
                    )
                }
        by_val = {v: rows[v]["validation_objective"]["mean"] for v in rows if rows[v]["validation_objective"]}
        clean = sorted((v for v in by_val if not v.startswith("pool_")), key=lambda v: -by_val[v])
        pool = sorted((v for v in by_val if v.startswith("pool_")), key=lambda v: -by_val[v])
        out[cat] = {
            "variants": rows,
            "clean_ranking": clean,
            "pool_ranking": pool,
            "chosen_clean": clean[0] if clean else None,
            "chosen_pool": pool[0] if pool else None,
        }
    out["spearman_val_test"] = val_test_correlation(ok)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_grid_arguments(p, "1,2", "/tmp/mapl-defaults", "defaults.json")
    p.add_argument("--variants", default=",".join(VARIANTS))
    args = p.parse_args()
    out = Path(args.out)
    result = {
        "command": " ".join(sys.argv),
        "machine": machine(),
        "variants": {k: v[0] for k, v in VARIANTS.items()},
        "judged_on": "validation objective, the mean of image and pixel AUROC (labeled normals held out, simulated anomalies with held-out "
        "textures, held-out labeled anomalies); test figures are recorded, not used",
        "runs": [],
    }
    t0 = time.perf_counter()

    def save(trial: Trial, record: dict) -> None:
        result["runs"].append(record)
        result["wall_s"] = time.perf_counter() - t0
        result["ranking"] = rank(result["runs"])
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        val, test = record.get("validation_objective") or 0, record.get("image_auroc") or 0
        print(f"{trial.name}: {record.get('error') or f'val {val:.3f} test {test:.3f}'}", flush=True)

    run_grid(make_trials(args), args.runs, args.gpus_per_trial, args.cpus_per_trial, on_result=save)
    print(
        json.dumps(
            {
                c: {k: v for k, v in r.items() if k != "variants"} if isinstance(r, dict) else r
                for c, r in result["ranking"].items()
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
