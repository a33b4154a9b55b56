"""Starting or joining Ray the same way from every entry point (train, serve, benchmarks).

``ray.init()`` starts local Ray on one machine (the embedded default); with ``RAY_ADDRESS`` set it
joins that cluster instead. Every worker process of the job runs :func:`quiet_logs` at start-up
(Ray's ``worker_process_setup_hook``).
"""

from __future__ import annotations

import logging

# Loggers that repeat a harmless message many times per run:
# - Ray Train's placement-group cleaner polls the state API, which needs the dashboard (not started
#   here), and warns on every poll;
# - FAISS' loader reports at INFO each CPU-specific build it could not import before the one it uses.
NOISY_LOGGERS = ("ray.train.v2._internal.execution.controller.placement_group_cleaner", "faiss.loader")


def quiet_logs() -> None:
    """Raise the level of :data:`NOISY_LOGGERS` to ERROR (worker setup hook; also used in the driver)."""
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def init_ray(**kwargs) -> None:
    """``ray.init`` unless Ray is already initialised (a caller's own ``ray.init`` is respected).

    Keyword arguments go to ``ray.init`` (e.g. ``num_cpus`` for tests).
    """
    import ray

    quiet_logs()
    if ray.is_initialized():
        return
    opts = {
        "include_dashboard": False,
        "log_to_driver": True,
        "runtime_env": {"worker_process_setup_hook": "mapl_ray.pipelines.ray_env.quiet_logs"},
    }
    opts.update(kwargs)
    ray.init(**opts)
