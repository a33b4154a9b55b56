"""The main job: check the inputs, open the run folder, decode the training set, train (Ray Train by
default, or in this process), calibrate on held-out labeled normals, evaluate on the test split.

``ray.init()`` starts local Ray on one machine (the embedded default); with ``RAY_ADDRESS`` set the
same call joins that cluster (:mod:`mapl_ray.pipelines.ray_train`). The test split is read only by
the evaluation at the end.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from .config import PATH_FIELDS, Config, ConfigError
from .data.foreground import with_resolved_foreground
from .data.io import check_test_masks
from .data.layout import LayoutError, scan_category, scan_folder
from .data.pose import build_pose_estimator
from .data.simulation import build_simulator
from .data.split import Split, copies_among, make_split
from .data.train_data import data_summary, load_train_data
from .model.encoder import WeightsError, build_encoder
from .pseudo.labeler import report_pool, report_pool_labels
from .runfolder import (
    DATA_INFO_FILE,
    POOL_LABELS_FILE,
    SPLIT_FILE,
    open_run_folder,
    read_state,
    write_run_start,
    write_train_summary,
)

log = logging.getLogger("mapl_ray.main")


def absolute_paths(cfg: Config) -> Config:
    """The config with data/texture/unlabeled/weights paths made absolute (Ray workers run elsewhere)."""
    fields = {f: getattr(getattr(cfg, f.split(".")[0]), f.split(".")[1]) for f in PATH_FIELDS}
    return cfg.override({k: str(Path(v).expanduser().resolve()) for k, v in fields.items() if v})


def check_inputs(cfg: Config, check_test: bool = True) -> Split:
    """Check every input of a new run before anything is written, and draw its split (``cfg`` validated).
    ``check_test`` False: the test split's files are listed but not opened (Ray Tune's search never reads them).

    Raises:
        LayoutError: the data set is not in MVTec AD layout, a mask misfits its image, the texture
            folder is missing or empty (each names the path).
        ConfigError: settings that cannot work together (e.g. ``data.align`` without an object
            threshold, more labeled anomalies than the test split holds).
        WeightsError: a missing or unusable encoder weights file, or an unknown backbone.
    """
    if not cfg.data.root or not cfg.data.category:
        raise LayoutError("data.root and data.category are required (mapl train --data ROOT --category NAME)")
    index = scan_category(
        cfg.data.root,
        cfg.data.category,
        require_masks=cfg.data.require_masks,
        allow_empty_train=bool(cfg.data.unlabeled_dir),
    )
    if check_test:
        check_test_masks(index.test, skip_bad=cfg.data.skip_bad_images)
    build_simulator(cfg)  # a missing / empty texture folder
    build_pose_estimator(cfg)  # data.align without an object threshold
    if cfg.model.weights and not Path(cfg.model.weights).is_file():
        what = "is a folder, not a file" if Path(cfg.model.weights).is_dir() else "does not exist"
        raise WeightsError(f"encoder weights file {cfg.model.weights} {what} (model.weights / --weights)")
    build_encoder(cfg.model.encoder, cfg.model.weights, cfg.model.pretrained)  # unknown backbone / bad weights
    unlabeled = scan_folder(cfg.data.unlabeled_dir) if cfg.data.unlabeled_dir else None
    try:
        split = make_split(
            index,
            seed=cfg.data.seed,
            unlabeled=unlabeled,
            unlabeled_fraction=cfg.data.unlabeled_fraction,
            contamination=cfg.data.contamination,
            labeled_anomalies=cfg.data.labeled_anomalies,
            labeled_normals=cfg.data.labeled_normals,
            pool_anomaly_share=cfg.data.pool_anomaly_share,
            validation_normals=cfg.data.split_validation_normals,
            validation_anomalies=cfg.data.split_validation_anomalies,
        )
    except ValueError as e:
        raise ConfigError(_split_message(str(e))) from e
    _warn_copies(split, unlabeled)
    return split


def _warn_copies(split: Split, unlabeled: list | None) -> None:
    """Warn when user unlabeled images are copies of the category's test, validation or train/good images."""
    if not unlabeled:
        return
    others = {"test": split.test, "validation": split.validation, "train/good": split.labeled_normal}
    for role, hits in copies_among(unlabeled, others).items():
        log.warning(
            "%d unlabeled image(s) are byte-for-byte copies of %s images (e.g. %s = %s)%s",
            len(hits),
            role,
            hits[0][0],
            hits[0][1],
            ": the test figures then score images the model saw in training; remove them from the pool"
            if role == "test"
            else "",
        )


#: make_split's arguments as the configuration names them (its messages name the arguments)
_SPLIT_FIELDS = {
    "validation_normals": "data.split_validation_normals",
    "validation_anomalies": "data.split_validation_anomalies",
    "labeled_normals": "data.labeled_normals",
    "labeled_anomalies": "data.labeled_anomalies",
    "unlabeled_fraction": "data.unlabeled_fraction",
    "contamination": "data.contamination",
    "pool_anomaly_share": "data.pool_anomaly_share",
}


def _split_message(text: str) -> str:
    """A :func:`make_split` message with its arguments named as configuration fields (``data.*``)."""
    import re

    return re.sub(r"(?<![\w.])(" + "|".join(_SPLIT_FIELDS) + r")\b", lambda m: _SPLIT_FIELDS[m.group(1)], text)


def prepare_run(cfg: Config, run_dir: str | Path, resume: bool = False) -> Split:
    """Open the run folder: a new run checks its inputs and writes ``config.yaml`` and ``split.json``;
    ``resume`` reads the stopped run's split. ``cfg`` paths must be absolute (:func:`absolute_paths`).

    Raises:
        RunFolderError: see :func:`~mapl_ray.runfolder.open_run_folder`; and the errors of :func:`check_inputs`.
    """
    cfg.validate()
    if open_run_folder(run_dir, resume, cfg.train.steps):
        return Split.from_json(Path(run_dir) / SPLIT_FILE)
    split = check_inputs(cfg)
    write_run_start(run_dir, cfg, split)
    return split


def _check_storage_path(storage: str) -> None:
    """Refuse a local ``train.storage_path`` that is, or lies under, a file (Ray Train would fail only once
    training has started). URIs (``s3://...``) are Ray's to check.

    Raises:
        ConfigError: naming the file.
    """
    if not storage or "://" in storage:
        return
    path = Path(storage).expanduser()
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                raise ConfigError(
                    f"train.storage_path (--storage) {storage}: {p} is a file; expected a folder (created if "
                    "missing) that every node reads, or a URI such as s3://bucket/ray"
                )
            return


def run_train_job(
    cfg: Config,
    run_dir: str | Path,
    resume: bool = False,
    use_ray: bool = True,
    progress: bool = True,
    verbose: bool = False,
) -> dict[str, Any]:
    """The main job: prepare the run, train, calibrate on validation normals, evaluate on test.

    Writes ``config.yaml``, ``split.json``, ``data_info.json``, ``checkpoint/``, ``train_log.jsonl``,
    ``train_summary.json``, ``metrics.json``, ``report.md``, ``scores.csv``, ``plots/``, ``heatmaps/``
    into ``run_dir``. Returns the metrics dict. A new run's ``config.yaml`` holds the foreground the
    anomaly simulation uses (:func:`~mapl_ray.data.foreground.with_resolved_foreground`), which is
    logged (INFO, ``mapl_ray.main``) with the validation hold-out. ``verbose``: Ray's own console
    output and the workers' logs (:func:`~mapl_ray.pipelines.ray_train.train_with_ray`).

    Raises:
        RunFolderError, LayoutError, ConfigError, WeightsError: bad input, before anything is trained
            (ConfigError: ``data.stream`` without Ray, ``train.storage_path`` a file, ``train.use_gpu`` on a
            local Ray with fewer GPUs than workers: before the run folder is written).
        TrainingFailed: a training worker failed for another reason.
    """
    from .eval.evaluate import calibrate, evaluate_run

    run_dir = Path(run_dir)
    cfg = absolute_paths(cfg)
    if cfg.data.stream and not use_ray:
        raise ConfigError("data.stream (--stream) runs on Ray Data: drop --no-ray")
    _check_storage_path(cfg.train.storage_path)
    if use_ray and cfg.train.use_gpu:  # before the run folder is written and the data loaded (seconds)
        from .pipelines.ray_env import init_ray
        from .pipelines.ray_train import check_gpus

        init_ray(quiet=not verbose)
        check_gpus(cfg)
    if not resume:
        cfg, foreground = with_resolved_foreground(cfg)
    split = prepare_run(cfg, run_dir, resume)
    if resume:
        cfg.save(run_dir / "config.yaml")  # e.g. more steps than the stopped run had
        step = read_state(run_dir)["step"]
        log.info("resuming %s from its checkpoint at step %s of train.steps %d", run_dir, step, cfg.train.steps)
    else:
        log.info(foreground)
    if cfg.data.stream:
        summary, validation, data_info = _train_streamed(cfg, split, run_dir, resume, progress, verbose)
    else:
        t0 = time.perf_counter()
        data, validation, data_info = load_train_data(cfg, split)
        load_s = time.perf_counter() - t0
        report_pool(cfg, data)
        (run_dir / DATA_INFO_FILE).write_text(json.dumps(data_info, indent=2))
        if use_ray:
            from .pipelines.ray_train import train_with_ray

            summary = train_with_ray(cfg, data, validation, run_dir, resume=resume, progress=progress, verbose=verbose)
        else:
            summary = train_in_process(cfg, data, validation, run_dir, resume=resume, progress=progress)
        _record_final_banks(run_dir, data_info, summary.get("memory_bank_rows"), data)
        summary["data_load_s"] = load_s
    shutil.rmtree(run_dir / "ray_results", ignore_errors=True)
    listed = run_dir / POOL_LABELS_FILE
    report_pool_labels(summary.get("pseudo_refits") or [], cfg, listed if listed.is_file() else None)
    log.info(
        "calibrating the decision threshold on %d held-out validation images (%s)",
        len(validation),
        validation.composition(),
    )
    calibrate(run_dir, validation)
    log.info("evaluating on the test split (%d images): metrics, report, heatmaps", len(split.test))
    try:
        training = {k: v for k, v in summary.items() if k != "earlier_segments"}  # train_summary.json keeps them
        return evaluate_run(run_dir, extra_info={"training": training, "data": data_summary(data_info)})
    except LayoutError as e:
        raise LayoutError(
            f"{e}\n(training finished and {run_dir / 'checkpoint'} is saved: fix the file, then run "
            f"`mapl evaluate {run_dir}`)"
        ) from e


def _train_streamed(cfg: Config, split: Split, run_dir: Path, resume: bool, progress: bool, verbose: bool):
    """``data.stream``: the pool and the batches stream through Ray Data (``data.shards``: from these
    ``mapl prepare`` folders). Returns (training summary, validation set, data info)."""
    from .pipelines.ray_data import train_streamed

    shards = [s.strip() for s in (cfg.data.shards or "").split(",") if s.strip()] or None
    summary, validation, data_info = train_streamed(
        cfg, split, run_dir, shards=shards, resume=resume, progress=progress, verbose=verbose
    )
    (run_dir / DATA_INFO_FILE).write_text(json.dumps(data_info, indent=2))
    return summary, validation, data_info


def _record_final_banks(run_dir: Path, info: dict[str, Any], rows: list[list[int]] | None, data) -> None:
    """With a pool, the memory banks are chosen again from the final normal stream: list their files
    in ``data_info.json``."""
    paths = data.info.get("source_paths")
    if not rows or not paths:
        return
    info["memory_banks"] = [[paths[i] for i in bank] for bank in rows]
    (run_dir / DATA_INFO_FILE).write_text(json.dumps(info, indent=2))


def train_in_process(
    cfg: Config, data, validation, run_dir: Path, resume: bool = False, progress: bool = True
) -> dict[str, Any]:
    """Train in this process without Ray (``--no-ray``): the first GPU with ``train.use_gpu``, else the CPU.
    Writes ``train_summary.json``; returns the summary."""
    import torch

    from .engine.loop import train_model

    device = "cuda" if cfg.train.use_gpu and torch.cuda.is_available() else "cpu"
    _, summary = train_model(cfg, data, run_dir, device=device, resume=resume, progress=progress, validation=validation)
    write_train_summary(run_dir, summary, resumed=resume)
    return summary
