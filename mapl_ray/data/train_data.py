"""The training set of a run, decoded: labeled normals (less the validation normals), the memory banks'
images, the unlabeled pool and the labeled anomalies."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..config import Config
from .augment import rotated_copies
from .io import load_records
from .pose import build_pose_estimator
from .split import Split

log = logging.getLogger("mapl_ray.data")


@dataclass
class TrainData:
    """Decoded training images (uint8 ``(N, H, W, 3)``) of one run.

    ``normals``: labeled normals used for training (validation normals excluded);
    ``memory_indices``: rows of ``normals`` that form the memory bank the network trains with;
    ``extra_memory_indices``: rows of the further banks of the memory-bank ensemble (used at
    inference only, ``model.memory_banks - 1`` of them at most); ``unlabeled``: the unlabeled
    pool or None; ``anomalies`` / ``anomaly_masks`` (uint8 ``(K, H, W)`` in {0, 1}): labeled anomalies.
    """

    normals: np.ndarray
    memory_indices: np.ndarray
    extra_memory_indices: list[np.ndarray] = field(default_factory=list)
    unlabeled: np.ndarray | None = None
    anomalies: np.ndarray | None = None
    anomaly_masks: np.ndarray | None = None
    info: dict[str, Any] = field(default_factory=dict)


def choose_memory_indices(num_normals: int, n: int, seed: int) -> np.ndarray:
    """Seeded choice of ``min(n, num_normals)`` distinct normal images for the memory bank."""
    if num_normals < 1:
        raise ValueError("memory bank needs at least one labeled normal image")
    if n > num_normals:
        log.warning(
            "model.memory_samples=%d but only %d labeled normals are left for training (after the validation "
            "hold-out): the memory bank holds all of them",
            n,
            num_normals,
        )
    rng = np.random.default_rng([seed, 7])
    return np.sort(rng.choice(num_normals, size=min(n, num_normals), replace=False))


def choose_memory_banks(num_normals: int, n: int, banks: int, seed: int) -> list[np.ndarray]:
    """Rows of the normal images for a memory-bank ensemble: bank 0 as :func:`choose_memory_indices`
    (so the training bank does not depend on ``banks``), then further banks of ``n`` images each,
    disjoint from each other and from bank 0, seeded.

    Only as many further banks as the remaining normals fill completely are made (a smaller bank
    would weigh differently in the average); a logged warning says when there are fewer than ``banks``.

    Returns:
        list of sorted int64 arrays, the first of ``min(n, num_normals)`` rows, the others of ``n``.

    Raises:
        ValueError: no normal images, or ``banks`` < 1.
    """
    if banks < 1:
        raise ValueError(f"model.memory_banks must be >= 1, got {banks}")
    first = choose_memory_indices(num_normals, n, seed)
    rest = np.random.default_rng([seed, 8]).permutation(np.setdiff1d(np.arange(num_normals), first))
    extra = min(banks - 1, len(rest) // n)
    if extra < banks - 1:
        log.warning(
            "model.memory_banks=%d needs %d training normals for banks of model.memory_samples=%d; "
            "%d give %d bank(s), used as such (data_info.json lists them)",
            banks,
            banks * n,
            n,
            num_normals,
            extra + 1,
        )
    return [first, *(np.sort(rest[i * n : (i + 1) * n]) for i in range(extra))]


def validation_count(n_normals: int, max_val: int, fraction: float) -> int:
    """How many of ``n_normals`` labeled normals to hold out for score normalisation and the threshold.

    ``floor(fraction * n_normals)``, at least 2 (a quantile threshold needs two scores) and at most
    ``max_val`` (``eval.validation_normals``); never more than ``n_normals - 2``, so that two normals
    remain to train on (a logged warning says when this cap applies). ``max_val`` 0 holds none out.
    """
    n_val = min(max_val, max(2, math.floor(fraction * n_normals)))
    if n_val > max(0, n_normals - 2):
        log.warning(
            "eval.validation_normals: only %d labeled normals: holding out %d instead of %d, training on %d",
            n_normals,
            max(0, n_normals - 2),
            n_val,
            min(2, n_normals),
        )
    return min(n_val, max(0, n_normals - 2))


def validation_indices(n_normals: int, n_val: int, seed: int) -> np.ndarray:
    """Sorted rows of ``n_val`` labeled normals (a seeded choice; :func:`validation_count` gives ``n_val``)."""
    rng = np.random.default_rng([seed, 11])
    return np.sort(rng.choice(n_normals, size=n_val, replace=False)) if n_val else np.zeros(0, np.int64)


def load_train_data(cfg: Config, split: Split) -> tuple[TrainData, np.ndarray, dict[str, Any]]:
    """Decode the training images. Returns (TrainData, validation images uint8 (V, H, W, 3), info)."""
    size, skip = cfg.data.image_size, cfg.data.skip_bad_images
    align = build_pose_estimator(cfg)
    normals = load_records(split.labeled_normal, size, skip_bad=skip, align=align)
    n = len(normals.images)
    val_idx = validation_indices(
        n, validation_count(n, cfg.eval.validation_normals, cfg.eval.validation_fraction), cfg.data.seed
    )
    keep = np.setdiff1d(np.arange(n), val_idx)
    log.info(
        "validation: %d of %d labeled normals held out for score normalisation and the decision threshold "
        "(eval.validation_fraction %.2g, at most eval.validation_normals %d; listed in data_info.json), %d train",
        len(val_idx),
        n,
        cfg.eval.validation_fraction,
        cfg.eval.validation_normals,
        len(keep),
    )
    train_normals = normals.images[keep]
    skipped = list(normals.skipped)
    unl = anom = None
    if split.unlabeled:
        unl = load_records(split.unlabeled, size, skip_bad=skip, align=align)
        skipped += unl.skipped
    if split.labeled_anomaly:
        anom = load_records(split.labeled_anomaly, size, skip_bad=skip, with_masks=True, align=align)
        skipped += anom.skipped
    banks = choose_memory_banks(len(train_normals), cfg.model.memory_samples, cfg.model.memory_banks, cfg.data.seed)
    data = TrainData(
        normals=train_normals,
        memory_indices=banks[0],
        extra_memory_indices=banks[1:],
        unlabeled=None if unl is None else unl.images,
        anomalies=None if anom is None else anom.images,
        anomaly_masks=None if anom is None else anom.masks,
    )
    info = {
        "train_normals": int(len(train_normals)),
        "validation_normals": [normals.records[i].path for i in val_idx],
        "unlabeled": 0 if unl is None else int(len(unl.images)),
        "labeled_anomalies": 0 if anom is None else int(len(anom.images)),
        "memory_samples": int(len(data.memory_indices)),
        # the normal images of each memory bank (bank 0 trains the network; all are averaged at inference)
        "memory_banks": [[normals.records[keep[i]].path for i in idx] for idx in banks],
        "skipped_images": skipped,
    }
    if align is not None:  # images kept as they were because no object was found in them
        info["align"] = cfg.data.align
        info["no_pose_found"] = [
            r.path for ld in (normals, unl, anom) if ld is not None for r, p in zip(ld.records, ld.poses) if p is None
        ]
        if info["no_pose_found"]:
            log.warning(
                "data.align: no object found in %d training images (kept as they are; check "
                "simulation.foreground_threshold / foreground_inverse), e.g. %s; all are listed in data_info.json",
                len(info["no_pose_found"]),
                info["no_pose_found"][:3],
            )
    return data, normals.images[val_idx], info


def data_summary(info: dict[str, Any]) -> dict[str, Any]:
    """``data_info.json`` for the report: image lists become counts (data_info.json keeps the paths)."""
    out = {k: v for k, v in info.items() if k != "validation_normals"}
    if "memory_banks" in out:
        banks = out["memory_banks"]  # all of one size (choose_memory_banks makes only full banks)
        out["memory_banks"] = f"{len(banks)} bank(s) of {len(banks[0])} images"
    return out


def memory_bank_images(cfg: Config, data: TrainData) -> list[np.ndarray]:
    """The images of each memory bank, uint8 ``(N * model.memory_rotations, H, W, 3)`` per bank: bank 0
    (``data.memory_indices``, the one training searches), then the ensemble's further banks
    (``data.extra_memory_indices``), filled with bank 0 and used at inference only."""
    return [
        rotated_copies(data.normals[idx], cfg.model.memory_rotations)
        for idx in (data.memory_indices, *data.extra_memory_indices)
    ]
