"""Does one configuration, trained twice with one seed, give the same model? Side by side in one run:
each setting trained --repeats times with the same data and training seed, with PyTorch's default kernels
and with train.deterministic (mapl_ray.tensors.use_deterministic_kernels), every run a Ray task sharing
the GPU as the grid benchmarks' trials do.

Per run: test and validation image AUROC and a SHA-256 of the final weights (model.safetensors' tensors
in key order); per setting and mode: how many distinct weights the repeats gave, and the spread of their
test and validation AUROC. The run-to-run spread is the noise floor under every comparison of settings
with one run per seed (bench/semi.py, bench/tune.py). Ops without a deterministic CUDA kernel warn in the
task's log ("does not have a deterministic implementation"); the device command collects those lines.

    python bench/repeatability.py --data-root ../shared/data --textures ../shared/data/dtd_subset/images \
        [--categories screw] [--seeds 101] [--repeats 3] [--settings clean,pool] [--steps 500] \
        [--gpus-per-trial 0.125 --cpus-per-trial 2] [--out bench/results/repeatability.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from common import add_grid_arguments, category_base, machine, stats  # noqa: E402
from semi import POOL, SHARED_VALIDATION  # noqa: E402

from mapl_ray.config import Config  # noqa: E402
from mapl_ray.pipelines.grid import Trial, run_grid  # noqa: E402
from mapl_ray.runfolder import checkpoint_dir  # noqa: E402

SETTINGS = {"clean": dict(SHARED_VALIDATION), "pool": dict(POOL)}
MODES = {"default": {}, "deterministic": {"train.deterministic": True}}


def weights_hash(run_dir: Path) -> str | None:
    """SHA-256 over the final weights' tensors in key order (metadata left out); None without a checkpoint."""
    from safetensors.numpy import load_file

    path = checkpoint_dir(run_dir) / "model.safetensors"
    if not path.is_file():
        return None
    tensors = load_file(str(path))
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].tobytes())
    return h.hexdigest()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_grid_arguments(p, "101", "/tmp/mapl-repeat", "repeatability.json")
    p.set_defaults(categories="screw")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--settings", default=",".join(SETTINGS))
    p.add_argument("--modes", default=",".join(MODES))
    args = p.parse_args()
    trials = []
    for category in args.categories.split(","):
        base = category_base(category, args.data_root, args.textures, args.steps, args.cpus_per_trial, args.weights)
        for setting in args.settings.split(","):
            for mode in args.modes.split(","):
                for seed in (int(s) for s in args.seeds.split(",")):
                    over = {**base, **SETTINGS[setting], **MODES[mode], "data.seed": seed, "train.seed": seed}
                    cfg = Config().override(over).validate()
                    for r in range(args.repeats):
                        meta = {"category": category, "setting": setting, "mode": mode, "seed": seed, "repeat": r}
                        trials.append(Trial(f"{category}-{setting}-{mode}-{seed}-r{r}", cfg.to_dict(), meta))
    t0 = time.perf_counter()
    records = run_grid(trials, args.runs, args.gpus_per_trial, args.cpus_per_trial)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": " ".join(sys.argv), "runs": records}, indent=2))  # the runs, first
    for trial, rec in zip(trials, records):
        rec["weights_sha256"] = weights_hash(Path(args.runs) / trial.name)
    groups: dict[str, dict] = {}
    for rec in records:
        if "error" in rec:
            continue
        key = f"{rec['category']}/{rec['setting']}/{rec['mode']}/{rec['seed']}"
        groups.setdefault(key, []).append(rec)
    summary = {
        key: {
            "runs": len(rs),
            "distinct_weights": len({r["weights_sha256"] for r in rs}),
            "image_auroc": stats([r["image_auroc"] for r in rs]),
            "validation_image_auroc": stats([r["validation_image_auroc"] for r in rs]),
            "train_wall_s": stats([r["train_wall_s"] for r in rs]),
        }
        for key, rs in sorted(groups.items())
    }
    result = {
        "command": " ".join(sys.argv),
        "machine": machine(),
        "settings": {"settings": SETTINGS, "modes": MODES, "steps": args.steps, "repeats": args.repeats},
        "wall_s": time.perf_counter() - t0,
        "summary": summary,
        "runs": records,
    }
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
