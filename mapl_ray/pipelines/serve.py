"""HTTP scoring of a trained run with Ray Serve (FastAPI ingress, dynamic request batching).

Endpoints (JSON responses):

* ``POST /predict`` -- body: the bytes of one image file (any format Pillow reads), e.g.
  ``curl --data-binary @part.png http://HOST:8000/predict``. Query parameters: ``name`` (a label
  for the image, echoed back and used in error messages) and ``heatmap=true`` (add the anomaly map
  as ``heatmap_png_base64``, an 8-bit grey PNG at the upload's own size). Returns ``score``,
  ``normalised_score``, ``q``, ``label`` (1 = defect when the score reaches the run's threshold, null
  without one), ``threshold`` and ``original_size`` ``[H, W]``. An unreadable body answers 400.
* ``GET /health`` -- the run being served: category, encoder, image size, threshold, device,
  memory-bank backend.

Concurrent requests are grouped by ``ray.serve.batch`` into one forward pass of up to
``max_batch_size`` images; scoring is :class:`mapl_ray.inference.Predictor`, the same path as
``mapl evaluate`` / ``mapl predict`` (CUDA graphs on a GPU).
"""

# no `from __future__ import annotations`: FastAPI reads the endpoint annotations (Request) at runtime
import base64
import io
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from ray import serve

from ..data.io import decode_image
from ..data.layout import ImageReadError

api = FastAPI(title="mapl-ray", description="Surface-defect scoring with a trained MAPL run")


def encode_map_png(amap: np.ndarray, size: tuple[int, int] | None = None) -> str:
    """Anomaly map float ``(h, w)`` in [0, 1] -> base64 of an 8-bit grey PNG (0 normal .. 255 anomalous),
    resized (bilinear) to ``size`` = ``(H, W)`` of the original image when given."""
    from PIL import Image

    buf = io.BytesIO()
    img = Image.fromarray(np.clip(np.rint(amap * 255.0), 0, 255).astype(np.uint8))
    if size is not None and tuple(size) != amap.shape:
        img = img.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


@serve.deployment(ray_actor_options={"num_cpus": 1})
@serve.ingress(api)
class AnomalyDetector:
    """A Ray Serve replica holding one trained run.

    Args:
        run_dir: run folder written by ``mapl train`` (``config.yaml``, ``checkpoint/``).
        device: ``auto`` (CUDA when the replica has a GPU), ``cpu`` or ``cuda``.
        max_batch_size: most requests scored in one forward pass.
        batch_wait_timeout_s: how long a request waits for others to share its batch.

    Raises:
        CheckpointError / ConfigError: the run folder is incomplete (at replica start; names the file).
    """

    def __init__(
        self, run_dir: str, device: str = "auto", max_batch_size: int = 32, batch_wait_timeout_s: float = 0.005
    ):
        from ..inference import Predictor

        self.run_dir = str(Path(run_dir).resolve())
        self.pred = Predictor(self.run_dir, device=device)
        self._score.set_max_batch_size(max_batch_size)
        self._score.set_batch_wait_timeout_s(batch_wait_timeout_s)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _score(self, requests: list[tuple[np.ndarray, str]]) -> list[tuple[dict[str, Any], np.ndarray]]:
        records, maps = self.pred.predict_images(np.stack([img for img, _ in requests]), [name for _, name in requests])
        return list(zip(records, maps))

    @api.post("/predict")
    async def predict(self, request: Request, name: str = "upload", heatmap: bool = False) -> dict[str, Any]:
        data = await request.body()
        try:
            image, (h, w), pose = decode_image(
                data,
                name,
                self.pred.image_size,
                return_original_size=True,
                align=self.pred.pose_estimator,
                return_pose=True,
            )
        except ImageReadError as e:
            raise HTTPException(
                status_code=400, detail=f"{e} (send the raw bytes of one image file as the request body)"
            ) from e
        rec, amap = await self._score((image, name))
        out = {"name": rec.pop("path"), **rec, "threshold": self.pred.threshold, "original_size": [h, w]}
        if heatmap:
            out["heatmap_png_base64"] = encode_map_png(self.pred.to_original_frame(amap, pose), (h, w))
        return out

    @api.get("/health")
    def health(self) -> dict[str, Any]:
        cfg = self.pred.cfg
        return {
            "status": "ok",
            "run": self.run_dir,
            "category": cfg.data.category,
            "encoder": cfg.model.encoder,
            "image_size": self.pred.image_size,
            "threshold": self.pred.threshold,
            "device": str(self.pred.device),
            "memory_backend": self.pred.model.memory.backend,
            "memory_banks": len(self.pred.model.banks),
            "cuda_graphs": self.pred.cuda_graphs,
        }


def build_app(
    run_dir: str | Path,
    num_replicas: int = 1,
    gpus_per_replica: float | None = None,
    max_batch_size: int = 32,
    device: str = "auto",
):
    """The Serve application for ``run_dir`` (``serve.run(build_app(...))``).

    ``gpus_per_replica``: None -> 1 when the Ray cluster has a GPU, else 0 (fractions share a GPU).

    Raises:
        CheckpointError: ``run_dir`` is not a trained run folder (checked here, before any replica starts).
    """
    import ray

    from ..runfolder import require_run_folder

    run_dir = require_run_folder(run_dir)
    if gpus_per_replica is None:
        gpus_per_replica = 1.0 if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
    # enough requests in flight per replica to fill a batch (Serve's default of 5 would cap it)
    return AnomalyDetector.options(
        num_replicas=num_replicas,
        max_ongoing_requests=max(2 * max_batch_size, 8),
        ray_actor_options={"num_cpus": 1, "num_gpus": gpus_per_replica},
    ).bind(str(run_dir.resolve()), device=device, max_batch_size=max_batch_size)


def app_builder(args: dict[str, str]):
    """Builder for the ``serve`` CLI / Serve config files: ``serve run serve.app:app run_dir=RUN [num_replicas=N]``."""
    if "run_dir" not in args:
        raise ValueError("missing argument run_dir=RUN (the run folder written by `mapl train`)")
    gpus = args.get("gpus_per_replica")
    return build_app(
        args["run_dir"],
        num_replicas=int(args.get("num_replicas", 1)),
        gpus_per_replica=None if gpus is None else float(gpus),
        max_batch_size=int(args.get("max_batch_size", 32)),
        device=args.get("device", "auto"),
    )
