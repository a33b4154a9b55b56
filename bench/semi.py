"""Does the unlabeled pool, pseudo-labeled, make the detector better? Four settings side by side.

Per category and seed (seeds that chose no setting):
  (a) clean: every train/good image labeled (the default), 2 OCCs; clean_k4: with 4 (the default since);
  (b) pool_as_normal: 10 labeled normals; the rest of train/good plus test anomalies making 10 % of the
      pool form the unlabeled pool, all used as normal data (pseudo-labels off);
  (c) mapl: the same data as (b), pseudo-labels on (OCCs on anomaly-map statistics, pseudo.features=map);
  mapl_knn: (c) with the OCCs on patch nearest-neighbour statistics (pseudo.features=knn, what the default
      pseudo.features=auto runs with a pool); mapl_knn_k4: the same with 4 OCCs (pseudo.num_occs=4, the
      default since the canaries chose it);
  (d) mapl_knn_5_labeled / mapl_knn_k4_5_labeled: mapl_knn / mapl_knn_k4 plus 5 labeled anomalies per type.
(b), (c) and the 2-OCC variants set pseudo.num_occs=2 explicitly (the default before 2026-12-04).
Every setting of a category and seed validates on the same files (data.split_validation_normals /
data.split_validation_anomalies): 4 train/good images, the simulated anomalies made on them, and 2 test
anomalies per defect type, which train in no setting; so (b)-(d) train on 6 labeled normals (10 labeled
in all) and (d) on 3 labeled anomalies per type (5 in all), and validation figures compare like with like.
The targets are checked on the variant a user gets by default (mapl_knn) and on the one the validation
canaries choose per category (fewest canaries let into the normal stream; ties: higher validation AUROC):
labeled data only, no test file.
Test figures are on the test split minus the images moved out of it. Every run is a Ray task
(mapl_ray.pipelines.grid), fractional GPUs so runs share the GPU. Writes bench/results/semi.json:
per category, setting and seed image / pixel AUROC, AUPRO, validation image AUROC, pseudo-label
precision and recall, how the validation canaries hidden in the pool were labeled
(eval.validation_canaries); per category and setting mean and spread; the targets of the semi-supervision
issue; and the Spearman correlation between validation and test image AUROC over all runs.

    python bench/semi.py --data-root ../shared/data --textures ../shared/data/dtd_subset/images \
        [--categories screw,magnetic_tile,metal_plate] [--seeds 101,102,103] [--steps 500] \
        [--gpus-per-trial 0.2 --cpus-per-trial 3] [--set section.field=value ...] [--out bench/results/semi.json]

Reduced CPU version: --categories metal_plate --seeds 101 --steps 100 --cpus-per-trial 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from common import (  # noqa: E402
    add_grid_arguments,
    category_base,
    machine,
    spearman,
    stats,
    val_test_correlation,
    with_validation_mean,
)

from mapl_ray.config import Config  # noqa: E402
from mapl_ray.pipelines.grid import Trial, run_grid  # noqa: E402

#: one validation set per category and seed, shared by every setting (module docstring)
SHARED_VALIDATION = {"data.split_validation_normals": 4, "data.split_validation_anomalies": 2}
POOL = {**SHARED_VALIDATION, "data.labeled_normals": 6, "data.pool_anomaly_share": 0.1}
K2, K4 = {"pseudo.num_occs": 2}, {"pseudo.num_occs": 4}
SETTINGS = {
    "clean": {**SHARED_VALIDATION, **K2},
    "clean_k4": {**SHARED_VALIDATION, **K4},
    # clean_k4 with the decoder's map alone (no patch bank fusion): the same training, so side by side the
    # fusion's own effect (eval.knn_weight chosen on validation otherwise)
    "clean_k4_decoder_map": {**SHARED_VALIDATION, **K4, "eval.knn_weight": 0.0},
    "pool_as_normal": {**POOL, "pseudo.enabled": False},
    "mapl": {**POOL, **K2, "pseudo.features": "map"},
    "mapl_knn": {**POOL, **K2, "pseudo.features": "knn"},
    "mapl_knn_k4": {**POOL, **K4, "pseudo.features": "knn"},
    "mapl_knn_5_labeled": {**POOL, **K2, "pseudo.features": "knn", "data.labeled_anomalies": 3},
    "mapl_knn_k4_5_labeled": {**POOL, **K4, "pseudo.features": "knn", "data.labeled_anomalies": 3},
}
#: (b), (c) and (d) with the patch bank filled from the final normal stream (model.knn_source=stream: labeled
#: normals plus pool images pseudo-labeled normal, their outlying patches dropped) instead of the labeled normals
STREAM = {"model.knn_source": "stream"}
for _name in ("pool_as_normal", "mapl_knn_k4", "mapl_knn_k4_5_labeled"):
    SETTINGS[f"{_name}_stream"] = {**SETTINGS[_name], **STREAM}
#: (c) and (d) with pseudo.normal_gate: a pool image whose farthest patch lies beyond every labeled normal's is
#: never labeled normal (mapl_ray.pseudo.labeler.normal_gate)
GATE = {"pseudo.normal_gate": True}
for _name in ("mapl_knn_k4", "mapl_knn_k4_5_labeled", "mapl_knn_k4_stream", "mapl_knn_k4_5_labeled_stream"):
    SETTINGS[f"{_name}_gate"] = {**SETTINGS[_name], **GATE}
#: the settings of the grid whose objective comparison was fixed beforehand (docs/results.md, seeds 110-112)
OBJECTIVE_SETTINGS = ("clean_k4", "clean_k4_decoder_map", "pool_as_normal", "mapl_knn_k4", "mapl_knn_k4_5_labeled")
OBJECTIVES = ("validation_image_auroc", "validation_pixel_auroc", "validation_mean_image_pixel_auroc")
#: the pseudo-labeler variants compared; the validation canaries (labeled data only) pick one per category
PSEUDO_VARIANTS = ("mapl", "mapl_knn", "mapl_knn_k4")
#: the variant of the defaults (pseudo.features=auto is knn with a pool: mapl_ray.pseudo.labeler.feature_kind;
#: pseudo.num_occs 4, chosen by the canaries over 2 on every category of the 2026-12-04 grid, docs/results.md)
DEFAULT_VARIANT = "mapl_knn_k4"


def choose_variant(rows: dict, variants: list[str]) -> str:
    """The pseudo-labeler variant with the fewest validation canaries in the normal stream (mean over seeds),
    ties broken by the higher validation objective: both from labeled data only (docs/method.md)."""

    def key(v: str) -> tuple[float, float]:
        canaries = rows[v]["canaries_in_normal_stream"]
        val = rows[v]["validation_objective"]
        return (canaries["mean"] if canaries else float("inf"), -(val["mean"] if val else 0.0))

    return min(variants, key=key)


def chosen_defaults(path: str | None, category: str) -> tuple[dict, bool, dict]:
    """``(clean overrides, use the category preset, pseudo overrides)`` that bench/defaults.py chose on
    validation for ``category`` (its ``chosen_clean`` and ``chosen_pool`` variants); the current
    defaults without a file."""
    if not path:
        return {}, True, {}
    from defaults import POOL, VARIANTS

    ranking = json.loads(Path(path).read_text())["ranking"].get(category, {})
    clean, preset = VARIANTS[ranking["chosen_clean"]] if ranking.get("chosen_clean") else ({}, True)
    pool = VARIANTS[ranking["chosen_pool"]][0] if ranking.get("chosen_pool") else {}
    return clean, preset, {k: v for k, v in pool.items() if k not in POOL}


def make_trials(args: argparse.Namespace, extra: dict[str, str]) -> list[Trial]:
    trials = []
    for category in args.categories.split(","):
        clean, preset, pseudo = chosen_defaults(args.defaults_from, category)
        base = category_base(
            category, args.data_root, args.textures, args.steps, args.cpus_per_trial, args.weights, preset
        )
        for setting in args.settings.split(","):
            for seed in (int(s) for s in args.seeds.split(",")):
                chosen = {**clean, **(pseudo if setting != "clean" else {})}
                over = {**base, **chosen, **SETTINGS[setting], "data.seed": seed, "train.seed": seed, **extra}
                cfg = Config().override(over).validate()
                trials.append(
                    Trial(
                        f"{category}-{setting}-{seed}",
                        cfg.to_dict(),
                        {"category": category, "setting": setting, "seed": seed, "chosen": chosen},
                    )
                )
    return trials


def _targets(rows: dict, mean: dict, clean: str, suffix: str) -> dict | None:
    """The semi-supervision issue's targets of one category, for the settings named with ``suffix`` ("" or
    "_stream": (b), (c), (d) with the patch bank from the labeled normals or from the normal stream)."""
    base = f"pool_as_normal{suffix}"
    variants = [v for v in PSEUDO_VARIANTS if f"{v}{suffix}" in mean]
    if not ({clean, base} <= set(mean) and variants):
        return None
    loss = mean[clean] - mean[base]
    named = {v: f"{v}{suffix}" for v in variants}
    share = {v: (mean[named[v]] - mean[base]) / loss if loss else None for v in variants}
    val = {
        v: rows[named[v]]["validation_objective"]["mean"] for v in variants if rows[named[v]]["validation_objective"]
    }
    canaries = {
        v: rows[named[v]]["canaries_in_normal_stream"]["mean"]
        for v in variants
        if rows[named[v]]["canaries_in_normal_stream"]
    }
    chosen = choose_variant({v: rows[named[v]] for v in variants}, variants)
    out = {
        "pool_setting": base,
        "chosen_on_validation_canaries": chosen,
        "canaries_in_normal_stream_by_variant": canaries,
        "validation_by_variant": val,
        "clean_setting": clean,
        "loss_clean_to_pool": loss,
        "recovered_share_by_variant": share,
    }
    for name, v in (("default", DEFAULT_VARIANT if DEFAULT_VARIANT in variants else None), ("chosen", chosen)):
        if v is None:
            continue
        labeled = f"{v}_5_labeled{suffix}"
        out[name] = {
            "variant": named[v],
            "recovered_share": share[v],
            "recovers_half": None if loss < 0.02 else bool(share[v] is not None and share[v] >= 0.5),
            "not_worse_than_pool_by_0.005": mean[named[v]] >= mean[base] - 0.005,
            "labeled_5_at_least_mapl": None if labeled not in mean else mean[labeled] >= mean[named[v]],
        }
    return out


def objective_decision(ok: list[dict]) -> dict:
    """The two rules fixed before the grid of seeds 110-112 (docs/results.md), from its runs:

    1. the objective: the mean of validation image and pixel AUROC replaces validation image AUROC if its
       Spearman with test image AUROC over the runs of :data:`OBJECTIVE_SETTINGS` reaches 0.6 and beats
       image AUROC's;
    2. the patch bank's source: ``model.knn_source=stream`` becomes the default if, over the pairs of runs
       (same category, seed and setting (b), (c), (d)) with either source, its mean of that objective is
       higher. Validation figures only: the test figures are reported beside, not used.

    ``ok``: finished runs as :func:`summarise` passes them (through :func:`with_validation_mean`)."""
    runs = [r for r in ok if r["setting"] in OBJECTIVE_SETTINGS]
    rho = {key: val_test_correlation(runs, key) for key in OBJECTIVES}
    image, mean_key = rho["validation_image_auroc"]["all"], rho["validation_mean_image_pixel_auroc"]["all"]
    adopt_mean = mean_key is not None and mean_key >= 0.6 and (image is None or mean_key > image)
    chosen = "validation_mean_image_pixel_auroc" if adopt_mean else "validation_image_auroc"
    # rule 1 was decided on the 45 runs of seeds 110-112 (docs/results.md) and is in the code since: rule 2
    # reads the objective the runs report, whatever rule 1 would say on another set of runs
    objective = "validation_objective"
    pairs = paired_runs(ok, "_stream")
    source = None
    if pairs:
        lab = sum(a[objective] for a, _ in pairs) / len(pairs)
        stream = sum(b[objective] for _, b in pairs) / len(pairs)
        source = {
            "pairs": len(pairs),
            "validation_labeled": lab,
            "validation_stream": stream,
            "test_image_auroc_labeled": sum(a["image_auroc"] for a, _ in pairs) / len(pairs),
            "test_image_auroc_stream": sum(b["image_auroc"] for _, b in pairs) / len(pairs),
            "chosen": "stream" if stream > lab else "labeled",
        }
    return {
        "objective_rule": {"spearman_on_fixed_settings": rho, "chosen_objective_on_these_runs": chosen},
        "knn_source_rule": source,
        "normal_gate_rule": gate_decision(ok),
    }


def paired_runs(ok: list[dict], suffix: str) -> list[tuple[dict, dict]]:
    """``(run, its twin)`` for every run whose setting + ``suffix`` ran on the same category and seed, both
    with a validation objective: the pairs a rule compares."""
    by_key = {(r["category"], r["seed"], r["setting"]): r for r in ok}
    pairs = [(r, by_key.get((cat, seed, f"{setting}{suffix}"))) for (cat, seed, setting), r in by_key.items()]
    return [
        (a, b)
        for a, b in pairs
        if b is not None and a.get("validation_objective") is not None and b.get("validation_objective") is not None
    ]


def gate_decision(ok: list[dict]) -> dict | None:
    """Rule 3, fixed before the grid of seeds 113-115 (docs/results.md): ``pseudo.normal_gate`` becomes the
    default if, over the pairs of runs (same category, seed and setting, without and with ``_gate``), its
    mean validation objective is higher and its mean number of validation canaries let into the normal
    stream is not. Validation figures only; the test figures are reported beside, deciding nothing.
    ``ok`` as for :func:`objective_decision`."""
    pairs = paired_runs(ok, "_gate")
    if not pairs:
        return None

    def mean(side: int, key: str) -> float | None:
        vals = [pair[side].get(key) for pair in pairs]
        vals = [v for v in vals if v is not None]
        return sum(vals) / len(vals) if vals else None

    val_off, val_on = mean(0, "validation_objective"), mean(1, "validation_objective")
    can_off, can_on = mean(0, "canaries_in_normal_stream"), mean(1, "canaries_in_normal_stream")
    adopt = val_on > val_off and (can_on is None or can_off is None or can_on <= can_off)
    return {
        "pairs": len(pairs),
        "validation_objective_off": val_off,
        "validation_objective_gate": val_on,
        "canaries_in_normal_stream_off": can_off,
        "canaries_in_normal_stream_gate": can_on,
        "test_image_auroc_off": mean(0, "image_auroc"),
        "test_image_auroc_gate": mean(1, "image_auroc"),
        "anomalies_in_normal_stream_off": mean(0, "anomalies_in_normal_stream"),
        "anomalies_in_normal_stream_gate": mean(1, "anomalies_in_normal_stream"),
        "chosen": "gate" if adopt else "no gate",
    }


def summarise(records: list[dict]) -> dict:
    """Mean / spread per category and setting, the issue's targets, and the validation-test correlation."""
    out: dict = {"by_category": {}, "targets": {}}
    records = with_validation_mean(records)  # runs recorded before the objective was named get it
    keys = (
        "validation_objective",
        "image_auroc",
        "pixel_auroc",
        "aupro",
        "validation_image_auroc",
        "validation_pixel_auroc",
        "knn_weight",
        "pseudo_label_precision",
        "pseudo_label_recall",
        "canary_recall",
        "canaries_in_normal_stream",
        "pseudo_score_auroc",
    )
    for cat in sorted({r["category"] for r in records}):
        rows = {}
        for setting in SETTINGS:
            rs = [r for r in records if r["category"] == cat and r["setting"] == setting and "error" not in r]
            if rs:
                rows[setting] = {k: stats([r.get(k) for r in rs]) for k in keys} | {"runs": len(rs)}
        out["by_category"][cat] = rows
        mean = {s: rows[s]["image_auroc"]["mean"] for s in rows if rows[s]["image_auroc"]}
        clean = "clean_k4" if "clean_k4" in mean else "clean"  # the default's clean run (4 OCCs) where it ran
        for suffix, key in (("", "targets"), ("_stream", "targets_stream")):
            found = _targets(rows, mean, clean, suffix)
            if found:
                out.setdefault(key, {})[cat] = found
    ok = [r for r in records if "error" not in r]
    out.update(objective_decision(ok))
    out["spearman_val_test"] = val_test_correlation(ok)
    # the three candidate objectives compared on the grid of seeds 104-106 (fixed beforehand, docs/results.md)
    out["spearman_objectives"] = {key: val_test_correlation(ok, key) for key in OBJECTIVES}
    # every setting validates on the same files (SHARED_VALIDATION); the pool settings alone, for comparison
    out["spearman_val_test_pool_settings"] = val_test_correlation([r for r in ok if r["setting"] != "clean"])
    # do the canaries (labeled) see the contamination that the pool's own defects (unlabeled) bring?
    pool = [r for r in ok if r.get("canaries_in_normal_stream") is not None]
    out["spearman_canaries_vs_pool_anomalies_in_normal_stream"] = spearman(
        [r["canaries_in_normal_stream"] for r in pool], [r.get("anomalies_in_normal_stream") for r in pool]
    )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_grid_arguments(p, "101,102,103", "/tmp/mapl-semi", "semi.json")
    p.add_argument("--settings", default=",".join(SETTINGS))
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    p.add_argument(
        "--defaults-from",
        help="bench/defaults.py's JSON: run each category with the variants it chose "
        "on validation (its ranking's chosen_clean, and chosen_pool's pseudo settings for the pool settings)",
    )
    p.add_argument(
        "--from-runs",
        metavar="JSON",
        help="recompute the summary of earlier semi.json runs (no training; the first file's command and machine "
        "kept): a comma list joins the runs of several calls",
    )
    args = p.parse_args()
    if args.from_runs:
        parts = [json.loads(Path(f).read_text()) for f in args.from_runs.split(",")]
        result = parts[0]
        for extra_part in parts[1:]:  # later calls' runs join the first call's (each keeps its command)
            result["runs"] += extra_part["runs"]
            result.setdefault("later_calls", []).append(
                {k: extra_part.get(k) for k in ("command", "machine", "wall_s", "device_command")}
            )
        result = {k: v for k, v in result.items() if k not in ("by_category", "targets")}
        result.update(summarise(result["runs"]))
        result["summary_command"] = " ".join(sys.argv)
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(json.dumps(result["targets"], indent=2))
        return
    extra = dict(item.split("=", 1) for item in args.set)
    trials = make_trials(args, extra)
    out = Path(args.out)
    result = {
        "command": " ".join(sys.argv),
        "machine": machine(),
        "settings": SETTINGS,
        "steps": args.steps,
        "runs": [],
    }
    t0 = time.perf_counter()

    def save(trial: Trial, record: dict) -> None:
        result["runs"].append(record)
        result["wall_s"] = time.perf_counter() - t0
        result.update(summarise(result["runs"]))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        err = record.get("error")
        print(
            f"{trial.name}: "
            + (
                f"error {err}"
                if err
                else f"test {record['image_auroc']:.3f} val {record['validation_objective']} wall {record['wall_s']:.0f}s"
            ),
            flush=True,
        )

    run_grid(trials, args.runs, args.gpus_per_trial, args.cpus_per_trial, on_result=save)
    print(
        json.dumps(
            {
                k: result[k]
                for k in ("targets", "spearman_val_test", "spearman_val_test_pool_settings", "spearman_objectives")
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
