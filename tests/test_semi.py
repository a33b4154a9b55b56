"""The semi-supervised loop: pool images go where their pseudo-label says, the pseudo-labeler labels every
pool image on its schedule, the validation set is labeled data only, and the image head's weight is
chosen on validation scores."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from conftest import needs_cuda, needs_data, tiny_config

from mapl_ray.config import Config
from mapl_ray.data.batches import BatchMaker
from mapl_ray.data.simulation import build_simulator
from mapl_ray.data.train_data import TrainData, choose_memory_banks, normal_rows
from mapl_ray.data.validation import SOURCE_NORMAL, build_validation_set
from mapl_ray.eval.validation import choose_q_weight
from mapl_ray.pseudo import labeler as labeler_module
from mapl_ray.pseudo.labeler import PseudoLabeler, label_quality, normal_gate
from mapl_ray.pseudo.occ import OCCConfig, OCCEnsemble


def tagged(values: list[int], size: int = 32) -> np.ndarray:
    """Images whose every pixel holds their tag, so a batch tells which images it drew."""
    return np.stack([np.full((size, size, 3), v, np.uint8) for v in values])


def pool_data(n_labeled: int = 4, pool_labels=(0, 0, 1, -1, 0, 1, -1, 0)) -> tuple[TrainData, np.ndarray]:
    labels = np.array(pool_labels, np.int8)
    data = TrainData(
        normals=tagged(list(range(10, 10 + n_labeled))),
        memory_indices=np.arange(min(2, n_labeled)),
        unlabeled=tagged(list(range(100, 100 + len(labels)))),
    )
    return data, labels


#: an untrained tiny model that runs on 32 px images in well under a second
TINY_MODEL = {
    "model.encoder": "tf_efficientnet_lite0",
    "model.pretrained": False,
    "model.decoder_channels": "16,16,16,16",
    "model.head_hidden": 8,
}


def tiny_model(device: torch.device, **overrides):
    """``(config, model)``: :data:`TINY_MODEL` on 32 px images, its memory bank filled from 2 random images."""
    from mapl_ray.model import build_model

    cfg = small_cfg(**{**TINY_MODEL, **overrides})
    model = build_model(cfg).to(device)
    model.refresh_memory(torch.rand(2, 3, 32, 32, device=device))
    return cfg, model


def small_cfg(**overrides) -> Config:
    base = {
        "data.image_size": 32,
        "simulation.texture_dir": None,
        "train.batch_normal": 6,
        "train.batch_simulated": 2,
        "train.batch_unlabeled": 4,
        "train.augment": "none",
        "simulation.use_foreground_mask": False,
    }
    base.update(overrides)
    return Config().override(base)


def stub_labeler(monkeypatch, data: TrainData, votes: np.ndarray, **overrides) -> tuple[PseudoLabeler, object]:
    """A :class:`PseudoLabeler` of ``data`` on a tiny untrained model, its OCC ensemble replaced by a stub whose
    vote is ``votes`` (read at each refit, so a test may change it) and which checks it fits on every pool image."""

    class StubEnsemble:
        def __init__(self, config):
            self.config = config

        def fit(self, normal, unlabeled, positives, map_fn=None):
            assert len(unlabeled) == data.pool_size  # every pool image, no cap
            return self

        def predict(self, x):
            return votes.copy()

        def scores(self, x):
            return np.stack([votes.astype(np.float64), votes.astype(np.float64)])

        def vote(self, scores):
            return votes.copy()

        def torch_params(self, device):
            return [], torch.zeros(0, 1), torch.zeros(0, 1)

    monkeypatch.setattr(labeler_module, "OCCEnsemble", StubEnsemble)
    cfg, model = tiny_model(torch.device("cpu"), **overrides)
    return PseudoLabeler(cfg, BatchMaker(cfg, data, build_simulator(cfg)), torch.device("cpu")), model


def test_pool_images_land_in_the_stream_their_pseudo_label_says():
    data, labels = pool_data()
    cfg = small_cfg()
    bm = BatchMaker(cfg, data, build_simulator(cfg))
    normal_tags, pool_tags = set(), {}
    for step in range(40):
        batch = bm(step, labels)
        tags = batch["images"][:, 0, 0, 0].astype(int)
        normal_tags.update(tags[batch["kind"] == 0].tolist())
        for t, lab in zip(tags[batch["kind"] == 2], batch["label"][batch["kind"] == 2]):
            pool_tags[int(t)] = int(lab)
        assert list(batch["kind"]) == [0] * 6 + [1] * 2 + [2] * 4  # the configured mix, whatever the labels
        assert (batch["kind"] == 2).sum() // 2 <= int(
            (batch["label"][batch["kind"] == 2] == 1).sum()
        )  # positives oversampled
    pseudo_normal = {100 + i for i in np.flatnonzero(labels == 0)}
    assert normal_tags == set(range(10, 14)) | pseudo_normal  # labeled normals and pool images labeled 0, no others
    assert all(pool_tags[t] == labels[t - 100] for t in pool_tags)  # kind 2 carries each image's pseudo-label
    assert not any(labels[t - 100] == -1 for t in pool_tags)  # unknown images are left out
    assert {t for t, lab in pool_tags.items() if lab == 1} == {100 + i for i in np.flatnonzero(labels == 1)}


def test_without_labels_the_pool_waits_and_with_pseudo_off_it_is_normal():
    data, _ = pool_data()
    waiting = PseudoLabeler(
        small_cfg(), BatchMaker(small_cfg(), data, build_simulator(small_cfg())), torch.device("cpu")
    )
    assert (waiting.labels_for(0) == -1).all()  # labeled normals exist: the pool waits for its first refit
    off = small_cfg(**{"pseudo.enabled": False})
    as_normal = PseudoLabeler(off, BatchMaker(off, data, build_simulator(off)), torch.device("cpu"))
    assert (as_normal.labels_for(499) == 0).all()  # pseudo-labels off: the pool is used as normal data
    assert len(normal_rows(data, as_normal.labels_for(0))) == len(data.normals) + data.pool_size


def test_auto_features_are_knn_with_a_pool_and_map_without():
    data, _ = pool_data()
    no_pool = TrainData(normals=data.normals, memory_indices=data.memory_indices)
    cfg = small_cfg()
    assert cfg.pseudo.features == "auto"
    kinds = {
        name: PseudoLabeler(cfg, BatchMaker(cfg, d, build_simulator(cfg)), torch.device("cpu")).kind
        for name, d in (("pool", data), ("none", no_pool))
    }
    assert kinds == {"pool": "knn", "none": "map"}  # without a pool only map can filter the simulated stand-ins
    pooled = small_cfg(**{"pseudo.features": "pooled"})
    assert (
        PseudoLabeler(pooled, BatchMaker(pooled, data, build_simulator(pooled)), torch.device("cpu")).kind == "pooled"
    )


def test_refit_labels_every_pool_image_and_the_labels_apply_after_the_lag(monkeypatch):
    data, truth = pool_data(pool_labels=(0, 0, 1, 0, 0, 1, 0, 0))
    data.unlabeled_truth = truth
    known = np.array([0, 0, 1, -1, 0, 0, -1, 0], np.int8)  # what the stub OCC ensemble says

    lab, model = stub_labeler(
        monkeypatch,
        data,
        known,
        **{"pseudo.warmup_steps": 50, "pseudo.label_lag": 20, "pseudo.pool_size": 2, "pseudo.features": "map"},
    )
    stats = lab.fit(model, 50)
    assert np.array_equal(lab.history[50], known)
    assert (lab.labels_for(69) == -1).all() and np.array_equal(lab.labels_for(70), known)  # lag of 20 steps
    assert stats["pseudo_pos"] == 1 and stats["pseudo_neg"] == 5 and stats["pseudo_unknown"] == 2
    assert stats["pseudo_label_precision"] == 1.0 and stats["pseudo_label_recall"] == 0.5
    assert stats["anomalies_in_normal_stream"] == 1 and stats["normal_stream_purity"] == 4 / 5
    known[:] = [-1, 1, -1, -1, 0, -1, -1, -1]  # a later refit confident about two images only
    again = lab.fit(model, 150)
    assert list(lab.history[150]) == [0, 1, 1, -1, 0, 0, -1, 0]  # unknown keeps the earlier label
    assert again["refit_unknown"] == 6


def test_a_refit_refills_the_device_parameters_in_place_so_a_captured_step_stays_valid():
    # the CUDA-graph step reads the ensemble from fixed tensors: a refit must change their values, not the tensors
    data, _ = pool_data()
    cfg = small_cfg()
    lab = PseudoLabeler(cfg, BatchMaker(cfg, data, build_simulator(cfg)), torch.device("cpu"))
    assert lab.graph_key == 0 and lab.device_params is None
    rng = np.random.default_rng(0)

    def fitted(shift: float, components: int = 1) -> OCCEnsemble:
        occ = OCCConfig(num_occs=2, n_components=components, seed=0)
        normal, unlabeled = rng.normal(size=(40, 5)) + shift, rng.normal(size=(60, 5)) + shift
        return OCCEnsemble(occ).fit(normal, unlabeled, rng.normal(size=(20, 5)) + shift + 4)

    first, second = fitted(0.0), fitted(3.0)
    lab.use_ensemble(first, 50)
    key, tensors = lab.graph_key, [t for occ in lab.device_params[0] for t in occ.values()]
    ptrs = [t.data_ptr() for t in tensors]
    x = torch.as_tensor(rng.normal(size=(64, 5)) * 3 + 1.5)
    out = {"q": torch.zeros(64), "logits": None, "pooled": x}
    lab.kind = "pooled"  # the batch features are x itself
    assert np.array_equal(lab.predict(out).numpy(), first.predict(x.numpy()))
    lab.use_ensemble(second, 150)
    assert lab.graph_key == key and lab.fitted_step == 150
    assert [t.data_ptr() for t in lab.device_params[0][0].values()] + [
        t.data_ptr() for occ in lab.device_params[0][1:] for t in occ.values()
    ] == ptrs  # the same storage ...
    assert np.array_equal(lab.predict(out).numpy(), second.predict(x.numpy()))  # ... holding the new ensemble
    assert not np.array_equal(first.predict(x.numpy()), second.predict(x.numpy()))  # (the refit changed labels)
    assert np.array_equal(first.predict_torch(x).numpy(), first.predict(x.numpy()))  # the old one is untouched
    lab.use_ensemble(fitted(0.0, components=2), 250)  # other shapes: new tensors, a new graph key
    assert lab.graph_key == key + 1


def test_label_quality_without_truth_counts_only():
    stats = label_quality(np.array([1, 0, -1, 0], np.int8), np.full(4, -1, np.int8))
    assert stats == {"pseudo_pos": 1, "pseudo_neg": 2, "pseudo_unknown": 1}


def test_label_quality_reports_the_canaries_apart_from_the_truth():
    labels = np.array([1, 0, 0, 1, 0, -1], np.int8)
    truth = np.array([1, 0, 1, -1, -1, -1], np.int8)  # rows 3-5 are canaries: no truth
    canaries = np.array([0, 0, 0, 1, 1, 1], bool)
    stats = label_quality(labels, truth, canaries)
    assert stats["canaries"] == 3 and stats["canary_recall"] == pytest.approx(1 / 3)
    assert stats["canaries_in_normal_stream"] == 1
    assert stats["pseudo_label_recall"] == 0.5 and stats["anomalies_in_normal_stream"] == 1  # real anomalies only


def test_label_quality_ranks_the_pool_by_the_occ_scores_whatever_the_thresholds():
    labels = np.zeros(6, np.int8)  # thresholds let everything in
    truth = np.array([0, 1, 0, 0, 1, -1], np.int8)
    good = label_quality(labels, truth, scores=np.array([0.1, 0.9, 0.2, 0.3, 0.8, 5.0]))
    assert good["pseudo_score_auroc"] == 1.0 and good["pseudo_label_recall"] == 0.0
    bad = label_quality(labels, truth, scores=np.array([0.9, 0.1, 0.8, 0.7, 0.2, 0.0]))
    assert bad["pseudo_score_auroc"] == 0.0
    assert label_quality(labels, np.zeros(6, np.int8), scores=np.ones(6))["pseudo_score_auroc"] is None


def test_memory_banks_fill_up_from_pseudo_normal_pool_images():
    banks = choose_memory_banks(3, 5, 2, seed=0, pool_rows=np.array([3, 5, 6, 8, 9, 10, 12]))
    assert set(range(3)) <= set(banks[0]) and len(banks[0]) == 5  # every labeled normal, then pool images
    assert len(banks) == 2 and not set(banks[0]) & set(banks[1])
    assert set(banks[0]) | set(banks[1]) <= {0, 1, 2, 3, 5, 6, 8, 9, 10, 12}
    plenty = choose_memory_banks(30, 5, 1, seed=0, pool_rows=np.array([40, 41]))
    assert np.array_equal(plenty[0], choose_memory_banks(30, 5, 1, seed=0)[0])  # enough labeled: pool unused


def test_q_weight_is_chosen_on_validation_scores():
    rng = np.random.default_rng(0)
    labels = np.array([0] * 20 + [1] * 20)
    map_scores = rng.normal(0, 1, 40) + 0.3 * labels  # weak map score
    q = rng.normal(0, 0.1, 40) + labels  # informative head
    best, by_weight = choose_q_weight(labels, map_scores, q, (0.0, 0.5, 1.0, 2.0))
    assert best > 0 and by_weight[f"{best:g}"] == max(by_weight.values())
    useless = rng.normal(0, 1, 40)
    best0, _ = choose_q_weight(labels, labels + 0.01 * rng.normal(size=40), useless, (0.0, 1.0))
    assert best0 == 0.0  # a head that only adds noise gets no weight


def test_validation_set_refuses_a_test_file():
    cfg = small_cfg()
    normals = tagged([1, 2])
    with pytest.raises(RuntimeError, match="test files"):
        build_validation_set(
            cfg, normals, ["/data/a.png", "/data/test/good/b.png"], None, None, [], ["/data/test/good/b.png"]
        )


def _loaded(small_root, tmp_path, **over):
    """``(split, data, validation set, info)`` of a new run of ``tiny_config(small_root, **over)``."""
    from mapl_ray.data.train_data import load_train_data
    from mapl_ray.main_job import prepare_run

    cfg = tiny_config(small_root, **over)
    split = prepare_run(cfg, tmp_path / "run")
    return (split, *load_train_data(cfg, split))


def _validation_files(vset) -> set[str]:
    """The files behind a validation set's images (a simulated anomaly names the normal it was made on)."""
    return {p.split(" (simulated")[0] for p in vset.paths}


@needs_data
def test_validation_set_is_labeled_data_only(small_root, tmp_path):
    over = {"data.labeled_anomalies": 1, "eval.validation_anomalies": 0.5, "data.unlabeled_fraction": 0.3}
    split, data, vset, info = _loaded(small_root, tmp_path, **over)
    test = {r.path for r in split.test}
    files = _validation_files(vset)
    assert files and not files & test
    assert files <= {r.path for r in split.labeled_normal + split.labeled_anomaly}
    assert int((vset.sources == SOURCE_NORMAL).sum()) == 3 and vset.labels.sum() == len(vset) - 3
    assert info["validation"]["test_files"] == 0 and info["unlabeled"] > 0
    assert data.pool_size == info["unlabeled"] + len(info["validation_canaries"])


@needs_data
def test_the_splits_own_validation_set_is_used_whole_and_trains_nowhere(small_root, tmp_path):
    over = {"data.split_validation_normals": 3, "data.split_validation_anomalies": 1, "data.unlabeled_fraction": 0.3}
    split, data, vset, info = _loaded(small_root, tmp_path, **over)
    assert _validation_files(vset) == {r.path for r in split.validation}
    assert int((vset.sources == SOURCE_NORMAL).sum()) == 3
    assert int((vset.labels == 1).sum()) == len(vset) - 3 and vset.masks[vset.labels == 1].any()
    assert len(data.normals) == len(split.labeled_normal)  # nothing held out of the training normals
    assert data.anomalies is None and data.pool_size > 0
    assert info["validation_normals"] == [r.path for r in split.validation if r.label == 0]


@needs_data
def test_with_the_splits_validation_set_and_no_labeled_normal_the_pool_is_the_normal_data(small_root, tmp_path):
    over = {"data.labeled_normals": 0, "data.split_validation_normals": 3}
    split, data, vset, info = _loaded(small_root, tmp_path, **over)
    assert len(data.normals) == 0 and data.pool_size == len(split.unlabeled) + len(info["validation_canaries"])
    assert _validation_files(vset) == {r.path for r in split.validation}
    assert len(data.memory_indices) > 0  # the memory bank comes from the pool, presumed normal at first


@needs_data
def test_validation_canaries_hide_in_the_pool_and_follow_its_labels(small_root, tmp_path):
    from mapl_ray.data.train_data import load_train_data
    from mapl_ray.main_job import prepare_run

    over = {"data.labeled_normals": 6, "data.pool_anomaly_share": 0.2, "eval.validation_canaries": 0.25}
    cfg = tiny_config(small_root, **over)
    split = prepare_run(cfg, tmp_path / "run")
    data, vset, info = load_train_data(cfg, split)
    m = info["unlabeled"]
    n = int(round(0.25 * m))
    assert n >= 2 and data.pool_size == m + n and data.pool_canaries.sum() == n and data.pool_canaries[m:].all()
    assert (data.unlabeled_truth[m:] == -1).all() and (data.unlabeled_truth[:m] >= 0).all()  # never counted as truth
    assert len(info["validation_canaries"]) == n and vset.description["pool_canaries"] == n
    sources = {r.path: i for i, r in enumerate(split.unlabeled)}
    for k, name in enumerate(info["validation_canaries"]):  # each canary: its source image with an anomaly in it
        src = data.unlabeled[sources[name.removesuffix(" (validation canary)")]]
        changed = (data.unlabeled[m + k] != src).any(-1)
        assert 0 < changed.mean() < 0.9
    again, _, _ = load_train_data(cfg, split)  # seeded: a resumed run has the same pool
    assert np.array_equal(again.unlabeled, data.unlabeled)
    as_normal = cfg.override({"pseudo.enabled": False})  # pool as normal data: canaries reach the normal stream
    labeler = PseudoLabeler(as_normal, BatchMaker(as_normal, data, build_simulator(as_normal)), torch.device("cpu"))
    rows = normal_rows(data, labeler.labels_for(0))
    assert set(range(len(data.normals) + m, len(data.normals) + m + n)) <= set(rows.tolist())
    none, _, info0 = load_train_data(cfg.override({"eval.validation_canaries": 0.0}), split)
    assert none.pool_size == m and not none.pool_canaries.any() and info0["validation_canaries"] == []


@needs_data
@pytest.mark.parametrize("features", ["map", "knn"])
def test_a_run_with_a_pool_reports_pseudo_labels_and_validation(small_root, tmp_path, features):
    from mapl_ray.main_job import run_train_job

    cfg = tiny_config(
        small_root,
        **{
            "pseudo.features": features,
            "data.labeled_normals": 7,
            "model.memory_samples": 10,  # more than the labeled normals: each refit refills the training bank
            "data.pool_anomaly_share": 0.2,
            "eval.validation_canaries": 0.25,  # 2 canaries in the pool of 9
            "train.steps": 8,
            "pseudo.label_lag": 2,
            "eval.validate_every": 4,
        },
    )
    metrics = run_train_job(cfg, tmp_path / "run", use_ray=False, progress=False)
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    refits = summary["pseudo_refits"]
    assert refits and all(r["pseudo_pos"] + r["pseudo_neg"] + r["pseudo_unknown"] == 11 for r in refits)
    assert all("pseudo_label_precision" in r for r in refits)  # the pool's truth is known in a benchmark split
    assert all(r["canaries"] == 2 and 0 <= r["canary_recall"] <= 1 for r in refits)
    phases = summary["phases_s"]  # where the wall time went: the parts add up to the loop's wall time
    assert phases["pseudo"] > 0 and phases["validation"] > 0 and phases["steps"] > 0
    assert phases["memory_banks"] > 0  # the refills, timed apart from the pseudo-labeler
    assert summary["refit_bank_refill_s"] == pytest.approx(phases["memory_banks"], abs=1e-4)
    assert min(v for k, v in phases.items() if k != "other") >= 0 and phases["other"] > -0.01
    parts = sum(v for k, v in phases.items() if k != "final")
    assert parts == pytest.approx(summary["loop_wall_s"], abs=0.01)
    assert phases["final"] == pytest.approx(summary["train_wall_s"] - summary["loop_wall_s"], abs=0.01)
    assert 0 < summary["patch_bank_s"] <= phases["final"]  # the patch bank is filled after the loop
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "validation_objective" in r] == [4, 8]
    v = metrics["validation"]
    assert 0 <= v["image_auroc"] <= 1 and v["q_weight"] in Config().eval.q_weight_grid and v["test_files"] == 0
    assert v["objective"] == pytest.approx((v["image_auroc"] + v["pixel_auroc"]) / 2)  # docs/results.md rule 1
    state = json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())
    assert state["q_weight"] == v["q_weight"]
    # every pool image (not the canaries) with the label the run ended with, most anomalous first
    with (tmp_path / "run" / "pool_labels.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    assert sorted(r["path"] for r in rows) == sorted(r["path"] for r in split["unlabeled"])
    last = refits[-1]
    canaries_anomalous = round(last["canary_recall"] * last["canaries"])
    assert sum(r["pseudo_label"] == "anomalous" for r in rows) == last["pseudo_pos"] - canaries_anomalous
    assert sum(r["pseudo_label"] == "normal" for r in rows) == last["pseudo_neg"] - last["canaries_in_normal_stream"]
    scores = [float(r["occ_score"]) for r in rows]
    assert scores == sorted(scores, reverse=True)


@needs_data
def test_unlabeled_copies_of_test_images_are_warned_about(small_root, tmp_path, caplog):
    import shutil

    from mapl_ray.main_job import check_inputs

    pool = tmp_path / "pool"
    pool.mkdir()
    cat = small_root / "screw"
    test_image = sorted((cat / "test" / "thread_top").glob("*.png"))[0]
    shutil.copy(test_image, pool / "a.png")  # a copy under another name
    shutil.copy(sorted((cat / "train" / "good").glob("*.png"))[-1], pool / "b.png")
    cfg = tiny_config(small_root, **{"data.unlabeled_dir": str(pool)})
    with caplog.at_level("WARNING", logger="mapl_ray.main"):
        check_inputs(cfg)
    text = caplog.text
    assert "1 unlabeled image(s) are byte-for-byte copies of test images" in text and str(test_image) in text
    assert "copies of train/good images" in text
    caplog.clear()
    (pool / "a.png").unlink()
    (pool / "b.png").unlink()
    shutil.copy(test_image, pool / "c.png")
    (pool / "c.png").write_bytes((pool / "c.png").read_bytes() + b"\0")  # not the same bytes
    with caplog.at_level("WARNING", logger="mapl_ray.main"):
        check_inputs(cfg)
    assert "copies" not in caplog.text


def test_training_from_unlabeled_images_alone(small_root, tmp_path, caplog):
    import shutil

    from mapl_ray.main_job import run_train_job

    cat = tmp_path / "data" / "screw"
    shutil.copytree(small_root / "screw", cat)
    pool = tmp_path / "pool"
    shutil.move(str(cat / "train" / "good"), pool)  # train/good is gone: only unlabeled line images
    cfg = tiny_config(cat.parent, **{"data.unlabeled_dir": str(pool), "eval.validation_normals": 4})
    with caplog.at_level("WARNING"):
        metrics = run_train_job(cfg, tmp_path / "run", use_ray=False, progress=False)
    assert "no labeled normal images" in caplog.text and "presumed normals" in caplog.text
    info = json.loads((tmp_path / "run" / "data_info.json").read_text())
    assert info["train_normals"] == 0 and info["unlabeled"] == 14 - 4 and len(info["validation_normals"]) == 4
    state = json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())
    assert state["threshold"] is not None and metrics["overall"]["image_auroc"] is not None
    # with no labeled normal the patch bank is filled from the pool; the pool's labels are listed
    from mapl_ray.inference import Predictor

    assert Predictor(tmp_path / "run", device="cpu").model.patch_bank.filled
    with (tmp_path / "run" / "pool_labels.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 10 and {r["pseudo_label"] for r in rows} <= {"anomalous", "normal", "unknown"}


@needs_data
def test_a_pool_of_unreadable_images_skipped_whole_is_said_to_be_gone(small_root, tmp_path, caplog):
    from mapl_ray.data.train_data import load_train_data
    from mapl_ray.main_job import prepare_run

    pool = tmp_path / "pool"
    pool.mkdir()
    (pool / "empty.png").write_bytes(b"")
    (pool / "text.png").write_text("not an image")
    cfg = tiny_config(small_root, **{"data.unlabeled_dir": str(pool), "data.skip_bad_images": True})
    with caplog.at_level("WARNING"):
        data, _, info = load_train_data(cfg, prepare_run(cfg, tmp_path / "run"))
    assert data.pool_size == 0 and info["unlabeled"] == 0 and len(info["skipped_images"]) == 2
    assert "none of the 2 unlabeled images could be read" in caplog.text


def test_normal_gate_vetoes_pool_images_whose_farthest_patch_is_beyond_every_labeled_normals():
    labeled = np.array([[1.0, 0.5, 0.2], [2.0, 0.6, 0.3]])
    pool = np.array([[1.5, 9.0, 9.0], [2.5, 0.1, 0.1], [2.0, 0.1, 0.1]])
    veto, cut = normal_gate(labeled, pool)
    assert cut == 2.0 and veto.tolist() == [False, True, False]  # column 0 (the farthest patch) alone decides
    none, cut = normal_gate(np.zeros((0, 3)), pool)
    assert not none.any() and cut == float("inf")


@pytest.mark.parametrize("gate", [False, True])
def test_gated_pool_images_never_enter_the_normal_stream_whatever_the_occs_vote(monkeypatch, gate):
    rng = np.random.default_rng(0)
    normals = rng.integers(90, 110, (6, 32, 32, 3), dtype=np.uint8)
    pool = rng.integers(90, 110, (8, 32, 32, 3), dtype=np.uint8)
    pool[[2, 5], 8:16, 8:16] = 255  # a defect no other image has
    data = TrainData(normals=normals, memory_indices=np.arange(2), unlabeled=pool)

    all_normal = np.zeros(len(pool), np.int8)  # the OCCs take every pool image for normal
    lab, model = stub_labeler(
        monkeypatch, data, all_normal, **{"pseudo.features": "knn", "pseudo.normal_gate": gate, "pseudo.pool_size": 2}
    )
    stats = lab.fit(model, 50)
    labels = lab.history[50]
    if not gate:
        assert (labels == 0).all() and "gate_vetoed" not in stats
        return
    table = lab._knn[0].cpu().numpy()
    expected, cut = normal_gate(table[: len(normals)], table[len(normals) :])
    assert {2, 5} <= set(np.flatnonzero(expected).tolist())  # the defects' patches are beyond the labeled ones'
    assert expected.sum() < len(pool)  # ... while normal pool images pass
    assert np.array_equal(labels == -1, expected) and (labels[~expected] == 0).all()
    assert stats["gate_vetoed"] == int(expected.sum()) and stats["gate_cut"] == cut
    assert not set(np.flatnonzero(expected) + len(normals)) & set(normal_rows(data, labels).tolist())


@pytest.mark.parametrize(
    ("features", "snapshot"), [("map", True), ("map", False), ("knn", True)], ids=["map", "map_in_step", "knn"]
)
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_refit_features_are_those_of_the_model_at_the_refit_whatever_training_does_before_the_fit_ends(
    device, features, snapshot
):
    """start_fit returns before its features are on the host (on CUDA they run on a stream of their own beside
    the next steps); the steps that follow move the live weights in place, the features must not see it.
    ``map`` features read a snapshot of the weights, or with ``pseudo.feature_snapshot`` false the live model,
    their passes queued ahead of the next steps' work; ``knn`` features read the frozen encoder alone, which
    training never moves, so they read the live model and no snapshot is made."""
    data, _ = pool_data()
    dev = torch.device(device)
    cfg, model = tiny_model(
        dev,
        **{
            "model.memory_backend": "torch",
            "pseudo.features": features,
            "pseudo.pool_size": 4,
            "pseudo.num_occs": 1,
            "pseudo.feature_snapshot": snapshot,
        },
    )
    assert model.freeze_encoder and not any(p.requires_grad for p in model.encoder.parameters())
    model.train()
    snapshots = []

    def refit(move: bool) -> tuple[np.ndarray, np.ndarray]:
        lab = PseudoLabeler(cfg, BatchMaker(cfg, data, build_simulator(cfg)), dev, cuda_graphs=device == "cuda")
        saved = {k: v.clone() for k, v in model.state_dict().items()}
        lab.start_fit(model, 50)
        if move:  # what training steps move: the parameters with gradients
            with torch.no_grad():
                for p in model.parameters():
                    if p.requires_grad:
                        p.add_(torch.randn_like(p))
        lab.finish_fit()
        model.load_state_dict(saved)
        assert model.training  # the refit leaves the live model's mode alone
        snapshots.append(lab._snapshot.rebuilds)
        return lab.history[50], lab.pool_scores

    still, moved = refit(move=False), refit(move=True)
    assert np.array_equal(still[0], moved[0]) and np.array_equal(still[1], moved[1])
    assert snapshots == ([1, 1] if features == "map" and snapshot else [0, 0])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_refit_labels_are_the_same_with_the_live_model_as_with_its_snapshot(device):
    """pseudo.feature_snapshot false reads the live weights (no copy) instead of a snapshot of them: the same
    features, so the same pool labels and scores."""
    data, _ = pool_data()
    dev = torch.device(device)
    results = []
    for snapshot in (True, False):
        torch.manual_seed(0)  # the same weights and memory bank for both
        over = {"model.memory_backend": "torch", "pseudo.features": "map", "pseudo.pool_size": 4}
        cfg, model = tiny_model(dev, **over, **{"pseudo.feature_snapshot": snapshot})
        model.train()
        lab = PseudoLabeler(cfg, BatchMaker(cfg, data, build_simulator(cfg)), dev, cuda_graphs=device == "cuda")
        lab.fit(model, 50)
        assert model.training and lab.snapshot_rebuilds == int(snapshot)
        results.append((lab.history[50], lab.pool_scores))
    assert np.array_equal(results[0][0], results[1][0])
    np.testing.assert_allclose(results[0][1], results[1][1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_refit_features_are_the_same_whether_the_images_go_up_at_once_or_in_groups(monkeypatch, device):
    """A large pool goes to the device in bounded uploads (``_UPLOAD_IMAGES``); the features must not change."""
    data, _ = pool_data(pool_labels=(0,) * 11)
    dev = torch.device(device)
    cfg, model = tiny_model(dev, **{"model.memory_backend": "torch", "pseudo.feature_batch_size": 4})
    model.eval()
    images = np.random.default_rng(0).integers(0, 256, (11, 32, 32, 3), dtype=np.uint8)

    def features(group: int) -> np.ndarray:
        monkeypatch.setattr(labeler_module, "_UPLOAD_IMAGES", group)
        lab = PseudoLabeler(cfg, BatchMaker(cfg, data, build_simulator(cfg)), dev, cuda_graphs=device == "cuda")
        return lab.features(model, images)

    whole, grouped = features(1024), features(4)
    assert whole.shape[0] == 11 and np.isfinite(whole).all()
    np.testing.assert_allclose(grouped, whole, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_refit_is_the_same_with_the_source_images_gathered_on_the_device(device):
    """On CUDA a refit gathers the labeled normals and pool images from copies kept on the device for the run
    (``_resident_sources``) instead of copying them up each time; labels and scores must not change. On CPU the
    device copy is put in place by hand, so the gather path itself runs here too."""
    data, _ = pool_data()
    dev = torch.device(device)
    cfg, model = tiny_model(
        dev, **{"model.memory_backend": "torch", "pseudo.features": "map", "pseudo.pool_size": 4, "pseudo.num_occs": 1}
    )
    model.eval()

    def refit(resident: bool) -> tuple[PseudoLabeler, tuple[np.ndarray, np.ndarray]]:
        lab = PseudoLabeler(cfg, BatchMaker(cfg, data, build_simulator(cfg)), dev)
        if device == "cpu" and resident:
            lab._resident = torch.from_numpy(np.concatenate([data.normals, data.unlabeled]))
        elif device == "cuda" and not resident:
            lab._resident_sources = lambda: None
        lab.history[-1] = (np.arange(data.pool_size) % 2).astype(np.int8)  # normal rows: labeled, every other pool one
        lab.start_fit(model, 50)
        lab.finish_fit()
        return lab, (lab.history[50], lab.pool_scores)

    lab, on_device = refit(resident=True)
    assert lab._resident is not None and len(lab._resident) == len(data.normals) + data.pool_size
    _, on_host = refit(resident=False)
    assert np.array_equal(on_device[0], on_host[0])
    assert np.allclose(on_device[1], on_host[1], rtol=1e-5, atol=1e-6)
