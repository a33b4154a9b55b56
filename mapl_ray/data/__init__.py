"""Data layer of mapl-ray: data-set layout, image I/O, semi-supervised splits, pose normalisation,
anomaly simulation (Perlin noise, foreground masks), augmentation and training batches."""

from .foreground import FOREGROUND_PRESETS, ForegroundConfig, foreground_mask, rgb_to_grey
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
from .perlin import perlin_noise_2d
from .simulation import AnomalySimulator
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
