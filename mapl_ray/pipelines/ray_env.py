"""Starting or joining Ray the same way from every entry point (train, serve, benchmarks).

``ray.init()`` starts local Ray on one machine (the embedded default); with ``RAY_ADDRESS`` set it
joins that cluster instead. Every worker process of the job runs :func:`quiet_logs` at start-up
(Ray's ``worker_process_setup_hook``).

``init_ray(quiet=True)`` (``mapl train`` without ``--verbose``) keeps the console to mapl-ray's own
lines: the workers' output stays in Ray's log files (``log_to_driver=False``; it held a progress bar
per update, Ray Train's ``TrainingReport`` dumps, a C++ ``PreemptionWatcher`` error line and, with
another local Ray instance running, a placement-group cleaner's traceback), and the driver shows
Ray's warnings but not its INFO lines or its note that token authentication is on.
"""

from __future__ import annotations

import logging
import signal
import threading

# Loggers that repeat a harmless message many times per run:
# - Ray Train's placement-group cleaner polls the state API, which needs the dashboard (not started
#   here), and warns on every poll;
# - FAISS' loader reports at INFO each CPU-specific build it could not import before the one it uses.
NOISY_LOGGERS = ("ray.train.v2._internal.execution.controller.placement_group_cleaner", "faiss.loader")


def quiet_logs() -> None:
    """Raise the level of :data:`NOISY_LOGGERS` to ERROR (worker setup hook; also used in the driver)."""
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


class _DropTokenAuthNote(logging.Filter):
    """Drops Ray's start-up note that token authentication is *enabled* (its default since Ray 2.52);
    the warning that it is *disabled* still shows."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Token authentication is enabled")


_TOKEN_NOTE_LOGGER = "ray._private.authentication.authentication_token_setup"


class _DropServeReconnectNote(logging.Filter):
    """Drops Serve's note that ``serve.run`` connects to the Serve instance ``serve.start`` just started and
    applies no new HTTP options: after our own ``serve.start(http_options=...)`` it read as if ``--port``
    had been ignored."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Connecting to existing Serve app")


def quiet_serve_reconnect_note() -> None:
    """Install :class:`_DropServeReconnectNote` on Serve's logger (once), for a command that calls
    ``serve.start`` with its options and then ``serve.run``."""
    serve_logger = logging.getLogger("ray.serve")
    if not any(isinstance(f, _DropServeReconnectNote) for f in serve_logger.filters):
        serve_logger.addFilter(_DropServeReconnectNote())


def init_ray(quiet: bool = False, **kwargs) -> None:
    """``ray.init`` unless Ray is already initialised (a caller's own ``ray.init`` is respected).

    Args:
        quiet: keep the workers' output in Ray's log files (``/tmp/ray/session_latest/logs``) instead of
            the console, and drop Ray's INFO lines and token-authentication note in this process (see
            the module docstring); Ray's warnings and errors still show.
        kwargs: go to ``ray.init`` (e.g. ``num_cpus`` for tests).
    """
    import ray

    quiet_logs()
    token_logger = logging.getLogger(_TOKEN_NOTE_LOGGER)
    if quiet and not any(isinstance(f, _DropTokenAuthNote) for f in token_logger.filters):
        token_logger.addFilter(_DropTokenAuthNote())
    if ray.is_initialized():
        return
    opts = {
        "include_dashboard": False,
        "log_to_driver": not quiet,
        "runtime_env": {"worker_process_setup_hook": "mapl_ray.pipelines.ray_env.quiet_logs"},
    }
    if quiet:
        opts["logging_level"] = logging.WARNING  # "Started a local Ray instance." and the like
    opts.update(kwargs)
    main_thread = threading.current_thread() is threading.main_thread()
    term = signal.getsignal(signal.SIGTERM) if main_thread else None
    ray.init(**opts)
    if callable(term):  # ray.init puts its own SIGTERM handler (a native crash report) over the caller's
        signal.signal(signal.SIGTERM, term)


def require_local_gpus(needed: float, asked: str, otherwise: str) -> None:
    """Refuse work that needs ``needed`` GPUs on a local Ray that sees fewer: Ray would wait for them forever.
    A cluster (``RAY_ADDRESS`` set, e.g. inside ``ray job submit``) may autoscale GPU nodes: not checked.

    Args:
        needed: GPUs one unit of the work needs (a Ray Train job's workers, one Tune trial's share).
        asked: the flag as the user gave it, for the message (``--gpu asks for 2 GPU worker(s)``).
        otherwise: what to do instead, for the message.

    Raises:
        ConfigError: naming what was asked and the GPUs local Ray sees.
    """
    import os

    import ray

    from ..config import ConfigError

    have = ray.cluster_resources().get("GPU", 0)
    if needed > 0 and not os.environ.get("RAY_ADDRESS") and have < needed:
        raise ConfigError(
            f"{asked} but local Ray sees {have:g} GPU(s): {otherwise}, or set RAY_ADDRESS to a cluster with GPUs"
        )
