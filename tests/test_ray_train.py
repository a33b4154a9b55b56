"""Ray Train: a 2-worker DDP run on CPU lowers the loss and writes one checkpoint."""

from __future__ import annotations

import json

import pytest
from conftest import needs_data, tiny_config

pytestmark = needs_data


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_two_worker_ray_train_lowers_loss(ray_local, small_root, tmp_path):
    from mapl_ray.data.train_data import load_train_data
    from mapl_ray.main_job import prepare_run
    from mapl_ray.pipelines.ray_train import train_with_ray

    cfg = tiny_config(
        small_root,
        **{
            "train.steps": 40,
            "train.num_workers": 2,
            "train.cpus_per_worker": 1,
            "train.lr": 0.01,
            "train.checkpoint_every": 100,
        },
    )
    run = tmp_path / "run"
    split = prepare_run(cfg, run)
    data, _, _ = load_train_data(cfg, split)
    summary = train_with_ray(cfg, data, None, run, progress=False)
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 41))  # rank 0 logs once per step, not once per worker
    first = log[0]["l1"] + log[0]["focal"]
    last = sum(r["l1"] + r["focal"] for r in log[-4:]) / 4
    assert last < 0.5 * first, (first, last)
    assert summary["steps_run"] == 40
    assert (run / "checkpoint" / "model.safetensors").is_file()
    assert not list(run.glob("checkpoint_*"))  # one checkpoint folder, not one per rank


def test_worker_errors_are_unwrapped_for_the_cli():
    from mapl_ray.model.encoder import WeightsError
    from mapl_ray.pipelines.ray_train import TrainingFailed, _worker_error

    class WorkerGroupError(RuntimeError):  # shape of Ray Train's wrapper: failures by rank
        def __init__(self, failures):
            super().__init__("Training failed due to worker errors:\nTraceback ...\nValueError: boom")
            self.worker_failures = failures

    ours = WeightsError("unknown encoder 'resnet9000'")
    assert _worker_error(WorkerGroupError({0: ours, 1: ours})) is ours
    wrapped = RuntimeError("outer")
    wrapped.__cause__ = ours
    assert _worker_error(wrapped) is ours
    other = _worker_error(WorkerGroupError({0: ZeroDivisionError("x")}))
    assert isinstance(other, TrainingFailed) and "ValueError: boom" in str(other)
