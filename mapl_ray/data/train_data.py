"""The training set of a run, decoded: labeled normals (less the validation normals), the memory banks'
images, the unlabeled pool and the labeled anomalies."""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..config import Config
from .augment import rotated_copies
from .io import LoadedImages, load_records
from .layout import LABEL_NORMAL
from .pose import build_pose_estimator
from .split import Split
from .validation import ValidationSet, add_canaries, build_validation_set, held_out_anomalies

log = logging.getLogger("mapl_ray.data")


@dataclass
class TrainData:
    """Decoded training images (uint8 ``(N, H, W, 3)``) of one run.

    The *normal source* is the labeled normals followed by the unlabeled pool: row ``i`` is
    ``normals[i]`` for ``i < len(normals)`` and ``unlabeled[i - len(normals)]`` after; pool rows enter
    the normal stream and the memory banks while their pseudo-label is 0 (:func:`normal_rows`).

    Attributes:
        normals: labeled normals used for training (validation normals excluded).
        memory_indices: normal-source rows of the memory bank the network trains with.
        extra_memory_indices: normal-source rows of the further banks of the memory-bank ensemble
            (used at inference only, ``model.memory_banks - 1`` of them at most).
        unlabeled: the unlabeled pool or None (a :class:`~mapl_ray.data.streams.StreamedPool` when it streams).
        unlabeled_truth: int8 ``(M,)`` true labels of the pool where known (benchmark splits; -1 for a
            user's images; -1 for validation canaries): only for reporting pseudo-label precision and
            recall, never for training.
        pool_canaries: bool ``(M,)``, the pool's validation canaries
            (:func:`~mapl_ray.data.validation.add_canaries`), or None: only for reporting how the
            pseudo-labeler labeled them, never for training.
        anomalies, anomaly_masks: labeled anomalies and their masks (uint8 ``(K, H, W)`` in {0, 1}).
    """

    normals: np.ndarray
    memory_indices: np.ndarray
    extra_memory_indices: list[np.ndarray] = field(default_factory=list)
    unlabeled: np.ndarray | None = None
    anomalies: np.ndarray | None = None
    anomaly_masks: np.ndarray | None = None
    info: dict[str, Any] = field(default_factory=dict)
    unlabeled_truth: np.ndarray | None = None
    pool_canaries: np.ndarray | None = None

    @property
    def pool_size(self) -> int:
        return 0 if self.unlabeled is None else len(self.unlabeled)

    @property
    def pool_streamed(self) -> bool:
        """The pool streams through Ray Data (``unlabeled`` is a length without pixels,
        :class:`~mapl_ray.data.streams.StreamedPool`): its images are not normal-source rows."""
        return self.unlabeled is not None and not isinstance(self.unlabeled, np.ndarray)

    def source_images(self, rows: np.ndarray) -> np.ndarray:
        """Images of normal-source ``rows`` (module docstring), uint8 ``(len(rows), H, W, 3)``."""
        rows = np.asarray(rows, dtype=np.int64)
        n = len(self.normals)
        if self.pool_size == 0 or (rows < n).all():
            return self.normals[rows]
        out = (
            np.empty((len(rows), *self.normals.shape[1:]), np.uint8)
            if n
            else np.empty((len(rows), *self.unlabeled.shape[1:]), np.uint8)
        )
        lab = rows < n
        if lab.any():
            out[lab] = self.normals[rows[lab]]
        out[~lab] = self.unlabeled[rows[~lab] - n]
        return out


def normal_rows(data: TrainData, pool_labels: np.ndarray | None) -> np.ndarray:
    """Normal-source rows of the current normal stream: every labeled normal, then the pool images
    whose pseudo-label is 0 (``pool_labels`` int8 ``(M,)``; None: no pool image)."""
    n = len(data.normals)
    if pool_labels is None or data.pool_size == 0:
        return np.arange(n)
    return np.concatenate([np.arange(n), n + np.flatnonzero(np.asarray(pool_labels) == 0)])


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


_BANK_WARNINGS: set[tuple[int, ...]] = set()  # the too-few-normals warnings already logged in this process


def choose_memory_banks(
    num_normals: int, n: int, banks: int, seed: int, pool_rows: np.ndarray | None = None
) -> list[np.ndarray]:
    """Normal-source rows of the memory-bank ensemble (:class:`TrainData`): bank 0 as
    :func:`choose_memory_indices` (so the training bank does not depend on ``banks``), then further
    banks of ``n`` images each, disjoint from each other and from bank 0, seeded.

    Labeled normals come first. With fewer than ``n`` of them, bank 0 holds them all and is filled up
    with pool images pseudo-labeled normal (``pool_rows``, normal-source rows); further banks take the
    labeled normals left, then such pool images. Only as many further banks as the remaining images
    fill completely are made (a smaller bank would weigh differently in the average); a logged warning
    says when there are fewer than ``banks``.

    Returns:
        list of sorted int64 arrays, the first of ``min(n, available)`` rows, the others of ``n``.

    Raises:
        ValueError: no image at all, or ``banks`` < 1.
    """
    if banks < 1:
        raise ValueError(f"model.memory_banks must be >= 1, got {banks}")
    pool_rows = np.zeros(0, np.int64) if pool_rows is None else np.asarray(pool_rows, dtype=np.int64)
    if num_normals >= n or not len(pool_rows):
        first = choose_memory_indices(num_normals, n, seed)
        rest = np.random.default_rng([seed, 8]).permutation(np.setdiff1d(np.arange(num_normals), first))
    else:
        fill = np.random.default_rng([seed, 9]).choice(
            pool_rows, size=min(n - num_normals, len(pool_rows)), replace=False
        )
        first = np.sort(np.concatenate([np.arange(num_normals), fill]).astype(np.int64))
        rest = np.zeros(0, np.int64)
    rest = np.concatenate([rest, np.random.default_rng([seed, 10]).permutation(np.setdiff1d(pool_rows, first))])
    extra = min(banks - 1, len(rest) // n)
    said = (banks, n, num_normals + len(pool_rows), extra)
    if extra < banks - 1 and said not in _BANK_WARNINGS:  # banks are chosen again at refits: said once
        _BANK_WARNINGS.add(said)
        log.warning(
            "model.memory_banks=%d needs %d training normals for banks of model.memory_samples=%d; "
            "%d give %d bank(s), used as such (data_info.json lists them)",
            banks,
            banks * n,
            n,
            num_normals + len(pool_rows),
            extra + 1,
        )
    return [first, *(np.sort(rest[i * n : (i + 1) * n]).astype(np.int64) for i in range(extra))]


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


def _validation_rows(cfg: Config, n: int) -> np.ndarray:
    """The labeled normals held out for validation (:func:`validation_count`, :func:`validation_indices`),
    and a log line that says how many."""
    rows = validation_indices(
        n, validation_count(n, cfg.eval.validation_normals, cfg.eval.validation_fraction), cfg.data.seed
    )
    log.info(
        "validation: %d of %d labeled normals held out for score normalisation and the decision threshold "
        "(eval.validation_fraction %.2g, at most eval.validation_normals %d; listed in data_info.json), %d train",
        len(rows),
        n,
        cfg.eval.validation_fraction,
        cfg.eval.validation_normals,
        n - len(rows),
    )
    return rows


def _split_validation_set(cfg: Config, split: Split, align) -> tuple[ValidationSet, list[str]]:
    """The validation set from ``split.validation`` (its normals, the simulated anomalies made on them, its
    labeled anomalies with their masks) and the normals' files.

    Raises:
        ImageReadError: an unreadable validation image (never skipped: the set is the same for every setting).
        ValueError: the split's validation set holds no normal (the threshold needs their scores).
    """
    normal = np.array([r.label == LABEL_NORMAL for r in split.validation])
    if not normal.any():
        raise ValueError("the split's validation set holds no normal image (data.split_validation_normals >= 1)")
    loaded = load_records(split.validation, cfg.data.image_size, align=align, with_masks=True)
    paths = [r.path for r in split.validation]
    log.info(
        "validation: the split's own set, %d normals and %d labeled anomalies that train nowhere "
        "(data.split_validation_normals / data.split_validation_anomalies)",
        int(normal.sum()),
        int((~normal).sum()),
    )
    anom = ~normal
    vset = build_validation_set(
        cfg,
        loaded.images[normal],
        [p for p, n in zip(paths, normal) if n],
        loaded.images[anom] if anom.any() else None,
        loaded.masks[anom] if anom.any() else None,
        [p for p, n in zip(paths, normal) if not n],
        [r.path for r in split.test],
    )
    return vset, [p for p, n in zip(paths, normal) if n]


def initial_pool_labels(cfg: Config, num_labeled: int, pool_size: int) -> np.ndarray:
    """Pseudo-labels of the pool before the first refit, int8 ``(pool_size,)``: all normal (0) when the
    pseudo-labeler is off (the pool is used as normal data) or when there are fewer than 2 labeled
    normals to start from; else all unknown (-1), so the pool waits for its first labels."""
    as_normal = not cfg.pseudo.enabled or num_labeled < 2
    return np.full(pool_size, 0 if as_normal else -1, dtype=np.int8)


def with_memory_banks(cfg: Config, data: TrainData) -> TrainData:
    """``data`` with the memory banks of ``cfg.model`` (``memory_samples``, ``memory_banks``; seeded with
    ``data.seed``) chosen from its labeled normals and the pool images presumed normal before the first
    refit (:func:`choose_memory_banks`); the images are shared, not copied."""
    init = initial_pool_labels(cfg, len(data.normals), data.pool_size)
    m = cfg.model
    banks = choose_memory_banks(
        len(data.normals),
        m.memory_samples,
        m.memory_banks,
        cfg.data.seed,
        len(data.normals) + np.flatnonzero(init == 0),
    )
    return dataclasses.replace(data, memory_indices=banks[0], extra_memory_indices=banks[1:], info=dict(data.info))


def load_train_data(cfg: Config, split: Split) -> tuple[TrainData, ValidationSet, dict[str, Any]]:
    """Decode the training images and build the validation set (:mod:`mapl_ray.data.validation`).

    Returns:
        ``(TrainData, ValidationSet, info)``; ``info`` lists the images used (``data_info.json``).

    Raises:
        ImageReadError: an unreadable image (unless ``data.skip_bad_images``).
        ValueError: no labeled normal and no unlabeled image to train on.
    """
    size, skip = cfg.data.image_size, cfg.data.skip_bad_images
    align = build_pose_estimator(cfg)
    loaded = {
        name: load_records(getattr(split, name), size, skip_bad=skip, align=align, with_masks=name == "labeled_anomaly")
        if getattr(split, name)
        else None
        for name in ("labeled_normal", "unlabeled", "labeled_anomaly")
    }
    normals, unl, anom = loaded["labeled_normal"], loaded["unlabeled"], loaded["labeled_anomaly"]
    presumed = normals is None or not len(normals.images)
    if split.validation:  # the split's own validation set: nothing is held out of the training data
        vset, val_paths = _split_validation_set(cfg, split, align)
        if presumed:  # training starts from the pool as normal data (pseudo.labeler: fewer than 2 labeled)
            normals = LoadedImages(np.zeros((0, size, size, 3), np.uint8), None, [])
        keep = np.arange(len(normals.images))
        held = np.zeros(0, np.int64)
    else:
        if presumed:  # all of them validate; training starts from the pool as normal data
            normals = _presumed_normals(cfg, unl)
        val_idx = np.arange(len(normals.images)) if presumed else _validation_rows(cfg, len(normals.images))
        keep = np.setdiff1d(np.arange(len(normals.images)), val_idx)
        held = (
            held_out_anomalies([r.defect_type for r in anom.records], cfg.eval.validation_anomalies, cfg.data.seed)
            if anom is not None
            else np.zeros(0, np.int64)
        )
        val_paths = [normals.records[i].path for i in val_idx]
        vset = build_validation_set(
            cfg,
            normals.images[val_idx],
            val_paths,
            None if anom is None else anom.images[held],
            None if anom is None else anom.masks[held],
            [] if anom is None else [anom.records[i].path for i in held],
            [r.path for r in split.test],
        )
    train_anom = None if anom is None else np.setdiff1d(np.arange(len(anom.images)), held)
    pool = _pool_images(split, unl)
    if not len(keep) and pool is None:
        raise ValueError("no labeled normal image and no unlabeled image to train on")
    canaries, pool_paths = None, []
    if pool is not None:
        pool, canaries, pool_paths = add_canaries(cfg, pool, [r.path for r in unl.records])
        vset.description["pool_canaries"] = int(canaries.sum())
    data = with_memory_banks(
        cfg,
        TrainData(
            normals=normals.images[keep],
            memory_indices=np.zeros(0, np.int64),
            unlabeled=pool,
            anomalies=None if anom is None else anom.images[train_anom],
            anomaly_masks=None if anom is None else anom.masks[train_anom],
            unlabeled_truth=None
            if pool is None
            else np.concatenate([_pool_truth(split, unl.records), np.full(int(canaries.sum()), -1, np.int8)]),
            pool_canaries=canaries,
        ),
    )
    banks = [data.memory_indices, *data.extra_memory_indices]
    source_paths = [normals.records[i].path for i in keep] + pool_paths
    if pool is not None:
        data.info["source_paths"] = source_paths
    info = {
        "train_normals": int(len(keep)),
        "validation_normals": val_paths,
        "validation": vset.description,
        "unlabeled": 0 if pool is None else int(len(pool) - canaries.sum()),
        "validation_canaries": [] if pool is None else [p for p, c in zip(pool_paths, canaries) if c],
        "labeled_anomalies": 0 if anom is None else int(len(train_anom)),
        "memory_samples": int(len(data.memory_indices)),
        # the images of each memory bank (bank 0 trains the network; all are averaged at inference)
        "memory_banks": [[source_paths[i] for i in idx] for idx in banks],
        "skipped_images": [x for ld in loaded.values() if ld is not None for x in ld.skipped],
    }
    _note_poses(cfg, info, align, [normals, unl, anom])
    return data, vset, info


def _pool_images(split: Split, unl: LoadedImages | None) -> np.ndarray | None:
    """The unlabeled pool's uint8 images ``(M, H, W, 3)``, None without a pool; a warning when the split
    lists unlabeled images but ``data.skip_bad_images`` skipped every one of them."""
    pool = None if unl is None or not len(unl.images) else unl.images
    if split.unlabeled and pool is None:
        log.warning(
            "none of the %d unlabeled images could be read (data_info.json: skipped_images): training without an "
            "unlabeled pool",
            len(split.unlabeled),
        )
    return pool


def _presumed_normals(cfg: Config, unl: LoadedImages | None) -> LoadedImages:
    """With no labeled normal: ``eval.validation_normals`` pool images, removed from the pool, stand in
    for the validation normals (the threshold then rests on images presumed normal; a warning says so)."""
    if unl is None or len(unl.images) < 3:
        raise ValueError("no labeled normal image (train/good is empty) and fewer than 3 unlabeled images")
    n = min(cfg.eval.validation_normals, len(unl.images) // 3)
    rows = np.sort(np.random.default_rng([cfg.data.seed, 31]).choice(len(unl.images), size=n, replace=False))
    log.warning(
        "no labeled normal images: %d unlabeled images are held out as presumed normals for validation and the "
        "decision threshold; defective images among them raise the threshold (fewer detections). Label a few "
        "normal images (train/good) for a threshold you can trust.",
        n,
    )
    presumed = LoadedImages(
        images=unl.images[rows],
        masks=None,
        records=[unl.records[i] for i in rows],
        poses=None if unl.poses is None else [unl.poses[i] for i in rows],
    )
    rest = np.setdiff1d(np.arange(len(unl.images)), rows)
    unl.records, unl.images = [unl.records[i] for i in rest], unl.images[rest]
    if unl.poses is not None:
        unl.poses = [unl.poses[i] for i in rest]
    return presumed


def _pool_truth(split: Split, records) -> np.ndarray:
    """True labels (int8, -1 unknown) of the pool images loaded, from the split's benchmark truth."""
    truth = dict(zip((r.path for r in split.unlabeled), split.params.get("unlabeled_true_labels", [])))
    return np.array([truth.get(r.path, -1) for r in records], dtype=np.int8)


def _note_poses(cfg: Config, info: dict[str, Any], align, loaded: list) -> None:
    """Under ``data.align=principal_axis``, list (and warn about) training images in which no object was found
    (under ``landscape`` no pose only means an image already at least as wide as tall)."""
    if align is None:
        return
    info["align"] = cfg.data.align
    if cfg.data.align != "principal_axis":
        return
    info["no_pose_found"] = [
        r.path for ld in loaded if ld is not None for r, p in zip(ld.records, ld.poses) if p is None
    ]
    if info["no_pose_found"]:
        log.warning(
            "data.align: no object found in %d training images (kept as they are; check "
            "simulation.foreground_threshold / foreground_inverse), e.g. %s; all are listed in data_info.json",
            len(info["no_pose_found"]),
            info["no_pose_found"][:3],
        )


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
        rotated_copies(data.source_images(idx), cfg.model.memory_rotations)
        for idx in (data.memory_indices, *data.extra_memory_indices)
    ]
