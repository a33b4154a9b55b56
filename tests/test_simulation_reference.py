"""The faster anomaly simulation draws exactly what the plain implementations drew.

Each ``_ref_*`` function below is the previous (slower) implementation, kept here as the reference: the
rewritten functions must give the same arrays bit for bit on real screw images and DTD textures, so a
fixed seed still gives the same training batches.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import SCREW, TEXTURES, needs_data, tiny_config
from PIL import Image
from scipy import ndimage as ndi

from mapl_ray.data import perlin, simulation
from mapl_ray.data.augment import augment_images
from mapl_ray.data.batches import BatchMaker
from mapl_ray.data.foreground import FOREGROUND_PRESETS, foreground_mask, foreground_masks, rgb_to_grey
from mapl_ray.data.simulation import AnomalySimulator, build_simulator, photometric_augment
from mapl_ray.data.train_data import load_train_data
from mapl_ray.main_job import prepare_run


@pytest.fixture(scope="module")
def screws() -> np.ndarray:
    """Ten real screw images (train/good) at 128 x 128, uint8 ``(10, 128, 128, 3)``."""
    if not SCREW.is_dir():
        pytest.skip(f"real data not found at {SCREW}")
    files = sorted((SCREW / "train" / "good").glob("*.png"))[:10]
    return np.stack(
        [np.asarray(Image.open(f).convert("RGB").resize((128, 128), Image.Resampling.BILINEAR)) for f in files]
    )


# ---- reference implementations (the code before the speed-up) ------------------------------------
def _ref_dilate(mask, n):
    m = np.pad(mask, n, mode="edge")
    for _ in range(n):
        d = m.copy()
        d[1:] |= m[:-1]
        d[:-1] |= m[1:]
        d[:, 1:] |= m[:, :-1]
        d[:, :-1] |= m[:, 1:]
        m = d
    return m[n:-n, n:-n] if n else m


def _ref_foreground_mask(image, cfg):
    if not cfg.use_mask:
        return np.ones(image.shape[:2], dtype=np.uint8)
    grey = rgb_to_grey(image)
    fg = grey <= cfg.threshold if cfg.inverse else grey > cfg.threshold
    if cfg.open_iterations:
        fg = _ref_dilate(~_ref_dilate(~fg, cfg.open_iterations), cfg.open_iterations)
    if cfg.close_iterations:
        fg = ~_ref_dilate(~_ref_dilate(fg, cfg.close_iterations), cfg.close_iterations)
    if cfg.fill_holes:
        lab, n = ndi.label(~fg)
        if n:
            border = np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))
            keep = np.zeros(n + 1, dtype=bool)
            keep[border] = True
            keep[0] = True
            fg = fg | ~keep[lab]
    return fg.astype(np.uint8)


def _ref_gamma(im, rng):
    a = np.asarray(im).astype(np.float32) / 255.0
    g = rng.uniform(0.5, 2.0, size=3).astype(np.float32)
    return Image.fromarray(np.clip(255.0 * a**g, 0, 255).astype(np.uint8))


def _ref_brightness(im, rng):
    a = np.asarray(im).astype(np.float32) * rng.uniform(0.8, 1.2) + rng.uniform(-30, 30)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def _ref_hue_sat(im, rng):
    hsv = np.asarray(im.convert("HSV")).astype(np.int16)
    hsv[..., 0] = (hsv[..., 0] + int(rng.integers(-50, 51))) % 256
    hsv[..., 1] = np.clip(hsv[..., 1] + int(rng.integers(-50, 51)), 0, 255)
    return Image.fromarray(hsv.astype(np.uint8), "HSV").convert("RGB")


def _ref_cells(image, g, rng):
    """The structure source's cell shuffle after the photometric step (image divisible by ``g``)."""
    h, w = image.shape[:2]
    ch, cw = h // g, w // g
    cells = image.reshape(g, ch, g, cw, 3).transpose(0, 2, 1, 3, 4).reshape(g * g, ch, cw, 3)
    cells = cells[rng.permutation(g * g)]
    n = g * g
    k = rng.integers(0, 4, size=n) if ch == cw else 2 * rng.integers(0, 2, size=n)
    flip = rng.random(n) < 0.5
    for kk in (1, 2, 3):
        sel = k == kk
        if sel.any():
            cells[sel] = np.rot90(cells[sel], kk, axes=(1, 2))
    cells[flip] = cells[flip][:, :, ::-1]
    return cells.reshape(g, g, ch, cw, 3).transpose(0, 2, 1, 3, 4).reshape(g * ch, g * cw, 3)


def _ref_perlin_at(ys, xs, shape, res, rng, angle):
    u, v = perlin.lattice_coordinates(ys, xs, shape, res, angle)  # unchanged by the rewrite
    iu, iv = np.floor(u), np.floor(v)
    fu, fv = u - iu, v - iv
    umin, vmin = iu.min(), iv.min()
    gh, gw = int(iu.max() - umin) + 2, int(iv.max() - vmin) + 2
    i00 = ((iu - umin) * gw + (iv - vmin)).astype(np.intp)
    grad = np.exp(1j * rng.uniform(0.0, 2.0 * np.pi, size=gh * gw)).astype(np.complex64)

    def fade(t):
        return t * t * t * (t * (t * np.float32(6.0) - np.float32(15.0)) + np.float32(10.0))

    fu1, fv1 = fu - np.float32(1.0), fv - np.float32(1.0)
    c = grad[i00]
    n00 = c.imag * fu + c.real * fv
    c = grad[i00 + gw]
    n10 = c.imag * fu1 + c.real * fv
    c = grad[i00 + 1]
    n01 = c.imag * fu + c.real * fv1
    c = grad[i00 + (gw + 1)]
    n11 = c.imag * fu1 + c.real * fv1
    t, s = fade(fu), fade(fv)
    n0 = n00 + (n10 - n00) * t
    n1 = n01 + (n11 - n01) * t
    return (n0 + (n1 - n0) * s) * np.float32(math.sqrt(2.0))


def _ref_interp_axis(a, pos, n, axis):
    x = np.arange(n)
    k = np.clip(np.searchsorted(pos, x, side="right") - 1, 0, max(len(pos) - 2, 0))
    if len(pos) == 1:
        return np.repeat(a, n, axis=axis)
    wgt = ((x - pos[k]) / (pos[k + 1] - pos[k])).astype(np.float32)
    if axis == 0:
        return a[k] + (a[k + 1] - a[k]) * wgt[:, None]
    return a[:, k] + (a[:, k + 1] - a[:, k]) * wgt


def _ref_augment(images, masks, mode, rng):
    out_i, out_m = images.copy(), None if masks is None else masks.copy()
    for b in range(len(images)):
        k = int(rng.integers(4)) if mode == "rot90" else 0
        flip = bool(rng.integers(2))
        img = np.rot90(images[b], k, axes=(0, 1))
        out_i[b] = img[:, ::-1] if flip else img
        if masks is not None:
            m = np.rot90(masks[b], k, axes=(0, 1))
            out_m[b] = m[:, ::-1] if flip else m
    return out_i, out_m


# ---- the rewritten functions against them ------------------------------------------------------------
@needs_data
def test_foreground_masks_equal_reference_and_follow_flips_and_rotations(screws):
    for name, cfg in FOREGROUND_PRESETS.items():
        stack = foreground_masks(screws, cfg, chunk=3)  # chunks that split the stack unevenly
        for img, got in zip(screws, stack):
            ref = _ref_foreground_mask(img, cfg)
            assert np.array_equal(got, ref.astype(bool)), name
            assert np.array_equal(foreground_mask(img, cfg), ref), name
    # the cached masks may follow the training augmentation: the mask of a transformed image is the
    # transformed mask (screw preset: threshold, opening, closing, hole filling)
    cfg = FOREGROUND_PRESETS["screw"]
    masks = foreground_masks(screws, cfg)
    assert 0.02 < masks.mean() < 0.6  # a real object, not an empty or full mask
    for k in range(4):
        for flip in (False, True):
            turned = np.rot90(screws, k, axes=(1, 2))
            turned = turned[:, :, ::-1] if flip else turned
            want = np.rot90(masks, k, axes=(1, 2))
            want = want[:, :, ::-1] if flip else want
            assert np.array_equal(foreground_masks(np.ascontiguousarray(turned), cfg), want), (k, flip)


@needs_data
def test_photometric_lookup_tables_equal_reference(screws):
    """Gamma, brightness and hue/saturation through lookup tables equal the per-pixel formulas (which draw
    the same random numbers in the same order)."""
    pairs = [
        (simulation._gamma, _ref_gamma),
        (simulation._brightness, _ref_brightness),
        (simulation._hue_sat, _ref_hue_sat),
    ]
    textures = sorted(TEXTURES.rglob("*.jpg"))[::12]  # colour images: the hue / saturation shift shows
    images = [Image.fromarray(s) for s in screws] + [Image.open(f).convert("RGB") for f in textures]
    changed = dict.fromkeys(range(len(pairs)), 0)
    for seed in range(40):
        im = images[seed % len(images)]
        for j, (new, ref) in enumerate(pairs):
            rng_new, rng_ref = np.random.default_rng(seed), np.random.default_rng(seed)
            got, want = np.asarray(new(im, rng_new)), np.asarray(ref(im, rng_ref))
            assert got.shape == want.shape and np.array_equal(got, want), (new.__name__, seed)
            assert rng_new.random() == rng_ref.random()  # the same draws were used up
            changed[j] += not np.array_equal(got, np.asarray(im))
    assert min(changed.values()) >= 15, changed  # the ops did change the images (grey screws keep their hue)
    # photometric_augment composes them with Pillow's operations: still a uint8 image of the input's shape
    out = photometric_augment(screws[0], np.random.default_rng(0))
    assert out.dtype == np.uint8 and out.shape == screws[0].shape and out.flags.writeable


@needs_data
def test_structure_cells_equal_reference(screws):
    for g in (1, 4, 8):
        for shape in ((128, 128), (128, 96)):  # square and rectangular cells
            sim = AnomalySimulator(None, structure_grid=g, structure_augment=False)
            for seed in range(8):
                img = np.ascontiguousarray(screws[seed][: shape[0], : shape[1]])
                got = sim._structure(img, np.random.default_rng(seed))
                assert np.array_equal(got, _ref_cells(img, g, np.random.default_rng(seed))), (g, shape, seed)


def test_perlin_noise_equals_reference():
    for i in range(300):
        rng = np.random.default_rng([i, 5])
        res = (2 ** int(rng.integers(0, 6)), 2 ** int(rng.integers(0, 6)))
        angle = float(rng.uniform(-90, 90)) if i % 5 else 0.0
        shape = [(256, 256), (64, 64), (100, 80), (3, 7)][i % 4]
        step = [1, 2, 4, 8][i % 4]
        if step > 1 and min(shape) > 2 * step:
            ys, xs = perlin._sample_positions(shape[0], step), perlin._sample_positions(shape[1], step)
            want = _ref_perlin_at(ys, xs, shape, res, np.random.default_rng(i), angle)
            assert np.array_equal(perlin._perlin_at(ys, xs, shape, res, np.random.default_rng(i), angle), want)
            full = _ref_interp_axis(_ref_interp_axis(want, ys, shape[0], 0), xs, shape[1], 1)
            got = perlin._interp_axis(perlin._interp_axis(want, ys, shape[0], 0), xs, shape[1], 1)
            assert got.dtype == np.float32 and np.array_equal(got, full), i
        else:
            ys, xs = np.arange(shape[0]), np.arange(shape[1])
            want = _ref_perlin_at(ys, xs, shape, res, np.random.default_rng(i), angle)
            assert np.array_equal(perlin._perlin_at(ys, xs, shape, res, np.random.default_rng(i), angle), want), i


@needs_data
def test_augment_images_equals_reference(screws):
    masks = foreground_masks(screws, FOREGROUND_PRESETS["screw"]).astype(np.uint8)
    for mode in ("flip", "rot90"):
        for seed in range(6):
            got = augment_images(screws, masks, mode, np.random.default_rng(seed))
            want = _ref_augment(screws, masks, mode, np.random.default_rng(seed))
            assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1]), (mode, seed)


@needs_data
def test_simulation_blend_and_given_foreground_equal_reference(screws):
    """Eq. 2 on the masked pixels only, and a caller's object mask gives what the computed one gives."""
    sim = AnomalySimulator(TEXTURES, foreground=FOREGROUND_PRESETS["screw"])
    fgs = foreground_masks(screws, sim.foreground)
    sources = set()
    for seed in range(24):
        img = screws[seed % len(screws)]
        out, mask, info = sim(img, np.random.default_rng(seed))
        out2, mask2, _ = sim(img, np.random.default_rng(seed), fgs[seed % len(screws)])
        assert np.array_equal(out, out2) and np.array_equal(mask, mask2)
        sources.add(info["source"])
        # reference blend: rebuild I_n from the same draws and blend every pixel, keep the masked ones
        m = mask.astype(bool)
        assert np.array_equal(out[~m], img[~m])
        assert m.any() and (out[m] != img[m]).any()
        if info["source"] == "texture":
            src = sim._texture(info["texture"], img.shape[:2]).astype(np.float32)
            d = info["delta"]
            want = np.clip(np.rint(d * src + (1.0 - d) * img.astype(np.float32)), 0, 255).astype(np.uint8)
            assert np.array_equal(out[m], want[m]), seed
    assert sources == {"texture", "structure"}


@needs_data
def test_batches_with_cached_object_masks_equal_per_image_masks(small_root, tmp_path):
    """The BatchMaker's cached object masks (transformed with the batch images) give the batches and refit
    pools the per-image foreground masks give."""
    cfg = tiny_config(small_root, **{"data.image_size": 96, "train.augment": "rot90"})
    data, _, _ = load_train_data(cfg, prepare_run(cfg, tmp_path / "run"))
    cached = BatchMaker(cfg, data, build_simulator(cfg))
    plain = BatchMaker(cfg, data, build_simulator(cfg))
    rows = np.arange(len(data.normals))
    want = foreground_masks(data.normals, build_simulator(cfg).foreground)
    assert np.array_equal(cached.object_masks(rows), want) and cached.object_masks(rows).dtype == bool
    plain.packed_masks = None  # each simulated image computes its own mask
    for step in range(6):
        a, b = cached(step), plain(step)
        for key in a:
            assert np.array_equal(a[key], b[key]), (step, key)
    assert np.array_equal(cached.pool(3)["sims"], plain.pool(3)["sims"])
    # with intensity jitter the grey levels change: no cache
    jit = cfg.override({"train.color_jitter": 0.2})
    assert BatchMaker(jit, data, build_simulator(jit)).object_masks(rows) is None
