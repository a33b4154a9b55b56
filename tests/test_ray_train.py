"""Ray Train: a 2-worker DDP run on CPU lowers the loss and writes one checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import needs_data, tiny_config

from mapl_ray.data.layout import ImageReadError

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
    # a Ray Data stage's failure arrives as text (UserCodeException): the unreadable file is still named
    data_stage = RuntimeError(
        "ray::MapWorker(MapBatches(StreamRows)).submit()\n  File ...\nmapl_ray.data.layout.ImageReadError: "
        "cannot read image '/pool/zz.png': not an image in a format Pillow reads\n\nUDF failed"
    )
    found = _worker_error(WorkerGroupError({0: data_stage}))
    assert isinstance(found, ImageReadError) and found.path == "/pool/zz.png"
    assert found.reason == "not an image in a format Pillow reads"


def test_a_streamed_pool_skips_an_unreadable_file_only_when_asked(tmp_path):
    """--skip-bad-images with a pool streamed from a folder: the next readable pool image streams in place
    of an unreadable one (the same on every worker); without it, the file's error stops the stream."""
    from conftest import SCREW

    from mapl_ray.data.io import load_image
    from mapl_ray.data.streams import ROLE_UNLABELED
    from mapl_ray.pipelines.ray_data import StreamRows, StreamSources

    good = sorted((SCREW / "train" / "good").glob("*.png"))[:2]
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    pool = [str(good[0]), str(bad), str(good[1])]
    sources = StreamSources(([str(good[0])], pool, []), [])
    role, index = np.full(3, ROLE_UNLABELED), np.arange(3)
    for skip in (False, True):
        cfg = tiny_config(SCREW.parent).override({"data.skip_bad_images": skip})
        rows = StreamRows(cfg, sources, None)
        size = cfg.data.image_size
        images, masks = np.zeros((3, size, size, 3), np.uint8), np.zeros((3, size, size), np.uint8)
        if not skip:
            with pytest.raises(ImageReadError, match="bad.png"):
                rows._from_files(role, index, images, masks)
            continue
        rows._from_files(role, index, images, masks)
        np.testing.assert_array_equal(images[1], load_image(good[1], size))  # the next readable one
        np.testing.assert_array_equal(images[2], images[1])
