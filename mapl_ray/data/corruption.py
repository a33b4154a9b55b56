"""BHAD-style image corruption: seeded contrast change and Gaussian noise on train and test images.

The MAPL paper (Chen & Kang, arXiv 2405.06198) reports MAPL and MemSeg on a noisy, low-contrast screw set
(BHAD); its exact recipe is not published, so this is a documented stand-in, applied to every image of a
category, train and test alike, before anything reads it (masks are unchanged). For each image, in order:

1. contrast: ``x <- m + c (x - m)`` with ``m`` the image's mean grey level and ``c ~ U[contrast_min,
   contrast_max]`` (``c < 1`` flattens the image towards its mean);
2. noise: ``x <- x + n``, ``n ~ N(0, noise_std^2)`` per pixel (grey levels 0-255; one draw per pixel shared by the
   three channels for a grey image, one per channel otherwise);
3. rounded and clipped to uint8.

The corruption is applied at the size the detector reads (``data.image_size``, 256 x 256): corrupting a
1024-pixel original and then shrinking it would average the noise away.

Each image's random draws come from ``numpy.random.default_rng([seed, crc32(name)])`` with ``name`` the
file's path relative to the category folder: the corruption of a file does not depend on the order of
reading or on the other files, and the same seed gives the same bytes.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .io import load_image, load_mask
from .layout import find_images

__all__ = ["Corruption", "corrupt_category", "corrupt_image", "image_rng"]

_STAMP = ".corruption.json"


@dataclass(frozen=True)
class Corruption:
    """Parameters of the BHAD-style corruption.

    Attributes:
        noise_std: standard deviation of the additive Gaussian noise, grey levels (0-255).
        contrast_min, contrast_max: range of the contrast factor ``c`` (1: unchanged; 0.5: half the contrast).
        seed: seed of every image's draws (with the image's name).
    """

    noise_std: float = 12.0
    contrast_min: float = 0.5
    contrast_max: float = 0.8
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("noise_std", "contrast_min", "contrast_max"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"corruption.{name} must be a finite number, got {v!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"corruption.seed must be an integer, got {self.seed!r}")
        if self.noise_std < 0:
            raise ValueError(f"corruption.noise_std must be >= 0, got {self.noise_std}")
        if not 0 < self.contrast_min <= self.contrast_max:
            raise ValueError(
                f"corruption needs 0 < contrast_min <= contrast_max, got {self.contrast_min}, {self.contrast_max}"
            )


def image_rng(seed: int, name: str) -> np.random.Generator:
    """The generator of one image's draws: ``default_rng([seed, crc32(name)])`` (``name``: the file's path
    relative to its category, '/'-separated)."""
    return np.random.default_rng([int(seed), zlib.crc32(name.replace(os.sep, "/").encode())])


def corrupt_image(image: np.ndarray, corruption: Corruption, rng: np.random.Generator) -> np.ndarray:
    """Contrast change then Gaussian noise (module docstring), on one image.

    Args:
        image: uint8 ``(H, W, 3)`` RGB (a grey image has three equal channels and stays grey).
        corruption: the parameters.
        rng: the image's generator (:func:`image_rng`).

    Returns:
        uint8 ``(H, W, 3)``, a new array.

    Raises:
        ValueError: ``image`` is not uint8 ``(H, W, 3)``.
    """
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"corrupt_image expects uint8 (H, W, 3), got {image.dtype} {image.shape}")
    x = image.astype(np.float32)
    c = rng.uniform(corruption.contrast_min, corruption.contrast_max)
    x = x.mean() + c * (x - x.mean())
    grey = bool((image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all())
    shape = image.shape[:2] + ((1,) if grey else (3,))
    x = x + rng.normal(0.0, corruption.noise_std, size=shape).astype(np.float32)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def corrupt_category(
    src: str | os.PathLike[str], dst: str | os.PathLike[str], corruption: Corruption, size: int | None = 256
) -> int:
    """Write a corrupted copy of the category folder ``src`` (MVTec layout) to ``dst``.

    Images under ``train/`` and ``test/`` are decoded (resized to ``size`` x ``size`` as
    :func:`~mapl_ray.data.io.load_image` does, or at their own size with None), corrupted and written as PNG
    (lossless: the noise is kept exactly); ``ground_truth/`` masks are resized alike (NEAREST) or, with None,
    copied unchanged. A copy made before with the same parameters (``dst/.corruption.json``) is kept as it is.

    Returns:
        the number of images corrupted (0 when the copy was already there).

    Raises:
        LayoutError: ``src`` has no images; ImageReadError: an image cannot be decoded.
    """
    src, dst = Path(src), Path(dst)
    stamp = dst / _STAMP
    params = {**asdict(corruption), "size": size}
    if stamp.is_file() and json.loads(stamp.read_text()) == params:
        return 0
    shutil.rmtree(dst, ignore_errors=True)
    count = 0
    for path in find_images(str(src)):
        rel = Path(path).relative_to(src)
        out = (dst / rel).with_suffix(".png")
        out.parent.mkdir(parents=True, exist_ok=True)
        if "ground_truth" in rel.parts:
            if size is None:
                shutil.copy(path, dst / rel)
            else:
                Image.fromarray(load_mask(path, size) * 255).save(out)
            continue
        image = corrupt_image(load_image(path, size), corruption, image_rng(corruption.seed, rel.as_posix()))
        Image.fromarray(image).save(out)
        count += 1
    stamp.write_text(json.dumps(params))
    return count
