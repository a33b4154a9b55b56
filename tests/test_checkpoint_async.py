"""In-loop checkpoints written beside training (issue 13): the files equal a synchronous save of the same
step, a run resumed from one continues exactly, a failed write raises in training, a Ctrl-C waits for the
write, and the phases of the training time still add up."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import needs_data, tiny_config
from safetensors.numpy import load_file as load_np
from safetensors.torch import load_file

from mapl_ray.data.train_data import load_train_data
from mapl_ray.engine import checkpoints
from mapl_ray.engine.loop import Trainer, train_model
from mapl_ray.main_job import prepare_run
from mapl_ray.runfolder import TRAIN_LOG_FILE, checkpoint_dir, last_logged_step, read_state, write_checkpoint

pytestmark = needs_data


def _setup(root: Path, run: Path, **overrides):
    cfg = tiny_config(root, **{"train.steps": 8, "train.checkpoint_every": 3, **overrides})
    data, _, _ = load_train_data(cfg, prepare_run(cfg, run))
    return cfg, data


def _slow_writes(monkeypatch, delay: float) -> None:
    """The writer thread waits ``delay`` s before each write: training runs on meanwhile."""

    def slow(run_dir, snapshot):
        time.sleep(delay)
        return write_checkpoint(run_dir, snapshot)

    monkeypatch.setattr(checkpoints, "write_checkpoint", slow)


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


def _losses(run: Path, segment: int) -> dict[int, float]:
    lines = [json.loads(line) for line in (run / TRAIN_LOG_FILE).read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines if r.get("segment") == segment}


def test_checkpoint_written_beside_training_equals_a_synchronous_save(small_root, tmp_path, monkeypatch):
    run = tmp_path / "run"
    cfg, data = _setup(small_root, run, **{"train.ema_decay": 0.9})
    _slow_writes(monkeypatch, 0.5)
    real_snapshot = Trainer.snapshot

    def snapshot_and_save(self, step):  # beside the snapshot the writer gets, a synchronous save of that state
        write_checkpoint(tmp_path / f"sync{step}", real_snapshot(self, step))
        return real_snapshot(self, step)

    monkeypatch.setattr(Trainer, "snapshot", snapshot_and_save)
    handed = []

    def on_checkpoint(step, path):  # the written checkpoint, kept before the next one replaces it
        handed.append((step, last_logged_step(run)))
        shutil.copytree(path, tmp_path / f"async{step}")

    _, summary = train_model(cfg, data, run, progress=False, on_checkpoint=on_checkpoint)
    assert [s for s, _ in handed] == [3, 6, 8]
    assert handed[0][1] > 3  # checkpoint 3 was handed over after later steps: it was written beside them
    for step in (3, 6, 8):
        sync, written = checkpoint_dir(tmp_path / f"sync{step}"), tmp_path / f"async{step}"
        assert sorted(p.name for p in sync.iterdir()) == sorted(p.name for p in written.iterdir())
        assert _equal(load_file(sync / "model.safetensors"), load_file(written / "model.safetensors")), step
        opt = [torch.load(d / "optimizer.pt", weights_only=True) for d in (sync, written)]
        assert opt[0]["raw_params"] and _equal(*opt), step  # optimizer, scheduler and the EMA's raw weights
        assert (sync / "state.json").read_text() == (written / "state.json").read_text()
        if (sync / "pseudo.safetensors").exists():
            a, b = load_np(str(sync / "pseudo.safetensors")), load_np(str(written / "pseudo.safetensors"))
            assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "async8" / "state.json").read_text())["step"] == 8
    phases = summary["phases_s"]
    assert phases["checkpoints"] >= 0 and min(phases.values()) > -0.01
    assert sum(phases.values()) == pytest.approx(summary["train_wall_s"], abs=1e-3)


def test_ctrl_c_while_a_checkpoint_is_written_leaves_it_complete_and_resume_continues_exactly(
    small_root, tmp_path, monkeypatch
):
    cfg, data = _setup(small_root, tmp_path / "straight", **{"train.report_every": 1})
    train_model(cfg, data, tmp_path / "straight", progress=False)

    run = tmp_path / "run"
    prepare_run(cfg, run)
    _slow_writes(monkeypatch, 1.0)

    def ctrl_c(rec):  # Ctrl-C at step 4, while the checkpoint of step 3 is still being written
        if rec["step"] == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_model(cfg, data, run, progress=False, report=ctrl_c)
    assert read_state(run)["step"] == 3 and not (run / "checkpoint.tmp").exists()
    train_model(cfg, data, run, resume=True, progress=False)
    resumed, straight = _losses(run, 1), _losses(tmp_path / "straight", 0)
    assert sorted(resumed) == [4, 5, 6, 7, 8]
    assert resumed == pytest.approx({s: straight[s] for s in resumed}, abs=1e-6)


def test_a_failed_checkpoint_write_raises_in_training(small_root, tmp_path, monkeypatch):
    run = tmp_path / "run"
    cfg, data = _setup(small_root, run)

    def full_disk(run_dir, snapshot):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoints, "write_checkpoint", full_disk)
    with pytest.raises(OSError, match="No space left on device"):
        train_model(cfg, data, run, progress=False)
    assert last_logged_step(run) < 8  # raised in the loop, at a step after the failed write
