"""Shared fixtures: a small real-image category (MVTec AD screw subset) and a tiny trained run."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from mapl_ray.config import Config

DATA_ROOT = Path(os.environ.get("MAPL_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
SCREW = DATA_ROOT / "mvtec_ad" / "screw"
# the GPU machine's copy (bench/gpu_payload.py) carries the DTD textures resized, as dtd256
TEXTURES = next(
    (t for t in (DATA_ROOT / "dtd_subset" / "images", DATA_ROOT / "dtd256") if t.is_dir()),
    DATA_ROOT / "dtd_subset" / "images",
)

needs_data = pytest.mark.skipif(not SCREW.is_dir(), reason=f"real data not found at {SCREW} (set MAPL_DATA)")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def pytest_report_header(config):
    state = (
        "found"
        if SCREW.is_dir()
        else "NOT FOUND: the tests on real images will be SKIPPED (set MAPL_DATA=/path/to/data)"
    )
    return f"mapl-ray real data: {DATA_ROOT} ({state})"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not SCREW.is_dir():  # a green run without the data has not tested training, the CLI or serving
        terminalreporter.write_line(
            f"WARNING: real data not found at {SCREW}: the data tests were skipped, "
            "so training, the CLI and serving were not tested (set MAPL_DATA)",
            red=True,
            bold=True,
        )


@pytest.fixture(autouse=True)
def _few_threads():
    # 2-core CI: keep torch from oversubscribing while Ray or other tests run
    n = torch.get_num_threads()
    torch.set_num_threads(min(n, 2))
    yield
    torch.set_num_threads(n)


#: ``mapl train`` flags for a tiny, fast run (64x64, random-init EfficientNet-Lite0, small decoder).
TINY_CLI = [
    "--image-size",
    "64",
    "--memory-samples",
    "3",
    "--set",
    "model.pretrained=false",
    "--set",
    "model.encoder=tf_efficientnet_lite0",
    "--set",
    "model.decoder_channels=16,16,16,16",
]


def copy_small_category(
    dst: Path,
    n_train: int = 14,
    n_good: int = 3,
    n_per_defect: int = 2,
    defects: tuple[str, ...] = ("scratch_head", "thread_top"),
) -> Path:
    """A small MVTec-layout copy of real screw images under ``dst/screw``; returns ``dst``."""
    cat = dst / "screw"
    (cat / "train" / "good").mkdir(parents=True)
    for f in sorted((SCREW / "train" / "good").glob("*.png"))[:n_train]:
        shutil.copy(f, cat / "train" / "good" / f.name)
    (cat / "test" / "good").mkdir(parents=True)
    for f in sorted((SCREW / "test" / "good").glob("*.png"))[:n_good]:
        shutil.copy(f, cat / "test" / "good" / f.name)
    for d in defects:
        (cat / "test" / d).mkdir(parents=True)
        (cat / "ground_truth" / d).mkdir(parents=True)
        for f in sorted((SCREW / "test" / d).glob("*.png"))[:n_per_defect]:
            shutil.copy(f, cat / "test" / d / f.name)
            shutil.copy(
                SCREW / "ground_truth" / d / f"{f.stem}_mask.png", cat / "ground_truth" / d / f"{f.stem}_mask.png"
            )
    return dst


def tiny_config(root: Path, **overrides) -> Config:
    """Small, fast settings on 64x64 images with a random-init EfficientNet-Lite0 (no weights file)."""
    base = {
        "data.root": str(root),
        "data.category": "screw",
        "data.image_size": 64,
        "simulation.texture_dir": str(TEXTURES),
        "model.encoder": "tf_efficientnet_lite0",
        "model.pretrained": False,
        "model.memory_samples": 4,
        "model.memory_rotations": 2,
        "model.memory_banks": 2,
        "model.decoder_channels": "32,24,16,16",
        "model.head_hidden": 16,
        "pseudo.warmup_steps": 2,
        "pseudo.refit_every": 3,
        "pseudo.pool_size": 8,
        "pseudo.pca_dim": 8,
        "train.steps": 6,
        "train.log_every": 1,
        "train.checkpoint_every": 3,
        "eval.validation_normals": 3,
        "eval.top_k": 10,
        "eval.heatmaps": 4,
        "eval.batch_size": 8,
    }
    base.update(overrides)
    return Config().override(base)


@pytest.fixture(scope="session")
def small_root(tmp_path_factory) -> Path:
    if not SCREW.is_dir():
        pytest.skip(f"real data not found at {SCREW}")
    return copy_small_category(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="session")
def trained_run(small_root, tmp_path_factory) -> Path:
    """A run folder trained for a few steps without Ray (shared by predict / evaluate tests)."""
    from mapl_ray.main_job import run_train_job

    run = tmp_path_factory.mktemp("runs") / "run"
    run_train_job(tiny_config(small_root), run, use_ray=False, progress=False)
    return run


def random_feats(rng: np.random.Generator, b: int, shapes=((4, 8, 8), (6, 4, 4), (8, 2, 2))) -> list[torch.Tensor]:
    return [torch.from_numpy(rng.standard_normal((b, *s)).astype(np.float32)) for s in shapes]
