"""The main job through Ray: prepare the run folder, train with Ray Train's TorchTrainer, calibrate, evaluate.

``ray.init()`` starts local Ray on one machine (the embedded default); with ``RAY_ADDRESS`` set the
same call joins that cluster. On a multi-node cluster the run folder and the data must be on storage
every node can read (the images travel through Ray's object store, the checkpoint is written by
rank 0 into ``RUN/checkpoint``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..config import Config, ConfigError
from ..data.io import image_size, load_records
from ..data.layout import LayoutError, scan_category, scan_folder
from ..data.split import Split, make_split
from ..model.encoder import WeightsError, build_encoder
from ..model.memory import choose_memory_banks
from ..data.batches import TrainData
from ..training import build_pose_estimator, build_simulator

log = logging.getLogger("mapl_ray.pipelines")


class RunFolderError(RuntimeError):
    """The output folder cannot be used (it holds another run and ``--resume`` was not given...)."""


def absolute_paths(cfg: Config) -> Config:
    """The config with data/texture/unlabeled/weights paths made absolute (Ray workers run elsewhere)."""
    fields = {"data.root": cfg.data.root, "simulation.texture_dir": cfg.simulation.texture_dir,
              "data.unlabeled_dir": cfg.data.unlabeled_dir, "model.weights": cfg.model.weights}
    return cfg.override({k: str(Path(v).expanduser().resolve()) for k, v in fields.items() if v})


def prepare_run(cfg: Config, run_dir: str | Path, resume: bool = False) -> tuple[Split, dict[str, Any]]:
    """Create (or, with ``resume``, reopen) the run folder: ``config.yaml`` and ``split.json``.

    ``cfg`` paths must be absolute (see :func:`absolute_paths`).

    Raises:
        RunFolderError: ``run_dir`` already holds a run and ``resume`` is False (nothing is
            overwritten), or ``resume`` is True and there is no run to resume.
        LayoutError: the data set is not in MVTec AD layout (names the path).
    """
    run_dir = Path(run_dir)
    cfg.validate()
    if run_dir.exists() and not run_dir.is_dir():
        raise RunFolderError(f"--out {run_dir} exists and is not a folder")
    has_checkpoint = (run_dir / "checkpoint" / "state.json").is_file()
    if resume:
        if not has_checkpoint or not (run_dir / "split.json").is_file():
            raise RunFolderError(f"cannot resume {run_dir}: it holds no checkpoint yet (the run stopped before its first "
                                 f"save); start it again without --resume, which reuses the folder")
        done = int(json.loads((run_dir / "checkpoint" / "state.json").read_text())["step"])
        if cfg.train.steps < done:
            raise RunFolderError(f"cannot resume {run_dir} with train.steps={cfg.train.steps}: the checkpoint is already at step {done}")
        return Split.from_json(run_dir / "split.json"), {}
    if has_checkpoint:
        raise RunFolderError(
            f"{run_dir} already holds a run; pass --resume to continue it or choose another --out (nothing was overwritten)"
        )
    if not cfg.data.root or not cfg.data.category:
        raise LayoutError("data.root and data.category are required (mapl train --data ROOT --category NAME)")
    index = scan_category(cfg.data.root, cfg.data.category, require_masks=cfg.data.require_masks)
    check_test_masks(index.test, skip_bad=cfg.data.skip_bad_images)
    build_simulator(cfg)  # fails fast on a missing / empty texture folder, before anything is written
    build_pose_estimator(cfg)  # and on data.align without an object threshold
    if cfg.model.weights and not Path(cfg.model.weights).is_file():
        raise WeightsError(f"encoder weights file {cfg.model.weights} does not exist (model.weights / --weights)")
    build_encoder(cfg.model.encoder, cfg.model.weights, cfg.model.pretrained)  # unknown backbone / bad weights
    unlabeled = scan_folder(cfg.data.unlabeled_dir) if cfg.data.unlabeled_dir else None
    try:
        split = make_split(index, seed=cfg.data.seed, unlabeled=unlabeled, unlabeled_fraction=cfg.data.unlabeled_fraction,
                           contamination=cfg.data.contamination, labeled_anomalies=cfg.data.labeled_anomalies)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    # a folder left by a run that failed before its first checkpoint holds nothing trained: reuse it
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.save(run_dir / "config.yaml")
    split.to_json(run_dir / "split.json")
    return split, {"defect_types": index.defect_types}


def check_test_masks(records, skip_bad: bool = False) -> None:
    """Before training: every test image with a mask has a mask of its size (headers only, cheap).

    Raises:
        LayoutError: a mask whose size differs from its image; ImageReadError: an unreadable header
            (unless ``skip_bad``, where evaluation skips the image later).
    """
    from ..data.layout import ImageReadError

    for r in records:
        if not r.mask_path:
            continue
        try:
            hw, mhw = image_size(r.path), image_size(r.mask_path)
        except ImageReadError:
            if skip_bad:
                continue
            raise
        if hw != mhw:
            raise LayoutError(f"mask {r.mask_path!r} is {mhw[0]}x{mhw[1]} (HxW) but its image {r.path!r} is "
                              f"{hw[0]}x{hw[1]}; expected the same size")


def validation_indices(n_normals: int, n_val: int, seed: int) -> np.ndarray:
    """Rows of the labeled normals held out for score normalisation and the decision threshold."""
    if n_val > max(0, n_normals - 2):
        log.warning("eval.validation_normals=%d but only %d labeled normals: holding out %d, training on 2",
                    n_val, n_normals, max(0, n_normals - 2))
    n_val = min(n_val, max(0, n_normals - 2))
    rng = np.random.default_rng([seed, 11])
    return np.sort(rng.choice(n_normals, size=n_val, replace=False)) if n_val else np.zeros(0, np.int64)


def data_summary(info: dict[str, Any]) -> dict[str, Any]:
    """``data_info.json`` for the report: image lists become counts (data_info.json keeps the paths)."""
    out = {k: v for k, v in info.items() if k != "validation_normals"}
    if "memory_banks" in out:
        banks = out["memory_banks"]  # all of one size (choose_memory_banks makes only full banks)
        out["memory_banks"] = f"{len(banks)} bank(s) of {len(banks[0])} images"
    return out


def load_train_data(cfg: Config, split: Split) -> tuple[TrainData, np.ndarray, dict[str, Any]]:
    """Decode the training images. Returns (TrainData, validation images uint8 (V, H, W, 3), info)."""
    size, skip = cfg.data.image_size, cfg.data.skip_bad_images
    align = build_pose_estimator(cfg)
    normals = load_records(split.labeled_normal, size, skip_bad=skip, align=align)
    val_idx = validation_indices(len(normals.images), cfg.eval.validation_normals, cfg.data.seed)
    keep = np.setdiff1d(np.arange(len(normals.images)), val_idx)
    train_normals = normals.images[keep]
    skipped = list(normals.skipped)
    unl = anom = None
    if split.unlabeled:
        unl = load_records(split.unlabeled, size, skip_bad=skip, align=align)
        skipped += unl.skipped
    if split.labeled_anomaly:
        anom = load_records(split.labeled_anomaly, size, skip_bad=skip, with_masks=True, align=align)
        skipped += anom.skipped
    banks = choose_memory_banks(len(train_normals), cfg.model.memory_samples, cfg.model.memory_banks, cfg.data.seed)
    data = TrainData(
        normals=train_normals,
        memory_indices=banks[0],
        extra_memory_indices=banks[1:],
        unlabeled=None if unl is None else unl.images,
        anomalies=None if anom is None else anom.images,
        anomaly_masks=None if anom is None else anom.masks,
    )
    info = {
        "train_normals": int(len(train_normals)),
        "validation_normals": [normals.records[i].path for i in val_idx],
        "unlabeled": 0 if unl is None else int(len(unl.images)),
        "labeled_anomalies": 0 if anom is None else int(len(anom.images)),
        "memory_samples": int(len(data.memory_indices)),
        # the normal images of each memory bank (bank 0 trains the network; all are averaged at inference)
        "memory_banks": [[normals.records[keep[i]].path for i in idx] for idx in banks],
        "skipped_images": skipped,
    }
    if align is not None:  # images kept as they were because no object was found in them
        info["align"] = cfg.data.align
        info["no_pose_found"] = [r.path for ld in (normals, unl, anom) if ld is not None
                                 for r, p in zip(ld.records, ld.poses) if p is None]
        if info["no_pose_found"]:
            log.warning("data.align: no object found in %d training images (kept as they are; check "
                        "simulation.foreground_threshold / foreground_inverse), e.g. %s; all are listed in data_info.json",
                        len(info["no_pose_found"]), info["no_pose_found"][:3])
    return data, normals.images[val_idx], info


def _worker_resources(cfg: Config) -> tuple[int, dict[str, float]]:
    import ray

    total = int(ray.cluster_resources().get("CPU", os.cpu_count() or 1))
    n = cfg.train.num_workers
    cpus = cfg.train.cpus_per_worker or max(1, total // n)
    res = {"CPU": float(cpus)}
    if cfg.train.use_gpu:
        res["GPU"] = 1.0
    return cpus, res


def _train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker: rebuild config and data, run :func:`mapl_ray.training.train_model` under DDP."""
    import ray
    import ray.train
    import ray.train.torch
    import torch

    from ..training import train_model

    cfg = Config.from_dict(config["cfg"])
    torch.set_num_threads(int(config["threads"]))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    data = ray.get(config["data_ref"])
    device = ray.train.torch.get_device()

    def wrap(model):
        # the memory bank is a buffer of hundreds of MB: broadcast once per refresh (MemoryBank.broadcast), not every step
        return (ray.train.torch.prepare_model(model, move_to_device=False, parallel_strategy_kwargs={"broadcast_buffers": False})
                if world > 1 else model)

    def report(metrics):
        ray.train.report(metrics)

    _, summary = train_model(cfg, data, config["run_dir"], device=device, rank=rank, world_size=world, wrap_model=wrap,
                             report=report, resume=config["resume"], progress=config.get("progress", True))
    if rank == 0:
        write_train_summary(Path(config["run_dir"]), summary, resumed=config["resume"])


def write_train_summary(run_dir: Path, summary: dict[str, Any], resumed: bool) -> None:
    """Write ``train_summary.json``. After ``--resume`` the summaries of the earlier segments are kept
    under ``earlier_segments`` (oldest first) and ``steps_run_total`` / ``train_wall_s_total`` add them up."""
    path = run_dir / "train_summary.json"
    earlier: list[dict[str, Any]] = []
    if resumed and path.is_file():
        old = json.loads(path.read_text())
        earlier = old.pop("earlier_segments", []) + [{k: v for k, v in old.items() if not k.endswith("_total")}]
    segments = earlier + [summary]
    summary["earlier_segments"] = earlier
    summary["steps_run_total"] = sum(int(s.get("steps_run", 0)) for s in segments)
    summary["train_wall_s_total"] = sum(float(s.get("train_wall_s", 0.0)) for s in segments)
    path.write_text(json.dumps(summary, indent=2))


class TrainingFailed(RuntimeError):
    """A Ray Train worker failed with an error that is not one of mapl-ray's input errors."""


def _worker_error(err: BaseException) -> BaseException:
    """The error a training worker raised, unwrapped from Ray's wrappers (for a one-line CLI message)."""
    from ..checkpoint import CheckpointError
    from ..data.layout import LayoutError

    seen, stack = set(), [err]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, (LayoutError, WeightsError, CheckpointError, ConfigError)):
            return e
        failures = getattr(e, "worker_failures", None)
        if isinstance(failures, dict):
            stack.extend(failures.values())
        stack.extend([getattr(e, "cause", None), e.__cause__, e.__context__])
    last = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
    return TrainingFailed(f"training failed in a Ray worker: {last}")


def train_with_ray(cfg: Config, data: TrainData, run_dir: str | Path, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Run training as a Ray Train ``TorchTrainer`` job (``cfg.train.num_workers`` workers, DDP when > 1).

    Returns the rank-0 training summary (wall time, step times, final losses).

    Raises:
        RuntimeError: a training worker failed (Ray's error, with the worker's traceback).
    """
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    run_dir = Path(run_dir).resolve()
    from .ray_env import init_ray

    init_ray()
    threads, resources = _worker_resources(cfg)
    trainer = TorchTrainer(
        _train_loop_per_worker,
        train_loop_config={"cfg": cfg.to_dict(), "data_ref": ray.put(data), "run_dir": str(run_dir), "resume": resume,
                           "threads": threads, "progress": progress},
        scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(name="train", storage_path=str(run_dir / "ray_results")),
    )
    try:
        result = trainer.fit()
    except Exception as e:  # noqa: BLE001 - re-raised: the worker's own error when it is ours, else TrainingFailed
        raise _worker_error(e) from e
    if result.error:
        raise _worker_error(result.error) from result.error
    return json.loads((run_dir / "train_summary.json").read_text())


def run_train_job(cfg: Config, run_dir: str | Path, resume: bool = False, use_ray: bool = True,
                  progress: bool = True) -> dict[str, Any]:
    """The main job: prepare the run, train (Ray Train), calibrate on validation normals, evaluate on test.

    Writes ``config.yaml``, ``split.json``, ``checkpoint/``, ``metrics.json``, ``report.md``, ``plots/``,
    ``heatmaps/``, ``train_log.jsonl`` into ``run_dir``. Returns the metrics dict.
    """
    from ..evaluate import calibrate, evaluate_run

    run_dir = Path(run_dir)
    cfg = absolute_paths(cfg)
    split, _ = prepare_run(cfg, run_dir, resume)
    if resume:
        cfg.save(run_dir / "config.yaml")  # e.g. more steps than the stopped run had
    t0 = time.perf_counter()
    data, val_images, data_info = load_train_data(cfg, split)
    load_s = time.perf_counter() - t0
    (run_dir / "data_info.json").write_text(json.dumps(data_info, indent=2))
    if use_ray:
        summary = train_with_ray(cfg, data, run_dir, resume=resume, progress=progress)
    else:
        import torch

        from ..training import train_model

        _, summary = train_model(cfg, data, run_dir, device="cuda" if cfg.train.use_gpu and torch.cuda.is_available() else "cpu",
                                 resume=resume, progress=progress)
        write_train_summary(run_dir, summary, resumed=resume)
    shutil.rmtree(run_dir / "ray_results", ignore_errors=True)
    calibrate(run_dir, val_images)
    summary["data_load_s"] = load_s
    try:
        training = {k: v for k, v in summary.items() if k != "earlier_segments"}  # train_summary.json keeps them
        return evaluate_run(run_dir, extra_info={"training": training,
                                                 "data": data_summary(data_info)})
    except LayoutError as e:
        raise LayoutError(f"{e}\n(training finished and {run_dir / 'checkpoint'} is saved: fix the file, then run "
                          f"`mapl evaluate {run_dir}`)") from e
