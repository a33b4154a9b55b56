"""Anomaly simulation of MemSeg / MAPL (MAPL arXiv 2405.06198, eqs. 1-2; MemSeg arXiv 2205.00908).

A simulated anomaly image is made from a normal image ``I`` in three steps:

1. mask ``M = M_perlin AND M_foreground`` (eq. 1): thresholded Perlin noise restricted to
   the object, found by grey-level thresholding of ``I``;
2. an anomaly source ``I_n``: a random texture image (DTD) or a "structural" rearrangement
   of ``I`` itself (grid cells shuffled, rotated and flipped);
3. blending (eq. 2)::

       I_a = (1 - M) * I + M * (delta * I_n + (1 - delta) * I),   delta ~ U(0.15, 1)

   ``delta`` is the opacity of the anomaly source (the reference MAPL/MemSeg code,
   ``factor * (M * I_n) + (1 - factor) * (M * I)``, uses the same form).

All randomness comes from the ``numpy.random.Generator`` passed in, so a seed reproduces a sample.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from ..config import Config
from .foreground import ForegroundConfig, check_rgb_image, foreground_mask, resolve_foreground
from .io import _read_rgb
from .layout import LayoutError, find_images
from .perlin import perlin_noise_2d

__all__ = ["AnomalySimulator", "build_simulator", "photometric_augment", "split_textures"]


#: uint8 ``(256, 3)``: every level of each of 3 channels (row k = (k, k, k)), the input of :func:`_lut`.
_LEVELS_RGB = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1)


def _lut(levels: np.ndarray) -> list[int]:
    """``Image.point`` table of a 3-band image from the mapped levels ``(256, 3)`` (band after band)."""
    return levels.astype(np.uint8).T.ravel().tolist()


# The numeric operations of photometric_augment act on each channel value alone, so each is applied as
# Pillow lookup tables (``Image.point``, one per channel) holding the formula evaluated on the 256 levels:
# the same numbers as evaluating it on every pixel, ~10x faster.
def _gamma(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Per-channel gamma contrast ``255 (x / 255) ** g``, ``g ~ U(0.5, 2)`` per channel (float32)."""
    g = rng.uniform(0.5, 2.0, size=3).astype(np.float32)
    a = _LEVELS_RGB.astype(np.float32) / 255.0
    return im.point(_lut(np.clip(255.0 * a**g, 0, 255)))


def _brightness(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Brightness ``x * m + c``, ``m ~ U(0.8, 1.2)``, ``c ~ U(-30, 30)`` (float32, clipped, truncated)."""
    a = _LEVELS_RGB.astype(np.float32) * rng.uniform(0.8, 1.2) + rng.uniform(-30, 30)
    return im.point(_lut(np.clip(a, 0, 255)))


def _hue_sat(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Hue shift (mod 256) and saturation shift (clipped) by ``U{-50..50}`` each, in Pillow's HSV."""
    hsv = _LEVELS_RGB.astype(np.int16)  # levels of H, S, V
    hsv[..., 0] = (hsv[..., 0] + int(rng.integers(-50, 51))) % 256
    hsv[..., 1] = np.clip(hsv[..., 1] + int(rng.integers(-50, 51)), 0, 255)
    return im.convert("HSV").point(_lut(hsv)).convert("RGB")


def photometric_augment(image: np.ndarray, rng: np.random.Generator, n_ops: int = 3) -> np.ndarray:
    """``n_ops`` distinct random operations of MemSeg's structure-source augmentation (PIL).

    The list follows MemSeg / MAPL's ``rand_augment``: per-channel gamma contrast, brightness
    multiply-and-add, sharpness, hue/saturation shift, solarize, posterize, invert, autocontrast,
    equalize, rotation by -45..45 degrees. It makes the rearranged cells differ from the object in
    intensity and colour, as real defects do.

    Args:
        image: uint8 ``[H, W, 3]``.
    Returns:
        uint8 ``[H, W, 3]`` (a new array).
    """
    from PIL import ImageEnhance, ImageOps

    ops = [
        lambda im: _gamma(im, rng),
        lambda im: _brightness(im, rng),
        lambda im: ImageEnhance.Sharpness(im).enhance(rng.uniform(0.0, 2.0)),
        lambda im: _hue_sat(im, rng),
        lambda im: ImageOps.solarize(im, int(rng.integers(32, 129))),
        lambda im: ImageOps.posterize(im, int(rng.integers(1, 9))),
        ImageOps.invert,
        ImageOps.autocontrast,
        ImageOps.equalize,
        lambda im: im.rotate(rng.uniform(-45, 45), resample=Image.Resampling.BILINEAR),
    ]
    im = Image.fromarray(image)
    for i in rng.choice(len(ops), size=min(n_ops, len(ops)), replace=False):
        im = ops[int(i)](im)
    return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()


@functools.lru_cache(maxsize=8)
def _dihedral_offsets(ch: int, cw: int, row: int) -> np.ndarray:
    """int64 ``(8, ch, cw)``: entry ``2 k + flip`` holds, at each pixel of a ``ch x cw`` cell transformed by
    ``np.rot90(cell, k)`` then mirrored left-right if ``flip``, the source pixel's offset ``r * row + c`` in an
    image of ``row`` pixels per line (-1 for the transforms that do not keep a rectangular cell's shape)."""
    local = np.arange(ch * cw).reshape(ch, cw)
    out = np.full((8, ch, cw), -1, np.int64)
    for k in range(4):
        turned = np.rot90(local, k)
        if turned.shape != (ch, cw):
            continue
        for flip in (0, 1):
            t = turned[:, ::-1] if flip else turned
            out[2 * k + flip] = (t // cw) * row + t % cw
    out.setflags(write=False)
    return out


@functools.lru_cache(maxsize=8)
def _cell_offsets(g: int, ch: int, cw: int) -> np.ndarray:
    """int64 ``(g * g,)``: offset of the top-left pixel of each ``ch x cw`` cell of a ``g x g`` grid, row-major."""
    out = (np.arange(g)[:, None] * (ch * g * cw) + np.arange(g)[None, :] * cw).ravel()
    out.setflags(write=False)
    return out


def _list_textures(texture_dir: str) -> list[str]:
    folder = os.path.abspath(texture_dir)
    if not os.path.isdir(folder):
        raise LayoutError(
            f"texture folder {os.fspath(texture_dir)!r} does not exist (resolved to {folder!r}; "
            "simulation.texture_dir / --textures)"
        )
    found = find_images(folder)
    if not found:
        raise LayoutError(f"no texture images found in {folder!r} (searched recursively)")
    return found


class AnomalySimulator:
    """Draws simulated anomalies ``(I_a, M)`` from normal images (MAPL eqs. 1-2).

    Args:
        texture_dir: folder searched recursively for texture images (e.g. DTD); only listed
            here, decoded lazily and cached. None -> structure-only anomalies.
        foreground: where anomalies may appear, see :class:`ForegroundConfig` /
            :data:`FOREGROUND_PRESETS`.
        perlin_scale_range: ``(lo, hi)``; lattice cells per axis are ``2**e`` with
            ``e ~ randint[lo, hi)`` drawn independently for H and W (MemSeg: 0, 6).
        perlin_threshold: ``M_perlin = noise > perlin_threshold`` (MemSeg 0.5).
        perlin_rotation_range: noise rotation in degrees, uniform (MemSeg rotates the noise
            by -90..90 with imgaug's Affine).
        delta_range: ``(lo, hi)`` of the source opacity delta, 0 <= lo <= hi <= 1.
        texture_probability: chance of a texture source (else structure), MemSeg 0.5.
        structure_grid: the image is cut into ``g x g`` cells for the structure source.
        max_tries: noise redraws while ``M_perlin AND M_fg`` is empty.
        perlin_samples_per_cell: passed to :func:`perlin_noise_2d` (8: noise error < ~0.04,
            3-5x faster for coarse lattices; None: exact per-pixel noise).
        cache_size: maximum number of decoded ``(texture, size)`` entries kept.
        structure_augment: apply :func:`photometric_augment` to the image before the cells of the
            structure source are shuffled (MemSeg / MAPL do).
        textures: the texture files to draw from (a part of ``texture_dir``'s, see
            :func:`split_textures`); None: all files found in ``texture_dir``.

    Raises:
        LayoutError: ``texture_dir`` given but missing or holding no image file
            ("no texture images found in ...").
        ValueError: a parameter out of its range.
    """

    def __init__(
        self,
        texture_dir: str | os.PathLike[str] | None,
        foreground: ForegroundConfig = ForegroundConfig(),
        perlin_scale_range: tuple[int, int] = (0, 6),
        perlin_threshold: float = 0.5,
        delta_range: tuple[float, float] = (0.15, 1.0),
        texture_probability: float = 0.5,
        structure_grid: int = 8,
        max_tries: int = 10,
        perlin_rotation_range: tuple[float, float] = (-90.0, 90.0),
        perlin_samples_per_cell: int | None = 8,
        cache_size: int = 512,
        structure_augment: bool = True,
        textures: Sequence[str] | None = None,
    ) -> None:
        lo, hi = perlin_scale_range
        if not (0 <= int(lo) < int(hi)):
            raise ValueError(f"perlin_scale_range must satisfy 0 <= lo < hi, got {perlin_scale_range!r}")
        dlo, dhi = (float(delta_range[0]), float(delta_range[1]))
        if not (0.0 <= dlo <= dhi <= 1.0):
            raise ValueError(f"delta_range must satisfy 0 <= lo <= hi <= 1, got {delta_range!r}")
        if not 0.0 <= float(texture_probability) <= 1.0:
            raise ValueError(f"texture_probability must be in [0, 1], got {texture_probability!r}")
        if int(structure_grid) < 1:
            raise ValueError(f"structure_grid must be >= 1, got {structure_grid!r}")
        if int(max_tries) < 1:
            raise ValueError(f"max_tries must be >= 1, got {max_tries!r}")
        if not isinstance(foreground, ForegroundConfig):
            raise ValueError(f"foreground must be a ForegroundConfig, got {type(foreground).__name__}")
        self.texture_dir = os.path.abspath(os.fspath(texture_dir)) if texture_dir is not None else None
        listed = _list_textures(self.texture_dir) if self.texture_dir else []
        self.textures: list[str] = listed if textures is None else [os.path.abspath(t) for t in textures]
        self.foreground = foreground
        self.perlin_scale_range = (int(lo), int(hi))
        self.perlin_threshold = float(perlin_threshold)
        self.perlin_rotation_range = (float(perlin_rotation_range[0]), float(perlin_rotation_range[1]))
        if perlin_samples_per_cell is not None and int(perlin_samples_per_cell) < 1:
            raise ValueError(f"perlin_samples_per_cell must be >= 1 or None, got {perlin_samples_per_cell!r}")
        self.perlin_samples_per_cell = perlin_samples_per_cell
        self.delta_range = (dlo, dhi)
        self.texture_probability = float(texture_probability)
        self.structure_grid = int(structure_grid)
        self.max_tries = int(max_tries)
        self.cache_size = int(cache_size)
        self.structure_augment = bool(structure_augment)
        self._cache: dict[tuple[str, tuple[int, int]], np.ndarray] = {}

    # Ray/multiprocessing pickle the simulator per worker: do not ship the decoded cache.
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_cache"] = {}
        return state

    # -- pieces ---------------------------------------------------------------------------------
    def _texture(self, path: str, hw: tuple[int, int]) -> np.ndarray:
        key = (path, hw)
        arr = self._cache.get(key)
        if arr is None:
            arr = _read_rgb(path, hw)[0]  # raises ImageReadError naming the texture file
            arr.setflags(write=False)
            if len(self._cache) >= self.cache_size:
                self._cache.pop(next(iter(self._cache)))  # drop the oldest entry
            self._cache[key] = arr
        return arr

    def _structure(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Shuffle ``g x g`` cells of ``image`` and rotate/flip each (MemSeg structure source).

        Images not divisible by ``g`` are resized (bilinear) to the next multiple and back.
        Square cells get any of the 8 dihedral transforms; rectangular cells only those that
        keep their shape (identity, 180 degrees, flips).
        """
        if self.structure_augment:
            image = photometric_augment(image, rng)
        h, w = image.shape[:2]
        g = self.structure_grid
        ch, cw = -(-h // g), -(-w // g)  # ceil division
        work = image
        if (ch * g, cw * g) != (h, w):
            work = np.asarray(Image.fromarray(image).resize((cw * g, ch * g), Image.Resampling.BILINEAR))
        n = g * g
        perm = rng.permutation(n)
        k = rng.integers(0, 4, size=n) if ch == cw else 2 * rng.integers(0, 2, size=n)
        flip = rng.random(n) < 0.5
        # output cell j = source cell perm[j], rotated by k[j] quarter turns, then mirrored if flip[j]: one
        # gather of pixels through an index map (~3x faster than rotating / flipping copies of the cells)
        src = _cell_offsets(g, ch, cw)[perm][:, None, None] + _dihedral_offsets(ch, cw, g * cw)[2 * k + flip]
        idx = src.reshape(g, g, ch, cw).transpose(0, 2, 1, 3).reshape(g * ch, g * cw)
        out = np.take(np.ascontiguousarray(work).reshape(-1, 3), idx, axis=0)
        if out.shape[:2] != (h, w):
            out = np.asarray(Image.fromarray(out).resize((w, h), Image.Resampling.BILINEAR))
        return out

    def _perlin_mask(self, hw: tuple[int, int], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = self.perlin_scale_range
        res = (2 ** int(rng.integers(lo, hi)), 2 ** int(rng.integers(lo, hi)))
        angle = float(rng.uniform(*self.perlin_rotation_range))
        noise = perlin_noise_2d(hw, res, rng, angle=angle, samples_per_cell=self.perlin_samples_per_cell)
        return noise, noise > self.perlin_threshold

    # -- main -----------------------------------------------------------------------------------
    def __call__(
        self, image: np.ndarray, rng: np.random.Generator, foreground: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """Simulate one anomaly on ``image``.

        Args:
            image: uint8 ``[H, W, 3]`` RGB normal image (not modified).
            rng: the only source of randomness; equal seeds give equal outputs.
            foreground: ``image``'s object mask ``[H, W]`` (bool or {0, 1}) when the caller has it
                (:func:`~mapl_ray.data.foreground.foreground_masks` of the source image, transformed
                with it); None computes :func:`foreground_mask` with ``self.foreground``. The output is
                the same either way.

        Returns:
            ``(I_a, M, info)``: uint8 ``[H, W, 3]`` anomalous image, bit-identical to ``image``
            where ``M == 0``; uint8 ``[H, W]`` mask in {0, 1}, never empty; ``info`` with
            ``source`` ("texture" | "structure"), ``delta`` (float), ``texture`` (path or None),
            ``tries`` (noise draws used) and ``fallback`` (None; "perlin_only" when no noise
            blob met the foreground in ``max_tries`` draws and the foreground was ignored;
            "noise_quantile" when even the noise never exceeded the threshold and its top 10%
            was used).

        Raises:
            ValueError: ``image`` is not uint8 ``[H, W, 3]``, or ``foreground`` is not ``[H, W]``.
            TypeError: ``rng`` is not a ``numpy.random.Generator``.
            ImageReadError: the chosen texture file cannot be decoded.
        """
        check_rgb_image(image)
        if not isinstance(rng, np.random.Generator):
            raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
        hw = (int(image.shape[0]), int(image.shape[1]))

        # Eq. 1: M = M_perlin AND M_foreground, redrawing the noise while M is empty.
        if foreground is None:
            fg = foreground_mask(image, self.foreground).astype(bool)
        elif foreground.shape != hw:
            raise ValueError(f"foreground must have the image's shape {hw}, got {foreground.shape}")
        else:
            fg = foreground.astype(bool, copy=False)
        fg_any = bool(fg.any())
        mask = None
        last_pm = None
        fallback = None
        tries = 0
        for tries in range(1, self.max_tries + 1):  # noqa: B007 - the count is reported after the loop
            noise, pm = self._perlin_mask(hw, rng)
            if pm.any():
                last_pm = pm
                m = pm & fg
                if m.any():
                    mask = m
                    break
                if not fg_any:
                    break  # an empty foreground never intersects: no point redrawing
        if mask is None:
            if last_pm is not None:
                mask, fallback = last_pm, "perlin_only"
            else:
                mask, fallback = noise >= np.quantile(noise, 0.9), "noise_quantile"

        # Anomaly source I_n.
        use_texture = bool(self.textures) and rng.random() < self.texture_probability
        if use_texture:
            tex_path = self.textures[int(rng.integers(len(self.textures)))]
            source = self._texture(tex_path, hw)
        else:
            tex_path = None
            source = self._structure(image, rng)

        # Eq. 2, evaluated only on masked pixels so the rest stays bit-identical.
        delta = float(rng.uniform(*self.delta_range))
        # (pixels gathered by flat index and blended in place: ~5x faster than boolean indexing of 3-byte pixels)
        px = np.flatnonzero(mask)
        blended = np.take(np.ascontiguousarray(source).reshape(-1, 3), px, axis=0).astype(np.float32)
        blended *= delta
        kept = np.take(image.reshape(-1, 3), px, axis=0).astype(np.float32)
        kept *= 1.0 - delta
        blended += kept  # delta * I_n + (1 - delta) * I
        np.clip(np.rint(blended, out=blended), 0, 255, out=blended)
        out = image.copy()
        out.reshape(-1, 3)[px] = blended.astype(np.uint8)
        info = {
            "source": "texture" if use_texture else "structure",
            "delta": delta,
            "texture": tex_path,
            "tries": tries,
            "fallback": fallback,
        }
        return out, mask.astype(np.uint8), info


def split_textures(paths: Sequence[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """``(training textures, validation textures)``: a seeded ``fraction`` of the files held out, so the
    validation anomalies (:mod:`mapl_ray.data.validation`) use textures training never saw. Training
    keeps at least one file; the split depends on the file names, not their order."""
    ordered = sorted(paths)
    n_val = min(int(fraction * len(ordered)), max(0, len(ordered) - 1))
    held = set(np.random.default_rng([seed, 17]).choice(len(ordered), size=n_val, replace=False).tolist())
    return ([p for i, p in enumerate(ordered) if i not in held], [p for i, p in enumerate(ordered) if i in held])


def build_simulator(cfg: Config, part: str = "train") -> AnomalySimulator:
    """Anomaly simulator with the category's foreground preset and the config's overrides.

    Args:
        part: ``"train"`` draws from the training textures, ``"validation"`` from the
            ``simulation.validation_textures`` share held out of training (:func:`split_textures`,
            seeded by ``data.seed``); with no file held out, validation uses the training textures.

    Raises:
        LayoutError: the texture folder is missing or holds no image; ValueError: an unknown ``part``.
    """
    s = cfg.simulation
    fg = resolve_foreground(cfg)
    if part not in ("train", "validation"):
        raise ValueError(f"part must be 'train' or 'validation', got {part!r}")
    textures = None
    if s.texture_dir:
        train, held = split_textures(_list_textures(s.texture_dir), s.validation_textures, cfg.data.seed)
        textures = held if part == "validation" and held else train
    return AnomalySimulator(
        s.texture_dir,
        foreground=fg,
        perlin_scale_range=(0, s.perlin_max_scale),
        perlin_threshold=s.perlin_threshold,
        delta_range=(s.delta_min, s.delta_max),
        texture_probability=s.texture_probability,
        structure_grid=s.structure_grid,
        structure_augment=s.structure_augment,
        textures=textures,
    )
