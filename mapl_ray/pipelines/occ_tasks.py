"""The K one-class classifiers of a pseudo-labeler refit as Ray tasks, one OCC each: the ``map_fn`` /
``fit_map`` hook of :meth:`mapl_ray.pseudo.occ.OCCEnsemble.fit` and
:class:`~mapl_ray.pseudo.labeler.PseudoLabeler` (the method layer stays free of Ray).

Each OCC fit is a plain, seeded function of arrays (:func:`mapl_ray.pseudo.occ.fit_one_occ`), so the
tasks give the ensemble the sequential fit gives. The arrays every OCC scores (the unlabeled set, the
positives) go to the object store once, not once per task.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

log = logging.getLogger("mapl_ray.pseudo")


def ray_task_map(fn: Callable[..., Any], items: Sequence[tuple], num_cpus: float = 1.0) -> list[Any]:
    """``[fn(*item) for item in items]``, each call a Ray task of ``num_cpus`` CPUs; results in order.

    Arrays shared between items (the same object) are put in the object store once. Called in a Ray Tune
    trial, the tasks run in the trial's placement group (its bundles after the first, which Ray Tune
    requires: :func:`mapl_ray.pipelines.tune.trial_resources`). Elsewhere, when the cluster has fewer than
    ``num_cpus`` CPUs free (all taken by training workers or trials), the calls run here instead, one
    after the other: tasks that wait for a CPU the caller holds would never start.

    Raises:
        the error of a failed call (Ray's wrapper unwrapped by ``ray.get``'s ``RayTaskError``).
    """
    import ray
    from ray.util import get_current_placement_group

    # inside a placement group (a Ray Tune trial's) the tasks take its bundles; outside, any free CPU
    in_group = get_current_placement_group() is not None
    if not ray.is_initialized() or (not in_group and ray.available_resources().get("CPU", 0.0) < num_cpus):
        return [fn(*item) for item in items]
    task = ray.remote(fn).options(num_cpus=num_cpus, max_retries=0)
    refs: dict[int, Any] = {}

    def shared(a: Any) -> Any:
        if isinstance(a, np.ndarray) and a.nbytes > 100_000:
            if id(a) not in refs:
                refs[id(a)] = ray.put(a)
            return refs[id(a)]
        return a

    return ray.get([task.remote(*(shared(a) for a in item)) for item in items])
