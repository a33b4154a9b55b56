"""Where the paper-setting training run's wall time goes, measured two ways in one call.

``plain``: the run as a user starts it (``train_summary.json`` ``phases_s``, ``engine/loop._phases``):
host time between the loop's markers. The step is launched asynchronously, so a phase that waits on the
GPU (a log line reading the losses, a checkpoint copying weights) is charged with the GPU work queued
before it. ``attributed``: the same run with ``torch.cuda.synchronize`` at the end of each phase (the
step, the pseudo-labeler's refit start and finish with their feature passes and forward-graph captures, the
memory-bank refills with their parts, validation), so each phase is charged with its own GPU
work; its total is a little longer (no overlap across phases). ``ray``: ``mapl train --gpu`` through Ray
Train (one worker), the user's command, plain. ``plain`` and ``attributed`` run ``mapl train --no-ray
--gpu`` in this process (the GPU where there is one), so the first of them pays the process's first-use
costs (CUDA modules loaded on first use, cuDNN plans) and the later ones do not; a mode named twice
(``--modes plain,plain``) measures both. ``--profile``: the first in-process mode runs under cProfile and the
JSON gets its functions with the most cumulative and own time (``profile``): where first-use costs go.
``--cudnn off``: the in-process modes run with ``torch.backends.cudnn.enabled = False`` (PyTorch's own
convolution kernels): whether a fresh process's first-use costs are cuDNN's plans.

    python bench/train_phases.py --data .data/mvtec_ad --category screw --textures .data/dtd256 \\
        --weights .data/w/tf_efficientnet_lite2.safetensors [--modes plain,attributed,ray] [--set k=v]

``--keep DIR`` keeps the run folders (``DIR/<mode>/``: e.g. a run to serve next in the same device call).
Writes ``bench/results/train_phases.json`` (``--out``): per mode the summary's timings, phases, graph
captures and image AUROC, with the machine, command and settings.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import json
import platform
import pstats
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
KEEP = (
    "train_wall_s",
    "loop_wall_s",
    "phases_s",
    "step_s_median",
    "first_batch_s",
    "loader_wait_s",
    "loader_workers",
    "pseudo_fit_s",
    "pseudo_fit_wait_s",
    "pseudo_fit_parts_s",
    "pseudo_snapshot_rebuilds",
    "graph_captures",
    "eager_steps",
    "graph_capture_error",
    "cuda_graph_step",
    "images_per_s",
)


def machine() -> dict:
    import os

    import torch

    out = {
        "host": platform.node(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


@contextlib.contextmanager
def attributed(calls: dict[str, list[float]]):
    """Synchronise the GPU at the end of every phase of ``Trainer.run`` (monkeypatched for this run only);
    ``calls`` gets each call's seconds by phase (the pseudo-labeler's refits, validation, checkpoints,
    and training steps over 20 ms: eager steps and CUDA-graph captures)."""
    import torch

    from mapl_ray.engine import loop
    from mapl_ray.engine.step import CudaGraphStep
    from mapl_ray.model.graphs import GraphedForward
    from mapl_ray.model.memory import MemoryBank
    from mapl_ray.model.network import MAPLModel
    from mapl_ray.pseudo.labeler import PseudoLabeler

    def sync() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def after(fn, name: str | None, over_s: float = 0.0):
        def wrapped(*a, **k):
            sync()
            t0 = time.perf_counter()
            out = fn(*a, **k)
            sync()
            dt = time.perf_counter() - t0
            if name and dt > over_s and not (name == "validation" and not out):
                calls.setdefault(name, []).append(round(dt, 4))
            return out

        return wrapped

    saved = {
        (loop, "unwrap"): (loop.unwrap, None),  # called once per step right before the step's time is taken
        (loop.Trainer, "_validate"): (loop.Trainer._validate, "validation"),
        (loop.Trainer, "checkpoint"): (loop.Trainer.checkpoint, "checkpoint"),
        (PseudoLabeler, "start_fit"): (PseudoLabeler.start_fit, "refit_start"),
        (PseudoLabeler, "finish_fit"): (PseudoLabeler.finish_fit, "refit_finish"),
        (loop.Trainer, "rechoose_banks"): (loop.Trainer.rechoose_banks, "bank_refill"),
        # parts of the above (a call inside another is charged to both)
        (loop, "memory_bank_images"): (loop.memory_bank_images, "bank_images"),
        (MAPLModel, "refresh_memory"): (MAPLModel.refresh_memory, "refresh_memory"),
        (MemoryBank, "set"): (MemoryBank.set, "bank_set"),
        (PseudoLabeler, "_knn_features"): (PseudoLabeler._knn_features, "knn_features"),
        (PseudoLabeler, "features"): (PseudoLabeler.features, "occ_features"),
        (GraphedForward, "_capture"): (GraphedForward._capture, "forward_graph_capture"),
        (CudaGraphStep, "__call__"): (CudaGraphStep.__call__, "slow_steps"),
    }
    try:
        for (owner, name), (fn, label) in saved.items():
            setattr(owner, name, after(fn, label, 0.02 if label == "slow_steps" else 0.0))
        yield
    finally:
        for (owner, name), (fn, _) in saved.items():
            setattr(owner, name, fn)


def top_functions(prof: cProfile.Profile, n: int = 45) -> dict[str, list[str]]:
    """The ``n`` functions with the most cumulative time and the ``n`` with the most own time, one line each
    (seconds cumulative / own, calls, ``file:line(function)`` with the path cut after site-packages)."""
    st = pstats.Stats(prof)
    rows = []
    for (file, line, fn), (_cc, nc, tt, ct, _callers) in st.stats.items():
        short = file.split("site-packages/")[-1].split("/main/")[-1]
        rows.append((ct, tt, nc, f"{short}:{line}({fn})"))
    fmt = lambda r: f"{r[0]:8.3f} {r[1]:8.3f} {r[2]:7d} {r[3]}"  # noqa: E731
    return {
        "columns": "cumulative_s own_s calls function",
        "cumulative": [fmt(r) for r in sorted(rows, reverse=True)[:n]],
        "own": [fmt(r) for r in sorted(rows, key=lambda r: -r[1])[:n]],
    }


def train(args, mode: str, work: Path, profile: bool = False) -> dict:
    import torch

    gpu = torch.cuda.is_available()
    out = work / mode
    cmd = [
        "train",
        "--data",
        args.data,
        "--category",
        args.category,
        "--textures",
        args.textures,
        "--out",
        str(out),
        "--steps",
        str(args.steps),
        "--quiet",
        *(["--weights", args.weights] if args.weights else []),
        *(["--gpu"] if gpu else []),  # with --no-ray: train in this process on the GPU
        *([] if mode == "ray" else ["--no-ray"]),
        *[x for kv in args.set for x in ("--set", kv)],
    ]
    t0 = time.perf_counter()
    if mode == "ray":
        import subprocess

        rc = subprocess.run([sys.executable, "-m", "mapl_ray.cli", *cmd]).returncode
    else:
        import mapl_ray.cli as cli

        calls: dict[str, list[float]] = {}
        prof = cProfile.Profile() if profile else None
        with attributed(calls) if mode == "attributed" else contextlib.nullcontext():
            rc = prof.runcall(cli.main, cmd) if prof else cli.main(cmd)
    job_s = time.perf_counter() - t0
    rec: dict = {"command": "mapl " + " ".join(cmd), "rc": rc, "job_wall_s": round(job_s, 2)}
    if mode == "attributed":
        rec["calls_s"] = calls
    if prof is not None:
        rec["profile"] = top_functions(prof)
    summary = out / "train_summary.json"
    if summary.is_file():
        s = json.loads(summary.read_text())
        rec.update({k: s.get(k) for k in KEEP})
    metrics = out / "metrics.json"
    if metrics.is_file():
        m = json.loads(metrics.read_text())
        rec["image_auroc"] = m["overall"]["image_auroc"]
        rec["validation_objective"] = (m.get("validation") or {}).get("objective")  # what a setting is chosen on
    return rec


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True), p.add_argument("--category", default="screw")
    p.add_argument("--textures", required=True), p.add_argument("--weights")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--modes", default="plain,attributed,ray")
    p.add_argument("--set", action="append", default=[], help="config override key=value (repeatable)")
    p.add_argument("--profile", action="store_true", help="cProfile the first in-process mode (module docstring)")
    p.add_argument("--cudnn", choices=("on", "off"), default="on", help="cuDNN for the in-process modes")
    p.add_argument("--keep", help="write the run folders under this folder and keep them (default: a temporary one)")
    p.add_argument("--out", default=str(HERE / "results" / "train_phases.json"))
    args = p.parse_args()
    if args.cudnn == "off":
        import torch

        torch.backends.cudnn.enabled = False
    res = {
        "machine": machine(),
        "command": "python bench/train_phases.py " + " ".join(sys.argv[1:]),
        "settings": {
            "steps": args.steps,
            "category": args.category,
            "overrides": args.set,
            "modes": args.modes,
            "profile": args.profile,
            "cudnn": args.cudnn,
        },
        "runs": {},
    }
    keep = contextlib.nullcontext(args.keep) if args.keep else tempfile.TemporaryDirectory(prefix="mapl_phases_")
    with keep as tmp:
        for i, mode in enumerate(args.modes.split(",")):
            key = mode if mode not in res["runs"] else f"{mode}_{i + 1}"  # a mode again: the process is warm now
            first_in_process = mode != "ray" and all(m == "ray" for m in args.modes.split(",")[:i])
            res["runs"][key] = train(args, mode, Path(tmp) / key, args.profile and first_in_process)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(res, indent=1))
            print(key, json.dumps({k: v for k, v in res["runs"][key].items() if k != "profile"}), flush=True)
            for line in res["runs"][key].get("profile", {}).get("cumulative", []):
                print("  ", line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
