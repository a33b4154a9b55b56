"""Training input as a stream of per-sample rows, for the Ray Data pipeline (:mod:`mapl_ray.pipelines.ray_data`).

:class:`~mapl_ray.data.batches.BatchMaker` draws a step's batch in one process with one generator per
step. A stream is cut into blocks that parallel workers process in any order, so here every random
choice hangs on the sample it is made for: a sample's generator is ``numpy.random.default_rng([seed,
*key])`` for its key (for training rows ``(rank, step, kind, slot)``), and its result does not depend on
the number of workers or on where blocks begin. Which images a step uses is drawn as in ``BatchMaker``
(the same epoch-wise permutations, :func:`~mapl_ray.data.batches.epoch_indices`, so every labeled
normal is used); the flips, rotations and simulated anomalies differ from ``BatchMaker``'s because their
generators do.

Ray-free: plain numpy, the simulator of :mod:`mapl_ray.data.simulation` and the augmentations of
:mod:`mapl_ray.data.augment`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..config import Config
from .augment import augment_images, jitter_intensity
from .batches import epoch_indices
from .simulation import AnomalySimulator

__all__ = ["StreamPlan", "StreamedPool", "assemble_steps", "augment_samples", "simulate_samples"]


def sample_rng(seed: int, key) -> np.random.Generator:
    """The generator of one sample: ``default_rng([seed, *key])`` (``key``: ints)."""
    return np.random.default_rng([int(seed), *(int(k) for k in np.atleast_1d(key))])


def simulate_samples(
    simulator: AnomalySimulator,
    images: np.ndarray,
    keys: np.ndarray,
    seed: int,
    select: np.ndarray | None = None,
    masks: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Simulated anomalies (MAPL eqs. 1-2) on the selected images, each from its own generator.

    Args:
        simulator: the run's :class:`~mapl_ray.data.simulation.AnomalySimulator`.
        images: uint8 ``(B, H, W, 3)``.
        keys: int ``(B,)`` or ``(B, K)``: sample ``i`` is simulated with :func:`sample_rng` ``(seed, keys[i])``.
        seed: the stream's seed.
        select: bool ``(B,)``: which rows to simulate (default all); the others keep image and mask.
        masks: uint8 ``(B, H, W)`` of the rows not simulated (default zeros).

    Returns:
        (images uint8 ``(B, H, W, 3)``, masks uint8 ``(B, H, W)`` in {0, 1}), new arrays.
    """
    out = np.array(images, dtype=np.uint8, copy=True)
    out_masks = np.zeros(out.shape[:3], np.uint8) if masks is None else np.array(masks, dtype=np.uint8, copy=True)
    keys = np.asarray(keys)
    rows = range(len(out)) if select is None else np.flatnonzero(select)
    for i in rows:
        out[i], out_masks[i], _ = simulator(out[i], sample_rng(seed, keys[i]))
    return out, out_masks


# -- the rows of a training stream ------------------------------------------------------------------
#: ``kind`` of a row: the batch's kinds of :class:`~mapl_ray.data.batches.BatchMaker` (0 labeled normal,
#: 1 simulated anomaly, 2 unlabeled, 3 labeled anomaly), then the pseudo-labeler's pool on refit steps
#: (4 simulated anomalies standing in for positives, 5 unlabeled images).
KIND_NORMAL, KIND_SIMULATED, KIND_UNLABELED, KIND_ANOMALY, POOL_SIMULATED, POOL_UNLABELED = range(6)
#: ``role`` of a row: which list of images its ``index`` points into.
ROLE_NORMAL, ROLE_UNLABELED, ROLE_ANOMALY = range(3)
_ROLE_OF_KIND = (ROLE_NORMAL, ROLE_NORMAL, ROLE_UNLABELED, ROLE_ANOMALY, ROLE_NORMAL, ROLE_UNLABELED)
_LABEL_OF_KIND = (0, 1, -1, 1, 1, -1)
#: The rank field of a pool sample's key: pools are equal on every rank (each fits the same ensemble).
POOL_RANK = 1 << 20
#: Pool sizes of :meth:`~mapl_ray.data.batches.BatchMaker.pool`: normals and unlabeled images per refit.
POOL_NORMALS, POOL_UNLABELED_MAX = 128, 512


@dataclass(frozen=True)
class StreamPlan:
    """Which images every step of one worker uses, as rows (plain data: shipped to Ray workers).

    Args:
        seed: ``train.seed``.
        sizes: number of labeled normals (as in ``TrainData.normals``), unlabeled images and labeled anomalies.
        per_step: images per step of kinds 0-3 (``train.batch_normal``, ``batch_simulated``,
            ``batch_unlabeled``, ``batch_labeled_anomaly``; 0 where the set is empty).
        rank, world: this worker's place among the training workers.
        refit_steps: steps whose rows include the pseudo-labeler's pool.
        pool_size: ``pseudo.pool_size``.
    """

    seed: int
    sizes: tuple[int, int, int]
    per_step: tuple[int, int, int, int]
    rank: int = 0
    world: int = 1
    refit_steps: frozenset[int] = frozenset()
    pool_size: int = 64

    @classmethod
    def from_config(cls, cfg: Config, sizes: tuple[int, int, int], rank=0, world=1, refit_steps=()) -> StreamPlan:
        """The plan of ``cfg.train``'s batch mix for sets of ``sizes`` (a set of size 0 gets no rows)."""
        t = cfg.train
        n_normal, n_unl, n_anom = sizes
        if n_normal < 2:
            raise ValueError("training needs at least 2 labeled normal images")
        per_step = (
            t.batch_normal,
            t.batch_simulated,
            t.batch_unlabeled if n_unl else 0,
            t.batch_labeled_anomaly if n_anom else 0,
        )
        return cls(t.seed, tuple(sizes), per_step, rank, world, frozenset(refit_steps), cfg.pseudo.pool_size)

    def pool_draws(self, step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(normal rows for the OCCs, normal rows to simulate ``2 pool_size`` positives from, unlabeled rows)
        of a refit step; seeded by ``(seed, step)`` only, so equal on every rank (as ``BatchMaker.pool``)."""
        n, n_unl = self.sizes[0], self.sizes[1]
        rng = np.random.default_rng([self.seed, step, 2])
        normal_idx = rng.choice(n, size=min(n, POOL_NORMALS), replace=False)
        base = rng.integers(0, n, size=2 * self.pool_size)
        unl = np.arange(n_unl) if n_unl <= POOL_UNLABELED_MAX else rng.choice(n_unl, POOL_UNLABELED_MAX, replace=False)
        return normal_idx, base, unl

    def rows_of(self, step: int) -> int:
        """Rows of ``step``: the batch, plus the pool on a refit step."""
        extra = 2 * self.pool_size + min(self.sizes[1], POOL_UNLABELED_MAX) if step in self.refit_steps else 0
        return sum(self.per_step) + extra

    def _draw(self, step: int, kind: int) -> np.ndarray:
        """Rows of kind 0-3 at ``step``: ``BatchMaker``'s epoch-wise stream (every image once per epoch)."""
        per, n = self.per_step[kind], self.sizes[_ROLE_OF_KIND[kind]]
        return epoch_indices(n, (step * self.world + self.rank) * per, per, self.seed, kind)

    def rows(self, steps: np.ndarray) -> dict[str, np.ndarray]:
        """The rows of ``steps``, in step order and, within a step, by kind then slot.

        Columns: ``step`` int64, ``kind`` int8, ``slot`` int32, ``role`` int8, ``index`` int64 (into the
        role's list), ``label`` int8, ``simulate`` bool, ``sample_key`` int64 ``(R, 4)``: ``(rank, step,
        kind, slot)``, with :data:`POOL_RANK` for pool rows.
        """
        parts: list[tuple[int, int, np.ndarray]] = []  # (step, kind, indices)
        for step in (int(s) for s in steps):
            parts += [(step, k, self._draw(step, k)) for k in range(4) if self.per_step[k]]
            if step in self.refit_steps:
                _, base, unl = self.pool_draws(step)
                parts += [(step, POOL_SIMULATED, base), (step, POOL_UNLABELED, unl)]
        kind = np.concatenate([np.full(len(i), k, np.int8) for _, k, i in parts]) if parts else np.zeros(0, np.int8)
        step = np.concatenate([np.full(len(i), s, np.int64) for s, _, i in parts]) if parts else np.zeros(0, np.int64)
        slot = (
            np.concatenate([np.arange(len(i), dtype=np.int32) for *_, i in parts]) if parts else np.zeros(0, np.int32)
        )
        index = np.concatenate([i for *_, i in parts]).astype(np.int64) if parts else np.zeros(0, np.int64)
        rank = np.where(kind >= POOL_SIMULATED, POOL_RANK, self.rank)
        return {
            "step": step,
            "kind": kind,
            "slot": slot,
            "role": np.asarray(_ROLE_OF_KIND, np.int8)[kind],
            "index": index,
            "label": np.asarray(_LABEL_OF_KIND, np.int8)[kind],
            "simulate": (kind == KIND_SIMULATED) | (kind == POOL_SIMULATED),
            "sample_key": np.stack([rank, step, kind.astype(np.int64), slot.astype(np.int64)], axis=1),
        }


def augment_samples(
    images: np.ndarray, masks: np.ndarray, kinds: np.ndarray, keys: np.ndarray, seed: int, mode: str, jitter: float
) -> tuple[np.ndarray, np.ndarray]:
    """Flips / rotations (``train.augment``) of kinds 0, 1, 3 and intensity jitter (``train.color_jitter``)
    of kinds 0, 1, as ``BatchMaker`` applies them, each sample with its own generator
    (:func:`sample_rng` of ``(seed, *key, 1)``). Pool rows and unlabeled images stay as they are.

    Returns new uint8 arrays ``(B, H, W, 3)``, ``(B, H, W)``.
    """
    images, masks = np.array(images, copy=True), np.array(masks, copy=True)
    for i in np.flatnonzero(np.isin(kinds, (KIND_NORMAL, KIND_SIMULATED, KIND_ANOMALY))):
        rng = sample_rng(seed, (*keys[i], 1))
        img, m = augment_images(images[i : i + 1], masks[i : i + 1], mode, rng)
        if kinds[i] != KIND_ANOMALY:
            img = jitter_intensity(img, jitter, rng)
        images[i], masks[i] = img[0], m[0]
    return images, masks


def assemble_steps(plan: StreamPlan, blocks: Iterable[dict[str, np.ndarray]]) -> Iterator[dict[str, Any]]:
    """Training batches from the stream's rows (ordered by step), one dict per step as
    :class:`~mapl_ray.data.batches.StepBatches` yields them: ``images`` uint8 ``(B, H, W, 3)``, ``masks``
    uint8 ``(B, H, W)``, ``kind`` int8 and ``label`` int8 ``(B,)``, and on refit steps ``pool``
    (``normal_idx``, ``sims``, ``unlabeled_idx`` empty, ``unlabeled``: the pool's images).

    Holds at most one step's rows beyond the current block.

    Raises:
        RuntimeError: rows of a step arrive after a later step's (the stream lost its order).
    """
    pending: list[dict[str, np.ndarray]] = []
    have = 0
    for block in blocks:
        pending.append(block)
        have += len(block["step"])
        while pending:
            step = int(pending[0]["step"][0])
            need = plan.rows_of(step)
            if have < need:
                break
            rows = {
                k: np.concatenate([b[k] for b in pending]) for k in ("step", "kind", "slot", "image", "mask", "label")
            }
            if (rows["step"][:need] != step).any():
                raise RuntimeError(f"training stream out of order at step {step}")
            yield _step_batch(plan, step, {k: v[:need] for k, v in rows.items()})
            pending = [{k: v[need:] for k, v in rows.items()}] if have > need else []
            have -= need


def _step_batch(plan: StreamPlan, step: int, rows: dict[str, np.ndarray]) -> dict[str, Any]:
    order = np.lexsort((rows["slot"], rows["kind"]))
    rows = {k: v[order] for k, v in rows.items()}
    main = rows["kind"] < POOL_SIMULATED
    batch: dict[str, Any] = {
        "images": rows["image"][main],
        "masks": rows["mask"][main],
        "kind": rows["kind"][main].astype(np.int8),
        "label": rows["label"][main].astype(np.int8),
    }
    if step in plan.refit_steps:
        batch["pool"] = {
            "normal_idx": plan.pool_draws(step)[0],
            "sims": rows["image"][rows["kind"] == POOL_SIMULATED],
            "unlabeled_idx": np.zeros(0, np.int64),
        }
        if plan.sizes[1]:  # without a pool the pseudo-labeler uses simulated images, as BatchMaker's
            batch["pool"]["unlabeled"] = rows["image"][rows["kind"] == POOL_UNLABELED]
    return batch


class StreamedPool:
    """Stands in for ``TrainData.unlabeled`` when the unlabeled pool streams through Ray Data: it has the
    pool's length (so :class:`~mapl_ray.data.batches.BatchMaker` and the loss know the batches hold
    unlabeled images) and no pixels; the images come with the batches and pools."""

    def __init__(self, n: int):
        self.n = int(n)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index):
        raise TypeError(
            "the unlabeled pool is streamed (mapl_ray.pipelines.ray_data): its images come with the batches, "
            "not from TrainData.unlabeled"
        )
