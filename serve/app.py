"""Ray Serve entry point for a trained mapl-ray run.

    serve run serve/config.yaml                 (edit run_dir and the settings there)
    serve run serve.app:app run_dir=runs/screw [num_replicas=2] [max_batch_size=32] [key=value ...]
    serve deploy serve/config.yaml              (a running cluster, RAY_ADDRESS)
    mapl serve runs/screw --port 8000           (the same app from the mapl command)

Then ``curl -H 'Content-Type: image/png' --data-binary @part.png "http://127.0.0.1:8000/v1/predict?heatmap=true"``.
Every setting is a field of :class:`mapl_ray.serving.settings.ServeSettings`; the deployments live
in :mod:`mapl_ray.pipelines.serve`; docs/serving.md describes the API.
"""

from mapl_ray.pipelines.serve import app_builder as app  # Serve calls app(args) with the key=value arguments

__all__ = ["app"]
