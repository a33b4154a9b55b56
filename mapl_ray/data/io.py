"""Image and mask decoding with Pillow into fixed-size numpy arrays.

Conventions: images are ``uint8`` ``[H, W, 3]`` RGB, masks ``uint8`` ``[H, W]`` in {0, 1};
sizes are given as ``(H, W)`` (numpy order, *not* Pillow's ``(W, H)``). Resizing uses
Pillow's BILINEAR filter for images (as the MAPL reference code, ``Image.resize``) and
NEAREST for masks so they stay binary.

Every decode applies the file's EXIF orientation (tag 0x0112, ``PIL.ImageOps.exif_transpose``), as
photo viewers do: a camera that stores a portrait shot as landscape pixels plus "rotate 90" is
scored, trained on and masked in the orientation a person sees. Untrusted bytes (HTTP uploads) go
through :func:`decode_upload`, which checks :class:`DecodeLimits` on the header before any pixel
is decoded.
"""

from __future__ import annotations

import logging
import os
import re
import struct
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .layout import ImageReadError, ImageRecord, LayoutError
from .pose import Aligner, Pose

log = logging.getLogger(__name__)

__all__ = [
    "DecodeLimits",
    "DecodedUpload",
    "ImageLimitError",
    "decode_image",
    "decode_upload",
    "LoadedImages",
    "SIXTEEN_BIT_MODES",
    "decode_file",
    "image_size",
    "load_image",
    "load_mask",
    "load_records",
    "normalize_size",
]

# Exceptions Pillow raises for missing, unidentified, truncated or corrupt files. PNG chunk/CRC
# errors surface as SyntaxError, short headers as struct.error / EOFError.
_PIL_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    struct.error,
    IndexError,
    TypeError,
    Image.DecompressionBombError,
)

#: Pillow modes of 16-bit images (always rescaled to 8 bits, value / 257; a 32-bit "I" image is too when
#: its values pass 255).
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})

#: Threads used by :func:`load_records`; PIL releases the GIL while decoding.
DEFAULT_THREADS = 4

_EXIF_ORIENTATION = 0x0112
#: EXIF orientations that turn the image by 90 degrees (width and height swap).
_SWAPPING_ORIENTATIONS = frozenset({5, 6, 7, 8})
ANIMATED_POLICIES = ("first", "refuse")
#: the default limits of images a user sends to a trained model (``mapl serve``, ``mapl predict``)
DEFAULT_MAX_PIXELS = 40_000_000
DEFAULT_MAX_ASPECT = 4.0


def default_min_side(image_size: int) -> int:
    """The default :attr:`DecodeLimits.min_side` for a model of ``image_size`` px: an eighth of it (at least 8),
    below which an image would be upscaled more than 8x to be scored."""
    return max(8, int(image_size) // 8)


class ImageLimitError(ImageReadError):
    """An image is refused by a :class:`DecodeLimits` rule (found on its header, before decoding).

    Attributes:
        limit: the :class:`DecodeLimits` field that refused it (``max_pixels``, ``min_side``,
            ``max_aspect``, ``animated``).
        value: what the image has (pixels, shortest side, aspect ratio, frames; None when unknown).
        allowed: the limit's value.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        reason: str,
        limit: str,
        value: float | None = None,
        allowed: float | str | None = None,
    ) -> None:
        super().__init__(path, reason)
        self.limit, self.value, self.allowed = limit, value, allowed

    def __reduce__(self):
        return (type(self), (self.path, self.reason, self.limit, self.value, self.allowed))


@dataclass(frozen=True)
class DecodeLimits:
    """What an untrusted image may be; checked on the header (size, frames) before any pixel is decoded.

    Attributes:
        max_pixels: most ``W * H`` pixels (decompression bombs: a 0.4 MB PNG can hold 12000x12000
            pixels, 1 GB decoded). None: only Pillow's own limit (``Image.MAX_IMAGE_PIXELS`` x 2).
        min_side: fewest pixels on the shorter side (a 1x1 "image" would be upscaled and scored).
        max_aspect: largest long side / short side ratio (the model squashes every image to a square).
        animated: ``"first"`` scores the first frame of an animated GIF / PNG / WebP / multi-page
            TIFF (the frame count is reported), ``"refuse"`` refuses such files.

    Raises:
        ValueError: a non-positive limit, ``max_aspect`` < 1 or an unknown ``animated`` policy.
    """

    max_pixels: int | None = None
    min_side: int | None = None
    max_aspect: float | None = None
    animated: str = "first"

    def __post_init__(self) -> None:
        for name in ("max_pixels", "min_side"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1):
                raise ValueError(f"DecodeLimits.{name} must be a positive int or None, got {v!r}")
        if self.max_aspect is not None and not (isinstance(self.max_aspect, (int, float)) and self.max_aspect >= 1):
            raise ValueError(f"DecodeLimits.max_aspect must be a number >= 1 or None, got {self.max_aspect!r}")
        if self.animated not in ANIMATED_POLICIES:
            raise ValueError(f"DecodeLimits.animated must be one of {ANIMATED_POLICIES}, got {self.animated!r}")

    @classmethod
    def for_model(cls, image_size: int) -> DecodeLimits:
        """The default limits for images scored by a model of ``image_size`` px (``mapl serve``'s defaults):
        :data:`DEFAULT_MAX_PIXELS`, :func:`default_min_side`, :data:`DEFAULT_MAX_ASPECT`, first frame."""
        return cls(DEFAULT_MAX_PIXELS, default_min_side(image_size), DEFAULT_MAX_ASPECT, "first")

    def check(self, name: str, width: int, height: int, frames: int = 1) -> None:
        """Raise :class:`ImageLimitError` (naming ``name`` and the limit) when a ``width`` x ``height``
        image of ``frames`` frames breaks a rule; the rules are orientation-free."""
        pixels, short, long_ = width * height, min(width, height), max(width, height)
        if self.max_pixels is not None and pixels > self.max_pixels:
            raise ImageLimitError(
                name,
                f"{width}x{height} (WxH) is {pixels:,} pixels, more than the limit max_pixels={self.max_pixels:,}",
                "max_pixels",
                pixels,
                self.max_pixels,
            )
        if short < 1:
            raise ImageLimitError(name, f"{width}x{height} (WxH) has no pixels", "min_side", short, self.min_side or 1)
        if self.min_side is not None and short < self.min_side:
            raise ImageLimitError(
                name,
                f"{width}x{height} (WxH): the shorter side is {short} px, below the limit min_side={self.min_side}",
                "min_side",
                short,
                self.min_side,
            )
        if self.max_aspect is not None and long_ / short > self.max_aspect:
            raise ImageLimitError(
                name,
                f"{width}x{height} (WxH) has aspect ratio {long_ / short:.2f}, above the limit "
                f"max_aspect={self.max_aspect:g}",
                "max_aspect",
                long_ / short,
                self.max_aspect,
            )
        if frames > 1 and self.animated == "refuse":
            raise ImageLimitError(
                name,
                f"an animated / multi-frame image ({frames} frames) and animated='refuse' (send one still frame)",
                "animated",
                frames,
                self.animated,
            )


@dataclass
class DecodedUpload:
    """Result of :func:`decode_upload`.

    Attributes:
        image: ``uint8`` ``[H, W, 3]`` RGB at the requested size (aligned when ``align`` was given).
        original_size: ``(H, W)`` of the image as seen, i.e. after its EXIF orientation, before resizing.
        pose: the pose ``align`` turned it into (None without ``align`` or when no object was found).
        format: Pillow's format name (``"PNG"``, ``"JPEG"``...).
        mode: Pillow's mode of the stored pixels (``"RGB"``, ``"P"``, ``"I;16"``...), before conversion.
        frames: frames in the file (only the first is decoded).
        orientation: the EXIF orientation applied (1: none).
    """

    image: np.ndarray
    original_size: tuple[int, int]
    pose: Pose | None
    format: str | None
    mode: str
    frames: int
    orientation: int

    def warnings(self) -> list[str]:
        """What a user should know about how the file was read: only the first of several frames, or 16-bit
        values rescaled to 8 bits (``mapl serve``'s answer and ``mapl predict``'s line carry them)."""
        out = []
        if self.frames > 1:
            out.append(f"animated / multi-frame image ({self.frames} frames): only the first frame was scored")
        if self.mode in SIXTEEN_BIT_MODES or self.mode == "I":
            out.append(f"{self.mode} (16-bit) image: rescaled to 8 bits (value / 257), as in training")
        return out


def normalize_size(size: int | tuple[int, int] | None, what: str = "size") -> tuple[int, int] | None:
    """Turn ``size`` (int -> square, ``(H, W)`` tuple, or None) into ``(H, W)`` or None.

    Raises:
        ValueError: non-positive or malformed size; the message names ``what``.
    """
    if size is None:
        return None
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        hw = (int(size), int(size))
    elif (
        isinstance(size, (tuple, list))
        and len(size) == 2
        and all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in size)
    ):
        hw = (int(size[0]), int(size[1]))
    else:
        raise ValueError(f"{what} must be an int, an (H, W) pair of ints or None, got {size!r}")
    if hw[0] <= 0 or hw[1] <= 0:
        raise ValueError(f"{what} must be positive, got {size!r}")
    return hw


def _to_grey8(img: Image.Image) -> np.ndarray:
    """Decode ``img`` to a uint8 ``[H, W]`` grey array, rescaling 16-bit / 32-bit data.

    Pillow's own ``convert("L")`` clips 16-bit values at 255 instead of rescaling, which turns
    most 16-bit images white; 16-bit modes are therefore divided by 257 (65535 -> 255). Mode
    ``"I"`` (32-bit int, how Pillow opens some 16-bit PNGs) is treated as 16-bit data when its
    maximum exceeds 255, else as 8-bit. Mode ``"F"`` is clipped to [0, 255].
    """
    if img.mode in SIXTEEN_BIT_MODES or img.mode == "I":
        a = np.asarray(img).astype(np.float32)
        if img.mode in SIXTEEN_BIT_MODES or a.max(initial=0.0) > 255.0:
            a = a / 257.0
        return np.clip(np.rint(a), 0, 255).astype(np.uint8)
    if img.mode == "F":
        return np.clip(np.rint(np.asarray(img, dtype=np.float32)), 0, 255).astype(np.uint8)
    return np.asarray(img.convert("L"), dtype=np.uint8)


def _to_rgb_image(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to an 8-bit ``"RGB"`` image.

    Alpha channels (RGBA, LA, PA) are discarded, not composited, so the colour values of the
    object are kept as stored. Palette images with transparency go through RGBA first
    (Pillow warns otherwise).
    """
    img = _to_grey_or_rgb_image(img)
    return img if img.mode == "RGB" else img.convert("RGB")


def _to_grey_or_rgb_image(img: Image.Image) -> Image.Image:
    """:func:`_to_rgb_image`, except that grey images (8-bit ``"L"``, 16-bit, ``"I"``, ``"F"``) stay one
    8-bit ``"L"`` channel: their RGB conversion repeats it, so the pose and the resize can run at one
    channel and the channel be repeated at the end (Pillow's bilinear filters compute each channel alike)."""
    if img.mode in ("RGB", "L"):
        return img
    if img.mode in SIXTEEN_BIT_MODES or img.mode in ("I", "F"):
        return Image.fromarray(_to_grey8(img), mode="L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


def _exif_orientation(im: Image.Image, header_only: bool = False) -> int:
    """EXIF orientation tag (1..8) of an opened image, 1 when absent or not a valid value.

    ``header_only``: do not decode a PNG to look for an eXIf chunk after the pixel data (Pillow's
    ``getexif`` would); such a late chunk is then ignored (the PNG spec puts eXIf before IDAT)."""
    if header_only and im.format == "PNG" and "exif" not in im.info:
        return 1
    value = im.getexif().get(_EXIF_ORIENTATION, 1)
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _open_decoded(path: str, source=None, limits: DecodeLimits | None = None) -> tuple[Image.Image, dict]:
    """Open and fully decode ``path`` (or the file object ``source``, named ``path`` in errors), turned by
    its EXIF orientation; returns the image and ``{"format", "mode", "frames", "orientation"}`` of the file.

    ``limits`` are checked on the header, before decoding. Every Pillow failure is wrapped in
    :class:`ImageReadError`; a limit (or Pillow's decompression-bomb check, when ``limits`` are given)
    raises :class:`ImageLimitError`.
    """
    try:
        with Image.open(path if source is None else source) as im:
            frames = int(getattr(im, "n_frames", 1))
            if limits is not None:
                limits.check(path, im.width, im.height, frames)
            orientation = _exif_orientation(im)
            im.load()  # force the decode here so truncation errors surface now, not later
            info = {"format": im.format, "mode": im.mode, "frames": frames, "orientation": orientation}
            # exif_transpose returns a new image (a plain copy at orientation 1) that owns its pixel
            # buffer, detached from the file handle
            return ImageOps.exif_transpose(im), info
    except ImageReadError:  # an ImageLimitError from limits.check
        raise
    except Image.DecompressionBombError as exc:
        if limits is None:
            raise ImageReadError(path, f"{type(exc).__name__}: {exc}") from exc
        # Pillow refuses the header before the size can be read back; its message holds the pixel count
        found = re.search(r"\((\d+) pixels\)", str(exc))
        pixels = int(found.group(1)) if found else None
        allowed = limits.max_pixels or Image.MAX_IMAGE_PIXELS * 2
        reason = (
            f"{pixels:,} pixels, more than the limit max_pixels={allowed:,}"
            if pixels
            else f"{exc} (Pillow's decompression-bomb limit)"
        )
        raise ImageLimitError(path, reason, "max_pixels", pixels, allowed) from exc
    except _PIL_ERRORS as exc:
        if source is None and isinstance(exc, UnidentifiedImageError) and os.path.getsize(path) == 0:
            reason = "empty file (0 bytes)"
        elif isinstance(exc, UnidentifiedImageError):  # the path is in the message already: say what it means
            reason = "not an image in a format Pillow reads"
        elif isinstance(exc, FileNotFoundError):
            reason = "no such file"
        elif source is None:
            reason = f"{type(exc).__name__}: {exc}"
        else:
            reason = f"{type(exc).__name__}: {str(exc).replace(repr(source), 'the data')}"
        raise ImageReadError(path, reason) from exc


def _resize(img: Image.Image, hw: tuple[int, int] | None, resample: int) -> Image.Image:
    if hw is None or (img.height, img.width) == hw:
        return img
    return img.resize((hw[1], hw[0]), resample=resample)


def _read_rgb(
    path: str,
    hw: tuple[int, int] | None,
    source=None,
    align: Aligner | None = None,
    limits: DecodeLimits | None = None,
) -> tuple[np.ndarray, tuple[int, int], Pose | None, dict]:
    """Decode ``path`` (or ``source``) -> (uint8 ``[H, W, 3]`` resized array, original ``(H, W)``, pose,
    file info of :func:`_open_decoded`).

    With ``align`` the image is turned into its object's canonical pose (or landscape, ``data.align``) at its
    own resolution, before resizing; the pose is None without ``align`` or when it leaves the image as it is."""
    img, info = _open_decoded(path, source, limits)
    orig_hw = (img.height, img.width)
    pose = None
    try:
        work = _to_grey_or_rgb_image(img)  # a grey file is turned and resized at one channel
        if align is not None:
            pose = align(work)
            if pose is not None:
                work = pose.apply(work, Image.Resampling.BILINEAR, reflect=True)
        work = _resize(work, hw, Image.Resampling.BILINEAR)
        arr = np.asarray(work)
        # a new array either way: writable, unlike asarray's view of Pillow's buffer
        arr = np.stack([arr] * 3, axis=-1) if arr.ndim == 2 else arr.copy()
    except _PIL_ERRORS as exc:  # e.g. a mode Pillow cannot convert
        raise ImageReadError(path, f"{type(exc).__name__}: {exc}") from exc
    return arr, orig_hw, pose, info


def load_image(
    path: str | os.PathLike[str],
    size: int | tuple[int, int] | None = None,
    align: Aligner | None = None,
    return_pose: bool = False,
    limits: DecodeLimits | None = None,
):
    """Decode an image file to RGB.

    Args:
        path: image file (any format Pillow reads).
        size: output size: int ``s`` -> ``(s, s)``, ``(H, W)`` tuple, or None to keep the
            original size. Resized with Pillow BILINEAR.
        align: turn the image first as ``data.align`` asks (:func:`~mapl_ray.data.pose.build_pose_estimator`:
            the object's canonical pose, or a portrait image to landscape).
        return_pose: also return the :class:`~mapl_ray.data.pose.Pose` applied (None if none was).
        limits: refuse, on the header, an image that breaks these :class:`DecodeLimits` (None: none but
            Pillow's decompression-bomb limit).

    Returns:
        ``uint8`` array ``[H, W, 3]``, RGB (with ``return_pose``: ``(array, pose)``). Grayscale,
        palette, CMYK and 16-bit images are converted (16-bit rescaled by 1/257); alpha is dropped.

    Raises:
        ImageReadError: missing, unreadable, corrupt or truncated file; the message names the
            path and Pillow's reason, the Pillow exception is chained as ``__cause__``.
        ImageLimitError: ``limits`` refused the image (an :class:`ImageReadError`; names the limit).
        ValueError: invalid ``size``.
    """
    d = decode_file(path, size, align, limits)
    return (d.image, d.pose) if return_pose else d.image


def decode_image(
    data: bytes,
    name: str = "<upload>",
    size: int | tuple[int, int] | None = None,
    return_original_size: bool = False,
    align: Aligner | None = None,
    return_pose: bool = False,
    limits: DecodeLimits | None = None,
):
    """:func:`load_image` for encoded bytes (an HTTP upload): any format Pillow reads, to RGB uint8 ``[H, W, 3]``.

    With ``return_original_size`` and / or ``return_pose`` returns a tuple: the image, then
    ``(H, W)`` before resizing, then the pose applied by ``align`` (see :func:`load_image`). ``limits``:
    as in :func:`decode_upload`.

    Raises:
        ImageReadError: empty or undecodable data, or ``limits`` refused it; the message names ``name``.
        ValueError: invalid ``size``.
    """
    d = decode_upload(data, name, size, align=align, limits=limits)
    out = (d.image,) + ((d.original_size,) if return_original_size else ()) + ((d.pose,) if return_pose else ())
    return out if len(out) > 1 else d.image


def decode_file(
    path: str | os.PathLike[str],
    size: int | tuple[int, int] | None = None,
    align: Aligner | None = None,
    limits: DecodeLimits | None = None,
) -> DecodedUpload:
    """:func:`load_image` that also says what the file was (:class:`DecodedUpload`: format, mode, frames,
    EXIF orientation, original size, pose), as :func:`decode_upload` does for bytes.

    Raises:
        ImageReadError: missing, unreadable, corrupt or truncated file (names the path).
        ImageLimitError: ``limits`` refused the image.
        ValueError: invalid ``size``.
    """
    image, orig_hw, pose, info = _read_rgb(os.fspath(path), normalize_size(size), align=align, limits=limits)
    return DecodedUpload(image=image, original_size=orig_hw, pose=pose, **info)


def decode_upload(
    data: bytes,
    name: str = "<upload>",
    size: int | tuple[int, int] | None = None,
    align: Aligner | None = None,
    limits: DecodeLimits | None = None,
) -> DecodedUpload:
    """Decode untrusted encoded bytes (an HTTP upload) as :func:`load_image` decodes a file, refusing
    what breaks ``limits`` on the header, before any pixel is decoded.

    Args:
        data: the bytes of one image file (any format Pillow reads; EXIF orientation applied).
        name: how errors name the image (the upload's file name).
        size: output size as in :func:`load_image`.
        align: pose estimator as in :func:`load_image`.
        limits: the :class:`DecodeLimits` to enforce (None: Pillow's own decompression-bomb limit only).

    Returns:
        :class:`DecodedUpload` (the RGB uint8 image and what the file was).

    Raises:
        ImageLimitError: a limit refused the image (names ``name`` and the limit).
        ImageReadError: empty, truncated, corrupt or not an image; the message names ``name``.
        ValueError: invalid ``size``.
    """
    import io

    if not data:
        raise ImageReadError(name, "empty (0 bytes; expected the bytes of an image file)")
    image, orig_hw, pose, info = _read_rgb(name, normalize_size(size), io.BytesIO(data), align=align, limits=limits)
    return DecodedUpload(image=image, original_size=orig_hw, pose=pose, **info)


def load_mask(
    path: str | os.PathLike[str],
    size: int | tuple[int, int] | None = None,
    expected_hw: tuple[int, int] | None = None,
    pose: Pose | None = None,
) -> np.ndarray:
    """Decode a ground-truth mask to {0, 1}.

    The mask is converted to 8-bit grey and binarised at ``> 127`` (MVTec masks are {0, 255}).
    Masks stored as {0, 1} (maximum value 1) are recognised and binarised at ``> 0`` instead,
    because thresholding them at 127 would silently return an empty mask.

    Args:
        path: mask file.
        size: output ``(H, W)`` (or int for square), resized NEAREST; None keeps the size.
        expected_hw: original ``(H, W)`` of the image the mask belongs to, checked against the
            mask's original size *before* resizing.
        pose: the pose its image was turned into (:func:`load_image` ``align``); the mask is turned
            the same way (NEAREST) before resizing.

    Returns:
        ``uint8`` array ``[H, W]`` with values in {0, 1}.

    Raises:
        ImageReadError: file missing or not decodable.
        LayoutError: the mask's original size differs from ``expected_hw``.
        ValueError: invalid ``size``.
    """
    p = os.fspath(path)
    hw = normalize_size(size)
    img, _ = _open_decoded(p)
    mask_hw = (img.height, img.width)
    if expected_hw is not None and tuple(expected_hw) != mask_hw:
        raise LayoutError(
            f"mask {p!r} is {mask_hw[0]}x{mask_hw[1]} (HxW) but its image is "
            f"{expected_hw[0]}x{expected_hw[1]}: a mask must have its image's size"
        )
    try:
        grey = _to_grey8(img)
    except _PIL_ERRORS as exc:
        raise ImageReadError(p, f"{type(exc).__name__}: {exc}") from exc
    thr = 0 if grey.max(initial=0) == 1 else 127
    binary = (grey > thr).astype(np.uint8)
    if pose is not None:
        binary = np.asarray(
            pose.apply(Image.fromarray(binary, mode="L"), Image.Resampling.NEAREST, fill=0), dtype=np.uint8
        )
    if hw is not None and hw != mask_hw:
        # NEAREST on the {0,1} array keeps it binary (Pillow mode "L" round-trips uint8 exactly).
        binary = np.asarray(
            Image.fromarray(binary, mode="L").resize((hw[1], hw[0]), Image.Resampling.NEAREST),
            dtype=np.uint8,
        )
    return np.ascontiguousarray(binary)


def image_size(path: str | os.PathLike[str]) -> tuple[int, int]:
    """Original ``(H, W)`` of an image as decoded (after its EXIF orientation), read from its header
    (pixels are not decoded).

    Raises:
        ImageReadError: missing file or unidentifiable header.
    """
    p = os.fspath(path)
    try:
        with Image.open(p) as im:
            w, h = im.size
            # Pillow turns TIFFs by their orientation tag itself, size included
            if im.format != "TIFF" and _exif_orientation(im, header_only=True) in _SWAPPING_ORIENTATIONS:
                w, h = h, w
    except _PIL_ERRORS as exc:
        raise ImageReadError(p, f"{type(exc).__name__}: {exc}") from exc
    return (h, w)


@dataclass
class LoadedImages:
    """Result of :func:`load_records`.

    Attributes:
        images: ``uint8`` ``[N, H, W, 3]`` RGB.
        masks: ``uint8`` ``[N, H, W]`` in {0, 1} when loaded with ``with_masks=True``
            (zeros for records without ``mask_path``), else None.
        records: the N records kept, aligned with ``images`` / ``masks``.
        skipped: ``(path, reason)`` of each record dropped because a file was unreadable.
        poses: with ``align``, the pose each kept image was turned into (None: no object found,
            image kept as it was); None without ``align``.
    """

    images: np.ndarray
    masks: np.ndarray | None
    records: list[ImageRecord]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    poses: list[Pose | None] | None = None


def _load_one(
    rec: ImageRecord, hw: tuple[int, int] | None, with_masks: bool, align: Aligner | None
) -> tuple[np.ndarray, np.ndarray | None, Pose | None]:
    img, orig_hw, pose, _ = _read_rgb(rec.path, hw, align=align)
    if not with_masks:
        return img, None, pose
    if rec.mask_path is None:
        return img, np.zeros(img.shape[:2], dtype=np.uint8), pose
    return img, load_mask(rec.mask_path, hw, expected_hw=orig_hw, pose=pose), pose


def load_records(
    records: Sequence[ImageRecord],
    size: int | tuple[int, int] | None,
    skip_bad: bool = False,
    with_masks: bool = False,
    *,
    threads: int = DEFAULT_THREADS,
    align: Aligner | None = None,
) -> LoadedImages:
    """Decode many records in parallel (thread pool; Pillow decodes without the GIL).

    Args:
        records: images to load; order is preserved.
        size: common output ``(H, W)`` / int; None is allowed only if all images share a size.
        skip_bad: False -> after every record was tried, an :class:`ImageReadError` names the first
            unreadable image/mask (in record order) and lists the others (``others``); True -> each
            is dropped with a logged warning naming the file (logger ``mapl_ray.data.io``) and listed in ``skipped``.
        with_masks: also load ``mask_path`` masks (zeros where a record has none).
        threads: worker threads (default 4).
        align: turn each image (and its mask) as ``data.align`` asks (:mod:`mapl_ray.data.pose`); the poses
            are returned in ``poses``.

    Returns:
        :class:`LoadedImages`. With no record kept, ``images`` has shape ``[0, H, W, 3]``
        (``[0, 0, 0, 3]`` when ``size`` is None).

    Raises:
        ImageReadError: unreadable file and ``skip_bad`` False.
        LayoutError: mask size differs from its image's (always, also with ``skip_bad``:
            it is a data-set layout fault, not a bad file); differing image sizes with
            ``size=None``.
        ValueError: invalid ``size`` / ``threads``.
        TypeError: an element of ``records`` is not an :class:`ImageRecord`.
    """
    hw = normalize_size(size)
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    records = list(records)
    for i, r in enumerate(records):
        if not isinstance(r, ImageRecord):
            raise TypeError(f"records[{i}] must be an ImageRecord, got {type(r).__name__}")
    if not records:
        out_hw = hw if hw is not None else (0, 0)
        return LoadedImages(
            images=np.zeros((0, out_hw[0], out_hw[1], 3), dtype=np.uint8),
            masks=np.zeros((0, out_hw[0], out_hw[1]), dtype=np.uint8) if with_masks else None,
            records=[],
            poses=[] if align is not None else None,
        )

    with ThreadPoolExecutor(max_workers=min(threads, max(1, len(records)))) as pool:
        futures = [pool.submit(_load_one, r, hw, with_masks, align) for r in records]
        # Collect in record order so "the first bad image" is deterministic.
        kept_imgs: list[np.ndarray] = []
        kept_masks: list[np.ndarray] = []
        kept: list[ImageRecord] = []
        poses: list[Pose | None] = []
        skipped: list[tuple[str, str]] = []
        try:
            for rec, fut in zip(records, futures):
                try:
                    img, mask, pose = fut.result()
                except ImageReadError as exc:
                    skipped.append((exc.path, exc.reason))
                    if skip_bad:
                        of = "" if exc.path == rec.path else f" (the mask of {rec.path!r})"
                        log.warning("skipping unreadable file %r%s: %s", exc.path, of, exc.reason)
                    continue
                kept_imgs.append(img)
                if mask is not None:
                    kept_masks.append(mask)
                kept.append(rec)
                poses.append(pose)
        finally:
            for f in futures:
                f.cancel()  # do not keep decoding after an error that is not a bad file
    if skipped and not skip_bad:  # every bad file at once, not one per attempt
        raise ImageReadError(*skipped[0], others=tuple(skipped[1:]))

    if hw is None and kept_imgs:
        first = kept_imgs[0].shape
        for r, a in zip(kept, kept_imgs):
            if a.shape != first:
                raise LayoutError(
                    f"images differ in size and size=None: {kept[0].path!r} is "
                    f"{first[0]}x{first[1]} but {r.path!r} is {a.shape[0]}x{a.shape[1]} (HxW); "
                    f"pass size= to resize them"
                )
    out_hw = hw if hw is not None else (kept_imgs[0].shape[:2] if kept_imgs else (0, 0))
    images = np.stack(kept_imgs) if kept_imgs else np.zeros((0, out_hw[0], out_hw[1], 3), dtype=np.uint8)
    masks = None
    if with_masks:
        masks = np.stack(kept_masks) if kept_masks else np.zeros((0, out_hw[0], out_hw[1]), dtype=np.uint8)
    return LoadedImages(
        images=images, masks=masks, records=kept, skipped=skipped, poses=poses if align is not None else None
    )


def check_test_masks(records, skip_bad: bool = False) -> None:
    """Before training: every test image with a mask has a mask of its size (headers only, cheap).

    Raises:
        LayoutError: a mask whose size differs from its image; ImageReadError: an unreadable header
            (unless ``skip_bad``, where evaluation skips the image later).
    """
    for r in records:
        if not r.mask_path:
            continue
        try:
            hw, mhw = image_size(r.path), image_size(r.mask_path)
        except ImageReadError:
            if skip_bad:
                continue
            raise
        if hw != mhw:
            raise LayoutError(
                f"mask {r.mask_path!r} is {mhw[0]}x{mhw[1]} (HxW) but its image {r.path!r} is "
                f"{hw[0]}x{hw[1]}; expected the same size"
            )
