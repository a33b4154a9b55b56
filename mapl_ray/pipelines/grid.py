"""A grid of main-job runs as Ray tasks: one trial per task, fractional GPUs so that small trials share a
GPU, results streamed back as each trial ends (benchmarks and design sweeps; Ray Tune does searches).

Each trial trains in its task's process (no nested Ray Train job), calibrates on its validation set,
evaluates on its test split and returns a flat record of the figures that matter. A trial whose
``detector`` is ``"patchcore"`` runs the accuracy benchmark's peer instead (:mod:`mapl_ray.peer`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import Config
from .ray_env import init_ray


@dataclass
class Trial:
    """One run of a grid.

    Attributes:
        name: unique name (also the run folder's name under the grid's output folder).
        config: the full configuration as a nested dict (:meth:`Config.to_dict`).
        meta: labels carried into the result (category, setting, seed...).
        detector: ``"mapl"`` (the main job) or ``"patchcore"`` (:func:`mapl_ray.peer.run_patchcore`).
        options: keyword arguments of the peer (e.g. ``coreset_ratio``).
    """

    name: str
    config: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)
    detector: str = "mapl"
    options: dict[str, Any] = field(default_factory=dict)


def trial_record(run_dir: Path, metrics: dict[str, Any]) -> dict[str, Any]:
    """The figures of a finished run: test metrics, validation objective, pseudo-label quality, timings."""
    summary = json.loads((run_dir / "train_summary.json").read_text())
    o, v = metrics["overall"], metrics.get("validation", {})
    refits = summary.get("pseudo_refits") or []
    last = refits[-1] if refits else {}
    return {
        "image_auroc": o.get("image_auroc"),
        "pixel_auroc": o.get("pixel_auroc"),
        "aupro": o.get("aupro"),
        "f1_max": o.get("f1_max"),
        "validation_objective": v.get("objective"),
        "validation_image_auroc": v.get("image_auroc"),
        "validation_image_auroc_map": v.get("image_auroc_map"),
        "validation_pixel_auroc": v.get("pixel_auroc"),
        "validation_image_auroc_simulated": v.get("image_auroc_simulated"),
        "validation_image_auroc_labeled_anomalies": v.get("image_auroc_labeled_anomalies"),
        "q_weight": v.get("q_weight"),
        "knn_weight": (v.get("knn_fusion") or {}).get("weight"),
        "validation_image_auroc_by_knn_weight": v.get("image_auroc_by_knn_weight"),
        "validation_pixel_auroc_by_knn_weight": v.get("pixel_auroc_by_knn_weight"),
        "validation_objective_by_knn_weight": v.get("objective_by_knn_weight"),
        "pseudo_label_precision": last.get("pseudo_label_precision"),
        "pseudo_label_recall": last.get("pseudo_label_recall"),
        "normal_stream_purity": last.get("normal_stream_purity"),
        "anomalies_in_normal_stream": last.get("anomalies_in_normal_stream"),
        "canary_recall": last.get("canary_recall"),
        "canaries_in_normal_stream": last.get("canaries_in_normal_stream"),
        "pseudo_score_auroc": last.get("pseudo_score_auroc"),
        "pseudo_refits": refits,
        "train_wall_s": summary.get("train_wall_s"),
        "patch_bank_s": summary.get("patch_bank_s"),
        "patch_bank": summary.get("patch_bank"),
        "pseudo_fit_s": summary.get("pseudo_fit_s"),
        "pseudo_fit_wait_s": summary.get("pseudo_fit_wait_s"),
        "loader_wait_s": summary.get("loader_wait_s"),
    }


def _run_trial(
    config: dict[str, Any], run_dir: str, threads: int, detector: str = "mapl", options: dict | None = None
) -> dict[str, Any]:
    """Ray task body: the main job (or the peer) in this process on this task's share of a GPU (or the CPU)."""
    import torch

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    if detector == "patchcore":
        from ..peer import run_patchcore

        return {**run_patchcore(config, **(options or {})), "wall_s": time.perf_counter() - t0}
    from ..main_job import run_train_job

    cfg = Config.from_dict(config)
    use_gpu = torch.cuda.is_available()
    metrics = run_train_job(cfg.override({"train.use_gpu": use_gpu}), run_dir, use_ray=False, progress=False)
    return {**trial_record(Path(run_dir), metrics), "wall_s": time.perf_counter() - t0}


def run_grid(
    trials: Iterable[Trial],
    out_dir: str | Path,
    gpus_per_trial: float = 0.0,
    cpus_per_trial: int = 2,
    on_result: Callable[[Trial, dict[str, Any]], None] | None = None,
    deadline_s: float | None = None,
) -> list[dict[str, Any]]:
    """Run ``trials`` as Ray tasks (local Ray, or the cluster at ``RAY_ADDRESS``) and return their records.

    Args:
        trials: the runs; each writes its run folder to ``out_dir / trial.name``.
        gpus_per_trial: GPU share of each task (e.g. 0.2: five trials share a GPU; 0: CPU only).
        cpus_per_trial: CPUs of each task (torch threads; the rest of the CPUs run other trials).
        on_result: called with each trial and its record as it ends (save partial results there).
        deadline_s: seconds after which the trials not finished are cancelled (``ray.cancel``) and recorded
            with ``error`` saying so, so that a grid ends within a time limit; None: no limit. Ray starts
            tasks roughly in the order given: put the trials that matter most first.

    Returns:
        one record per trial, in the order given: ``trial.meta``, ``name`` and :func:`trial_record`'s
        figures, or ``error`` (a one-line message) for a trial that failed or was cancelled; the others
        still run.
    """
    import ray

    init_ray()
    trials = list(trials)
    task = ray.remote(_run_trial).options(num_cpus=cpus_per_trial, num_gpus=gpus_per_trial, max_retries=0)
    out_dir = Path(out_dir).resolve()
    pending = {
        task.remote(t.config, str(out_dir / t.name), cpus_per_trial, t.detector, t.options): i
        for i, t in enumerate(trials)
    }
    records: list[dict[str, Any] | None] = [None] * len(trials)
    end = None if deadline_s is None else time.monotonic() + deadline_s
    while pending:
        left = None if end is None else end - time.monotonic()
        done, _ = ray.wait(list(pending), num_returns=1, timeout=None if left is None else max(left, 0.0))
        if not done:  # past the deadline: cancel the rest, record why
            for ref in list(pending):
                ray.cancel(ref, force=True)
                i = pending.pop(ref)
                records[i] = {**trials[i].meta, "name": trials[i].name, "error": f"cancelled after {deadline_s:g} s"}
                if on_result is not None:
                    on_result(trials[i], records[i])
            break
        i = pending.pop(done[0])
        try:
            result = ray.get(done[0])
        except Exception as e:  # noqa: BLE001 - one failed trial is recorded, the grid goes on
            result = {"error": str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__}
        records[i] = {**trials[i].meta, "name": trials[i].name, **result}
        if on_result is not None:
            on_result(trials[i], records[i])
    return [r for r in records if r is not None]
