"""SPADE-style pseudo-labeling for MAPL (Chen & Kang, arXiv 2405.06198, eqs. 3-6).

* :func:`partial_matching_threshold` -- threshold selection by partial matching.
* :class:`OCCEnsemble` / :class:`OCCConfig` -- GMM one-class classifiers with
  consensus pseudo-labels in {1, 0, -1}; pickle-free state round trip.
* :class:`PseudoLabeler` -- the ensemble's refit schedule inside training.

The BCE terms that train on the pseudo-labels are in :mod:`mapl_ray.model.losses`.
"""

from mapl_ray.pseudo.matching import partial_matching_threshold, quantile_levels
from mapl_ray.pseudo.occ import OCCConfig, OCCEnsemble, gmm_log_likelihood, order_thresholds

__all__ = [
    "OCCConfig",
    "OCCEnsemble",
    "gmm_log_likelihood",
    "order_thresholds",
    "partial_matching_threshold",
    "quantile_levels",
]
