"""Design sweep: train several model variants on one category in parallel processes, report test metrics.

Used to choose the defaults (encoder, freezing, image score); every variant runs the same training
code as ``mapl train`` (without Ray, one process per variant) and the same evaluation. Variants start
from the plain defaults, without the category preset that ``mapl train`` applies
(``mapl_ray.presets.CATEGORY_PRESETS``): name its fields in a variant to get it.

    python bench/sweep.py --data ROOT --category screw --textures DIR --out OUT \
        --variant base= --variant lite2=model.encoder=tf_efficientnet_lite2 ...

Writes ``OUT/sweep.json``: per variant the overall metrics, the image AUROC for several top-k image
scores (computed from the same anomaly maps), for each test-time augmentation and, for a run with a
memory-bank ensemble, for its first 1..K banks (with the brightness-matched image AUROC), train wall
time and the device.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def run_variant(args: argparse.Namespace) -> None:
    import numpy as np
    import torch
    from scipy.stats import spearmanr

    from mapl_ray.config import Config
    from mapl_ray.data.io import load_records
    from mapl_ray.data.pose import build_pose_estimator
    from mapl_ray.data.split import Split
    from mapl_ray.data.train_data import load_train_data
    from mapl_ray.engine.loop import train_model
    from mapl_ray.eval.evaluate import calibrate, evaluate_run, score_test_split
    from mapl_ray.eval.metrics import compute_metrics, image_auroc, topk_mean
    from mapl_ray.inference import Predictor
    from mapl_ray.main_job import prepare_run

    torch.set_num_threads(args.threads)
    overrides = dict(kv.split("=", 1) for kv in args.set)
    cfg = Config().override(
        {
            "data.root": args.data,
            "data.category": args.category,
            "simulation.texture_dir": args.textures,
            "train.use_gpu": torch.cuda.is_available(),
            **overrides,
        }
    )
    run = Path(args.run)
    split = prepare_run(cfg, run)
    data, val, _ = load_train_data(cfg, split)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    test = load_records(
        Split.from_json(run / "split.json").test, cfg.data.image_size, with_masks=True, align=build_pose_estimator(cfg)
    )
    labels = np.array([r.label for r in test.records])
    types = [r.defect_type for r in test.records]
    curve = []
    grey = test.images.reshape(len(test.images), -1).mean(1)  # mean grey level per test image
    if args.curve:
        # the test-set image AUROC along training: train in chunks (each resumes the checkpoint; a resumed
        # run ends with the same weights as a straight one) and score the test split after each chunk
        done = 0
        while done < cfg.train.steps:
            done = min(cfg.train.steps, done + args.curve)
            _, summary = train_model(
                cfg, data, run, device=device, progress=False, resume=done > args.curve, stop_at=done
            )
            row = {"step": done}
            for tta in dict.fromkeys(("none", cfg.eval.tta)):
                scores = Predictor(run, device=device, tta=tta).predict_arrays(test.images)["scores"]
                row[f"image_auroc_tta_{tta}"] = image_auroc(labels, scores)
                # how far the image score just follows global brightness (a confound in some test splits)
                row[f"brightness_spearman_tta_{tta}"] = float(spearmanr(scores, grey).statistic)
            curve.append(row)
            print(json.dumps(row), flush=True)
    else:
        _, summary = train_model(cfg, data, run, device=device, progress=False)
    calibrate(run, val, device=device)
    metrics = evaluate_run(run, device=device)
    by_tta = {}
    for tta in ("none", "flip", "rot90"):  # test-time augmentation: the same trained model, scored three ways
        # pixel metrics in the files' own frame, as evaluate_run computes them (maps turned back under data.align)
        _, res, masks, maps = score_test_split(Predictor(run, device=device, tta=tta), test.records)
        scored = torch.from_numpy(res["maps"])
        topk = {str(k): image_auroc(labels, topk_mean(scored, k).numpy()) for k in (1, 10, 50, 100, 300, 1000)}
        topk["q"] = image_auroc(labels, res["q"])
        m = compute_metrics(labels, res["scores"], types, masks, maps)["overall"]
        by_tta[tta] = {
            "image_auroc": m["image_auroc"],
            "pixel_auroc": m["pixel_auroc"],
            "aupro": m["aupro"],
            "auroc_by_topk": topk,
        }
    # memory-bank ensemble (model.memory_banks): the same trained model scored with its first k banks averaged,
    # as is and brightness-matched (bench/brightness_confound.py: a confound in this copy of screw)
    from brightness_confound import brightness_matched

    by_banks = {}
    n_banks = 1 + len(data.extra_memory_indices)
    if n_banks > 1:
        matched = brightness_matched(test.images, float(data.normals.mean()))
        for k in range(1, n_banks + 1):
            pred = Predictor(run, device=device, memory_banks=k)
            _, res, masks, maps = score_test_split(pred, test.records)
            m = compute_metrics(labels, res["scores"], types, masks, maps)["overall"]
            by_banks[str(k)] = {
                "image_auroc": m["image_auroc"],
                "pixel_auroc": m["pixel_auroc"],
                "aupro": m["aupro"],
                "image_auroc_brightness_matched": image_auroc(labels, pred.predict_arrays(matched)["scores"]),
            }
    out = {
        "overrides": overrides,
        "overall": metrics["overall"],
        "auroc_by_topk": by_tta[cfg.eval.tta]["auroc_by_topk"],
        "by_tta": by_tta,
        **({"by_banks": by_banks} if by_banks else {}),
        "train_wall_s": summary["train_wall_s"],
        "step_s_median": summary["step_s_median"],
        "device": device,
        "final_losses": summary["final_losses"],
        "pseudo": summary["pseudo"],
        **({"curve": curve} if curve else {}),
    }
    (run / "variant.json").write_text(json.dumps(out, indent=2))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--category", required=True)
    p.add_argument("--textures")
    p.add_argument("--out", required=True)
    p.add_argument("--variant", action="append", default=[], help="NAME=key=value,key=value")
    p.add_argument("--parallel", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--run")
    p.add_argument("--set", action="append", default=[])
    p.add_argument(
        "--curve",
        type=int,
        default=0,
        help="also score the test split every this many steps (image AUROC along training)",
    )
    args = p.parse_args()
    if args.run:
        run_variant(args)
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    queue = []
    for v in args.variant:
        name, _, rest = v.partition("=")
        sets = [kv for kv in rest.split(",") if kv]
        cmd = [
            sys.executable,
            __file__,
            "--data",
            args.data,
            "--category",
            args.category,
            "--out",
            str(out),
            "--run",
            str(out / name),
            "--threads",
            str(args.threads),
            "--curve",
            str(args.curve),
        ]
        if args.textures:
            cmd += ["--textures", args.textures]
        for kv in sets:
            cmd += ["--set", kv]
        queue.append((name, cmd))
    running: list[tuple[str, subprocess.Popen, float]] = []
    results = {}
    while queue or running:
        while queue and len(running) < args.parallel:
            name, cmd = queue.pop(0)
            log = open(out / f"{name}.log", "w")
            running.append(
                (name, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy()), time.time())
            )
        time.sleep(2)
        for item in list(running):
            name, proc, t0 = item
            if proc.poll() is not None:
                running.remove(item)
                vj = out / name / "variant.json"
                results[name] = (
                    json.loads(vj.read_text()) if vj.exists() else {"error": f"exit {proc.returncode}, see {name}.log"}
                )
                results[name]["wall_s"] = round(time.time() - t0, 1)
                r = results[name]
                print(name, json.dumps({k: r.get(k) for k in ("auroc_by_topk", "wall_s", "error")}), flush=True)
                if "overall" in r:
                    o = r["overall"]
                    print(
                        f"   img {o['image_auroc']:.4f} pix {o['pixel_auroc']:.4f} aupro {o['aupro']:.4f} step {r['step_s_median']:.3f}s "
                        f"train {r['train_wall_s']:.1f}s",
                        flush=True,
                    )
                    for tta, m in r.get("by_tta", {}).items():
                        print(
                            f"   tta={tta}: img {m['image_auroc']:.4f} pix {m['pixel_auroc']:.4f} aupro {m['aupro']:.4f}",
                            flush=True,
                        )
                    for k, m in r.get("by_banks", {}).items():
                        print(
                            f"   banks={k}: img {m['image_auroc']:.4f} pix {m['pixel_auroc']:.4f} aupro {m['aupro']:.4f} "
                            f"matched {m['image_auroc_brightness_matched']:.4f}",
                            flush=True,
                        )
                (out / "sweep.json").write_text(
                    json.dumps(results, indent=2)
                )  # so far: a killed sweep keeps what finished
    (out / "sweep.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
