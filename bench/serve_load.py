"""Load test of the HTTP service (issues 18 / 19): latency, throughput, batching gain, health under load, fault.

One command deploys ``mapl_ray.pipelines.serve.build_app`` on local Ray (127.0.0.1), drives it with a
real HTTP client (aiohttp, bounded in requests and seconds per step) and measures:

* for batching off (``max_batch_size=1``) and on (``--batch-on``, default 32), at each concurrency of
  ``--concurrency`` (default 1, 8, 32): p50 / p95 / p99 latency, images/s, 5xx and other errors, and
  ``GET /healthz`` latency measured meanwhile from a separate process (p50 / p99 / max);
* ``batching_gain``: images/s with batching on / off at each concurrency, same run, same images;
* an oversized upload: 1 GiB announced in ``Content-Length``, zeros streamed until the answer comes
  (the 413 must come before the body is sent);
* with ``--images-per-request K``: the batching-on app again with multipart requests of K images each
  (stations that send several images at once; images/s counts images);
* with ``--http-ceiling``: the same load against an echo app (a FastAPI ingress that only reads the
  body), the most Ray Serve's HTTP path carries on this machine; ``stages``: the in-process cost of
  decoding one upload and of one forward pass at batch 1 and 32; ``handle_calls``: images/s that Ray
  Serve carries from one replica to another through a deployment handle, one decoded image per call
  against 8 and 32 per call (the front -> model hop of two_tier, ``ServeSettings.front_batch_size``);
* ``--layouts`` (default: ``ServeSettings``' default layout, ``single``; ``two_tier,single`` for both):
  all of the above (but the fault test) for each layout of the app (``ServeSettings.layout``), same
  images, same run, under ``layouts[<layout>]`` (``two_tier_per_image``: two_tier with one call per image
  from a front to the model, ``front_batch_size=1``); the first layout's numbers are also the top-level
  ``batching_off`` / ``batching_on`` / ``concurrency`` / ``batching_gain``. The single layout runs
  with ``ServeSettings``' auto replicas, GPU share and CPUs (on one GPU with 16 cores: 4 replicas at
  0.25 GPU and 3 CPUs each) unless ``--single-replicas`` / ``--single-cpus`` say otherwise; what it
  ran with is in ``settings.layouts.single``;
* with ``--direct-ports``: the batching-on load again, the clients spread over the HTTP ports the
  ingress replicas listen on themselves in Ray Serve's direct-ingress mode (what an external load
  balancer or Serve's HAProxy would do), past Serve's one Python proxy on ``--port``;
* with ``--graph-batch-sizes pow2,fine,...``: one more batching-on step per entry, with that
  ``ServeSettings.graph_batch_sizes`` (the CUDA-graph batch sizes a batch is padded to), and each step's
  ``deploy_s`` (deploy until ready: replicas started, graphs captured);
* with ``--memory-banks N``: the model scores with the first N of the run's memory banks (a cost
  measurement without retraining; ``ServeSettings.memory_banks``), in the stage costs as well;
* a fault test of the first layout (``two_tier``: one per ``--fault-replicas``, default 1 and 2 model
  replicas; ``single``: one, with the load steps' replicas): load at concurrency 8, the process of one
  model replica killed with SIGKILL after ``--fault-after`` s; errors seen (by status), from Serve's
  own replica states (``serve details``, polled every 0.2 s): ``detected_s`` (kill -> Serve no longer
  lists the killed replica RUNNING) and ``recovery_s`` (kill -> Serve lists as many RUNNING replicas as
  were deployed, none of them the killed one: the replacement has started and is serving),
  ``replica_states`` (each change of the deployment's replica states after the kill); ``stall_s``
  (longest time without a successful answer after the kill), the slowest request (no request may
  hang: every request either answers or hits the client timeout, request_timeout_s + 15 s).

The images are the run's test split (PNG bytes: the file's own, or re-encoded when it is not a PNG), sent raw with ``Content-Type: image/png``.
Without ``--run`` a run is trained first (the category's preset, ``--steps`` steps, ``--set`` overrides).
Writes ``--out`` (default bench/results/serve_load.json) under ``machines[<this machine>]``, keeping
the other machines' entries.

    python bench/serve_load.py --run RUN [--requests 400] [--seconds 30]
    python bench/serve_load.py --run RUN --layouts two_tier,single --direct-ports --memory-banks 1
    python bench/serve_load.py --data ROOT --category screw --textures DIR [--weights FILE] [--steps 200]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import multiprocessing as mp
import os
import platform
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


# --------------------------------------------------------------------------------------- the client
async def drive(
    url: str | list[str],
    bodies: list[bytes],
    concurrency: int,
    max_requests: int,
    max_seconds: float,
    timeout_s: float,
    log: list | None = None,
    content_type: str = "image/png",
) -> dict:
    """``concurrency`` clients POST the images (round robin) until ``max_requests`` were sent or
    ``max_seconds`` passed. Returns the latencies (s) of answered requests, statuses and timing.
    With a list of URLs, client i sends to ``url[i % len(url)]``.

    ``log`` (optional) receives ``(t_sent, t_done, status)`` per request on the ``time.monotonic`` clock.
    """
    import aiohttp

    counter = itertools.count()
    t0 = time.monotonic()
    stop = t0 + max_seconds
    rows: list[tuple[float, float, object]] = []
    conn = aiohttp.TCPConnector(limit=concurrency + 4)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=timeout_s)) as sess:
        urls = [url] if isinstance(url, str) else url

        async def client(target: str) -> None:
            while True:
                i = next(counter)
                if i >= max_requests or time.monotonic() >= stop:
                    return
                sent = time.monotonic()
                try:
                    body = bodies[i % len(bodies)]
                    async with sess.post(target, data=body, headers={"Content-Type": content_type}) as r:
                        await r.read()
                        status: object = r.status
                except asyncio.TimeoutError:
                    status = "client_timeout"
                except aiohttp.ClientError as e:
                    status = type(e).__name__
                done = time.monotonic()
                rows.append((sent, done, status))
                if log is not None:
                    log.append((sent, done, status))

        await asyncio.gather(*(client(urls[i % len(urls)]) for i in range(concurrency)))
    wall = time.monotonic() - t0
    return {"rows": rows, "wall_s": wall, "t0": t0}


def multipart_bodies(bodies: list[bytes], k: int, boundary: str = "mapl-bench-boundary") -> tuple[list[bytes], str]:
    """Request bodies of ``k`` images each (``multipart/form-data``, one file part per image, taken round
    robin from ``bodies``) and their content type."""
    out = []
    for start in range(len(bodies)):
        parts = []
        for j in range(k):
            data = bodies[(start + j) % len(bodies)]
            head = f'--{boundary}\r\nContent-Disposition: form-data; name="images"; filename="{j}.png"\r\n'
            parts.append(head.encode() + b"Content-Type: image/png\r\n\r\n" + data + b"\r\n")
        out.append(b"".join(parts) + f"--{boundary}--\r\n".encode())
    return out, f"multipart/form-data; boundary={boundary}"


def summarise(run: dict, images_per_request: int = 1) -> dict:
    rows = run["rows"]
    ok = np.array([d - s for s, d, st in rows if st == 200]) * 1000.0
    statuses = [st for _, _, st in rows]
    out = {
        "requests": len(rows),
        "ok": int(len(ok)),
        "errors_5xx": sum(1 for st in statuses if isinstance(st, int) and st >= 500),
        "errors_other": sum(1 for st in statuses if st != 200 and not (isinstance(st, int) and st >= 500)),
        "images_per_s": round(images_per_request * len(ok) / run["wall_s"], 2) if run["wall_s"] > 0 else 0.0,
    }
    for q in (50, 95, 99):
        out[f"p{q}_ms"] = round(float(np.percentile(ok, q)), 2) if len(ok) else None
    codes: dict[str, int] = {}
    for st in statuses:
        if st != 200:
            codes[str(st)] = codes.get(str(st), 0) + 1
    if codes:
        out["error_codes"] = codes
    return out


def probe_health(url: str, period_s: float, conn, stop) -> None:
    """Separate process: ``GET url`` every ``period_s`` until ``stop`` is set; sends the latencies (s)."""
    import http.client
    from urllib.parse import urlsplit

    u = urlsplit(url)
    lat, errors = [], 0
    while not stop.is_set():
        t = time.monotonic()
        try:
            c = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
            c.request("GET", u.path)
            r = c.getresponse()
            r.read()
            c.close()
            if r.status == 200:
                lat.append(time.monotonic() - t)
            else:
                errors += 1
        except OSError:
            errors += 1
        time.sleep(max(0.0, period_s - (time.monotonic() - t)))
    conn.send((lat, errors))


class HealthProbe:
    """``GET /healthz`` from another process while the load runs (the client's own event loop and GIL
    would otherwise add their delays to the health latency)."""

    def __init__(self, url: str, period_s: float = 0.02):
        ctx = mp.get_context("spawn")
        self.stop = ctx.Event()
        self.recv, send = ctx.Pipe(duplex=False)
        self.proc = ctx.Process(target=probe_health, args=(url, period_s, send, self.stop), daemon=True)

    def __enter__(self) -> HealthProbe:
        self.proc.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        lat, errors = self.recv.recv()
        self.proc.join(10)
        lat = np.array(lat) * 1000.0
        self.result = {
            "healthz_p50_ms": round(float(np.percentile(lat, 50)), 2) if len(lat) else None,
            "healthz_p99_ms": round(float(np.percentile(lat, 99)), 2) if len(lat) else None,
            "healthz_max_ms": round(float(lat.max()), 2) if len(lat) else None,
            "healthz_probes": int(len(lat)),
            "healthz_errors": errors,
        }


# ------------------------------------------------------------------------------------------- serving
def http_ceiling(url_base: str, bodies: list[bytes], fronts: int, conc: list[int], args, timeout_s: float) -> dict:
    """Ray Serve's own HTTP path on this machine, without mapl: an ingress (``fronts`` replicas) that
    reads each body and answers a small JSON, driven like the model. The images/s it reaches are
    the most the proxy and replica plumbing carry for these bodies."""
    from ray import serve

    @serve.deployment(max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0})
    class Echo:
        async def __call__(self, request) -> dict:  # a starlette Request, as Serve hands it over
            return {"bytes": len(await request.body())}

    serve.run(Echo.options(num_replicas=fronts).bind(), name="echo", route_prefix="/")
    url = f"{url_base}/v1/predict"
    asyncio.run(drive(url, bodies, 2, 2 * len(bodies), 60, timeout_s))  # warm-up
    out = {}
    for c in conc:
        out[str(c)] = summarise(asyncio.run(drive(url, bodies, c, args.requests, args.seconds, timeout_s)))
        print("http ceiling", c, out[str(c)], flush=True)
    serve.delete("echo")
    return out


def handle_calls(size: int, per_call=(1, 8, 32), concurrency: int = 8, seconds: float = 3.0) -> dict:
    """Ray Serve's cost of carrying decoded images between two deployments, without mapl: a front replica
    sends uint8 ``(size, size, 3)`` images to a sink replica that answers a small dict per image, one image
    per call or ``k`` per call (a ``(k, size, size, 3)`` array), ``concurrency`` calls at a time. What
    two_tier's fronts pay per call to the model deployment (``ServeSettings.front_batch_size``); images/s
    keyed by images per call."""
    from ray import serve

    @serve.deployment(max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0})
    class Sink:
        async def many(self, images, names) -> list:
            return [{"score": float(im[0, 0, 0]), "name": n} for im, n in zip(images, names)]

    @serve.deployment(max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0})
    class Front:
        def __init__(self, sink):
            self.sink = sink

        async def run(self, k: int, seconds: float) -> dict:
            images = np.zeros((k, size, size, 3), np.uint8)
            done, t_end = [0, 0], time.perf_counter() + seconds

            async def worker():
                while time.perf_counter() < t_end:
                    await self.sink.many.remote(images, ["x"] * k)
                    done[0] += k
                    done[1] += 1

            t0 = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            wall = time.perf_counter() - t0
            return {"images_per_s": round(done[0] / wall, 1), "calls_per_s": round(done[1] / wall, 1)}

    handle = serve.run(Front.bind(Sink.bind()), name="handle_calls", route_prefix=None)

    async def drive() -> dict:  # in an event loop: RAY_SERVE_THROUGHPUT_OPTIMIZED's handles route in the caller's
        rates = {}
        for k in per_call:
            await handle.run.remote(k, 0.5)  # warm-up
            rates[str(k)] = await handle.run.remote(k, seconds)
        return rates

    out = {"image_size": size, "concurrency": concurrency, "seconds": seconds, "images_per_call": asyncio.run(drive())}
    serve.delete("handle_calls")
    return out


def deploy(run: Path, name: str, **settings) -> str:
    """Deploy the app ``name`` at ``/`` and wait until it is ready. A previous app of that name is deleted
    first: a rolling update would start the new replicas while the old ones still hold the CPUs."""
    from ray import serve

    from mapl_ray.pipelines.serve import build_app

    if name in serve.status().applications:
        serve.delete(name)
    serve.run(build_app(run, **settings), name=name, route_prefix="/")
    return name


def oversized_upload(url: str, announced: int = 2**30, chunk: int = 1 << 20, timeout_s: float = 60.0) -> dict:
    """Announce a body of ``announced`` bytes and stream zeros until the server answers: with a body
    limit enforced on ``Content-Length`` the answer (413) comes before the body was sent."""
    import select
    from urllib.parse import urlsplit

    u = urlsplit(url)
    sock = socket.create_connection((u.hostname, u.port), timeout=timeout_s)
    t0 = time.monotonic()
    sock.sendall(
        f"POST {u.path} HTTP/1.1\r\nHost: {u.hostname}\r\nContent-Type: image/png\r\n"
        f"Content-Length: {announced}\r\n\r\n".encode()
    )
    sent, block = 0, b"\0" * chunk
    try:
        while sent < announced and time.monotonic() - t0 < timeout_s:
            if select.select([sock], [], [], 0)[0]:  # the answer arrived: stop sending
                break
            sock.sendall(block)
            sent += chunk
    except OSError:  # the server closed the connection after answering
        pass
    sock.settimeout(timeout_s)
    head = sock.recv(65536).decode("latin-1", "replace")
    sock.close()
    status = int(head.split(" ", 2)[1]) if head.startswith("HTTP/") else None
    return {
        "announced_bytes": announced,
        "status": status,
        "answer_s": round(time.monotonic() - t0, 3),
        "bytes_sent_before_answer": sent,
    }


#: The deployment holding the model in each layout (``mapl_ray.pipelines.serve.build_app``).
MODEL_DEPLOYMENT = {"two_tier": "Scorer", "two_tier_per_image": "Scorer", "single": "Server"}
#: layouts --layouts takes: ServeSettings.LAYOUTS, and two_tier with one call per image from a front to the
#: model deployment (front_batch_size=1, the two_tier of before front batching) to compare against
BENCH_LAYOUTS = tuple(MODEL_DEPLOYMENT)


def direct_ingress_urls(app: str, host: str, path: str = "/v1/predict") -> list[str]:
    """The URLs of ``app``'s ingress replicas on the HTTP ports they listen on themselves (Ray Serve's
    direct ingress; the controller publishes them as target groups, for a load balancer); [] when off.
    The ports are taken on ``host`` (the replicas bind ``http_options.host``, 127.0.0.1 here, while the
    target groups name the node's address)."""
    from ray.serve.context import _get_global_client

    details = _get_global_client().get_serve_details()
    return [
        f"http://{host}:{t['port']}{path}"
        for g in details.get("target_groups", [])
        if g.get("app_name") == app and str(g.get("protocol")).upper().endswith("HTTP")
        for t in g["targets"]
    ]


def scorer_pids(app: str, deployment: str = "Scorer") -> list[int]:
    """PIDs of the model replicas of ``app`` (Serve names its replica actors ``SERVE_REPLICA::app#Scorer#id``)."""
    import ray

    pids = []
    for a in ray.util.list_named_actors(all_namespaces=True):
        if f"{app}#{deployment}#" in a["name"]:
            actor = ray.get_actor(a["name"], namespace=a["namespace"])
            try:
                pids.append(ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=10))
            except Exception:  # noqa: BLE001 - a replica already gone has no pid to report
                continue
    return pids


def replica_states(app: str, deployment: str = "Scorer") -> list[dict]:
    """Serve's view of ``app``'s ``deployment`` replicas, as the controller reports them (``serve
    details``): ``replica_id``, ``state`` (STARTING, RUNNING, STOPPING...) and ``pid`` (None until the
    replica is ready)."""
    from ray.serve.context import _get_global_client

    apps = _get_global_client().get_serve_details().get("applications", {})
    dep = apps.get(app, {}).get("deployments", {}).get(deployment, {})
    return [  # the state arrives as a ReplicaState enum (a str subclass) or its value
        {
            "replica_id": r.get("replica_id"),
            "state": str(getattr(r.get("state"), "value", r.get("state"))),
            "pid": r.get("pid"),
        }
        for r in dep.get("replicas", [])
    ]


def fault_test(
    url: str,
    bodies: list[bytes],
    app: str,
    replicas: int,
    after_s: float,
    seconds: float,
    timeout_s: float,
    deployment: str = "Scorer",
) -> dict:
    """Load at concurrency 8; SIGKILL one running model replica of ``deployment`` after ``after_s`` s; see
    what the clients got and when Serve had ``replicas`` replicas running again (``recovery_s``, None
    when not within ``seconds`` s of the kill)."""
    log: list = []
    state: dict = {}

    def killer() -> None:
        time.sleep(after_s)
        running = [r for r in replica_states(app, deployment) if r["state"] == "RUNNING" and r["pid"]]
        if running:
            victim, pid = running[0]["replica_id"], running[0]["pid"]
        else:  # Serve gave no pid: the replica actors' own
            victim, pid = None, scorer_pids(app, deployment)[0]
        state["killed_at"] = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        state["killed_pid"] = pid
        timeline = state["replica_states"] = []
        while time.monotonic() - state["killed_at"] < seconds:  # until Serve runs a replacement
            time.sleep(0.2)
            now = time.monotonic()
            try:
                reps = replica_states(app, deployment)
            except Exception:  # noqa: BLE001 - the controller busy or restarting: ask again
                continue
            counts: dict[str, int] = {}
            for r in reps:
                counts[r["state"]] = counts.get(r["state"], 0) + 1
            if not timeline or timeline[-1][1] != counts:
                timeline.append((round(now - state["killed_at"], 2), counts))
            others = [r for r in reps if r["state"] == "RUNNING" and r["replica_id"] != victim and r["pid"] != pid]
            killed_running = any(
                r["state"] == "RUNNING" and (r["replica_id"] == victim or r["pid"] == pid) for r in reps
            )
            if "detected_at" not in state and not killed_running:
                state["detected_at"] = now
            if not killed_running and len(others) >= replicas:
                state["recovered_at"] = now
                return

    t = threading.Thread(target=killer)
    t.start()
    run = asyncio.run(drive(url, bodies, 8, 10**9, seconds, timeout_s, log))
    t.join()
    k = state.get("killed_at")
    after = sorted((d, st) for s, d, st in log if k is not None and d >= k)
    errors: dict[str, int] = {}
    for _, st in after:
        if st != 200:
            errors[str(st)] = errors.get(str(st), 0) + 1
    stall = None
    if k is not None:  # the longest time after the kill with no successful answer
        ok_times = [k] + [d for d, st in after if st == 200] + [run["t0"] + run["wall_s"]]
        stall = max(b - a for a, b in zip(ok_times, ok_times[1:]))
    lat = [d - s for s, d, _ in log]
    return {
        "replicas": replicas,
        "requests": len(log),
        "errors": errors,
        "errors_total": sum(errors.values()),
        "detected_s": round(state["detected_at"] - k, 2) if "detected_at" in state else None,
        "recovery_s": round(state["recovered_at"] - k, 2) if "recovered_at" in state else None,
        "recovery_measured_by": "Serve's replica states (serve details), polled every 0.2 s",
        "replica_states": [{"t_s": ts, "states": c} for ts, c in state.get("replica_states", [])],
        "stall_s": round(stall, 2) if stall is not None else None,
        "max_latency_s": round(max(lat), 2) if lat else None,
        "client_timeouts": sum(1 for _, _, st in log if st == "client_timeout"),
        "summary": summarise(run),
    }


# ------------------------------------------------------------------------------------------- the run
def train_run(args) -> Path:
    from mapl_ray.config import Config
    from mapl_ray.main_job import run_train_job
    from mapl_ray.presets import category_preset

    out = Path(args.train_out)
    if (out / "checkpoint" / "state.json").is_file():
        return out
    over = {
        **category_preset(args.category),
        "data.root": args.data,
        "data.category": args.category,
        "data.image_size": args.image_size,
        "simulation.texture_dir": args.textures,
        "train.steps": args.steps,
    }
    if args.weights:
        over["model.weights"] = args.weights
    for item in args.set:
        k, _, v = item.partition("=")
        over[k] = v
    run_train_job(Config().override(over).validate(), out, use_ray=False, progress=False)
    return out


def test_images(run: Path, n: int) -> tuple[list[bytes], list[list[int]]]:
    """Up to ``n`` images of the run's test split as PNG bytes (the file's own bytes when it is a PNG, else
    re-encoded losslessly: the GPU payload may hold JPEGs, and every load step sends PNG bodies), alternating
    good and defective."""
    import io

    from PIL import Image

    split = json.loads((run / "split.json").read_text())
    good = [r["path"] for r in split["test"] if r["label"] == 0]
    bad = [r["path"] for r in split["test"] if r["label"] != 0]
    paths = [p for pair in itertools.zip_longest(good, bad) for p in pair if p is not None][:n]
    if not paths:
        raise SystemExit(f"{run}/split.json lists no test images")
    sizes, bodies = [], []
    for p in paths:
        with Image.open(p) as im:
            sizes.append([im.height, im.width])
            if im.format == "PNG":
                bodies.append(Path(p).read_bytes())
            else:
                buf = io.BytesIO()
                im.save(buf, format="PNG")
                bodies.append(buf.getvalue())
    return bodies, sizes


def stage_costs(run: Path, bodies: list[bytes], batch: int, seconds: float = 3.0, memory_banks=None) -> dict:
    """In-process costs of a request's two halves, without Serve or HTTP: decoding one upload as the
    front does (``decode_upload`` with the run's pose normalisation; median ms over ``bodies``) and one
    ``Predictor.predict_images`` call at batch 1 and ``batch`` (median ms, warm, CUDA graphs where the
    server uses them), with the first ``memory_banks`` banks (None: all)."""
    from mapl_ray.data.io import decode_upload
    from mapl_ray.inference import Predictor

    pred = Predictor(run, batch_size=batch, memory_banks=memory_banks)
    size = pred.image_size

    def median_ms(fn) -> float:
        times, t_end = [], time.perf_counter() + seconds
        while len(times) < 5 or (time.perf_counter() < t_end and len(times) < 2000):
            t0 = time.perf_counter()
            fn(len(times))
            times.append(time.perf_counter() - t0)
        return round(1000 * float(np.median(times)), 3)

    decoded = [decode_upload(b, "x", size, pred.pose_estimator).image for b in bodies]
    out = {"decode_ms": median_ms(lambda i: decode_upload(bodies[i % len(bodies)], "x", size, pred.pose_estimator))}
    for b in sorted({1, batch}):
        images = np.stack([decoded[i % len(decoded)] for i in range(b)])
        for _ in range(3):  # warm-up, graph capture
            pred.predict_images(images, [""] * b)
        out[f"predict_batch_{b}_ms"] = median_ms(lambda i: pred.predict_images(images, [""] * b))
    out["device"] = str(pred.device)
    return out


def machine_key() -> tuple[str, dict]:
    import torch

    info = {
        "python": platform.python_version(),
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "torch": torch.__version__,
    }
    try:
        import ray

        info["ray"] = ray.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        return f"{info['gpu']} ({os.cpu_count()} CPU cores)", info
    return f"CPU only ({os.cpu_count()} cores, {platform.machine()})", info


def main(argv=None) -> int:
    from mapl_ray.serving.settings import ServeSettings, apply_ray_serve_env  # imports no Ray

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", help="trained run folder (else one is trained from --data/--category/--textures)")
    p.add_argument("--data"), p.add_argument("--category", default="screw"), p.add_argument("--textures")
    p.add_argument("--weights"), p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--set", action="append", default=[], help="training config override key=value (repeatable)")
    p.add_argument("--train-out", default="/tmp/mapl_serve_load_run")
    p.add_argument("--images", type=int, default=32, help="distinct test images sent (round robin)")
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--requests", type=int, default=400, help="most requests per step")
    p.add_argument("--seconds", type=float, default=30.0, help="most seconds per step")
    p.add_argument("--batch-on", type=int, default=32, help="max_batch_size of the batching-on runs")
    p.add_argument(
        "--batch-waits",
        default="",
        help="more batching-on steps, one per batch_wait_timeout_s in this comma list (seconds; mode "
        "batching_on_wait_<ms>ms), beside batching_on at ServeSettings' default wait",
    )
    p.add_argument(
        "--skip-batching-off",
        action="store_true",
        help="no batching-off steps (no batching_gain): the default settings alone, when the call's time is short",
    )
    p.add_argument(
        "--fixed-wait",
        action="store_true",
        help="one more batching-on step (mode batching_on_fixed_wait) with adaptive_batch_wait off: Serve's "
        "fixed batch_wait_timeout_s under load, against BatchWait's in the same run",
    )
    p.add_argument(
        "--graph-batch-sizes",
        default="",
        help="more batching-on steps, one per entry (pow2 / fine, repeatable: pow2,fine,pow2), with that "
        "ServeSettings.graph_batch_sizes (modes batching_on_<kind>, batching_on_<kind>_2, ...), beside batching_on",
    )
    p.add_argument("--replicas", type=int, default=1, help="model replicas of the two_tier load steps")
    p.add_argument("--ingress-replicas", type=int, help="HTTP front replicas (default: ServeSettings' auto)")
    p.add_argument("--cpus-per-replica", type=float, help="default: 1 with a GPU, else all cores / replicas")
    p.add_argument("--request-timeout-s", type=float, default=30.0)
    p.add_argument(
        "--fault-replicas",
        default="1,2",
        help="two_tier first: model replicas of each fault test; single first: any value runs one fault test "
        "with the load steps' replicas ('' skips it)",
    )
    p.add_argument("--fault-after", type=float, default=3.0)
    p.add_argument("--fault-seconds", type=float, default=40.0)
    p.add_argument(
        "--access-log",
        action="store_true",
        help="keep Serve's per-request access log (off here: it costs the replicas CPU at high request rates)",
    )
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--ingress",
        default="proxy",
        choices=("proxy", "haproxy"),
        help="what listens on --port, as `mapl serve --ingress` (haproxy: RAY_SERVE_ENABLE_HA_PROXY=1)",
    )
    p.add_argument(
        "--images-per-request",
        type=int,
        default=1,
        help="also drive the batching-on app with multipart requests of this many images (images/s counted per image)",
    )
    p.add_argument("--http-ceiling", action="store_true", help="also drive an echo app (Serve without mapl) first")
    p.add_argument("--only-ceiling", action="store_true", help="stop after the stage costs and the echo app")
    p.add_argument(
        "--layouts",
        default=ServeSettings.layout,
        help=f"app layouts measured side by side (ServeSettings.layout; default {ServeSettings.layout}): "
        "two_tier,single; two_tier_per_image is two_tier with one call per image from a front to the model "
        "(front_batch_size=1)",
    )
    p.add_argument(
        "--single-replicas",
        type=int,
        help="replicas of the single layout (default: ServeSettings' auto, 4 per GPU sharing it, 1 without a GPU)",
    )
    p.add_argument(
        "--single-cpus",
        type=float,
        help="CPUs per single-layout replica (default: ServeSettings' auto, the cores Ray's own processes leave "
        "split between the replicas, at least 1)",
    )
    p.add_argument(
        "--direct-ports",
        action="store_true",
        help="also drive the batching-on app on its ingress replicas' own HTTP ports (direct ingress), past the proxy",
    )
    p.add_argument("--memory-banks", type=int, help="serve with the first N of the run's memory banks (no retraining)")
    p.add_argument(
        "--only-handle-calls",
        action="store_true",
        help="measure handle_calls alone (no run, no HTTP) at --image-size and write it to --out",
    )
    p.add_argument("--out", default=str(HERE / "results" / "serve_load.json"))
    args = p.parse_args(argv)
    if args.only_handle_calls:
        from mapl_ray.pipelines.ray_env import init_ray

        key, minfo = machine_key()
        init_ray()
        result = {
            "machine": {"name": key, **minfo},
            "command": "python bench/serve_load.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "handle_calls": handle_calls(args.image_size),
        }
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result["handle_calls"]), f"\nwrote {args.out}")
        return 0
    try:  # checked before any load runs: a bad value would otherwise surface after the load steps
        args.fault_replica_counts = [int(x) for x in args.fault_replicas.split(",") if x.strip()]
    except ValueError:
        p.error(f"--fault-replicas: expected a comma list of integers or '' (none), got {args.fault_replicas!r}")

    # direct ingress holds a removed ingress replica open 30 s for a load balancer to notice; there is none
    # here, and every layout / batching step redeploys the app
    os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "1")
    apply_ray_serve_env(args.ingress)  # what `mapl serve` runs with (a RAY_SERVE_* variable already set wins)
    from ray import serve

    from mapl_ray.config import Config
    from mapl_ray.pipelines.ray_env import init_ray
    from mapl_ray.pipelines.serve import cluster_shape

    run = Path(args.run) if args.run else train_run(args)
    cfg = Config.load_run(run / "config.yaml")
    bodies, sizes = test_images(run, args.images)
    key, minfo = machine_key()
    load_before = os.getloadavg()
    init_ray()
    cluster_gpus, cluster_cpus = cluster_shape()  # what build_app resolves the settings against
    has_gpu = cluster_gpus >= 1
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    base = f"http://127.0.0.1:{args.port}"
    url = f"{base}/v1/predict"
    fronts = args.ingress_replicas  # None: ServeSettings' default for this cluster

    def resources(reps: int) -> dict:
        """Per model replica: a share of the one GPU, or of the CPU cores when there is none."""
        if has_gpu:
            return {"gpus_per_replica": 1.0 / reps, "cpus_per_replica": args.cpus_per_replica or 1.0}
        return {
            "gpus_per_replica": 0.0,
            "cpus_per_replica": args.cpus_per_replica or max(0.5, (os.cpu_count() or 2) / reps),
        }

    layouts = [x for x in args.layouts.split(",") if x]
    bad = [x for x in layouts if x not in BENCH_LAYOUTS]
    if bad:
        p.error(f"--layouts: {', '.join(bad)} not among {', '.join(BENCH_LAYOUTS)}")

    def layout_settings(layout: str, reps: int) -> dict:
        """``build_app`` settings of ``layout`` with ``reps`` model replicas (two_tier) besides ``common``.
        The single layout's are ``--single-replicas`` / ``--single-cpus`` where given, else ServeSettings'
        auto values (None here; build_app resolves them)."""
        if layout == "single":
            given = {
                "num_replicas": args.single_replicas,
                "gpus_per_replica": None,
                "cpus_per_replica": args.single_cpus,
            }
            return {"layout": "single", **given}
        per_image = {"front_batch_size": 1} if layout == "two_tier_per_image" else {}
        return {"layout": "two_tier", "num_replicas": reps, "ingress_replicas": fronts, **per_image, **resources(reps)}

    def resolved(layout: str, reps: int) -> ServeSettings:
        """The settings build_app deploys ``layout`` with on this cluster (auto values chosen)."""
        given = {k: v for k, v in layout_settings(layout, reps).items() if v is not None}
        return ServeSettings(run_dir=str(run), **given).resolve(
            has_gpu, cfg.data.image_size, cluster_cpus, cluster_gpus
        )

    common = {
        "device": "auto",
        "request_timeout_s": args.request_timeout_s,
        "max_queued_requests": 256,
        "access_log": args.access_log,
        "memory_banks": args.memory_banks,
    }
    conc = [int(c) for c in args.concurrency.split(",") if c]
    timeout_s = args.request_timeout_s + 15.0
    modes = (
        {"batching_on": args.batch_on} if args.skip_batching_off else {"batching_off": 1, "batching_on": args.batch_on}
    )
    waits = {"batching_off": {}, "batching_on": {}}  # each mode's settings besides ServeSettings' defaults
    for w in (float(x) for x in args.batch_waits.split(",") if x):
        mode = f"batching_on_wait_{w * 1000:g}ms"
        modes[mode], waits[mode] = args.batch_on, {"batch_wait_timeout_s": w}
    if args.fixed_wait:
        modes["batching_on_fixed_wait"], waits["batching_on_fixed_wait"] = args.batch_on, {"adaptive_batch_wait": False}
    for kind in (x for x in args.graph_batch_sizes.split(",") if x):
        mode = f"batching_on_{kind}"
        mode = next(m for n in range(1, 99) if (m := mode + (f"_{n}" if n > 1 else "")) not in modes)
        modes[mode], waits[mode] = args.batch_on, {"graph_batch_sizes": kind}
    default_mode = "batching_on" if has_gpu else "batching_off"  # what ServeSettings chooses by device
    if default_mode not in modes:  # --skip-batching-off without a GPU: the one mode measured
        default_mode = "batching_on"
    entry = {
        "machine": minfo,
        "command": "python bench/serve_load.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "settings": {
            "run_image_size": cfg.data.image_size,
            "encoder": cfg.model.encoder,
            "memory_banks": cfg.model.memory_banks,
            "memory_banks_served": args.memory_banks or cfg.model.memory_banks,
            "tta": cfg.eval.tta,
            "align": cfg.data.align,
            "category": cfg.data.category,
            "images_sent": len(bodies),
            "image_sizes_sent": sorted({tuple(s) for s in map(tuple, sizes)}),
            "requests_per_step": args.requests,
            "seconds_per_step": args.seconds,
            "model_replicas": args.replicas,
            **resources(args.replicas),
            "ingress_replicas": fronts,
            "access_log": args.access_log,
            "request_timeout_s": args.request_timeout_s,
            "client": "aiohttp on 127.0.0.1, raw image/png bodies",
            "healthz_probe": "separate process, GET /healthz every 20 ms during each step",
        },
        "default_batching": default_mode,
        "complete": False,
    }
    out = Path(args.out)

    def save() -> None:  # after every step: a run stopped by a time limit still leaves its numbers
        minfo["load_average_1m_before_after"] = [round(load_before[0], 2), round(os.getloadavg()[0], 2)]
        data = json.loads(out.read_text()) if out.is_file() else {}
        data.setdefault("machines", {})[key] = entry
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(data, indent=2) + "\n")

    two_tier = resolved("two_tier", args.replicas)  # its fronts also size the echo app
    entry["settings"]["ingress_replicas"] = two_tier.ingress_replicas
    entry["settings"]["ray_serve_env"] = {k: v for k, v in sorted(os.environ.items()) if k.startswith("RAY_SERVE_")}
    entry["settings"]["ingress"] = args.ingress
    entry["settings"]["cluster"] = {"gpus": cluster_gpus, "cpus_of_model_nodes": cluster_cpus}
    shown = (
        "num_replicas",
        "gpus_per_replica",
        "cpus_per_replica",
        "torch_threads",
        "ingress_replicas",
        "front_batch_size",
    )
    entry["settings"]["layouts"] = {}
    for lay in layouts:  # what each layout runs with, and which of it ServeSettings chose (auto)
        given, r = layout_settings(lay, args.replicas), resolved(lay, args.replicas)
        auto = sorted(k for k in shown if k in given and given[k] is None)
        entry["settings"]["layouts"][lay] = {**{k: getattr(r, k) for k in shown}, "auto": auto}
    entry["stages"] = stage_costs(run, bodies, args.batch_on, memory_banks=args.memory_banks)
    print("stages", entry["stages"], flush=True)
    if args.http_ceiling or args.only_ceiling:
        entry["http_ceiling"] = http_ceiling(base, bodies, two_tier.ingress_replicas, conc, args, timeout_s)
        save()
    if args.only_ceiling:
        serve.shutdown()
        return 0
    entry["layouts"] = {}
    for layout in layouts:
        lay = entry["layouts"][layout] = {}
        for mode, b in modes.items():
            wait = waits[mode]
            t_deploy = time.perf_counter()
            deploy(run, "bench", max_batch_size=b, **wait, **common, **layout_settings(layout, args.replicas))
            deploy_s = round(time.perf_counter() - t_deploy, 2)  # replicas started, graphs captured, ready
            asyncio.run(drive(url, bodies, 2, 2 * len(bodies), 60, timeout_s))  # warm-up
            lay[mode] = {"max_batch_size": b, **wait, "deploy_s": deploy_s, "concurrency": {}}
            for c in conc:
                with HealthProbe(f"{base}/healthz") as probe:
                    r = asyncio.run(drive(url, bodies, c, args.requests, args.seconds, timeout_s))
                lay[mode]["concurrency"][str(c)] = {**summarise(r), **probe.result}
                print(layout, mode, c, lay[mode]["concurrency"][str(c)], flush=True)
                save()
        # the last batching-on app is deployed now
        if args.direct_ports:  # past Serve's proxy: each client on one ingress replica's own port
            urls = direct_ingress_urls("bench", "127.0.0.1")
            lay["direct_ports"] = {"ports": len(urls), "concurrency": {}}
            for c in conc if urls else []:
                r = asyncio.run(drive(urls, bodies, c, args.requests, args.seconds, timeout_s))
                lay["direct_ports"]["concurrency"][str(c)] = summarise(r)
                print(layout, "direct ports", c, lay["direct_ports"]["concurrency"][str(c)], flush=True)
                save()
        if args.images_per_request > 1:  # stations that send several images per request (multipart)
            bodies_k, ctype_k = multipart_bodies(bodies, args.images_per_request)
            lay["batched_requests"] = {"images_per_request": args.images_per_request, "concurrency": {}}
            asyncio.run(drive(url, bodies_k, 2, 4, 60, timeout_s, content_type=ctype_k))  # warm-up
            for c in conc:
                r = asyncio.run(drive(url, bodies_k, c, args.requests, args.seconds, timeout_s, content_type=ctype_k))
                lay["batched_requests"]["concurrency"][str(c)] = summarise(r, args.images_per_request)
                print(layout, "batched requests", c, lay["batched_requests"]["concurrency"][str(c)], flush=True)
                save()
        lay["batching_gain"] = (
            {}
            if args.skip_batching_off
            else {
                c: round(
                    lay["batching_on"]["concurrency"][c]["images_per_s"]
                    / max(1e-9, lay["batching_off"]["concurrency"][c]["images_per_s"]),
                    3,
                )
                for c in lay["batching_on"]["concurrency"]
            }
        )
    first = entry["layouts"][layouts[0]]  # the results file's top-level numbers (issue 18's schema)
    for part in ("batching_off", "batching_on", "batched_requests", "batching_gain"):
        if part in first:
            entry[part] = first[part]
    entry["concurrency"] = entry[default_mode]["concurrency"]
    entry["oversized_upload"] = oversized_upload(url)  # 1 GiB announced against the 20 MiB default limit
    print("oversized upload", entry["oversized_upload"], flush=True)
    save()
    entry["fault"] = []
    fault_reps = list(args.fault_replica_counts)
    if layouts[0] == "single":  # the load steps' replicas whatever the list says: one test, not one per entry
        fault_reps = fault_reps[:1]
    for reps in fault_reps:
        deploy(run, "bench", max_batch_size=modes[default_mode], **common, **layout_settings(layouts[0], reps))
        asyncio.run(drive(url, bodies, 2, 2 * len(bodies), 60, timeout_s))
        dep = MODEL_DEPLOYMENT[layouts[0]]
        # recovery means all the deployed replicas running again (the single layout's are its own, not
        # reps; counting reps there, the survivors alone counted as recovered)
        deployed = resolved(layouts[0], reps).num_replicas
        entry["fault"].append(
            {
                "replicas_deployed": deployed,
                **fault_test(url, bodies, "bench", deployed, args.fault_after, args.fault_seconds, timeout_s, dep),
            }
        )
        print("fault", entry["fault"][-1], flush=True)
        save()
    # last: its handle routes in an event loop that ends with it (RAY_SERVE_THROUGHPUT_OPTIMIZED)
    entry["handle_calls"] = handle_calls(cfg.data.image_size)
    print("handle calls", entry["handle_calls"], flush=True)
    entry["complete"] = True
    save()
    print(f"wrote {out} [{key}]")
    # not serve.shutdown(): it shuts the cached handles down through the measurement's event loop, which has
    # ended (RuntimeError: Event loop is closed, H100 2026-12-07); the apps end with this process's local Ray
    import ray

    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
