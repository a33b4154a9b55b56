"""MAPL network: encoder, memory bank, attention, MSFF, decoder, image head, losses."""

from .encoder import Encoder, LeakyEncoder, WeightsError, build_encoder, lite_wheel_weights_path
from .losses import focal_loss, l1_loss, segmentation_loss
from .mapl import MAPLModel, spatial_attention
from .memory import MemoryBank, choose_memory_banks, choose_memory_indices, resolve_backend

__all__ = [
    "Encoder", "LeakyEncoder", "WeightsError", "build_encoder", "lite_wheel_weights_path", "focal_loss", "l1_loss",
    "segmentation_loss", "MAPLModel", "spatial_attention", "MemoryBank", "choose_memory_indices", "choose_memory_banks", "resolve_backend",
]
