"""The assembled MAPL network: encoder, memory module, spatial attention, MSFF, U-Net decoder, head q.

Follows MemSeg (Yang et al., "MemSeg: A semi-supervised method for image surface defect detection
using differences and commonalities", 2023) as used by MAPL (Chen & Kang, arXiv 2405.06198):
DI* = concat(f_l, DI_l) (eq. 8); spatial attention maps from DI (eqs. 9-11)
M3 = mean_c DI3, M2 = up(M3) * mean_c DI2, M1 = up(M2) * mean_c DI1; multi-scale feature fusion
(MSFF) with optional coordinate attention; a U-Net decoder to a per-pixel anomaly logit map; and an
image-level head q whose logit carries the pseudo-label BCE terms.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Config, ModelConfig
from ..tensors import pad_rows, use_native_depthwise
from .encoder import Encoder, build_encoder
from .memory import MemoryBank
from .patch_bank import PatchBank

_DEFAULTS = ModelConfig()  # the constructor's defaults are the configuration's (one set of defaults)


def conv_bn_relu(c_in: int, c_out: int, k: int = 3) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, k, padding=k // 2, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)
    )


def conv_bn_relu_split(
    block: nn.Sequential, per_bank: torch.Tensor, shared: torch.Tensor, k: int, shared_first: bool
) -> torch.Tensor:
    """``block`` (:func:`conv_bn_relu`) applied to the channel concatenation of ``per_bank`` and ``shared``
    repeated k times, without building it: a convolution of concatenated channels is the sum of each
    part's convolution with its slice of the weights, so the part the k memory banks share is convolved once.

    Args:
        block: ``Sequential(Conv2d(C_p + C_s, C_o), BatchNorm2d, ReLU)``, eval mode (the BatchNorm may be
            folded into the convolution: :meth:`MAPLModel.fold_batchnorm`).
        per_bank: ``(k B, C_p, H, W)``, bank-major; shared: ``(B, C_s, H, W)``.
        shared_first: the concatenation is ``[shared, per_bank]`` (else ``[per_bank, shared]``).

    Returns:
        ``(k B, C_o, H, W)``: what ``block`` gives on the concatenation, up to rounding.
    """
    conv, cs = block[0], shared.shape[1]
    w_shared, w_bank = (
        (conv.weight[:, :cs], conv.weight[:, cs:]) if shared_first else (conv.weight[:, -cs:], conv.weight[:, :-cs])
    )
    args = (conv.stride, conv.padding, conv.dilation, conv.groups)
    y = F.conv2d(per_bank, w_bank, conv.bias, *args)
    y.view(k, -1, *y.shape[1:]).add_(F.conv2d(shared, w_shared, None, *args))  # in place: y keeps its layout
    return block[2:](block[1](y))


class CoordinateAttention(nn.Module):
    """Coordinate attention (Hou et al., CVPR 2021), the MSFF option of MemSeg; off by default in MAPL."""

    def __init__(self, c: int, reduction: int = 8):
        super().__init__()
        mid = max(8, c // reduction)
        self.conv1 = conv_bn_relu(c, mid, 1)
        self.conv_h = nn.Conv2d(mid, c, 1)
        self.conv_w = nn.Conv2d(mid, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[2:]
        xh = x.mean(3, keepdim=True)  # (B, C, H, 1)
        xw = x.mean(2, keepdim=True).transpose(2, 3)  # (B, C, W, 1)
        y = self.conv1(torch.cat([xh, xw], dim=2))
        yh, yw = y.split([h, w], dim=2)
        return x * torch.sigmoid(self.conv_h(yh)) * torch.sigmoid(self.conv_w(yw.transpose(2, 3)))


BANK_BATCH = 64  # images per decoder pass of MAPLModel.predict's memory-bank ensemble


def spatial_attention(di: list[torch.Tensor], scale: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Spatial attention maps M1..M3 (``(B, 1, H_l, W_l)`` float) from DI_1..DI_3 (eqs. 9-11).

    ``scale`` ``(3,)``: each level's channel mean of DI is divided by the typical value between normal
    memory samples (:class:`MemoryBank` ``di_scale``), so the maps do not depend on the encoder's
    feature scale. The product chain of eqs. 9-11 is then squashed with ``M / (1 + M)`` into [0, 1):
    normal locations give about 0.5, anomalous ones approach 1, and magnitudes stay comparable across
    images; an unbounded product reached 1e6 on anomalies and made training diverge.
    """
    means = [d.mean(1, keepdim=True) for d in di]
    if scale is not None:
        means = [m / scale[i].to(m.dtype) for i, m in enumerate(means)]
    maps = [None] * len(di)
    maps[-1] = means[-1]
    for i in range(len(di) - 2, -1, -1):
        maps[i] = F.interpolate(maps[i + 1], size=means[i].shape[2:], mode="bilinear", align_corners=False) * means[i]
    return [m / (1.0 + m) for m in maps]


class MSFF(nn.Module):
    """Multi-scale feature fusion of DI* at three levels (MemSeg sec. 3.4), top-down, attention-weighted.

    Input: three tensors ``(B, 2 C_l, H_l, W_l)`` and attention maps ``(B, 1, H_l, W_l)``.
    Output: three tensors ``(B, out_l, H_l, W_l)``.
    """

    def __init__(self, in_channels: list[int], out_channels: list[int], coordinate_attention: bool = False):
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(conv_bn_relu(ci, co), CoordinateAttention(co) if coordinate_attention else nn.Identity())
            for ci, co in zip(in_channels, out_channels)
        )
        # top-down paths: level l+1 -> level l
        self.lateral = nn.ModuleList(
            conv_bn_relu(out_channels[i + 1], out_channels[i], 1) for i in range(len(out_channels) - 1)
        )

    def forward(
        self, xs: list[torch.Tensor], attention: list[torch.Tensor], shared: list[torch.Tensor] | None = None
    ) -> list[torch.Tensor]:
        """``shared``: for k stacked memory banks (inference), ``xs`` holds only the DI halves of DI*
        ``(k B, C_l, H_l, W_l)`` and ``shared`` the features ``f_l`` ``(B, C_l, H_l, W_l)`` common to every
        bank; each block's first convolution then convolves ``f_l`` once (:func:`conv_bn_relu_split`)."""
        if shared is None:
            ys = [blk(x) for blk, x in zip(self.blocks, xs)]
        else:
            k = xs[0].shape[0] // shared[0].shape[0]
            ys = [blk[1](conv_bn_relu_split(blk[0], x, f, k, True)) for blk, x, f in zip(self.blocks, xs, shared)]
        for i in range(len(ys) - 2, -1, -1):
            up = F.interpolate(ys[i + 1], size=ys[i].shape[2:], mode="bilinear", align_corners=False)
            ys[i] = ys[i] + self.lateral[i](up)
        return [y * a for y, a in zip(ys, attention)]


class Decoder(nn.Module):
    """U-Net decoder: stride 16 -> 8 -> 4 -> 2 with skip connections, logit map upsampled to the input size.

    ``channels`` = widths at strides 16, 8, 4, 2. Output: ``(B, 1, H, W)`` float logits.
    """

    def __init__(self, msff_channels: list[int], skip0_channels: int, channels: tuple[int, ...]):
        super().__init__()
        c16, c8, c4, c2 = channels
        self.b16 = conv_bn_relu(msff_channels[2], c16)
        self.b8 = nn.Sequential(conv_bn_relu(c16 + msff_channels[1], c8), conv_bn_relu(c8, c8))
        self.b4 = nn.Sequential(conv_bn_relu(c8 + msff_channels[0], c4), conv_bn_relu(c4, c4))
        self.b2 = nn.Sequential(conv_bn_relu(c4 + skip0_channels, c2), conv_bn_relu(c2, c2))
        self.out = nn.Conv2d(c2, 1, 1)

    @staticmethod
    def _up_cat(x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return torch.cat([F.interpolate(x, size=skip.shape[2:], mode="bilinear", align_corners=False), skip], dim=1)

    def forward(self, m: list[torch.Tensor], f0: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
        """``m`` ``(k B, ...)`` for k stacked memory banks and ``f0`` ``(B, ...)``, the skip features they share
        (k = 1: one bank): the last stage convolves ``f0`` once (:func:`conv_bn_relu_split`)."""
        x = self.b16(m[2])
        x = self.b8(self._up_cat(x, m[1]))
        x = self.b4(self._up_cat(x, m[0]))
        if x.shape[0] == f0.shape[0]:
            x = self.b2(self._up_cat(x, f0))
        else:
            up = F.interpolate(x, size=f0.shape[2:], mode="bilinear", align_corners=False)
            x = self.b2[1](conv_bn_relu_split(self.b2[0], up, f0, x.shape[0] // f0.shape[0], False))
        return F.interpolate(self.out(x), size=out_size, mode="bilinear", align_corners=False)


class ImageHead(nn.Module):
    """Image-level head q: pooled fused features (avg + max per level) -> MLP -> one logit ``(B,)``."""

    def __init__(self, channels: list[int], hidden: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(2 * sum(channels), hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 1))

    def forward(self, m: list[torch.Tensor]) -> torch.Tensor:
        pooled = [torch.cat([x.mean((2, 3)), x.amax((2, 3))], dim=1) for x in m]
        return self.mlp(torch.cat(pooled, dim=1)).squeeze(1)


class MAPLModel(nn.Module):
    """MAPL / MemSeg network.

    ``forward(images)`` takes float32 ``(B, 3, H, W)`` in [0, 1] (H, W divisible by 16) and returns a
    dict: ``"logits"`` ``(B, 1, H, W)`` per-pixel anomaly logits, ``"q"`` ``(B,)`` image-head logits,
    ``"nearest"`` ``(B,)`` int64 index of the nearest memory sample, ``"pooled"`` ``(B, D)`` detached
    image-level features for the one-class classifiers.

    The memory bank must be filled first (:meth:`refresh_memory`). With a frozen encoder
    (``freeze_encoder=True``) the encoder runs in eval mode without gradients, so the bank stays
    consistent with it; with a trainable encoder, call :meth:`refresh_memory` on a schedule.

    Memory-bank ensemble: ``memory`` (bank 0) is the bank the network trains with; ``extra_memory``
    holds further banks of other normal images, filled with ``refresh_memory(images, bank=i)``.
    :meth:`predict` averages the anomaly maps and head probabilities over all banks, so the result
    depends less on which normal images happen to form the memory bank (on screw, the choice of the
    30 images moved image AUROC as much as the training seed; bench/results/design_sweep_screw.json).
    """

    def __init__(
        self,
        encoder: Encoder,
        freeze_encoder: bool = _DEFAULTS.freeze_encoder,
        memory_backend: str = _DEFAULTS.memory_backend,
        coordinate_attention: bool = _DEFAULTS.coordinate_attention,
        decoder_channels: tuple[int, ...] = _DEFAULTS.decoder_channels,
        head_hidden: int = _DEFAULTS.head_hidden,
        head_detach: bool = _DEFAULTS.head_detach,
        normalize_intensity: bool = _DEFAULTS.normalize_intensity,
    ):
        super().__init__()
        self.head_detach = head_detach
        self.normalize_intensity = normalize_intensity
        self.encoder = encoder
        self.freeze_encoder = freeze_encoder
        if freeze_encoder:
            for p in self.encoder.parameters():
                p.requires_grad_(False)
        self.memory = MemoryBank(memory_backend)
        self.extra_memory = nn.ModuleList()  # banks 1.. of the memory-bank ensemble (inference only)
        self.patch_bank = PatchBank()  # normal patch coreset for the fused map (inference only; filled after training)
        c = encoder.channels
        msff_out = [c[1], c[2], c[3]]
        self.msff = MSFF([2 * c[1], 2 * c[2], 2 * c[3]], msff_out, coordinate_attention)
        self.decoder = Decoder(msff_out, c[0], decoder_channels)
        self.head = ImageHead(msff_out, head_hidden)

    def train(self, mode: bool = True) -> MAPLModel:
        super().train(mode)
        if self.freeze_encoder:
            self.encoder.eval()  # frozen BN statistics: the memory bank stays valid
        return self

    def use_cuda_kernels(self, channels_last: bool, depthwise_kernels: str) -> None:
        """On a CUDA device, the kernel choices of ``train.channels_last`` (the whole model channels-last, in
        place) and ``train.depthwise_kernels`` (``"native"``: the encoder's depthwise convolutions off cuDNN,
        :func:`~mapl_ray.tensors.use_native_depthwise`). Call once the model is on its device, before its first
        forward pass (every pass in one layout, one set of cuDNN plans)."""
        if channels_last:
            self.to(memory_format=torch.channels_last)
        if depthwise_kernels == "native":
            use_native_depthwise(self.encoder)

    @torch.no_grad()
    def fold_batchnorm(self) -> int:
        """Fold each BatchNorm of MSFF and the decoder into the convolution before it, for inference: the
        eval-mode statistics become that convolution's weights and bias (one pass over each activation
        fewer). Irreversible: the folded model cannot train. The encoder's BatchNorms (timm's, fused with
        their activation) stay. Source: ``torch.nn.utils.fusion.fuse_conv_bn_eval``.

        Returns:
            the number of BatchNorms folded.

        Raises:
            RuntimeError: the model is in training mode.
        """
        from torch.nn.utils.fusion import fuse_conv_bn_eval

        if self.training:
            raise RuntimeError("fold_batchnorm: put the model in eval mode first (it is for inference only)")
        folded = 0
        for part in (self.msff, self.decoder):
            for seq in part.modules():
                if not isinstance(seq, nn.Sequential):
                    continue
                for i in range(len(seq) - 1):
                    if isinstance(seq[i], nn.Conv2d) and type(seq[i + 1]) is nn.BatchNorm2d:
                        seq[i] = fuse_conv_bn_eval(seq[i], seq[i + 1])
                        seq[i + 1] = nn.Identity()
                        folded += 1
        return folded

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Per-image intensity standardisation (when enabled): each image is shifted and scaled to
        mean 0.5 and standard deviation 0.2 over all its pixels and channels, so a global change of
        illumination or contrast between normal images (the BHAD corruptions, lighting drift on a
        line) does not look like an anomaly. ``(B, 3, H, W)`` float -> same shape."""
        if not self.normalize_intensity:
            return images
        mean = images.mean(dim=(1, 2, 3), keepdim=True)
        std = images.std(dim=(1, 2, 3), keepdim=True).clamp_min(1e-3)
        return (images - mean) / std * 0.2 + 0.5

    def encode(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Encoder features ``[f0..f3]`` of preprocessed images; without autograd when the encoder is frozen."""
        images = self.preprocess(images)
        if self.freeze_encoder:
            with torch.no_grad():
                return self.encoder(images)
        return self.encoder(images)

    @property
    def banks(self) -> list[MemoryBank]:
        """All memory banks: ``[memory, *extra_memory]`` (bank 0 is the one training uses)."""
        return [self.memory, *self.extra_memory]

    @torch.no_grad()
    def refresh_memory(self, images: torch.Tensor, batch_size: int = 16, bank: int = 0) -> None:
        """Recompute memory bank ``bank`` from ``images`` ``(N, 3, H, W)`` float in [0, 1] with the current encoder.

        ``bank`` 0 is the training bank; ``bank == len(banks)`` appends a new ensemble bank. Runs the
        encoder in eval mode (BatchNorm running statistics: each image's features do not depend on the others)
        and restores the training mode; on CUDA a short last batch is padded to ``batch_size``
        (:func:`~mapl_ray.tensors.pad_rows`: every fill of the run in one input shape).

        Raises:
            IndexError: ``bank`` would leave a gap (greater than the number of banks).
        """
        if bank > len(self.extra_memory) + 1 or bank < 0:
            raise IndexError(f"memory bank {bank} cannot be filled: the model has {len(self.banks)} banks")
        if bank == len(self.extra_memory) + 1:
            self.extra_memory.append(MemoryBank(self.memory.requested_backend).to(self.memory.version.device))
        was_training = self.encoder.training
        self.encoder.eval()
        feats = [[] for _ in range(3)]
        for i in range(0, images.shape[0], batch_size):
            x = images[i : i + batch_size]
            n = x.shape[0]
            f = self.encoder(self.preprocess(pad_rows(x, batch_size) if x.is_cuda else x))
            for lvl in range(3):
                feats[lvl].append(f[lvl + 1][:n].float())
        self.encoder.train(was_training and not self.freeze_encoder)
        self.banks[bank].set([torch.cat(x) for x in feats])

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # ensemble banks exist only in checkpoints that hold them: create as many as the checkpoint has
        # (a checkpoint from before the ensemble loads with none) before the children load their buffers
        n = 0
        while f"{prefix}extra_memory.{n}.version" in state_dict:
            n += 1
        while len(self.extra_memory) < n:
            self.extra_memory.append(MemoryBank(self.memory.requested_backend).to(self.memory.version.device))
        del self.extra_memory[n:]
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _heads(self, feats: list[torch.Tensor], banks: list[MemoryBank], out_size) -> dict[str, torch.Tensor]:
        """DI against each of ``banks`` (eqs. 7-8), spatial attention (eqs. 9-11), MSFF, decoder and head.

        With k banks the MSFF, decoder and head run once on the k copies of the batch stacked bank-major
        (``(k B, ...)``): one pass of larger kernels instead of k passes of small ones, in which what the banks
        share (the features ``f_l`` of DI*, the decoder's skip ``f0``) is convolved once
        (:func:`conv_bn_relu_split`). Eval-mode layers treat every image on its own, so each bank's output is
        what a pass of its own gives, up to rounding.
        Returns ``logits`` ``(k B, 1, H, W)``, ``q`` ``(k B,)``, and for the first bank ``nearest`` and ``di``.
        """
        levels = feats[1:4]
        per_bank = [bank.difference(levels) for bank in banks]
        attention = [
            spatial_attention([d.detach() if self.freeze_encoder else d for d in di], bank.di_scale)
            for bank, (di, _) in zip(banks, per_bank)
        ]
        if len(banks) == 1:
            di_star = [torch.cat([f, d.to(f.dtype)], dim=1) for f, d in zip(levels, per_bank[0][0])]  # eq. 8
            fused = self.msff(di_star, [a.to(di_star[0].dtype) for a in attention[0]])
        else:  # DI* = [f, DI] of each bank, f convolved once for all of them (MSFF's shared input)
            di = [torch.cat([p[0][lvl] for p in per_bank]).to(f.dtype) for lvl, f in enumerate(levels)]
            att = [torch.cat([a[lvl] for a in attention]).to(di[0].dtype) for lvl in range(len(levels))]
            fused = self.msff(di, att, shared=levels)
        logits = self.decoder(fused, feats[0], out_size)
        q = self.head([f.detach() for f in fused] if self.head_detach else fused)
        return {"logits": logits, "q": q, "nearest": per_bank[0][1], "di": per_bank[0][0]}

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.encode(images)
        out = self._heads(feats, [self.memory], images.shape[2:])
        return {
            "logits": out["logits"],
            "q": out["q"],
            "nearest": out["nearest"],
            "pooled": self._pool(feats[1:4], out["di"]),
        }

    @torch.no_grad()
    def predict(
        self, images: torch.Tensor, num_banks: int | None = None, bank_batch: int = BANK_BATCH, knn_images: int = 0
    ) -> dict[str, torch.Tensor]:
        """Anomaly probabilities averaged over the memory-bank ensemble (the encoder runs once).

        Args:
            images: float32 ``(B, 3, H, W)`` in [0, 1].
            num_banks: use the first this many banks (default: all).
            bank_batch: images per decoder pass: banks go through the decoder together, as many at a
                time as keep ``B`` x banks within it (at least one bank per pass); a small batch of a
                many-bank run is then one pass instead of one per bank (:meth:`_heads`).

            knn_images: also the patch bank's map (:meth:`PatchBank.distance_maps`) of the first this many
                images (all views under test-time augmentation), when the bank is filled.

        Returns:
            ``"maps"`` float32 ``(B, H, W)`` in [0, 1] (mean of the per-bank sigmoid maps) and ``"q"``
            float32 ``(B,)`` (mean of the per-bank head probabilities); with ``knn_images`` and a filled
            patch bank ``"knn_maps"`` float32 ``(knn_images, H, W)``.
        """
        feats = self.encode(images)
        extra = {}
        if knn_images and self.patch_bank.filled:
            extra["knn_maps"] = self.patch_bank.distance_maps([f[:knn_images] for f in feats], images.shape[2:])
        banks = list(self.banks[: num_banks or None])
        b = images.shape[0]
        per_pass = max(1, min(len(banks), bank_batch // max(b, 1)))
        maps = q = 0.0
        for i in range(0, len(banks), per_pass):
            group = banks[i : i + per_pass]
            out = self._heads(feats, group, images.shape[2:])
            prob_maps = torch.sigmoid(out["logits"].float())[:, 0]
            prob_q = torch.sigmoid(out["q"].float())
            for j in range(len(group)):  # bank by bank: the same sum as one pass per bank
                maps = maps + prob_maps[j * b : (j + 1) * b]
                q = q + prob_q[j * b : (j + 1) * b]
        return {"maps": maps / len(banks), "q": q / len(banks), **extra}

    @staticmethod
    def _pool(levels: list[torch.Tensor], di: list[torch.Tensor]) -> torch.Tensor:
        # global mean of features and root-mean DI per channel: an image far from every memory sample stands out
        with torch.no_grad():
            return torch.cat([f.float().mean((2, 3)) for f in levels] + [d.float().mean((2, 3)).sqrt() for d in di], 1)

    def pooled_features(self, images: torch.Tensor) -> torch.Tensor:
        """Image-level feature vectors for the one-class classifiers: ``(B, 2 (C1 + C2 + C3))`` float32.

        Global average of the level 1-3 encoder features concatenated with the per-channel root-mean
        difference information; the same vectors as ``forward(...)["pooled"]``.
        """
        with torch.no_grad():
            levels = self.encoder(self.preprocess(images))[1:4]
            di, _ = self.memory.difference(levels)
            return self._pool(levels, di)


def build_model(cfg: Config) -> MAPLModel:
    """The MAPL network as configured (encoder weights from local files only)."""
    m = cfg.model
    encoder = build_encoder(m.encoder, m.weights, m.pretrained)
    return MAPLModel(
        encoder,
        freeze_encoder=m.freeze_encoder and m.encoder != "mapl",
        memory_backend=m.memory_backend,
        coordinate_attention=m.coordinate_attention,
        decoder_channels=tuple(m.decoder_channels),
        head_hidden=m.head_hidden,
        head_detach=m.head_detach,
        normalize_intensity=m.normalize_intensity,
    )
