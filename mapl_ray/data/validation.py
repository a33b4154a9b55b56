"""The validation set: labeled data only, never a test file.

It holds the labeled normals held out of training (``eval.validation_normals``), simulated anomalies
made on them with a validation seed, textures held out of training
(:func:`~mapl_ray.data.simulation.split_textures`) and a lower opacity than in training
(``eval.validation_delta_max``: subtle anomalies keep the objective from saturating), and the labeled anomalies held out of training
when the user gave some (``eval.validation_anomalies`` of each defect type). Its image AUROC is the
objective every choice of a setting is made on (:mod:`mapl_ray.eval.validation`); its normals set
the decision threshold.

With an unlabeled pool, *validation canaries* (:func:`add_canaries`) make the objective see what the
pool does to the detector: simulated anomalies of the validation kind hidden among the pool images. A
pseudo-labeler that lets them into the normal stream (and the memory banks) teaches the network that
such anomalies are normal, and the validation anomalies, made the same way, score lower; one that
labels them anomalous trains the image head on them. Real defects in the pool act the same way, which
validation could not see otherwise (its anomalies are simulated, the pool's defects are not labeled).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..config import Config
from .simulation import build_simulator

#: ValidationSet.sources values
SOURCE_NORMAL, SOURCE_SIMULATED, SOURCE_LABELED_ANOMALY = 0, 1, 3


@dataclass
class ValidationSet:
    """Validation images with their truth.

    Attributes:
        images: uint8 ``(V, H, W, 3)`` at the run's size (pose-normalised like training images).
        labels: int8 ``(V,)``, 1 anomalous, 0 normal.
        masks: uint8 ``(V, H, W)`` in {0, 1} (zeros for normals).
        sources: int8 ``(V,)``: :data:`SOURCE_NORMAL`, :data:`SOURCE_SIMULATED` or :data:`SOURCE_LABELED_ANOMALY`.
        paths: the file behind each image (a simulated anomaly names the normal it was made from).
        description: what the set was made of, for ``metrics.json``.
    """

    images: np.ndarray
    labels: np.ndarray
    masks: np.ndarray
    sources: np.ndarray
    paths: list[str]
    description: dict[str, Any] = field(default_factory=dict)

    @property
    def normals(self) -> np.ndarray:
        """The held-out labeled normals, uint8 ``(V0, H, W, 3)`` (score normalisation and threshold)."""
        return self.images[self.sources == SOURCE_NORMAL]

    def __len__(self) -> int:
        return len(self.labels)

    def composition(self) -> str:
        """What the set is made of, in words, counted from :attr:`sources`: ``16 normals, 64 simulated
        anomalies`` (and labeled anomalies where there are some)."""
        kinds = {
            SOURCE_NORMAL: "normals",
            SOURCE_SIMULATED: "simulated anomalies",
            SOURCE_LABELED_ANOMALY: "labeled anomalies",
        }
        counts = [(int((self.sources == v).sum()), name) for v, name in kinds.items()]
        return ", ".join(f"{n} {name}" for n, name in counts if n)


def held_out_anomalies(types: list[str], share: float, seed: int) -> np.ndarray:
    """Rows of the labeled anomalies held out for validation: ``round(share * n)`` of each defect type
    with ``n`` images, training keeping at least one of each. Returns sorted int64 rows."""
    rng = np.random.default_rng([seed, 29])
    held: list[int] = []
    for t in sorted(set(types)):
        rows = [i for i, x in enumerate(types) if x == t]
        n = min(int(share * len(rows) + 0.5), len(rows) - 1)
        if n > 0:
            held.extend(rng.choice(rows, size=n, replace=False).tolist())
    return np.array(sorted(held), dtype=np.int64)


def build_validation_set(
    cfg: Config,
    normals: np.ndarray,
    normal_paths: list[str],
    anomalies: np.ndarray | None,
    anomaly_masks: np.ndarray | None,
    anomaly_paths: list[str],
    test_paths: list[str],
) -> ValidationSet:
    """The validation set of a run (module docstring).

    Args:
        cfg: the run's configuration (``eval.validation_simulations``, ``simulation.*``, ``data.seed``).
        normals: uint8 ``(V0, H, W, 3)`` held-out labeled normals, with their files ``normal_paths``.
        anomalies, anomaly_masks: held-out labeled anomalies uint8 ``(A, H, W, 3)`` / ``(A, H, W)``, or None.
        anomaly_paths: their files.
        test_paths: the test split's files, which must not appear here.

    Raises:
        RuntimeError: a validation image is a test file (a bug: the split keeps them apart).
    """
    leaked = {os.path.abspath(p) for p in normal_paths + anomaly_paths} & {os.path.abspath(p) for p in test_paths}
    if leaked:
        raise RuntimeError(f"validation set would hold test files: {sorted(leaked)[:3]}")
    h, w = cfg.data.image_size, cfg.data.image_size
    sims, sim_masks, sim_paths = _simulate(cfg, normals, normal_paths)
    n_anom = 0 if anomalies is None else len(anomalies)
    images = np.concatenate([normals.reshape(-1, h, w, 3), sims] + ([anomalies] if n_anom else []))
    masks = np.concatenate([np.zeros((len(normals), h, w), np.uint8), sim_masks] + ([anomaly_masks] if n_anom else []))
    sources = np.concatenate(
        [
            np.full(len(normals), SOURCE_NORMAL),
            np.full(len(sims), SOURCE_SIMULATED),
            np.full(n_anom, SOURCE_LABELED_ANOMALY),
        ]
    ).astype(np.int8)
    description = {
        "normals": int(len(normals)),
        "simulated_anomalies": int(len(sims)),
        "labeled_anomalies": int(n_anom),
        "simulation": f"{cfg.eval.validation_simulations} per normal, validation seed, textures held out of training "
        f"(simulation.validation_textures = {cfg.simulation.validation_textures}), transparency delta in "
        f"[{cfg.simulation.delta_min}, {cfg.eval.validation_delta_max}]",
        "test_files": 0,
    }
    return ValidationSet(
        images,
        (sources != SOURCE_NORMAL).astype(np.int8),
        masks,
        sources,
        list(normal_paths) + sim_paths + list(anomaly_paths),
        description,
    )


def add_canaries(cfg: Config, pool: np.ndarray, paths: list[str]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The pool with validation canaries appended (module docstring): ``round(eval.validation_canaries *
    M)`` simulated anomalies, each made on a different pool image (seeded choice) with the validation
    simulator (held-out textures, opacity up to ``eval.validation_delta_max``) and its own seed. The
    original images stay in the pool.

    Args:
        cfg: the run's configuration (``eval.validation_canaries``, ``simulation.*``, ``data.seed``).
        pool: uint8 ``(M, H, W, 3)`` unlabeled images; ``paths``: their files.

    Returns:
        ``(images (M + C, H, W, 3), canary (M + C,) bool, paths)``: a canary's path names its source image.
    """
    n = min(int(round(cfg.eval.validation_canaries * len(pool))), len(pool))
    canary = np.zeros(len(pool) + n, bool)
    if not n:
        return pool, canary, list(paths)
    rows = np.sort(np.random.default_rng([cfg.data.seed, 37]).choice(len(pool), size=n, replace=False))
    sim = build_simulator(cfg.override({"simulation.delta_max": cfg.eval.validation_delta_max}), part="validation")
    rng = np.random.default_rng([cfg.data.seed, 41])
    made = np.stack([sim(pool[i], rng)[0] for i in rows])
    canary[len(pool) :] = True
    return np.concatenate([pool, made]), canary, list(paths) + [f"{paths[i]} (validation canary)" for i in rows]


def _simulate(cfg: Config, normals: np.ndarray, paths: list[str]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``eval.validation_simulations`` simulated anomalies per normal (validation textures and seed)."""
    h = cfg.data.image_size
    k = cfg.eval.validation_simulations
    if not len(normals) or not k:
        return np.zeros((0, h, h, 3), np.uint8), np.zeros((0, h, h), np.uint8), []
    sim = build_simulator(cfg.override({"simulation.delta_max": cfg.eval.validation_delta_max}), part="validation")
    rng = np.random.default_rng([cfg.data.seed, 23])
    images, masks, names = [], [], []
    for i, img in enumerate(normals):
        for j in range(k):
            out, mask, _ = sim(img, rng)
            images.append(out)
            masks.append(mask)
            names.append(f"{paths[i]} (simulated anomaly {j + 1})")
    return np.stack(images), np.stack(masks), names
