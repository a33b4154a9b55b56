"""Ray Tune search (mapl tune) and the OCC ensemble fitted by Ray tasks."""

from __future__ import annotations

import csv
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import SCREW, TEXTURES, copy_small_category

from mapl_ray.cli import main
from mapl_ray.config import Config, ConfigError, PseudoConfig
from mapl_ray.pipelines.tune import DEFAULT_SEARCH_SPACE, in_space, load_search_space
from mapl_ray.pseudo.labeler import fit_overlap
from mapl_ray.pseudo.occ import OCCConfig, OCCEnsemble

# tiny trials: 64x64, random-init EfficientNet-Lite0, a refit and a validation pass within 4 steps
TINY_SET = {
    "data.image_size": 64,
    "model.encoder": "tf_efficientnet_lite0",
    "model.pretrained": "false",
    "model.memory_samples": 4,
    "model.memory_rotations": 1,
    "model.decoder_channels": "16,16,16,16",
    "model.head_hidden": 8,
    "pseudo.warmup_steps": 1,
    "pseudo.refit_every": 2,
    "pseudo.pool_size": 8,
    "pseudo.pca_dim": 4,
    "train.steps": 4,
    "train.checkpoint_every": 100,
    "eval.validate_every": 2,
    "eval.validation_normals": 3,
    "eval.top_k": 10,
    "eval.batch_size": 8,
    "eval.heatmaps": 1,
}
SPACE = {"pseudo.num_occs": {"int": [1, 3]}, "loss.pseudo_bce_weight": {"loguniform": [0.01, 1.0]}}


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    from mapl_ray.pipelines.ray_env import init_ray

    init_ray(quiet=True, num_cpus=2)
    yield ray
    ray.shutdown()


def tune_args(root: Path, out: Path, space: Path, n: int) -> list[str]:
    sets = [x for k, v in TINY_SET.items() for x in ("--set", f"{k}={v}")]
    return [
        "tune",
        *("--data", str(root), "--category", "screw", "--textures", str(TEXTURES), "--out", str(out)),
        *("--search-space", str(space), "--num-samples", str(n), "--cpus-per-trial", "1"),
        *sets,
    ]


def test_default_search_space_holds_the_defaults_and_bad_spaces_are_named(tmp_path):
    space = load_search_space()
    assert {"pseudo.num_occs", "pseudo.covariance_type", "pseudo.features", "train.lr"} <= set(space)
    defaults = Config()
    point = {k: getattr(getattr(defaults, k.split(".")[0]), k.split(".")[1]) for k in space}
    assert in_space(space, point)  # the default configuration is the search's first trial
    assert not in_space(space, {**point, "pseudo.num_occs": 9})
    for bad, word in (
        ({"pseudo.num_occ": {"int": [1, 8]}}, "names no configuration field"),
        ({"data.image_size": {"choice": [64, 128]}}, "cannot be searched"),
        ({"pseudo.num_occs": {"int": [0, 8]}}, "not a valid value"),
        ({"train.lr": {"gauss": [0.1, 1]}}, "expected one of"),
        ({"pseudo.num_occs": {"int": [1, "x"]}}, "integer bounds"),
        ({"pseudo.num_occs": {"int": ["1", "3"]}}, "integer bounds"),
        ({"train.lr": {"loguniform": ["0.0001", 0.1]}}, "number bounds"),  # quoted: text, not a number
        ({"train.lr": {"uniform": [0.001, float("inf")]}}, "finite bounds"),
        ({"pseudo.num_occs": {"uniform": [1, 8]}}, "does not take: use int: \\[low, high\\]"),  # 5.46 OCCs
        ({"pseudo.covariance_type": {"int": [1, 2]}}, "does not take: use choice"),
        ({"pseudo": {"num_occs": {"int": [1, 8]}}}, "is a section: write its fields as flat keys"),
        ({"pseudo.num_occs": {"int": [3, 2]}}, "low <= high"),
        ({"pseudo.num_occs": {"choice": ["2", 4]}}, "'2' is not a valid value .*without quotes"),
        ({"model.pretrained": {"choice": ["true", False]}}, "'true' is not a valid value .*without quotes"),
    ):
        f = tmp_path / "space.yaml"
        f.write_text(yaml.safe_dump(bad))
        with pytest.raises(ConfigError, match=word):
            load_search_space(f)
    f.write_text(yaml.safe_dump({"pseudo.num_occs": {"int": [3, 3]}}))  # both bounds included: one value
    assert load_search_space(f) == {"pseudo.num_occs": {"int": [3, 3]}}
    f.write_text("train.lr: {loguniform: [1e-4, 1e-2]}\n")  # numbers as YAML 1.2 reads them (PyYAML: strings)
    assert load_search_space(f) == {"train.lr": {"loguniform": [1e-4, 1e-2]}}
    assert DEFAULT_SEARCH_SPACE.is_file()


def test_a_gpu_share_on_a_local_ray_without_gpus_is_refused_before_the_search_folder_is_written(ray_local, tmp_path):
    import ray

    from mapl_ray.pipelines.tune import tune_search

    assert ray.cluster_resources().get("GPU", 0) == 0  # the test cluster is CPU only
    out = tmp_path / "search"
    with pytest.raises(ConfigError, match="--gpus-per-trial 0.25 but local Ray sees 0 GPU"):
        tune_search(Config(), out, num_samples=2, gpus_per_trial=0.25)
    assert not out.exists()


def test_refit_overlap_is_bounded_by_the_schedule():
    assert fit_overlap(PseudoConfig(fit_overlap_steps=10, refit_every=100, label_lag=20)) == 10
    assert fit_overlap(PseudoConfig(fit_overlap_steps=10, refit_every=3, label_lag=20)) == 2
    assert fit_overlap(PseudoConfig(fit_overlap_steps=10, refit_every=100, label_lag=4)) == 3
    assert fit_overlap(PseudoConfig(fit_overlap_steps=0)) == 0


def test_ray_task_occ_fit_equals_the_sequential_fit(ray_local):
    from mapl_ray.pipelines.occ_tasks import ray_task_map

    rng = np.random.default_rng(3)
    normal, unlabeled = rng.standard_normal((80, 40)), rng.standard_normal((400, 40))
    positives = rng.standard_normal((16, 40)) + 2.0
    cfg = OCCConfig(num_occs=4, n_components=2, pca_dim=8, seed=5)
    seq = OCCEnsemble(cfg).fit(normal, unlabeled, positives)
    par = OCCEnsemble(cfg).fit(normal, unlabeled, positives, map_fn=ray_task_map)
    a, b = seq.state_dict()[0], par.state_dict()[0]
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert np.array_equal(seq.predict(unlabeled), par.predict(unlabeled))
    other = OCCEnsemble(OCCConfig(num_occs=4, n_components=2, pca_dim=8, seed=6)).fit(normal, unlabeled, positives)
    assert not np.array_equal(other.state_dict()[0]["occ0.gmm_means"], a["occ0.gmm_means"])  # the seed matters


def _spoil_test_split(root: Path) -> None:
    """Every test and ground-truth file replaced by bytes no decoder reads: opening one fails the run."""
    for f in [*(root / "screw" / "test").rglob("*.png"), *(root / "screw" / "ground_truth").rglob("*.png")]:
        f.write_bytes(b"test split: must not be read during the search")


def _restore_test_split(root: Path) -> None:
    for sub in ("test", "ground_truth"):
        for f in (root / "screw" / sub).rglob("*.png"):
            shutil.copy(SCREW / f.relative_to(root / "screw"), f)


def test_search_writes_best_yaml_and_trials_without_reading_the_test_split(ray_local, tmp_path):
    if not SCREW.is_dir():
        pytest.skip(f"real data not found at {SCREW}")
    root = copy_small_category(tmp_path / "data")
    _spoil_test_split(root)
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(SPACE))
    out = tmp_path / "search"
    assert main(tune_args(root, out, space, 2)) == 0
    with (out / "trials.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2 and all(r["status"] == "finished" and float(r["validation_objective"]) >= 0 for r in rows)
    assert {"pseudo.num_occs", "loss.pseudo_bce_weight", "wall_s"} <= set(rows[0])
    assert (out / "trials.md").read_text().count("| finished |") == 2 and (out / "search.png").stat().st_size > 0
    best = Config.load(out / "best.yaml")
    top = max(rows, key=lambda r: float(r["validation_objective"]))
    assert best.pseudo.num_occs == int(top["pseudo.num_occs"])
    assert best.train.steps == 4 and best.data.image_size == 64  # the base configuration under the search
    # best.yaml trains unchanged (now the test split is back for the evaluation at the end)
    _restore_test_split(root)
    run = tmp_path / "run"
    assert main(["train", "--config", str(out / "best.yaml"), "--out", str(run), "--no-ray", "--quiet"]) == 0
    assert Config.load(run / "config.yaml").to_dict() == best.to_dict()
    assert (run / "metrics.json").is_file()


class _StopAfterFirstTrial:
    """A Ray Tune callback that sends Ctrl-C to the driver when the first trial ends, once (``flag``
    marks it sent: the restored search carries its callbacks along)."""

    def __new__(cls, flag: Path):
        from ray.tune import Callback

        class Stop(Callback):
            def on_trial_complete(self, iteration, trials, trial, **info):
                if not flag.exists():
                    flag.touch()
                    os.kill(os.getpid(), signal.SIGINT)

        return Stop()


@pytest.mark.slow
def test_an_interrupted_search_resumes(ray_local, tmp_path):
    if not SCREW.is_dir():
        pytest.skip(f"real data not found at {SCREW}")
    from mapl_ray.pipelines.tune import SearchInterrupted, tune_search

    root = copy_small_category(tmp_path / "data")
    cfg = Config().override(
        {**TINY_SET, "data.root": str(root), "data.category": "screw", "simulation.texture_dir": str(TEXTURES)}
    )
    out = tmp_path / "search"
    with pytest.raises(SearchInterrupted, match="--resume"):
        tune_search(
            cfg,
            out,
            SPACE,
            num_samples=3,
            cpus_per_trial=1,
            max_concurrent=1,
            callbacks=[_StopAfterFirstTrial(tmp_path / "sent")],
        )
    assert not (out / "best.yaml").exists()
    summary = tune_search(None, out, SPACE, num_samples=3, cpus_per_trial=1, resume=True)
    assert summary["trials"] == 3 and summary["finished"] + summary["stopped_early"] == 3
    assert (out / "best.yaml").is_file()


def test_a_refit_is_in_force_exactly_the_overlap_after_it(small_root, tmp_path):
    import json

    from conftest import tiny_config

    from mapl_ray.data.layout import scan_category
    from mapl_ray.data.split import make_split
    from mapl_ray.data.train_data import load_train_data
    from mapl_ray.engine.loop import train_model

    # refits at steps 2 and 5 (warm-up 2, every 3); an overlap of 2 puts them in force at steps 4 and 7
    cfg = tiny_config(small_root, **{"pseudo.fit_overlap_steps": 2, "train.steps": 8, "train.checkpoint_every": 100})
    data, validation, _ = load_train_data(cfg, make_split(scan_category(str(small_root), "screw"), seed=0))
    (tmp_path / "run").mkdir()
    _, summary = train_model(cfg, data, tmp_path / "run", progress=False, validation=validation)
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    first = [rec["step"] for rec in log if "pseudo_pos" in rec]
    assert first[0] == 5  # logged after step index 4: the refit of step 2 took over there, not before
    assert summary["pseudo_fit_s"] > 0
    parts = summary["pseudo_fit_parts_s"]  # what the pseudo-labeler's time on the training path is made of
    inner = sum(v for k, v in parts.items() if k.startswith("start_fit.") and k.count(".") == 1)
    assert 0 < inner <= parts["start_fit"] and parts["start_fit"] >= parts["start_fit.features"] > 0
    # whole-model snapshot copies are a part of the snapshot's time, and timed exactly when they happen
    assert 0 <= parts["start_fit.snapshot.rebuild"] <= parts["start_fit.snapshot"]
    assert (summary["pseudo_snapshot_rebuilds"] > 0) == (parts["start_fit.snapshot.rebuild"] > 0)
    assert parts["pool"] + parts["start_fit"] + parts["wait"] <= summary["pseudo_fit_s"] + 1e-6
    assert parts["thread.occ"] > 0 and parts["thread.features"] >= 0  # the fits' own thread, off the path
