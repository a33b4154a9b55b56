"""MAPL network: encoder, memory bank, attention, MSFF, decoder, image head; losses; anomaly maps and scores."""

from .encoder import Encoder, LeakyEncoder, WeightsError, build_encoder, lite_wheel_weights_path
from .losses import compute_losses, focal_loss, l1_loss, masked_bce, segmentation_loss
from .memory import MemoryBank, resolve_backend
from .network import MAPLModel, build_model, spatial_attention

__all__ = [
    "Encoder",
    "LeakyEncoder",
    "WeightsError",
    "build_encoder",
    "lite_wheel_weights_path",
    "compute_losses",
    "focal_loss",
    "l1_loss",
    "masked_bce",
    "segmentation_loss",
    "MAPLModel",
    "build_model",
    "spatial_attention",
    "MemoryBank",
    "resolve_backend",
]
