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
from .foreground import foreground_masks
from .simulation import AnomalySimulator
from .train_data import TrainData, normal_rows

#: a refit's simulated pool is made in this many parts, one in each of the loader items of the steps just
#: before the refit (:class:`StepBatches`): one part in one loader process made the loop wait for it
POOL_CHUNKS = 8


def assemble_pool(chunks: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """:meth:`BatchMaker.pool` from its :meth:`BatchMaker.pool_chunk` parts, in chunk order."""
    return {"normal_idx": chunks[0]["normal_idx"], "sims": np.concatenate([c["sims"] for c in chunks])}


def pool_chunk_steps(refit_step: int) -> range:
    """The steps whose loader items carry the parts of refit ``refit_step``'s pool: part ``c`` at
    ``refit_step - POOL_CHUNKS + 1 + c``."""
    return range(refit_step - POOL_CHUNKS + 1, refit_step + 1)


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
    """Draws the per-worker batch of one step (see module docstring).

    With an unlabeled pool, the batch of step ``s`` depends on the pool's pseudo-labels in force at
    ``s`` (int8 ``(M,)``, 1 / 0 / -1, from :meth:`mapl_ray.pseudo.labeler.PseudoLabeler.labels_for`):
    pool images labeled 0 join the normal stream and the bases of simulated anomalies; ``kind`` 2
    slots carry pool images with their pseudo-label (for L_Yu, eq. 17), at least half of them
    pseudo-anomalous ones while there are any; images labeled -1 are left out.
    """

    def __init__(self, cfg: Config, data: TrainData, simulator: AnomalySimulator, rank: int = 0, world_size: int = 1):
        self.cfg, self.data, self.sim, self.rank, self.world = cfg, data, simulator, rank, world_size
        t = cfg.train
        if data.normals.shape[0] + data.pool_size < 2:
            raise ValueError("training needs at least 2 normal or unlabeled images")
        self.n_normal, self.n_sim = t.batch_normal, t.batch_simulated
        self.n_unl = t.batch_unlabeled if data.pool_size else 0
        self.n_anom = t.batch_labeled_anomaly if data.anomalies is not None and len(data.anomalies) else 0
        self.packed_masks = self._object_masks()

    @property
    def step_images(self) -> int:
        """Images in one step's batch on this rank: the batch size the run's eval-mode passes share with the
        training step (cuDNN builds its convolution plans per input shape, seconds each in a fresh process)."""
        return self.n_normal + self.n_sim + self.n_unl + self.n_anom

    def _object_masks(self) -> np.ndarray | None:
        """uint8 ``(rows, H, ceil(W / 8))``: the object mask of every normal-source image (labeled normals,
        then an in-memory pool), bit-packed along W (``np.packbits``: 1/8 of the memory), computed once here,
        before loader processes fork, instead of once per simulated anomaly. The masks follow the flips /
        rotations of ``train.augment`` (the mask commutes with them,
        :func:`~mapl_ray.data.foreground.foreground_masks`); None where they cannot stand in for the mask of
        the simulated image: intensity jitter changes the grey levels, or no object mask is used."""
        if self.sim is None or self.cfg.train.color_jitter > 0 or not self.sim.foreground.use_mask:
            return None
        d = self.data
        parts = [d.normals] + ([d.unlabeled] if d.pool_size and not d.pool_streamed else [])
        self._mask_width = int(max(p.shape[2] for p in parts))  # all of one size
        return np.concatenate([np.packbits(foreground_masks(p, self.sim.foreground), axis=-1) for p in parts])

    def object_masks(self, rows: np.ndarray) -> np.ndarray | None:
        """bool ``(len(rows), H, W)``: the cached object masks of normal-source ``rows``; None without a cache
        (or for rows it does not hold: a streamed pool's)."""
        packed, rows = self.packed_masks, np.asarray(rows)
        if packed is None or (len(rows) and rows.max() >= len(packed)):
            return None
        return np.unpackbits(packed[rows], axis=-1, count=self._mask_width).view(bool)

    def _stream(self, step: int, per_rank: int, n: int, stream: int) -> np.ndarray:
        start = (step * self.world + self.rank) * per_rank
        return epoch_indices(n, start, per_rank, self.cfg.train.seed, stream)

    def simulate(
        self, base: np.ndarray, rng: np.random.Generator, object_masks: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Simulated anomalies from uint8 images ``(B, H, W, 3)``: (images, masks uint8 ``(B, H, W)``).
        ``object_masks``: bool ``(B, H, W)`` foreground of ``base`` if known (else computed per image)."""
        imgs, masks = [], []
        for i, img in enumerate(base):
            out, mask, _ = self.sim(img, rng, None if object_masks is None else object_masks[i])
            imgs.append(out)
            masks.append(mask)
        return np.stack(imgs), np.stack(masks)

    def _normal_rows(self, pool_labels: np.ndarray | None) -> np.ndarray:
        rows = normal_rows(self.data, pool_labels)
        if not len(rows):
            raise ValueError("no normal image left: every pool image is pseudo-labeled anomalous or unknown")
        return rows

    def pool(self, step: int, pool_labels: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """The reference images of the pseudo-labeler's refit at ``step`` (seeded by ``(seed, step)``,
        equal on every rank): ``normal_idx`` int64 normal-source rows (at most 128; labeled normals
        while there are 16 or more) and ``sims`` uint8 ``(2 pool_size, H, W, 3)`` simulated anomalies:
        the :data:`POOL_CHUNKS` parts of :meth:`pool_chunk` put together (:func:`assemble_pool`)."""
        return assemble_pool([self.pool_chunk(step, c, pool_labels) for c in range(POOL_CHUNKS)])

    def pool_chunk(self, step: int, chunk: int, pool_labels: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Part ``chunk`` (0 .. :data:`POOL_CHUNKS` - 1) of :meth:`pool`: the same ``normal_idx`` and the
        ``chunk``-th share of the ``sims``, simulated with a generator of its own ``(seed, step, chunk)``, so
        the parts can be made in different loader processes (:class:`StepBatches`) and give the same pool."""
        d, p = self.data, self.cfg.pseudo
        rng = np.random.default_rng([self.cfg.train.seed, step, 2])
        rows = np.arange(len(d.normals)) if len(d.normals) >= 16 else self._normal_rows(pool_labels)
        normal_idx = rows[rng.choice(len(rows), size=min(len(rows), 128), replace=False)]
        base_rows = np.array_split(rows[rng.integers(0, len(rows), size=2 * p.pool_size)], POOL_CHUNKS)[chunk]
        if not len(base_rows):
            return {"normal_idx": normal_idx, "sims": np.zeros((0, *d.normals.shape[1:]), np.uint8)}
        sim_rng = np.random.default_rng([self.cfg.train.seed, step, 2, chunk])
        sims, _ = self.simulate(d.source_images(base_rows), sim_rng, self.object_masks(base_rows))
        return {"normal_idx": normal_idx, "sims": sims}

    def has_pool(self) -> bool:
        """Whether batches contain unlabeled-pool images (kind 2)."""
        return self.n_unl > 0

    def _pool_part(self, step: int, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(images, pseudo-labels)`` of the ``kind`` 2 slots (class docstring)."""
        pos, known = np.flatnonzero(labels == 1), np.flatnonzero(labels != -1)
        if not len(known):
            rows = self._stream(step, self.n_unl, len(labels), 2)
        elif not len(pos):
            rows = known[self._stream(step, self.n_unl, len(known), 2)]
        else:
            half = max(1, self.n_unl // 2)
            rows = np.concatenate(
                [
                    pos[self._stream(step, half, len(pos), 4)],
                    known[self._stream(step, self.n_unl - half, len(known), 2)],
                ]
            )
        return self.data.unlabeled[rows], labels[rows].astype(np.int8)

    def __call__(self, step: int, pool_labels: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Batch dict: ``images`` uint8 ``(B, H, W, 3)``, ``masks`` uint8 ``(B, H, W)``, ``kind`` int8 ``(B,)``
        (0 normal, 1 simulated, 2 unlabeled, 3 labeled anomaly), ``label`` int8 (0/1, -1 unknown; for
        ``kind`` 2 the pool image's pseudo-label)."""
        d = self.data
        rows = self._normal_rows(pool_labels)
        rng = np.random.default_rng([self.cfg.train.seed, self.rank, step, 1])
        aug = self.cfg.train.augment
        jit = self.cfg.train.color_jitter
        normal, _ = augment_images(
            d.source_images(rows[self._stream(step, self.n_normal, len(rows), 0)]), None, aug, rng
        )
        normal = jitter_intensity(normal, jit, rng)
        sim_rows = rows[self._stream(step, self.n_sim, len(rows), 1)]
        sim_base, sim_fg = augment_images(d.source_images(sim_rows), self.object_masks(sim_rows), aug, rng)
        sim_base = jitter_intensity(sim_base, jit, rng)
        sim_img, sim_mask = self.simulate(sim_base, rng, sim_fg)
        parts = [(normal, np.zeros(normal.shape[:3], np.uint8), 0, 0), (sim_img, sim_mask, 1, 1)]
        if self.n_unl:
            labels = pool_labels if pool_labels is not None else np.full(d.pool_size, -1, np.int8)
            u, u_labels = self._pool_part(step, labels)
            parts.append((u, np.zeros(u.shape[:3], np.uint8), 2, u_labels))
        if self.n_anom:
            idx = self._stream(step, self.n_anom, len(d.anomalies), 3)
            a_img, a_mask = augment_images(d.anomalies[idx], d.anomaly_masks[idx], aug, rng)
            parts.append((a_img, a_mask, 3, 1))
        return {
            "images": np.concatenate([p[0] for p in parts]),
            "masks": np.concatenate([p[1] for p in parts]),
            "kind": np.concatenate([np.full(len(p[0]), p[2], np.int8) for p in parts]),
            "label": np.concatenate([np.broadcast_to(np.asarray(p[3], np.int8), (len(p[0]),)) for p in parts]),
        }


class StepBatches(torch.utils.data.Dataset):
    """Training batches as a map-style dataset, for a ``torch.utils.data.DataLoader``.

    Item ``(step, pool_labels)`` is ``BatchMaker(step, pool_labels)`` and, on the :data:`POOL_CHUNKS`
    steps up to a pseudo-labeler refit step ``r`` (:func:`pool_chunk_steps`), part ``c`` of refit ``r``'s
    pool under ``"pool_chunks"`` (``{r: (c, BatchMaker.pool_chunk(r, c, pool_labels))}``; the loop puts
    the parts together, :func:`assemble_pool`): a pool spread over several loader processes, not one
    (``pool_labels``: the pseudo-labels in force at ``step``, None without a pool; a plain ``step``
    means None). Every item depends only on ``(seed, rank, step)`` and those labels, so loader workers can
    simulate anomalies ahead of the GPU in any order and a resumed run still draws the same batches.
    """

    def __init__(self, batch_maker: BatchMaker, refit_steps: set[int]):
        self.bm, self.refit_steps = batch_maker, frozenset(refit_steps)  # plain data: picklable for spawn/forkserver

    def __len__(self) -> int:
        return self.bm.cfg.train.steps

    def __getitem__(self, item: int | tuple[int, np.ndarray | None]) -> dict[str, Any]:
        step, labels = item if isinstance(item, tuple) else (item, None)
        batch: dict[str, Any] = self.bm(step, labels)
        parts = {r: step - pool_chunk_steps(r).start for r in self.refit_steps if step in pool_chunk_steps(r)}
        if parts:
            batch["pool_chunks"] = {r: (c, self.bm.pool_chunk(r, c, labels)) for r, c in parts.items()}
        return batch
