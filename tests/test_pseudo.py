"""Tests for mapl_ray.pseudo: partial matching, GMM OCC ensemble, pseudo-label losses."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.mixture import GaussianMixture

from mapl_ray.model.losses import masked_bce
from mapl_ray.pseudo import (
    OCCConfig,
    OCCEnsemble,
    gmm_log_likelihood,
    order_thresholds,
    partial_matching_threshold,
    quantile_levels,
)

D = 16


# ---------------------------------------------------------------- helpers
@pytest.fixture(autouse=True, scope="module")
def _single_torch_thread():
    # Tiny tensors only: extra intra-op threads just contend for the shared CPUs.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _anomalies(rng: np.random.Generator, n: int, radius: float = 8.0) -> np.ndarray:
    """N(0, I) shifted by `radius` in a random direction per sample (defects differ)."""
    direction = rng.normal(size=(n, D))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    return rng.normal(size=(n, D)) + radius * direction


@pytest.fixture(scope="module")
def synthetic():
    rng = np.random.default_rng(0)
    normal = rng.normal(size=(300, D)).astype(np.float32)
    unlabeled = np.concatenate([rng.normal(size=(450, D)), _anomalies(rng, 50)]).astype(np.float32)
    truth = np.r_[np.zeros(450, dtype=int), np.ones(50, dtype=int)]
    positives = _anomalies(rng, 30).astype(np.float32)
    return normal, unlabeled, truth, positives


@pytest.fixture(scope="module")
def fitted(synthetic):
    normal, unlabeled, _, positives = synthetic
    return OCCEnsemble(OCCConfig(seed=0)).fit(normal, unlabeled, positives)


def _mixture_1d(seed: int):
    """800 x N(0,1) + 200 x N(6,1) unlabeled; positives ~ N(6,1); negatives ~ N(0,1)."""
    rng = np.random.default_rng(seed)
    unlabeled = np.concatenate([rng.normal(0, 1, 800), rng.normal(6, 1, 200)])
    return unlabeled, rng.normal(6, 1, 100), rng.normal(0, 1, 300)


@pytest.fixture(scope="module")
def mixture_1d():
    return _mixture_1d(0)


# -------------------------------------------------------- partial matching
def test_partial_matching_above_finds_gap(mixture_1d):
    unlabeled, positives, _ = mixture_1d
    t, dist = partial_matching_threshold(unlabeled, positives, "above")
    assert 2.5 <= t <= 4.5
    assert dist < 0.3


def test_partial_matching_below_finds_gap(mixture_1d):
    unlabeled, _, negatives = mixture_1d
    t, dist = partial_matching_threshold(unlabeled, negatives, "below")
    assert 2.5 <= t <= 4.5
    assert dist < 0.3


@pytest.mark.parametrize("seed", range(1, 6))
def test_partial_matching_error_within_grid_resolution(seed):
    # The modes' gap sits at the 80 % quantile, between two 1 %-apart candidates
    # (10 samples each), so sampling noise in the reference may move the cut by
    # one candidate: bound the wrong-side count by 1.5 grid steps, not the value.
    unlabeled, positives, negatives = _mixture_1d(seed)
    is_anom = np.arange(1000) >= 800
    t_p, d_p = partial_matching_threshold(unlabeled, positives, "above")
    t_n, d_n = partial_matching_threshold(unlabeled, negatives, "below")
    assert d_p < 0.3 and d_n < 0.3
    for t in (t_p, t_n):
        wrong = np.sum((unlabeled > t) != is_anom)
        assert wrong <= 15, (t, wrong)


def test_partial_matching_explicit_quantiles_and_min_fraction(mixture_1d):
    unlabeled, positives, _ = mixture_1d
    levels = np.array([0.5, 0.8, 0.95])
    t, _ = partial_matching_threshold(unlabeled, positives, "above", quantiles=levels)
    assert t == pytest.approx(np.quantile(unlabeled, 0.8))
    # Requiring half the unlabeled set above t forbids any cut above the median.
    t_half, _ = partial_matching_threshold(unlabeled, positives, "above", min_fraction=0.5)
    assert t_half <= np.median(unlabeled)


def test_partial_matching_degenerate_returns_conservative():
    u = np.full(50, 3.0)
    t, dist = partial_matching_threshold(u, np.array([5.0]), "above")
    assert t == 3.0 and dist == float("inf")  # nothing is strictly above 3.0
    t, dist = partial_matching_threshold(u, np.array([1.0]), "below")
    assert t == 3.0 and dist == float("inf")


def _matching_one_candidate_at_a_time(u, ref, side, quantiles=99, min_fraction=0.05):
    """Partial matching as the definition reads: scipy's Wasserstein distance for each candidate cut."""
    import math

    from scipy.stats import wasserstein_distance

    u_sorted = np.sort(u)
    min_count = max(2, math.ceil(min_fraction * u.size))
    cuts = np.unique(np.quantile(u_sorted, quantile_levels(quantiles)))
    best_t, best_d = float(u_sorted[-1] if side == "above" else u_sorted[0]), math.inf
    for t in cuts[::-1] if side == "above" else cuts:  # the most conservative first: ties go to it
        i = np.searchsorted(u_sorted, t, side="right" if side == "above" else "left")
        part = u_sorted[i:] if side == "above" else u_sorted[:i]
        if part.size >= min_count and (d := wasserstein_distance(part, ref)) < best_d:
            best_t, best_d = float(t), d
    return best_t, best_d


@pytest.mark.parametrize("side", ["above", "below"])
def test_partial_matching_equals_scipy_candidate_by_candidate(side):
    rng = np.random.default_rng(3)
    for case in range(60):
        m = [10_000, 3, 2][case] if case < 3 else int(rng.integers(4, 500))
        u = rng.normal(size=m)
        if case % 3 == 0:
            u = np.round(u, 1)  # many exactly tied scores and equal distances
        ref = rng.normal(rng.normal(), rng.uniform(0.2, 2), size=int(rng.integers(1, 90)))
        t, d = partial_matching_threshold(u, ref, side)
        t_ref, d_ref = _matching_one_candidate_at_a_time(u, ref, side)
        assert t == t_ref, (case, m)
        assert d == pytest.approx(d_ref, rel=1e-12) if np.isfinite(d_ref) else d == d_ref


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(unlabeled_scores=np.array([])), "unlabeled_scores"),
        (dict(reference_scores=np.array([])), "reference_scores"),
        (dict(unlabeled_scores=np.array([1.0, np.nan, 2.0])), "unlabeled_scores"),
        (dict(reference_scores=np.array([np.inf])), "reference_scores"),
        (dict(unlabeled_scores=np.ones((3, 2))), "unlabeled_scores"),
        (dict(side="left"), "side"),
        (dict(min_fraction=1.0), "min_fraction"),
        (dict(quantiles=0), "quantiles"),
        (dict(quantiles=np.array([0.0, 0.5])), "quantiles"),
    ],
)
def test_partial_matching_errors_name_argument(kwargs, name):
    args = dict(unlabeled_scores=np.arange(10.0), reference_scores=np.arange(3.0), side="above")
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        partial_matching_threshold(**args)


def test_quantile_levels():
    np.testing.assert_allclose(quantile_levels(99), np.arange(1, 100) / 100)
    np.testing.assert_allclose(quantile_levels(1), [0.5])
    np.testing.assert_allclose(quantile_levels([0.9, 0.1, 0.9]), [0.1, 0.9])


def test_order_thresholds():
    assert order_thresholds(5.0, 2.0) == (5.0, 2.0, False)
    assert order_thresholds(2.0, 5.0) == (5.0, 2.0, True)


# ------------------------------------------------------------ GMM scoring
@pytest.mark.parametrize("covariance_type", ["full", "tied", "diag", "spherical"])
def test_gmm_log_likelihood_matches_sklearn(covariance_type):
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(size=(100, 4)), rng.normal(size=(100, 4)) + 4.0])
    gmm = GaussianMixture(2, covariance_type=covariance_type, random_state=0).fit(x)
    ours = gmm_log_likelihood(x, gmm.weights_, gmm.means_, gmm.precisions_cholesky_, covariance_type)
    np.testing.assert_allclose(ours, gmm.score_samples(x), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("covariance_type", ["full", "tied", "diag", "spherical"])
def test_gmm_log_likelihood_on_torch_tensors_matches_sklearn(covariance_type):
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.normal(size=(60, 3)), rng.normal(size=(60, 3)) - 3.0])
    gmm = GaussianMixture(2, covariance_type=covariance_type, random_state=0).fit(x)
    t = lambda a: torch.as_tensor(a, dtype=torch.float64)  # noqa: E731
    ours = gmm_log_likelihood(t(x), t(gmm.weights_), t(gmm.means_), t(gmm.precisions_cholesky_), covariance_type)
    assert isinstance(ours, torch.Tensor) and ours.dtype == torch.float64
    np.testing.assert_allclose(ours.numpy(), gmm.score_samples(x), rtol=1e-9, atol=1e-9)


# ------------------------------------------------------------ OCC ensemble
def test_predict_torch_gives_the_numpy_labels(fitted, synthetic):
    # the training step labels on the device; it must agree with the checked numpy path
    _, unlabeled, _, _ = synthetic
    labels = fitted.predict_torch(torch.as_tensor(unlabeled, dtype=torch.float32))
    assert labels.dtype == torch.int64
    ref = fitted.predict(unlabeled.astype(np.float32))
    assert (labels.numpy() == ref).mean() == 1.0
    assert set(np.unique(ref)) == {-1, 0, 1}  # all three outcomes are exercised


def test_ensemble_pseudo_label_quality(fitted, synthetic):
    _, unlabeled, truth, _ = synthetic
    labels = fitted.predict(unlabeled)
    assert labels.dtype == np.int8 and labels.shape == (len(unlabeled),)
    assert set(np.unique(labels)) <= {-1, 0, 1}
    pos, neg = labels == 1, labels == 0
    assert pos.sum() >= 10  # finds a fair share of the 50 anomalies
    assert truth[pos].mean() > 0.9  # precision of the 1-labels
    assert neg.sum() >= 300
    assert (truth[neg] == 0).mean() > 0.97  # 0-labels are (almost) all normals


def test_ensemble_attributes(fitted):
    k = fitted.config.num_occs
    assert fitted.fitted and fitted.n_features == D
    for arr in (fitted.eta_p, fitted.eta_n, fitted.match_distance_p, fitted.match_distance_n):
        assert arr.shape == (k,)
    assert np.all(fitted.eta_n <= fitted.eta_p)


def test_ensemble_predict_is_consensus_vote(fitted, synthetic):
    _, unlabeled, _, _ = synthetic
    s = fitted.scores(unlabeled)
    assert s.shape == (fitted.config.num_occs, len(unlabeled))
    expected = np.full(len(unlabeled), -1)
    expected[(s < fitted.eta_n[:, None]).all(0)] = 0
    expected[(s > fitted.eta_p[:, None]).all(0)] = 1
    np.testing.assert_array_equal(fitted.predict(unlabeled), expected)


@pytest.mark.parametrize("num_occs", [2, 3])
def test_subsets_disjoint_and_cover(synthetic, num_occs, fitted):
    normal, unlabeled, _, positives = synthetic
    ens = (
        fitted
        if num_occs == fitted.config.num_occs
        else OCCEnsemble(OCCConfig(num_occs=num_occs)).fit(normal, unlabeled, positives)
    )
    subsets = ens.subset_indices
    assert len(subsets) == num_occs
    allidx = np.concatenate(subsets)
    assert len(allidx) == len(unlabeled) == len(np.unique(allidx))
    np.testing.assert_array_equal(np.sort(allidx), np.arange(len(unlabeled)))
    assert min(len(s) for s in subsets) >= len(unlabeled) // num_occs


def test_ensemble_deterministic(synthetic, fitted):
    normal, unlabeled, _, positives = synthetic
    again = OCCEnsemble(OCCConfig(seed=0)).fit(normal, unlabeled, positives)
    np.testing.assert_array_equal(again.scores(unlabeled), fitted.scores(unlabeled))
    np.testing.assert_array_equal(again.eta_p, fitted.eta_p)


def test_scores_empty_batch(fitted):
    assert fitted.scores(np.zeros((0, D))).shape == (fitted.config.num_occs, 0)
    assert fitted.predict(np.zeros((0, D))).shape == (0,)


def _assert_same(a: OCCEnsemble, b: OCCEnsemble, x: np.ndarray) -> None:
    np.testing.assert_array_equal(a.scores(x), b.scores(x))
    np.testing.assert_array_equal(a.predict(x), b.predict(x))
    np.testing.assert_array_equal(a.eta_p, b.eta_p)
    np.testing.assert_array_equal(a.eta_n, b.eta_n)


def test_state_round_trip_npz(fitted, synthetic):
    _, unlabeled, _, _ = synthetic
    arrays, meta = fitted.state_dict()
    for key, value in arrays.items():
        assert isinstance(value, np.ndarray) and value.dtype.kind in "fb", key
        assert value.ndim >= 1 and value.flags.c_contiguous, key
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    buf.seek(0)
    loaded = dict(np.load(buf, allow_pickle=False))
    restored = OCCEnsemble.from_state(loaded, json.loads(json.dumps(meta)))
    _assert_same(fitted, restored, unlabeled)
    assert restored.config == fitted.config


def test_state_round_trip_safetensors(fitted, synthetic, tmp_path):
    st = pytest.importorskip("safetensors.numpy")
    _, unlabeled, _, _ = synthetic
    arrays, meta = fitted.state_dict()
    path = tmp_path / "occ.safetensors"
    st.save_file(arrays, str(path), metadata={"occ_meta": json.dumps(meta)})
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        meta2 = json.loads(f.metadata()["occ_meta"])
    restored = OCCEnsemble.from_state(st.load_file(str(path)), meta2)
    _assert_same(fitted, restored, unlabeled)


@pytest.mark.parametrize(
    "config",
    [OCCConfig(pca_dim=None, covariance_type="full"), OCCConfig(pca_dim=4, n_components=2)],
)
def test_state_round_trip_other_configs(synthetic, config):
    normal, unlabeled, _, positives = synthetic
    ens = OCCEnsemble(config).fit(normal[:100], unlabeled[::4], positives)
    arrays, meta = ens.state_dict()
    assert any("pca" in k for k in arrays) == (config.pca_dim is not None)
    _assert_same(ens, OCCEnsemble.from_state(arrays, meta), unlabeled)


def test_from_state_errors(fitted):
    arrays, meta = fitted.state_dict()
    broken = dict(arrays)
    del broken["occ1.gmm_means"]
    with pytest.raises(ValueError, match="occ1.gmm_means"):
        OCCEnsemble.from_state(broken, meta)
    with pytest.raises(ValueError, match="meta"):
        OCCEnsemble.from_state(arrays, {**meta, "format": "something-else"})


def test_unfitted_raises():
    ens = OCCEnsemble()
    assert not ens.fitted
    with pytest.raises(RuntimeError):
        ens.scores(np.zeros((2, D)))
    with pytest.raises(RuntimeError):
        ens.state_dict()


def test_fit_errors_name_argument(synthetic):
    normal, unlabeled, _, positives = synthetic
    ens = OCCEnsemble(OCCConfig(num_occs=2))
    with pytest.raises(ValueError, match="unlabeled"):
        ens.fit(normal, unlabeled[:, :8], positives)
    with pytest.raises(ValueError, match="positives"):
        ens.fit(normal, unlabeled, positives[:, :8])
    with pytest.raises(ValueError, match="negatives"):
        ens.fit(normal, unlabeled, positives, negatives=normal[:, :8])
    with pytest.raises(ValueError, match="normal"):
        ens.fit(normal[:1], unlabeled, positives)
    with pytest.raises(ValueError, match="normal"):
        ens.fit(normal[0], unlabeled, positives)  # 1-D
    with pytest.raises(ValueError, match="unlabeled"):
        ens.fit(normal, unlabeled[:1], positives)  # fewer than K
    with pytest.raises(ValueError, match="positives"):
        ens.fit(normal, unlabeled, positives[:0])
    bad = unlabeled.copy()
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match="unlabeled"):
        ens.fit(normal, bad, positives)
    with pytest.raises(ValueError, match="n_components"):
        OCCEnsemble(OCCConfig(n_components=50)).fit(normal[:5], unlabeled[:40], positives)


def test_scores_wrong_dim(fitted):
    with pytest.raises(ValueError, match="x"):
        fitted.scores(np.zeros((3, D + 1)))


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(num_occs=0), "num_occs"),
        (dict(n_components=0), "n_components"),
        (dict(covariance_type="banana"), "covariance_type"),
        (dict(reg_covar=0.0), "reg_covar"),
        (dict(pca_dim=0), "pca_dim"),
        (dict(num_quantiles=0), "quantiles"),
        (dict(min_fraction=-0.1), "min_fraction"),
    ],
)
def test_config_validation(kwargs, name):
    with pytest.raises(ValueError, match=name):
        OCCConfig(**kwargs)


# ------------------------------------------------------------------ losses (eqs. 15-17)
def test_masked_bce_on_labeled_images_equals_bce_and_has_gradient():
    logits = torch.tensor([2.0, -1.0, 0.5, -3.0], requires_grad=True)
    targets = torch.tensor([1, 0, 0, 1])
    loss = masked_bce(logits, targets, torch.ones(4, dtype=torch.bool))
    assert loss.ndim == 0
    assert torch.allclose(loss, F.binary_cross_entropy_with_logits(logits, targets.float()))
    loss.backward()
    assert logits.grad is not None and torch.all(logits.grad != 0)


def test_masked_bce_ignores_unknown_pseudo_labels():
    logits = torch.tensor([1.5, -0.5, 3.0, 0.2, -2.0], requires_grad=True)
    pseudo = torch.tensor([1, -1, 0, -1, 0], dtype=torch.int8)
    keep = pseudo != -1
    loss = masked_bce(logits, pseudo, keep)
    expected = F.binary_cross_entropy_with_logits(logits[keep], pseudo[keep].float())
    assert torch.allclose(loss, expected)
    # Changing the logits of unknown samples must not change the loss.
    other = logits.detach().clone()
    other[~keep] = 100.0
    assert torch.allclose(masked_bce(other, pseudo, keep), expected.detach())
    loss.backward()
    assert torch.all(logits.grad[keep] != 0)
    assert torch.all(logits.grad[~keep] == 0)


def test_masked_bce_selecting_nothing_is_graph_attached_zero():
    logits = torch.randn(4, requires_grad=True)
    loss = masked_bce(logits, torch.full((4,), -1), torch.zeros(4, dtype=torch.bool))
    assert loss.item() == 0.0 and loss.grad_fn is not None
    (loss + masked_bce(logits, torch.tensor([1, 0, 1, 0]), torch.ones(4, dtype=torch.bool))).backward()
    assert torch.all(logits.grad != 0)


def test_losses_train_end_to_end_with_ensemble_labels(fitted, synthetic):
    """Pseudo-labels from the ensemble drive a linear image head toward the truth."""
    _, unlabeled, truth, _ = synthetic
    pseudo = torch.from_numpy(fitted.predict(unlabeled).astype(np.int64))
    x = torch.from_numpy(unlabeled).double()
    # The squared norm is what separates the synthetic anomalies; standardise it.
    feats = (x**2).sum(1, keepdim=True)
    feats = (feats - feats.mean()) / feats.std()
    head = torch.nn.Linear(1, 1).double()
    for _ in range(100):  # plain gradient descent (torch.optim's first step is slow to import)
        head.zero_grad()
        masked_bce(head(feats), pseudo, pseudo != -1).backward()
        with torch.no_grad():
            for param in head.parameters():
                param -= 1.0 * param.grad
    pred = (head(feats).detach().reshape(-1) > 0).numpy().astype(int)
    assert (pred == truth).mean() > 0.95
