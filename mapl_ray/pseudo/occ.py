"""Ensemble of Gaussian-mixture one-class classifiers with consensus pseudo-labels.

Follows MAPL (Chen & Kang, arXiv 2405.06198, eqs. 3-6), which adopts the
pseudo-labeler of SPADE (Yoon et al., TMLR 2023):

* K one-class classifiers (OCCs). OCC ``k`` is fitted on the labeled normals
  plus the ``k``-th of K disjoint subsets of the unlabeled data, so each OCC
  sees a different slice of the (possibly contaminated) unlabeled set.
* An OCC's anomaly score is the negative log-likelihood under its
  :class:`sklearn.mixture.GaussianMixture` (higher = more anomalous).
* Per OCC, thresholds ``eta_p[k]`` / ``eta_n[k]`` come from partial matching
  (:func:`mapl_ray.pseudo.matching.partial_matching_threshold`, eqs. 3-4).
* Consensus vote (eqs. 5-6): pseudo-label 1 if *every* OCC scores a sample
  above its ``eta_p``, 0 if every OCC scores it below its ``eta_n``, else -1.

Features are standardised and PCA-projected per OCC (fitted on that OCC's
training data) before the GMM, which keeps the covariance estimates
well-conditioned for high-dimensional pooled encoder features.

Scoring after ``fit`` does not call scikit-learn: it evaluates the stored
parameters with numpy (same formula as scikit-learn's
``GaussianMixture.score_samples``), so an ensemble restored by
:meth:`OCCEnsemble.from_state` from plain arrays scores bit-identically;
:meth:`OCCEnsemble.predict_torch` evaluates the same formula on torch tensors.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch
from scipy.special import logsumexp
from sklearn.decomposition import PCA
from sklearn.mixture import GaussianMixture
from threadpoolctl import ThreadpoolController

from mapl_ray.config import PseudoConfig
from mapl_ray.pseudo.matching import partial_matching_threshold, quantile_levels

__all__ = [
    "OCCConfig",
    "OCCEnsemble",
    "fit_one_occ",
    "gmm_log_likelihood",
    "order_thresholds",
    "sequential_map",
]

_COVARIANCE_TYPES = ("full", "tied", "diag", "spherical")
_DEFAULTS = PseudoConfig()
_STATE_FORMAT = "mapl_ray.pseudo.OCCEnsemble"
_STATE_VERSION = 1
# Per-OCC arrays in the state dict; the PCA ones are absent when PCA is off.
_OCC_KEYS = (
    "scaler_mean",
    "scaler_scale",
    "gmm_weights",
    "gmm_means",
    "gmm_covariances",
    "gmm_precisions_cholesky",
)
_PCA_KEYS = ("pca_components", "pca_mean")
_GLOBAL_KEYS = ("eta_p", "eta_n", "match_distance_p", "match_distance_n", "threshold_swapped")


#: an ensemble's parameters on a device: per-OCC tensor dicts, eta_p ``(K, 1)``, eta_n ``(K, 1)``
TorchOCCParams = tuple[list[dict[str, torch.Tensor]], torch.Tensor, torch.Tensor]


@dataclass
class OCCConfig:
    """Settings of :class:`OCCEnsemble`. The defaults are the run configuration's
    (:class:`mapl_ray.config.PseudoConfig`, the one place they are set); the training loop builds this
    with :meth:`from_config`.

    Attributes:
        num_occs: K, number of one-class classifiers (>= 1).
        n_components: Gaussian components per GMM (>= 1).
        covariance_type: one of ``"full" | "tied" | "diag" | "spherical"``
            (scikit-learn semantics).
        reg_covar: added to covariance diagonals (scikit-learn ``reg_covar``), > 0. Features are
            standardised to unit variance, so 1e-3 is a 0.1 % variance floor: negligible for real
            directions but it stops near-degenerate directions from producing exploding scores.
        pca_dim: PCA target dimensionality, or ``None`` to skip PCA. The effective value is
            ``min(pca_dim, D, n_train - 1)`` (at most ``n_train - 1`` directions have non-zero
            variance on ``n_train`` samples); pooled encoder features have hundreds of dimensions
            against a few hundred training images, which would make a GMM fit ill-posed.
        num_quantiles: number of candidate thresholds per partial matching
            (evenly spaced quantiles; 99 -> 1 %..99 %), >= 1.
        min_fraction: minimum share of the unlabeled set on the matched side of a
            candidate threshold, in [0, 1) (at least 2 samples always).
        seed: seeds the unlabeled split and the GMM initialisations.

    Raises:
        ValueError: (on construction) naming the field with an invalid value.
    """

    num_occs: int = _DEFAULTS.num_occs
    n_components: int = _DEFAULTS.n_components
    covariance_type: str = _DEFAULTS.covariance_type
    reg_covar: float = _DEFAULTS.reg_covar
    pca_dim: int | None = _DEFAULTS.pca_dim
    num_quantiles: int = _DEFAULTS.num_quantiles
    min_fraction: float = _DEFAULTS.min_fraction
    seed: int = 0

    @classmethod
    def from_config(cls, pseudo: PseudoConfig, seed: int) -> OCCConfig:
        """The ensemble settings of a run's ``pseudo`` section, seeded with ``seed`` (``train.seed``)."""
        return cls(**{f.name: getattr(pseudo, f.name) for f in fields(cls) if f.name != "seed"}, seed=seed)

    def __post_init__(self) -> None:
        # Coerce numpy scalars etc. to builtins so state_dict's meta is JSON-able.
        self.num_occs = int(self.num_occs)
        self.n_components = int(self.n_components)
        self.covariance_type = str(self.covariance_type)
        self.reg_covar = float(self.reg_covar)
        self.pca_dim = None if self.pca_dim is None else int(self.pca_dim)
        self.num_quantiles = int(self.num_quantiles)
        self.min_fraction = float(self.min_fraction)
        self.seed = int(self.seed)
        if int(self.num_occs) < 1:
            raise ValueError(f"num_occs: expected an int >= 1, got {self.num_occs}")
        if int(self.n_components) < 1:
            raise ValueError(f"n_components: expected an int >= 1, got {self.n_components}")
        if self.covariance_type not in _COVARIANCE_TYPES:
            raise ValueError(f"covariance_type: expected one of {_COVARIANCE_TYPES}, got {self.covariance_type!r}")
        if not (float(self.reg_covar) > 0.0 and math.isfinite(float(self.reg_covar))):
            raise ValueError(f"reg_covar: expected a finite float > 0, got {self.reg_covar}")
        if self.pca_dim is not None and int(self.pca_dim) < 1:
            raise ValueError(f"pca_dim: expected None or an int >= 1, got {self.pca_dim}")
        quantile_levels(int(self.num_quantiles))  # raises if < 1
        if not (0.0 <= float(self.min_fraction) < 1.0):
            raise ValueError(f"min_fraction: expected a value in [0, 1), got {self.min_fraction}")


def gmm_log_likelihood(x, weights, means, precisions_cholesky, covariance_type: str):
    """Per-sample log-likelihood of a Gaussian mixture from its fitted parameters.

    Same quantity as scikit-learn's ``GaussianMixture.score_samples`` (parameter
    layout of its ``weights_``, ``means_``, ``precisions_cholesky_``), computed
    in the direct ``||(x - mu) L||^2`` form rather than scikit-learn's expanded
    one for ``diag``/``spherical`` (no cancellation error far from the mean).
    One formula for numpy and torch: with torch tensors (all arguments on the
    device of ``x``) it runs where the features are, e.g. in the training step
    without a device-to-host copy.

    Args:
        x: float ``(n, D)``: a numpy array, or a torch tensor.
        weights: ``(C,)`` mixture weights.
        means: ``(C, D)`` component means.
        precisions_cholesky: Cholesky factors of the precisions; ``(C, D, D)``
            for ``"full"``, ``(D, D)`` for ``"tied"``, ``(C, D)`` for ``"diag"``,
            ``(C,)`` for ``"spherical"``.
        covariance_type: ``"full" | "tied" | "diag" | "spherical"``.

    Returns:
        ``(n,)`` ``log p(x)``: float64 numpy for numpy input; a tensor of
        ``x``'s dtype and device for torch input.

    Raises:
        ValueError: if ``covariance_type`` is unknown.
    """
    if isinstance(x, torch.Tensor):
        xp, pc = torch, precisions_cholesky
    else:
        xp = np
        x, means, weights = (np.asarray(a, dtype=np.float64) for a in (x, means, weights))
        pc = np.asarray(precisions_cholesky, dtype=np.float64)
    n_features = x.shape[1]
    diff = x[:, None, :] - means[None, :, :]  # (n, C, D)
    if covariance_type == "full":
        y = xp.einsum("ncd,cde->nce", diff, pc)
        log_det = xp.log(pc.diagonal(0, 1, 2)).sum(1)
    elif covariance_type == "tied":
        y = diff @ pc
        log_det = xp.log(pc.diagonal()).sum()  # the same for every component (broadcast below)
    elif covariance_type == "diag":
        y = diff * pc[None, :, :]
        log_det = xp.log(pc).sum(1)
    elif covariance_type == "spherical":
        y = diff * pc[None, :, None]
        log_det = n_features * xp.log(pc)
    else:
        raise ValueError(f"covariance_type: expected one of {_COVARIANCE_TYPES}, got {covariance_type!r}")
    log_gauss = -0.5 * (n_features * math.log(2.0 * math.pi) + (y * y).sum(2)) + log_det
    log_joint = log_gauss + xp.log(weights)[None, :]
    return torch.logsumexp(log_joint, dim=1) if xp is torch else logsumexp(log_joint, axis=1)


def _check_features(x: Any, name: str, n_features: int | None, min_rows: int) -> np.ndarray:
    """Validate a feature matrix and return it as float64 ``(n, D)``."""
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D feature array (n, D), got shape {arr.shape}")
    if n_features is not None and arr.shape[1] != n_features:
        raise ValueError(f"{name}: expected {n_features} features per row (as in normal/fit), got {arr.shape[1]}")
    if arr.shape[0] < min_rows:
        raise ValueError(f"{name}: expected at least {min_rows} samples, got {arr.shape[0]}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name}: features must be finite (found NaN or inf)")
    return arr


def _canonical(a: np.ndarray) -> np.ndarray:
    # Fitted and restored parameters must share dtype *and* memory layout:
    # BLAS may round differently for C- vs Fortran-ordered operands, which
    # would break bit-identical scores after a state round trip.
    return np.array(a, dtype=np.float64, order="C", copy=True)


def order_thresholds(eta_p: float, eta_n: float) -> tuple[float, float, bool]:
    """Make ``eta_n <= eta_p`` by swapping crossed thresholds.

    If partial matching gives ``eta_n > eta_p``, scores in ``[eta_p, eta_n]``
    would be claimed by both matchings (positive: above ``eta_p``; negative:
    below ``eta_n``). Swapping labels a sample only where the two matchings
    agree -- below ``min`` is "not positive" *and* "negative", above ``max``
    is "positive" *and* "not negative" -- and leaves the contested band
    unknown (-1). This is the conservative resolution: it never assigns a label
    that one of the two matchings contradicts, unlike a midpoint split.

    Returns:
        ``(eta_p, eta_n, swapped)`` with ``eta_n <= eta_p``.
    """
    if eta_n > eta_p:
        return float(eta_n), float(eta_p), True
    return float(eta_p), float(eta_n), False


MapFn = Callable[[Callable[..., Any], Sequence[tuple]], Iterable[Any]]


@functools.cache
def _blas() -> ThreadpoolController:
    """The process's thread pools (found once: finding them costs tens of milliseconds)."""
    return ThreadpoolController()


def sequential_map(fn: Callable[..., Any], items: Sequence[tuple]) -> list[Any]:
    """``[fn(*item) for item in items]``: the default ``map_fn`` of :meth:`OCCEnsemble.fit`, in this process."""
    return [fn(*item) for item in items]


def fit_gmm_occ(train: np.ndarray, config: OCCConfig, seed: int) -> dict[str, np.ndarray]:
    """One OCC: standardisation, PCA (``config.pca_dim``) and a scikit-learn ``GaussianMixture`` fitted
    on ``train`` float64 ``(n, D)``; returns its parameters as float64 C-ordered arrays (``_OCC_KEYS``
    and, with PCA, ``_PCA_KEYS``)."""
    mean = train.mean(axis=0)
    scale = train.std(axis=0)
    scale[scale < 1e-12] = 1.0  # constant feature: leave centred, don't divide by 0
    z = (train - mean) / scale
    occ: dict[str, np.ndarray] = {"scaler_mean": mean, "scaler_scale": scale}
    if config.pca_dim is not None:
        dim = max(1, min(int(config.pca_dim), z.shape[1], z.shape[0] - 1))
        pca = PCA(n_components=dim, svd_solver="full").fit(z)
        occ["pca_components"] = pca.components_
        occ["pca_mean"] = pca.mean_
        z = (z - occ["pca_mean"]) @ occ["pca_components"].T
    gmm = GaussianMixture(
        n_components=int(config.n_components),
        covariance_type=config.covariance_type,
        reg_covar=float(config.reg_covar),
        random_state=int(seed),
    ).fit(z)
    occ["gmm_weights"] = gmm.weights_
    occ["gmm_means"] = gmm.means_
    occ["gmm_covariances"] = gmm.covariances_
    occ["gmm_precisions_cholesky"] = gmm.precisions_cholesky_
    return {k: _canonical(v) for k, v in occ.items()}


def score_one_occ(occ: dict[str, Any], x, covariance_type: str):
    """Negative log-likelihood ``(n,)`` of ``x`` ``(n, D)`` under one OCC's parameters (numpy, or torch
    tensors on one device)."""
    z = (x - occ["scaler_mean"]) / occ["scaler_scale"]
    if "pca_components" in occ:
        z = (z - occ["pca_mean"]) @ occ["pca_components"].T
    return -gmm_log_likelihood(z, occ["gmm_weights"], occ["gmm_means"], occ["gmm_precisions_cholesky"], covariance_type)


def fit_one_occ(
    train: np.ndarray,
    unlabeled: np.ndarray,
    positives: np.ndarray,
    negatives: np.ndarray,
    config: OCCConfig,
    seed: int,
) -> tuple[dict[str, np.ndarray], tuple[float, float, float, float, bool]]:
    """Fit one OCC on ``train`` and match its thresholds (MAPL eqs. 3-4): the unit of work that
    :meth:`OCCEnsemble.fit` maps over its K OCCs (a plain function of arrays: it runs in a Ray task).

    Args:
        train: float64 ``(n, D)``, the labeled normals plus this OCC's subset of the unlabeled data.
        unlabeled, positives, negatives: float64 ``(M, D)``, ``(P, D)``, ``(Q, D)``: scores matched.
        config: the ensemble's settings; seed: this OCC's GMM seed.

    Returns:
        ``(parameters, (eta_p, eta_n, match_distance_p, match_distance_n, threshold_swapped))``.
    """
    # one thread (BLAS, and OpenMP for this thread): the same rounding in every process (a Ray task of one
    # CPU runs with one), so any map_fn gives the same ensemble; for matrices this small, also faster
    with _blas().limit(limits=1):
        occ = fit_gmm_occ(train, config, seed)
        cov = config.covariance_type
        s_u = score_one_occ(occ, unlabeled, cov)
        s_p, s_n = score_one_occ(occ, positives, cov), score_one_occ(occ, negatives, cov)
    t_p, d_p = partial_matching_threshold(s_u, s_p, "above", config.num_quantiles, config.min_fraction)
    t_n, d_n = partial_matching_threshold(s_u, s_n, "below", config.num_quantiles, config.min_fraction)
    t_p, t_n, sw = order_thresholds(t_p, t_n)
    return occ, (t_p, t_n, float(d_p), float(d_n), sw)


class OCCEnsemble:
    """K Gaussian-mixture OCCs with partial-matching thresholds and consensus voting.

    MAPL eqs. 3-6 / SPADE. Usage::

        ens = OCCEnsemble(OCCConfig(num_occs=2)).fit(normal, unlabeled, positives)
        pseudo = ens.predict(unlabeled)        # int8 (M,) in {1, 0, -1}
        arrays, meta = ens.state_dict()        # numeric arrays + JSON-able meta
        ens2 = OCCEnsemble.from_state(arrays, meta)

    Attributes (after ``fit`` or ``from_state``):
        fitted: bool.
        n_features: D.
        eta_p, eta_n: float64 ``(K,)`` per-OCC thresholds, ``eta_n <= eta_p``.
        match_distance_p, match_distance_n: float64 ``(K,)`` Wasserstein
            distances reached by the positive / negative partial matching
            (``inf`` = no valid candidate); diagnostics only. They stay with
            their matching even when ``threshold_swapped``.
        threshold_swapped: bool ``(K,)``, True where matching gave
            ``eta_n > eta_p`` and :func:`order_thresholds` swapped them.
        subset_indices: list of K int64 arrays, the rows of ``unlabeled`` each
            OCC was trained on (disjoint, covering; ``None`` after ``from_state``).
    """

    def __init__(self, config: OCCConfig | None = None) -> None:
        self.config = config if config is not None else OCCConfig()
        self.fitted = False
        self.n_features: int | None = None
        self.eta_p = np.empty(0)
        self.eta_n = np.empty(0)
        self.match_distance_p = np.empty(0)
        self.match_distance_n = np.empty(0)
        self.threshold_swapped = np.empty(0, dtype=bool)
        self.subset_indices: list[np.ndarray] | None = None
        self._occs: list[dict[str, np.ndarray]] = []
        self._torch_params: dict[Any, tuple] = {}  # (device, dtype) -> (per-OCC tensors, eta_p, eta_n)

    # ------------------------------------------------------------------ fit
    def fit(
        self,
        normal: np.ndarray,
        unlabeled: np.ndarray,
        positives: np.ndarray,
        negatives: np.ndarray | None = None,
        map_fn: MapFn | None = None,
    ) -> OCCEnsemble:
        """Fit the K OCCs and their thresholds (one :func:`fit_one_occ` call per OCC).

        Args:
            normal: float ``(N, D)`` features of labeled normals, N >= 2.
            unlabeled: float ``(M, D)`` features of unlabeled samples, M >= K.
                Split by a permutation seeded with ``config.seed`` into K disjoint
                subsets; OCC k trains on ``normal`` + subset k, but its thresholds
                are matched on its scores over the *whole* unlabeled set.
            positives: float ``(P, D)``, P >= 1, labeled anomalies -- or simulated
                anomalies when none are labeled -- the reference for ``eta_p``.
            negatives: float ``(Q, D)``, Q >= 1, reference for ``eta_n``; defaults
                to ``normal``. (Normals are also OCC training data, so their
                scores are slightly optimistic, which only makes ``eta_n`` more
                conservative.)
            map_fn: runs the K independent OCC fits: ``map_fn(fit_one_occ, items)`` returns
                ``fit_one_occ(*item)`` for each item, in order (default :func:`sequential_map`; the
                pipelines pass Ray tasks, one OCC each). Each fit is seeded, so any ``map_fn`` gives
                the same ensemble.

        Returns:
            ``self``.

        Raises:
            ValueError: naming the argument, if an input is not 2-D, holds NaN/inf,
                has a different D than ``normal``, or has too few rows; or
                ``config.n_components`` exceeds an OCC's training-set size.
        """
        cfg = self.config
        k_occs = int(cfg.num_occs)
        normal = _check_features(normal, "normal", None, 2)
        d = normal.shape[1]
        unlabeled = _check_features(unlabeled, "unlabeled", d, k_occs)
        positives = _check_features(positives, "positives", d, 1)
        negatives = normal if negatives is None else _check_features(negatives, "negatives", d, 1)

        m = unlabeled.shape[0]
        perm = np.random.default_rng(cfg.seed).permutation(m)
        subsets = [np.sort(s) for s in np.array_split(perm, k_occs)]
        smallest_train = normal.shape[0] + min(s.size for s in subsets)
        if int(cfg.n_components) > smallest_train:
            raise ValueError(
                f"config.n_components: expected <= {smallest_train} (smallest OCC training set), got {cfg.n_components}"
            )

        items = [
            (np.concatenate([normal, unlabeled[idx]], axis=0), unlabeled, positives, negatives, cfg, cfg.seed + k)
            for k, idx in enumerate(subsets)
        ]
        fitted = list((map_fn or sequential_map)(fit_one_occ, items))
        occs = [f[0] for f in fitted]
        eta_p, eta_n, dist_p, dist_n, swapped = zip(*(f[1] for f in fitted))

        self._occs = occs
        self.n_features = d
        self.eta_p = np.asarray(eta_p, dtype=np.float64)
        self.eta_n = np.asarray(eta_n, dtype=np.float64)
        self.match_distance_p = np.asarray(dist_p, dtype=np.float64)
        self.match_distance_n = np.asarray(dist_n, dtype=np.float64)
        self.threshold_swapped = np.asarray(swapped, dtype=bool)
        self.subset_indices = subsets
        self.fitted = True
        return self

    def _score_one(self, occ: dict[str, Any], x):
        """Negative log-likelihood of one OCC ``(n,)`` (:func:`score_one_occ`)."""
        return score_one_occ(occ, x, self.config.covariance_type)

    # ------------------------------------------------------------ inference
    def _require_fitted(self) -> None:
        if not self.fitted:
            raise RuntimeError("OCCEnsemble is not fitted: call fit(...) or OCCEnsemble.from_state(...)")

    def scores(self, x: np.ndarray) -> np.ndarray:
        """Anomaly scores of every OCC: negative GMM log-likelihood (higher = more anomalous).

        Args:
            x: float ``(n, D)`` features (n may be 0).

        Returns:
            float64 ``(K, n)``.

        Raises:
            RuntimeError: if not fitted.
            ValueError: naming ``x``, if not 2-D, wrong D, or NaN/inf.
        """
        self._require_fitted()
        x = _check_features(x, "x", self.n_features, 0)
        return np.stack([self._score_one(occ, x) for occ in self._occs], axis=0)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Consensus pseudo-labels (MAPL eqs. 5-6).

        1 where every OCC k has ``score_k > eta_p[k]``; 0 where every OCC has
        ``score_k < eta_n[k]``; -1 (unknown) otherwise. Because
        ``eta_n <= eta_p`` per OCC, the two cases are mutually exclusive.

        Args:
            x: float ``(n, D)`` features.

        Returns:
            int8 ``(n,)`` in {1, 0, -1}.

        Raises:
            RuntimeError: if not fitted.
            ValueError: naming ``x``, as in :meth:`scores`.
        """
        return self.vote(self.scores(x))

    def vote(self, scores: np.ndarray) -> np.ndarray:
        """:meth:`predict` from :meth:`scores`' float ``(K, n)`` (a caller that needs both scores once):
        int8 ``(n,)`` in {1, 0, -1}."""
        return self._vote(scores, self.eta_p[:, None], self.eta_n[:, None]).astype(np.int8)

    @staticmethod
    def _vote(s, eta_p, eta_n):
        """Consensus of scores ``(K, n)`` (numpy or torch) against per-OCC thresholds ``(K, 1)``: 1 / 0 / -1."""
        xp = torch if isinstance(s, torch.Tensor) else np
        positive = (s > eta_p).all(0)
        negative = (s < eta_n).all(0)
        return xp.where(positive, 1, xp.where(negative, 0, -1))

    def torch_params(self, device: torch.device | str) -> TorchOCCParams:
        """The fitted parameters as tensors on ``device`` (copied once per device, then cached): per-OCC
        dicts of :data:`_OCC_KEYS` (and :data:`_PCA_KEYS`) tensors, ``eta_p`` and ``eta_n`` ``(K, 1)``.
        float64 where the device supports it (as the numpy path), float32 on MPS.

        Raises:
            RuntimeError: if not fitted.
        """
        self._require_fitted()
        device = torch.device(device)
        dtype = torch.float32 if device.type == "mps" else torch.float64
        key = (device, dtype)
        if key not in self._torch_params:
            as_t = lambda a: torch.as_tensor(a, dtype=dtype, device=device)  # noqa: E731
            self._torch_params[key] = (
                [{k: as_t(v) for k, v in occ.items()} for occ in self._occs],
                as_t(self.eta_p)[:, None],
                as_t(self.eta_n)[:, None],
            )
        return self._torch_params[key]

    def predict_torch(self, x: torch.Tensor, params: TorchOCCParams | None = None) -> torch.Tensor:
        """:meth:`predict` on a torch tensor ``(n, D)`` (any device), without leaving that device.

        No validation and no host sync, for the training step. ``params``: tensors laid out as
        :meth:`torch_params` (e.g. fixed device buffers a CUDA graph reads, refilled in place at each
        refit); default: this ensemble's own. Returns int64 ``(n,)`` in {1, 0, -1} on ``x.device``.

        Raises:
            RuntimeError: if not fitted.
        """
        occs, eta_p, eta_n = params if params is not None else self.torch_params(x.device)
        x = x.to(eta_p.dtype)
        cov = self.config.covariance_type
        return self._vote(torch.stack([score_one_occ(occ, x, cov) for occ in occs]), eta_p, eta_n).long()

    # ---------------------------------------------------------- persistence
    def state_dict(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Export the fitted ensemble as plain numeric arrays plus JSON-able metadata.

        No pickle is needed: ``arrays`` can go to ``safetensors.numpy.save_file``
        or ``np.savez``, ``meta`` to ``json.dumps`` (or safetensors' ``metadata``
        after ``json.dumps``).

        Returns:
            ``(arrays, meta)``. ``arrays`` holds contiguous, >= 1-D arrays:
            ``eta_p``, ``eta_n``, ``match_distance_p``, ``match_distance_n``
            (float64 ``(K,)``), ``threshold_swapped`` (bool ``(K,)``), and for each
            OCC k: ``occ{k}.scaler_mean``, ``occ{k}.scaler_scale`` ``(D,)``,
            ``occ{k}.pca_components`` ``(d, D)`` and ``occ{k}.pca_mean`` ``(D,)``
            (only when PCA is on), ``occ{k}.gmm_weights``, ``occ{k}.gmm_means``,
            ``occ{k}.gmm_covariances``, ``occ{k}.gmm_precisions_cholesky``
            (scikit-learn layouts). ``meta`` = ``{"format", "version", "config"
            (OCCConfig as dict), "n_features", "num_occs"}``.

        Raises:
            RuntimeError: if not fitted.
        """
        self._require_fitted()
        arrays: dict[str, np.ndarray] = {
            "eta_p": self.eta_p,
            "eta_n": self.eta_n,
            "match_distance_p": self.match_distance_p,
            "match_distance_n": self.match_distance_n,
            "threshold_swapped": self.threshold_swapped,
        }
        for k, occ in enumerate(self._occs):
            for key, value in occ.items():
                arrays[f"occ{k}.{key}"] = value
        arrays = {k: np.ascontiguousarray(np.atleast_1d(v)).copy() for k, v in arrays.items()}
        meta = {
            "format": _STATE_FORMAT,
            "version": _STATE_VERSION,
            "config": asdict(self.config),
            "n_features": int(self.n_features),
            "num_occs": len(self._occs),
        }
        json.dumps(meta)  # fail here, not at save time, if something isn't JSON-able
        return arrays, meta

    @classmethod
    def from_state(cls, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> OCCEnsemble:
        """Rebuild an ensemble from :meth:`state_dict` output.

        The restored ensemble's :meth:`scores` / :meth:`predict` are identical
        (bit for bit) to the original's, because both evaluate the same stored
        float64 parameters with :func:`gmm_log_likelihood`.

        Args:
            arrays: mapping name -> array (e.g. from ``safetensors.numpy.load_file``
                or ``dict(np.load(path))``).
            meta: the metadata dict (e.g. ``json.loads`` of the saved string).

        Returns:
            A fitted :class:`OCCEnsemble` (``subset_indices`` is ``None``).

        Raises:
            ValueError: naming ``meta`` if its format/version is not recognised,
                or ``arrays`` if a required key is missing or has a wrong shape.
        """
        if meta.get("format") != _STATE_FORMAT or meta.get("version") != _STATE_VERSION:
            raise ValueError(
                f"meta: expected format={_STATE_FORMAT!r} version={_STATE_VERSION}, "
                f"got format={meta.get('format')!r} version={meta.get('version')!r}"
            )
        known = {f.name for f in fields(OCCConfig)}
        config = OCCConfig(**{k: v for k, v in meta["config"].items() if k in known})
        k_occs = int(meta["num_occs"])
        d = int(meta["n_features"])

        def get(key: str) -> np.ndarray:
            if key not in arrays:
                raise ValueError(f"arrays: missing required key {key!r}")
            return np.asarray(arrays[key])

        ens = cls(config)
        for key in _GLOBAL_KEYS:
            if get(key).shape != (k_occs,):
                raise ValueError(f"arrays: {key!r} should have shape ({k_occs},), got {get(key).shape}")
        ens.eta_p = get("eta_p").astype(np.float64)
        ens.eta_n = get("eta_n").astype(np.float64)
        ens.match_distance_p = get("match_distance_p").astype(np.float64)
        ens.match_distance_n = get("match_distance_n").astype(np.float64)
        ens.threshold_swapped = get("threshold_swapped").astype(bool)
        occs = []
        for k in range(k_occs):
            occ = {key: get(f"occ{k}.{key}") for key in _OCC_KEYS}
            if config.pca_dim is not None:
                occ.update({key: get(f"occ{k}.{key}") for key in _PCA_KEYS})
            occ = {key: _canonical(value) for key, value in occ.items()}
            if occ["scaler_mean"].shape != (d,):
                raise ValueError(
                    f"arrays: 'occ{k}.scaler_mean' should have shape ({d},), got {occ['scaler_mean'].shape}"
                )
            occs.append(occ)
        ens._occs = occs
        ens.n_features = d
        ens.fitted = True
        return ens
