"""SPADE-style pseudo-labeling for MAPL (Chen & Kang, arXiv 2405.06198, eqs. 3-6).

* :func:`partial_matching_threshold` -- threshold selection by partial matching.
* :class:`OCCEnsemble` / :class:`OCCConfig` -- GMM one-class classifiers with
  consensus pseudo-labels in {1, 0, -1}; pickle-free state round trip.
* :class:`PseudoLabeler` -- the ensemble's refit schedule inside training.

The BCE terms that train on the pseudo-labels are in :mod:`mapl_ray.model.losses`.
"""

from __future__ import annotations

import importlib

# the names load their modules on first use (PEP 562): the model's patch bank imports
# ``pseudo.patch_knn``, and a scoring actor or Serve replica then need not import scipy.stats and
# scikit-learn (about 1.1 s of a fresh process's start on the CI machine)
_HOMES = {
    "OCCConfig": "occ",
    "OCCEnsemble": "occ",
    "gmm_log_likelihood": "occ",
    "order_thresholds": "occ",
    "partial_matching_threshold": "matching",
    "quantile_levels": "matching",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
