"""Ray Train wiring of the training loop: a ``TorchTrainer`` whose workers run
:func:`mapl_ray.engine.loop.train_model` (DDP across workers), and its errors unwrapped for the CLI.

By default the workers' console output stays in Ray's log files (:func:`~mapl_ray.pipelines.ray_env.init_ray`
with ``quiet``): the driver shows the progress bar by following rank 0's ``train_log.jsonl``, and the
warnings mapl-ray logged on rank 0 come back in the training summary and are logged again here.

On a multi-node cluster the run folder must be on storage every node can read (the decoded images
travel through Ray's object store; rank 0 writes ``RUN/checkpoint``).

Fault tolerance: every ``train.checkpoint_every`` steps (and at the end) rank 0 saves ``RUN/checkpoint``.
With ``train.storage_path`` set (storage apart from the run folder: a path every node reads, ``s3://...``)
every rank also reports it as a ``ray.train.Checkpoint``, which Ray Train copies there. Without it (the
default, Ray Train's state under ``RUN/ray_results``) nothing is reported: a copy inside the run folder
would be no safer than ``RUN/checkpoint`` and cost a copy of the whole checkpoint (memory banks included,
~220 MiB on screw's preset) per report, and a report without one only synchronises the workers with Ray
Train (both measured on the H200: ``bench/results/train_phases.json``). With ``train.max_failures`` > 0 Ray
Train restarts the workers when one of them, or its node, dies (``FailureConfig``); the new attempt
finds the last reported checkpoint with ``ray.train.get_checkpoint()`` (if any), installs it as
``RUN/checkpoint`` when the run folder's is older, and continues from ``RUN/checkpoint`` exactly as
``mapl train --resume`` does (:meth:`~mapl_ray.engine.loop.Trainer.resume`). The
restart is marked in ``train_log.jsonl`` and listed under ``restarts`` in ``train_summary.json``; the final
``RUN/checkpoint`` is the same as a run without failures writes.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import re
import threading
import uuid
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from ..config import Config, ConfigError, parse_resources
from ..data.layout import ImageReadError, LayoutError
from ..data.train_data import TrainData
from ..data.validation import ValidationSet
from ..model.encoder import WeightsError
from ..runfolder import (
    SUMMARY_FILE,
    TRAIN_LOG_FILE,
    CheckpointError,
    has_checkpoint,
    install_checkpoint,
    read_state,
    restart_markers,
    write_train_summary,
)
from .ray_env import init_ray, require_local_gpus

log = logging.getLogger("mapl_ray.train")


class _WarningRecorder(logging.Handler):
    """Keeps the messages of mapl-ray's warnings in a training worker (for the training summary)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _worker_resources(cfg: Config) -> tuple[int, dict[str, float]]:
    import ray

    total = int(ray.cluster_resources().get("CPU", os.cpu_count() or 1))
    n = cfg.train.num_workers
    cpus = cfg.train.cpus_per_worker or max(1, total // n)
    res = {"CPU": float(cpus), **parse_resources(cfg.train.worker_resources)}
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

    def on_checkpoint(step, path):  # every rank reports (a barrier); rank 0 hands over the folder
        ckpt = ray.train.Checkpoint.from_directory(str(path)) if path is not None else None
        ray.train.report({"step": step, "checkpoint_step": step}, checkpoint=ckpt)

    resume, restart = _attempt(config, rank, world)
    batches = None
    if config.get("stream_plan") is not None:  # batches from this rank's Ray Data shard, not a DataLoader
        from .ray_data import worker_batches

        batches = worker_batches(config["stream_plan"], rank)
        if restart is not None and resume:  # the stream starts where the job started: skip the steps done
            batches = itertools.islice(
                batches, int(read_state(config["run_dir"])["step"]) - config["stream_start"], None
            )
    recorder = _WarningRecorder()
    logging.getLogger("mapl_ray").addHandler(recorder)
    try:
        _, summary = train_model(
            cfg,
            data,
            config["run_dir"],
            device=device,
            rank=rank,
            world_size=world,
            wrap_model=wrap,
            report=report,
            resume=resume,
            progress=config.get("progress", True),
            validation=validation,
            batches=batches,
            # without storage of its own, Ray Train gets no checkpoint: a report (~0.7 s each on the H200)
            # would only pass the step
            on_checkpoint=on_checkpoint if config["ray_checkpoints"] else None,
            restart=restart,
        )
    finally:
        logging.getLogger("mapl_ray").removeHandler(recorder)
    if rank == 0:
        summary["warnings"] = recorder.messages
        summary["restarts"] = restart_markers(config["run_dir"], config["fit_id"])
        summary["ray_node_id"] = ray.get_runtime_context().get_node_id()  # where rank 0 ran (the last attempt)
        write_train_summary(Path(config["run_dir"]), summary, resumed=config["resume"])


def _attempt(config: dict[str, Any], rank: int, world: int) -> tuple[bool, dict[str, Any] | None]:
    """(resume, restart) of this attempt of the workers: a restart (Ray Train's ``FailureConfig`` after a
    worker or node died) when Ray Train holds a checkpoint of this run (``ray.train.get_checkpoint``) or
    rank 0 finds lines logged since the run started (a failure before the first checkpoint). A restart
    continues from the newer of that checkpoint and ``RUN/checkpoint`` (rank 0 installs it, the others wait)."""
    import ray.train
    import torch.distributed as dist

    run_dir = Path(config["run_dir"])
    restored = ray.train.get_checkpoint()
    log_path = run_dir / TRAIN_LOG_FILE
    logged = log_path.is_file() and log_path.stat().st_size > config["log_offset"]
    if restored is None and not logged:
        return config["resume"], None
    if restored is not None and rank == 0:
        with restored.as_directory() as d:
            install_checkpoint(run_dir, d)
    if restored is not None and world > 1:
        dist.barrier()  # the other ranks read RUN/checkpoint once rank 0 has installed it
    return config["resume"] or has_checkpoint(run_dir), {"fit": config["fit_id"]}


def check_gpus(cfg: Config) -> None:
    """Refuse ``train.use_gpu`` on a local Ray with fewer GPUs than workers: the trainer would wait for them
    forever (:func:`~mapl_ray.pipelines.ray_env.require_local_gpus`). Raises ConfigError naming what is missing."""
    if cfg.train.use_gpu:
        require_local_gpus(
            cfg.train.num_workers,
            f"--gpu asks for {cfg.train.num_workers} GPU worker(s)",
            "drop --gpu to train on the CPU",
        )


class TrainingFailed(RuntimeError):
    """A Ray Train worker failed with an error that is not one of mapl-ray's input errors."""


def _worker_error(err: BaseException) -> BaseException:
    """The error a training worker raised, unwrapped from Ray's wrappers (for a one-line CLI message)."""
    seen, stack, seen_errors = set(), [err], []
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        seen_errors.append(e)
        if isinstance(e, (LayoutError, WeightsError, CheckpointError, ConfigError)):
            return e
        failures = getattr(e, "worker_failures", None)
        if isinstance(failures, dict):
            stack.extend(failures.values())
        stack.extend([getattr(e, "cause", None), e.__cause__, e.__context__])
    for e in seen_errors:  # a Ray Data stage's error reaches the worker as text only (UserCodeException)
        found = re.search(r"ImageReadError: cannot read image '(.+?)': ([^\n]*)", str(e))
        if found:
            return ImageReadError(found[1], found[2])
    last = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
    return TrainingFailed(
        f"training failed in a Ray worker: {last} (mapl train --verbose shows the workers' output; Ray's "
        "log files, by default under /tmp/ray/session_latest/logs)"
    )


class _LogFollower:
    """Driver-side progress of a Ray Train run: follows the lines rank 0 appends to ``train_log.jsonl``
    (one per ``train.log_every`` steps) from a background thread, into a
    :class:`~mapl_ray.engine.progress.TrainProgress` and a line per pseudo-labeler refit
    (:func:`~mapl_ray.pseudo.labeler.report_refit`)."""

    def __init__(self, run_dir: Path, total: int, initial: int, poll_s: float = 1.0):
        from ..engine.progress import TrainProgress
        from ..pseudo.labeler import report_refit  # here: its first import (torch) would hold up the thread

        self.report_refit = report_refit
        self.path, self.poll_s = run_dir / TRAIN_LOG_FILE, poll_s
        self.offset = self.path.stat().st_size if self.path.is_file() else 0  # a resumed run's earlier lines
        self.progress = TrainProgress(total, initial)
        self.refit_step: int | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="mapl-train-progress", daemon=True)

    def __enter__(self) -> _LogFollower:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        self._read()
        self.progress.close()

    def _run(self) -> None:
        while not self.stop.wait(self.poll_s):
            self._read()

    def _read(self) -> None:
        if not self.path.is_file():
            return
        with self.path.open("rb") as fh:
            fh.seek(self.offset)
            chunk = fh.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]  # a line still being written waits for the next poll
        self.offset += len(complete)
        for line in complete.decode().splitlines():
            rec = json.loads(line)
            if "event" in rec:  # a restart marker: the steps start again from its step
                log.warning("restarted after a failure: continuing from step %d", rec["step"])
                continue
            if rec.get("refit_step") not in (None, self.refit_step) and "pseudo_pos" in rec:
                self.refit_step = rec["refit_step"]
                self.report_refit(rec)
            self.progress.update(int(rec["step"]), rec["loss"])
            if self.progress.n == self.progress.total:  # rank 0 is past the loop (its last line)
                # what rank 0 does after its last step (engine.loop's _finish), shown there phase by phase
                self.progress.phase("finishing: the final memory banks, patch bank and checkpoint")


def train_with_ray(
    cfg: Config,
    data: TrainData,
    validation: ValidationSet | None,
    run_dir: str | Path,
    resume: bool = False,
    progress: bool = True,
    verbose: bool = False,
    stream=None,
) -> dict[str, Any]:
    """Run training as a Ray Train ``TorchTrainer`` job (``cfg.train.num_workers`` workers, DDP when > 1).

    Args:
        progress: show the progress (the driver's, following ``train_log.jsonl``, :class:`_LogFollower`; a
            worker's stderr is no terminal and its INFO lines reach no handler, also with ``verbose``).
        verbose: the workers' output and Ray's INFO lines on the console (:func:`init_ray`'s ``quiet`` off).
        stream: a :class:`~mapl_ray.pipelines.ray_data.TrainStream`: the workers take their batches from
            its Ray Data datasets (``ray.train.get_dataset_shard``) instead of drawing them from ``data``.

    Returns the rank-0 training summary (wall time, step times, final losses, ``warnings``: what
    mapl-ray logged as a warning on rank 0, logged again here unless ``verbose``).

    Raises:
        LayoutError, WeightsError, CheckpointError, ConfigError: a worker's input error, unwrapped.
        TrainingFailed: a training worker failed for another reason (its last line).
    """
    import ray
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    run_dir = Path(run_dir).resolve()
    init_ray(quiet=not verbose)
    threads, resources = _worker_resources(cfg)
    n = cfg.train.num_workers
    ingest = {"datasets": stream.datasets(n), "dataset_config": stream.data_config()} if stream else {}
    log_path = run_dir / TRAIN_LOG_FILE
    check_gpus(cfg)
    trainer = TorchTrainer(
        _train_loop_per_worker,
        train_loop_config={
            "cfg": cfg.to_dict(),
            "data_ref": ray.put((data, validation)),
            "run_dir": str(run_dir),
            "resume": resume,
            "threads": threads,
            "progress": False,  # the driver shows it (_LogFollower)
            "stream_plan": stream.plan(0, n) if stream else None,
            "stream_start": stream.start if stream else 0,
            "fit_id": uuid.uuid4().hex[:12],  # tells this call's restart markers from earlier ones
            "log_offset": log_path.stat().st_size if log_path.is_file() else 0,
            # Ray Train copies each reported checkpoint into its storage: inside RUN (the default) the copy is
            # no safer than RUN/checkpoint itself, which a restart continues from (_attempt)
            "ray_checkpoints": bool(cfg.train.storage_path),
        },
        scaling_config=ScalingConfig(
            num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu, resources_per_worker=resources
        ),
        run_config=run_config(cfg, run_dir),
        **ingest,
    )
    result = _fit(trainer, run_dir, cfg, resume, progress)
    if result.error:
        raise _worker_error(result.error) from result.error
    summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    if not verbose:
        for message in summary.get("warnings", []):
            log.warning(message)
    return summary


def run_config(cfg: Config, run_dir: Path, name: str = "train"):
    """Ray Train's ``RunConfig`` of a training run: checkpoints and run state under ``train.storage_path``
    (default ``RUN/ray_results``, removed when the job ends; a path every node reads, or a URI such as
    ``s3://bucket/ray``, where each run folder gets its own name), the two newest checkpoints kept,
    ``FailureConfig(max_failures=train.max_failures)``. Ray Train continues a run from the checkpoints
    under the same storage path and name (``mapl train --resume`` of a run whose job died)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig

    storage = cfg.train.storage_path or str(run_dir / "ray_results")
    if "://" not in storage:
        storage = str(Path(storage).expanduser().resolve())
    if cfg.train.storage_path:  # shared by many runs: one name per run folder (the same on --resume)
        name = f"{name}-{run_dir.name}-{hashlib.sha1(str(run_dir).encode()).hexdigest()[:8]}"
    return RunConfig(
        name=name,
        storage_path=storage,
        checkpoint_config=CheckpointConfig(num_to_keep=2),
        failure_config=FailureConfig(max_failures=cfg.train.max_failures),
    )


def _fit(trainer, run_dir: Path, cfg: Config, resume: bool, follow: bool):
    """``trainer.fit()`` with the driver's progress bar when ``follow``; a worker's error unwrapped.

    ``fit`` runs in a helper thread so that Ctrl-C reaches this (main) thread as ``KeyboardInterrupt``,
    which the CLI turns into where the last checkpoint is and how to resume. On the main thread Ray Train
    installs its own SIGINT handler, which ends the process with ``sys.exit`` and no word of the run
    (it skips that off the main thread, as under Ray Tune). The job's workers end with this process.
    """
    start = int(read_state(run_dir)["step"]) if resume and has_checkpoint(run_dir) else 0
    out: dict[str, Any] = {}

    def target() -> None:
        try:
            out["result"] = trainer.fit()
        except BaseException as e:  # noqa: BLE001 - handed to the main thread, raised there
            out["error"] = e

    thread = threading.Thread(target=target, name="mapl-train-fit", daemon=True)
    with _LogFollower(run_dir, cfg.train.steps, start) if follow else nullcontext():
        thread.start()
        while thread.is_alive():
            thread.join(0.5)
    if "error" in out:
        raise _worker_error(out["error"]) from out["error"]
    return out["result"]
