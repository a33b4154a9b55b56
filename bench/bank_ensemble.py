"""Rescore trained run folders with a memory-bank ensemble built after the fact (``model.memory_banks``).

For each run: the further banks are drawn from the run's own training normals as ``mapl train`` draws
them (``load_train_data`` with ``model.memory_banks``; bank 0 is the run's bank), filled with the run's
encoder, and the test split is scored with the first 1..K banks (the run's own test-time augmentation).
The trained weights are not changed, so this asks whether a run trained with one bank would gain from
the ensemble. Large test splits can be subsampled (``--max-test``, seeded) to keep 8-view scoring short.
Writes (merges into) ``bench/results/bank_ensemble.json``.

    python bench/bank_ensemble.py RUN [RUN ...] [--banks 5] [--max-test 200]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch


def score_run(run: Path, banks: int, max_test: int | None) -> dict:
    from mapl_ray.config import Config
    from mapl_ray.data.io import load_records
    from mapl_ray.data.pose import build_pose_estimator
    from mapl_ray.data.split import Split
    from mapl_ray.data.train_data import load_train_data, memory_bank_images
    from mapl_ray.eval.metrics import image_auroc
    from mapl_ray.inference import Predictor
    from mapl_ray.tensors import to_tensor

    cfg = Config.load_run(run / "config.yaml")
    split = Split.from_json(run / "split.json")
    # the banks mapl train would draw with model.memory_banks=banks (bank 0 is the run's own bank either way)
    data, _, _ = load_train_data(cfg.override({"model.memory_banks": banks}), split)
    test = load_records(split.test, cfg.data.image_size, align=build_pose_estimator(cfg))
    labels = np.array([r.label for r in test.records])
    images = test.images
    if max_test and len(labels) > max_test:
        keep = np.sort(np.random.default_rng(0).choice(len(labels), max_test, replace=False))
        images, labels = images[keep], labels[keep]
    pred = Predictor(run, device="cpu")
    if len(pred.model.banks) != 1:
        raise SystemExit(f"bank_ensemble.py: {run} already holds {len(pred.model.banks)} memory banks")
    bank_images = memory_bank_images(cfg, data)
    for i, imgs in enumerate(bank_images[1:], start=1):
        pred.model.refresh_memory(to_tensor(imgs, "cpu"), bank=i)
    out = {
        "test_images": int(len(labels)),
        "test_anomalous": int(labels.sum()),
        "eval_tta": cfg.eval.tta,
        "memory_rotations": cfg.model.memory_rotations,
        "image_auroc_by_banks": {},
        "eval_s_by_banks": {},
    }
    for k in range(1, len(bank_images) + 1):
        pred.memory_banks = k
        t0 = time.perf_counter()
        scores = pred.predict_arrays(images)["scores"]
        out["eval_s_by_banks"][str(k)] = round(time.perf_counter() - t0, 1)
        out["image_auroc_by_banks"][str(k)] = image_auroc(labels, scores)
        print(run.name, k, round(out["image_auroc_by_banks"][str(k)], 4), out["eval_s_by_banks"][str(k)], flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("runs", nargs="+")
    p.add_argument("--banks", type=int, default=5)
    p.add_argument("--max-test", type=int, default=None, help="score a seeded random subset of this many test images")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    path = Path(__file__).resolve().parent / "results" / "bank_ensemble.json"
    out = json.loads(path.read_text()) if path.is_file() else {}
    out["what"] = (
        "test image AUROC of trained one-bank runs rescored with a memory-bank ensemble built afterwards "
        "from their own training normals (bench/bank_ensemble.py)"
    )
    out["machine"] = f"{platform.machine()} CPU, {torch.get_num_threads()} threads, fp32"
    for run in args.runs:
        r = score_run(Path(run), args.banks, args.max_test)
        out.setdefault("runs", {})[str(run)] = {
            "command": f"python bench/bank_ensemble.py {run} --banks {args.banks}"
            + (f" --max-test {args.max_test}" if args.max_test else ""),
            **r,
        }
        path.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
