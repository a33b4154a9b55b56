"""The pseudo-labeler inside training (MAPL eqs. 3-6, 15-17; SPADE).

On a schedule (``pseudo.warmup_steps``, then every ``pseudo.refit_every`` steps) it refits the OCC
ensemble on features of the labeled normals, the unlabeled pool (or, without a pool, simulated
images standing in for it) and positives (labeled anomalies and simulated anomalies), then labels
*every* pool image 1 / 0 / -1. A refit that leaves an image unknown keeps the image's previous label
(-1 before its first confident one): a label changes only on the ensemble's consensus, so one refit
whose thresholds land badly cannot empty the normal stream (seen on screw with 6 labeled normals:
refits alternated between 323 and 4 pool images labeled normal). Those labels steer the batches (:class:`~mapl_ray.data.batches.BatchMaker`)
from ``pseudo.label_lag`` steps after the refit on: a fixed lag, longer than loader processes
prepare batches ahead, so a batch does not depend on their number, and a resumed run draws the same
batches. A refit's OCCs fit beside training (:meth:`PseudoLabeler.start_fit`: features of the model as it
is at the refit, on a CUDA stream of their own beside the next steps, then the fit in a thread whose K OCC
fits go through ``fit_map``, Ray tasks under Ray): the step goes on with the previous
ensemble and labels, and the new ones take over exactly ``pseudo.fit_overlap_steps`` steps after the refit
(the step waits there if the fit is not done), so the labels are at most that many steps stale and a run
does not depend on how fast its fits are. In the step, :meth:`PseudoLabeler.predict` labels the batch's simulated images on the device
(a failed simulation, labeled 0, leaves the segmentation loss).

What the OCCs see (``pseudo.features``): ``map``, five statistics of the network's current anomaly
map (max, mean of the top 10 and top 100 pixels, mean, standard deviation), which follow the detector
as it trains; ``pooled``, the pooled encoder features and memory differences of the frozen encoder
(:meth:`~mapl_ray.model.network.MAPLModel.pooled_features`); ``both``; or ``knn``, statistics of each
image's patch distances to the patches of the other images, labeled and unlabeled
(:mod:`mapl_ray.pseudo.patch_knn`), which do not depend on the detector the pool trains. With ``knn``
the batches' simulated images are not pseudo-labeled (they have no such features in the step): none is
filtered out of the segmentation loss. ``auto`` (the default, :func:`feature_kind`) is ``knn`` with an
unlabeled pool and ``map`` without one.

With ``knn`` features and ``pseudo.normal_gate``, a pool image whose farthest patch (statistic ``max``)
lies farther from the other images' patches than the farthest patch of every labeled normal is never
labeled normal, whatever the OCCs vote (:func:`normal_gate`): a defect is a patch no other image has,
and the labeled normals say how far a normal patch may be.
"""

from __future__ import annotations

import contextlib
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import Config, PseudoConfig
from ..data.batches import BatchMaker
from ..data.train_data import TrainData, initial_pool_labels
from ..model import MAPLModel
from ..model.graphs import GraphedForward
from ..model.snapshot import WeightSnapshot
from ..tensors import autocast_context, pad_rows, to_host, to_tensor
from .occ import MapFn, OCCConfig, OCCEnsemble, TorchOCCParams
from .patch_knn import image_statistics, leave_fold_out_distances, nearest_distances, patch_embeddings

MAP_TOPK = (10, 100)
#: images per upload of a refit's feature pass on CUDA (256 px: 197 KB each)
_UPLOAD_IMAGES = 1024
#: on CUDA, in-memory labeled normals and pool images up to this many bytes stay on the device for the run,
#: so a refit gathers them there instead of copying them through pinned host memory each time
RESIDENT_MAX_BYTES = 2 * 2**30

log = logging.getLogger("mapl_ray.pseudo")


def normal_gate(labeled: np.ndarray, unlabeled: np.ndarray) -> tuple[np.ndarray, float]:
    """Which pool images may not be labeled normal (``pseudo.normal_gate``): those whose farthest patch
    distance exceeds the largest one of the labeled normals.

    Args:
        labeled, unlabeled: float ``(N, S)`` / ``(M, S)`` :func:`~mapl_ray.pseudo.patch_knn.image_statistics`
            of the labeled normals and the pool (column 0: the farthest patch), scored leave-fold-out.

    Returns:
        ``(vetoed bool (M,), the cut)``; nothing vetoed (cut inf) without labeled normals.

    Source: SoftPatch (Jiang et al., NeurIPS 2022) screens noisy patches; here the cut is the labeled
    normals' own maximum, as :func:`mapl_ray.model.patch_bank.trusted_patch_mask` does for the patch bank.
    """
    if not len(labeled):
        return np.zeros(len(unlabeled), dtype=bool), float("inf")
    cut = float(np.max(labeled[:, 0]))
    return np.asarray(unlabeled[:, 0] > cut), cut


def feature_kind(features: str, has_pool: bool) -> str:
    """The OCC feature kind a run uses: ``pseudo.features``, with ``auto`` resolved to ``knn`` when the run has
    an unlabeled pool (in memory or streamed) and to ``map`` when it has none (then the OCCs label the simulated
    images that stand in for a pool, which only ``map`` can filter in the step). The choice of ``knn`` for pools
    was made on validation canaries (``docs/method.md``, bench/results/semi.json), not on a test split."""
    if features == "auto":
        return "knn" if has_pool else "map"
    return features


def features_from_output(out: dict[str, torch.Tensor], kind: str) -> torch.Tensor:
    """The OCC features of a forward pass's output, float32 ``(B, D)`` on its device (no host sync).

    Args:
        out: :meth:`MAPLModel.forward` output (``logits`` ``(B, 1, H, W)``, ``pooled`` ``(B, D0)``).
        kind: ``pseudo.features``: ``map`` (D = 5), ``pooled`` (D = D0) or ``both``.
    """
    if kind == "pooled":
        return out["pooled"].float()
    maps = torch.sigmoid(out["logits"].detach().float()).flatten(1)
    top = maps.topk(min(max(MAP_TOPK), maps.shape[1]), dim=1).values
    stats = torch.stack([top[:, 0], top[:, : MAP_TOPK[0]].mean(1), top.mean(1), maps.mean(1), maps.std(1)], 1)
    return stats if kind == "map" else torch.cat([stats, out["pooled"].float()], 1)


def label_quality(
    labels: np.ndarray, truth: np.ndarray | None, canaries: np.ndarray | None = None, scores: np.ndarray | None = None
) -> dict[str, Any]:
    """Counts of pool pseudo-labels and, where the truth is known (benchmark splits), their quality.

    Returns ``pseudo_pos`` / ``pseudo_neg`` / ``pseudo_unknown`` counts; with validation canaries
    (``canaries``, bool ``(M,)``; :func:`~mapl_ray.data.validation.add_canaries`), known on any data:
    ``canaries``, ``canary_recall`` (share labeled 1) and ``canaries_in_normal_stream`` (labeled 0);
    with truth (int8 ``(M,)``, -1 unknown; canaries are -1): ``pseudo_label_precision`` (true anomalies
    among those labeled 1), ``pseudo_label_recall`` (true anomalies labeled 1), ``normal_stream_purity``
    (true normals among those labeled 0) and ``anomalies_in_normal_stream`` (true anomalies labeled 0),
    and with ``scores`` (float ``(M,)``, the OCCs' mean anomaly score of each pool image)
    ``pseudo_score_auroc``, how well the OCC scores rank the pool's true anomalies above its normals
    whatever the thresholds (scikit-learn ``roc_auc_score``); None where undefined.
    """
    stats: dict[str, Any] = {
        "pseudo_pos": int((labels == 1).sum()),
        "pseudo_neg": int((labels == 0).sum()),
        "pseudo_unknown": int((labels == -1).sum()),
    }
    if canaries is not None and canaries.any():
        stats.update(
            canaries=int(canaries.sum()),
            canary_recall=float((labels[canaries] == 1).mean()),
            canaries_in_normal_stream=int((labels[canaries] == 0).sum()),
        )
    if truth is None or not (truth >= 0).any():
        return stats
    known = truth >= 0
    t, lab = truth[known], labels[known]

    def share(num: np.ndarray, den: np.ndarray) -> float | None:
        return float(num.sum() / den.sum()) if den.sum() else None

    stats.update(
        pseudo_label_precision=share((lab == 1) & (t == 1), lab == 1),
        pseudo_label_recall=share((lab == 1) & (t == 1), t == 1),
        normal_stream_purity=share((lab == 0) & (t == 0), lab == 0),
        anomalies_in_normal_stream=int(((lab == 0) & (t == 1)).sum()),
    )
    if scores is not None:
        from sklearn.metrics import roc_auc_score

        both = 0 < int(t.sum()) < len(t)
        stats["pseudo_score_auroc"] = float(roc_auc_score(t, np.asarray(scores)[known])) if both else None
    return stats


def refit_steps_text(cfg: Config) -> str:
    """``1 refit in 120 steps, at step 50 then every 100`` / ``no refit in 40 steps, the first is at step 50``."""
    p, steps = cfg.pseudo, cfg.train.steps
    n = 0 if steps <= p.warmup_steps else (steps - 1 - p.warmup_steps) // p.refit_every + 1
    if n == 0:
        return f"no refit in {steps} steps, the first is at step {p.warmup_steps} (pseudo.warmup_steps)"
    return f"{n} refit{'s' if n > 1 else ''} in {steps} steps, at step {p.warmup_steps} then every {p.refit_every}"


def pool_note(cfg: Config, data: TrainData) -> str | None:
    """The console line on the unlabeled pool at the start of training: its size, its validation canaries,
    the truth a benchmark split knows, and the pseudo-labeler's OCC feature kind (:func:`feature_kind`) and
    refits. None without a pool."""
    m = data.pool_size
    if not m:
        return None
    text = f"unlabeled pool: {m} images"
    canaries = data.pool_canaries
    if canaries is not None and canaries.any():
        text += f" ({int(canaries.sum())} of them validation canaries: simulated anomalies that check the labels)"
    truth = data.unlabeled_truth
    if truth is not None and (truth >= 0).any():
        text += f"; known from the split: {int((truth == 1).sum())} anomalous, {int((truth == 0).sum())} normal"
    p = cfg.pseudo
    if not p.enabled:
        return text + "; pseudo-labeler off (pseudo.enabled=false): the whole pool is normal data"
    auto = " (pseudo.features=auto)" if p.features == "auto" else ""
    return f"{text}; pseudo-labeler: OCC features {feature_kind(p.features, True)}{auto}, {refit_steps_text(cfg)}"


def _share(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def refit_note(stats: dict[str, Any], head: str | None = None) -> str:
    """One plain line on a refit's pool labels from its :func:`label_quality` dict (with ``refit_step``):
    the counts, the validation canaries (where there are) and precision / recall (where the truth is known).
    ``head``: the line's start (default ``pseudo-labels of the refit at step N``)."""
    pos, neg, unk = stats["pseudo_pos"], stats["pseudo_neg"], stats["pseudo_unknown"]
    text = head or f"pseudo-labels of the refit at step {stats.get('refit_step', '?')}"
    text += f": {pos} anomalous, {neg} normal, {unk} unknown of {pos + neg + unk} pool images"
    if stats.get("canaries"):
        text += f" ({stats['canaries']} of them validation canaries, left out of pool_labels.csv)"
    if "canaries" in stats:
        text += (
            f"; validation canaries: recall {stats['canary_recall']:.2f}, "
            f"{stats['canaries_in_normal_stream']} of {stats['canaries']} in the normal stream"
        )
    if "pseudo_label_recall" in stats:
        text += (
            f"; vs the split's truth: precision {_share(stats['pseudo_label_precision'])}, "
            f"recall {_share(stats['pseudo_label_recall'])}"
        )
        if stats.get("pseudo_score_auroc") is not None:
            text += f", its defects ranked by the OCC scores at AUROC {stats['pseudo_score_auroc']:.2f}"
    return text


def report_pool(cfg: Config, data: TrainData) -> None:
    """Log :func:`pool_note` at the start of training (logger ``mapl_ray.pseudo``, INFO); nothing without a pool."""
    note = pool_note(cfg, data)
    if note:
        log.info("%s", note)


def report_refit(stats: dict[str, Any]) -> None:
    """Log :func:`refit_note` (logger ``mapl_ray.pseudo``, INFO)."""
    log.info("%s", refit_note(stats))


def report_pool_labels(refits: list[dict[str, Any]], cfg: Config, listed: Path | None = None) -> None:
    """At the end of a run with a pool: log the pseudo-labels the run ended with (``refits``: the training
    summary's ``pseudo_refits``, :func:`label_quality` dicts with ``refit_step``), and warn when the last
    refit labeled no pool image anomalous while the validation canaries (where there are) all went to the
    normal stream: the pool was then normal data; ``listed``: the file of every pool image's label
    (:func:`write_pool_labels`), named in the log. Without refits (no pool, none fitted) only that file."""
    if not refits:
        if listed is not None:
            log.info("the pool's images with the labels they started with (no refit ran): %s", listed)
        return
    last, n = refits[-1], len(refits)
    step = last.get("refit_step", "?")
    note = refit_note(last, f"pseudo-labels at the end ({n} refit{'s' if n > 1 else ''}, the last at step {step})")
    if n > 1:  # how the anomalous count moved (the last 8 refits)
        note += (
            "; anomalous per refit: "
            + ("..., " if n > 8 else "")
            + ", ".join(str(r["pseudo_pos"]) for r in refits[-8:])
        )
    if listed is not None:
        note += f"; each pool image's label and OCC score, most anomalous first: {listed}"
    log.info("%s", note)
    canaries = last.get("canaries", 0)
    if last["pseudo_pos"] or last.get("canaries_in_normal_stream", 0) < canaries:
        return
    seen = f", and all {canaries} validation canaries went to the normal stream" if canaries else ""
    log.warning(
        "no pool image was labeled anomalous at the last refit (step %s)%s: the unlabeled pool was used as normal "
        "data, and any defects in it were learned as normal. Consider more training steps (--steps; refits come at "
        "step %d, then every %d) or a few labeled anomalies (--labeled-anomalies K).",
        step,
        seen,
        cfg.pseudo.warmup_steps,
        cfg.pseudo.refit_every,
    )


POOL_LABEL_NAMES = {1: "anomalous", 0: "normal", -1: "unknown"}


def write_pool_labels(
    path: Path, paths: list[str], labels: np.ndarray, scores: np.ndarray | None, canaries: np.ndarray | None
) -> int:
    """Write the pool's final pseudo-labels as CSV, most anomalous first: ``path, pseudo_label`` (anomalous /
    normal / unknown, paper eqs. 3-6 consensus) ``, occ_score`` (the OCCs' mean anomaly score, each OCC in
    units of its spread over the pool; empty when unknown in this process, e.g. after a resume before a
    refit). The validation canaries (simulated images, not the user's) are left out.

    Args:
        paths: the pool's image paths ``(M,)``; labels: int ``(M,)`` 1 / 0 / -1; scores: float ``(M,)`` or
            None; canaries: bool ``(M,)`` or None.

    Returns:
        the number of images written.

    Raises:
        ValueError: the arrays are not aligned with ``paths``.
    """
    import csv

    m = len(paths)
    if len(labels) != m or (scores is not None and len(scores) != m) or (canaries is not None and len(canaries) != m):
        raise ValueError(f"pool labels: {m} paths but {len(labels)} labels / scores / canaries of other lengths")
    keep = np.flatnonzero(~np.asarray(canaries, bool)) if canaries is not None else np.arange(m)
    order = keep[np.argsort(-np.asarray(scores)[keep], kind="stable")] if scores is not None else keep
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "pseudo_label", "occ_score"])
        for i in order:
            w.writerow(
                [paths[i], POOL_LABEL_NAMES[int(labels[i])], "" if scores is None else f"{float(scores[i]):.6g}"]
            )
    return int(len(order))


def fit_overlap(p: PseudoConfig) -> int:
    """Steps a refit's OCCs fit beside training before the refit is in force: ``p.fit_overlap_steps``, at
    most ``p.refit_every - 1`` (one refit at a time) and ``p.label_lag - 1`` (labels in force before they
    steer batches)."""
    return max(0, min(p.fit_overlap_steps, p.refit_every - 1, p.label_lag - 1))


def is_refit_step(p: PseudoConfig, step: int) -> bool:
    """Steps of the refit schedule: ``p.warmup_steps``, then every ``p.refit_every`` steps (pseudo-labeler on)."""
    return p.enabled and step >= p.warmup_steps and (step - p.warmup_steps) % p.refit_every == 0


class PseudoLabeler:
    """Fits the OCC ensemble on a schedule and labels the pool and the batches (module docstring).

    Args:
        cfg: the run's configuration (``pseudo`` section; ``train.seed`` seeds the ensemble).
        batch_maker: gives the refit's reference images (:meth:`BatchMaker.pool`) and the data.
        device: where features are computed.
        fit_map: runs the K OCC fits of a refit (:meth:`OCCEnsemble.fit`'s ``map_fn``; e.g. Ray tasks,
            :mod:`mapl_ray.pipelines.occ_tasks`); None: one after the other in the fit's thread.
        cuda_graphs: replay the refits' feature passes as CUDA graphs (:meth:`_batched`; CUDA, torch
            memory search, one process).
    """

    def __init__(
        self,
        cfg: Config,
        batch_maker: BatchMaker,
        device: torch.device,
        fit_map: MapFn | None = None,
        cuda_graphs: bool = False,
    ):
        self.cfg, self.bm, self.device, self.fit_map = cfg, batch_maker, device, fit_map
        #: the OCC feature kind in force (:func:`feature_kind`)
        self.kind = feature_kind(cfg.pseudo.features, bool(batch_maker.data.pool_size))
        if cfg.pseudo.normal_gate and self.kind != "knn":
            log.warning("pseudo.normal_gate has no effect without an unlabeled pool (pseudo.features=auto is map then)")
        self.cuda_graphs = cuda_graphs
        #: the refits' feature passes as CUDA graphs, by feature kind (:meth:`_batched`)
        self._graphs: dict[str, GraphedForward] = {}
        self._graph_model: MAPLModel | None = None
        #: the refit in progress: (its step, streamed pool, future of the fit's results, :meth:`start_fit`)
        self.pending: tuple[int, bool, Future] | None = None
        #: what the refits' features read (:meth:`start_fit`) and, on CUDA, the stream they run on
        self._snapshot = WeightSnapshot()
        self._stream: torch.cuda.Stream | None = None
        #: the normal-source images (labeled normals, then the in-memory pool) as one uint8 device tensor
        #: (:meth:`_resident_sources`)
        self._resident: torch.Tensor | None = None
        self._executor: ThreadPoolExecutor | None = None
        #: host seconds of :meth:`start_fit`'s parts over the run (pool drawn here, snapshot, feature passes
        #: queued with their uploads, the fit handed to its thread)
        self.start_s = {"pool": 0.0, "snapshot": 0.0, "features": 0.0, "submit": 0.0}
        #: seconds of the fits' own thread over the run, beside the training loop: waiting for the feature
        #: passes to reach the host, then the OCC ensemble's fit and vote (what decides whether a fit is done
        #: by its take-over step)
        self.thread_s = {"features": 0.0, "occ": 0.0}
        self.occ_cfg = OCCConfig.from_config(cfg.pseudo, cfg.train.seed)
        self.ensemble: OCCEnsemble | None = None
        #: pseudo.features=knn: (image statistics of the normals and the pool, reference patches), cached on the device
        self._knn: tuple[torch.Tensor, torch.Tensor] | None = None
        self.fitted_step = -1
        #: the ensemble in force on ``device``, in tensors refilled in place at each refit (a captured
        #: training step reads them); ``params_generation`` counts their re-allocations (new shapes)
        self.device_params: TorchOCCParams | None = None
        self.params_generation = 0
        data: TrainData = batch_maker.data
        #: pool pseudo-labels by the step of the refit that made them (-1: before any refit)
        self.history: dict[int, np.ndarray] = {}
        #: the last refit's OCC anomaly score of each pool image, float ``(M,)`` (None before a refit in
        #: this process, or with a streamed pool)
        self.pool_scores: np.ndarray | None = None
        if data.pool_size and not data.pool_streamed:  # a streamed pool is labeled per refit sample only
            self.history[-1] = initial_pool_labels(cfg, len(data.normals), data.pool_size)

    def due(self, step: int) -> bool:
        """A refit step, or any step after warm-up while there is no ensemble yet (a run resumed off-schedule);
        never while a refit is pending."""
        p = self.cfg.pseudo
        if self.pending is not None:
            return False
        return self.is_refit_step(step) or (self.ensemble is None and p.enabled and step >= p.warmup_steps)

    def is_refit_step(self, step: int) -> bool:
        """Steps of the refit schedule (:func:`is_refit_step`): their pool is prefetched."""
        return is_refit_step(self.cfg.pseudo, step)

    def labels_for(self, step: int) -> np.ndarray | None:
        """The pool's pseudo-labels in force at ``step``: those of the last refit at or before
        ``step - pseudo.label_lag`` (the initial labels before that); None without a pool."""
        if not self.history:
            return None
        return self.history[max(s for s in self.history if s <= step - self.cfg.pseudo.label_lag or s == -1)]

    @torch.no_grad()
    def _batched(self, images: np.ndarray | torch.Tensor, model: MAPLModel, name: str, fn) -> torch.Tensor:
        """``fn(x)`` of uint8 images ``(N, H, W, 3)`` (numpy, or a tensor already on the device) in batches of ``pseudo.feature_batch_size`` (None: the
        training step's batch, :attr:`BatchMaker.step_images`, whose convolution plans the first steps built) on the device (autocast), the float32 results concatenated on the device.

        On CUDA the last batch is padded to full size (:func:`~mapl_ray.tensors.pad_rows`): every refit's batches have one shape, captured once (CUDA graphs,
        :class:`~mapl_ray.model.graphs.GraphedForward`, one per ``name``) and replayed at later refits (the weights change in place; a memory bank refilled with new tensors recaptures)."""
        if self._graph_model is not model:  # every graph read the other model's tensors
            self._graphs.clear()
            self._graph_model = model
        graphed = self._graphs.get(name)
        if graphed is None:
            graphed = self._graphs[name] = GraphedForward(
                lambda x, cache: {"y": self._run(fn, x, cache)}, self.device, self.cuda_graphs
            )
        key = tuple(bank.generation for bank in model.banks)
        b, out = self.cfg.pseudo.feature_batch_size or self.bm.step_images, []
        cuda = self.device.type == "cuda"
        # on CUDA, uploads of _UPLOAD_IMAGES from pinned memory: a copy from pageable memory waits for the stream's
        # queued work (the passes before it), which would hold this thread instead of letting them run beside
        # training; bounded so that a large pool is not on the device all at once
        group = b * max(1, _UPLOAD_IMAGES // b)
        for g in range(0, len(images), group):
            part = images[g : g + group]
            if cuda and not isinstance(part, torch.Tensor):
                part = torch.from_numpy(np.ascontiguousarray(part)).pin_memory().to(self.device, non_blocking=True)
            for i in range(0, len(part), b):
                chunk = part[i : i + b]
                n = len(chunk)
                if cuda:
                    chunk = pad_rows(chunk, b)
                out.append(graphed(to_tensor(chunk, self.device), key)["y"][:n])
        return torch.cat(out) if out else torch.zeros((0,), device=self.device)

    def _run(self, fn, x: torch.Tensor, cache: bool) -> torch.Tensor:
        with autocast_context(self.device, self.cfg.train.amp, cache_enabled=cache):
            return fn(x).float()

    def _resident_sources(self) -> torch.Tensor | None:
        """The normal-source images (:meth:`TrainData.source_images`' rows: labeled normals, then the in-memory
        pool) as one uint8 ``(N, H, W, 3)`` tensor on the device, uploaded at the first call; None off CUDA,
        with a streamed pool, or when they exceed :data:`RESIDENT_MAX_BYTES`."""
        d = self.bm.data
        if self._resident is None:
            if self.device.type != "cuda" or d.pool_streamed:
                return None
            arrays = [a for a in (d.normals, d.unlabeled if d.pool_size else None) if a is not None and len(a)]
            if not arrays or sum(a.nbytes for a in arrays) > RESIDENT_MAX_BYTES:
                return None
            shape = (sum(len(a) for a in arrays), *arrays[0].shape[1:])  # no labeled normals: the pool's shape
            out = torch.empty(shape, dtype=torch.uint8, device=self.device)
            at = 0
            for a in arrays:  # one device copy, filled part by part (no concatenated host or device temporary)
                out[at : at + len(a)].copy_(torch.from_numpy(np.ascontiguousarray(a)))
                at += len(a)
            self._resident = out
        return self._resident

    def _source_images(self, rows: np.ndarray) -> np.ndarray | torch.Tensor:
        """:meth:`TrainData.source_images` of ``rows``, gathered on the device from :meth:`_resident_sources`
        where they are there (queued on the current stream; the row index travels through pinned memory, so
        nothing waits for queued work), else on the host."""
        sources = self._resident_sources()
        if sources is None:
            return self.bm.data.source_images(rows)
        rows_t = torch.from_numpy(np.asarray(rows, dtype=np.int64))
        if sources.is_cuda:
            rows_t = rows_t.pin_memory().to(sources.device, non_blocking=True)
        return sources.index_select(0, rows_t)

    def _unlabeled_images(self) -> np.ndarray | torch.Tensor:
        """The in-memory pool (numpy, or its rows of :meth:`_resident_sources` on the device)."""
        d = self.bm.data
        sources = self._resident_sources()
        return d.unlabeled if sources is None else sources[len(d.normals) :]

    def _feature_tensor(self, model: MAPLModel, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """OCC features of uint8 images ``(N, H, W, 3)`` (``model`` in eval mode, :meth:`_batched`): float32
        ``(N, D)`` on the device, queued on the current stream."""
        kind = self.kind
        if kind == "pooled":
            return self._batched(images, model, kind, model.pooled_features)
        return self._batched(images, model, kind, lambda x: features_from_output(model(x), kind))

    def features(self, model: MAPLModel, images: np.ndarray) -> np.ndarray:
        """OCC features of uint8 images ``(N, H, W, 3)`` (``model`` in eval mode): float32 ``(N, D)``."""
        return self._feature_tensor(model, images).cpu().numpy()

    def _patches(self, model: MAPLModel, images: np.ndarray) -> torch.Tensor:
        """:func:`~mapl_ray.pseudo.patch_knn.patch_embeddings` of uint8 images ``(N, H, W, 3)`` on the device."""
        return self._batched(images, model, "patches", lambda x: patch_embeddings(model.encode(x)))

    def _knn_features(
        self, model: MAPLModel, step: int, pos_images: np.ndarray, unl: np.ndarray, streamed: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``pseudo.features=knn``: :func:`~mapl_ray.pseudo.patch_knn.image_statistics` ``(., 3)`` on the device
        of the normal-source images (labeled normals, then the unlabeled images ``unl``) and of the positives.
        The labeled normals and the unlabeled images are scored leave-fold-out against each other's patches;
        positives against patches of all of them. With a frozen encoder and an in-memory pool the table and
        reference are computed once per run (without a pool the simulated stand-ins change per refit)."""
        d, p = self.bm.data, self.cfg.pseudo
        if self._knn is None or streamed or not model.freeze_encoder or not d.pool_size:
            gen = torch.Generator().manual_seed(self.cfg.train.seed * 1_000_003 + (0 if model.freeze_encoder else step))
            patches = self._patches(model, np.concatenate([d.normals, unl]) if len(d.normals) else unl)
            dist, ref = leave_fold_out_distances(
                patches,
                min(p.knn_folds, len(patches)),
                p.knn_reference,
                gen,
                p.knn_refine,
                len(d.normals),
                p.knn_reference_from,
            )
            del patches
            self._knn = (image_statistics(dist), ref)
        table, ref = self._knn
        pos = self._patches(model, pos_images)
        dist = nearest_distances(pos.reshape(-1, pos.shape[-1]), ref).reshape(pos.shape[:2])
        return table, image_statistics(dist)

    def _feature_stream(self) -> torch.cuda.Stream | None:
        """The CUDA stream of the refits' feature passes (created once), None off CUDA."""
        if self.device.type != "cuda":
            return None
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        return self._stream

    def fit(self, model: MAPLModel, step: int, pool: dict[str, Any] | None = None) -> dict[str, Any]:
        """Refit the ensemble and label the pool now (:meth:`start_fit`, then :meth:`finish_fit` waiting
        for it). Returns the label counts (and quality)."""
        self.start_fit(model, step, pool)
        return self.finish_fit()[1]

    def start_fit(self, model: MAPLModel, step: int, pool: dict[str, Any] | None = None) -> None:
        """Begin the refit of ``step``: the OCC features of ``model`` as it is now, then the ensemble's fit in
        a background thread (its K OCCs through ``fit_map``); :meth:`finish_fit` puts it in force. Same data
        and seed on every worker, so every worker gets the same ensemble and labels.

        The features read a :class:`~mapl_ray.model.snapshot.WeightSnapshot` of ``model`` (``model`` itself
        is left as it is, in its mode), except ``knn`` features of a frozen encoder, which read the live
        model: training never moves a frozen encoder's weights. On CUDA their passes and the copy to the host
        are queued on a stream of their own and this call returns without waiting for them: they run beside
        the next training steps, which move the live weights, not the snapshot's; the fit's thread waits for
        them. With ``pseudo.feature_snapshot`` false the other features read the live ``model`` too (in eval
        mode while they are queued, its mode restored after): their passes go into the training stream ahead
        of the next step, so they see this step's weights without a copy, and do not overlap the steps.

        ``pool``: :meth:`BatchMaker.pool` of ``step`` when a loader process prepared it ahead; drawn here
        otherwise. A pool with ``unlabeled`` images (a streamed pool, :mod:`mapl_ray.pipelines.ray_data`)
        is that refit's sample of the unlabeled set: the OCCs fit on it and label it, and the labels do not
        steer the batches.

        Raises:
            RuntimeError: a refit is already pending.
        """
        if self.pending is not None:
            raise RuntimeError(f"refit of step {self.pending[0]} is still pending (finish_fit first)")
        d, p = self.bm.data, self.cfg.pseudo
        t0 = time.perf_counter()
        if pool is None:
            pool = self.bm.pool(step, self.labels_for(step))
        sims = np.asarray(pool["sims"])
        pos_images = sims[: p.pool_size]
        if d.anomalies is not None and len(d.anomalies):
            pos_images = np.concatenate([d.anomalies, pos_images])
        streamed = "unlabeled" in pool
        if streamed:
            unl_images = np.asarray(pool["unlabeled"])
        else:
            unl_images = d.unlabeled if d.pool_size else sims[p.pool_size :]
        normal_idx = np.asarray(pool["normal_idx"])
        t1 = time.perf_counter()
        # knn features read the frozen encoder alone, which training never changes (eval mode, no gradients):
        # the live model serves them as it is; other features read the weights of this step: a snapshot, or
        # (pseudo.feature_snapshot false) the live model itself, its passes queued before the next step's
        live = self.kind == "knn" and model.freeze_encoder
        in_step_order = not live and not p.feature_snapshot
        shadow = model if live or in_step_order else self._snapshot.of(model)
        t2 = time.perf_counter()
        cuda = self.device.type == "cuda"
        stream = torch.cuda.current_stream(self.device) if in_step_order and cuda else self._feature_stream()
        if stream is not None and not in_step_order:  # the snapshot's copy, queued on the training stream, comes first
            stream.wait_stream(torch.cuda.current_stream(self.device))
        was_training = model.training
        if in_step_order:
            model.eval()
        try:
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                if self.kind == "knn":
                    table, positives = self._knn_features(shadow, step, pos_images, unl_images, streamed)
                    parts = {"table": table, "positives": positives}
                else:
                    parts = {
                        "normals": self._feature_tensor(shadow, self._source_images(normal_idx)),
                        "positives": self._feature_tensor(shadow, pos_images),
                        "unlabeled": self._feature_tensor(
                            shadow, self._unlabeled_images() if d.pool_size and not streamed else unl_images
                        ),
                    }
                host, ready = to_host(parts, stream)
        finally:
            if in_step_order:
                model.train(was_training)
        t3 = time.perf_counter()
        n_labeled, gate = len(d.normals), p.normal_gate and self.kind == "knn"
        if streamed:  # the table holds the labeled normals and this refit's sample only
            normal_idx = normal_idx[normal_idx < n_labeled]

        def fit() -> tuple[OCCEnsemble, np.ndarray, np.ndarray, np.ndarray | None, float | None, tuple]:
            t_in = time.perf_counter()
            if ready is not None:
                ready.synchronize()
            t_ready = time.perf_counter()
            arrays = {k: v.numpy() for k, v in host.items()}
            if "table" in arrays:
                table = arrays["table"]
                normals, positives, unlabeled = table[normal_idx], arrays["positives"], table[n_labeled:]
            else:
                normals, positives, unlabeled = arrays["normals"], arrays["positives"], arrays["unlabeled"]
            veto, cut = normal_gate(arrays["table"][:n_labeled], unlabeled) if gate else (None, None)
            ens = OCCEnsemble(self.occ_cfg).fit(normals, unlabeled, positives, map_fn=self.fit_map)
            s = ens.scores(unlabeled)
            # each OCC's scores in units of its own spread over the pool, so the mean weighs them alike
            z = (s - s.mean(1, keepdims=True)) / (s.std(1, keepdims=True) + 1e-12)
            votes = ens.vote(s)
            return ens, votes, z.mean(0), veto, cut, (t_ready - t_in, time.perf_counter() - t_ready)

        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mapl-occ-fit")
        self.pending = (step, streamed, self._executor.submit(fit))
        for k, v in zip(self.start_s, (t1 - t0, t2 - t1, t3 - t2, time.perf_counter() - t3)):
            self.start_s[k] += v

    @property
    def snapshot_rebuilds(self) -> int:
        """Whole-model copies of the weight snapshot over the run (the first refit's, and one after each memory
        bank refill): :attr:`~mapl_ray.model.snapshot.WeightSnapshot.rebuilds`."""
        return self._snapshot.rebuilds

    @property
    def snapshot_rebuild_s(self) -> float:
        """Host seconds of those copies, part of ``start_s["snapshot"]``."""
        return self._snapshot.rebuild_s

    def fit_due(self, step: int) -> bool:
        """A pending refit takes over at this step: :func:`fit_overlap` steps after it."""
        if self.pending is None:
            return False
        return step >= self.pending[0] + fit_overlap(self.cfg.pseudo)

    def finish_fit(self) -> tuple[int, dict[str, Any]]:
        """Wait for the pending refit and put it in force: the ensemble that labels batches and the pool
        labels of its step. Returns ``(its step, the label counts and quality)``.

        Raises:
            RuntimeError: no refit is pending; the fit's own error (e.g. ValueError) when it failed.
        """
        if self.pending is None:
            raise RuntimeError("no refit is pending")
        step, streamed, future = self.pending
        self.pending = None
        ensemble, raw, scores, veto, cut, thread_s = future.result()
        for k, v in zip(self.thread_s, thread_s):
            self.thread_s[k] += v
        if veto is not None:  # pseudo.normal_gate: no normal vote for a vetoed image
            raw[veto & (raw == 0)] = -1
        self.use_ensemble(ensemble, step)
        d, p = self.bm.data, self.cfg.pseudo
        if streamed or not d.pool_size:
            return step, label_quality(raw, None)
        labels = np.where(raw == -1, self.history[max(self.history)], raw).astype(np.int8)
        if veto is not None:  # nor a normal label kept from an earlier refit
            labels[veto & (labels == 0)] = -1
        self.history = {s: v for s, v in self.history.items() if s == -1 or s >= step - p.label_lag - p.refit_every}
        self.history[step] = labels
        self.pool_scores = None if scores is None else np.asarray(scores, dtype=np.float64)
        stats = {
            "refit_step": step,
            "refit_unknown": int((raw == -1).sum()),
            **({"gate_vetoed": int(veto.sum()), "gate_cut": cut} if veto is not None else {}),
            **label_quality(labels, d.unlabeled_truth, d.pool_canaries, scores),
        }
        return step, stats

    def use_ensemble(self, ensemble: OCCEnsemble, step: int) -> None:
        """Put ``ensemble`` (fitted at ``step``) in force: its parameters are copied into
        :attr:`device_params` in place when their shapes are those already there (the tensors a captured
        CUDA graph of the training step reads: the graph stays valid), else into new tensors
        (``params_generation`` + 1: a captured step must be recaptured, :attr:`graph_key`)."""
        self.ensemble, self.fitted_step = ensemble, step
        new = ensemble.torch_params(self.device)
        old = self.device_params
        flat = lambda p: [t for occ in p[0] for t in occ.values()] + [p[1], p[2]]  # noqa: E731
        if old is not None and [(t.shape, t.dtype) for t in flat(old)] == [(t.shape, t.dtype) for t in flat(new)]:
            with torch.no_grad():
                for dst, src in zip(flat(old), flat(new)):
                    dst.copy_(src)
        else:
            self.device_params = tuple(
                ([{k: v.clone() for k, v in occ.items()} for occ in new[0]], new[1].clone(), new[2].clone())
            )
            self.params_generation += 1

    @property
    def graph_key(self) -> int:
        """What a CUDA graph of a step that calls :meth:`predict` bakes in: which device tensors hold the
        ensemble (0: no ensemble yet, the step's labels are constant). A refit with same-shaped parameters
        keeps the key: its values are copied into the same tensors."""
        return self.params_generation

    def predict(self, out: dict[str, torch.Tensor]) -> torch.Tensor:
        """Pseudo-labels int64 ``(B,)`` (1 / 0 / -1) of a batch from its forward output, on its device
        (no host sync); all -1 before the first fit. Reads the ensemble from :attr:`device_params`."""
        n = out["q"].shape[0]
        if self.device_params is None or self.kind == "knn":  # knn: no per-batch features
            return torch.full((n,), -1, dtype=torch.long, device=out["q"].device)
        feats = features_from_output(out, self.kind).detach()
        return self.ensemble.predict_torch(feats, self.device_params)

    def state_arrays(self) -> dict[str, np.ndarray]:
        """The pool labels still needed to resume (``pool_labels@STEP``), for the checkpoint."""
        return {f"pool_labels@{s}": v for s, v in self.history.items()}

    def load_state_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        """Restore :meth:`state_arrays` (keys of other arrays are ignored)."""
        saved = {
            int(k.split("@")[1]): np.asarray(v, np.int8) for k, v in arrays.items() if k.startswith("pool_labels@")
        }
        if saved:
            self.history = saved
