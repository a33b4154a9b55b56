"""The MAPL training loop in plain torch (no Ray): batches, losses, pseudo-labeler schedule, checkpoints.

``train_model`` runs on one process; :mod:`mapl_ray.pipelines.train` runs it inside Ray Train workers
(DDP through ``wrap_model``). Randomness is derived from ``(seed, rank, step)``, so a resumed run draws
the same batches as an uninterrupted one.

Per step and worker (paper defaults): ``batch_normal`` labeled normals (an epoch-wise permutation, so
every labeled normal is used) and ``batch_simulated`` simulated anomalies (eqs. 1-2) made from other
labeled normals; plus ``batch_unlabeled`` images of the unlabeled pool and ``batch_labeled_anomaly``
real labeled anomalies when those sets exist. Loss (eq. 14-17):
``0.6 L1 + 0.4 focal`` on the anomaly map + ``w_l * L_Yl`` (BCE of head q on labeled images) +
``w_u * L_Yu`` (BCE of q on confidently pseudo-labeled images). Without a user unlabeled pool, the
simulated images are the unlabeled data of the pseudo-labeler: it keeps those that look anomalous (1),
flags failed simulations (0) and leaves the rest out (-1), as in the paper.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .checkpoint import load_model_weights, load_pseudo, load_training_state, read_state, save_checkpoint
from .config import Config, ConfigError
from .data.batches import BatchMaker, StepBatches, TrainData
from .data.pose import PoseEstimator
from .data.simulation import FOREGROUND_PRESETS, AnomalySimulator, ForegroundConfig
from .model import MAPLModel, build_encoder, resolve_backend, segmentation_loss
from .pseudo import OCCConfig, OCCEnsemble, masked_bce

log = logging.getLogger("mapl_ray.train")


def to_tensor(images: np.ndarray | torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 ``(N, H, W, 3)`` (numpy, or a possibly pinned tensor) -> float32 ``(N, 3, H, W)`` in [0, 1]
    on ``device``, copied non-blocking; the NHWC storage makes the result channels-last."""
    t = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(images))
    return t.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)


def resolve_foreground(cfg: Config) -> ForegroundConfig:
    """The object definition for ``cfg``: the category's (or ``simulation.foreground``'s) preset in
    :data:`~mapl_ray.data.simulation.FOREGROUND_PRESETS` with the config's explicit overrides; the
    preset's opening / closing / hole filling are kept. Used by the simulation and the pose estimator."""
    s = cfg.simulation
    preset = s.foreground or cfg.data.category
    fg = FOREGROUND_PRESETS.get(preset, ForegroundConfig())
    return dataclasses.replace(
        fg,
        use_mask=fg.use_mask if s.use_foreground_mask is None else s.use_foreground_mask,
        threshold=fg.threshold if s.foreground_threshold is None else s.foreground_threshold,
        inverse=fg.inverse if s.foreground_inverse is None else s.foreground_inverse,
    )


def build_pose_estimator(cfg: Config) -> PoseEstimator | None:
    """The pose estimator ``data.align`` asks for (None for ``"none"``); it finds the object with the
    simulation's threshold (:func:`resolve_foreground`).

    Raises:
        ConfigError: ``data.align=principal_axis`` for a category without an object threshold
            (no foreground preset that uses a mask, no ``simulation.foreground_threshold``).
    """
    if cfg.data.align == "none":
        return None
    fg = resolve_foreground(cfg)
    if not fg.use_mask and cfg.simulation.foreground_threshold is None:
        raise ConfigError(
            f"data.align={cfg.data.align} needs the grey level that separates the object from the "
            f"background, and category {cfg.data.category!r} has no foreground preset that uses one: set "
            "simulation.foreground_threshold (0-255) and simulation.foreground_inverse (true for a dark "
            "object on a bright background)"
        )
    return PoseEstimator(fg.threshold, fg.inverse)


def memory_bank_images(cfg: Config, data: TrainData) -> list[np.ndarray]:
    """The images of each memory bank, uint8 ``(N * model.memory_rotations, H, W, 3)`` per bank: bank 0
    (``data.memory_indices``, the one training searches), then the ensemble's further banks
    (``data.extra_memory_indices``), filled with bank 0 and used at inference only."""
    return [rotated_copies(data.normals[idx], cfg.model.memory_rotations)
            for idx in (data.memory_indices, *data.extra_memory_indices)]


def build_model(cfg: Config) -> MAPLModel:
    """The MAPL network as configured (encoder weights from local files only)."""
    m = cfg.model
    encoder = build_encoder(m.encoder, m.weights, m.pretrained)
    return MAPLModel(encoder, freeze_encoder=m.freeze_encoder and m.encoder != "mapl",
                     memory_backend=m.memory_backend, coordinate_attention=m.coordinate_attention,
                     decoder_channels=tuple(m.decoder_channels), head_hidden=m.head_hidden, head_detach=m.head_detach,
                     normalize_intensity=m.normalize_intensity)


def build_simulator(cfg: Config) -> AnomalySimulator:
    """Anomaly simulator with the category's foreground preset and the config's overrides."""
    s = cfg.simulation
    fg = resolve_foreground(cfg)
    return AnomalySimulator(s.texture_dir, foreground=fg, perlin_scale_range=(0, s.perlin_max_scale),
                            perlin_threshold=s.perlin_threshold, delta_range=(s.delta_min, s.delta_max),
                            texture_probability=s.texture_probability, structure_grid=s.structure_grid,
                            structure_augment=s.structure_augment)


def make_scheduler(optimizer: torch.optim.Optimizer, steps: int, warmup_fraction: float, lr: float, min_lr: float):
    """Linear warm-up over ``warmup_fraction * steps``, then cosine to ``min_lr`` at ``steps`` (torch schedulers)."""
    from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR

    warm = max(1, int(round(warmup_fraction * steps)))
    if warm >= steps:
        return LinearLR(optimizer, start_factor=0.01, total_iters=steps)
    return SequentialLR(
        optimizer,
        [LinearLR(optimizer, start_factor=0.01, total_iters=warm), CosineAnnealingLR(optimizer, T_max=steps - warm, eta_min=min_lr)],
        milestones=[warm],
    )


def rotated_copies(images: np.ndarray, k: int) -> np.ndarray:
    """Each image at ``k`` equally spaced rotations (0, 360/k, ...): uint8 ``(N, H, W, 3)`` -> ``(N k, H, W, 3)``.

    Memory samples at several orientations give rotated objects (screws) a nearest memory sample
    that is aligned with them, so DI marks the defect rather than the misalignment. Corners uncovered
    by the rotation are filled with the image's median border colour (PIL ``rotate``).
    """
    if k <= 1:
        return images
    from PIL import Image

    out = []
    for img in images:
        border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
        fill = tuple(int(v) for v in np.median(border, axis=0))
        pil = Image.fromarray(img)
        out.extend(np.asarray(pil.rotate(360.0 * r / k, resample=Image.Resampling.BILINEAR, fillcolor=fill)) for r in range(k))
    return np.stack(out)


def loader_workers(cfg: Config, device: torch.device) -> int:
    """Loader processes for anomaly simulation: ``train.loader_workers``, or by default 0 on the CPU
    (compute and simulation share the same cores) and up to 4 beside a GPU."""
    if cfg.train.loader_workers is not None:
        return int(cfg.train.loader_workers)
    return 0 if device.type == "cpu" else max(0, min(4, torch.get_num_threads() - 1))


def batch_to_device(batch: dict[str, Any], device: torch.device, channels_last: bool) -> tuple[torch.Tensor, ...]:
    """(images float ``(B, 3, H, W)`` in [0, 1], masks float ``(B, 1, H, W)``, kind, label int64) on ``device``.

    Accepts numpy arrays or (pinned) tensors from the loader; copies are non-blocking.
    """
    def dev(a):
        return torch.as_tensor(a).to(device, non_blocking=True)

    x = to_tensor(batch["images"], device)
    if not (channels_last and device.type == "cuda"):
        x = x.contiguous()
    masks = dev(batch["masks"]).unsqueeze(1).float()
    return x, masks, dev(batch["kind"]).long(), dev(batch["label"]).long()


def compute_losses(out: dict[str, torch.Tensor], masks: torch.Tensor, kind: torch.Tensor, label: torch.Tensor,
                   pseudo: torch.Tensor, cfg: Config, has_pool: bool | None = None) -> dict[str, torch.Tensor]:
    """All loss terms of one batch (scalars with gradient).

    Args:
        out: model output (``logits`` ``(B, 1, H, W)``, ``q`` ``(B,)``).
        masks: float ``(B, 1, H, W)`` targets of the anomaly map (zeros for normals).
        kind: int ``(B,)`` 0 normal, 1 simulated, 2 unlabeled, 3 labeled anomaly.
        label: int ``(B,)`` image labels (1 / 0, -1 unknown).
        pseudo: int ``(B,)`` pseudo-labels from the OCC ensemble (1 / 0 / -1) for unlabeled data.
        has_pool: whether the batch holds unlabeled-pool images (kind 2); known on the host from the
            batch composition. None: read from ``kind`` (costs a device sync).

    The segmentation loss uses images with known masks (normal, simulated, labeled anomaly), except
    simulated images that the pseudo-labeler calls normal (0) when ``pseudo.filter_simulations``:
    simulations that failed to look anomalous (the paper's use of pseudo-labels on simulated data).
    L_Yl uses the labeled images (normal -> 0, labeled anomaly -> 1); L_Yu the pseudo-labeled images
    (eq. 17): the unlabeled pool, or the simulated images when there is no pool. Samples are
    selected by 0/1 weights rather than boolean indexing, so the step never waits for the GPU.
    """
    L = cfg.loss
    known = kind != 2
    if cfg.pseudo.filter_simulations:
        known = known & ~((kind == 1) & (pseudo == 0))
    seg = segmentation_loss(out["logits"], masks, L.l1_weight, L.focal_weight, L.focal_gamma, L.focal_alpha, weights=known)
    lab = (kind == 0) | (kind == 3)
    l_yl = masked_bce(out["q"], label, lab)
    if has_pool is None:
        has_pool = bool((kind == 2).any())
    u_sel = (kind == 2) if has_pool else (kind == 1)
    l_yu = masked_bce(out["q"], pseudo, u_sel & (pseudo != -1))
    total = seg["seg"] + L.labeled_bce_weight * l_yl + L.pseudo_bce_weight * l_yu
    return {"loss": total, "l1": seg["l1"], "focal": seg["focal"], "l_yl": l_yl, "l_yu": l_yu}


def autocast_context(device: torch.device, amp: str, cache_enabled: bool = True):
    """bf16 autocast where asked (``amp='bf16'``, or ``auto`` on CUDA); a no-op context otherwise.

    ``cache_enabled=False`` inside CUDA-graph capture (autocast's weight-cast cache must not outlive it).
    """
    if amp not in ("auto", "off", "bf16"):
        raise ValueError(f"train.amp must be auto, off or bf16, got {amp!r}")
    enabled = amp == "bf16" or (amp == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled, cache_enabled=cache_enabled)


class PseudoLabeler:
    """Fits the OCC ensemble on a schedule from the model's pooled features and labels batches."""

    def __init__(self, cfg: Config, batch_maker: BatchMaker, device: torch.device):
        self.cfg, self.bm, self.device = cfg, batch_maker, device
        p = cfg.pseudo
        self.occ_cfg = OCCConfig(num_occs=p.num_occs, n_components=p.n_components, covariance_type=p.covariance_type,
                                 pca_dim=p.pca_dim, seed=cfg.train.seed)
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
        return {"pseudo_pos": int((pl == 1).sum()), "pseudo_neg": int((pl == 0).sum()), "pseudo_unknown": int((pl == -1).sum())}

    def predict(self, pooled: torch.Tensor) -> torch.Tensor:
        """Pseudo-labels int64 ``(B,)`` (1 / 0 / -1) for pooled features ``(B, D)``, on their device
        (no host sync); all -1 before the first fit."""
        if self.ensemble is None:
            return torch.full((pooled.shape[0],), -1, dtype=torch.long, device=pooled.device)
        return self.ensemble.predict_torch(pooled.detach())


class WeightEMA:
    """Exponential moving average of the trainable parameters (``ema = decay * ema + (1 - decay) * p``).

    The averaged weights are what is saved and evaluated (smoother than the last iterate of a short,
    noisy run); the raw weights travel in ``optimizer.pt`` so ``--resume`` continues exactly.
    """

    def __init__(self, params: list[torch.nn.Parameter], decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"train.ema_decay must be in (0, 1) or 0 to disable, got {decay}")
        self.params, self.decay = params, decay
        self.shadow = [p.detach().clone() for p in params]

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1.0 - self.decay)

    def raw_copy(self) -> list[torch.Tensor]:
        return [r.cpu().clone() for r in self._raw]

    @torch.no_grad()
    def copy_to_params(self) -> None:
        for p, e in zip(self.params, self.shadow):
            p.copy_(e)

    @torch.no_grad()
    def resume(self, raw: list[torch.Tensor] | None) -> None:
        """After loading a checkpoint (averaged weights in the params): shadow <- params, params <- raw."""
        self.shadow = [p.detach().clone() for p in self.params]
        if raw is not None:
            for p, r in zip(self.params, raw):
                p.copy_(r.to(p.device))

    @contextlib.contextmanager
    def swapped(self):
        """Within the block the parameters hold the averaged weights; the raw ones are restored after."""
        self._raw = [p.detach().clone() for p in self.params]
        self.copy_to_params()
        try:
            yield
        finally:
            with torch.no_grad():
                for p, r in zip(self.params, self._raw):
                    p.copy_(r)


class CudaGraphStep:
    """The training step recorded once as a CUDA graph and replayed (``torch.cuda.CUDAGraph``, "whole-network
    capture" in the PyTorch CUDA-graphs notes).

    ``step_fn(x, masks, kind, label, capturing)`` runs forward, losses, backward and ``optimizer.step()``
    and returns the loss dict; the caller's optimizer must be built with ``capturable=True`` and a
    device tensor learning rate (:func:`device_lr`), so replays follow the LR schedule. Eagerly launched,
    the step's many small kernels kept the H200 waiting on the host (about 26 ms per step at batch 8);
    a replay launches them together.

    What a graph bakes in is named by ``key`` (the pseudo-labeler's fit step and the memory-bank version):
    when it changes, the next step runs eagerly (which also builds any new device tensors outside the
    capture) and the one after is captured anew. The first ``warmup`` steps run eagerly on a side stream
    (lazy initialisation, cuDNN algorithm choice, optimizer state) before the first capture. A batch of
    another shape than the captured one is captured anew (the loop's batches all have one shape).
    If a capture fails, the step runs eagerly and so does the rest of the run (``failed`` says why).
    """

    def __init__(self, step_fn: Callable[..., dict[str, torch.Tensor]], optimizer: torch.optim.Optimizer,
                 device: torch.device, warmup: int = 3):
        self.step_fn, self.optimizer, self.device, self.warmup = step_fn, optimizer, device, warmup
        self.graph: torch.cuda.CUDAGraph | None = None
        self.key: Any = object()  # baked-in state of the last step (of the graph, once captured)
        self.static_in: tuple[torch.Tensor, ...] = ()
        self.static_out: dict[str, torch.Tensor] = {}
        self.eager_steps = 0
        self.captures = 0
        self.failed: str | None = None  # why capture failed: the run then stays eager
        self._side = torch.cuda.Stream(device)

    def _eager(self, inputs: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
        self.eager_steps += 1
        self.optimizer.zero_grad(set_to_none=True)
        self._side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._side):
            out = self.step_fn(*inputs, capturing=False)
        torch.cuda.current_stream(self.device).wait_stream(self._side)
        return out

    def __call__(self, key: Any, *inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        """One training step on ``inputs`` (device tensors); returns the loss dict (valid until the next call)."""
        shapes = tuple(t.shape for t in inputs)
        same_shape = bool(self.static_in) and shapes == tuple(t.shape for t in self.static_in)
        if self.graph is not None and key == self.key and same_shape:
            for dst, src in zip(self.static_in, inputs):
                dst.copy_(src, non_blocking=True)
            self.graph.replay()
            return self.static_out
        if self.failed or self.eager_steps < self.warmup or key != self.key:
            self.key = key  # new baked-in state: one eager step first, capture on the next
            self.graph = None
            return self._eager(inputs)
        self.graph, self.static_out = None, {}  # free the old graph's memory pool before capturing again
        self.static_in = tuple(t.clone() for t in inputs)
        self.optimizer.zero_grad(set_to_none=True)  # gradients are allocated inside the graph's pool
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: the loader's pin-memory thread may allocate pinned memory during the capture
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self.static_out = self.step_fn(*self.static_in, capturing=True)
        except RuntimeError as e:  # nothing ran during the capture: the step is redone eagerly
            self.failed = f"{type(e).__name__}: {e}".splitlines()[0]
            log.warning("CUDA-graph capture of the training step failed (%s); training continues eagerly", self.failed)
            self.static_in, self.static_out = (), {}
            torch.cuda.synchronize(self.device)
            return self._eager(inputs)
        self.graph = graph
        self.captures += 1
        graph.replay()  # capture records without running: this replay is the step itself
        return self.static_out


def device_lr(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Make every param group's learning rate a 0-dim float32 tensor on ``device`` (in place).

    A captured optimizer step reads the LR from that tensor, and the torch LR schedulers update a tensor
    LR in place; a float LR would be frozen into the graph. Called after building the optimizer and
    again after ``load_state_dict`` (which brings back the saved value).
    """
    for group in optimizer.param_groups:
        lr = group["lr"]
        value = float(lr.item()) if isinstance(lr, torch.Tensor) else float(lr)
        group["lr"] = torch.tensor(value, dtype=torch.float32, device=device)


LOSS_KEYS = ("loss", "l1", "focal", "l_yl", "l_yu")
LOADER_TIMEOUT_S = 300  # a loader process that yields nothing for this long raises instead of hanging the job


def reduce_losses(losses: dict[str, torch.Tensor], world_size: int) -> dict[str, float]:
    """Loss values averaged over the DDP ranks (one all-reduce), as floats on the host."""
    vals = torch.stack([losses[k].detach().float() for k in LOSS_KEYS])
    if world_size > 1:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(vals)
            vals /= world_size
    return dict(zip(LOSS_KEYS, vals.tolist()))


def unwrap(model: torch.nn.Module) -> MAPLModel:
    return model.module if hasattr(model, "module") else model


def train_model(cfg: Config, data: TrainData, run_dir: str | Path, device: torch.device | str = "cpu",
                rank: int = 0, world_size: int = 1, wrap_model: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
                report: Callable[[dict[str, Any]], None] | None = None, resume: bool = False,
                progress: bool = True, stop_at: int | None = None) -> tuple[MAPLModel, dict[str, Any]]:
    """Train MAPL for ``cfg.train.steps`` steps; rank 0 writes ``RUN/checkpoint`` every ``checkpoint_every`` steps.

    Args:
        cfg: resolved configuration.
        data: decoded training images.
        run_dir: the run folder (checkpoints and ``train_log.jsonl`` go there; rank 0 only).
        device: torch device of this worker.
        rank, world_size: this worker's place in the DDP group.
        wrap_model: e.g. ``ray.train.torch.prepare_model`` (DDP); identity when None.
        report: called on every rank with the metrics dict of every ``train.report_every``-th step
            and of the last step (Ray Train's report; per-step losses go to ``train_log.jsonl``).
        resume: continue from ``RUN/checkpoint`` (weights, optimizer, scheduler, step, pseudo-labeler).
            When ``train.steps`` changed since the checkpoint, the LR schedule is rebuilt for the new
            length and fast-forwarded to the saved step.
        stop_at: save and return after this many steps (a pre-empted run: ``resume`` continues it).

    Returns:
        (the trained, unwrapped model in eval mode, summary dict with timings and final losses).

    Raises:
        CheckpointError: ``resume`` without a usable checkpoint.
    """
    device = torch.device(device)
    run_dir = Path(run_dir)
    t = cfg.train
    torch.manual_seed(t.seed)
    model = build_model(cfg).to(device)
    sim = build_simulator(cfg)
    bm = BatchMaker(cfg, data, sim, rank, world_size)
    bank_images = memory_bank_images(cfg, data)

    def refresh_banks(core: MAPLModel) -> None:
        for i, imgs in enumerate(bank_images):
            core.refresh_memory(to_tensor(imgs, device), bank=i)
            if world_size > 1:
                core.banks[i].broadcast(0)

    start_step = 0
    params = [p for p in model.parameters() if p.requires_grad]
    graphed = bool(t.cuda_graphs and device.type == "cuda" and world_size == 1 and not t.compile
                   and resolve_backend(model.memory.requested_backend, device) == "torch")
    # a captured step needs a capturable optimizer with a device LR; fused AdamW: a few kernels, not one per tensor
    optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay,
                                  **({"fused": True, "capturable": True} if graphed else {}))
    if graphed:
        device_lr(optimizer, device)
    scheduler = make_scheduler(optimizer, t.steps, t.warmup_fraction, t.lr, t.min_lr)
    labeler = PseudoLabeler(cfg, bm, device)
    ema = WeightEMA(params, t.ema_decay) if t.ema_decay > 0 else None
    if resume:
        state = read_state(run_dir)
        model.refresh_memory(to_tensor(bank_images[0][:1], device))  # creates bank buffers of the right shapes
        load_model_weights(run_dir, model)
        start_step = int(state["step"])
        same_length = int(state.get("total_steps", t.steps)) == t.steps
        extra = load_training_state(run_dir, optimizer, scheduler if same_length else None)
        if graphed:
            device_lr(optimizer, device)
        if not same_length:
            import warnings

            with warnings.catch_warnings():
                # torch warns about scheduler.step() without optimizer.step(); replaying the schedule is the intent
                warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
                for _ in range(start_step):
                    scheduler.step()
        if ema is not None:
            ema.resume(extra.get("raw_params"))
        saved = load_pseudo(run_dir)
        if saved is not None:
            labeler.ensemble = OCCEnsemble.from_state(*saved)
            labeler.fitted_step = int(state.get("pseudo_fitted_step", -1))
        log.info("resumed from %s at step %d", run_dir / "checkpoint", start_step)
    else:
        refresh_banks(model)
    if t.channels_last and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    net = wrap_model(model) if wrap_model else model
    if t.compile:
        net = torch.compile(net)
    net.train()

    def save(step: int) -> None:
        if rank != 0:
            return
        core = unwrap(model)
        state = {"step": step, "total_steps": t.steps, "encoder": cfg.model.encoder, "image_size": cfg.data.image_size,
                 "memory_backend": core.memory.backend, "pseudo_fitted_step": labeler.fitted_step}
        pseudo = labeler.ensemble.state_dict() if labeler.ensemble is not None else None
        if ema is None:
            save_checkpoint(run_dir, core, state, optimizer, scheduler, pseudo)
            return
        with ema.swapped():  # serve the averaged weights; keep the raw ones to resume from
            save_checkpoint(run_dir, core, state, optimizer, scheduler, pseudo, extra={"raw_params": ema.raw_copy()})

    log_path = run_dir / "train_log.jsonl"
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=t.steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
    t0 = time.perf_counter()
    step_times: list[float] = []
    last: dict[str, float] = {}
    pseudo_stats: dict[str, Any] = {}
    end_step = t.steps if stop_at is None else min(t.steps, stop_at)
    n_loader = loader_workers(cfg, device)
    refit_steps = {s for s in range(start_step, end_step) if labeler.is_refit_step(s)}
    # auto = the platform default (fork on Linux), in Ray workers too: on the H200 forkserver took 8.7 s to
    # the first batch and 35.5 s for the 500-step loop against 0.13 s and 24.4 s with fork (bench/results/gpu.json,
    # ddp.runs). A stuck fork child cannot hang the job: the loader's timeout raises instead.
    loader_context = None if t.loader_start_method == "auto" else t.loader_start_method
    mp_context = None
    if n_loader and loader_context is not None:
        import multiprocessing

        mp_context = multiprocessing.get_context(loader_context)
        if loader_context == "forkserver":
            # the server imports these once; each loader process forks from it instead of importing torch anew
            mp_context.set_forkserver_preload(["torch", "numpy", "PIL.Image", "mapl_ray.data.batches"])
    loader = torch.utils.data.DataLoader(
        StepBatches(bm, refit_steps), batch_size=None, sampler=range(start_step, end_step),
        num_workers=n_loader, pin_memory=device.type == "cuda", prefetch_factor=4 if n_loader else None,
        persistent_workers=False, multiprocessing_context=mp_context,
        timeout=LOADER_TIMEOUT_S if n_loader else 0)
    has_pool = bm.has_pool()

    def step_fn(x, masks, kind, label, capturing: bool = False) -> dict[str, torch.Tensor]:
        """Forward, losses, backward and optimizer step (gradients zeroed by the caller)."""
        with autocast_context(device, t.amp, cache_enabled=not capturing):
            out = net(x)
        pseudo = labeler.predict(out["pooled"])
        losses = compute_losses(out, masks, kind, label, pseudo, cfg, has_pool=has_pool)
        losses["loss"].backward()
        optimizer.step()
        # detached: a loss held until the next step would keep this step's autograd graph (and its
        # gradient-accumulation nodes, bound to this step's stream) alive into the next capture
        return {k: v.detach() for k, v in losses.items()}

    graph_step = CudaGraphStep(step_fn, optimizer, device) if graphed else None
    fit_s = 0.0  # seconds spent refitting the pseudo-labeler (pooled features + GMM fits)
    waits: list[float] = []  # seconds the loop waited for each batch (the first includes loader start-up)
    t_ready = time.perf_counter()
    for step, batch in zip(range(start_step, end_step), loader):
        ts = time.perf_counter()
        waits.append(ts - t_ready)
        pool = batch.pop("pool", None)
        if labeler.due(step) and labeler.fitted_step != step:
            t_fit = time.perf_counter()
            pseudo_stats = labeler.fit(unwrap(net), step, pool)
            fit_s += time.perf_counter() - t_fit
            net.train()
        inputs = batch_to_device(batch, device, t.channels_last)
        if graph_step is not None:
            losses = graph_step((labeler.fitted_step, model.memory.generation), *inputs)
        else:
            optimizer.zero_grad(set_to_none=True)
            losses = step_fn(*inputs)
        scheduler.step()
        if ema is not None:
            ema.update()
        core = unwrap(model)
        if not core.freeze_encoder and ((step + 1) % t.memory_refresh_every == 0 or step + 1 == t.steps):
            refresh_banks(core)
        step_times.append(time.perf_counter() - ts)
        do_log = (step + 1) % t.log_every == 0 or step + 1 == t.steps
        do_report = report is not None and ((t.report_every and (step + 1) % t.report_every == 0) or step + 1 == end_step)
        if do_log or do_report:  # the same steps on every rank: the all-reduce inside matches up
            last = reduce_losses(losses, world_size)  # host sync only when logging
            rec = {"step": step + 1, "lr": float(scheduler.get_last_lr()[0]), "step_s": float(np.mean(step_times[-t.log_every:])),
                   **last, **pseudo_stats}
            if rank == 0 and do_log:
                with log_path.open("a") as fh:
                    fh.write(json.dumps(rec) + "\n")
                log.info("step %d loss %.4f (l1 %.4f focal %.4f l_yl %.4f l_yu %.4f)", step + 1, last["loss"],
                         last["l1"], last["focal"], last["l_yl"], last["l_yu"])
            if do_report:
                report(rec)
        if bar:
            bar.update(1)
            if last:
                bar.set_postfix(loss=f"{last['loss']:.4f}")
        if (step + 1) % t.checkpoint_every == 0 and step + 1 < end_step:
            save(step + 1)
        t_ready = time.perf_counter()
    if bar:
        bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if rank == 0 and cfg.pseudo.enabled and labeler.ensemble is None:
        log.warning("the pseudo-labeler was never fitted: training stopped at step %d, before pseudo.warmup_steps = %d; "
                    "the run has no pseudo-labeler state and L_Yu was not used", end_step, cfg.pseudo.warmup_steps)
    loop_wall = time.perf_counter() - t0
    save(end_step)
    wall = time.perf_counter() - t0
    if ema is not None:
        ema.copy_to_params()
    model = unwrap(model).eval()
    measured = step_times[min(5, max(0, len(step_times) - 1)):]  # skip warm-up steps
    per_worker_batch = len(batch["kind"]) if end_step > start_step else 0
    summary = {"train_wall_s": wall, "steps_run": end_step - start_step, "loop_wall_s": loop_wall,
               "world_size": world_size, "per_worker_batch": per_worker_batch, "loader_workers": n_loader,
               "loader_start_method": (loader_context or "default") if n_loader else None,
               "images_per_s": (end_step - start_step) * per_worker_batch * world_size / max(loop_wall, 1e-9),
               "step_s_mean": float(np.mean(measured)) if measured else math.nan,
               "step_s_median": float(np.median(measured)) if measured else math.nan,
               "first_batch_s": waits[0] if waits else math.nan,
               # time spent waiting for batches after the first: > 0 means the loader, not the GPU, set the pace
               "loader_wait_s": float(np.sum(waits[1:])) if waits else math.nan,
               "final_losses": last, "pseudo": pseudo_stats, "memory_backend": model.memory.backend,
               "pseudo_fit_s": fit_s, "cuda_graph_step": graphed,
               "graph_captures": graph_step.captures if graph_step else 0,
               "graph_capture_error": graph_step.failed if graph_step else None,
               "eager_steps": graph_step.eager_steps if graph_step else end_step - start_step}
    return model, summary
