"""Tests of mapl_ray.eval: metrics against hand-computed values, and the report files."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage

from mapl_ray.eval import (
    aupro,
    compute_metrics,
    f1_max,
    fit_normalisation,
    image_auroc,
    normalise_scores,
    pixel_auroc,
    pro_curve,
    threshold_from_normals,
    write_report,
)
from mapl_ray.model.anomaly_map import topk_mean

LABELS = np.array([0, 0, 1, 1])
SCORES = np.array([0.1, 0.4, 0.35, 0.8])


# --------------------------------------------------------------------------- #
# image level
# --------------------------------------------------------------------------- #
def test_image_auroc_hand_example():
    # (neg, pos) pairs ranked correctly: (0.1,0.35) (0.1,0.8) (0.4,0.8); wrong: (0.4,0.35) -> 3/4
    assert image_auroc(LABELS, SCORES) == pytest.approx(0.75)


def test_image_auroc_ties_count_half():
    assert image_auroc([0, 1], [0.5, 0.5]) == pytest.approx(0.5)


def test_f1_max_hand_example():
    # t=0.8: P=1 R=.5 F1=.667 | t=0.4: P=.5 R=.5 F1=.5 | t=0.35: P=2/3 R=1 F1=.8 | t=0.1: F1=.667
    f1, thr = f1_max(LABELS, SCORES)
    assert f1 == pytest.approx(0.8)
    assert thr == pytest.approx(0.35)


@pytest.mark.parametrize("fn", [image_auroc, f1_max])
def test_image_metric_errors(fn):
    with pytest.raises(ValueError, match="labels.*only"):
        fn([1, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="labels.*only"):
        fn([0, 0], [0.1, 0.2])
    with pytest.raises(ValueError, match="shape mismatch"):
        fn([0, 1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="scores.*NaN"):
        fn([0, 1], [0.1, np.nan])
    with pytest.raises(ValueError, match="labels.*0, 1"):
        fn([0, 2], [0.1, 0.2])


# --------------------------------------------------------------------------- #
# pixel AUROC
# --------------------------------------------------------------------------- #
def test_pixel_auroc_tiny_mask():
    masks = np.array([[[1, 0], [0, 0]], [[0, 0], [0, 1]]])
    maps = np.array([[[0.9, 0.2], [0.95, 0.1]], [[0.3, 0.0], [0.5, 0.4]]])
    # positives 0.9, 0.4 vs negatives 0.2 0.95 0.1 0.3 0.0 0.5:
    # 0.9 beats 5 of 6, 0.4 beats 4 of 6 -> 9/12
    assert pixel_auroc(masks, maps) == pytest.approx(0.75)


def test_pixel_auroc_errors():
    with pytest.raises(ValueError, match="shape mismatch"):
        pixel_auroc(np.zeros((1, 2, 2)), np.zeros((1, 2, 3)))
    with pytest.raises(ValueError, match="no defect pixel"):
        pixel_auroc(np.zeros((1, 2, 2)), np.zeros((1, 2, 2)))
    with pytest.raises(ValueError, match=r"masks.*\{0, 1\}"):
        pixel_auroc(np.full((1, 2, 2), 255), np.zeros((1, 2, 2)))
    with pytest.raises(ValueError, match="masks.*N, H, W"):
        pixel_auroc(np.zeros((2, 2)), np.zeros((2, 2)))
    bad = np.zeros((1, 2, 2))
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="maps.*NaN"):
        pixel_auroc(np.array([[[1, 0], [0, 0]]]), bad)


# --------------------------------------------------------------------------- #
# AUPRO
# --------------------------------------------------------------------------- #
def _brute_force_pro_curve(masks, maps):
    """PRO / FPR straight from the definition: loop over thresholds and regions."""
    regions = []
    for m, a in zip(masks, maps):
        lab, n = ndimage.label(m, structure=np.ones((3, 3)))
        regions += [a[lab == r] for r in range(1, n + 1)]
    normal = maps[masks == 0]
    fpr, pro = [], []
    for t in [np.inf] + sorted(np.unique(maps).tolist(), reverse=True):
        fpr.append(np.mean(normal >= t))
        pro.append(np.mean([np.mean(r >= t) for r in regions]))
    return np.array(fpr), np.array(pro)


def _blob_masks(rng, n=4, size=24):
    masks = np.zeros((n, size, size), dtype=np.uint8)
    for i in range(n):
        r, c = rng.integers(2, size - 8, 2)
        h, w = rng.integers(1, 7, 2)
        masks[i, r : r + h, c : c + w] = 1
    masks[0, 0, 0] = masks[0, 1, 1] = 1  # a diagonal pair: one region under 8-connectivity
    return masks


def test_pro_curve_exact_matches_definition():
    rng = np.random.default_rng(0)
    masks = _blob_masks(rng)
    maps = np.round(rng.random(masks.shape) + 0.6 * masks, 2)  # rounding creates ties
    fpr, pro, thr = pro_curve(masks, maps, num_thresholds=None)
    ref_fpr, ref_pro = _brute_force_pro_curve(masks, maps)
    np.testing.assert_allclose(fpr, ref_fpr, atol=1e-12)
    np.testing.assert_allclose(pro, ref_pro, atol=1e-12)
    assert fpr[0] == 0 and pro[0] == 0 and fpr[-1] == 1 and pro[-1] == pytest.approx(1)
    assert np.all(np.diff(thr) < 0)


def test_aupro_perfect_map_is_one():
    rng = np.random.default_rng(1)
    masks = _blob_masks(rng)
    maps = masks.astype(np.float32)
    assert aupro(masks, maps) == pytest.approx(1.0)
    assert aupro(masks, maps, num_thresholds=None) == pytest.approx(1.0)
    # any map putting all defect pixels above all normal ones is perfect too
    assert aupro(masks, rng.random(masks.shape) * 0.5 + masks) == pytest.approx(1.0)


def test_aupro_half_region_detected_is_half():
    rng = np.random.default_rng(2)
    masks = np.zeros((1, 16, 16), dtype=np.uint8)
    masks[0, 4:8, 4:12] = 1
    maps = rng.uniform(0.0, 0.9, masks.shape)  # normal pixels
    maps[0, 4:8, 4:8] = 1.0  # left half of the region: above every normal pixel
    maps[0, 4:8, 8:12] = -1.0  # right half: below every normal pixel
    # PRO = 0.5 for every FPR in [0, 1) -> normalised area 0.5
    assert aupro(masks, maps) == pytest.approx(0.5, abs=1e-9)
    assert aupro(masks, maps, num_thresholds=None) == pytest.approx(0.5, abs=1e-9)


def test_aupro_interpolates_at_fpr_limit():
    masks = np.zeros((1, 4, 4), dtype=np.uint8)
    masks[0, 0, :2] = 1
    maps = np.zeros((1, 4, 4))
    maps[0, 0, 0] = 1.0  # half the region above all normals; the other half ties with them
    # curve (0, .5) -> (1, 1): PRO(0.3) = 0.65, area = 0.3 * (0.5 + 0.65) / 2 = 0.1725, / 0.3
    assert aupro(masks, maps, fpr_limit=0.3) == pytest.approx(0.575)
    assert aupro(masks, maps, fpr_limit=1.0) == pytest.approx(0.75)


def test_aupro_regions_weighted_equally_not_by_pixels():
    # Same position in two images (must not merge across images), different sizes:
    # a 2x2 region fully detected, a 4x4 region missed.
    rng = np.random.default_rng(3)
    masks = np.zeros((2, 12, 12), dtype=np.uint8)
    masks[0, 2:4, 2:4] = 1
    masks[1, 2:6, 2:6] = 1
    maps = rng.uniform(0.0, 0.9, masks.shape)
    maps[0][masks[0] == 1] = 1.0
    maps[1][masks[1] == 1] = -1.0
    value = aupro(masks, maps)
    assert value == pytest.approx(0.5, abs=1e-9)  # per-region mean of 1 and 0
    assert abs(value - 4 / 20) > 0.25  # the pixel-weighted overlap would be 0.2


def test_aupro_uses_8_connectivity():
    masks = np.zeros((1, 10, 10), dtype=np.uint8)
    masks[0, 0, 0] = masks[0, 1, 1] = 1  # diagonal neighbours: one region
    masks[0, 7, 7] = 1  # a second region
    maps = np.linspace(0.1, 0.5, 100).reshape(1, 10, 10)
    maps[0, 0, 0] = maps[0, 7, 7] = 1.0
    maps[0, 1, 1] = -1.0
    # 8-conn: regions {.5, 1} -> PRO 0.75; 4-conn would give 3 regions -> 2/3
    assert aupro(masks, maps) == pytest.approx(0.75, abs=1e-9)


def test_aupro_random_map_is_low():
    rng = np.random.default_rng(4)
    masks = _blob_masks(rng, n=8, size=32)
    value = aupro(masks, rng.random(masks.shape))
    assert 0.08 < value < 0.22  # PRO ~= FPR -> about fpr_limit / 2 = 0.15


def test_aupro_binned_close_to_exact():
    rng = np.random.default_rng(5)
    masks = _blob_masks(rng, n=6, size=32)
    maps = rng.gamma(2.0, 1.0, masks.shape) + 2.0 * masks * rng.random(masks.shape)
    exact = aupro(masks, maps, num_thresholds=None)
    for t in (20, 200):
        assert abs(aupro(masks, maps, num_thresholds=t) - exact) <= 1 / (2 * (t - 1)) + 1e-9
    assert 0.2 < exact < 1.0


def test_aupro_errors():
    with pytest.raises(ValueError, match="defect region"):
        aupro(np.zeros((2, 4, 4)), np.zeros((2, 4, 4)))
    masks = np.zeros((1, 4, 4))
    masks[0, 1, 1] = 1
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro(masks, np.zeros((1, 4, 4)), fpr_limit=0.0)
    with pytest.raises(ValueError, match="num_thresholds"):
        aupro(masks, np.zeros((1, 4, 4)), num_thresholds=1)
    with pytest.raises(ValueError, match="shape mismatch"):
        aupro(masks, np.zeros((1, 4, 5)))


# --------------------------------------------------------------------------- #
# top-k
# --------------------------------------------------------------------------- #
def test_topk_mean_numpy_and_torch_agree():
    torch = pytest.importorskip("torch")
    maps = np.arange(32, dtype=np.float32).reshape(2, 4, 4)
    maps[1] = maps[1][::-1]
    out = topk_mean(maps, 3)
    assert isinstance(out, np.ndarray) and out.shape == (2,)
    np.testing.assert_allclose(out, [14.0, 30.0])  # mean(15, 14, 13), mean(31, 30, 29)
    rng = np.random.default_rng(6)
    rand = rng.random((5, 8, 8)).astype(np.float32)
    t_out = topk_mean(torch.from_numpy(rand), 10)
    assert isinstance(t_out, torch.Tensor) and t_out.shape == (5,)
    np.testing.assert_allclose(t_out.numpy(), topk_mean(rand, 10), rtol=1e-6)
    # k larger than H*W is clipped: the plain mean
    np.testing.assert_allclose(topk_mean(rand, 10_000), rand.reshape(5, -1).mean(1), rtol=1e-6)
    with pytest.raises(ValueError, match="k"):
        topk_mean(rand, 0)
    with pytest.raises(ValueError, match="maps"):
        topk_mean(rand[0], 3)


# --------------------------------------------------------------------------- #
# compute_metrics
# --------------------------------------------------------------------------- #
def test_compute_metrics_per_defect_uses_good_plus_type():
    labels = [0, 0, 0, 1, 1, 1, 1]
    scores = [0.1, 0.2, 0.3, 0.9, 0.8, 0.15, 0.25]
    types = ["good", "good", "good", "crack", "crack", "scratch", "scratch"]
    out = compute_metrics(labels, scores, types)
    # crack vs good: 6/6; scratch vs good: 0.15 > {0.1}, 0.25 > {0.1, 0.2} -> 3/6
    assert out["per_defect"]["crack"]["image_auroc"] == pytest.approx(1.0)
    assert out["per_defect"]["scratch"]["image_auroc"] == pytest.approx(0.5)
    assert out["overall"]["image_auroc"] == pytest.approx(9 / 12)
    assert out["per_defect"]["scratch"]["n_good"] == 3
    assert out["per_defect"]["scratch"]["n_anomalous"] == 2
    assert out["overall"]["n_anomalous"] == 4
    assert out["overall"]["pixel_auroc"] is None and out["notes"]
    assert sorted(out["per_defect"]) == ["crack", "scratch"]
    json.dumps(out, allow_nan=False)  # plain Python values only


def _toy_pixel_set(rng):
    n, size = 6, 16
    labels = np.array([0, 0, 1, 1, 1, 1])
    types = ["good", "good", "crack", "crack", "hole", "hole"]
    masks = np.zeros((n, size, size), dtype=np.uint8)
    masks[2, 2:6, 2:6] = masks[3, 8:12, 3:9] = masks[4, 5:9, 5:9] = masks[5, 1:4, 10:14] = 1
    maps = rng.random((n, size, size)) + 0.8 * masks
    scores = maps.reshape(n, -1).max(1)
    return labels, scores, types, masks, maps


def test_compute_metrics_pixel_and_missing_masks():
    rng = np.random.default_rng(7)
    labels, scores, types, masks, maps = _toy_pixel_set(rng)
    full = compute_metrics(labels, scores, types, masks, maps)
    hole = np.array([0, 1, 4, 5])
    assert full["per_defect"]["hole"]["pixel_auroc"] == pytest.approx(pixel_auroc(masks[hole], maps[hole]))
    assert full["per_defect"]["hole"]["aupro"] == pytest.approx(aupro(masks[hole], maps[hole]))
    assert full["overall"]["aupro"] == pytest.approx(aupro(masks, maps))
    assert full["overall"]["n_pixel_images"] == 6

    # image 5 has no mask (image-level label only): out of pixel metrics, noted
    partial = [None, None, masks[2], masks[3], masks[4], None]
    out = compute_metrics(labels, scores, types, partial, maps)
    keep = np.array([0, 1, 2, 3, 4])
    assert out["overall"]["pixel_auroc"] == pytest.approx(pixel_auroc(masks[keep], maps[keep]))
    assert out["overall"]["n_pixel_images"] == 5
    assert out["overall"]["image_auroc"] == full["overall"]["image_auroc"]
    assert any("1 anomalous image" in note for note in out["notes"])

    with pytest.raises(ValueError, match="maps"):
        compute_metrics(labels, scores, types, masks, maps[:3])
    with pytest.raises(ValueError, match="defect_types"):
        compute_metrics(labels, scores, types[:3])
    with pytest.raises(ValueError, match="labels.*only"):
        compute_metrics([0, 0], [0.1, 0.2], ["good", "good"])


# --------------------------------------------------------------------------- #
# normalisation and thresholds
# --------------------------------------------------------------------------- #
def test_normalisation_and_threshold():
    z = fit_normalisation([1.0, 2.0, 3.0])
    assert z["method"] == "zscore" and z["mean"] == pytest.approx(2.0)
    assert z["std"] == pytest.approx(np.sqrt(2 / 3))
    np.testing.assert_allclose(normalise_scores([2.0, 2.0 + np.sqrt(2 / 3)], z), [0.0, 1.0])
    mm = fit_normalisation([1.0, 3.0, 2.0], method="minmax")
    np.testing.assert_allclose(normalise_scores(np.array([1.0, 2.0, 5.0]), mm), [0.0, 0.5, 2.0])
    json.dumps(mm)
    assert threshold_from_normals(np.arange(101.0), 0.99) == pytest.approx(99.0)
    with pytest.raises(ValueError, match="normal_scores"):
        fit_normalisation([2.0, 2.0])
    with pytest.raises(ValueError, match="method"):
        fit_normalisation([1.0, 2.0], method="robust")
    with pytest.raises(ValueError, match="quantile"):
        threshold_from_normals([1.0, 2.0], quantile=1.5)
    with pytest.raises(ValueError, match="stats"):
        normalise_scores([1.0], {"method": "zscore"})


# --------------------------------------------------------------------------- #
# report
# --------------------------------------------------------------------------- #
def test_write_report(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(8)
    labels, scores, types, masks, maps = _toy_pixel_set(rng)
    metrics = compute_metrics(labels, scores, types, masks, maps)
    info = {
        "category": "bottle",
        "config": {"backbone": "resnet18", "epochs": np.int64(3)},
        "split": {"train": 20, "test": 6},
        "train_time_s": 12.5,
        "validation": "labeled normal val split",
        "skipped_images": 0,
    }
    sample = [
        {
            "image": (rng.random((16, 16, 3)) * 255).astype(np.uint8),
            "map": maps[i],
            "mask": masks[i],
            "path": f"/data/bottle/test/{types[i]}/{i:03d}.png",
            "score": float(scores[i]),
            "label": int(labels[i]),
        }
        for i in (0, 2, 4)
    ]
    report = write_report(tmp_path / "run", metrics, info, labels=labels, scores=scores, threshold=1.2, sample=sample)
    run = tmp_path / "run"
    loaded = json.loads((run / "metrics.json").read_text())
    assert loaded["overall"] == pytest.approx(metrics["overall"])
    assert loaded["per_defect"].keys() == metrics["per_defect"].keys()
    assert loaded["run"]["config"]["epochs"] == 3 and loaded["run"]["category"] == "bottle"

    text = report.read_text()
    assert f"{100 * metrics['overall']['image_auroc']:.1f}" in text
    assert f"{100 * metrics['per_defect']['hole']['aupro']:.1f}" in text
    assert "| config | backbone resnet18, epochs 3 |" in text  # a nested dict in one cell
    pngs = [
        "plots/roc.png",
        "plots/score_histogram.png",
        "heatmaps/good_000.png",
        "heatmaps/crack_002.png",
        "heatmaps/hole_004.png",
    ]
    for rel in pngs:
        assert rel in text
        with Image.open(run / rel) as im:
            im.verify()
            assert im.format == "PNG"


def test_pixel_auroc_matches_sklearn_with_ties():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(9)
    for frac in (0.05, 0.7):  # both branches: fewer and more positives than negatives
        masks = (rng.random((3, 20, 20)) < frac).astype(np.uint8)
        maps = np.round(rng.random(masks.shape) + 0.3 * masks, 1)  # many ties
        assert pixel_auroc(masks, maps) == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-12)
