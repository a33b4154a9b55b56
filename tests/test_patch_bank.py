"""The patch bank: greedy coreset, nearest-normal-patch maps, checkpoint round trip, the fused map and its
weight chosen on validation, and a trained run scoring with what calibration chose."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mapl_ray.eval.validation import choose_knn_fusion, objective
from mapl_ray.inference import Predictor
from mapl_ray.model.anomaly_map import fuse_maps, topk_mean
from mapl_ray.model.patch_bank import POOL_PATCH_QUANTILE, PatchBank, gaussian_blur, greedy_coreset, trusted_patch_mask
from mapl_ray.pseudo.patch_knn import patch_embeddings


def _levels(rng: np.random.Generator, b: int) -> list[torch.Tensor]:
    """Encoder-like maps at strides 2, 4, 8, 16 of 64 px images (channels 3, 4, 5, 6)."""
    shapes = [(3, 32, 32), (4, 16, 16), (5, 8, 8), (6, 4, 4)]
    return [torch.from_numpy(rng.standard_normal((b, *s)).astype(np.float32)) for s in shapes]


def test_coreset_keeps_rare_patches_that_random_choice_drops():
    g = torch.Generator().manual_seed(0)
    common = torch.randn(2000, 16, generator=g) * 0.1
    rare = torch.randn(5, 16, generator=g) * 0.1 + 10.0 * torch.eye(16)[:5]  # five far-off patches
    patches = torch.cat([common, rare])
    chosen = set(greedy_coreset(patches, 20, torch.Generator().manual_seed(1)).tolist())
    assert set(range(2000, 2005)) <= chosen  # each rare patch is the farthest from the rest at some step
    assert len(chosen) == 20
    assert greedy_coreset(patches[:7], 20, g).tolist() == list(range(7))  # fewer rows than asked: all
    with pytest.raises(ValueError, match="size >= 1"):
        greedy_coreset(patches, 0, g)


def test_distance_map_is_zero_on_bank_images_and_high_on_a_foreign_patch():
    rng = np.random.default_rng(0)
    levels = _levels(rng, 3)
    bank = PatchBank()
    assert not bank.filled
    with pytest.raises(RuntimeError, match="empty"):
        bank.distance_maps(levels, (64, 64))
    bank.fill(patch_embeddings(levels), size=10_000, generator=torch.Generator().manual_seed(0))
    assert bank.patches.shape == (3 * 64, 5 + 6)  # every patch of 3 images (fewer than asked)
    same = bank.distance_maps([f[:1] for f in levels], (64, 64))
    assert same.shape == (1, 64, 64) and float(same.abs().max()) < 1e-3
    odd = [f[:1].clone() for f in levels]
    odd[2][..., 2:4, 2:4] += 8.0  # one region unlike any normal patch
    amap = bank.distance_maps(odd, (64, 64))[0]
    assert float(amap[16:32, 16:32].mean()) > 10 * float(amap[48:, 48:].mean()) + 0.1


def test_gaussian_blur_keeps_mass_and_spreads_a_peak():
    x = torch.zeros(1, 41, 41)
    x[0, 20, 20] = 1.0
    y = gaussian_blur(x, sigma=2.0)
    assert abs(float(y.sum()) - 1.0) < 1e-4
    assert float(y[0, 20, 20]) < 0.1 and float(y[0, 20, 22]) > 0.01


def test_bank_round_trips_through_a_state_dict_and_old_checkpoints_load_empty():
    rng = np.random.default_rng(1)
    bank = PatchBank()
    bank.fill(patch_embeddings(_levels(rng, 2)), size=50, generator=torch.Generator().manual_seed(0))
    fresh = PatchBank()
    fresh.load_state_dict(bank.state_dict(), strict=True)
    assert torch.equal(fresh.patches, bank.patches)
    old = PatchBank()
    old.load_state_dict({}, strict=True)  # a checkpoint written before the patch bank
    assert not old.filled


def test_fuse_maps_brings_the_patch_map_into_the_decoder_maps_units_and_weight_zero_is_the_decoder_map():
    maps = np.random.default_rng(2).random((4, 8, 8))
    knn = maps * 10.0
    assert fuse_maps(maps, None, None) is maps
    assert fuse_maps(maps, None, {"weight": 0.0, "map_scale": 2.0, "knn_scale": 3.0}) is maps
    fused = fuse_maps(maps, knn, {"weight": 0.5, "map_scale": 2.0, "knn_scale": 30.0})
    np.testing.assert_allclose(fused, 0.5 * maps + 0.5 * (2.0 / 30.0) * 10.0 * maps)  # knn in the map's units
    with pytest.raises(ValueError, match="patch bank"):
        fuse_maps(maps, None, {"weight": 0.5, "map_scale": 1.0, "knn_scale": 1.0})


def test_fusion_weight_is_chosen_by_validation_objective():
    rng = np.random.default_rng(3)
    labels = np.array([0] * 6 + [1] * 6)
    masks = np.zeros((12, 8, 8), np.uint8)
    masks[6:, 2:4, 2:4] = 1
    decoder = rng.random((12, 8, 8))  # no signal
    knn = rng.random((12, 8, 8))
    knn[6:, 2:4, 2:4] += 3.0  # the patch bank sees the anomalies
    fusion, by_w = choose_knn_fusion(labels, masks, decoder, knn, 4, None, (0.0, 0.5, 1.0))
    best = f"{fusion['weight']:g}"
    assert fusion["weight"] > 0 and by_w["image_auroc"][best] == 1.0 and by_w["image_auroc"]["0"] < 1.0
    assert by_w["objective"][best] == max(by_w["objective"].values())
    assert by_w["objective"]["0"] == pytest.approx((by_w["image_auroc"]["0"] + by_w["pixel_auroc"]["0"]) / 2)
    assert fusion["knn_scale"] == pytest.approx(float(np.mean(topk_mean(knn[:6], 4))))
    # the decoder separates and the patch map is noise: the decoder alone (ties go to the smallest weight)
    fusion, _ = choose_knn_fusion(labels, masks, knn, decoder, 4, None, (0.0, 0.5))
    assert fusion["weight"] == 0.0
    fixed, _ = choose_knn_fusion(labels, masks, decoder, knn, 4, 0.25, (0.0, 0.5))
    assert fixed["weight"] == 0.25  # eval.knn_weight set: kept


def test_fusion_weight_prefers_the_map_that_localises_when_both_separate_the_images():
    rng = np.random.default_rng(5)
    labels = np.array([0] * 6 + [1] * 6)
    masks = np.zeros((12, 8, 8), np.uint8)
    masks[6:, 2:4, 2:4] = 1
    decoder, knn = rng.random((12, 8, 8)), rng.random((12, 8, 8))
    decoder[6:, 5:7, 5:7] += 3.0  # separates the images, in the wrong place
    knn[6:, 2:4, 2:4] += 3.0  # separates them where the defects are
    fusion, by_w = choose_knn_fusion(labels, masks, decoder, knn, 4, None, (0.0, 1.0))
    assert by_w["image_auroc"] == {"0": 1.0, "1": 1.0}  # image AUROC alone would keep the decoder (w = 0)
    assert by_w["pixel_auroc"]["1"] > by_w["pixel_auroc"]["0"] and fusion["weight"] == 1.0


def test_objective_is_the_mean_of_image_and_pixel_auroc_or_image_alone_without_defect_pixels():
    assert objective(0.9, 0.7) == pytest.approx(0.8)
    assert objective(0.9, None) == 0.9


def test_trained_run_scores_with_the_fusion_calibration_chose(trained_run):
    state = json.loads((trained_run / "checkpoint" / "state.json").read_text())
    fusion = state["knn_fusion"]
    assert set(fusion) == {"weight", "map_scale", "knn_scale"}
    by_w = state["validation"]["objective_by_knn_weight"]
    assert set(by_w) == {"0", "0.25", "0.5", "0.75"}  # eval.knn_weight_grid
    assert by_w[f"{fusion['weight']:g}"] == max(by_w.values())  # the best on validation
    assert min(w for w, a in ((float(k), v) for k, v in by_w.items()) if a == max(by_w.values())) == fusion["weight"]
    images = np.random.default_rng(4).integers(0, 255, (3, 64, 64, 3), dtype=np.uint8)
    parts = Predictor(trained_run, device="cpu", parts=True)
    assert parts.model.patch_bank.filled
    raw = parts.predict_arrays(images)
    pred = Predictor(trained_run, device="cpu")
    out = pred.predict_arrays(images)
    # the served map is the fusion of the two maps with the calibrated weights, the score its top-k mean
    want = fuse_maps(raw["maps"], raw["knn_maps"], pred.fusion) if pred.fusion else raw["maps"]
    np.testing.assert_allclose(out["maps"], want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        out["scores"], topk_mean(want, pred.cfg.eval.top_k) + pred.q_weight * out["q"], rtol=1e-5, atol=1e-6
    )
    # whatever this run chose, a weight > 0 scores the fused map
    pred.state = {**pred.state, "knn_fusion": {**fusion, "weight": 0.5}}
    fused = pred.predict_arrays(images)
    want = fuse_maps(raw["maps"], raw["knn_maps"], pred.state["knn_fusion"])
    np.testing.assert_allclose(fused["maps"], want, rtol=1e-5, atol=1e-6)
    assert not np.allclose(fused["maps"], raw["maps"])


def test_a_run_keeps_a_coreset_of_the_size_asked_and_none_when_turned_off(small_root, tmp_path):
    from conftest import tiny_config

    from mapl_ray.main_job import run_train_job

    cfg = tiny_config(small_root, **{"model.knn_patches": 8, "model.knn_images": 3, "train.steps": 2})
    run_train_job(cfg, tmp_path / "small", use_ray=False, progress=False)
    assert Predictor(tmp_path / "small", device="cpu").model.patch_bank.patches.shape[0] == 8
    run_train_job(cfg.override({"model.knn_patches": 0}), tmp_path / "off", use_ray=False, progress=False)
    off = Predictor(tmp_path / "off", device="cpu")
    state = json.loads((tmp_path / "off" / "checkpoint" / "state.json").read_text())
    assert not off.model.patch_bank.filled and off.fusion is None and "knn_fusion" not in state["validation"]


def test_pool_patches_unlike_every_other_image_are_kept_out_and_labeled_ones_stay():
    g = torch.Generator().manual_seed(0)
    per, images = 50, 12  # images 0-3 labeled, 4-11 from the pool; image 9 carries a defect
    normal = torch.randn(images * per, 8, generator=g) * 0.2
    owner = torch.arange(images).repeat_interleave(per)
    trusted = owner < 4
    defect = (owner == 9) & (torch.arange(images * per) % per < 5)
    odd = (owner == 2) & (torch.arange(images * per) % per == 0)  # a labeled normal's rare patch
    patches = normal + 6.0 * defect[:, None].float() + 2.0 * odd[:, None].float()
    keep, cut = trusted_patch_mask(patches, owner, trusted, 10_000, torch.Generator().manual_seed(1))
    assert not keep[defect].any()  # every defect patch is out
    assert keep[trusted].all()  # labeled normals are trusted, the rare patch included
    assert float(keep[~trusted & ~defect].float().mean()) > 0.95  # the pool's normal patches stay
    assert 1.0 < cut < 6.0  # the rare labeled patch sets the cut
    # no labeled patch: the pool's own quantile is the cut
    keep, cut = trusted_patch_mask(patches, owner, torch.zeros_like(trusted), 10_000, torch.Generator().manual_seed(1))
    assert not keep[defect].any() and float(keep.float().mean()) == pytest.approx(POOL_PATCH_QUANTILE, abs=0.01)
    everything, cut = trusted_patch_mask(patches, owner, torch.ones_like(trusted), 10, g)
    assert everything.all() and cut == float("inf")
    with pytest.raises(ValueError, match="owner and trusted"):
        trusted_patch_mask(patches, owner[:-1], trusted, 10, g)


def test_a_stream_bank_holds_pool_images_labeled_first_and_never_a_canary(small_root, tmp_path):
    from conftest import tiny_config

    from mapl_ray.data.train_data import load_train_data
    from mapl_ray.engine.loop import Trainer
    from mapl_ray.main_job import prepare_run

    over = {
        "data.labeled_normals": 4,
        "data.pool_anomaly_share": 0.2,
        "eval.validation_canaries": 0.25,
        "pseudo.enabled": False,  # the pool is normal data: every pool image is in the normal stream
        "model.knn_source": "stream",
        "model.knn_images": 9,
        "model.knn_patches": 64,
    }
    cfg = tiny_config(small_root, **over)
    data, _, _ = load_train_data(cfg, prepare_run(cfg, tmp_path / "run"))
    n = len(data.normals)
    trainer = Trainer(cfg, data, tmp_path / "run")
    rows, labeled = trainer.patch_bank_rows()
    assert labeled == n and list(rows[:n]) == list(range(n)) and len(rows) == 9
    assert not data.pool_canaries[rows[n:] - n].any()
    only_labeled = Trainer(cfg.override({"model.knn_source": "labeled"}), data, tmp_path / "run")
    assert list(only_labeled.patch_bank_rows()[0]) == list(range(n))
    odd = rows[n] - n  # one pool image made unlike every other: its patches are kept out of the bank
    data.unlabeled[odd] = np.random.default_rng(5).integers(0, 255, data.unlabeled[odd].shape, dtype=np.uint8)
    info = trainer.fill_patch_bank(trainer.model)
    assert info["images"] == 9 and info["labeled_images"] == n and info["pool_patches"] > 0
    assert 0 < info["pool_patches_dropped"] < info["pool_patches"] and trainer.model.patch_bank.patches.shape[0] == 64
