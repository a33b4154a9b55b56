"""Cluster batch jobs on a real multi-node Ray cluster on this machine (issue 16), one command:

1. ``job``: a head node (1 CPU: the job driver) and a worker node with the custom resource ``mapl_worker``
   (the training worker asks for it, so it runs there); ``ray job submit -- python jobs/train.py`` on a
   small MVTec AD screw subset; the wall time from submission to the job's end (evaluation included).
2. ``fault_test``: the same job, longer, with ``--max-failures 2``; once ``--kill-at-step`` steps are logged
   the worker node is lost, either its raylet alone (``raylet``) or every process of the node at once
   (``node``), and a replacement worker node is started, as an autoscaler would. Recorded: the steps
   logged again after the restart (``steps_repeated``), the time from the kill to the first step logged
   after it (``recovery_s``, replacement node start included), and whether the final checkpoint loads
   and scores images with ``mapl predict`` (``final_checkpoint_ok``).

Writes ``bench/results/cluster.json`` (machine, command and settings beside the figures).

    python bench/cluster.py [--data-root ../shared/data] [--steps 6] [--fault-steps 20] [--kill-at-step 8]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from common import machine  # noqa: E402
from conftest import copy_small_category, tiny_config  # noqa: E402

from mapl_ray.pipelines.local_cluster import LocalCluster, submit_train_job  # noqa: E402


def job_config(root: Path, path: Path, steps: int, checkpoint_every: int) -> Path:
    cfg = tiny_config(
        root,
        **{
            "train.steps": steps,
            "train.checkpoint_every": checkpoint_every,
            "train.cpus_per_worker": 1,
            "train.worker_resources": "mapl_worker=1",
            "eval.heatmaps": 2,
        },
    )
    cfg.save(path)
    return path


def predict_ok(run: Path, images: Path) -> bool:
    from mapl_ray.cli import main

    return main(["predict", str(run), str(images)]) == 0


def one_job(args, work: Path, root: Path, name: str, kill: str | None) -> dict:
    """A fresh two-node cluster, one submitted job (with a lost node when ``kill``), stopped by PID."""
    steps = args.fault_steps if kill else args.steps
    cfg = job_config(root, work / f"{name}.yaml", steps, args.checkpoint_every)
    run = work / name
    job = ["--config", str(cfg), "--out", str(run), "--max-failures", "2", "--quiet"]
    cluster = LocalCluster(head_cpus=1, env={"PYTHONPATH": str(REPO)})
    t0 = time.monotonic()
    try:
        cluster.start()
        cluster.add_node("worker", 2, {"mapl_worker": 1})
        start_s = time.monotonic() - t0
        result = submit_train_job(
            cluster, job, run, str(REPO), kill=kill, kill_at_step=args.kill_at_step, replacement=(2, {"mapl_worker": 1})
        )
        nodes = 2
    finally:
        cluster.stop()
        leftover = cluster.leftover_pids()
    summary = json.loads((run / "train_summary.json").read_text()) if (run / "train_summary.json").is_file() else {}
    out = {
        "status": result["status"],
        "cluster_start_s": round(start_s, 1),
        "job_wall_s": round(result["job_wall_s"], 1),
        "nodes": nodes,
        "steps": steps,
        "restarts": summary.get("restarts"),
        "processes_left_after_stop": len(leftover),
    }
    if kill:
        out.update(
            kill=kill,
            killed_at_step=result.get("killed_at_step"),
            steps_repeated=result.get("steps_repeated"),
            recovery_s=round(result["recovery_s"], 1) if "recovery_s" in result else None,
            final_checkpoint_ok=result["status"] == "SUCCEEDED" and predict_ok(run, root / "screw" / "test" / "good"),
        )
    if result["status"] != "SUCCEEDED":
        out["logs_tail"] = result["logs"][-3000:]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default=str(REPO.parent / "shared" / "data"))
    p.add_argument("--steps", type=int, default=6, help="training steps of the plain job")
    p.add_argument("--fault-steps", type=int, default=20, help="training steps of the fault tests")
    p.add_argument("--checkpoint-every", type=int, default=3)
    p.add_argument("--kill-at-step", type=int, default=8)
    p.add_argument("--kills", default="raylet,node")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "cluster.json"))
    args = p.parse_args()
    os.environ["MAPL_DATA"] = args.data_root
    import conftest

    conftest.SCREW = Path(args.data_root) / "mvtec_ad" / "screw"
    conftest.TEXTURES = Path(args.data_root) / "dtd_subset" / "images"
    work = Path(tempfile.mkdtemp(prefix="mapl-bench-cluster-"))
    try:
        root = copy_small_category(work / "data")
        job = one_job(args, work, root, "job", None)
        faults = {k: one_job(args, work, root, f"fault_{k}", k) for k in args.kills.split(",") if k}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "nodes": job["nodes"],
        "job_wall_s": job["job_wall_s"],
        "job": job,
        "fault_test": faults,
        "settings": {
            "data": "14 train/good + 7 test images of MVTec AD screw at 64 x 64, tests/conftest.py tiny_config",
            "head": "1 CPU (job driver)",
            "worker": "2 CPUs + mapl_worker=1 (the training worker: 1 CPU + mapl_worker=1)",
            "checkpoint_every": args.checkpoint_every,
            "max_failures": 2,
            "replacement": "a new worker node with the same resources, started right after the kill",
        },
        "machine": machine(),
        "command": " ".join(["python", "bench/cluster.py", *sys.argv[1:]]),
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("nodes", "job_wall_s", "fault_test")}, indent=2))


if __name__ == "__main__":
    main()
