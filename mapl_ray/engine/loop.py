"""The MAPL training loop in plain torch (no Ray): one process, one device, optionally one DDP rank.

:mod:`mapl_ray.pipelines.ray_train` runs :func:`train_model` inside Ray Train workers (DDP through
``wrap_model``). Randomness is derived from ``(seed, rank, step)``, so a resumed run draws the same
batches as an uninterrupted one.

Per step and worker (paper defaults): ``batch_normal`` labeled normals (an epoch-wise permutation, so
every labeled normal is used) and ``batch_simulated`` simulated anomalies (eqs. 1-2) made from other
labeled normals; plus ``batch_unlabeled`` images of the unlabeled pool and ``batch_labeled_anomaly``
real labeled anomalies when those sets exist (:mod:`mapl_ray.data.batches`). The loss is
:func:`mapl_ray.model.losses.compute_losses` (eqs. 14-17); the pseudo-labels come from
:class:`mapl_ray.pseudo.labeler.PseudoLabeler`, refitted on a schedule.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import Config, ConfigError
from ..data.batches import BatchMaker, assemble_pool, pool_chunk_steps
from ..data.simulation import build_simulator
from ..data.train_data import TrainData, choose_memory_banks, memory_bank_images, normal_rows
from ..data.validation import ValidationSet
from ..eval.validation import Validator
from ..model import MAPLModel, build_model, compute_losses, resolve_backend
from ..model.memory import MemoryBank
from ..model.patch_bank import trusted_patch_mask
from ..pseudo.labeler import PseudoLabeler, report_refit, write_pool_labels
from ..pseudo.occ import MapFn, OCCEnsemble
from ..pseudo.patch_knn import patch_embeddings
from ..runfolder import (
    POOL_LABELS_FILE,
    TRAIN_LOG_FILE,
    CheckpointSnapshot,
    last_logged_step,
    load_model_weights,
    load_pseudo,
    load_training_state,
    read_state,
    snapshot_checkpoint,
    train_log_segment,
)
from ..tensors import autocast_context, to_tensor, use_deterministic_kernels
from .checkpoints import CheckpointWriter
from .ema import WeightEMA
from .loader import batch_to_device, loader_workers, make_loader
from .progress import TrainProgress
from .schedule import fast_forward, make_scheduler
from .step import CudaGraphStep, device_lr, reduce_losses

log = logging.getLogger("mapl_ray.train")
#: the patch bank's coreset is chosen among at most this many times model.knn_patches random patches
KNN_CANDIDATES = 4


def unwrap(model: torch.nn.Module) -> MAPLModel:
    """The network inside a DDP (or other) wrapper."""
    return model.module if hasattr(model, "module") else model


class TrainingDiverged(ConfigError):
    """The training loss became NaN or infinite (a learning rate too high for the data, most often): a
    :class:`~mapl_ray.config.ConfigError` naming ``train.lr``, so the CLI says it in one line, also when a Ray
    Train worker raised it."""


class Trainer:
    """The state of one training run on one worker: network, optimizer, schedule, pseudo-labeler, EMA.

    Args: as :func:`train_model`.
    """

    def __init__(
        self,
        cfg: Config,
        data: TrainData,
        run_dir: str | Path,
        device: torch.device | str = "cpu",
        rank: int = 0,
        world_size: int = 1,
        wrap_model: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
        report: Callable[[dict[str, Any]], None] | None = None,
        validation: ValidationSet | None = None,
        on_checkpoint: Callable[[int, Path | None], None] | None = None,
        fit_map: MapFn | None = None,
    ):
        self.cfg, self.run_dir, self.data = cfg, Path(run_dir), data
        self.device, self.rank, self.world_size = torch.device(device), rank, world_size
        self.wrap_model, self.report, self.on_checkpoint = wrap_model, report, on_checkpoint
        t = cfg.train
        if t.deterministic:
            use_deterministic_kernels()
        torch.manual_seed(t.seed)
        self.model = build_model(cfg).to(self.device)
        if self.device.type == "cuda":  # before the first bank fill
            self.model.use_cuda_kernels(t.channels_last, t.depthwise_kernels)
        self.bm = BatchMaker(cfg, data, build_simulator(cfg), rank, world_size)
        self.bank_images = memory_bank_images(cfg, data)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.graphed = bool(
            t.cuda_graphs
            and self.device.type == "cuda"
            and world_size == 1
            and not t.compile
            and resolve_backend(self.model.memory.requested_backend, self.device) == "torch"
        )
        # a captured step needs a capturable optimizer with a device LR; fused AdamW: a few kernels, not one per tensor
        self.optimizer = torch.optim.AdamW(
            params,
            lr=t.lr,
            weight_decay=t.weight_decay,
            **({"fused": True, "capturable": True} if self.graphed else {}),
        )
        if self.graphed:
            device_lr(self.optimizer, self.device)
        self.scheduler = make_scheduler(self.optimizer, t.steps, t.warmup_fraction, t.lr, t.min_lr)
        self.labeler = PseudoLabeler(cfg, self.bm, self.device, fit_map, cuda_graphs=self.graphed)
        self.ema = WeightEMA(params, t.ema_decay) if t.ema_decay > 0 else None
        self.validator = (
            Validator(validation, cfg, self.device, self.bm.step_images)
            if validation is not None and rank == 0
            else None
        )
        self.start_step = 0
        self.segment = 0  # train_log.jsonl's segment: 0 for a new run, +1 per resume
        self.refits: list[dict[str, Any]] = []
        #: the console's progress (rank 0, when shown; :meth:`run`)
        self.progress: TrainProgress | None = None
        #: parts of upcoming refits' pools brought by loader items: refit step -> {part: pool part}
        self._pool_parts: dict[int, dict[int, dict[str, np.ndarray]]] = {}
        #: in-loop checkpoints written beside training (:mod:`mapl_ray.engine.checkpoints`)
        self.writer = CheckpointWriter(self.run_dir, on_checkpoint, lockstep=world_size > 1)
        #: host copies of the memory-bank buffers of the last snapshot: key -> (bank, its generation then, copy)
        self._bank_copies: dict[str, tuple[MemoryBank, int, torch.Tensor]] = {}

    def refresh_banks(self, core: MAPLModel, banks: int | None = None) -> None:
        """Recompute the first ``banks`` memory banks (all: None) with the encoder as it is now
        (broadcast from rank 0 under DDP)."""
        for i, imgs in enumerate(self.bank_images[:banks]):
            core.refresh_memory(to_tensor(imgs, self.device), bank=i)
            if self.world_size > 1:
                core.banks[i].broadcast(0)

    def rechoose_banks(self, labels: np.ndarray | None, core: MAPLModel, training_bank: bool) -> None:
        """Choose the memory banks again from the labeled normals and the pool images now pseudo-labeled
        normal (:func:`~mapl_ray.data.train_data.choose_memory_banks`); refill bank 0 when
        ``training_bank`` (it holds pool images: fewer labeled normals than ``model.memory_samples``)."""
        d, m = self.data, self.cfg.model
        rows = normal_rows(d, labels)
        banks = choose_memory_banks(
            len(d.normals), m.memory_samples, m.memory_banks, self.cfg.data.seed, rows[rows >= len(d.normals)]
        )
        d.memory_indices, d.extra_memory_indices = banks[0], banks[1:]
        self.bank_images = memory_bank_images(self.cfg, d)
        if training_bank:
            self.refresh_banks(core, banks=1)

    def write_pool_labels(self) -> None:
        """Rank 0, a pool held in memory and labeled: ``RUN/pool_labels.csv``, each pool image with the label
        the run ended with and its OCC score (:func:`~mapl_ray.pseudo.labeler.write_pool_labels`), so a user
        sees which of their unlabeled images the run took for defects."""
        d, lab = self.data, self.labeler
        paths = d.info.get("source_paths") if d.info else None
        if self.rank != 0 or not d.pool_size or d.pool_streamed or not paths or not lab.history:
            return  # (before any refit the labels are the initial ones: unknown, or normal with pseudo-labels off)
        pool_paths = paths[len(d.normals) :]
        write_pool_labels(
            self.run_dir / POOL_LABELS_FILE, pool_paths, lab.history[max(lab.history)], lab.pool_scores, d.pool_canaries
        )

    def patch_bank_rows(self) -> tuple[np.ndarray, int]:
        """Normal-source rows that give the patch bank its candidates, and how many of them are labeled
        normals (they come first): ``model.knn_source`` "labeled" takes the labeled normals (the pool images
        pseudo-labeled normal when there is none), "stream" the final normal stream; never a validation
        canary (simulated with the validation textures: in the bank it would flatter the validation
        score). At most ``model.knn_images`` rows: the labeled ones first, the rest a seeded choice."""
        m, d = self.cfg.model, self.data
        n = len(d.normals)
        labels = self.labeler.history[max(self.labeler.history)] if self.labeler.history else None
        if m.knn_source == "labeled" and n:
            rows = np.arange(n)
        else:
            rows = normal_rows(d, labels)
            if d.pool_canaries is not None:
                pool = rows >= n
                rows = rows[~pool | ~d.pool_canaries[np.where(pool, rows - n, 0)]]
        labeled = rows[rows < n]
        rng = np.random.default_rng([self.cfg.data.seed, 11])
        if len(labeled) >= m.knn_images:
            return np.sort(rng.choice(labeled, m.knn_images, replace=False)), m.knn_images
        pool = rows[rows >= n]
        if len(labeled) + len(pool) > m.knn_images:
            pool = np.sort(rng.choice(pool, m.knn_images - len(labeled), replace=False))
        return np.concatenate([labeled, pool]), len(labeled)

    @torch.no_grad()
    def fill_patch_bank(self, core: MAPLModel) -> dict[str, Any]:
        """Fill the patch bank (:class:`~mapl_ray.model.patch_bank.PatchBank`) from :meth:`patch_bank_rows`,
        in 4 quarter turns when the memory bank holds rotations (``model.memory_rotations`` > 1): at most
        :data:`KNN_CANDIDATES` times ``model.knn_patches`` patches drawn at random (batch by batch, so memory
        stays near that); pool images' patches farther from the other images than any labeled normal's
        dropped (:func:`~mapl_ray.model.patch_bank.trusted_patch_mask`); then a greedy coreset of
        ``model.knn_patches`` of them.

        Returns:
            for the training summary: ``{"images", "labeled_images", "candidates", "pool_patches", "pool_patches_dropped",
            "pool_patch_cut"}`` (empty when no normal image is left).
        """
        m, d = self.cfg.model, self.data
        rows, n_labeled = self.patch_bank_rows()
        if not len(rows):
            log.warning("no normal image to fill the patch bank from: the run scores with the decoder's map alone")
            return {}
        turns = 4 if m.memory_rotations > 1 else 1
        gen = torch.Generator().manual_seed(int(self.cfg.data.seed))
        cap, keep, emb, owner = KNN_CANDIDATES * m.knn_patches, 1.0, [], []
        for i in range(0, len(rows), self.cfg.eval.batch_size):
            x = to_tensor(d.source_images(rows[i : i + self.cfg.eval.batch_size]), self.device)
            for k in range(turns):
                e = patch_embeddings(core.encode(torch.rot90(x, k, dims=(2, 3)) if k else x))
                own = torch.arange(i, i + len(x), device=e.device).repeat_interleave(e.shape[1])
                e = e.reshape(-1, e.shape[-1])
                if not emb:  # the share of all candidate patches kept, so that memory stays near the cap
                    keep = min(1.0, cap / (len(rows) * turns * (e.shape[0] / len(x))))
                if keep < 1.0:
                    sel = torch.randperm(e.shape[0], generator=gen)[: max(1, round(e.shape[0] * keep))].to(e.device)
                    e, own = e.index_select(0, sel), own.index_select(0, sel)
                emb.append(e)
                owner.append(own)
        flat, owner = torch.cat(emb), torch.cat(owner)
        if flat.shape[0] > cap:
            sel = torch.randperm(flat.shape[0], generator=gen)[:cap].to(flat.device)
            flat, owner = flat.index_select(0, sel), owner.index_select(0, sel)
        trusted = owner < n_labeled
        ok, cut = trusted_patch_mask(flat, owner, trusted, m.knn_patches, gen)
        dropped = int((~ok).sum())
        if dropped:
            flat = flat[ok]
        core.patch_bank.fill(flat, m.knn_patches, gen)
        return {
            "images": len(rows),
            "labeled_images": n_labeled,
            "candidates": int(ok.shape[0]),
            "pool_patches": int((~trusted).sum()),
            "pool_patches_dropped": dropped,
            "pool_patch_cut": None if cut == float("inf") else cut,
        }

    def resume(self) -> None:
        """Continue from ``RUN/checkpoint``: weights, optimizer, LR schedule, step, EMA, pseudo-labeler.

        When ``train.steps`` changed since the checkpoint, the LR schedule is rebuilt for the new length
        and fast-forwarded to the saved step.

        Raises:
            CheckpointError: no usable checkpoint.
        """
        state = read_state(self.run_dir)
        self.model.refresh_memory(to_tensor(self.bank_images[0][:1], self.device))  # bank buffers of the right shapes
        load_model_weights(self.run_dir, self.model)
        self.start_step = int(state["step"])
        self.segment = train_log_segment(self.run_dir)
        same_length = int(state.get("total_steps", self.cfg.train.steps)) == self.cfg.train.steps
        extra = load_training_state(self.run_dir, self.optimizer, self.scheduler if same_length else None)
        if self.graphed:
            device_lr(self.optimizer, self.device)
        if not same_length:
            fast_forward(self.scheduler, self.start_step)
        if self.ema is not None:
            self.ema.resume(extra.get("raw_params"))
        saved = load_pseudo(self.run_dir)
        if saved is not None:
            self.labeler.use_ensemble(OCCEnsemble.from_state(*saved), int(state.get("pseudo_fitted_step", -1)))
            self.labeler.load_state_arrays(saved[0])
        log.info("resumed from %s at step %d", self.run_dir / "checkpoint", self.start_step)

    def mark_restart(self, fields: dict[str, Any]) -> None:
        """This attempt continues a run whose workers died (Ray Train's ``FailureConfig``): its steps are
        logged under a new ``segment`` (as after ``--resume``), and rank 0 appends a restart marker to
        ``train_log.jsonl``: ``{"event": "restart", "segment", "step": the step it continues from,
        "steps_repeated": steps logged after that step by the failed attempt, "time": Unix seconds, **fields}``.
        Call after :meth:`resume` (or instead of it when the failed attempt saved no checkpoint)."""
        if self.start_step == 0:  # no checkpoint to continue from: a fresh start, still a new segment
            self.segment = train_log_segment(self.run_dir)
        if self.rank != 0:
            return
        marker = {
            "event": "restart",
            "segment": self.segment,
            "step": self.start_step,
            "steps_repeated": max(0, last_logged_step(self.run_dir) - self.start_step),
            "time": time.time(),
            **fields,
        }
        with (self.run_dir / TRAIN_LOG_FILE).open("a") as fh:
            fh.write(json.dumps(marker) + "\n")
        log.warning("restarted after a failure: continuing from step %d (segment %d)", self.start_step, self.segment)

    def checkpoint(self, step: int) -> None:
        """Save now (after the in-loop checkpoints in flight), then hand the checkpoint to ``on_checkpoint`` on
        every rank (rank 0: the folder, the others: None), e.g. to report it to Ray Train. The write runs in
        the writer's thread, so a KeyboardInterrupt cannot stop it between its two renames."""
        self.writer.submit(step, self.snapshot(step))
        self.writer.drain()

    def snapshot(self, step: int) -> CheckpointSnapshot | None:
        """Rank 0: the checkpoint of ``step`` in host memory (the EMA weights when ``train.ema_decay`` > 0, the
        raw ones in ``optimizer.pt`` to resume from), sharing nothing the next step changes; other ranks: None.

        The memory banks' host copies are taken again only when a bank changed since the last snapshot (its
        ``generation``): with a frozen encoder they are most of the checkpoint (204 of 223 MiB on screw)."""
        if self.rank != 0:
            return None
        core = unwrap(self.model)
        state = {
            "step": step,
            "total_steps": self.cfg.train.steps,
            "encoder": self.cfg.model.encoder,
            "image_size": self.cfg.data.image_size,
            "memory_backend": core.memory.backend,
            "pseudo_fitted_step": self.labeler.fitted_step,
        }
        pseudo = None
        if self.labeler.ensemble is not None:
            arrays, meta = self.labeler.ensemble.state_dict()
            pseudo = ({**arrays, **self.labeler.state_arrays()}, meta)
        reuse = {k: t for k, (bank, gen, t) in self._bank_copies.items() if bank.generation == gen}
        args = (core, state, self.optimizer, self.scheduler, pseudo)
        if self.ema is None:
            snap = snapshot_checkpoint(*args, reuse=reuse)
        else:
            with self.ema.swapped():  # serve the averaged weights; keep the raw ones to resume from
                snap = snapshot_checkpoint(*args, extra={"raw_params": self.ema.raw_copy()}, reuse=reuse)
        self._bank_copies = {
            f"{name}.{key}": (bank, bank.generation, snap.model[f"{name}.{key}"])
            for name, bank in core.named_modules()
            if isinstance(bank, MemoryBank)
            for key in bank.state_dict()
        }
        return snap

    def _net(self) -> torch.nn.Module:
        """The network as the loop runs it (channels-last on CUDA since :meth:`__init__`): wrapped (DDP), compiled
        when asked."""
        t = self.cfg.train
        net = self.wrap_model(self.model) if self.wrap_model else self.model
        if t.compile:
            net = torch.compile(net)
        net.train()
        return net

    def _step_fn(self, net: torch.nn.Module):
        """Forward, losses, backward and optimizer step of one batch (gradients zeroed by the caller)."""
        cfg, labeler, optimizer = self.cfg, self.labeler, self.optimizer

        def step_fn(x, masks, kind, label, capturing: bool = False) -> dict[str, torch.Tensor]:
            with autocast_context(self.device, cfg.train.amp, cache_enabled=not capturing):
                out = net(x)
            pseudo = labeler.predict(out)
            losses = compute_losses(out, masks, kind, label, pseudo, cfg)
            losses["loss"].backward()
            optimizer.step()
            # detached: a loss held until the next step would keep this step's autograd graph (and its
            # gradient-accumulation nodes, bound to this step's stream) alive into the next capture
            return {k: v.detach() for k, v in losses.items()}

        return step_fn

    def _after_refit(self, step: int, stats: dict[str, Any]) -> dict[str, Any]:
        """Keep the pool-label statistics of the refit of ``step`` (now in force); with fewer labeled normals
        than ``model.memory_samples``, refill the training memory bank with the pool images now labeled
        normal. Returns ``stats``."""
        if not self.data.pool_size:
            return stats
        stats = {"refit_step": step, **stats}  # a streamed pool's stats lack it
        self.refits.append(stats)
        if self.rank == 0:
            report_refit(stats)
        if len(self.data.normals) < self.cfg.model.memory_samples and step in self.labeler.history:
            self.rechoose_banks(self.labeler.history[step], unwrap(self.model), training_bank=True)
        return stats

    def _put_refit_in_force(self, times: dict[str, Any]) -> dict[str, Any]:
        """Wait for the pending refit (``times["fit_wait"]``) and put it in force with :meth:`_after_refit`,
        whose memory-bank refill is timed apart (``times["banks"]``: the encoder's pass over the new bank, not
        the pseudo-labeler). Returns the refit's statistics."""
        t_wait = time.perf_counter()
        done = self.labeler.finish_fit()
        t_banks = time.perf_counter()
        times["fit_wait"] += t_banks - t_wait
        stats = self._after_refit(*done)
        times["banks"] += time.perf_counter() - t_banks
        return stats

    def _pseudo_parts(self, times: dict[str, Any]) -> dict[str, float]:
        """Parts of the summary's ``pseudo_fit_s``, seconds: the pools assembled from loader parts, ``start_fit``
        with its own parts (:attr:`PseudoLabeler.start_s`), and the waits for fits; beside them, off the
        training path, the fits' own thread (``thread.features``: waiting for the feature passes,
        ``thread.occ``: the OCC fit and vote; :attr:`PseudoLabeler.thread_s`). ``start_fit.snapshot.rebuild``:
        the part of ``start_fit.snapshot`` spent copying the whole model (a memory bank refilled, or the first
        refit; :class:`~mapl_ray.model.snapshot.WeightSnapshot`), the rest being in-place weight copies."""
        return {
            "pool": times["fit_pool"],
            "start_fit": times["fit_start"],
            **{f"start_fit.{k}": v for k, v in self.labeler.start_s.items()},
            "start_fit.snapshot.rebuild": self.labeler.snapshot_rebuild_s,
            "wait": times["fit_wait"],
            **{f"thread.{k}": v for k, v in self.labeler.thread_s.items()},
        }

    def _refit_pool(self, step: int) -> dict[str, Any]:
        """The pool of the refit at ``step`` from the parts the loader items brought
        (:class:`~mapl_ray.data.batches.StepBatches`); a part whose step came before this run's first step (a
        resumed run) is made here, with the labels that step had."""
        parts = self._pool_parts.pop(step, {})
        for chunk, s in enumerate(pool_chunk_steps(step)):
            if chunk not in parts:
                parts[chunk] = self.bm.pool_chunk(step, chunk, self.labeler.labels_for(s))
        return assemble_pool([parts[c] for c in range(len(parts))])

    def _validate(self, step: int, end_step: int, net: torch.nn.Module) -> dict[str, Any]:
        """Validation metrics (``validation_*``) every ``eval.validate_every`` steps and at the last step (rank 0)."""
        every = self.cfg.eval.validate_every
        if self.validator is None or not (step + 1 == end_step or (every and (step + 1) % every == 0)):
            return {}
        self._phase(f"step {step + 1}: validating")
        metrics = self.validator(unwrap(net))
        self._phase("")
        net.train()
        return {
            f"validation_{k}": v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
        }

    def _log(
        self,
        step: int,
        end_step: int,
        losses: dict[str, torch.Tensor],
        step_times: list[float],
        pseudo_stats: dict[str, Any],
    ) -> dict[str, float] | None:
        """Every ``log_every`` steps: losses to ``train_log.jsonl``; every ``report_every`` and at the end: ``report``.
        Returns the reduced losses when they were read (a host sync), else None."""
        t = self.cfg.train
        do_log = (step + 1) % t.log_every == 0 or step + 1 == t.steps
        do_report = self.report is not None and (
            (t.report_every and (step + 1) % t.report_every == 0)
            or step + 1 == end_step
            or "validation_objective" in pseudo_stats
        )
        if not (do_log or do_report):
            return None
        last = reduce_losses(losses, self.world_size)  # the same steps on every rank: the all-reduce matches up
        if not math.isfinite(last["loss"]):  # every rank sees the same reduced loss: all stop together
            raise TrainingDiverged(
                f"training diverged: the loss is {last['loss']} at step {step + 1} (train.lr {self.cfg.train.lr:g}); "
                "lower train.lr (--lr) and train again (this run stopped unfinished)",
                "train.lr",
            )
        rec = {
            "step": step + 1,
            "lr": float(self.scheduler.get_last_lr()[0]),
            "step_s": float(np.mean(step_times[-t.log_every :])),
            "wall_s": round(time.perf_counter() - self._t0, 3),  # of this segment: an interrupted one's time
            "segment": self.segment,
            **last,
            **pseudo_stats,
        }
        if self.rank == 0 and do_log:
            with (self.run_dir / TRAIN_LOG_FILE).open("a") as fh:
                fh.write(json.dumps(rec) + "\n")
            log.info(
                "step %d loss %.4f (l1 %.4f focal %.4f l_yl %.4f l_yu %.4f)",
                step + 1,
                last["loss"],
                last["l1"],
                last["focal"],
                last["l_yl"],
                last["l_yu"],
            )
        if do_report:
            self.report(rec)
        return last

    def run(
        self, end_step: int, progress: bool = True, batches: Iterable[dict[str, Any]] | None = None
    ) -> tuple[MAPLModel, dict[str, Any]]:
        """Train from ``start_step`` to ``end_step``, saving every ``checkpoint_every`` steps (written beside
        training, :attr:`writer`) and at the end (synchronously). An exception leaving the loop (Ctrl-C's
        KeyboardInterrupt too) waits for a checkpoint being written, so ``RUN/checkpoint`` is complete.

        ``batches``: the batch dicts of steps ``start_step ..`` with the refit's whole pool under ``pool`` on
        refit steps, e.g. from Ray Data; default: :func:`make_loader`, whose items bring each pool in parts
        (:class:`~mapl_ray.data.batches.StepBatches`, put together by :meth:`_refit_pool`)."""
        if progress and self.rank == 0:
            self.progress = TrainProgress(self.cfg.train.steps, self.start_step)
        try:
            return self._run(end_step, batches)
        except BaseException:
            self.writer.abort()
            raise
        finally:
            self.writer.close()
            if self.progress is not None:
                self.progress.close()

    def _phase(self, text: str) -> None:
        """Show what the run does now (:meth:`TrainProgress.phase`); "" ends it. Nothing without progress."""
        if self.progress is not None:
            self.progress.phase(text)

    def _run(self, end_step: int, batches: Iterable[dict[str, Any]] | None) -> tuple[MAPLModel, dict[str, Any]]:
        t, labeler, device = self.cfg.train, self.labeler, self.device
        net = self._net()
        step_fn = self._step_fn(net)
        graph_step = CudaGraphStep(step_fn, self.optimizer, device) if self.graphed else None
        from_loader = batches is None  # its items carry the refits' pools in parts (StepBatches)
        n_loader = loader_workers(self.cfg, device) if batches is None else 0
        refit = {s for s in range(self.start_step, end_step) if labeler.is_refit_step(s)}
        if batches is None:
            labels_for = labeler.labels_for if self.data.pool_size else None
            batches = make_loader(self.bm, refit, self.start_step, end_step, n_loader, self.cfg, device, labels_for)
        t0 = self._t0 = time.perf_counter()  # the log lines' wall_s count from here
        # fit: the pseudo-labeler's time, "fit_out" the part of it outside the step timer (a refit put in force
        # for a checkpoint or at the end)
        times = {"step": [], "wait": [], "fit": 0.0, "fit_out": 0.0, "fit_wait": 0.0, "banks": 0.0}
        times.update(fit_pool=0.0, fit_start=0.0)  # parts of "fit": the refit's pool assembled, start_fit
        times.update(validation=0.0, log=0.0, checkpoint=0.0)
        last: dict[str, float] = {}
        pseudo_stats: dict[str, Any] = {}
        batch: dict[str, Any] = {}
        t_ready = time.perf_counter()
        for step, batch in zip(range(self.start_step, end_step), batches):
            ts = time.perf_counter()
            times["wait"].append(ts - t_ready)
            pool = batch.pop("pool", None)
            for refit_step, (chunk, part) in batch.pop("pool_chunks", {}).items():
                self._pool_parts.setdefault(refit_step, {})[chunk] = part
            t_fit = time.perf_counter()
            if labeler.due(step) and labeler.fitted_step != step:
                if pool is None and from_loader and labeler.is_refit_step(step):
                    pool = self._refit_pool(step)
                t_start = time.perf_counter()
                times["fit_pool"] += t_start - t_fit
                labeler.start_fit(unwrap(net), step, pool)
                times["fit_start"] += time.perf_counter() - t_start
            if labeler.fit_due(step):  # the refit's OCCs fitted beside the last pseudo.fit_overlap_steps steps
                pseudo_stats = self._put_refit_in_force(times)
            times["fit"] += time.perf_counter() - t_fit
            inputs = batch_to_device(batch, device, t.channels_last)
            if graph_step is not None:
                losses = graph_step((labeler.graph_key, self.model.memory.generation), *inputs)
            else:
                self.optimizer.zero_grad(set_to_none=True)
                losses = step_fn(*inputs)
            self.scheduler.step()
            if self.ema is not None:
                self.ema.update()
            core = unwrap(self.model)
            if not core.freeze_encoder and ((step + 1) % t.memory_refresh_every == 0 or step + 1 == t.steps):
                self.refresh_banks(core)
            t_val = time.perf_counter()
            times["step"].append(t_val - ts)
            validation = self._validate(step, end_step, net)
            t_log = time.perf_counter()
            times["validation"] += t_log - t_val
            last = self._log(step, end_step, losses, times["step"], {**pseudo_stats, **validation}) or last
            if self.progress is not None:
                self.progress.update(step + 1, last.get("loss"))
            t_ckpt = time.perf_counter()
            times["log"] += t_ckpt - t_log
            # a refit put in force for the checkpoint counts as the pseudo-labeler's, not the checkpoint's
            refit_s = 0.0
            if (step + 1) % t.checkpoint_every == 0 and step + 1 < end_step:
                if labeler.pending is not None:  # in force now, so the checkpoint holds it (also when not resumed)
                    pseudo_stats = self._put_refit_in_force(times)
                    refit_s = time.perf_counter() - t_ckpt
                    times["fit"] += refit_s
                    times["fit_out"] += refit_s
                self.writer.submit(step + 1, self.snapshot(step + 1))  # written beside the next steps
            self.writer.poll()
            t_ready = time.perf_counter()
            times["checkpoint"] += t_ready - t_ckpt - refit_s
        return self._finish(end_step, t0, times, last, pseudo_stats, batch, n_loader, graph_step)

    def _finish(self, end_step, t0, times, last, pseudo_stats, batch, n_loader, graph_step):
        """Final save, EMA weights in place, and the training summary; each phase shown (:meth:`_phase`)."""
        t_ckpt = time.perf_counter()
        self.writer.drain()  # the last in-loop checkpoint, handed over before the final one
        times["checkpoint"] += time.perf_counter() - t_ckpt
        if self.labeler.pending is not None:  # training ended inside a refit's overlap: in force for the saved run
            self._phase(f"finishing the refit of step {self.labeler.pending[0]}")
            t_fit = time.perf_counter()
            pseudo_stats = self._put_refit_in_force(times)
            t_fit = time.perf_counter() - t_fit
            times["fit"] += t_fit
            times["fit_out"] += t_fit
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        if self.rank == 0 and self.cfg.pseudo.enabled and self.labeler.ensemble is None:
            log.warning(
                "the pseudo-labeler was never fitted: training stopped at step %d, before pseudo.warmup_steps = %d; "
                "the run has no pseudo-labeler state and L_Yu (the loss on pseudo-labeled unlabeled images) was "
                "not used",
                end_step,
                self.cfg.pseudo.warmup_steps,
            )
        loop_wall = time.perf_counter() - t0
        if self.data.pool_size and self.labeler.history:  # the ensemble's banks from the final normal stream
            self._phase("refilling the memory banks from the final normal stream")
            core = unwrap(self.model)
            self.rechoose_banks(self.labeler.history[max(self.labeler.history)], core, training_bank=False)
            self.refresh_banks(core)
        patch_bank_s, patch_bank = 0.0, {}
        if self.rank == 0 and self.cfg.model.knn_patches:
            self._phase("filling the patch bank")
            t_bank = time.perf_counter()
            patch_bank = self.fill_patch_bank(unwrap(self.model))
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            patch_bank_s = time.perf_counter() - t_bank
        self._phase("saving the final checkpoint")
        self.checkpoint(end_step)
        self.write_pool_labels()
        wall = time.perf_counter() - t0
        if self.ema is not None:
            self.ema.copy_to_params()
        model = unwrap(self.model).eval()
        steps_run = end_step - self.start_step
        per_worker_batch = len(batch["kind"]) if steps_run > 0 else 0
        loader_context = self.cfg.train.loader_start_method
        summary = {
            "train_wall_s": wall,
            "steps_run": steps_run,
            "start_step": self.start_step,
            "segment": self.segment,
            "loop_wall_s": loop_wall,
            "world_size": self.world_size,
            "per_worker_batch": per_worker_batch,
            "loader_workers": n_loader,
            "loader_start_method": (loader_context if loader_context != "auto" else "default") if n_loader else None,
            "images_per_s": steps_run * per_worker_batch * self.world_size / max(loop_wall, 1e-9),
            **_timing_summary(times),
            "phases_s": _phases(times, loop_wall, wall),
            "final_losses": last,
            "pseudo": pseudo_stats,
            "pseudo_refits": self.refits,
            "memory_bank_rows": [
                np.asarray(b).tolist() for b in (self.data.memory_indices, *self.data.extra_memory_indices)
            ],
            "memory_backend": model.memory.backend,
            "patch_bank_s": patch_bank_s,
            "patch_bank": patch_bank,  # filling the patch bank after the loop (part of phases_s' final)
            # the pseudo-labeler on the training path: features, fit start, waits (the memory-bank refill after a
            # refit, with fewer labeled normals than model.memory_samples, apart: refit_bank_refill_s)
            "pseudo_fit_s": times["fit"] - times["banks"],
            "pseudo_fit_wait_s": times["fit_wait"],  # of which waiting for fits
            "pseudo_fit_parts_s": self._pseudo_parts(times),
            "pseudo_snapshot_rebuilds": self.labeler.snapshot_rebuilds,
            "refit_bank_refill_s": times["banks"],
            "cuda_graph_step": self.graphed,
            "graph_captures": graph_step.captures if graph_step else 0,
            "graph_capture_error": graph_step.failed if graph_step else None,
            "eager_steps": graph_step.eager_steps if graph_step else steps_run,
        }
        return model, summary


def _phases(times: dict[str, Any], loop_wall: float, wall: float) -> dict[str, float]:
    """Where the training wall time went, in seconds: ``loader_wait`` (batches not ready, the first
    included), ``steps`` (forward, backward, optimizer, EMA, bank refreshes; the first steps' CUDA-graph
    capture included), ``pseudo`` (the pseudo-labeler on the training path), ``memory_banks`` (the training
    bank refilled with pool images after a refit), ``validation``, ``log``
    (metrics and the progress bar), ``checkpoints`` (in the loop), ``other`` (the rest of the loop) and
    ``final`` (after the loop: the last banks and the final save)."""
    out = {
        "loader_wait": float(np.sum(times["wait"])),
        "steps": float(np.sum(times["step"])) - (times["fit"] - times["fit_out"]),
        "pseudo": times["fit"] - times["banks"],
        "memory_banks": times["banks"],
        "validation": times["validation"],
        "log": times["log"],
        "checkpoints": times["checkpoint"],
    }
    out["other"] = loop_wall - sum(out.values())
    out["final"] = wall - loop_wall
    return {k: round(v, 4) for k, v in out.items()}


def _timing_summary(times: dict[str, Any]) -> dict[str, float]:
    """Step-time statistics (the first 5 steps are warm-up) and the time spent waiting for batches."""
    measured = times["step"][min(5, max(0, len(times["step"]) - 1)) :]
    waits = times["wait"]
    return {
        "step_s_mean": float(np.mean(measured)) if measured else math.nan,
        "step_s_median": float(np.median(measured)) if measured else math.nan,
        "first_batch_s": waits[0] if waits else math.nan,
        # time spent waiting for batches after the first: > 0 means the loader, not the GPU, set the pace
        "loader_wait_s": float(np.sum(waits[1:])) if waits else math.nan,
    }


def train_model(
    cfg: Config,
    data: TrainData,
    run_dir: str | Path,
    device: torch.device | str = "cpu",
    rank: int = 0,
    world_size: int = 1,
    wrap_model: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
    report: Callable[[dict[str, Any]], None] | None = None,
    resume: bool = False,
    progress: bool = True,
    stop_at: int | None = None,
    validation: ValidationSet | None = None,
    batches: Iterable[dict[str, Any]] | None = None,
    on_checkpoint: Callable[[int, Path | None], None] | None = None,
    restart: dict[str, Any] | None = None,
    fit_map: MapFn | None = None,
) -> tuple[MAPLModel, dict[str, Any]]:
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
        resume: continue from ``RUN/checkpoint`` (:meth:`Trainer.resume`).
        stop_at: save and return after this many steps (a pre-empted run: ``resume`` continues it).
        validation: the validation set; its metrics (``validation_*``) are logged and reported every
            ``eval.validate_every`` steps and at the last step (rank 0).
        batches: the steps' batches instead of the loader's (:meth:`Trainer.run`).
        on_checkpoint: called on every rank after each checkpoint, scheduled and final, with the step and
            (rank 0) the checkpoint folder, None on the other ranks (Ray Train: ``ray.train.report``).
        restart: this call continues a run whose workers died: resume from ``RUN/checkpoint`` when ``resume``,
            else start afresh, and mark the restart in ``train_log.jsonl`` with these extra fields
            (:meth:`Trainer.mark_restart`).
        fit_map: runs the K OCC fits of a pseudo-labeler refit (:class:`~mapl_ray.pseudo.labeler.PseudoLabeler`;
            e.g. Ray tasks); None: one after the other in the refit's thread.

    Returns:
        (the trained, unwrapped model in eval mode, summary dict with timings and final losses).

    Raises:
        CheckpointError: ``resume`` without a usable checkpoint.
    """
    trainer = Trainer(
        cfg, data, run_dir, device, rank, world_size, wrap_model, report, validation, on_checkpoint, fit_map
    )
    if resume:
        trainer.resume()
    else:
        trainer.refresh_banks(trainer.model)
    if restart is not None:
        trainer.mark_restart(restart)
    end_step = cfg.train.steps if stop_at is None else min(cfg.train.steps, stop_at)
    return trainer.run(end_step, progress, batches)
