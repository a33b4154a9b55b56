"""Batches for the training loop: loader processes that simulate anomalies ahead of the step, and the
copy of a batch to the device."""

from __future__ import annotations

from typing import Any

import torch

from ..config import Config
from ..data.batches import BatchMaker, StepBatches
from ..pseudo.labeler import fit_overlap
from ..tensors import to_tensor

LOADER_TIMEOUT_S = 300  # a loader process that yields nothing for this long raises instead of hanging the job


#: Most loader processes beside a GPU by default (:func:`loader_workers`).
MAX_DEFAULT_LOADER_WORKERS = 8


def loader_workers(cfg: Config, device: torch.device) -> int:
    """Loader processes for anomaly simulation: ``train.loader_workers``, or by default 0 on the CPU
    (compute and simulation share the same cores) and, beside a GPU, one per CPU thread less one for the
    loop (``torch.get_num_threads()``, which follows a Ray worker's CPUs), at most 8, and with the
    pseudo-labeler on below ``pseudo.label_lag`` minus the refit overlap (:func:`make_loader`'s bound).

    Why 8 (``bench/simulation_cost.py``'s ``loader_model``: the DataLoader's schedule replayed from the
    measured cost of a batch and of a refit's pool, ``bench/results/simulation_cost.json``): the 500-step
    paper run needs ~125 batches/s to take 4 s; a batch costs one process 15-20 ms of CPU on the shared
    2-core CPU machine, so between refits 4 processes keep up and 8 leave room for the loop and the
    pseudo-labeler's fit. In the model 8 processes wait about a third less than 4, but 14 only about a
    sixth less than 8, for more memory and cores; what it left was the refit steps' pools (``2
    pseudo.pool_size`` simulated anomalies made by one process while the loop waited), which are since made
    in parts by the items of the steps before each refit (:class:`~mapl_ray.data.batches.StepBatches`).
    On the H200 the 500-step run then waited 0.4-1.3 s for batches with 8 (3.8 s with 4 before;
    ``bench/results/train_phases.json``).
    """
    if cfg.train.loader_workers is not None:
        return int(cfg.train.loader_workers)
    if device.type == "cpu":
        return 0
    n = min(MAX_DEFAULT_LOADER_WORKERS, torch.get_num_threads() - 1)
    if cfg.pseudo.enabled:
        n = min(n, cfg.pseudo.label_lag - fit_overlap(cfg.pseudo) - 1)
    return max(0, n)


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


class LabeledSteps(torch.utils.data.Sampler):
    """Steps ``start .. end`` as DataLoader items ``(step, pool labels in force at step)``.

    The DataLoader draws items in this process, a few steps ahead of the loop (up to the loader's
    prefetch depth): ``labels_for`` (:meth:`~mapl_ray.pseudo.labeler.PseudoLabeler.labels_for`) gives
    each step the labels of a refit at least ``pseudo.label_lag`` steps older, which has happened by
    then, so the items do not depend on how far ahead the loader runs.
    """

    def __init__(self, start: int, end: int, labels_for):
        self.start, self.end, self.labels_for = start, end, labels_for

    def __len__(self) -> int:
        return self.end - self.start

    def __iter__(self):
        for step in range(self.start, self.end):
            yield step, self.labels_for(step)


def make_loader(
    bm: BatchMaker,
    refit_steps: set[int],
    start: int,
    end: int,
    n_loader: int,
    cfg: Config,
    device: torch.device,
    labels_for=None,
) -> torch.utils.data.DataLoader:
    """A ``DataLoader`` over steps ``start .. end`` of :class:`~mapl_ray.data.batches.StepBatches`:
    ``n_loader`` processes simulate anomalies ahead of the step (0: in this process), pinned memory
    beside a GPU, and a timeout so a stuck loader process raises instead of hanging the job.

    ``train.loader_start_method`` ``auto`` is the platform default (fork on Linux), in Ray workers
    too: on the H200 ``forkserver`` took 8.7 s to the first batch against 0.13 s with ``fork``
    (``bench/results/gpu.json``, ``ddp.runs``). ``labels_for``: the pool's pseudo-labels by step
    (:class:`LabeledSteps`); None without a pool.

    With a pool, each process prefetches at most ``(pseudo.label_lag - overlap - 1) // n_loader`` batches
    (4 at most; overlap: ``pseudo.fit_overlap_steps``, the steps a refit's labels wait to be in force), so
    the loader never asks for labels before they are in force.

    Raises:
        ValueError: ``train.loader_workers`` >= ``pseudo.label_lag`` - overlap with a pool (batches would
            then depend on the number of loader processes).
    """
    prefetch = 4
    if labels_for is not None and n_loader:
        # a refit's labels are in force fit_overlap_steps after it: the loader may not ask for them earlier
        p = cfg.pseudo
        ahead = p.label_lag - fit_overlap(p)
        if n_loader >= ahead:
            raise ValueError(
                f"train.loader_workers={n_loader} must be below pseudo.label_lag={p.label_lag} minus "
                f"the refit overlap {fit_overlap(p)} (pseudo.fit_overlap_steps)"
            )
        prefetch = min(4, (ahead - 1) // n_loader)
    method = cfg.train.loader_start_method
    mp_context = None
    if n_loader and method != "auto":
        import multiprocessing

        mp_context = multiprocessing.get_context(method)
        if method == "forkserver":
            # the server imports these once; each loader process forks from it instead of importing torch anew
            mp_context.set_forkserver_preload(["torch", "numpy", "PIL.Image", "mapl_ray.data.batches"])
    return torch.utils.data.DataLoader(
        StepBatches(bm, refit_steps),
        batch_size=None,
        sampler=range(start, end) if labels_for is None else LabeledSteps(start, end, labels_for),
        num_workers=n_loader,
        pin_memory=device.type == "cuda",
        prefetch_factor=prefetch if n_loader else None,
        persistent_workers=False,
        multiprocessing_context=mp_context,
        timeout=LOADER_TIMEOUT_S if n_loader else 0,
    )
