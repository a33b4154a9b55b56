"""Training batches: which images each worker sees at each step, and the simulated anomalies in them.

Everything here depends only on ``(seed, rank, step)``, so a resumed run draws the same batches and
loader processes (:class:`StepBatches` in a ``torch.utils.data.DataLoader``) can prepare them ahead
of the GPU in any order. Kept free of the model code (timm, scikit-learn): loader processes started
with ``spawn`` / ``forkserver`` import only this, numpy, Pillow and torch.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..config import Config
from .augment import augment_images, jitter_intensity
from .simulation import AnomalySimulator
from .train_data import TrainData


def epoch_indices(n: int, start: int, count: int, seed: int, stream: int) -> np.ndarray:
    """Positions ``start .. start+count`` of an endless stream of seeded permutations of ``range(n)``.

    Every index appears once per epoch, so every labeled normal is used; depends only on the
    arguments (resumable).
    """
    pos = np.arange(start, start + count)
    out = np.empty(count, dtype=np.int64)
    for epoch in np.unique(pos // n):
        perm = np.random.default_rng([seed, stream, int(epoch)]).permutation(n)
        sel = pos // n == epoch
        out[sel] = perm[pos[sel] % n]
    return out


class BatchMaker:
    """Draws the per-worker batch of one step (see module docstring)."""

    def __init__(self, cfg: Config, data: TrainData, simulator: AnomalySimulator, rank: int = 0, world_size: int = 1):
        self.cfg, self.data, self.sim, self.rank, self.world = cfg, data, simulator, rank, world_size
        t = cfg.train
        if data.normals.shape[0] < 2:
            raise ValueError("training needs at least 2 labeled normal images")
        self.n_normal, self.n_sim = t.batch_normal, t.batch_simulated
        self.n_unl = t.batch_unlabeled if data.unlabeled is not None and len(data.unlabeled) else 0
        self.n_anom = t.batch_labeled_anomaly if data.anomalies is not None and len(data.anomalies) else 0

    def _stream(self, step: int, per_rank: int, n: int, stream: int) -> np.ndarray:
        start = (step * self.world + self.rank) * per_rank
        return epoch_indices(n, start, per_rank, self.cfg.train.seed, stream)

    def simulate(self, base: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Simulated anomalies from uint8 images ``(B, H, W, 3)``: (images, masks uint8 ``(B, H, W)``)."""
        imgs, masks = [], []
        for img in base:
            out, mask, _ = self.sim(img, rng)
            imgs.append(out)
            masks.append(mask)
        return np.stack(imgs), np.stack(masks)

    def pool(self, step: int) -> dict[str, np.ndarray]:
        """The images the pseudo-labeler is refitted on at ``step`` (seeded by ``(seed, step)``, equal on every rank).

        ``normal_idx``: int64 rows of ``data.normals`` (at most 128); ``sims``: uint8
        ``(2 pool_size, H, W, 3)`` simulated anomalies; ``unlabeled_idx``: rows of the unlabeled pool
        (at most 512) or empty.
        """
        d, p = self.data, self.cfg.pseudo
        rng = np.random.default_rng([self.cfg.train.seed, step, 2])
        normal_idx = rng.choice(len(d.normals), size=min(len(d.normals), 128), replace=False)
        base = d.normals[rng.integers(0, len(d.normals), size=2 * p.pool_size)]
        sims, _ = self.simulate(base, rng)
        unl_idx = np.zeros(0, np.int64)
        if d.unlabeled is not None and len(d.unlabeled):
            unl_idx = (
                np.arange(len(d.unlabeled))
                if len(d.unlabeled) <= 512
                else rng.choice(len(d.unlabeled), 512, replace=False)
            )
        return {"normal_idx": normal_idx, "sims": sims, "unlabeled_idx": unl_idx}

    def has_pool(self) -> bool:
        """Whether batches contain unlabeled-pool images (kind 2)."""
        return self.n_unl > 0

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        """Batch dict: ``images`` uint8 ``(B, H, W, 3)``, ``masks`` uint8 ``(B, H, W)``, ``kind`` int8 ``(B,)``
        (0 normal, 1 simulated, 2 unlabeled, 3 labeled anomaly), ``label`` int8 (0/1, -1 unknown)."""
        d = self.data
        n = d.normals.shape[0]
        rng = np.random.default_rng([self.cfg.train.seed, self.rank, step, 1])
        aug = self.cfg.train.augment
        jit = self.cfg.train.color_jitter
        normal, _ = augment_images(d.normals[self._stream(step, self.n_normal, n, 0)], None, aug, rng)
        normal = jitter_intensity(normal, jit, rng)
        sim_base, _ = augment_images(d.normals[self._stream(step, self.n_sim, n, 1)], None, aug, rng)
        sim_base = jitter_intensity(sim_base, jit, rng)
        sim_img, sim_mask = self.simulate(sim_base, rng)
        parts = [(normal, np.zeros(normal.shape[:3], np.uint8), 0, 0), (sim_img, sim_mask, 1, 1)]
        if self.n_unl:
            u = d.unlabeled[self._stream(step, self.n_unl, len(d.unlabeled), 2)]
            parts.append((u, np.zeros(u.shape[:3], np.uint8), 2, -1))
        if self.n_anom:
            idx = self._stream(step, self.n_anom, len(d.anomalies), 3)
            a_img, a_mask = augment_images(d.anomalies[idx], d.anomaly_masks[idx], aug, rng)
            parts.append((a_img, a_mask, 3, 1))
        return {
            "images": np.concatenate([p[0] for p in parts]),
            "masks": np.concatenate([p[1] for p in parts]),
            "kind": np.concatenate([np.full(len(p[0]), p[2], np.int8) for p in parts]),
            "label": np.concatenate([np.full(len(p[0]), p[3], np.int8) for p in parts]),
        }


class StepBatches(torch.utils.data.Dataset):
    """Training batches as a map-style dataset over step indices, for a ``torch.utils.data.DataLoader``.

    Item ``step`` is ``BatchMaker(step)`` and, on the pseudo-labeler's refit steps, its
    :meth:`BatchMaker.pool` under ``"pool"``. Every item depends only on ``(seed, rank, step)``, so
    loader workers can simulate anomalies ahead of the GPU in any order and a resumed run still
    draws the same batches.
    """

    def __init__(self, batch_maker: BatchMaker, refit_steps: set[int]):
        self.bm, self.refit_steps = batch_maker, frozenset(refit_steps)  # plain data: picklable for spawn/forkserver

    def __len__(self) -> int:
        return self.bm.cfg.train.steps

    def __getitem__(self, step: int) -> dict[str, Any]:
        batch: dict[str, Any] = self.bm(step)
        if step in self.refit_steps:
            batch["pool"] = self.bm.pool(step)
        return batch
