"""Scoring with a trained run folder: :class:`Predictor` loads the network from ``checkpoint/`` and gives
anomaly maps, image scores and decisions (used by evaluate, predict, score and serve).

The map and the score are :mod:`mapl_ray.model.anomaly_map`'s (top-k mean of the map, test-time
augmentation, memory-bank averaging). The decision threshold and the z-score normalisation were
fitted on held-out labeled normals after training (never on test data) and are read from
``checkpoint/state.json``.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .data.io import DecodedUpload, DecodeLimits, decode_file, load_image
from .data.pose import Pose, build_pose_estimator
from .model import build_model, resolve_backend
from .model.anomaly_map import anomaly_maps, fuse_maps, image_scores, tta_views
from .model.graphs import GraphedForward
from .runfolder import load_model_weights, load_run_config, read_state
from .tensors import pad_rows, resolve_device, to_tensor


class Predictor:
    """A trained MAPL model loaded from a run folder.

    Args:
        run_dir: run folder with ``config.yaml`` and ``checkpoint/``.
        device: ``auto``, ``cpu``, ``cuda``...
        batch_size: images per forward pass (default: ``eval.batch_size``).
        cuda_graphs: on CUDA with the torch memory search, replay each batch shape's forward pass
            as a captured CUDA graph (``torch.cuda.CUDAGraph``): one launch instead of hundreds, which
            is what bounds single-image latency. Default: ``eval.cuda_graphs``.
        amp: ``auto`` / ``off`` / ``bf16`` for inference; default: the run's ``train.amp``.
        tta: test-time augmentation (``none`` / ``flip`` / ``rot90``, see :func:`tta_views`): every
            image is scored in each view, the maps are mapped back and averaged (as is ``q``); costs
            one forward pass per view. Default: ``eval.tta``.
        memory_banks: average the maps over the first this many banks of the run's memory-bank
            ensemble (``model.memory_banks``; each costs one decoder pass). Default: all the
            checkpoint holds.
        fixed_batch: with CUDA graphs, pad a short chunk of :meth:`predict_arrays` to ``batch_size``
            (:func:`~mapl_ray.tensors.pad_rows`, dropped from the outputs) so that every chunk replays the
            one graph of the full batch: each new shape costs a capture and, in a fresh process, cuDNN's
            planning of every convolution (about 3 s on the H100). For batch jobs (``mapl score``, the
            calibration and evaluation after training), not for single-image latency.
        parts: return the decoder's map (``maps``) and the patch bank's (``knn_maps``) apart, unfused
            (calibration chooses the fusion from them); scores are then the decoder map's.
        max_graphs: batch shapes captured at most (default :attr:`MAX_GRAPHS`); other shapes run eagerly.

    Raises:
        CheckpointError / ConfigError: the run folder is incomplete or unreadable (names the file).
    """

    MAX_GRAPHS = 8  # batch shapes captured per predictor (each holds its own static buffers)

    def __init__(
        self,
        run_dir: str | Path,
        device: str | torch.device | None = "auto",
        batch_size: int | None = None,
        cuda_graphs: bool | None = None,
        amp: str | None = None,
        tta: str | None = None,
        memory_banks: int | None = None,
        fixed_batch: bool = False,
        parts: bool = False,
        max_graphs: int | None = None,
    ):
        self.run_dir = Path(run_dir)
        self.cfg = load_run_config(self.run_dir)
        if amp is not None:
            self.cfg = self.cfg.override({"train.amp": amp}).validate()
        if tta is not None:
            self.cfg = self.cfg.override({"eval.tta": tta}).validate()
        self.views = tta_views(self.cfg.eval.tta)
        #: ``data.align``'s pose estimator (None without pose normalisation); images are turned with it
        #: when decoded (:meth:`load_image`) and maps turned back with :meth:`to_original_frame`.
        self.pose_estimator = build_pose_estimator(self.cfg)
        self.state = read_state(self.run_dir)
        self.parts = bool(parts)
        self.device = resolve_device(device)
        # all weights (encoder included) come from the checkpoint: no pretrained file needed to serve
        cfg = self.cfg.override({"model.pretrained": False, "model.weights": None})
        self.model = build_model(cfg)
        size = self.cfg.data.image_size
        self.model.refresh_memory(torch.zeros(1, 3, size, size))  # bank buffers; overwritten below
        load_model_weights(self.run_dir, self.model)
        self.model.to(self.device).eval()
        self.model.fold_batchnorm()  # inference only: one pass over each decoder activation fewer
        if self.device.type == "cuda":
            self.model.use_cuda_kernels(self.cfg.train.channels_last, self.cfg.train.depthwise_kernels)
        self.batch_size = batch_size or self.cfg.eval.batch_size
        self.image_size = size
        if memory_banks is not None and not 1 <= memory_banks <= len(self.model.banks):
            raise ValueError(
                f"memory_banks={memory_banks}: the run {self.run_dir} holds {len(self.model.banks)} memory bank(s)"
            )
        self.memory_banks = memory_banks
        mem = self.model.memory  # all banks share the backend choice
        for bank in self.model.banks:
            bank.backend = resolve_backend(bank.requested_backend, self.device)
        want = self.cfg.eval.cuda_graphs if cuda_graphs is None else cuda_graphs
        # a FAISS search copies to the host: it cannot be captured
        self.cuda_graphs = bool(want and self.device.type == "cuda" and mem.backend == "torch")
        self._graphed = GraphedForward(self._forward, self.device, self.cuda_graphs, max_graphs or self.MAX_GRAPHS)
        self.fixed_batch = bool(fixed_batch and self.cuda_graphs)

    def warm_up(self) -> None:
        """With CUDA graphs, capture the forward pass of a full batch now (one batch of zeros), so that the
        first real batch replays it; nothing on a CPU (no capture to make, and a batch costs seconds)."""
        if self.cuda_graphs:
            size = self.image_size
            self.predict_arrays(np.zeros((self.batch_size, size, size, 3), np.uint8), maps=False)

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
        # the score's weights are constants of a captured graph: a calibration that changes them drops the graphs
        fusion = self.fusion
        key = (self.q_weight, tuple(sorted(fusion.items())) if fusion else None, self.parts)
        return self._graphed(x, key)

    @property
    def fusion(self) -> dict[str, float] | None:
        """The patch bank's share in the map (``state.json`` ``knn_fusion``: ``weight``, ``map_scale``,
        ``knn_scale``, chosen on validation when the run was calibrated); None: the decoder's map alone."""
        f = self.state.get("knn_fusion")
        return f if f and f.get("weight") and self.model.patch_bank.filled else None

    def _forward(self, x: torch.Tensor, cache: bool = True) -> dict[str, torch.Tensor]:
        fusion = self.fusion
        out = anomaly_maps(
            self.model,
            x,
            self.views,
            self.memory_banks,
            self.cfg.train.amp,
            self.cfg.train.channels_last,
            cache,
            knn=bool(fusion) or self.parts,
        )
        if self.parts:  # calibration: the maps apart (the fusion is chosen from them)
            return {**out, "scores": self.score(out["maps"], out["q"])}
        maps = fuse_maps(out["maps"], out.get("knn_maps"), fusion)
        return {"maps": maps, "q": out["q"], "scores": self.score(maps, out["q"])}

    @property
    def q_weight(self) -> float:
        """The image head's weight in the image score: chosen on validation when the run was calibrated
        (``state.json``), else ``eval.q_weight`` (0 when unset)."""
        if self.state.get("q_weight") is not None:
            return float(self.state["q_weight"])
        return float(self.cfg.eval.q_weight or 0.0)

    def score(self, maps: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """Image score ``(B,)``: top-k mean of each (fused) map plus :attr:`q_weight` times ``q``."""
        return image_scores(maps, q, self.cfg.eval.top_k, self.q_weight)

    def predict_arrays(self, images: np.ndarray, maps: bool = True) -> dict[str, np.ndarray]:
        """Score uint8 images ``(N, H, W, 3)`` (already at the run's image size) in batches.

        The uint8 batch goes to the device as it is and becomes float there (a quarter of the bytes
        over PCIe, no CPU conversion). ``maps=False`` leaves the maps on the device (the image scores
        alone: a 256x256 batch of 256 maps is 64 MiB to copy back).

        Returns numpy ``maps`` ``(N, H, W)`` float32 (absent with ``maps=False``), ``q`` ``(N,)``,
        ``scores`` ``(N,)``; with ``parts`` (and a filled patch bank) also ``knn_maps`` ``(N, H, W)``.
        """
        keys = ("maps", "q", "scores") if maps else ("q", "scores")
        if self.parts and maps and self.model.patch_bank.filled:
            keys += ("knn_maps",)
        outs: dict[str, list[np.ndarray]] = {k: [] for k in keys}
        for i in range(0, len(images), self.batch_size):
            chunk = images[i : i + self.batch_size]
            n = len(chunk)
            if self.fixed_batch:  # the full batch's graph, not a new capture
                chunk = pad_rows(chunk, self.batch_size)
            res = self.predict_tensor(to_tensor(chunk, self.device))
            for k in outs:
                outs[k].append(res[k][:n].cpu().numpy())
        return {k: np.concatenate(v) if v else np.zeros((0,), np.float32) for k, v in outs.items()}

    def normalise(self, scores: np.ndarray) -> np.ndarray:
        """Scores in standard deviations above the validation normals' mean (``state.json`` normalisation)."""
        from .eval.metrics import normalise_scores

        stats = self.state.get("normalisation")
        return normalise_scores(scores, stats) if stats else np.asarray(scores, dtype=np.float64)

    def predict_images(
        self, images: np.ndarray, names: list[str], maps: bool = True
    ) -> tuple[list[dict[str, Any]], np.ndarray | None]:
        """Score uint8 images ``(N, H, W, 3)`` at the run's size. Returns (records, maps ``(N, H, W)``, or
        None with ``maps=False``: the maps then stay on the device).

        Each record: ``path`` (the name given), ``score``, ``normalised_score``, ``q`` and ``label``
        (1 when the score reaches the run's decision threshold, None if the run has none).
        """
        res = self.predict_arrays(images, maps=maps)
        norm = self.normalise(res["scores"])
        thr = self.threshold
        records = [
            {
                "path": p,
                "score": float(s),
                "normalised_score": float(n),
                "q": float(q),
                "label": (int(s >= thr) if thr is not None else None),
            }
            for p, s, n, q in zip(names, res["scores"], norm, res["q"])
        ]
        return records, res.get("maps")

    def load_image(self, path: str | Path, limits: DecodeLimits | None = None) -> tuple[np.ndarray, Pose | None]:
        """Decode ``path`` as the model expects it: uint8 ``(H, W, 3)`` at the run's size, turned into the
        object's canonical pose when the run uses ``data.align``; and that pose (None if none was applied).
        ``limits`` (e.g. :meth:`DecodeLimits.for_model`) refuses, on the header, images it does not allow.

        Raises:
            ImageReadError: a file is missing or not a readable image, or ``limits`` refused it (an
                :class:`~mapl_ray.data.io.ImageLimitError`); names the file.
        """
        d = self.decode(path, limits)
        return d.image, d.pose

    def decode(self, path: str | Path, limits: DecodeLimits | None = None) -> DecodedUpload:
        """:meth:`load_image` that also says what the file was (format, mode, frames, original size:
        :class:`~mapl_ray.data.io.DecodedUpload`, whose ``warnings()`` ``mapl predict`` prints).

        Raises:
            ImageReadError: as :meth:`load_image`.
        """
        return decode_file(path, self.image_size, self.pose_estimator, limits)

    @staticmethod
    def to_original_frame(amap: np.ndarray, pose: Pose | None) -> np.ndarray:
        """An anomaly map ``(H, W)`` computed on an aligned image, turned back onto the image as it was
        (unchanged when ``pose`` is None)."""
        return amap if pose is None else pose.invert_map(amap)

    def in_files_frame(
        self,
        paths: list[str],
        images: list[np.ndarray] | np.ndarray,
        maps: list[np.ndarray] | np.ndarray,
        poses: list[Pose | None],
    ) -> tuple[list[np.ndarray] | np.ndarray, list[np.ndarray] | np.ndarray]:
        """Images and maps as :meth:`load_image` / scoring gave them -> the files' own frame, for overlays:
        unchanged without ``data.align``; else the files decoded again unturned and each map turned back.

        Raises:
            ImageReadError: a file can no longer be read (names the file).
        """
        if self.pose_estimator is None:
            return images, maps
        return (
            [load_image(p, self.image_size) for p in paths],
            [self.to_original_frame(m, pose) for m, pose in zip(maps, poses)],
        )

    def predict_paths(self, paths: Iterable[str | Path]) -> tuple[list[dict[str, Any]], np.ndarray, np.ndarray]:
        """Score image files. Returns (records as in :meth:`predict_images`, images, maps), the images
        uint8 ``(N, H, W, 3)`` and maps ``(N, H, W)`` at the run's size in the files' own frame (a run
        with ``data.align`` scores the aligned image and turns its map back).

        Raises:
            ImageReadError: a file is missing or not a readable image (names the file).
        """
        paths = [str(p) for p in paths]
        if not paths:
            return (
                [],
                np.zeros((0, self.image_size, self.image_size, 3), np.uint8),
                np.zeros((0, self.image_size, self.image_size), np.float32),
            )
        images, poses = zip(*(self.load_image(p) for p in paths))
        records, maps = self.predict_images(np.stack(images), paths)
        images, maps = self.in_files_frame(paths, images, maps, poses)
        return records, np.stack(images), np.stack(maps)
