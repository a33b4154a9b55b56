"""Ray Train wiring of the training loop: a ``TorchTrainer`` whose workers run
:func:`mapl_ray.engine.loop.train_model` (DDP across workers), and its errors unwrapped for the CLI.

On a multi-node cluster the run folder must be on storage every node can read (the decoded images
travel through Ray's object store; rank 0 writes ``RUN/checkpoint``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..config import Config, ConfigError
from ..data.layout import LayoutError
from ..data.train_data import TrainData
from ..data.validation import ValidationSet
from ..model.encoder import WeightsError
from ..runfolder import SUMMARY_FILE, CheckpointError, write_train_summary
from .ray_env import init_ray


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
    """Ray Train worker: rebuild config and data, run :func:`mapl_ray.engine.loop.train_model` under DDP."""
    import ray
    import ray.train
    import ray.train.torch
    import torch

    from ..engine.loop import train_model

    cfg = Config.from_dict(config["cfg"])
    torch.set_num_threads(int(config["threads"]))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    data, validation = ray.get(config["data_ref"])
    device = ray.train.torch.get_device()

    def wrap(model):
        # the memory bank is a buffer of hundreds of MB: broadcast once per refresh (MemoryBank.broadcast), not every step
        return (
            ray.train.torch.prepare_model(
                model, move_to_device=False, parallel_strategy_kwargs={"broadcast_buffers": False}
            )
            if world > 1
            else model
        )

    def report(metrics):
        ray.train.report(metrics)

    _, summary = train_model(
        cfg,
        data,
        config["run_dir"],
        device=device,
        rank=rank,
        world_size=world,
        wrap_model=wrap,
        report=report,
        resume=config["resume"],
        progress=config.get("progress", True),
        validation=validation,
    )
    if rank == 0:
        write_train_summary(Path(config["run_dir"]), summary, resumed=config["resume"])


class TrainingFailed(RuntimeError):
    """A Ray Train worker failed with an error that is not one of mapl-ray's input errors."""


def _worker_error(err: BaseException) -> BaseException:
    """The error a training worker raised, unwrapped from Ray's wrappers (for a one-line CLI message)."""
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


def train_with_ray(
    cfg: Config,
    data: TrainData,
    validation: ValidationSet | None,
    run_dir: str | Path,
    resume: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Run training as a Ray Train ``TorchTrainer`` job (``cfg.train.num_workers`` workers, DDP when > 1).

    Returns the rank-0 training summary (wall time, step times, final losses).

    Raises:
        RuntimeError: a training worker failed (Ray's error, with the worker's traceback).
    """
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    run_dir = Path(run_dir).resolve()
    init_ray()
    threads, resources = _worker_resources(cfg)
    trainer = TorchTrainer(
        _train_loop_per_worker,
        train_loop_config={
            "cfg": cfg.to_dict(),
            "data_ref": ray.put((data, validation)),
            "run_dir": str(run_dir),
            "resume": resume,
            "threads": threads,
            "progress": progress,
        },
        scaling_config=ScalingConfig(
            num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(name="train", storage_path=str(run_dir / "ray_results")),
    )
    try:
        result = trainer.fit()
    except Exception as e:  # noqa: BLE001 - re-raised: the worker's own error when it is ours, else TrainingFailed
        raise _worker_error(e) from e
    if result.error:
        raise _worker_error(result.error) from result.error
    return json.loads((run_dir / SUMMARY_FILE).read_text())
