"""``mapl`` command line: train, evaluate, predict.

mapl train --data ROOT --category NAME [--config YAML] [--out RUN] [flags] [--set section.field=value ...]
mapl train --resume --out RUN [--steps N]
mapl evaluate RUN
mapl predict RUN IMAGE [IMAGE ...]      (JSON lines: path, score, label, heatmap)
mapl serve RUN [--host 127.0.0.1] [--port 8000] [--replicas N] [--set key=value ...]
                                        (Ray Serve HTTP app, see docs/serving.md)
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from .config import Config, ConfigError, config_file_keys
from .presets import category_preset

# CLI flag -> configuration field (the YAML holds every hyperparameter; flags override it)
FLAG_FIELDS = {
    "data": "data.root",
    "category": "data.category",
    "image_size": "data.image_size",
    "unlabeled": "data.unlabeled_dir",
    "unlabeled_fraction": "data.unlabeled_fraction",
    "contamination": "data.contamination",
    "labeled_anomalies": "data.labeled_anomalies",
    "skip_bad_images": "data.skip_bad_images",
    "require_masks": "data.require_masks",
    "seed": "data.seed",
    "textures": "simulation.texture_dir",
    "encoder": "model.encoder",
    "weights": "model.weights",
    "memory_samples": "model.memory_samples",
    "memory_banks": "model.memory_banks",
    "memory_backend": "model.memory_backend",
    "steps": "train.steps",
    "lr": "train.lr",
    "num_workers": "train.num_workers",
    "gpu": "train.use_gpu",
    "amp": "train.amp",
    "top_k": "eval.top_k",
}


def _known_errors() -> tuple[type[BaseException], ...]:
    from .data.layout import LayoutError
    from .model.encoder import WeightsError
    from .pipelines.ray_train import TrainingFailed
    from .runfolder import CheckpointError, RunFolderError

    return (ConfigError, LayoutError, WeightsError, CheckpointError, RunFolderError, TrainingFailed, FileNotFoundError)


def build_parser() -> argparse.ArgumentParser:
    """The ``mapl`` argument parser (one sub-command per job)."""
    p = argparse.ArgumentParser(prog="mapl", description="MAPL surface-defect detection on Ray")
    sub = p.add_subparsers(dest="command", required=True)
    _add_train_parser(sub)
    _add_run_parsers(sub)
    return p


def _add_train_parser(sub) -> None:
    t = sub.add_parser("train", help="train and evaluate on a category in MVTec AD layout")
    t.add_argument("--data", help="dataset root (MVTec AD layout: ROOT/CATEGORY/train/good ...)")
    t.add_argument("--category", help="category folder name, e.g. screw")
    t.add_argument("--config", help="YAML configuration (every hyperparameter); flags override it")
    t.add_argument("--out", help="run folder to write (default runs/CATEGORY-TIMESTAMP)")
    t.add_argument("--resume", action="store_true", help="continue the stopped run in --out from its checkpoint")
    t.add_argument("--textures", help="folder of texture images for anomaly simulation (e.g. DTD)")
    t.add_argument("--unlabeled", help="folder of unlabeled images (the unlabeled pool)")
    t.add_argument(
        "--unlabeled-fraction", type=float, help="benchmarking: fraction of train/good used as unlabeled pool"
    )
    t.add_argument(
        "--contamination", type=float, help="benchmarking: fraction of test anomalies put into the unlabeled pool"
    )
    t.add_argument("--labeled-anomalies", type=int, help="k labeled anomalies per defect type (taken from test)")
    t.add_argument("--skip-bad-images", action="store_true", default=None, help="skip unreadable images with a warning")
    t.add_argument("--encoder", help="timm backbone (default tf_efficientnet_lite2) or 'mapl' (from scratch)")
    t.add_argument("--weights", help="local encoder weights file")
    t.add_argument(
        "--no-masks",
        dest="require_masks",
        action="store_false",
        default=None,
        help="image-label-only data: defect images need no ground-truth mask (no pixel metrics for them)",
    )
    t.add_argument("--image-size", type=int, help="square input size in pixels (default 256)")
    t.add_argument("--memory-samples", type=int, help="normal images in the memory bank (default 30)")
    t.add_argument(
        "--memory-banks",
        type=int,
        help="memory banks of --memory-samples different normal images each; anomaly maps are averaged "
        "over them at inference (default 1, screw's preset 10; limited by the training normals)",
    )
    t.add_argument(
        "--memory-backend", choices=["auto", "faiss", "torch"], help="nearest-neighbour search (default auto)"
    )
    t.add_argument("--steps", type=int, help="training steps (default 500)")
    t.add_argument("--lr", type=float, help="peak learning rate (default 0.003)")
    t.add_argument(
        "--seed",
        type=int,
        help="data.seed: the split, validation normals and memory-bank choice "
        "(the training seed is train.seed: --set train.seed=N)",
    )
    t.add_argument("--top-k", type=int, help="image score = mean of the top-k anomaly-map pixels (default 100)")
    t.add_argument("--num-workers", type=int, help="Ray Train workers (DDP when > 1)")
    t.add_argument("--gpu", action="store_true", default=None, help="one GPU per Ray Train worker")
    t.add_argument("--amp", choices=["auto", "off", "bf16"])
    t.add_argument(
        "--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", help="override any config field"
    )
    t.add_argument(
        "--no-category-preset",
        dest="category_preset",
        action="store_false",
        help="ignore the category's preset defaults (mapl_ray.presets.CATEGORY_PRESETS, e.g. screw's pose "
        "normalisation data.align=principal_axis); precedence: preset < --config file < flags and --set",
    )
    t.add_argument("--no-ray", action="store_true", help="train in this process without Ray (debugging)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_run_parsers(sub) -> None:
    e = sub.add_parser("evaluate", help="(re)compute metrics.json and report.md of a run on its test split")
    e.add_argument("run")
    e.add_argument("--device", default="auto")

    pr = sub.add_parser("predict", help="score images with a trained run (JSON lines on stdout)")
    pr.add_argument("run")
    pr.add_argument("images", nargs="+")
    pr.add_argument("--heatmaps", help="folder for heatmap PNGs (default RUN/predictions)")
    pr.add_argument("--device", default="auto")

    sv = sub.add_parser(
        "serve", help="serve a trained run over HTTP with Ray Serve (POST /v1/predict; docs/serving.md)"
    )
    sv.add_argument("run")
    sv.add_argument(
        "--host",
        default="127.0.0.1",
        help="bind address (default 127.0.0.1: this machine only; 0.0.0.0 accepts other machines, set a token then)",
    )
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument(
        "--replicas", type=int, help="model replicas (each loads the model; 2 keep serving while one restarts)"
    )
    sv.add_argument("--gpus-per-replica", type=float, help="default: 1 when the Ray cluster has a GPU, else 0")
    sv.add_argument("--max-batch-size", type=int, help="images per forward pass (default: 32 on a GPU, 1 on CPU)")
    sv.add_argument("--device", help="auto (default), cpu or cuda")
    sv.add_argument(
        "--token-file",
        help="file holding the bearer token (else $MAPL_SERVE_TOKEN when set); every "
        "route but /healthz then needs 'Authorization: Bearer <token>'",
    )
    sv.add_argument(
        "--set",
        dest="serve_overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any serve setting (max_body_bytes, max_pixels, min_side, max_aspect, request_timeout_s, "
        "max_queued_requests, ...; see docs/serving.md); repeatable",
    )


def resolve_config(args: argparse.Namespace) -> Config:
    """Config from (the resumed run's config.yaml | category preset + --config | defaults) + flags + --set
    overrides. The category preset (:data:`~mapl_ray.presets.CATEGORY_PRESETS`) fills only the fields that
    neither the file nor a flag sets."""
    if args.resume:
        if not args.out:
            raise ConfigError("--resume needs --out RUN (the run folder to continue)")
        from .runfolder import load_run_config

        cfg = load_run_config(args.out)
    else:
        cfg = Config.load(args.config) if args.config else Config()
        file_keys = config_file_keys(args.config) if args.config else set()
    overrides: dict[str, Any] = {}
    for flag, fieldname in FLAG_FIELDS.items():
        value = getattr(args, flag, None)
        if value is not None:
            overrides[fieldname] = value
    if args.resume:
        allowed = {"train.steps", "train.num_workers", "train.use_gpu", "train.amp", "data.skip_bad_images"}
        bad = sorted(set(overrides) - allowed)
        if bad:
            raise ConfigError(
                f"--resume continues the saved configuration; only {sorted(allowed)} may change, got {bad}"
            )
    for item in args.set:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected SECTION.FIELD=VALUE")
        key, value = item.split("=", 1)
        overrides[key.strip()] = value.strip()
    if not args.resume:
        category = str(overrides.get("data.category", cfg.data.category))
        if not getattr(args, "category_preset", True):
            if category_preset(category):
                print(f"mapl train: category {category!r} preset skipped (--no-category-preset)", file=sys.stderr)
        else:
            preset = category_preset(category, file_keys | set(overrides))
            if preset:
                print(
                    f"mapl train: category {category!r} preset: "
                    + ", ".join(f"{k}={v}" for k, v in preset.items())
                    + " (--no-category-preset skips it)",
                    file=sys.stderr,
                )
                cfg = cfg.override(preset)
    return cfg.override(overrides) if overrides else cfg


def cmd_train(args: argparse.Namespace) -> int:
    from .main_job import run_train_job

    cfg = resolve_config(args)
    out = (
        Path(args.out) if args.out else Path("runs") / f"{cfg.data.category or 'run'}-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    t0 = time.perf_counter()
    metrics = run_train_job(cfg, out, resume=args.resume, use_ray=not args.no_ray, progress=not args.quiet)
    o = metrics["overall"]
    print(
        json.dumps(
            {
                "run": str(out),
                "image_auroc": o.get("image_auroc"),
                "pixel_auroc": o.get("pixel_auroc"),
                "aupro": o.get("aupro"),
                "f1_max": o.get("f1_max"),
                "wall_s": round(time.perf_counter() - t0, 1),
            }
        )
    )
    print(f"run folder: {out}  (metrics.json, report.md, scores.csv, plots/, heatmaps/, checkpoint/)", file=sys.stderr)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .eval.evaluate import evaluate_run

    metrics = evaluate_run(args.run, device=args.device)
    print(json.dumps(metrics["overall"]))
    run = Path(args.run)
    print(f"wrote {run / 'metrics.json'}, {run / 'report.md'} and {run / 'scores.csv'}", file=sys.stderr)
    return 0


def heatmap_name(path: str) -> str:
    """``<stem>_<8 hex of the absolute path>.png``: the same image always maps to the same file, and
    images that share a name in different folders (``good/000.png``, ``crack/000.png``) do not collide."""
    import hashlib

    p = Path(path)
    return f"{p.stem}_{hashlib.sha1(str(p.resolve()).encode()).hexdigest()[:8]}.png"


def cmd_predict(args: argparse.Namespace) -> int:
    import numpy as np

    from .data.layout import ImageReadError
    from .eval.report import save_heatmap_overlay
    from .inference import Predictor

    pred = Predictor(args.run, device=args.device)
    good, images, poses, failed = [], [], [], {}
    for path in args.images:  # one unreadable file is reported on its own line; the others are still scored
        try:
            image, pose = pred.load_image(path)
            images.append(image)
            poses.append(pose)
            good.append(path)
        except ImageReadError as e:
            failed[path] = str(e)
    records, maps = pred.predict_images(np.stack(images), good) if images else ([], [])
    images, maps = pred.in_files_frame(good, images, maps, poses)  # heatmaps on the images as they are
    by_path = {r["path"]: (r, img, amap) for r, img, amap in zip(records, images, maps)}
    out_dir = Path(args.heatmaps) if args.heatmaps else Path(args.run) / "predictions"
    out_dir.mkdir(parents=True, exist_ok=True)
    for path in args.images:
        if path in failed:
            print(json.dumps({"path": path, "error": failed[path]}))
            continue
        rec, img, amap = by_path[path]
        heat = out_dir / heatmap_name(path)
        save_heatmap_overlay(img, amap, heat, title=f"score {rec['score']:.4f}", vmin=0.0, vmax=1.0)
        rec["heatmap"] = str(heat)
        print(json.dumps(rec))
    if failed:
        rest = "the others were scored" if len(failed) < len(args.images) else "nothing was scored"
        print(
            f"mapl predict: error: {len(failed)} of {len(args.images)} images could not be read "
            f"(see their 'error' lines); {rest}",
            file=sys.stderr,
        )
        return 2
    return 0


def serve_settings(args: argparse.Namespace) -> dict[str, Any]:
    """``mapl serve`` flags and ``--set key=value`` pairs as keyword arguments of
    :func:`~mapl_ray.pipelines.serve.build_app` (validated there, by ServeSettings)."""
    out: dict[str, Any] = {}
    for item in args.serve_overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set max_pixels=20000000")
        out[key.strip()] = value.strip()
    flags = {
        "num_replicas": args.replicas,
        "gpus_per_replica": args.gpus_per_replica,
        "max_batch_size": args.max_batch_size,
        "device": args.device,
        "token_file": args.token_file,
    }
    out.update({k: v for k, v in flags.items() if v is not None})
    return out


def cmd_serve(args: argparse.Namespace) -> int:
    import signal

    from ray import serve

    from .pipelines.ray_env import init_ray
    from .pipelines.serve import build_app
    from .runfolder import require_run_folder
    from .serving.auth import load_token
    from .serving.settings import ServeSettings

    run = require_run_folder(args.run)
    settings = serve_settings(args)
    try:  # a bad --set value or token file is a user's mistake: say so before Ray starts
        s = ServeSettings.from_args({**settings, "run_dir": str(run)})
        load_token(s.token_env, s.token_file)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    init_ray()  # RAY_ADDRESS points this at a running cluster
    app = build_app(run, **settings)
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(app, name="mapl", route_prefix="/")  # returns once the replicas are ready
    print(
        f"serving {run.name} on http://{args.host}:{args.port}: POST /v1/predict (Content-Type image/png, "
        "multipart or JSON), GET /healthz /readyz /v1/model /docs; Ctrl-C stops it",
        file=sys.stderr,
    )

    def stop(signum, frame):  # SIGTERM (kill, a job scheduler) stops cleanly like Ctrl-C
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()  # stops the replicas and the HTTP proxy (local Ray stops with this process)
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    handlers = {"train": cmd_train, "evaluate": cmd_evaluate, "predict": cmd_predict, "serve": cmd_serve}
    try:
        return handlers[args.command](args)
    except _known_errors() as e:
        print(f"mapl {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
