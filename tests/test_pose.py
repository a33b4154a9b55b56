"""Pose normalisation (data.align): estimator geometry, masks and maps following their images, the
category preset, and an aligned run whose maps come back in the files' own frame."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from conftest import SCREW, needs_data, tiny_config
from PIL import Image

from mapl_ray.config import Config, ConfigError
from mapl_ray.data.io import decode_image, decode_upload, load_image, load_records
from mapl_ray.data.layout import scan_category
from mapl_ray.data.pose import PoseEstimator, build_pose_estimator


def part_image(angle_deg: float, centre=(110.0, 90.0), size=200) -> tuple[np.ndarray, np.ndarray]:
    """A dark bar with a wide head at its +u end (a screw seen from the side) on a bright background,
    turned by ``angle_deg`` (clockwise on screen, y down). Returns (grey uint8 [H, W], head mask uint8)."""
    ys, xs = np.mgrid[0:size, 0:size] + 0.5
    t = math.radians(angle_deg)
    x, y = xs - centre[0], ys - centre[1]
    u = x * math.cos(t) + y * math.sin(t)
    v = -x * math.sin(t) + y * math.cos(t)
    head = (u > 45) & (u < 65) & (np.abs(v) < 15)
    obj = ((np.abs(u) < 60) & (np.abs(v) < 5)) | head
    return np.where(obj, 50, 200).astype(np.uint8), head.astype(np.uint8)


def moments(fg: np.ndarray) -> tuple[float, float, float, float, float]:
    ys, xs = np.nonzero(fg)
    xs, ys = xs + 0.5, ys + 0.5
    cx, cy = xs.mean(), ys.mean()
    dx, dy = xs - cx, ys - cy
    return cx, cy, (dx * dx).mean(), (dy * dy).mean(), (dx * dy).mean()


@pytest.mark.parametrize("angle", [0, 30, 90, 135, 200, 300])
def test_pose_centres_the_part_horizontal_with_the_wide_end_left(angle):
    grey, _ = part_image(angle)
    img = Image.fromarray(grey).convert("RGB")
    pose = PoseEstimator(128, inverse=True)(img)
    assert pose is not None
    aligned = np.asarray(pose.apply(img))[..., 0]
    assert aligned[0, 0] == aligned[-1, -1] == aligned[0, -1] == aligned[-1, 0] == 200  # corners mirror the background
    fg = aligned < 128
    _, _, sxx, syy, sxy = moments(fg)
    assert sxx > 20 * syy and abs(sxy) < 0.05 * sxx  # principal axis horizontal
    cols, rows = np.nonzero(fg.any(0))[0], np.nonzero(fg.any(1))[0]
    assert abs((cols.min() + cols.max() + 1) / 2 - 100) < 1.5  # the part's extent is centred
    assert abs((rows.min() + rows.max() + 1) / 2 - 100) < 1.5
    assert cols.min() > 5 and cols.max() < 194  # nothing cut off at the frame
    assert abs(fg.sum() - (grey < 128).sum()) < 0.06 * fg.sum()  # same size (up to rasterising a diagonal)
    left, right = fg[:, cols.min() + 3].sum(), fg[:, cols.max() - 3].sum()
    assert left > 2 * right  # the wide end (head) is on the left


def test_a_part_too_long_for_the_frame_is_shrunk_to_fit():
    # a bar of 250 px along the diagonal of a 200 px image: horizontal it would not fit
    ys, xs = np.mgrid[0:200, 0:200] + 0.5
    u, v = ((xs - 100) + (ys - 100)) / math.sqrt(2), (-(xs - 100) + (ys - 100)) / math.sqrt(2)
    obj = ((np.abs(u) < 125) & (np.abs(v) < 4)) | ((u > 105) & (u < 125) & (np.abs(v) < 12))
    img = Image.fromarray(np.where(obj, 50, 200).astype(np.uint8)).convert("RGB")
    pose = PoseEstimator(128, inverse=True, margin=0.05)(img)
    assert pose.scale == pytest.approx(0.9 * 200 / 250, rel=0.03)
    fg = np.asarray(pose.apply(img))[..., 0] < 128
    cols = np.nonzero(fg.any(0))[0]
    assert cols.min() >= 8 and cols.max() <= 191  # inside, with the margin


def test_invert_map_brings_a_map_back_onto_the_original_image():
    grey, head = part_image(135)
    img = Image.fromarray(grey).convert("RGB")
    pose = PoseEstimator(128, inverse=True)(img)
    # a "map" that is 1 on the head in the aligned frame must land on the head of the original image
    aligned_head = np.asarray(pose.apply(Image.fromarray(head * 255), Image.Resampling.NEAREST), np.float32) / 255
    back = pose.invert_map(aligned_head)
    assert back.shape == head.shape and back.dtype == np.float32
    inter = ((back > 0.5) & (head > 0)).sum()
    assert inter / ((back > 0.5) | (head > 0)).sum() > 0.9
    assert back.min() == pytest.approx(0.0)  # uncovered pixels take the map's minimum


def test_no_object_leaves_the_image_as_it_is(tmp_path):
    p = tmp_path / "blank.png"
    Image.fromarray(np.full((40, 40, 3), 200, np.uint8)).save(p)
    est = PoseEstimator(128, inverse=True)
    img, pose = load_image(p, 32, align=est, return_pose=True)
    assert pose is None and np.array_equal(img, load_image(p, 32))
    data = p.read_bytes()
    out, hw, pose2 = decode_image(data, "blank.png", 32, return_original_size=True, align=est, return_pose=True)
    assert pose2 is None and hw == (40, 40) and np.array_equal(out, img)


def test_estimator_rejects_bad_settings():
    with pytest.raises(ValueError, match="threshold"):
        PoseEstimator(300, True)
    with pytest.raises(ValueError, match="min_fraction"):
        PoseEstimator(100, True, min_fraction=0.6)
    with pytest.raises(ValueError, match="margin"):
        PoseEstimator(100, True, margin=0.5)


def test_masks_are_turned_with_their_images(tmp_path):
    cat = tmp_path / "part"
    for d in ("train/good", "test/good", "test/bent", "ground_truth/bent"):
        (cat / d).mkdir(parents=True)
    for i, a in enumerate((10, 250)):
        Image.fromarray(part_image(a)[0]).save(cat / "train" / "good" / f"{i:03d}.png")
        Image.fromarray(part_image(a + 40)[0]).save(cat / "test" / "good" / f"{i:03d}.png")
    grey, head = part_image(160)
    Image.fromarray(grey).save(cat / "test" / "bent" / "000.png")
    Image.fromarray(head * 255).save(cat / "ground_truth" / "bent" / "000_mask.png")
    idx = scan_category(tmp_path, "part")
    est = PoseEstimator(128, inverse=True)
    out = load_records(idx.test, 100, with_masks=True, align=est)
    assert out.poses is not None and len(out.poses) == len(out.records) and all(p is not None for p in out.poses)
    i = [r.defect_type for r in out.records].index("bent")
    mask, obj = out.masks[i].astype(bool), out.images[i][..., 0] < 128
    assert mask.sum() > 0 and (mask & obj).sum() / mask.sum() > 0.9  # still on the part
    assert np.nonzero(mask)[1].mean() < 40  # on the head, now at the left
    same = decode_image((cat / "test" / "bent" / "000.png").read_bytes(), "b", 100, align=est)
    assert np.array_equal(same, out.images[i])  # an upload is aligned exactly like a file
    assert load_records(idx.test, 100).poses is None


@needs_data
def test_real_screws_all_point_the_same_way():
    """Every screw image ends up head-left: each aligned image matches the mean aligned screw better
    than that mean turned by 180 degrees (the mass balance along the axis failed 7 of 472)."""
    paths = sorted((SCREW / "train" / "good").glob("*.png"))[::8] + sorted((SCREW / "test" / "good").glob("*.png"))
    est = PoseEstimator(130, inverse=True)
    imgs = np.stack([load_image(p, 96, align=est)[..., 0].astype(np.float32) for p in paths])
    z = imgs - imgs.mean((1, 2), keepdims=True)
    mean = z.mean(0)
    turned = mean[::-1, ::-1]
    same = (z * mean).sum((1, 2))
    flipped = (z * turned).sum((1, 2))
    wrong = [str(p.name) for p, s, f in zip(paths, same, flipped) if f >= s]
    assert not wrong, f"screws aligned head-right: {wrong}"


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def reference_decode(img: Image.Image, est: PoseEstimator, size: int) -> tuple[np.ndarray, object]:
    """The decode spelt out the plain way, in RGB: the pose estimated and applied on the RGB image, then
    resized (Pillow bilinear); the background fill is the median of the background pixels (np.median)."""
    rgb = img.convert("RGB")
    pose = est(rgb)
    fg = np.asarray(rgb.convert("L")) <= est.threshold
    assert pose.fill == tuple(int(v) for v in np.median(np.asarray(rgb)[~fg], axis=0))
    turned = pose.apply(rgb, Image.Resampling.BILINEAR)
    return np.asarray(turned.resize((size, size), Image.Resampling.BILINEAR)), pose


@needs_data
@pytest.mark.parametrize("size", [256, 128])
def test_grey_and_colour_uploads_decode_as_the_plain_rgb_reference(size):
    """Real screws at 256 x 256 as the GPU bench sends them (grey PNG), the same pixels as RGB, a tinted
    colour version and a 16-bit grey version (some shifted so that the part touches the frame) all decode to the reference's pixels and pose (a grey image
    is turned at one channel; the fill is a histogram median)."""
    est = PoseEstimator(130, inverse=True)
    paths = sorted((SCREW / "test").glob("*/*.png"))[::15]
    for p in paths:
        grey = Image.open(p).convert("L").resize((256, 256), Image.Resampling.BILINEAR)
        if p.stem.endswith("0"):  # the part cut by the frame: its mirror images in the margin get the fill
            grey = Image.fromarray(np.roll(np.asarray(grey), (110, 120), axis=(0, 1)))
        tint = np.asarray(grey.convert("RGB")) * np.array([0.9, 1.0, 0.8])
        colour = Image.fromarray(np.clip(tint + [[[12, 0, 31]]], 0, 255).astype(np.uint8))
        sixteen = Image.fromarray(np.asarray(grey).astype(np.uint16) * 257)
        for img, body in [
            (grey, png(grey)),
            (grey, png(grey.convert("RGB"))),
            (colour, png(colour)),
            (grey, png(sixteen)),
        ]:
            want, want_pose = reference_decode(img, est, size)
            d = decode_upload(body, p.name, size, est)
            assert d.pose == want_pose, p
            assert d.image.dtype == np.uint8 and d.image.flags.writeable and d.image.flags.c_contiguous
            assert np.array_equal(d.image, want), p


def test_background_fill_rounds_an_even_median_down():
    """With an even number of background pixels the fill is the mean of the two middle values, rounded
    down (as int(np.median)): background 10 x 50 pixels of (100, 7, 0) and 10 x 50 of (103, 8, 255)."""
    rgb = np.zeros((40, 50, 3), np.uint8)
    rgb[:10] = (100, 7, 0)
    rgb[10:20] = (103, 8, 255)
    rgb[20:] = (250, 250, 250)  # the object: grey > 128
    rgb[20:, :5] = (0, 0, 0)  # part of the background
    pose = PoseEstimator(128, inverse=False)(Image.fromarray(rgb))
    bg = rgb[rgb.mean(-1) <= 128]
    assert pose.fill == tuple(int(v) for v in np.median(bg, axis=0)) == (100, 7, 0)
    pose = PoseEstimator(128, inverse=False)(Image.fromarray(rgb[:, 5:]))
    assert pose.fill == tuple(int(v) for v in np.median(rgb[:20, 5:].reshape(-1, 3), axis=0)) == (101, 7, 127)


def test_align_needs_an_object_threshold():
    cfg = Config().override({"data.category": "magnetic_tile", "data.align": "principal_axis"})
    with pytest.raises(ConfigError, match="simulation.foreground_threshold"):
        build_pose_estimator(cfg)
    est = build_pose_estimator(
        cfg.override({"simulation.foreground_threshold": 90, "simulation.foreground_inverse": True})
    )
    assert est.threshold == 90 and est.inverse
    assert build_pose_estimator(Config().override({"data.category": "screw"})) is None
    with pytest.raises(ConfigError, match="data.align"):
        Config().override({"data.align": "pca"}).validate()


def test_screw_preset_is_applied_under_the_users_settings(tmp_path):
    from mapl_ray.cli import build_parser, resolve_config

    def cfg(*argv):
        return resolve_config(build_parser().parse_args(["train", "--data", "d", *argv]))

    c = cfg("--category", "screw")
    assert (c.data.align, c.train.augment, c.eval.tta, c.model.memory_rotations, c.model.memory_banks) == (
        "principal_axis",
        "none",
        "none",
        1,
        10,
    )
    c = cfg("--category", "screw", "--set", "train.augment=rot90")
    assert c.train.augment == "rot90" and c.data.align == "principal_axis"  # a flag wins over the preset
    yml = tmp_path / "c.yaml"
    yml.write_text("eval:\n  tta: flip\n")
    c = cfg("--category", "screw", "--config", str(yml))
    assert c.eval.tta == "flip" and c.data.align == "principal_axis"  # so does the user's file
    c = cfg("--category", "screw", "--no-category-preset")
    assert c.data.align == "none" and c.train.augment == Config().train.augment
    assert cfg("--category", "metal_plate").data.align == "none"


@needs_data
def test_an_aligned_run_gives_maps_in_the_images_own_frame(small_root, tmp_path):
    from mapl_ray.inference import Predictor
    from mapl_ray.main_job import run_train_job

    run = tmp_path / "run"
    run_train_job(
        tiny_config(
            small_root,
            **{
                "data.align": "principal_axis",
                "model.memory_rotations": 1,
                "train.augment": "none",
                "eval.tta": "none",
            },
        ),
        run,
        use_ray=False,
        progress=False,
    )
    import json

    assert "own frame" in json.loads((run / "metrics.json").read_text())["run"]["pose_normalisation"]
    pred = Predictor(run, device="cpu")
    path = sorted((small_root / "screw" / "test" / "thread_top").glob("*.png"))[0]
    records, images, maps = pred.predict_paths([path])
    aligned, pose = pred.load_image(path)
    assert pose is not None
    own = pred.predict_arrays(aligned[None])
    assert records[0]["score"] == pytest.approx(float(own["scores"][0]), abs=1e-6)  # scored on the aligned image
    assert np.allclose(maps[0], pose.invert_map(own["maps"][0]), atol=1e-6)  # map turned back
    assert np.array_equal(images[0], load_image(path, pred.image_size))  # overlays use the file as it is
    assert not np.allclose(maps[0], own["maps"][0], atol=1e-3)

    # evaluate's pixel metrics are those of predict's maps against the masks as stored
    from mapl_ray.data.split import Split
    from mapl_ray.eval.metrics import compute_metrics

    test = Split.from_json(run / "split.json").test
    recs, _, test_maps = pred.predict_paths([r.path for r in test])
    plain = load_records(test, pred.image_size, with_masks=True)
    m = compute_metrics(
        np.array([r.label for r in test]),
        np.array([r["score"] for r in recs]),
        [r.defect_type for r in test],
        plain.masks,
        test_maps,
    )
    saved = json.loads((run / "metrics.json").read_text())["overall"]
    assert m["overall"]["pixel_auroc"] == pytest.approx(saved["pixel_auroc"], abs=1e-6)
    assert m["overall"]["aupro"] == pytest.approx(saved["aupro"], abs=1e-6)


@needs_data
def test_align_without_an_object_threshold_stops_before_the_run_folder_is_written(small_root, tmp_path):
    from mapl_ray.main_job import prepare_run

    cfg = tiny_config(small_root, **{"data.align": "principal_axis", "simulation.use_foreground_mask": False})
    with pytest.raises(ConfigError, match="foreground_threshold"):
        prepare_run(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


@needs_data
def test_training_images_without_an_object_are_kept_and_reported(tmp_path, caplog):
    from conftest import copy_small_category

    from mapl_ray.data.train_data import load_train_data
    from mapl_ray.main_job import prepare_run

    root = copy_small_category(tmp_path / "data")
    blank = root / "screw" / "train" / "good" / "blank.png"
    Image.fromarray(np.full((64, 64), 200, np.uint8)).save(blank)
    cfg = tiny_config(root, **{"data.align": "principal_axis"})
    split = prepare_run(cfg, tmp_path / "run")
    with caplog.at_level("WARNING"):
        data, val, info = load_train_data(cfg, split)
    assert info["no_pose_found"] == [str(blank)]
    assert "no object found in 1 training images" in caplog.text
    assert len(data.normals) + len(val.normals) == 15  # the blank image is still used


@needs_data
def test_landscape_training_turns_a_portrait_image_and_warns_of_nothing(tmp_path, caplog):
    """Under data.align=landscape a square or landscape image has no pose by design: no "no object found"
    warning; a portrait training image (a grey ramp 40 wide, 64 tall) is decoded turned."""
    from conftest import copy_small_category

    from mapl_ray.data.train_data import load_train_data
    from mapl_ray.main_job import prepare_run

    root = copy_small_category(tmp_path / "data")
    tall = root / "screw" / "train" / "good" / "tall.png"
    rows = np.linspace(0, 255, 64)[:, None] * np.ones((1, 40))  # dark at the top, bright at the bottom
    Image.fromarray(rows.astype(np.uint8)).save(tall)
    cfg = tiny_config(root, **{"data.align": "landscape"})
    split = prepare_run(cfg, tmp_path / "run")
    with caplog.at_level("WARNING"):
        data, val, info = load_train_data(cfg, split)
    assert "no object found" not in caplog.text and "no_pose_found" not in info and info["align"] == "landscape"
    size = cfg.data.image_size
    turned = Image.open(tall).convert("RGB").transpose(Image.Transpose.ROTATE_90).resize((size, size))
    got = np.concatenate([data.normals, val.images]).astype(int)
    # dark on the left, bright on the right once turned: found among the training or validation images
    assert np.abs(got - np.asarray(turned)).max(axis=(1, 2, 3)).min() <= 1, "the portrait image was not turned"


MAGNETIC_TILE = SCREW.parents[1] / "magnetic_tile" / "magnetic_tile"


def test_landscape_turns_portrait_images_only():
    """data.align=landscape: a portrait image turns a quarter turn counter-clockwise (its top row becomes
    its left column), a landscape or square one is used as it is."""
    from mapl_ray.data.pose import LandscapeTurn

    est = build_pose_estimator(Config().override({"data.align": "landscape"}).validate())
    assert isinstance(est, LandscapeTurn)
    rng = np.random.default_rng(0)
    portrait = rng.integers(0, 256, (30, 12, 3), dtype=np.uint8)
    assert est(Image.fromarray(portrait[:12])) is None and est(Image.fromarray(portrait[:10])) is None
    pose = est(Image.fromarray(portrait))
    assert pose.quarter_turn and pose.size == (12, 30)
    turned = np.asarray(pose.apply(Image.fromarray(portrait)))
    assert turned.shape == (12, 30, 3)
    assert np.array_equal(turned, np.rot90(portrait, 1))  # exact: a transpose, no resampling
    assert np.array_equal(turned[:, 0], portrait[0, ::-1])


@pytest.mark.skipif(not MAGNETIC_TILE.is_dir(), reason="magnetic_tile data not found")
def test_landscape_decodes_real_tiles_with_their_masks_and_maps_come_back():
    """Real magnetic tiles (portrait, 8-bit grey JPEG) with their defect masks: decode, mask and shard row
    equal turning then resizing by hand; a map made on the turned image comes back onto the file's frame."""
    from mapl_ray.data.io import load_mask
    from mapl_ray.data.shards import ShardSpec, pose_from_json, pose_to_json

    est = build_pose_estimator(Config().override({"data.align": "landscape"}).validate())
    assert ShardSpec.of(64, est).align == "landscape"  # shards prepared unturned are refused
    files = sorted((MAGNETIC_TILE / "test" / "blowhole").glob("*.jpg"))
    portraits = [p for p in files if Image.open(p).height > Image.open(p).width]
    assert portraits
    for p in portraits[:3]:
        img, pose = load_image(p, 64, align=est, return_pose=True)
        src = Image.open(p).convert("RGB")
        want = src.transpose(Image.Transpose.ROTATE_90).resize((64, 64), Image.Resampling.BILINEAR)
        assert np.array_equal(img, np.asarray(want)), p
        assert pose_from_json(pose_to_json(pose)) == pose
        mask_path = MAGNETIC_TILE / "ground_truth" / "blowhole" / f"{p.stem}_mask.png"
        mask = load_mask(mask_path, 64, expected_hw=(src.height, src.width), pose=pose)
        want_mask = np.asarray(load_mask(mask_path, None)).T[::-1]  # the quarter turn of the file's mask
        want_mask = np.asarray(Image.fromarray(want_mask).resize((64, 64), Image.Resampling.NEAREST))
        assert mask.any() and np.array_equal(mask, want_mask), p
        # the turned image's grey level as a map, turned back, is the unturned decode's grey level
        amap = img[..., 0].astype(np.float32)
        back = pose.invert_map(amap)
        plain = load_image(p, 64)[..., 0].astype(np.float32)
        assert back.shape == (64, 64) and np.abs(back - plain).mean() < 3.0, p
        assert np.abs(amap - plain).mean() > 3 * np.abs(back - plain).mean()  # the turn mattered
