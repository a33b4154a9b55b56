"""Ray Tune over the pseudo-labeler: does the searched configuration beat the default, and what do the
parallel OCC fits save? Three parts, one command:

  (a) search: `mapl tune`'s search (mapl_ray.pipelines.tune) of --num-samples trials on one category,
      judged on the validation objective only (the test split is never read), fractional GPUs so the
      trials share the GPU;
  (b) compare: the best configuration (the search's best.yaml) and the default one (its base.yaml)
      trained side by side on --seeds (data and training seed), validation and test image AUROC; the
      test split is read here only, after the search, and chooses nothing; plus one run of the default
      at --fit-run-steps steps for the pseudo-labeler's cost inside a run (pseudo_fit_s: the refits'
      time on the training path: features, and waiting for fits that overlap training);
  (c) occ: K = 8 OCCs fitted one after the other (in this process, and in one Ray task of one CPU: the
      speedup's baseline) against 8 Ray tasks on --occ-cpus CPUs, best of --repeats, on features of
      the pseudo-labeler's sizes (the run's map statistics) and of pooled encoder features; the two fits
      must give the same ensemble.
--parts picks some (search,compare,occ); --parts compare --from-json JSON compares the best and default
configurations of an earlier call's JSON (when one device call cannot hold all three).

Default setting "pool" (bench/semi.py's: 10 labeled normals, the rest of train/good plus test anomalies
making 10 % of it the unlabeled pool, and the split's own validation set of 4 of the 10 normals and 2
labeled anomalies per defect type), where the pseudo-labeler decides what trains the detector.
Writes bench/results/tune.json (trials, wall_s, default/best validation and test image AUROC,
best_config, occ_parallel_speedup, pseudo_fit_s_in_run, machine, command, settings).

    python bench/tune.py --data-root ../shared/data --textures ../shared/data/dtd_subset/images \
        [--categories screw] [--num-samples 32] [--steps 250] [--gpus-per-trial 0.125 --cpus-per-trial 2]

Reduced CPU version (bench/results/tune_cpu.json):
    python bench/tune.py --num-samples 3 --steps 8 --seeds 101 --fit-run-steps 8 --occ-cpus 2 \
        --set data.image_size=64 --set model.encoder=tf_efficientnet_lite0 ... --out bench/results/tune_cpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from common import add_grid_arguments, category_base, machine, stats  # noqa: E402
from semi import POOL  # noqa: E402

from mapl_ray.config import Config  # noqa: E402
from mapl_ray.pipelines.grid import Trial, run_grid  # noqa: E402

SETTINGS = {
    "pool": dict(POOL),
    "clean": {},
}


def search(args: argparse.Namespace, extra: dict, result: dict) -> Path:
    """Part (a): the search; returns its folder."""
    from mapl_ray.pipelines.tune import load_search_space, tune_search

    category = args.categories.split(",")[0]
    base = category_base(category, args.data_root, args.textures, args.steps, args.cpus_per_trial, args.weights)
    cfg = Config().override({**base, **SETTINGS[args.setting], **extra}).validate()
    folder = Path(args.runs) / "search"
    summary = tune_search(
        cfg,
        folder,
        space=load_search_space(args.search_space),
        num_samples=args.num_samples,
        gpus_per_trial=args.gpus_per_trial,
        cpus_per_trial=args.cpus_per_trial,
        seed=args.search_seed,
        occ_cpus_per_trial=args.occ_cpus_per_trial,
    )
    result["search"] = summary
    result["trials"] = summary["trials"]
    result["search_wall_s"] = summary["wall_s"]
    result["trials_table"] = (folder / "trials.csv").read_text()
    return folder


def compare(args: argparse.Namespace, folder: Path, result: dict, save) -> None:
    """Part (b): best.yaml and base.yaml side by side on the seeds, and one default run of --fit-run-steps."""
    if args.from_json:  # an earlier call's search (a device call of at most 10 minutes each)
        earlier = json.loads(Path(args.from_json).read_text())
        best, default = (Config.from_dict(earlier[k]) for k in ("best_config", "default_config"))
        for key in ("search", "trials", "search_wall_s", "trials_table"):
            result[key] = earlier.get(key)
        result["search_from"] = {"file": args.from_json, "command": earlier.get("command")}
    else:
        best, default = Config.load(folder / "best.yaml"), Config.load(folder / "base.yaml")
    result["best_config"], result["default_config"] = best.to_dict(), default.to_dict()
    trials = []
    for seed in (int(s) for s in args.seeds.split(",")):
        for name, cfg in (("default", default), ("best", best)):
            over = {"data.seed": seed, "train.seed": seed}
            trials.append(Trial(f"{name}-{seed}", cfg.override(over).to_dict(), {"config": name, "seed": seed}))
    if args.fit_run_steps:
        over = {"train.steps": args.fit_run_steps, "eval.validate_every": 0}
        trials.append(Trial("fit-run", default.override(over).to_dict(), {"config": "fit-run", "seed": 0}))

    def on_result(trial: Trial, record: dict) -> None:
        result["runs"].append(record)
        print(f"{trial.name}: " + (f"error {record['error']}" if "error" in record else
              f"test {record['image_auroc']:.3f} val {record['validation_objective']} pseudo_fit {record['pseudo_fit_s']:.2f}s"),
              flush=True)  # fmt: skip
        save()

    run_grid(trials, Path(args.runs) / "compare", args.gpus_per_trial, args.cpus_per_trial, on_result=on_result)
    ok = [r for r in result["runs"] if "error" not in r]
    for name in ("default", "best"):
        rs = [r for r in ok if r["config"] == name]
        result[f"{name}_test_image_auroc"] = (stats([r["image_auroc"] for r in rs]) or {}).get("mean")
        result[f"{name}_validation"] = (stats([r["validation_objective"] for r in rs]) or {}).get("mean")
        result[f"{name}_by_seed"] = {
            r["seed"]: {"test_image_auroc": r["image_auroc"], "validation": r["validation_objective"]} for r in rs
        }
    fit_run = [r for r in ok if r["config"] == "fit-run"]
    if fit_run:
        result["pseudo_fit_s_in_run"] = fit_run[0]["pseudo_fit_s"]
        result["pseudo_fit_wait_s_in_run"] = fit_run[0].get("pseudo_fit_wait_s")
        result["fit_run_train_wall_s"] = fit_run[0]["train_wall_s"]
        result["fit_run_steps"] = args.fit_run_steps
    result["pseudo_fit_s_compare_runs"] = stats([r["pseudo_fit_s"] for r in ok if r["config"] != "fit-run"])


def occ_speedup(args: argparse.Namespace, result: dict) -> None:
    """Part (c): K = 8 OCCs sequential against Ray tasks on --occ-cpus CPUs (best of --repeats each)."""
    import ray

    from mapl_ray.pipelines.occ_tasks import ray_task_map
    from mapl_ray.pseudo.occ import OCCConfig, OCCEnsemble

    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=args.occ_cpus, include_dashboard=False, logging_level="WARNING")
    rng = np.random.default_rng(0)
    cases = {  # (labeled normals, unlabeled pool, positives, feature dim, OCC settings)
        "map_features": (300, 300, 64, 5, {"pca_dim": None, "n_components": 1}),
        "pooled_features": (300, 2000, 64, 256, {"pca_dim": 64, "n_components": 4}),
    }
    out = {}
    for name, (n, m, p, d, occ) in cases.items():
        normal, unlabeled = rng.standard_normal((n, d)), rng.standard_normal((m, d))
        positives = rng.standard_normal((p, d)) + 1.0
        cfg = OCCConfig(num_occs=8, seed=0, **occ)

        def fit(map_fn=None):
            return OCCEnsemble(cfg).fit(normal, unlabeled, positives, map_fn=map_fn).state_dict()[0]

        one_task = ray.remote(fit).options(num_cpus=1)
        ways = {
            "sequential_in_process": fit,  # the trainer's thread without Ray
            "sequential_one_task": lambda: ray.get(one_task.remote()),  # one CPU, as each parallel task has
            "ray_tasks": lambda: fit(ray_task_map),
        }
        times, states = {}, {}
        for how, call in ways.items():
            runs = []
            for _ in range(args.repeats):
                t = time.perf_counter()
                states[how] = call()
                runs.append(time.perf_counter() - t)
            times[how] = min(runs)
        ref = states["sequential_in_process"]
        out[name] = {
            "sizes": {"normal": n, "unlabeled": m, "positives": p, "dim": d, **occ},
            **{f"{how}_s": t for how, t in times.items()},
            "speedup": times["sequential_one_task"] / times["ray_tasks"],
            "speedup_vs_in_process": times["sequential_in_process"] / times["ray_tasks"],
            "same_ensemble": all(all(np.array_equal(ref[k], st[k]) for k in ref) for st in states.values()),
        }
        print(f"occ {name}: {out[name]}", flush=True)
    ray.shutdown()
    result["occ"] = {"num_occs": 8, "cpus": args.occ_cpus, "repeats": args.repeats, "cases": out}
    result["occ_parallel_speedup"] = out["pooled_features"]["speedup"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_grid_arguments(p, "101,102,103", "/tmp/mapl-tune", "tune.json")
    p.set_defaults(categories="screw", steps=250, gpus_per_trial=0.125, cpus_per_trial=2)
    p.add_argument("--num-samples", type=int, default=32)
    p.add_argument("--search-space", help="search space YAML (default: the package's)")
    p.add_argument("--search-seed", type=int, default=0)
    p.add_argument("--setting", choices=sorted(SETTINGS), default="pool")
    p.add_argument("--parts", default="search,compare,occ", help="comma-separated: search, compare, occ")
    p.add_argument(
        "--from-json", help="with --parts compare: the best and default configurations of an earlier call's JSON"
    )
    p.add_argument("--fit-run-steps", type=int, default=500, help="steps of the run timing the pseudo-labeler")
    p.add_argument("--occ-cpus", type=int, default=8, help="CPUs of part (c)")
    p.add_argument("--occ-cpus-per-trial", type=int, default=0, help="search trials' CPUs for OCC fit tasks")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", help="base config")
    args = p.parse_args()
    if args.gpus_per_trial and not __import__("torch").cuda.is_available():
        args.gpus_per_trial = 0.0  # the same command runs reduced on a CPU
    extra = dict(item.split("=", 1) for item in args.set)
    parts = args.parts.split(",")
    out = Path(args.out)
    result: dict = {
        "command": " ".join(sys.argv),
        "machine": machine(),
        "settings": {
            "category": args.categories.split(",")[0],
            "setting": args.setting,
            "setting_overrides": SETTINGS[args.setting],
            "steps": args.steps,
            "num_samples": args.num_samples,
            "gpus_per_trial": args.gpus_per_trial,
            "cpus_per_trial": args.cpus_per_trial,
            "occ_cpus_per_trial": args.occ_cpus_per_trial,
            "seeds": args.seeds,
            "overrides": extra,
            "parts": parts,
        },
        "runs": [],
    }
    t0 = time.perf_counter()

    def save() -> None:
        result["wall_s"] = time.perf_counter() - t0
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))

    folder = Path(args.runs) / "search"
    if "search" in parts:
        folder = search(args, extra, result)
        result["best_config"] = Config.load(folder / "best.yaml").to_dict()
        result["default_config"] = Config.load(folder / "base.yaml").to_dict()
        save()
    if "compare" in parts:
        compare(args, folder, result, save)
        save()
    if "occ" in parts:
        occ_speedup(args, result)
    save()
    keys = ("trials", "wall_s", "default_validation", "best_validation", "default_test_image_auroc")
    print(json.dumps({k: result.get(k) for k in (*keys, "best_test_image_auroc", "occ_parallel_speedup",
                                                   "pseudo_fit_s_in_run")}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
