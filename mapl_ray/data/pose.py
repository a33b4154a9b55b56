"""Pose normalisation: turn each image so its object lies in one canonical pose.

Parts photographed at arbitrary angles (MVTec AD ``screw``, loose parts on a belt) defeat the memory
module: the difference information DI* (MemSeg / MAPL eq. 7) compares an input with its nearest memory
sample position by position, which means little when the two objects point in different directions.
:class:`PoseEstimator` finds the object by grey-level thresholding (the same object definition as the
anomaly simulation's foreground mask), takes its centroid and principal axis from the image moments,
and picks the axis direction that points at the wider end (a screw's head). :meth:`Pose.apply` then
turns the image so the object lies horizontal, wider end to the left, with the middle of its extent on
the image centre (shrinking a part too long for the frame); masks get the same transform, and
:meth:`Pose.invert_map` brings an anomaly map computed in the aligned frame back onto the original image.

:class:`LandscapeTurn` (``data.align=landscape``) is the simplest pose: a portrait image is turned a
quarter turn so that every image is at least as wide as it is tall. The network squashes every image to a
square; images of mixed orientation (MVTec-layout crops such as magnetic tiles, aspect ratios 0.4-2.6) are
then stretched in one direction only, by at most their aspect ratio, instead of both ways.

This runs when images are decoded, at the file's own resolution, before resizing to the network's
input size (one interpolation instead of two). Resampling is Pillow's ``Image.transform`` (affine) and
``Image.transpose`` (quarter turns, exact).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..config import Config, ConfigError
from .foreground import object_pixels, resolve_foreground, rgb_to_grey

__all__ = ["Aligner", "LandscapeTurn", "Pose", "PoseEstimator"]


@dataclass(frozen=True)
class Pose:
    """Where an image's object is and how to turn it into the canonical pose.

    The transform (a similarity, applied with Pillow's ``Image.transform``) maps an input pixel ``p``
    to ``scale * M(angle) (p - c) + centre``: the middle of the object's extent ``c`` lands on the image
    centre, and the object turns counter-clockwise by ``angle``. With :attr:`quarter_turn` the image is
    first turned 90 degrees counter-clockwise (``Image.Transpose.ROTATE_90``: width and height swap), and
    the similarity then works on the turned frame.

    Attributes:
        cx, cy: middle of the object's extent along and across its axis, as fractions of the image
            width / height (resolution-free; the centroid would push a long part's thin end out of
            the frame).
        angle: degrees counter-clockwise (Pillow's ``rotate`` convention) that bring the direction
            towards the object's wider end to point left (-x).
        scale: 1, or less for a part too long to fit the frame once horizontal (it is shrunk to fit).
        size: ``(W, H)`` of the image the pose was estimated on; :meth:`invert_map` works at this
            size, so a map goes back exactly even when resizing to the network's input changed the
            aspect ratio.
        object_threshold, object_inverse: the object's grey-level rule (:class:`PoseEstimator`); in
            the mirrored margin :meth:`apply` replaces object pixels (mirror images of a part that
            touches the border) by ``fill``.
        fill: RGB median background colour (of the pixels outside the object).
        quarter_turn: turn the image a quarter turn counter-clockwise before the similarity
            (:class:`LandscapeTurn`).
    """

    cx: float
    cy: float
    angle: float
    scale: float = 1.0
    size: tuple[int, int] | None = None
    object_threshold: float | None = None
    object_inverse: bool = False
    fill: tuple[int, int, int] = (0, 0, 0)
    quarter_turn: bool = False

    def _similarity_is_identity(self) -> bool:
        return self.angle % 360.0 == 0.0 and self.scale == 1.0 and self.cx == 0.5 and self.cy == 0.5

    def _matrix(self, w: int, h: int, inverse: bool) -> tuple[float, ...]:
        # Pillow's AFFINE data maps output pixel coordinates to input ones (as Image.rotate builds it).
        a = math.radians(self.angle)
        c, s = math.cos(a), math.sin(a)
        px, py, ox, oy = self.cx * w, self.cy * h, w / 2, h / 2
        if not inverse:  # aligned (output) -> original (input): p = M^T (q - centre) / scale + c
            k = 1.0 / self.scale
            return (k * c, -k * s, px - k * (c * ox - s * oy), k * s, k * c, py - k * (s * ox + c * oy))
        k = self.scale  # original (output) -> aligned (input): q = scale M (p - c) + centre
        return (k * c, k * s, ox - k * (c * px + s * py), -k * s, k * c, oy - k * (-s * px + c * py))

    def apply(
        self, img: Image.Image, resample: int = Image.Resampling.BILINEAR, reflect: bool | None = None, fill=0
    ) -> Image.Image:
        """``img`` (any size, any mode) in the canonical pose, the same size as ``img`` (width and height
        swapped with :attr:`quarter_turn`).

        Where the turned frame reaches past the image, ``reflect`` (default: for RGB images) mirrors the
        image (``numpy.pad`` ``reflect``), with mirrored object pixels replaced by :attr:`fill`;
        otherwise (masks) those pixels get ``fill``. A grey (``"L"``) image with ``reflect=True`` is
        treated as an image too (its fill is :attr:`fill`'s grey level), so that a grey file can be
        turned at one channel: the result equals turning its RGB conversion, converted back."""
        if self.quarter_turn:
            img = img.transpose(Image.Transpose.ROTATE_90)
            if self._similarity_is_identity():
                return img
        w, h = img.size
        m = self._matrix(w, h, inverse=False)
        if reflect is None:
            reflect = img.mode == "RGB"
        if not reflect:
            return img.transform((w, h), Image.Transform.AFFINE, m, resample=resample, fillcolor=fill)
        # The turned frame's corners reach past the image; mirroring the image there, rather than
        # filling a constant, leaves no straight edges for the network to flag (they showed as lines
        # in early anomaly maps; H200 sweep: AUPRO 0.964 against 0.955 with a constant fill).
        # Those corners lie at most sqrt(2)/2 of the frame / scale from the centre, which sits within
        # a quarter frame of the image's middle.
        pad = int(math.ceil(max(w, h) * max(0.0, 0.71 / self.scale + 0.25 - 0.5)))
        if img.mode == "RGB":
            # Pillow holds RGB as 4 bytes a pixel (RGBX): padded as one uint32 each, the pixels go to and
            # from Pillow without repacking (the bilinear filter computes each channel alike)
            arr = np.frombuffer(img.tobytes("raw", "RGBX"), np.uint32).reshape(h, w)
            colour = np.frombuffer(bytes(self.fill) + b"\xff", np.uint32)[0]
        else:
            arr = np.asarray(img)
            colour = int(rgb_to_grey(np.asarray([[self.fill]], np.uint8))[0, 0]) if img.mode == "L" else fill
        src = arr
        if self.object_threshold is not None and img.mode in ("RGB", "L") and pad:
            # mirrored object pixels become the fill: the margin mirrors a copy of the image with its
            # object filled (the same pixels as masking the mirrored image, on a quarter of them)
            grey = arr if img.mode == "L" else np.asarray(img.convert("L"))
            src = arr.copy()
            src[object_pixels(grey, self.object_threshold, self.object_inverse)] = colour
        big = np.pad(src, ((pad, pad), (pad, pad), (0, 0))[: arr.ndim], mode="reflect")
        if src is not arr:
            big[pad : pad + h, pad : pad + w] = arr  # the image itself stays as it is
        m = (m[0], m[1], m[2] + pad, m[3], m[4], m[5] + pad)
        if img.mode != "RGB":
            return Image.fromarray(big).transform(
                (w, h), Image.Transform.AFFINE, m, resample=resample, fillcolor=colour
            )
        big_img = Image.frombuffer("RGBX", big.shape[::-1], big, "raw", "RGBX", 0, 1)  # no copy
        out = big_img.transform((w, h), Image.Transform.AFFINE, m, resample=resample, fillcolor=self.fill)
        return out.convert("RGB")

    def invert_map(self, amap: np.ndarray) -> np.ndarray:
        """An anomaly map ``[H, W]`` float computed on the aligned image, resampled (bilinear) onto the
        original image's frame at the same size; pixels the aligned frame did not cover get the map's
        minimum. Returns float32 ``[H, W]``. With :attr:`quarter_turn` the map is turned back a quarter
        turn clockwise; without :attr:`size` a square map keeps its size and another one comes back
        resized to ``[H, W]``."""
        a = np.asarray(amap, dtype=np.float32)
        h, w = a.shape
        img = Image.fromarray(a, mode="F")
        size = tuple(self.size) if self.size else (w, h)  # the original image's (W, H)
        frame = (size[1], size[0]) if self.quarter_turn else size  # the aligned image's (W, H)
        if frame != (w, h):
            img = img.resize(frame, Image.Resampling.BILINEAR)
        back = img
        if not (self.quarter_turn and self._similarity_is_identity()):
            back = img.transform(
                frame,
                Image.Transform.AFFINE,
                self._matrix(*frame, inverse=True),
                resample=Image.Resampling.BILINEAR,
                fillcolor=float(a.min()),
            )
        if self.quarter_turn:
            back = back.transpose(Image.Transpose.ROTATE_270)
        if back.size != (w, h):
            back = back.resize((w, h), Image.Resampling.BILINEAR)
        return np.asarray(back, dtype=np.float32)


class PoseEstimator:
    """Estimates each image's :class:`Pose` from its grey-level object mask.

    The object is ``grey <= threshold`` (``inverse``, a dark part on a bright background) or
    ``grey > threshold``; its centroid and second moments give the principal axis, and the sign of the
    mixed third moment ``sum(perp^2 * along)`` says towards which end the object is wider.

    Args:
        threshold: grey level 0..255 (a foreground preset's ``threshold``,
            :data:`mapl_ray.data.simulation.FOREGROUND_PRESETS`).
        inverse: True -> the object is darker than the threshold.
        min_fraction: an object covering less than this fraction of the image (or more than
            ``1 - min_fraction``) has no reliable pose: :meth:`__call__` returns None and the image is
            used as it is.
        analysis_size: the moments are computed on a copy reduced to at most this many pixels a side.
        margin: free border, as a fraction of the frame, that the turned part keeps on each side; a
            part that would not fit is shrunk (:attr:`Pose.scale` < 1).

    Raises:
        ValueError: ``threshold`` outside [0, 255], ``min_fraction`` or ``margin`` outside [0, 0.5),
            or ``analysis_size`` < 16.
    """

    def __init__(
        self,
        threshold: float,
        inverse: bool,
        min_fraction: float = 0.002,
        analysis_size: int = 256,
        margin: float = 0.02,
    ):
        if not 0 <= threshold <= 255:
            raise ValueError(f"pose threshold must be a grey level in [0, 255], got {threshold}")
        if not 0 <= min_fraction < 0.5:
            raise ValueError(f"pose min_fraction must be in [0, 0.5), got {min_fraction}")
        if analysis_size < 16:
            raise ValueError(f"pose analysis_size must be >= 16, got {analysis_size}")
        if not 0 <= margin < 0.5:
            raise ValueError(f"pose margin must be in [0, 0.5), got {margin}")
        self.margin = float(margin)
        self.threshold = float(threshold)
        self.inverse = bool(inverse)
        self.min_fraction = float(min_fraction)
        self.analysis_size = int(analysis_size)

    def __repr__(self) -> str:
        return f"PoseEstimator(threshold={self.threshold:g}, inverse={self.inverse})"

    def __call__(self, img: Image.Image) -> Pose | None:
        """The pose of ``img`` (a Pillow image, RGB or grey), or None when no object was found."""
        factor = max(1, math.ceil(max(img.size) / self.analysis_size))
        small = img.reduce(factor) if factor > 1 else img
        grey = np.asarray(small if small.mode == "L" else small.convert("L"))
        h, w = grey.shape
        fg = object_pixels(grey, self.threshold, self.inverse)
        n = int(fg.sum())
        if n < self.min_fraction * h * w or n > (1 - self.min_fraction) * h * w:
            return None
        ys, xs = np.divmod(np.flatnonzero(fg), w)  # np.nonzero(fg), in a third of the time
        xs = xs + 0.5
        ys = ys + 0.5
        cx, cy = xs.mean(), ys.mean()
        dx, dy = xs - cx, ys - cy
        axis = 0.5 * math.atan2(2 * (dx * dy).mean(), (dx * dx).mean() - (dy * dy).mean())
        proj = dx * math.cos(axis) + dy * math.sin(axis)
        perp = dy * math.cos(axis) - dx * math.sin(axis)
        # Mixed third moment: positive when the object is wider towards +axis (a screw's head); the
        # mass balance along the axis got 7 of 472 screw images wrong, this none.
        if (perp * perp * proj).sum() < 0:
            axis += math.pi  # point the axis at the wider end
            proj, perp = -proj, -perp
        # extent along and across the axis (0.2 % quantiles: a few dark specks do not stretch it)
        lo, hi = np.quantile(proj, [0.002, 0.998])
        plo, phi = np.quantile(perp, [0.002, 0.998])
        ux, uy = math.cos(axis), math.sin(axis)
        mx = cx + (lo + hi) / 2 * ux - (plo + phi) / 2 * uy
        my = cy + (lo + hi) / 2 * uy + (plo + phi) / 2 * ux
        room = 1.0 - 2 * self.margin
        scale = min(1.0, room * w / max(hi - lo, 1e-6), room * h / max(phi - plo, 1e-6))
        # Pillow rotates counter-clockwise on screen; with y pointing down a direction at angle
        # `axis` ends at `axis - a`, which must be pi (left).
        angle = (math.degrees(axis) - 180.0) % 360.0
        if small.mode == "L":  # a grey image: R = G = B = grey
            fill = _background_median(grey[..., None], fg) * 3
        else:
            fill = _background_median(np.asarray(small if small.mode == "RGB" else small.convert("RGB")), fg)
        return Pose(mx / w, my / h, angle, scale, img.size, self.threshold, self.inverse, fill)


class LandscapeTurn:
    """``data.align=landscape``: the :class:`Pose` that turns a portrait image (taller than wide) a quarter
    turn counter-clockwise; None for an image at least as wide as tall (used as it is).

    Same call signature as :class:`PoseEstimator`, so every decoder that takes ``align`` takes it. It reads
    the image's size only; no pixel is looked at.
    """

    def __repr__(self) -> str:
        # the data.align value: shard metadata and messages name the setting a user wrote
        return "landscape"

    def __call__(self, img: Image.Image) -> Pose | None:
        """The quarter-turn pose of ``img`` (a Pillow image of any mode) if its height exceeds its width."""
        w, h = img.size
        return Pose(0.5, 0.5, 0.0, 1.0, (w, h), quarter_turn=True) if h > w else None


#: what ``data.align`` builds (:func:`build_pose_estimator`) and every decoder's ``align`` takes
Aligner = PoseEstimator | LandscapeTurn


def _background_median(rgb: np.ndarray, fg: np.ndarray) -> tuple[int, ...]:
    """Per channel, the median of the uint8 ``rgb`` ``[H, W, C]`` pixels outside the bool mask ``fg``
    (at least one), rounded down: ``int(np.median(rgb[~fg], axis=0))`` exactly, from 256-bin histograms
    (the image's minus the object's) instead of sorting the background (~50x faster at 256 x 256)."""
    out = []
    for c in range(rgb.shape[2]):
        ch = rgb[..., c]
        counts = np.bincount(ch.ravel(), minlength=256) - np.bincount(ch[fg], minlength=256)
        below = np.cumsum(counts)  # below[v]: background pixels <= v
        n = int(below[-1])
        # the (n - 1) // 2-th and n // 2-th smallest values (0-based; the same one when n is odd)
        lo, hi = np.searchsorted(below, [(n - 1) // 2, n // 2], side="right")
        out.append((int(lo) + int(hi)) // 2)
    return tuple(out)


def build_pose_estimator(cfg: Config) -> Aligner | None:
    """The pose estimator ``data.align`` asks for: None for ``"none"``, :class:`LandscapeTurn` for
    ``"landscape"``, and for ``"principal_axis"`` a :class:`PoseEstimator` that finds the object with the
    simulation's threshold (:func:`resolve_foreground`).

    Raises:
        ConfigError: ``data.align=principal_axis`` for a category without an object threshold
            (no foreground preset that uses a mask, no ``simulation.foreground_threshold``).
    """
    if cfg.data.align == "none":
        return None
    if cfg.data.align == "landscape":
        return LandscapeTurn()
    fg = resolve_foreground(cfg)
    if not fg.use_mask and cfg.simulation.foreground_threshold is None:
        raise ConfigError(
            f"data.align={cfg.data.align} needs the grey level that separates the object from the "
            f"background, and category {cfg.data.category!r} has no foreground preset that uses one: set "
            "simulation.foreground_threshold (0-255) and simulation.foreground_inverse (true for a dark "
            "object on a bright background)"
        )
    return PoseEstimator(fg.threshold, fg.inverse)
