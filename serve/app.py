"""Ray Serve entry point for a trained mapl-ray run.

    serve run serve.app:app run_dir=runs/screw [num_replicas=2] [gpus_per_replica=0.5] [max_batch_size=32]
    serve deploy serve/config.yaml          (a running cluster; edit run_dir there)
    mapl serve runs/screw --port 8000       (the same app from the mapl command)

Then ``curl --data-binary @part.png "http://127.0.0.1:8000/predict?heatmap=true"``. The deployment
itself lives in :mod:`mapl_ray.pipelines.serve`.
"""

from mapl_ray.pipelines.serve import app_builder as app  # Serve calls app(args) with the key=value arguments

__all__ = ["app"]
