"""Cost of one training batch (:class:`mapl_ray.data.batches.BatchMaker`) on one process, by part, for the
code of this checkout ("after") and of a git revision ("before", ``--ref``), in one run.

Each revision runs in its own subprocess (``--ref``'s tree from ``git archive``), builds the batch maker
the way the trainer does (:func:`mapl_ray.data.train_data.load_train_data`, :func:`build_simulator`), draws
``--warmup`` untimed steps (the texture cache fills), then times ``--steps`` steps: wall and CPU time of the
thread (``time.thread_time``, less disturbed by other jobs on a shared machine). Exclusive CPU time per part
comes from wrapping the functions that do it (a function missing in a revision is skipped):

* ``foreground``: the object mask (:func:`foreground_mask` per simulated image, or the batch maker's
  per-image cache at start-up, reported as ``setup_s``);
* ``perlin``: the Perlin-noise mask (``AnomalySimulator._perlin_mask``);
* ``texture``: picking / decoding / resizing a texture (``AnomalySimulator._texture``);
* ``structure_photometric`` / ``structure_cells``: the structure source (MemSeg's photometric
  augmentation, then the cell shuffle);
* ``augment_normals``: flips / rotations and intensity jitter of the batch images (the normals and the
  bases of the simulated anomalies, with their cached object masks);
* ``blend_and_rest``: the rest of ``AnomalySimulator.__call__`` (eq. 1 mask logic, eq. 2 blending);
* ``batch_rest``: the rest of ``BatchMaker.__call__`` (indices, image copies, stacking).

``pool_cpu_ms``: :meth:`BatchMaker.pool` of a refit step (``2 pseudo.pool_size`` simulated anomalies, made
by one loader process inside that step's item). The batches and pools of both revisions are hashed (SHA-256
over every array): ``identical`` says whether the new code draws bit for bit the same ones. ``loader_model``
replays a 500-step run's DataLoader from these costs (:func:`loader_wait_model`) for several numbers of
loader processes: the basis of ``engine.loader.loader_workers``'s default.

    python bench/simulation_cost.py [--data-root ../shared/data] [--category screw] [--steps 200]
        [--ref main | --ref-tree DIR] [--preset] [--cores 16] [--out bench/results/simulation_cost.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: (module, attribute path, part): the functions whose exclusive time is a part (module docstring).
PARTS = [
    ("mapl_ray.data.batches", "BatchMaker.__call__", "batch_rest"),
    ("mapl_ray.data.batches", "augment_images", "augment_normals"),
    ("mapl_ray.data.batches", "jitter_intensity", "augment_normals"),
    ("mapl_ray.data.simulation", "AnomalySimulator.__call__", "blend_and_rest"),
    ("mapl_ray.data.simulation", "foreground_mask", "foreground"),
    ("mapl_ray.data.simulation", "AnomalySimulator._perlin_mask", "perlin"),
    ("mapl_ray.data.simulation", "AnomalySimulator._texture", "texture"),
    ("mapl_ray.data.simulation", "AnomalySimulator._structure", "structure_cells"),
    ("mapl_ray.data.simulation", "photometric_augment", "structure_photometric"),
]


def _instrument(totals: dict[str, float]) -> None:
    """Wrap the :data:`PARTS` functions so that each adds its exclusive time (less the wrapped functions it
    calls) to ``totals``."""
    import functools
    import importlib

    stack: list[float] = []  # per active call: the time its wrapped callees took

    def wrap(fn, part):
        @functools.wraps(fn)
        def timed(*a, **k):
            stack.append(0.0)
            t0 = time.thread_time()
            try:
                return fn(*a, **k)
            finally:
                dt = time.thread_time() - t0
                inner = stack.pop()
                totals[part] = totals.get(part, 0.0) + dt - inner
                if stack:
                    stack[-1] += dt

        return timed

    for mod_name, attr, part in PARTS:
        owner = importlib.import_module(mod_name)
        *path, name = attr.split(".")
        for p in path:
            owner = getattr(owner, p, None)
        if owner is not None and hasattr(owner, name):
            fn = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
            setattr(owner, name, wrap(fn, part))


def measure(args) -> dict:
    """One revision's figures (runs in the subprocess, with that revision's ``mapl_ray`` first on the path)."""
    import numpy as np

    from mapl_ray.config import Config
    from mapl_ray.data.batches import BatchMaker
    from mapl_ray.data.simulation import build_simulator
    from mapl_ray.data.train_data import load_train_data
    from mapl_ray.main_job import absolute_paths, check_inputs
    from mapl_ray.presets import category_preset
    from mapl_ray.pseudo.labeler import is_refit_step

    root = Path(args.data_root)
    over = {
        "data.root": str(root / args.dataset),
        "data.category": args.category,
        "data.image_size": args.image_size,
        "simulation.texture_dir": str(Path(args.textures)),
        "model.pretrained": False,
    }
    if args.preset:
        over.update(category_preset(args.category))
    cfg = absolute_paths(Config().override(over))
    data, _, _ = load_train_data(cfg, check_inputs(cfg, check_test=False))
    totals: dict[str, float] = {}
    _instrument(totals)
    t0 = time.perf_counter()
    bm = BatchMaker(cfg, data, build_simulator(cfg))
    setup = time.perf_counter() - t0
    digest = hashlib.sha256()
    for step in range(args.warmup):
        bm(step)
    totals.clear()
    wall = cpu = 0.0
    for step in range(args.warmup, args.warmup + args.steps):
        t0, c0 = time.perf_counter(), time.thread_time()
        batch = bm(step)
        wall, cpu = wall + time.perf_counter() - t0, cpu + time.thread_time() - c0
        for key in sorted(batch):  # not timed
            digest.update(np.ascontiguousarray(batch[key]).tobytes())
    ms = {k: round(1e3 * v / args.steps, 3) for k, v in sorted(totals.items())}
    # the refit items of a run: a batch plus BatchMaker.pool (2 pseudo.pool_size simulated anomalies)
    refits = [s for s in range(cfg.train.steps) if is_refit_step(cfg.pseudo, s)]
    pool_cpu = []
    for step in refits[: args.pools]:
        c0 = time.thread_time()
        pool = bm.pool(step)
        pool_cpu.append(time.thread_time() - c0)
        digest.update(pool["sims"].tobytes())
    return {
        "setup_s": round(setup, 3),
        "ms_per_batch": round(1e3 * wall / args.steps, 2),
        "cpu_ms_per_batch": round(1e3 * cpu / args.steps, 2),
        "part_ms_per_batch": ms,
        "pool_cpu_ms": round(1e3 * float(np.mean(pool_cpu)), 1) if pool_cpu else None,
        "refit_steps": refits,
        "batches_per_s": round(args.steps / wall, 2),
        "simulated_images_per_s": round(args.steps * cfg.train.batch_simulated / wall, 1),
        "batch_images_per_s": round(args.steps * len(batch["images"]) / wall, 1),
        "sha256": digest.hexdigest(),
        "settings": {
            "image_size": cfg.data.image_size,
            "batch_normal": cfg.train.batch_normal,
            "batch_simulated": cfg.train.batch_simulated,
            "augment": cfg.train.augment,
            "color_jitter": cfg.train.color_jitter,
            "align": cfg.data.align,
            "train_normals": int(len(data.normals)),
        },
    }


def loader_wait_model(
    batch_ms: float,
    pool_ms: float,
    refits: list[int],
    steps: int,
    workers: int,
    cores: int,
    step_ms: float = 0.5,
    prefetch: int = 4,
) -> dict[str, float]:
    """Seconds the training loop waits for batches from a ``torch.utils.data.DataLoader`` with ``workers``
    processes, replayed from the measured cost of an item (``batch_ms``; refit steps add ``pool_ms``).

    Follows the DataLoader's schedule: item ``i`` goes to worker ``i % workers`` (its round-robin index
    queue, worked first in first out), the first ``prefetch * workers`` items are sent at the start and item
    ``i + prefetch * workers`` when item ``i`` is taken, items are taken in order, and the loop spends
    ``step_ms`` per step (the H200's CUDA-graph step). With more busy processes than ``cores`` (the workers,
    the loop and the pseudo-labeler's fit thread) every item takes proportionally longer. ``workers`` 0: the
    loop makes each batch itself."""
    slow = max(1.0, (workers + 2) / cores)
    cost = [(batch_ms + (pool_ms if s in refits else 0.0)) * slow / 1e3 for s in range(steps)]
    if workers == 0:
        return {"first_batch_s": round(cost[0], 3), "wait_s": round(sum(cost[1:]), 3)}
    ahead = prefetch * workers
    free, sent, now, wait, first = [0.0] * workers, [0.0] * steps, 0.0, 0.0, 0.0
    for i in range(steps):
        ready = max(free[i % workers], sent[i]) + cost[i]
        free[i % workers] = ready
        if ready > now:
            first, wait = (ready - now, wait) if i == 0 else (first, wait + ready - now)
            now = ready
        if i + ahead < steps:
            sent[i + ahead] = now
        now += step_ms / 1e3
    return {"first_batch_s": round(first, 3), "wait_s": round(wait, 3)}


def _run_revision(args, tree: Path) -> dict:
    """:func:`measure` in a subprocess on ``tree``'s ``mapl_ray``."""
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        cmd = [sys.executable, __file__, *sys.argv[1:], "--child-out", f.name]
        # the tree's mapl_ray first; the rest of the path stays (e.g. the GPU machine's /tmp/site)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree), os.environ.get("PYTHONPATH", "")])}
        subprocess.run(cmd, env=env, check=True)
        return json.loads(Path(f.name).read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--dataset", default="mvtec_ad")
    p.add_argument("--category", default="screw")
    p.add_argument("--textures", default=None, help="texture folder (default: DATA_ROOT/dtd_subset/images)")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--warmup", type=int, default=60, help="untimed steps first (the texture cache fills)")
    p.add_argument("--preset", action="store_true", help="apply the category preset (screw: aligned, no rot90)")
    p.add_argument("--ref", default="main", help="git revision measured as 'before' ('' to skip)")
    p.add_argument(
        "--ref-tree",
        default=None,
        help="a folder holding the 'before' revision's mapl_ray (instead of --ref; for a machine without git: "
        "git archive main mapl_ray | tar -x -C .ref_main)",
    )
    p.add_argument("--repeats", type=int, default=1, help="runs per revision, taking turns; the fastest is kept")
    p.add_argument("--pools", type=int, default=2, help="refit pools timed (BatchMaker.pool)")
    p.add_argument("--cores", type=int, default=16, help="cores of the GPU host the loader model assumes")
    p.add_argument("--gpu-step-ms", type=float, default=0.5, help="the loop's time per step in the loader model")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "simulation_cost.json"))
    p.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    args.textures = args.textures or str(Path(args.data_root) / "dtd_subset" / "images")
    if args.child_out:
        Path(args.child_out).write_text(json.dumps(measure(args)))
        return
    trees: dict[str, tuple[str, Path]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.ref_tree:
            trees["before"] = (f"tree {args.ref_tree} ({args.ref})", Path(args.ref_tree))
        elif args.ref:
            archive = subprocess.run(
                ["git", "archive", args.ref, "mapl_ray"], cwd=ROOT, check=True, capture_output=True
            ).stdout
            tar_path = Path(tmp) / "ref.tar"
            tar_path.write_bytes(archive)
            with tarfile.open(tar_path) as t:
                t.extractall(tmp, filter="data")
            rev = subprocess.run(["git", "rev-parse", "--short", args.ref], cwd=ROOT, capture_output=True, text=True)
            trees["before"] = (f"{args.ref} ({rev.stdout.strip()})", Path(tmp))
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "mapl_ray"], cwd=ROOT, capture_output=True, text=True)
        trees["after"] = (head.stdout.strip() + (" + uncommitted changes" if dirty.stdout.strip() else ""), ROOT)
        # the revisions take turns (load drifts on a shared machine); each keeps its fastest run
        runs: dict[str, dict] = {}
        for _ in range(args.repeats):
            for name, (rev_name, tree) in trees.items():
                r = {"revision": rev_name, **_run_revision(args, tree)}
                if name not in runs or r["cpu_ms_per_batch"] < runs[name]["cpu_ms_per_batch"]:
                    runs[name] = r
    import torch

    result = {
        "machine": {
            "host": platform.node(),
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "load_avg_1m": round(os.getloadavg()[0], 2),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "command": "python " + " ".join([os.path.relpath(__file__, ROOT), *sys.argv[1:]]),
        "settings": {
            "steps": args.steps,
            "warmup": args.warmup,
            "data": f"{args.dataset}/{args.category}",
            "textures": os.path.relpath(args.textures, ROOT.parent) if args.textures else None,
            "preset": args.preset,
            "repeats": args.repeats,
        },
        **runs,
    }
    if "before" in runs:
        result["identical"] = runs["before"]["sha256"] == runs["after"]["sha256"]
        result["speedup_wall"] = round(runs["before"]["ms_per_batch"] / runs["after"]["ms_per_batch"], 2)
        result["speedup_cpu"] = round(runs["before"]["cpu_ms_per_batch"] / runs["after"]["cpu_ms_per_batch"], 2)
    # the 500-step run's waits by number of loader processes, replayed from each revision's measured costs
    result["loader_model"] = {
        "what": "loader_wait_model(): seconds the loop waits for batches (wait_s, first batch apart), replayed "
        f"from the measured CPU ms of a batch and a refit pool on a {args.cores}-core host with "
        f"{args.gpu_step_ms} ms per step (the CPU speed of the machine that ran this command)",
        **{
            name: {
                str(n): loader_wait_model(
                    r["cpu_ms_per_batch"],
                    r["pool_cpu_ms"] or 0.0,
                    r["refit_steps"],
                    500,
                    n,
                    args.cores,
                    args.gpu_step_ms,
                )
                for n in (0, 1, 2, 4, 6, 8, 9, 12, 14)
            }
            for name, r in runs.items()
        },
    }
    key = "preset" if args.preset else "default"
    out = Path(args.out)
    merged = json.loads(out.read_text()) if out.is_file() else {}
    merged[key] = result
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(merged, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
