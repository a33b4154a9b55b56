"""Where a served request's time goes: py-spy on every model replica under load, CPU seconds per process
and GPU utilisation, for the ``single`` layout at ServeSettings' defaults and with one replica.

Deploys the app as ``bench/serve_load.py`` does (HAProxy ingress, ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1``,
access log off), drives ``--concurrency`` for ``--warm-s`` then ``--seconds`` with serve_load's client, and
records each replica with ``py-spy record --threads`` (the ``py-spy`` binary must be on PATH; the GPU
payload carries its wheel) for ``--spy-s``. Writes ``--out`` (JSON: load figures, the busiest processes'
CPU cores, each replica's top self-time frames, the GPU utilisation series from ``nvidia-smi``).

    python bench/serve_profile.py --run runs/screw
    bash bench/gpu_run.sh serve_profile.py --data .data/mvtec_ad --textures .data/dtd256 \\
        --weights .data/w/tf_efficientnet_lite2.safetensors
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` from ``/proc`` (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return 0.0


def processes() -> dict[int, str]:
    """pid -> the first 80 characters of its command line, for every process of this machine."""
    out = {}
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ").strip()[:80]
            except OSError:
                continue
            if cmd:
                out[int(pid)] = cmd
    return out


def self_time_top(raw: Path, n: int = 12) -> dict:
    """A py-spy ``raw`` file -> total samples and the ``n`` frames with the most self time."""
    total, counts = 0, collections.Counter()
    for line in raw.read_text().splitlines():
        stack, k = line.rsplit(" ", 1)
        total += int(k)
        leaf = stack.split(";")[-1]
        counts[leaf.split(" (")[0] + " (" + leaf.split("(")[-1].split(":")[0].split("/")[-1] + ")"] += int(k)
    return {"samples": total, "self_top": [[v, f] for f, v in counts.most_common(n)]}


def profile_layout(run: Path, bodies: list[bytes], url: str, settings: dict, args, spill: Path) -> dict:
    """Deploy ``settings``, warm up, then load while py-spy records every replica."""
    import serve_load as SL

    SL.deploy(run, "mapl", layout="single", device="auto", max_queued_requests=256, access_log=False, **settings)
    asyncio.run(SL.drive(url, bodies, args.concurrency, 10**6, args.warm_s, 60))
    replicas = [p for p, c in processes().items() if "ServeReplica:mapl" in c]
    before = {p: (c, cpu_seconds(p)) for p, c in processes().items()}
    raws = {p: spill / f"{p}.raw" for p in replicas}
    spies = [
        subprocess.Popen(
            ["py-spy", "record", "-p", str(p), "-d", str(args.spy_s), "-r", "200", "--threads", "-f", "raw"]
            + ["-o", str(raws[p]), "--nonblocking"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for p in replicas
    ]
    t0 = time.time()
    load = SL.summarise(asyncio.run(SL.drive(url, bodies, args.concurrency, 10**6, args.seconds, 60)))
    wall = time.time() - t0
    for spy in spies:
        spy.wait()
    busiest = sorted(((cpu_seconds(p) - b) / wall, c) for p, (c, b) in before.items())[::-1][:6]
    return {
        "settings": settings,
        "load": load,
        "cpu_cores": [[round(u, 3), c] for u, c in busiest],
        "py_spy_self_time_top": {str(p): self_time_top(f) for p, f in raws.items() if f.is_file()},
    }


def main(argv=None) -> int:
    from mapl_ray.serving.settings import apply_ray_serve_env

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", help="trained run folder (else one is trained as bench/serve_load.py does)")
    p.add_argument("--data"), p.add_argument("--category", default="screw"), p.add_argument("--textures")
    p.add_argument("--weights"), p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--train-out", default="/tmp/mapl_serve_profile_run")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--warm-s", type=float, default=4.0)
    p.add_argument("--seconds", type=float, default=12.0)
    p.add_argument("--spy-s", type=int, default=8)
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--out", default=str(HERE / "results" / "serve_profile.json"))
    args = p.parse_args(argv)
    args.set = []
    apply_ray_serve_env("haproxy")  # before Ray starts: its processes inherit the variables
    os.environ["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] = "1"  # redeploys between layouts
    import serve_load as SL
    from ray import serve

    from mapl_ray.pipelines.ray_env import init_ray

    run = Path(args.run) if args.run else SL.train_run(args)
    bodies, _ = SL.test_images(run, 32)
    init_ray()
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    url = f"http://127.0.0.1:{args.port}/v1/predict"
    smi = (
        subprocess.Popen(
            ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-l", "1"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        if SL.machine_key()[1].get("gpu")
        else None
    )
    result = {
        "machine": SL.machine_key()[1],
        "command": "python bench/serve_profile.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "layouts": {},
    }
    cpus = max(1, (os.cpu_count() or 2) - 2)
    with tempfile.TemporaryDirectory() as spill:
        for label, settings in (
            ("single_auto", {}),
            ("single_1replica", {"num_replicas": 1, "cpus_per_replica": cpus}),
        ):
            result["layouts"][label] = profile_layout(run, bodies, url, settings, args, Path(spill))
            print(label, result["layouts"][label]["load"], flush=True)
    if smi is not None:
        smi.terminate()
        result["gpu_utilisation_pct_series"] = [int(x) for x in smi.communicate()[0].split() if x.isdigit()]
    Path(args.out).write_text(json.dumps(result, indent=1))
    serve.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
