"""Image augmentation of training batches and memory images: flips / 90-degree rotations, intensity
jitter, and rotated copies of memory samples. uint8 ``(N, H, W, 3)`` arrays in, new arrays out."""

from __future__ import annotations

import numpy as np
from PIL import Image

from ..config import ORIENTATION_MODES

#: Pillow's transpose for ``np.rot90(image, k, axes=(0, 1))``, then a left-right flip if ``flip``: ``(k, flip)``.
_PIL_D4 = {
    (0, True): Image.Transpose.FLIP_LEFT_RIGHT,
    (1, False): Image.Transpose.ROTATE_90,
    (1, True): Image.Transpose.TRANSVERSE,
    (2, False): Image.Transpose.ROTATE_180,
    (2, True): Image.Transpose.FLIP_TOP_BOTTOM,
    (3, False): Image.Transpose.ROTATE_270,
    (3, True): Image.Transpose.TRANSPOSE,
}


def orient(image: np.ndarray, k: int, flip: bool) -> np.ndarray:
    """``np.rot90(image, k, axes=(0, 1))``, then mirrored left-right if ``flip``, as a new array: uint8
    ``(H, W, 3)`` images through Pillow's transpose (~3x faster than numpy's copy of 3-byte pixels in
    reversed order), anything else through numpy."""
    if (k, flip) == (0, False):
        return image.copy()
    if image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3:
        return np.asarray(Image.fromarray(image).transpose(_PIL_D4[k, flip]))
    out = np.rot90(image, k, axes=(0, 1))
    return out[:, ::-1] if flip else out


def augment_images(images: np.ndarray, masks: np.ndarray | None, mode: str, rng: np.random.Generator):
    """Random flips (``flip``) or flips and 90-degree rotations (``rot90``) per image.

    ``images`` uint8 ``(B, H, W, 3)`` with H == W for ``rot90``; ``masks`` ``(B, H, W)`` or None get
    the same transform. Returns new arrays (the inputs are not modified).
    """
    if mode == "none":
        return images, masks
    if mode not in ORIENTATION_MODES:
        raise ValueError(f"train.augment must be one of {ORIENTATION_MODES}, got {mode!r}")
    out_i, out_m = np.empty_like(images), None if masks is None else np.empty_like(masks)
    for b in range(len(images)):
        k = int(rng.integers(4)) if mode == "rot90" else 0
        flip = bool(rng.integers(2))
        out_i[b] = orient(images[b], k, flip)
        if masks is not None:
            out_m[b] = orient(masks[b], k, flip)
    return out_i, out_m


def jitter_intensity(images: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Random global brightness and contrast change per image, uint8 ``(B, H, W, 3)`` -> same.

    ``out = (x - mean) * c + mean * b`` with ``c, b ~ U(1 - strength, 1 + strength)``: teaches the
    model that illumination drift between normal images is not a defect.
    """
    if strength <= 0:
        return images
    x = images.astype(np.float32)
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    c = rng.uniform(1 - strength, 1 + strength, size=(len(x), 1, 1, 1)).astype(np.float32)
    b = rng.uniform(1 - strength, 1 + strength, size=(len(x), 1, 1, 1)).astype(np.float32)
    return np.clip((x - mean) * c + mean * b, 0, 255).astype(np.uint8)


def rotated_copies(images: np.ndarray, k: int) -> np.ndarray:
    """Each image at ``k`` equally spaced rotations (0, 360/k, ...): uint8 ``(N, H, W, 3)`` -> ``(N k, H, W, 3)``.

    Memory samples at several orientations give rotated objects (screws) a nearest memory sample
    that is aligned with them, so DI marks the defect rather than the misalignment. Corners uncovered
    by the rotation are filled with the image's median border colour (PIL ``rotate``).
    """
    if k <= 1:
        return images

    out = []
    for img in images:
        border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
        fill = tuple(int(v) for v in np.median(border, axis=0))
        pil = Image.fromarray(img)
        out.extend(
            np.asarray(pil.rotate(360.0 * r / k, resample=Image.Resampling.BILINEAR, fillcolor=fill)) for r in range(k)
        )
    return np.stack(out)
