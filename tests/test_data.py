"""Tests of mapl_ray.data: layout scanning, image I/O, splits, anomaly simulation.

Synthetic data sets are tiny MVTec-layout folders written with Pillow under ``tmp_path``; one
test scans the real MVTec AD ``screw`` copy (``$MAPL_DATA`` or ``<repo>/../shared/data``).
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mapl_ray.data import (
    FOREGROUND_PRESETS,
    IMAGE_EXTENSIONS,
    AnomalySimulator,
    ForegroundConfig,
    ImageReadError,
    ImageRecord,
    LayoutError,
    Split,
    foreground_mask,
    image_size,
    load_image,
    load_mask,
    load_records,
    make_split,
    perlin_noise_2d,
    scan_category,
    scan_folder,
)

DATA_ROOT = Path(os.environ.get("MAPL_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


# ---------------------------------------------------------------------------------------------
# helpers / fixtures
# ---------------------------------------------------------------------------------------------
def _save(path: Path, arr: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode=mode).save(path)
    return path


def _rgb(seed: int, h: int = 24, w: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _mask(h: int = 24, w: int = 32, box=(4, 10, 6, 14)) -> np.ndarray:
    m = np.zeros((h, w), dtype=np.uint8)
    m[box[0] : box[1], box[2] : box[3]] = 255
    return m


def _build_category(
    root: Path, name: str = "widget", n_train: int = 6, n_test_good: int = 3, defects: dict[str, int] | None = None
) -> Path:
    """MVTec-layout category with RGB 24x32 images, masks for every defect image, plus noise
    files that must be ignored (hidden files, a .txt)."""
    defects = {"crack": 4, "dent": 3} if defects is None else defects
    cat = root / name
    seed = 0
    for i in range(n_train):
        _save(cat / "train" / "good" / f"{i:03d}.png", _rgb(seed := seed + 1))
    for i in range(n_test_good):
        _save(cat / "test" / "good" / f"{i:03d}.png", _rgb(seed := seed + 1))
    for dtype, n in defects.items():
        for i in range(n):
            _save(cat / "test" / dtype / f"{i:03d}.png", _rgb(seed := seed + 1))
            _save(cat / "ground_truth" / dtype / f"{i:03d}_mask.png", _mask())
    (cat / "train" / "good" / "notes.txt").write_text("not an image")
    _save(cat / "train" / "good" / "._000.png", _rgb(99))  # macOS resource-fork style hidden file
    (cat / "test" / ".ipynb_checkpoints").mkdir()
    _save(cat / "test" / ".ipynb_checkpoints" / "x.png", _rgb(98))
    return cat


@pytest.fixture
def mvtec(tmp_path: Path) -> Path:
    """Root holding category ``widget``: 6 train/good, 3 test/good, crack x4 + dent x3 (24x32 RGB)."""
    _build_category(tmp_path)
    return tmp_path


def _texture_dir(root: Path, n: int = 3) -> Path:
    d = root / "textures"
    for i in range(n):
        _save(d / f"class{i % 2}" / f"t{i}.jpg", _rgb(100 + i, 20, 20))
    return d


# ---------------------------------------------------------------------------------------------
# layout
# ---------------------------------------------------------------------------------------------
def test_image_extensions_cover_pillow_formats():
    assert {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"} <= set(IMAGE_EXTENSIONS)


def test_scan_category_indexes_sorted_labeled_records(mvtec: Path):
    idx = scan_category(mvtec, "widget")
    assert idx.root == str(mvtec.resolve()) or os.path.samefile(idx.root, mvtec)
    assert len(idx.train_good) == 6  # notes.txt and ._000.png ignored
    assert [Path(r.path).name for r in idx.train_good] == [f"{i:03d}.png" for i in range(6)]
    assert all(r.label == 0 and r.defect_type == "good" and r.mask_path is None for r in idx.train_good)
    assert len(idx.test) == 3 + 4 + 3  # hidden .ipynb_checkpoints ignored
    assert [r.path for r in idx.test] == sorted(r.path for r in idx.test)
    assert idx.defect_types == ["crack", "dent"]
    for r in idx.test:
        if r.defect_type == "good":
            assert r.label == 0 and r.mask_path is None
        else:
            assert r.label == 1
            assert r.mask_path == str(
                mvtec / "widget" / "ground_truth" / r.defect_type / (Path(r.path).stem + "_mask.png")
            )
    assert scan_category(mvtec, "widget") == idx  # deterministic


def test_scan_category_missing_pieces_raise_layout_error(tmp_path: Path):
    with pytest.raises(LayoutError, match="category folder .*nope"):
        scan_category(tmp_path, "nope")
    cat = tmp_path / "widget"
    (cat / "test" / "good").mkdir(parents=True)
    with pytest.raises(LayoutError, match=r"train.good.* is missing"):
        scan_category(tmp_path, "widget")
    (cat / "train" / "good").mkdir(parents=True)
    (cat / "train" / "good" / "readme.txt").write_text("x")
    with pytest.raises(LayoutError, match="contains no image files"):
        scan_category(tmp_path, "widget")
    _save(cat / "train" / "good" / "000.png", _rgb(1))
    (cat / "test" / "good").rmdir()
    (cat / "test").rmdir()
    with pytest.raises(LayoutError, match=r"test' is missing"):
        scan_category(tmp_path, "widget")
    # a mistyped category names the categories that exist
    with pytest.raises(LayoutError, match=r"widgte.*categories under .*: widget$"):
        scan_category(tmp_path, "widgte")
    # --data given the category folder itself: say to pass its parent
    with pytest.raises(LayoutError, match=r"widget' looks like a category folder: pass its parent as --data"):
        scan_category(cat, "widget")
    # ... and a folder of it as the category
    with pytest.raises(LayoutError, match=r"widget' looks like a category folder: .* and 'widget' as --category"):
        scan_category(cat, "train")


def test_defect_image_without_mask_is_a_layout_error(mvtec: Path):
    orphan = _save(mvtec / "widget" / "test" / "crack" / "007.png", _rgb(7))
    with pytest.raises(LayoutError) as ei:
        scan_category(mvtec, "widget")
    msg = str(ei.value)
    assert str(orphan) in msg and "007_mask.png" in msg
    idx = scan_category(mvtec, "widget", require_masks=False)
    rec = next(r for r in idx.test if r.path == str(orphan))
    assert rec.label == 1 and rec.mask_path is None


def test_mask_with_other_image_extension_is_found(mvtec: Path):
    gt = mvtec / "widget" / "ground_truth" / "dent"
    (gt / "000_mask.png").unlink()
    _save(gt / "000_mask.bmp", _mask())
    idx = scan_category(mvtec, "widget")
    rec = next(r for r in idx.test if r.defect_type == "dent" and Path(r.path).stem == "000")
    assert rec.mask_path == str(gt / "000_mask.bmp")


def test_scan_folder_recursive_hidden_skipped_and_errors(tmp_path: Path, caplog):
    d = tmp_path / "pool"
    _save(d / "b.png", _rgb(1))
    _save(d / "sub" / "a.JPG", _rgb(2))
    _save(d / ".hidden" / "c.png", _rgb(3))
    (d / "x.txt").write_text("x")
    with caplog.at_level("WARNING", logger="mapl_ray.data"):
        recs = scan_folder(d)
    assert [Path(r.path).relative_to(d).as_posix() for r in recs] == ["b.png", "sub/a.JPG"]
    # the left-out file is said, the hidden folder's image is not
    assert [m for m in caplog.messages if "not read" in m] == [
        f"1 file under {d} not read: no image extension (e.g. x.txt; expected one of "
        + " ".join(sorted(IMAGE_EXTENSIONS))
        + ")"
    ]
    assert all(r.label == -1 and r.defect_type == "unknown" and r.mask_path is None for r in recs)
    with pytest.raises(LayoutError, match="does not exist"):
        scan_folder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LayoutError, match="contains no image files"):
        scan_folder(tmp_path / "empty")


def test_image_record_roundtrip_and_validation():
    r = ImageRecord("/a/b.png", 1, "crack", "/a/b_mask.png")
    assert ImageRecord.from_dict(json.loads(json.dumps(r.to_dict()))) == r
    with pytest.raises(ValueError, match="label"):
        ImageRecord("/a.png", 2, "good")
    with pytest.raises(ValueError, match="label"):
        ImageRecord("/a.png", True, "good")
    with pytest.raises(ValueError, match="missing field"):
        ImageRecord.from_dict({"path": "/a.png", "label": 0})


# ---------------------------------------------------------------------------------------------
# io
# ---------------------------------------------------------------------------------------------
def test_load_image_converts_modes_to_rgb(tmp_path: Path):
    grey = np.arange(24 * 32, dtype=np.uint32).reshape(24, 32).astype(np.uint8)
    g = load_image(_save(tmp_path / "g.png", grey, "L"), None)
    assert g.shape == (24, 32, 3) and g.dtype == np.uint8
    assert (g == grey[..., None]).all()

    rgba = np.dstack([_rgb(1), np.full((24, 32), 7, np.uint8)])
    a = load_image(_save(tmp_path / "a.png", rgba, "RGBA"))
    assert a.shape == (24, 32, 3) and (a == rgba[..., :3]).all()  # alpha dropped, colours kept

    pal = Image.fromarray(_rgb(2)).quantize(8)
    pal.save(tmp_path / "p.png")
    p = load_image(tmp_path / "p.png")
    assert p.shape == (24, 32, 3)
    assert (p == np.asarray(pal.convert("RGB"))).all()

    # 16-bit grey: full range rescaled (65535 -> 255), not clipped as Pillow's convert would.
    g16 = np.full((24, 32), 257 * 100, dtype=np.uint16)
    g16[0, 0] = 65535
    Image.fromarray(g16).save(tmp_path / "g16.png")
    h = load_image(tmp_path / "g16.png")
    assert h[0, 0].tolist() == [255, 255, 255] and h[5, 5].tolist() == [100, 100, 100]


def test_load_image_resizes_with_hw_order(tmp_path: Path):
    p = _save(tmp_path / "x.png", _rgb(3, 24, 32))
    assert load_image(p, 16).shape == (16, 16, 3)
    assert load_image(p, (10, 20)).shape == (10, 20, 3)
    assert image_size(p) == (24, 32)
    with pytest.raises(ValueError, match="size"):
        load_image(p, 0)


def test_corrupt_and_missing_files_raise_image_read_error(tmp_path: Path):
    good = _save(tmp_path / "ok.png", _rgb(4, 64, 64))
    data = good.read_bytes()
    trunc = tmp_path / "truncated.png"
    trunc.write_bytes(data[: len(data) // 2])
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"this is not a png")
    for bad in (trunc, junk, tmp_path / "missing.png"):
        with pytest.raises(ImageReadError) as ei:
            load_image(bad, 16)
        assert ei.value.path == str(bad)
        assert bad.name in str(ei.value)
        assert isinstance(ei.value, LayoutError)
    with pytest.raises(ImageReadError) as ei:  # the reason says what the file is, once, not Pillow's class name
        load_image(junk, 16)
    assert str(ei.value) == f"cannot read image '{junk}': not an image in a format Pillow reads"
    with pytest.raises(ImageReadError, match=r"missing.png': no such file$"):
        load_image(tmp_path / "missing.png", 16)
    with pytest.raises(ImageReadError) as ei:
        load_image(trunc)
    assert ei.value.__cause__ is not None  # Pillow's exception chained
    again = pickle.loads(pickle.dumps(ei.value))  # must cross process boundaries (Ray)
    assert isinstance(again, ImageReadError) and again.path == str(trunc) and str(again) == str(ei.value)
    with pytest.raises(ImageReadError, match="junk.png"):
        image_size(junk)


def test_load_mask_binarises_resizes_and_checks_size(tmp_path: Path):
    m = np.array([[0, 100, 127, 128], [200, 255, 0, 0]], dtype=np.uint8)
    p = _save(tmp_path / "m.png", m, "L")
    assert load_mask(p).tolist() == [[0, 0, 0, 1], [1, 1, 0, 0]]
    big = _save(tmp_path / "big.png", _mask(24, 32), "L")
    r = load_mask(big, (12, 16), expected_hw=(24, 32))
    assert r.shape == (12, 16) and r.dtype == np.uint8 and set(np.unique(r)) == {0, 1}
    assert r[2:5, 3:7].all() and r.sum() == 3 * 4  # the 6x8 box at half size
    with pytest.raises(LayoutError) as ei:
        load_mask(big, 16, expected_hw=(24, 31))
    msg = str(ei.value)
    assert "big.png" in msg and "24x32" in msg and "24x31" in msg
    zero_one = _save(tmp_path / "01.png", (_mask() > 0).astype(np.uint8), "L")
    assert load_mask(zero_one).sum() == 6 * 8  # {0,1}-coded masks are not thresholded to empty


def test_load_records_with_masks(mvtec: Path):
    idx = scan_category(mvtec, "widget")
    out = load_records(idx.test, 16, with_masks=True)
    assert out.images.shape == (10, 16, 16, 3) and out.images.dtype == np.uint8
    assert out.masks.shape == (10, 16, 16) and out.masks.dtype == np.uint8
    assert out.records == idx.test and out.skipped == []
    for rec, img, mask in zip(out.records, out.images, out.masks):
        assert (img == load_image(rec.path, 16)).all()
        assert (mask.sum() > 0) == (rec.label == 1)
    assert load_records(idx.test, 16).masks is None


def test_load_records_skip_bad_counts_and_mask_mismatch_always_raises(mvtec: Path, caplog):
    idx = scan_category(mvtec, "widget")
    bad = Path(idx.train_good[2].path)
    bad.write_bytes(bad.read_bytes()[:40])  # truncated PNG
    with pytest.raises(ImageReadError, match=bad.name):
        load_records(idx.train_good, 16)
    with caplog.at_level("WARNING", logger="mapl_ray.data.io"):
        out = load_records(idx.train_good, 16, skip_bad=True)
    assert any(bad.name in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)
    assert out.images.shape == (5, 16, 16, 3)
    assert [s[0] for s in out.skipped] == [str(bad)]
    assert str(bad) not in [r.path for r in out.records]
    # several bad files: one error names them all (fixed in one go), and it survives pickling (Ray)
    bad2 = Path(idx.train_good[4].path)
    bad2.write_bytes(b"not an image")
    with pytest.raises(ImageReadError) as ei:
        load_records(idx.train_good, 16)
    assert ei.value.path == str(bad) and [p for p, _ in ei.value.others] == [str(bad2)]
    assert bad.name in str(ei.value) and f"1 more unreadable file(s): '{bad2}'" in str(ei.value)
    again = pickle.loads(pickle.dumps(ei.value))
    assert again.others == ei.value.others and str(again) == str(ei.value)

    mrec = next(r for r in idx.test if r.label == 1)
    _save(Path(mrec.mask_path), _mask(20, 32))
    with pytest.raises(LayoutError, match="mask .* is 20x32"):
        load_records([mrec], 16, skip_bad=True, with_masks=True)


def test_load_records_same_size_required_without_resize(tmp_path: Path):
    recs = [
        ImageRecord(str(_save(tmp_path / "a.png", _rgb(1, 10, 10))), 0, "good"),
        ImageRecord(str(_save(tmp_path / "b.png", _rgb(1, 12, 10))), 0, "good"),
    ]
    with pytest.raises(LayoutError, match="b.png"):
        load_records(recs, None)
    assert load_records(recs[:1], None).images.shape == (1, 10, 10, 3)


# ---------------------------------------------------------------------------------------------
# split
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def big_index(tmp_path: Path):
    """Record-only index (make_split opens no file): 40 train/good, 10 test/good, crack x12, dent x8."""
    from mapl_ray.data import CategoryIndex

    root = str(tmp_path)
    train = [ImageRecord(f"{root}/c/train/good/{i:03d}.png", 0, "good") for i in range(40)]
    test = [ImageRecord(f"{root}/c/test/good/{i:03d}.png", 0, "good") for i in range(10)]
    for t, n in (("crack", 12), ("dent", 8)):
        test += [
            ImageRecord(f"{root}/c/test/{t}/{i:03d}.png", 1, t, f"{root}/c/ground_truth/{t}/{i:03d}_mask.png")
            for i in range(n)
        ]
    return CategoryIndex(root=root, category="c", train_good=train, test=sorted(test, key=lambda r: r.path))


def _train_paths(s: Split) -> set[str]:
    return {r.path for r in s.labeled_normal + s.unlabeled + s.labeled_anomaly}


def test_make_split_counts_disjointness_and_hidden_labels(big_index):
    s = make_split(big_index, seed=3, unlabeled_fraction=0.25, contamination=0.1, labeled_anomalies=2)
    assert s.summary() == {
        "labeled_normal": 30,
        "unlabeled": 10 + 2,
        "labeled_anomaly": 4,
        "test": 10 + 20 - 4 - 2,
        "validation": 0,
        "test_good": 10,
        "test_anomalous": 14,
        "unlabeled_normal": 10,
        "unlabeled_anomalous": 2,
        "unlabeled_unknown": 0,
    }
    assert not _train_paths(s) & {r.path for r in s.test}
    assert len(_train_paths(s)) == 30 + 12 + 4
    assert {r.path for r in s.test if r.label == 0} == {r.path for r in big_index.test if r.label == 0}
    assert all(r.label == -1 and r.defect_type == "unknown" and r.mask_path is None for r in s.unlabeled)
    truth = dict(zip([r.path for r in s.unlabeled], s.params["unlabeled_true_labels"]))
    for p, lab in truth.items():
        assert lab == (0 if "/train/good/" in p else 1)
    # contaminating anomalies left the test set and are real test anomalies
    contam = {p for p, lab in truth.items() if lab == 1}
    assert contam <= {r.path for r in big_index.test if r.label == 1}
    assert [r.defect_type for r in s.labeled_anomaly].count("crack") == 2
    assert all(r.label == 1 and r.mask_path for r in s.labeled_anomaly)


def test_make_split_is_deterministic_per_seed(big_index):
    kw = dict(unlabeled_fraction=0.3, contamination=0.2, labeled_anomalies=1)
    a, b = make_split(big_index, 7, **kw), make_split(big_index, 7, **kw)
    assert a == b
    c = make_split(big_index, 8, **kw)
    assert [r.path for r in a.unlabeled] != [r.path for r in c.unlabeled]


def test_make_split_pool_order_does_not_reveal_labels(big_index):
    s = make_split(big_index, 0, unlabeled_fraction=0.5, contamination=0.5)
    truth = s.params["unlabeled_true_labels"]
    assert sorted(truth) != truth  # shuffled: anomalies not all at the end


def test_make_split_validation_errors(big_index):
    for kw, field in [
        ({"unlabeled_fraction": 1.0}, "unlabeled_fraction"),
        ({"unlabeled_fraction": -0.1}, "unlabeled_fraction"),
        ({"contamination": 1.5}, "contamination"),
        ({"labeled_anomalies": -1}, "labeled_anomalies"),
        ({"labeled_anomalies": 8}, "labeled_anomalies=8 .*'dent' has only 8"),
        ({"contamination": 0.9, "labeled_anomalies": 7}, "contamination"),
    ]:
        with pytest.raises(ValueError, match=field):
            make_split(big_index, 0, **kw)
    with pytest.raises(ValueError, match="unlabeled_fraction"):
        make_split(big_index, 0, unlabeled_fraction=0.99)  # would leave no labeled normal


def test_make_split_user_pool_and_json_roundtrip(big_index, tmp_path: Path):
    user = [ImageRecord(f"/pool/{i}.png", -1, "unknown") for i in range(5)]
    s = make_split(big_index, 1, unlabeled=user, unlabeled_fraction=0.1)
    assert {r.path for r in user} <= {r.path for r in s.unlabeled}
    assert s.summary()["unlabeled_unknown"] == 5 and s.params["n_user_unlabeled"] == 5
    with pytest.raises(ValueError, match="also a test image"):
        make_split(big_index, 1, unlabeled=[big_index.test[0]])
    path = tmp_path / "splits" / "s.json"
    s.to_json(path)
    doc = json.loads(path.read_text())
    assert doc["counts"] == s.summary() and doc["seed"] == 1
    assert Split.from_json(path) == s
    doc["test"].append(doc["labeled_normal"][0])  # leak a training image into test
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="s.json"):
        Split.from_json(path)


def test_make_split_own_validation_set_is_the_same_for_every_setting_of_a_seed(big_index, tmp_path: Path):
    kw = dict(validation_normals=4, validation_anomalies=2)
    clean = make_split(big_index, 5, **kw)
    pool = make_split(big_index, 5, labeled_normals=10, contamination=0.2, labeled_anomalies=2, **kw)
    val = [r.path for r in clean.validation]
    assert val == [r.path for r in pool.validation]
    assert [r.label for r in clean.validation].count(0) == 4
    assert sorted(r.defect_type for r in clean.validation if r.label == 1) == ["crack", "crack", "dent", "dent"]
    assert all(r.mask_path for r in clean.validation if r.label == 1)
    for s in (clean, pool):
        assert not set(val) & (_train_paths(s) | {r.path for r in s.test})
        assert len(_train_paths(s)) + len(s.test) + len(val) == 40 + 30  # every file in one role
    assert clean.summary()["labeled_normal"] == 36 and pool.summary()["labeled_normal"] == 10
    assert [r.path for r in make_split(big_index, 6, **kw).validation] != val
    path = tmp_path / "s.json"
    pool.to_json(path)
    assert Split.from_json(path) == pool
    old = make_split(big_index, 5, labeled_normals=10)
    old.to_json(path)
    doc = json.loads(path.read_text())  # as written before the validation list existed
    del doc["validation"], doc["counts"]["validation"]
    path.write_text(json.dumps(doc))
    assert Split.from_json(path) == old
    with pytest.raises(ValueError, match="validation_anomalies=8 .*'dent' has only 8"):
        make_split(big_index, 0, validation_anomalies=8)
    with pytest.raises(ValueError, match="validation_normals=40"):
        make_split(big_index, 0, validation_normals=40)


# ---------------------------------------------------------------------------------------------
# simulation
# ---------------------------------------------------------------------------------------------
def test_perlin_noise_shape_range_and_determinism():
    rng = np.random.default_rng(0)
    for shape, res in [((64, 64), (4, 4)), ((37, 50), (3, 7)), ((64, 48), (1, 32))]:
        n = perlin_noise_2d(shape, res, rng)
        assert n.shape == shape and n.dtype == np.float32
        assert -1.0 <= n.min() < -0.1 and 0.1 < n.max() <= 1.0
    a = perlin_noise_2d((40, 40), (4, 4), np.random.default_rng(5), angle=30)
    b = perlin_noise_2d((40, 40), (4, 4), np.random.default_rng(5), angle=30)
    c = perlin_noise_2d((40, 40), (4, 4), np.random.default_rng(6), angle=30)
    assert (a == b).all() and not (a == c).all()
    # Noise is zero on lattice points (gradient noise property): res 4 on 64 px -> every 16 px.
    z = perlin_noise_2d((64, 64), (4, 4), np.random.default_rng(1))
    assert np.abs(z[::16, ::16]).max() < 1e-6
    # Coarse sampling + interpolation stays close to exact evaluation (same lattice).
    e = perlin_noise_2d((128, 128), (2, 4), np.random.default_rng(2), angle=20)
    f = perlin_noise_2d((128, 128), (2, 4), np.random.default_rng(2), angle=20, samples_per_cell=8)
    assert np.abs(e - f).max() < 0.05


def test_foreground_mask_threshold_inverse_and_cleanup():
    img = np.full((32, 32, 3), 200, np.uint8)
    img[8:24, 8:24] = 40  # dark square object
    img[14:16, 14:16] = 220  # specular spot inside the object
    dark = foreground_mask(img, ForegroundConfig(True, 100, inverse=True))
    assert dark.dtype == np.uint8 and dark.sum() == 16 * 16 - 4
    filled = foreground_mask(img, ForegroundConfig(True, 100, inverse=True, fill_holes=True))
    assert filled.sum() == 16 * 16 and filled[8:24, 8:24].all()
    bright = foreground_mask(img, ForegroundConfig(True, 100, inverse=False))
    assert (bright == 1 - dark).all()
    assert (foreground_mask(img, ForegroundConfig(False)) == 1).all()
    specks = img.copy()
    specks[2, 2] = 0
    assert foreground_mask(specks, ForegroundConfig(True, 100, True, open_iterations=1))[2, 2] == 0


def test_simulator_invariants_over_many_draws(tmp_path: Path):
    tex = _texture_dir(tmp_path)
    sim = AnomalySimulator(tex, perlin_scale_range=(1, 4))
    img = _rgb(11, 48, 48)
    rng = np.random.default_rng(0)
    sources = set()
    for _ in range(40):
        out, m, info = sim(img, rng)
        assert out.shape == img.shape and out.dtype == np.uint8
        assert m.shape == (48, 48) and m.dtype == np.uint8 and set(np.unique(m)) <= {0, 1}
        assert m.sum() > 0
        assert (out[m == 0] == img[m == 0]).all()  # bit-identical outside the mask
        assert 0.15 <= info["delta"] <= 1.0
        sources.add(info["source"])
        if info["source"] == "texture":
            assert info["texture"] in sim.textures
        else:
            assert info["texture"] is None
    assert sources == {"texture", "structure"}
    assert sim._cache and pickle.loads(pickle.dumps(sim))._cache == {}  # decoded cache not shipped


def test_simulator_blend_follows_eq2(tmp_path: Path):
    d = tmp_path / "flat"
    _save(d / "t.png", np.full((10, 10, 3), 250, np.uint8))
    sim = AnomalySimulator(d, texture_probability=1.0, perlin_scale_range=(2, 3))
    img = np.full((32, 32, 3), 10, np.uint8)
    out, m, info = sim(img, np.random.default_rng(4))
    expected = np.rint(info["delta"] * 250 + (1 - info["delta"]) * 10)
    assert (out[m == 1] == expected).all() and (out[m == 0] == 10).all()


def test_simulator_deterministic_and_respects_foreground(tmp_path: Path):
    tex = _texture_dir(tmp_path)
    img = np.full((64, 64, 3), 220, np.uint8)
    img[16:48, 16:48] = 50
    cfg = ForegroundConfig(True, 100, inverse=True)
    sim = AnomalySimulator(tex, foreground=cfg)
    a = sim(img, np.random.default_rng(9))
    b = sim(img, np.random.default_rng(9))
    assert (a[0] == b[0]).all() and (a[1] == b[1]).all() and a[2] == b[2]
    fg = foreground_mask(img, cfg)
    rng = np.random.default_rng(1)
    for _ in range(10):
        _, m, info = sim(img, rng)
        if info["fallback"] is None:
            assert (m <= fg).all()
    # An image without foreground still yields a non-empty mask, flagged in info.
    empty = np.full((64, 64, 3), 255, np.uint8)
    _, m, info = sim(empty, np.random.default_rng(2))
    assert m.sum() > 0 and info["fallback"] in ("perlin_only", "noise_quantile")


def test_structure_source_is_a_permutation_of_pixels():
    sim = AnomalySimulator(None, structure_grid=4, structure_augment=False)
    img = _rgb(5, 32, 32)
    s = sim._structure(img, np.random.default_rng(0))
    assert s.shape == img.shape and not (s == img).all()
    assert (np.sort(s.reshape(-1, 3), axis=0) == np.sort(img.reshape(-1, 3), axis=0)).all()
    odd = sim._structure(_rgb(6, 30, 42), np.random.default_rng(0))  # not divisible by 4
    assert odd.shape == (30, 42, 3)


def test_simulator_texture_folder_errors(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(LayoutError, match="no texture images found in .*empty"):
        AnomalySimulator(tmp_path / "empty")
    with pytest.raises(LayoutError, match="texture folder .*absent.* does not exist"):
        AnomalySimulator(tmp_path / "absent")
    bad = tmp_path / "badtex"
    bad.mkdir()
    (bad / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    sim = AnomalySimulator(bad, texture_probability=1.0)
    with pytest.raises(ImageReadError, match="broken.jpg"):
        sim(_rgb(1, 32, 32), np.random.default_rng(0))
    with pytest.raises(ValueError, match="uint8"):
        sim(np.zeros((8, 8, 3), np.float32), np.random.default_rng(0))


# ---------------------------------------------------------------------------------------------
# real data
# ---------------------------------------------------------------------------------------------
@pytest.mark.skipif(
    not (DATA_ROOT / "mvtec_ad" / "screw").is_dir(),
    reason=f"real MVTec AD screw not found under {DATA_ROOT} (set MAPL_DATA)",
)
def test_real_mvtec_screw_layout_and_foreground():
    idx = scan_category(DATA_ROOT / "mvtec_ad", "screw")
    assert len(idx.train_good) == 320
    assert sum(r.label == 0 for r in idx.test) == 41
    assert sum(r.label == 1 for r in idx.test) == 111
    assert idx.defect_types == ["manipulated_front", "scratch_head", "scratch_neck", "thread_side", "thread_top"]
    assert all(r.mask_path and os.path.isfile(r.mask_path) for r in idx.test if r.label == 1)
    # The screw preset must select the (dark) screw, not the bright background.
    img = load_image(idx.train_good[0].path, 128)
    fg = foreground_mask(img, FOREGROUND_PRESETS["screw"])
    assert 0.02 < fg.mean() < 0.3
    border = np.concatenate([fg[0], fg[-1], fg[:, 0], fg[:, -1]])
    assert border.sum() == 0


def test_structure_augment_changes_intensities_but_keeps_outside_mask():
    """With MemSeg's photometric augmentation the structure source differs from a pure permutation,
    and the simulated image still equals the input outside the mask."""
    rng = np.random.default_rng(3)
    img = (rng.random((32, 32, 3)) * 255).astype(np.uint8)
    plain = AnomalySimulator(None, structure_grid=4, structure_augment=False)
    aug = AnomalySimulator(None, structure_grid=4, structure_augment=True)
    a = plain._structure(img, np.random.default_rng(0))
    b = aug._structure(img, np.random.default_rng(0))
    assert a.shape == b.shape == img.shape and b.dtype == np.uint8
    assert not np.array_equal(np.sort(a.ravel()), np.sort(b.ravel()))
    out, mask, _ = aug(img, np.random.default_rng(1))
    assert np.array_equal(out[mask == 0], img[mask == 0])
