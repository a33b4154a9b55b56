"""Scoring with a trained run: anomaly maps, image scores, decisions (used by evaluate, predict, serve).

Image score (issue 2 / MemSeg practice): mean of the ``top_k`` largest pixels of the anomaly map
(sigmoid of the decoder logits), plus ``q_weight * sigmoid(q)`` of the image head when configured.
A decision threshold and a z-score normalisation are fitted on held-out labeled normals after
training (never on test data) and stored in ``checkpoint/state.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from .checkpoint import load_model_weights, read_state
from .config import Config
from .data.io import load_image
from .eval.metrics import topk_mean
from .training import autocast_context, build_model, to_tensor


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class Predictor:
    """A trained MAPL model loaded from a run folder.

    Args:
        run_dir: run folder with ``config.yaml`` and ``checkpoint/``.
        device: ``auto``, ``cpu``, ``cuda``...
        batch_size: images per forward pass (default: ``eval.batch_size``).

    Raises:
        CheckpointError / ConfigError: the run folder is incomplete or unreadable (names the file).
    """

    def __init__(self, run_dir: str | Path, device: str | torch.device | None = "auto", batch_size: int | None = None):
        self.run_dir = Path(run_dir)
        self.cfg = Config.load(self.run_dir / "config.yaml")
        self.state = read_state(self.run_dir)
        self.device = resolve_device(device)
        # all weights (encoder included) come from the checkpoint: no pretrained file needed to serve
        cfg = self.cfg.override({"model.pretrained": False, "model.weights": None})
        self.model = build_model(cfg)
        size = self.cfg.data.image_size
        self.model.refresh_memory(torch.zeros(1, 3, size, size))  # bank buffers; overwritten below
        load_model_weights(self.run_dir, self.model)
        self.model.to(self.device).eval()
        if self.device.type == "cuda" and self.cfg.train.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.batch_size = batch_size or self.cfg.eval.batch_size
        self.image_size = size

    @property
    def threshold(self) -> float | None:
        return self.state.get("threshold")

    @torch.no_grad()
    def predict_tensor(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Anomaly maps ``(B, H, W)`` float32 in [0, 1], head probabilities ``q`` ``(B,)`` and image scores ``(B,)``.

        ``x``: float32 ``(B, 3, H, W)`` in [0, 1] at the run's image size, on any device.
        """
        x = x.to(self.device, non_blocking=True)
        if self.device.type == "cuda" and self.cfg.train.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast_context(self.device, self.cfg.train.amp):
            out = self.model(x)
        maps = torch.sigmoid(out["logits"].float())[:, 0]
        q = torch.sigmoid(out["q"].float())
        return {"maps": maps, "q": q, "scores": self.score(maps, q)}

    def score(self, maps: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """Image score ``(B,)``: top-k mean of each map plus ``q_weight * q``."""
        return topk_mean(maps, self.cfg.eval.top_k) + self.cfg.eval.q_weight * q

    def predict_arrays(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Score uint8 images ``(N, H, W, 3)`` (already at the run's image size) in batches.

        Returns numpy ``maps`` ``(N, H, W)`` float32, ``q`` ``(N,)``, ``scores`` ``(N,)``.
        """
        outs: dict[str, list[np.ndarray]] = {"maps": [], "q": [], "scores": []}
        for i in range(0, len(images), self.batch_size):
            res = self.predict_tensor(to_tensor(images[i : i + self.batch_size]))
            for k in outs:
                outs[k].append(res[k].cpu().numpy())
        return {k: np.concatenate(v) if v else np.zeros((0,), np.float32) for k, v in outs.items()}

    def normalise(self, scores: np.ndarray) -> np.ndarray:
        """Scores in standard deviations above the validation normals' mean (``state.json`` normalisation)."""
        from .eval.metrics import normalise_scores

        stats = self.state.get("normalisation")
        return normalise_scores(scores, stats) if stats else np.asarray(scores, dtype=np.float64)

    def predict_paths(self, paths: Iterable[str | Path]) -> tuple[list[dict[str, Any]], np.ndarray, np.ndarray]:
        """Score image files. Returns (records with path/score/normalised score/label, images, maps).

        ``label`` is 1 when the score reaches the run's decision threshold, None if the run has none.

        Raises:
            ImageReadError: a file is missing or not a readable image (names the file).
        """
        paths = [str(p) for p in paths]
        images = np.stack([load_image(p, self.image_size) for p in paths]) if paths else np.zeros((0, self.image_size, self.image_size, 3), np.uint8)
        res = self.predict_arrays(images)
        norm = self.normalise(res["scores"])
        thr = self.threshold
        records = [
            {"path": p, "score": float(s), "normalised_score": float(n), "q": float(q),
             "label": (int(s >= thr) if thr is not None else None)}
            for p, s, n, q in zip(paths, res["scores"], norm, res["q"])
        ]
        return records, images, res["maps"]
