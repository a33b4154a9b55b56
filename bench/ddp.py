"""DDP scaling benchmark (issue 3): the `mapl train` job through Ray Train on 1 and 2 GPU workers.

Runs the main job (``run_train_job``: Ray Train ``TorchTrainer``, DDP, then calibration and test
evaluation) with ``train.num_workers`` 1 and 2 and ``train.use_gpu``, at the same per-worker batch,
and reports training images/s (all workers; rank 0's loop wall time), the scaling factor 2 vs 1 and
the test image AUROC of each run. Merges its results into ``--out`` (default
``bench/results/gpu.json``) under ``ddp`` and ``ddp_scaling_2gpu``.

    python bench/ddp.py --data ROOT --category screw --textures DIR [--weights FILE] [--batches 4,32]
                        [--workers 0,1,2] [--start-method auto,fork,forkserver]

``--workers 0`` adds the same job without Ray (``mapl train --no-ray``), the baseline that shows
what Ray Train itself costs per run.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import time
from pathlib import Path

import torch

from mapl_ray.config import Config
from mapl_ray.main_job import run_train_job


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--category", default="screw")
    p.add_argument("--textures", required=True)
    p.add_argument("--weights")
    p.add_argument("--batches", default="4", help="per-worker normal (= simulated) images per step, comma list")
    p.add_argument(
        "--workers",
        default="1,2",
        help="comma list of Ray Train worker counts; 0 = the same job in this process without Ray (a baseline)",
    )
    p.add_argument("--steps", type=int, default=500)
    p.add_argument(
        "--start-method",
        default="auto",
        help="comma list of train.loader_start_method values (auto: forkserver in Ray workers); each is run",
    )
    p.add_argument("--loader-workers", type=int, help="train.loader_workers (default: up to 4 beside a GPU)")
    p.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="keep train.cuda_graphs on (it applies to 1-GPU runs only: DDP steps are eager); "
        "default off, so 1 and 2 workers run the same eager step",
    )
    p.add_argument("--key", default="ddp", help="key of --out under which the runs are stored")
    p.add_argument("--runs", default="/tmp/mapl_ddp_runs")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "gpu.json"))
    args = p.parse_args()

    from mapl_ray.pipelines.ray_env import init_ray

    init_ray()
    over = {
        "data.root": args.data,
        "data.category": args.category,
        "simulation.texture_dir": args.textures,
        "train.use_gpu": True,
        "train.steps": args.steps,
        "train.cuda_graphs": args.cuda_graphs,
    }
    if args.weights:
        over["model.weights"] = args.weights
    if args.loader_workers is not None:
        over["train.loader_workers"] = args.loader_workers
    base = Config().override(over)
    rows = {}
    methods = args.start_method.split(",")
    for method, half, n in itertools.product(
        methods, [int(b) for b in args.batches.split(",")], [int(w) for w in args.workers.split(",")]
    ):
        cfg = base.override(
            {
                "train.num_workers": max(n, 1),
                "train.batch_normal": half,
                "train.batch_simulated": half,
                "train.loader_start_method": method,
            }
        )
        name = (f"b{2 * half}_w{n}" if n else f"b{2 * half}_noray") + (f"_{method}" if len(methods) > 1 else "")
        t0 = time.perf_counter()
        run = Path(args.runs) / name
        metrics = run_train_job(cfg, run, progress=False, use_ray=n > 0)
        tr = json.loads((run / "train_summary.json").read_text())  # rank 0's summary
        rows[name] = {
            "workers": max(n, 1),
            "ray": n > 0,
            "per_worker_batch": 2 * half,
            "images_per_s": round(tr["images_per_s"], 1),
            "loop_wall_s": round(tr["loop_wall_s"], 2),
            "train_wall_s": round(tr["train_wall_s"], 2),
            "job_wall_s": round(time.perf_counter() - t0, 2),
            "loader_workers": tr["loader_workers"],
            "loader_start_method": tr.get("loader_start_method"),
            "first_batch_s": round(tr.get("first_batch_s", float("nan")), 2),
            "loader_wait_s": round(tr.get("loader_wait_s", float("nan")), 2),
            "image_auroc": metrics["overall"]["image_auroc"],
            "pixel_auroc": metrics["overall"]["pixel_auroc"],
            "aupro": metrics["overall"]["aupro"],
            "memory_backend": tr["memory_backend"],
            "cuda_graph_step": tr.get("cuda_graph_step", False),
        }
        print(name, json.dumps(rows[name]), flush=True)
        write(args, rows)
    write(args, rows)


def write(args, rows: dict) -> None:
    """Merge the runs so far into ``args.out`` (after every run: a later failure keeps the earlier ones)."""
    import ray

    scaling = {}
    methods = args.start_method.split(",")
    for half, method in [(int(b), m) for b in args.batches.split(",") for m in methods]:
        suffix = f"_{method}" if len(methods) > 1 else ""
        one, two = rows.get(f"b{2 * half}_w1{suffix}"), rows.get(f"b{2 * half}_w2{suffix}")
        if one and two:
            scaling[f"b{2 * half}{suffix}"] = {
                "speedup": round(two["images_per_s"] / one["images_per_s"], 3),
                "auroc_diff": round(abs(two["image_auroc"] - one["image_auroc"]), 4),
            }
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.exists() else {}
    result[args.key] = {
        "machine": {
            "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
            "torch": torch.__version__,
            "ray": ray.__version__,
            "python": platform.python_version(),
        },
        "settings": f"mapl train path (Ray Train TorchTrainer, DDP), {args.steps} steps, 256x256, "
        "lite2 frozen, amp auto (bf16), per-worker batch = normal + simulated",
        "command": "python bench/ddp.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items() if v),
        "runs": rows,
    }
    if scaling:  # a run without both 1 and 2 workers keeps the earlier scaling figures
        result["ddp_scaling_2gpu"] = scaling
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print("scaling", json.dumps(scaling), flush=True)


if __name__ == "__main__":
    main()
