"""The pseudo-labeler inside training: refits the OCC ensemble on a schedule from the network's pooled
features and labels the batch's images 1 / 0 / -1 on the device (MAPL eqs. 3-6, 15-17)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..config import Config
from ..data.batches import BatchMaker
from ..model import MAPLModel
from ..tensors import autocast_context, to_tensor
from .occ import OCCConfig, OCCEnsemble


class PseudoLabeler:
    """Fits the OCC ensemble on a schedule from the model's pooled features and labels batches."""

    def __init__(self, cfg: Config, batch_maker: BatchMaker, device: torch.device):
        self.cfg, self.bm, self.device = cfg, batch_maker, device
        p = cfg.pseudo
        self.occ_cfg = OCCConfig.from_config(p, cfg.train.seed)
        self.ensemble: OCCEnsemble | None = None
        self.fitted_step = -1

    def due(self, step: int) -> bool:
        """A refit step, or any step after warm-up while there is no ensemble yet (a run resumed off-schedule)."""
        p = self.cfg.pseudo
        return self.is_refit_step(step) or (self.ensemble is None and p.enabled and step >= p.warmup_steps)

    @torch.no_grad()
    def _pooled(self, model: MAPLModel, images: np.ndarray) -> np.ndarray:
        out = []
        for i in range(0, len(images), 32):
            x = to_tensor(images[i : i + 32], self.device)
            with autocast_context(self.device, self.cfg.train.amp):
                out.append(model.pooled_features(x).float().cpu().numpy())
        return np.concatenate(out)

    def is_refit_step(self, step: int) -> bool:
        """Steps of the refit schedule (``warmup_steps`` then every ``refit_every``): their pool is prefetched."""
        p = self.cfg.pseudo
        return p.enabled and step >= p.warmup_steps and (step - p.warmup_steps) % p.refit_every == 0

    def fit(self, model: MAPLModel, step: int, pool: dict[str, Any] | None = None) -> dict[str, Any]:
        """Refit the ensemble (same data and seed on every worker, so every worker gets the same ensemble).

        ``pool``: :meth:`BatchMaker.pool` of ``step`` when it was prepared ahead (by a loader
        worker); drawn here otherwise.
        """
        d, p = self.bm.data, self.cfg.pseudo
        if pool is None:
            pool = self.bm.pool(step)
        sims = np.asarray(pool["sims"])
        was = model.training
        model.eval()
        normals = self._pooled(model, d.normals[np.asarray(pool["normal_idx"])])
        pos_images = sims[: p.pool_size]
        if d.anomalies is not None and len(d.anomalies):
            pos_images = np.concatenate([d.anomalies, pos_images])
        positives = self._pooled(model, pos_images)
        unl_idx = np.asarray(pool["unlabeled_idx"])
        unl_images = d.unlabeled[unl_idx] if len(unl_idx) else sims[p.pool_size :]
        unlabeled = self._pooled(model, unl_images)
        model.train(was)
        self.ensemble = OCCEnsemble(self.occ_cfg).fit(normals, unlabeled, positives)
        self.fitted_step = step
        pl = self.ensemble.predict(unlabeled)
        return {
            "pseudo_pos": int((pl == 1).sum()),
            "pseudo_neg": int((pl == 0).sum()),
            "pseudo_unknown": int((pl == -1).sum()),
        }

    def predict(self, pooled: torch.Tensor) -> torch.Tensor:
        """Pseudo-labels int64 ``(B,)`` (1 / 0 / -1) for pooled features ``(B, D)``, on their device
        (no host sync); all -1 before the first fit."""
        if self.ensemble is None:
            return torch.full((pooled.shape[0],), -1, dtype=torch.long, device=pooled.device)
        return self.ensemble.predict_torch(pooled.detach())
