"""Data layer of mapl-ray: data-set layout, image I/O, semi-supervised splits, anomaly simulation."""

from .io import LoadedImages, decode_image, image_size, load_image, load_mask, load_records, normalize_size
from .layout import (
    IMAGE_EXTENSIONS,
    LABEL_ANOMALOUS,
    LABEL_NORMAL,
    LABEL_UNKNOWN,
    CategoryIndex,
    ImageReadError,
    ImageRecord,
    LayoutError,
    is_image_file,
    scan_category,
    scan_folder,
)
from .simulation import (
    FOREGROUND_PRESETS,
    AnomalySimulator,
    ForegroundConfig,
    foreground_mask,
    perlin_noise_2d,
    rgb_to_grey,
)
from .split import Split, make_split

__all__ = [
    "decode_image",
    "FOREGROUND_PRESETS",
    "IMAGE_EXTENSIONS",
    "LABEL_ANOMALOUS",
    "LABEL_NORMAL",
    "LABEL_UNKNOWN",
    "AnomalySimulator",
    "CategoryIndex",
    "ForegroundConfig",
    "ImageReadError",
    "ImageRecord",
    "LayoutError",
    "LoadedImages",
    "Split",
    "foreground_mask",
    "image_size",
    "is_image_file",
    "load_image",
    "load_mask",
    "load_records",
    "make_split",
    "normalize_size",
    "perlin_noise_2d",
    "rgb_to_grey",
    "scan_category",
    "scan_folder",
]
