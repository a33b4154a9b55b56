"""HTTP scoring of a trained run with Ray Serve: a FastAPI front and a model deployment with dynamic batching.

With ``layout=two_tier``, two deployments make one application (:func:`build_app`):

* ``Ingress`` (FastAPI, no model, no GPU): bearer token, bounded body read, content-type dispatch,
  decoding each upload with the limits (:func:`~mapl_ray.data.io.decode_upload`, in worker threads,
  never on the event loop), per-request time limit, JSON errors, metrics, and each image's answer
  (:func:`~mapl_ray.serving.results.image_result`: heatmap, regions). Decoding is the CPU work of a
  request, so it scales with the front replicas (``ingress_replicas``) instead of holding up the model
  replica. The front stays responsive under load (``GET /healthz`` answers in milliseconds) and keeps
  answering JSON when a model replica dies: it retries the image on another (or the restarted) replica
  until the request's time limit.
* ``Scorer`` (the :class:`~mapl_ray.inference.Predictor` of the run): scores decoded images in a
  ``@serve.batch`` of concurrent images (one forward pass; GPU batches padded to a few fixed sizes so
  each replays a captured CUDA graph) and returns the score record (and the map when asked). The
  forward pass runs in a worker thread, never on the replica's event loop. Its
  ``max_queued_requests`` bounds the wait: a full queue is a 503 with ``Retry-After`` at once.

With ``layout=single`` (the default) the application is one deployment, ``Server``: the same ``Ingress`` class (same
routes, checks, errors and answers) holding the ``Scorer`` class in its own process instead of a handle
to the deployment. Each replica decodes in its worker threads and batches the images of its concurrent
requests (``@serve.batch``) itself: no hop between processes; several replicas share a GPU with
``gpus_per_replica`` < 1. It bounds the images it holds itself (``queue_full``), and a replica that dies
takes its requests with it (no retry elsewhere). docs/serving.md, "Layouts", compares the two.

Routes: ``POST /v1/predict``, ``GET /healthz``, ``GET /readyz``, ``GET /v1/model``, ``GET /docs``,
``GET /openapi.json`` (see docs/serving.md). Metrics (Prometheus, through Ray's metrics agent):
``mapl_requests`` (route, code), ``mapl_request_latency_ms`` (route), ``mapl_errors`` (kind),
``mapl_batch_size``.
"""

# no `from __future__ import annotations`: FastAPI reads the endpoint annotations at runtime
import asyncio
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ..config import Config
from ..data.io import decode_upload
from ..data.layout import ImageReadError
from ..data.pose import build_pose_estimator
from ..serving.auth import check_bearer, load_token, token_digest
from ..serving.batching import BatchWait, graph_buckets
from ..serving.errors import ApiError, decode_error
from ..serving.inputs import parse_uploads, read_body
from ..serving.model_info import model_version, training_metrics
from ..serving.results import image_result
from ..serving.schema import (
    HealthResponse,
    ModelInfo,
    PredictResponse,
    ReadyResponse,
    add_components,
    error_responses,
    predict_request_body,
)
from ..serving.settings import ServeSettings

logger = logging.getLogger("mapl_ray.serve")

#: Routes reported by name in the metrics (any other path is counted as ``other``).
ROUTES = ("/v1/predict", "/healthz", "/readyz", "/v1/model", "/docs", "/openapi.json")
#: Routes answered without the bearer token.
OPEN_ROUTES = frozenset({"/healthz"})

api = FastAPI(
    title="mapl-ray",
    version="1",
    description="Surface-defect scoring with a trained MAPL run (anomaly score, decision, heatmap, "
    "defect regions). Errors are JSON: {error, status, detail[, limit]}.",
)
api.state.auth_token = None  # set by Ingress.__init__ in the replica process


# ----------------------------------------------------------------------------------------- metrics
class _Metrics:
    """Ray Serve metrics of this process (exported by Ray's metrics agent in Prometheus format)."""

    def __init__(self) -> None:
        from ray.serve import metrics

        self.requests = metrics.Counter(
            "mapl_requests", description="HTTP requests answered, by route and status code", tag_keys=("route", "code")
        )
        self.latency = metrics.Histogram(
            "mapl_request_latency_ms",
            description="time to answer a request (ms)",
            boundaries=[1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000],
            tag_keys=("route",),
        )
        self.errors = metrics.Counter(
            "mapl_errors", description="error answers by kind (see ErrorResponse.error)", tag_keys=("kind",)
        )
        self.batch_size = metrics.Histogram(
            "mapl_batch_size", description="images per forward pass", boundaries=[1, 2, 4, 8, 16, 32, 64, 128]
        )


_METRICS: _Metrics | None = None


def _metrics() -> _Metrics:
    global _METRICS
    if _METRICS is None:  # created in the replica process, where Serve tags them with the deployment
        _METRICS = _Metrics()
    return _METRICS


# ------------------------------------------------------------------------------ errors and middleware
def error_response(err: ApiError) -> JSONResponse:
    """The JSON answer for ``err`` (counted in ``mapl_errors`` by kind)."""
    _metrics().errors.inc(tags={"kind": err.kind})
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


@api.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return error_response(exc)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:  # 404, 405 from routing
    kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    if exc.status_code == 404:
        detail = f"no route {request.url.path} (routes: POST /v1/predict, GET /healthz, /readyz, /v1/model, /docs)"
    return error_response(ApiError(exc.status_code, kind, detail, headers=getattr(exc, "headers", None)))


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first.get("loc", ())) or "request"
    return error_response(ApiError(422, "invalid_request", f"{where}: {first.get('msg', 'invalid')}"))


@api.exception_handler(Exception)
async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unexpected error answering %s %s", request.method, request.url.path)
    return error_response(
        ApiError(500, "internal", f"internal error ({type(exc).__name__}); the server log has the traceback")
    )


def _route(scope: dict) -> str:
    path = scope.get("path", "")
    root = scope.get("root_path", "")
    if root and path.startswith(root):  # Serve apps under a route prefix
        path = path[len(root) :] or "/"
    return path


class GuardMiddleware:
    """ASGI middleware of the front: the bearer token on every route but ``/healthz``, and the request
    count / latency metrics of every answer (errors included)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = _route(scope)
        t0 = time.perf_counter()
        code = [500]

        async def send_and_record(message) -> None:
            if message["type"] == "http.response.start":
                code[0] = message["status"]
            await send(message)

        try:
            if route not in OPEN_ROUTES:
                headers = dict(scope.get("headers") or [])
                auth = headers.get(b"authorization")
                check_bearer(auth.decode("latin-1") if auth is not None else None, scope["app"].state.auth_token)
            await self.app(scope, receive, send_and_record)
        except ApiError as e:
            await error_response(e)(scope, receive, send_and_record)
        finally:
            m = _metrics()
            name = route if route in ROUTES else "other"
            m.requests.inc(tags={"route": name, "code": str(code[0])})
            m.latency.observe((time.perf_counter() - t0) * 1000.0, tags={"route": name})


api.add_middleware(GuardMiddleware)


def _openapi() -> dict:
    """The OpenAPI schema with ``POST /v1/predict``'s request body, the batch model and the bearer scheme."""
    if api.openapi_schema is None:
        schema = get_openapi(title=api.title, version=api.version, description=api.description, routes=api.routes)
        add_components(schema)
        schema["components"].setdefault("securitySchemes", {})["bearer"] = {
            "type": "http",
            "scheme": "bearer",
            "description": "required on every route but /healthz when the server has a token",
        }
        schema["security"] = [{"bearer": []}, {}]
        api.openapi_schema = schema
    return api.openapi_schema


api.openapi = _openapi


# ------------------------------------------------------------------------------------ model replica
@serve.deployment(ray_actor_options={"num_cpus": 1})
class Scorer:
    """A model replica: scores decoded images in dynamic batches.

    Args:
        settings: :meth:`ServeSettings.to_dict` after :meth:`ServeSettings.resolve`.

    Raises:
        CheckpointError / ConfigError: the run folder is incomplete (at replica start; names the file).
    """

    def __init__(self, settings: dict):
        import torch

        from ..inference import Predictor

        s = self.settings = ServeSettings(**settings)
        torch.set_num_threads(s.torch_threads)  # Ray sets OMP_NUM_THREADS=1 in actors; use the CPUs reserved
        # a CUDA-graph predictor captures one graph per batch shape: pad batches to a few sizes
        sizes = graph_buckets(s.max_batch_size, s.graph_batch_sizes)
        self.pred = Predictor(
            s.run_dir,
            device=s.device,
            batch_size=s.max_batch_size,
            memory_banks=s.memory_banks,
            max_graphs=len(sizes),
        )
        self.version = model_version(s.run_dir) + (f"+banks{s.memory_banks}" if s.memory_banks else "")
        self.buckets = sizes if self.pred.cuda_graphs else None
        self._score.set_max_batch_size(s.max_batch_size)
        # images queued: the next batch collects while this one runs
        self._wait = BatchWait(self._score, s.batch_wait_timeout_s, s.adaptive_batch_wait)
        size = self.pred.image_size
        for b in self.buckets or [1]:  # warm-up (and graph capture) before the replica takes requests
            self.pred.predict_images(np.zeros((b, size, size, 3), np.uint8), [""] * b)

    def info(self) -> dict:
        """What is served (``GET /v1/model`` without the front's limits)."""
        cfg, state = self.pred.cfg, self.pred.state
        return {
            "run_id": Path(self.settings.run_dir).name,
            "model_version": self.version,
            "category": cfg.data.category,
            "encoder": cfg.model.encoder,
            "image_size": self.pred.image_size,
            "threshold": self.pred.threshold,
            "threshold_source": state.get("threshold_source"),
            "metrics": training_metrics(self.settings.run_dir),
            "device": str(self.pred.device),
            "memory_banks": self.pred.memory_banks or len(self.pred.model.banks),
            "tta": cfg.eval.tta,
        }

    async def predict(self, image: np.ndarray, name: str, want_map: bool) -> dict:
        """One decoded image, uint8 ``(S, S, 3)`` at the run's size (as the front decodes it) ->
        ``{"record": Predictor.predict_images record, "map": float32 (S, S) or None, "threshold", "q_weight",
        "model_version"}`` (the run facts of the model that scored it).

        Raises:
            ValueError: ``image`` is not uint8 ``(S, S, 3)`` (a caller bug, not a user's input).
        """
        size = self.pred.image_size
        if image.dtype != np.uint8 or image.shape != (size, size, 3):
            raise ValueError(f"expected a uint8 ({size}, {size}, 3) image, got {image.dtype} {image.shape}")
        with self._wait.waiting():
            record, amap = await self._score((image, name, want_map))
        return {
            "record": record,
            "map": amap,
            "threshold": self.pred.threshold,
            "q_weight": self.pred.q_weight,
            "model_version": self.version,
        }

    async def predict_many(self, images: np.ndarray, names: list, want_maps: list) -> list:
        """A front's batch: uint8 ``(N, S, S, 3)`` images, their names and whether each wants its map ->
        ``N`` answers of :meth:`predict`, in order. The images join the same ``@serve.batch`` queue as
        every other call's, so the images of several fronts share forward passes.

        Raises:
            ValueError: the lists are not ``N`` long, or an image is not uint8 ``(S, S, 3)`` (a caller
                bug, not a user's input).
        """
        n = len(images)
        if len(names) != n or len(want_maps) != n:
            raise ValueError(f"expected {n} names and {n} map flags for {n} images, got {len(names)}, {len(want_maps)}")
        return list(await asyncio.gather(*(self.predict(images[i], names[i], bool(want_maps[i])) for i in range(n))))

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002, max_concurrent_batches=1)  # set in __init__
    async def _score(self, items: list) -> list:
        with self._wait.batch(len(items)):
            return await asyncio.to_thread(self._forward, items)

    def _forward(self, items: list) -> list:
        """Images ``[(uint8 (S, S, 3), name, want_map)]`` -> ``[(record, map (S, S) or None)]`` in one
        forward pass; maps are copied from the device only when an image of the batch wants its map."""
        n = len(items)
        images = np.stack([img for img, _, _ in items])
        names = [name for _, name, _ in items]
        if self.buckets is not None:
            pad = next(b for b in self.buckets if b >= n) - n
            if pad:
                images = np.concatenate([images, np.zeros((pad,) + images.shape[1:], np.uint8)])
                names += [""] * pad
        records, maps = self.pred.predict_images(images, names, maps=any(w for _, _, w in items))
        _metrics().batch_size.observe(n)
        return [(records[i], maps[i] if want else None) for i, (_, _, want) in enumerate(items)]


# ------------------------------------------------------------------------------------------- front
@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class Ingress:
    """The HTTP front: checks and decodes uploads, has the images scored and makes each image's answer.

    In the ``two_tier`` layout it holds no model and forwards the images to the ``Scorer`` deployment
    (``scorer`` is its handle); in the ``single`` layout (``scorer`` None) it loads the run's model
    itself (a ``Scorer`` object in this process) and is deployed as ``Server``.

    Args:
        scorer: handle of the ``Scorer`` deployment, or None to score in this replica.
        settings: :meth:`ServeSettings.to_dict` after :meth:`ServeSettings.resolve`.

    Raises:
        ValueError: the token file cannot be read, or the token read here differs from the one the
            deploying process saw (the replica does not start rather than serve without auth).
    """

    def __init__(self, scorer, settings: dict):
        self.s = ServeSettings(**settings)
        self.scorer = scorer
        # single layout: the model in this process; images held here (decoding, batch queue, forward pass)
        self.model = Scorer.func_or_class(settings) if scorer is None else None
        # two_tier: the images this front decoded meanwhile go to the model deployment in one call
        self._front_batches = scorer is not None and self.s.front_batch_size > 1
        # images held here are bounded where they wait in this process: the single layout's batch queue,
        # or two_tier's front batches (one call per image leaves the bound to Serve's router)
        self._bounded = scorer is None or self._front_batches
        if self._front_batches:
            self._remote_batch.set_max_batch_size(self.s.front_batch_size)
            # images queued: the next call collects while this one runs
            self._front_wait = BatchWait(self._remote_batch, 0.0, self.s.adaptive_batch_wait)
        self._held = 0
        token = load_token(self.s.token_env, self.s.token_file)
        if token_digest(token) != self.s.token_sha256:
            source = "token_file" if self.s.token_file else f"${self.s.token_env}"
            raise ValueError(
                f"the bearer token this replica reads ({source}) differs from the one the deploying "
                "process read: set it on every node, or use token_file on shared storage"
            )
        api.state.auth_token = token
        cfg = Config.load_run(Path(self.s.run_dir) / "config.yaml")
        self.image_size = cfg.data.image_size
        self.align = build_pose_estimator(cfg)  # uploads are turned as the training images were
        self.limits = self.s.decode_limits()
        self._info: dict | None = None
        ctx = serve.get_replica_context()
        self._app = ctx.app_name
        self._model_deployment = "Scorer" if self.model is None else ctx.deployment

    @api.get("/healthz", response_model=HealthResponse, summary="liveness: the HTTP front answers")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @api.get(
        "/readyz",
        response_model=ReadyResponse,
        summary="readiness: a model replica is loaded and warmed up",
        responses={401: error_responses(401)[401], 503: {"model": ReadyResponse, "description": "not ready"}},
    )
    async def readyz(self):
        try:
            running = await asyncio.wait_for(asyncio.to_thread(self._scorers_running), 5.0)
        except Exception as e:  # noqa: BLE001 - the controller unreachable is "not ready", said in the answer
            logger.warning("readiness: cannot ask Serve's controller: %r", e)
            return JSONResponse(
                {
                    "ready": False,
                    "model_replicas_running": 0,
                    "detail": f"cannot ask Serve's controller ({type(e).__name__})",
                },
                status_code=503,
            )
        if running:
            return {"ready": True, "model_replicas_running": running, "detail": "model loaded and warmed up"}
        return JSONResponse(
            {
                "ready": False,
                "model_replicas_running": 0,
                "detail": "no model replica running (starting or restarting)",
            },
            status_code=503,
            headers=self._retry_after(),
        )

    def _scorers_running(self) -> int:
        app = serve.status().applications.get(self._app)
        dep = app.deployments.get(self._model_deployment) if app is not None else None
        return 0 if dep is None else int(dep.replica_states.get("RUNNING", 0))

    @api.get(
        "/v1/model",
        response_model=ModelInfo,
        summary="the served run: id, version, threshold, training metrics",
        responses=error_responses(401, 503),
    )
    async def model(self) -> dict:
        if self._info is None and self.model is not None:
            self._info = self.model.info()
        if self._info is None:
            try:
                self._info = await asyncio.wait_for(self._call(self.scorer.info), min(10.0, self.s.request_timeout_s))
            except asyncio.TimeoutError:
                raise self._unavailable("no model replica answered within 10 s") from None
        return {**self._info, "limits": self.s.public_limits()}

    @api.post(
        "/v1/predict",
        response_model=PredictResponse,
        response_model_exclude_unset=True,
        summary="score images: anomaly score, decision, optional heatmap and defect regions",
        responses=error_responses(400, 401, 408, 413, 415, 422, 500, 503, 504),
        openapi_extra={"requestBody": predict_request_body()},
    )
    async def predict(
        self,
        request: Request,
        name: str | None = Query(None, max_length=256, description="label of a raw-body image"),
        heatmap: bool = Query(False, description="add the anomaly map as a base64 PNG"),
        regions: bool = Query(False, description="add the defect regions (bounding boxes)"),
        region_threshold: float | None = Query(
            None,
            ge=0.0,
            le=1.0,
            allow_inf_nan=False,
            description="map value regions are cut at (default: the map part of the run's decision threshold, "
            "threshold - q_weight * q)",
        ),
    ) -> dict:
        try:
            body = await asyncio.wait_for(
                read_body(request.stream(), request.headers.get("content-length"), self.s.max_body_bytes),
                self.s.body_timeout_s,
            )
        except asyncio.TimeoutError:
            raise ApiError(
                408,
                "body_timeout",
                f"the request body did not arrive within body_timeout_s={self.s.body_timeout_s:g} s",
            ) from None
        except ClientDisconnect:  # nobody is left to answer; counted, not logged as a server error
            raise ApiError(
                400, "client_disconnected", "the client closed the connection before sending the whole body"
            ) from None
        deadline = time.monotonic() + self.s.request_timeout_s
        ctype = request.headers.get("content-type")
        if len(body) > 1 << 20:  # parsing megabytes of JSON / base64 / multipart: off the event loop
            uploads = await asyncio.to_thread(parse_uploads, ctype, body, name, self.s.max_batch_images)
        else:
            uploads = parse_uploads(ctype, body, name, self.s.max_batch_images)
        del body
        opts = {"heatmap": heatmap, "regions": regions, "region_threshold": region_threshold}
        answers = await asyncio.gather(
            *(self._score(u.data, u.name, opts, deadline) for u in uploads), return_exceptions=True
        )
        for i, a in enumerate(answers):  # the first failed image (in request order) answers for the request
            if isinstance(a, ApiError):
                label = f"images[{i}]" + ("" if uploads[i].name == f"images[{i}]" else f" ({uploads[i].name})")
                raise a.prefixed(f"{label}: " if len(uploads) > 1 else "")
            if isinstance(a, BaseException):
                raise a
        return {"results": answers}

    async def _score(self, data: bytes, name: str, opts: dict, deadline: float) -> dict:
        """One upload: decoded here (in a worker thread), scored (by a model replica, or in this one in
        the single layout), and answered."""
        if not self._bounded:
            return await self._decode_and_score(data, name, opts, deadline)
        if self._held >= self.s.max_ongoing_requests + self.s.max_queued_requests:
            raise self._queue_full()
        self._held += 1
        try:
            return await self._decode_and_score(data, name, opts, deadline)
        finally:
            self._held -= 1

    async def _decode_and_score(self, data: bytes, name: str, opts: dict, deadline: float) -> dict:
        decode = asyncio.to_thread(decode_upload, data, name, self.image_size, self.align, self.limits)
        try:
            d = await asyncio.wait_for(decode, max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            raise self._timeout(False) from None
        except ImageReadError as e:
            raise decode_error(e) from None
        want_map = bool(opts.get("heatmap") or opts.get("regions"))
        if self.model is not None:
            try:  # a timeout cancels the image's place in the batch queue
                out = await asyncio.wait_for(
                    self.model.predict(d.image, name, want_map), max(0.0, deadline - time.monotonic())
                )
            except asyncio.TimeoutError:
                raise self._timeout(False) from None
        elif self._front_batches:
            with self._front_wait.waiting():
                out = await self._remote_batch((d.image, name, want_map, deadline))
        else:
            out = await self._remote_predict(self.scorer.predict, (d.image, name, want_map), deadline)
        args = (
            out["record"],
            out["map"],
            d,
            opts,
            out["threshold"],
            out["model_version"],
            self.s.max_regions,
            out["q_weight"],
        )
        if want_map:  # PNG encoding / region labelling: off the event loop
            return await asyncio.to_thread(image_result, *args)
        return image_result(*args)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.0, max_concurrent_batches=1)  # set in __init__
    async def _remote_batch(self, items: list) -> list:
        """two_tier: the images this front decoded meanwhile, ``[(uint8 (S, S, 3), name, want_map,
        deadline)]``, scored in one call to the model deployment (``Scorer.predict_many``) until the latest
        of their deadlines (no image is cut before its own)."""
        images = np.stack([it[0] for it in items])
        args = (images, [it[1] for it in items], [it[2] for it in items])
        with self._front_wait.batch(len(items)):
            return await self._remote_predict(self.scorer.predict_many, args, max(it[3] for it in items))

    async def _remote_predict(self, method, args: tuple, deadline: float):
        """``method.remote(*args)`` (``Scorer.predict`` or ``predict_many``) on a model replica, retried on
        another (or the restarted) replica when the one holding the images dies, until ``deadline``."""
        from ray.exceptions import RayActorError, RayTaskError
        from ray.serve.exceptions import BackPressureError

        died = False
        name = args[1] if isinstance(args[1], str) else ", ".join(args[1])  # for the log and a 500's detail
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._timeout(died)
            response = method.remote(*args)
            try:
                return await asyncio.wait_for(self._call(response), remaining)
            except asyncio.TimeoutError:
                response.cancel()
                raise self._timeout(died) from None
            except BackPressureError:
                raise self._queue_full() from None
            except RayActorError as e:  # the replica died (crash, OOM, killed): Serve starts another
                died = True
                logger.warning("model replica died while scoring %r (%s); retrying", name, type(e).__name__)
                await asyncio.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
                continue
            except RayTaskError as e:
                logger.error("model replica failed on %r: %s", name, e)
                raise ApiError(
                    500,
                    "internal",
                    f"the model replica failed on {name} "
                    f"({type(e.cause).__name__ if getattr(e, 'cause', None) else type(e).__name__}); "
                    "the server log has the traceback",
                ) from None

    def _queue_full(self) -> ApiError:
        return ApiError(
            503,
            "queue_full",
            f"the model queue is full (max_queued_requests="
            f"{self.s.max_queued_requests} waiting images); retry after {self.s.retry_after_s:g} s",
            limit=("max_queued_requests", None, self.s.max_queued_requests),
            headers=self._retry_after(),
        )

    @staticmethod
    async def _call(response):
        """Await a Serve call (a handle method, or a ``DeploymentResponse`` already sent)."""
        if callable(getattr(response, "remote", None)):
            response = response.remote()
        return await response

    def _timeout(self, died: bool) -> ApiError:
        if died:
            return self._unavailable(
                f"the model replica died and none took the image within request_timeout_s="
                f"{self.s.request_timeout_s:g} s"
            )
        return ApiError(
            504,
            "timeout",
            f"not answered within request_timeout_s={self.s.request_timeout_s:g} s "
            "(the server is overloaded or the image is very large)",
            limit=("request_timeout_s", None, self.s.request_timeout_s),
        )

    def _unavailable(self, why: str) -> ApiError:
        return ApiError(
            503, "replica_unavailable", f"{why}; retry after {self.s.retry_after_s:g} s", headers=self._retry_after()
        )

    def _retry_after(self) -> dict:
        """``Retry-After`` header: whole seconds (RFC 9110), at least 1."""
        return {"Retry-After": str(max(1, math.ceil(self.s.retry_after_s)))}


# ------------------------------------------------------------------------------------------ builders
def cluster_shape() -> tuple[int, int]:
    """``(gpus, cpus)`` of the connected Ray cluster for :meth:`ServeSettings.resolve`: whole GPUs in the
    cluster, and the CPUs (logical cores Ray schedules) of the nodes the model replicas would run on,
    those with a GPU when there is one (a CPU-only node's cores cannot decode for a GPU replica).
    ``(0, 2)`` without a Ray connection (resolve's defaults: one CPU replica)."""
    import ray

    if not ray.is_initialized():
        return 0, 2
    res = ray.cluster_resources()
    gpus = int(res.get("GPU", 0))
    cpus = int(res.get("CPU", 2))
    if gpus:
        alive = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
        gpu_node_cpus = int(sum(r.get("CPU", 0) for r in alive if r.get("GPU", 0) > 0))
        cpus = gpu_node_cpus or cpus
    return gpus, cpus


def build_app(run_dir: "str | Path", **settings: Any):
    """The Serve application for ``run_dir`` (``serve.run(build_app(run))``).

    Args:
        run_dir: run folder written by ``mapl train``.
        **settings: any :class:`~mapl_ray.serving.settings.ServeSettings` field (``layout``,
            ``num_replicas``, ``gpus_per_replica``, ``max_batch_size``, ``max_body_bytes``...). Those left
            out default from the connected Ray cluster (:func:`cluster_shape`,
            :meth:`~mapl_ray.serving.settings.ServeSettings.resolve`): in the default ``single`` layout
            on one GPU with 16 CPUs, 4 replicas at 0.25 GPU and 3 CPUs each, batches of up to 32; without
            a GPU, one replica on the CPUs Ray's own processes leave, one image at a time.

    Raises:
        CheckpointError: ``run_dir`` is not a trained run folder (checked here, before any replica starts).
        ValueError: an unknown or invalid setting (``memory_banks`` over the run's), or an unreadable ``token_file``.
    """
    from ..runfolder import require_run_folder

    run = require_run_folder(run_dir).resolve()
    s = ServeSettings.from_args({**settings, "run_dir": str(run)})
    gpus, cpus = cluster_shape()
    cfg = Config.load_run(run / "config.yaml")
    if s.memory_banks is not None and s.memory_banks > cfg.model.memory_banks:
        raise ValueError(f"serve setting memory_banks={s.memory_banks}: the run holds {cfg.model.memory_banks}")
    s = s.resolve(gpus >= 1, cfg.data.image_size, cpus, gpus)
    s.token_sha256 = token_digest(load_token(s.token_env, s.token_file))
    logs = {"enable_access_log": s.access_log}
    if s.layout == "single":  # the model replicas are the fronts: decoding threads, batching, the model
        server = Ingress.options(
            name="Server",
            num_replicas=s.num_replicas,
            max_ongoing_requests=1000,  # requests in flight; the images held are bounded in the replica
            logging_config=logs,
            ray_actor_options={"num_cpus": s.cpus_per_replica, "num_gpus": s.gpus_per_replica},
        )
        return server.bind(None, s.to_dict())
    scorer = Scorer.options(
        num_replicas=s.num_replicas,
        max_ongoing_requests=s.max_ongoing_requests,
        max_queued_requests=s.max_queued_requests,
        logging_config=logs,
        ray_actor_options={"num_cpus": s.cpus_per_replica, "num_gpus": s.gpus_per_replica},
    )
    # the front awaits (decoding runs in threads): many requests in flight per replica
    ingress = Ingress.options(
        num_replicas=s.ingress_replicas,
        max_ongoing_requests=1000,
        logging_config=logs,
        ray_actor_options={"num_cpus": s.ingress_cpus},
    )
    return ingress.bind(scorer.bind(s.to_dict()), s.to_dict())


def app_builder(args: dict):
    """Builder for Serve config files and the ``serve`` CLI: ``serve run serve.app:app run_dir=RUN [key=value ...]``
    with any :class:`~mapl_ray.serving.settings.ServeSettings` field."""
    args = dict(args)
    if "run_dir" not in args:
        raise ValueError("missing argument run_dir=RUN (the run folder written by `mapl train`)")
    return build_app(args.pop("run_dir"), **args)
