"""Ray Tune over the training run: a hyperparameter search judged on the validation objective only.

Each trial trains one run (:func:`mapl_ray.engine.loop.train_model` in the trial's process, on its share
of a GPU) with a configuration sampled from the search space, and reports the validation objective
(:mod:`mapl_ray.eval.validation`: labeled normals, simulated anomalies, held-out labeled anomalies; never
a test file) every ``eval.validate_every`` steps, so ASHA stops the trials that fall behind. Optuna's
searcher (TPE) proposes the trials when ``optuna`` is installed (the ``tune`` extra), random search
otherwise; the first trial is the base configuration itself. The driver decodes the training images and
builds the validation set once; the trials share them through Ray's object store. The test split's
files are listed (to keep them out of every other set) but never opened.

The search folder (``--out``)::

    OUT/base.yaml      the configuration every trial starts from (config.yaml schema)
    OUT/split.json     the split the trials train and validate on
    OUT/search.json    the search space, the number of trials and each trial's share (what --resume reuses)
    OUT/search/        Ray Tune's experiment (RunConfig(storage_path=OUT)); Tuner.restore resumes it
    OUT/best.yaml      the best trial's full configuration: `mapl train --config OUT/best.yaml`
    OUT/trials.csv     every trial: its parameters, validation objective, steps run, wall time
    OUT/trials.md      the same as a Markdown table, best first
    OUT/search.png     the validation objective over steps of each trial, and by trial
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..config import Config, ConfigError, field_names, field_type, nearest_fields, read_yaml_mapping, section_names
from ..runfolder import SPLIT_FILE
from .ray_env import init_ray, require_local_gpus

log = logging.getLogger("mapl_ray.tune")

DEFAULT_SEARCH_SPACE = Path(__file__).with_name("search_space.yaml")
METRIC = "validation_objective"
BASE_FILE, BEST_FILE, TRIALS_CSV, TRIALS_MD, PLOT_FILE, EXPERIMENT, SETTINGS_FILE = (
    "base.yaml",
    "best.yaml",
    "trials.csv",
    "trials.md",
    "search.png",
    "search",
    "search.json",
)
KINDS = ("choice", "int", "uniform", "loguniform")


class SearchInterrupted(RuntimeError):
    """The search stopped before every trial ended (Ctrl-C); ``mapl tune --resume`` continues it."""


# ----------------------------------------------------------------------------- the search space
def load_search_space(path: str | Path | None = None) -> dict[str, dict[str, list]]:
    """The search space in ``path`` (default :data:`DEFAULT_SEARCH_SPACE`): ``{"section.field": {kind: values}}``.

    Raises:
        ConfigError: the file is missing or not YAML, a key names no configuration field or one that
            cannot be searched (``data.*``, ``eval.validation_*``), a kind is unknown, or a bound or
            choice is a value the field does not accept (each names the file and the key).
    """
    p = Path(path) if path else DEFAULT_SEARCH_SPACE
    space = read_yaml_mapping(p, "search space file", "SECTION.FIELD: {KIND: VALUES}")
    if not space:
        raise ConfigError(f"search space file {p} is empty: expected SECTION.FIELD: {{KIND: VALUES}} entries")
    names = set(field_names())
    for key, spec in space.items():
        where = f"search space {p}: {key}"
        if key in section_names() and isinstance(spec, dict):
            example = f"{key}.{next(iter(spec), 'FIELD')}: {{KIND: VALUES}}"
            raise ConfigError(f"{where} is a section: write its fields as flat keys, e.g. {example}")
        if key not in names:
            raise ConfigError(f"{where} names no configuration field{nearest_fields(key)}")
        if key.startswith("data.") or key.startswith("eval.validation"):
            raise ConfigError(f"{where} cannot be searched: every trial trains and validates on the same data")
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in KINDS:
            raise ConfigError(f"{where}: expected one of {{{': [...]}, {'.join(KINDS)}: [...]}}, got {spec!r}")
        kind, values = next(iter(spec.items()))
        if not isinstance(values, list) or not values or (kind != "choice" and len(values) != 2):
            raise ConfigError(f"{where}: {kind} needs {'a list of values' if kind == 'choice' else '[low, high]'}")
        numbers = (int,) if kind == "int" else (int, float)
        if kind != "choice" and not all(isinstance(v, numbers) and not isinstance(v, bool) for v in values):
            raise ConfigError(f"{where}: {kind} needs {'integer' if kind == 'int' else 'number'} bounds, got {values}")
        if kind != "choice" and not all(math.isfinite(v) for v in values):
            raise ConfigError(f"{where}: {kind} needs finite bounds, got {values}")
        typ = str(field_type(key))
        if kind in ("uniform", "loguniform") and "float" not in typ:
            use = "int: [low, high]" if "int" in typ else "choice: [...]"
            raise ConfigError(f"{where}: {kind} draws real numbers, which {key} does not take: use {use}")
        if kind == "int" and "int" not in typ and "float" not in typ:
            raise ConfigError(f"{where}: int draws integers, which {key} does not take: use choice: [...]")
        if kind == "int" and not values[0] <= values[1]:
            raise ConfigError(f"{where}: int needs low <= high (both included), got {values}")
        if kind in ("uniform", "loguniform") and not values[0] < values[1]:
            raise ConfigError(f"{where}: {kind} needs low < high, got {values}")
        if kind == "loguniform" and values[0] <= 0:
            raise ConfigError(f"{where}: loguniform needs low > 0, got {values}")
        for v in values:  # every choice and both bounds must be values the field accepts
            try:
                Config().override({key: v}, text=False).validate()
            except ConfigError as e:
                raise ConfigError(f"{where}: {v!r} is not a valid value ({e})") from e
    return space


def tune_domains(space: dict[str, dict[str, list]]) -> dict[str, Any]:
    """Ray Tune sampling domains of a :func:`load_search_space` space (``int`` bounds both included)."""
    from ray import tune

    make = {
        "choice": lambda v: tune.choice(v),
        "int": lambda v: tune.randint(int(v[0]), int(v[1]) + 1),
        "uniform": lambda v: tune.uniform(float(v[0]), float(v[1])),
        "loguniform": lambda v: tune.loguniform(float(v[0]), float(v[1])),
    }
    return {key: make[kind](values) for key, spec in space.items() for kind, values in spec.items()}


def in_space(space: dict[str, dict[str, list]], params: dict[str, Any]) -> bool:
    """Whether ``params`` (one value per key of ``space``) is a point of ``space``."""
    for key, spec in space.items():
        (kind, values), v = next(iter(spec.items())), params.get(key)
        if kind == "choice":
            if v not in values:
                return False
        elif v is None or not values[0] <= v <= values[1]:
            return False
    return True


def trial_config(base: Config, params: dict[str, Any]) -> Config:
    """The configuration of one trial: ``base`` with the sampled ``params`` (``{"section.field": value}``)."""
    return base.override(params).validate()


# ----------------------------------------------------------------------------- one trial
def trial_resources(cpus: float, gpus: float, occ_cpus: int):
    """A trial's placement group: one bundle for the training (``cpus``, ``gpus``), and ``occ_cpus``
    bundles of one CPU for its OCC fit tasks (:mod:`mapl_ray.pipelines.occ_tasks`; Ray Tune runs a
    trial's tasks in its placement group only)."""
    from ray import tune

    return tune.PlacementGroupFactory([{"CPU": float(cpus), "GPU": float(gpus)}] + [{"CPU": 1.0}] * occ_cpus)


def _trial(params: dict[str, Any], base: dict[str, Any], data: tuple, occ_tasks: bool, threads: int) -> None:
    """Ray Tune function trainable: train one run with ``params`` and report the validation objective;
    ``occ_tasks``: the pseudo-labeler's OCCs fit as Ray tasks (else one after the other, beside training);
    ``threads``: torch threads (the trial's CPUs)."""
    import torch
    from ray import tune

    from ..data.train_data import with_memory_banks
    from ..engine.loop import train_model
    from .occ_tasks import ray_task_map

    torch.set_num_threads(threads)
    train_data, validation = data
    use_gpu = torch.cuda.is_available()  # Ray hides the GPUs from a trial without a GPU share
    cfg = trial_config(Config.from_dict(base), params).override({"train.use_gpu": use_gpu})
    run_dir = Path(tune.get_context().get_trial_dir()) / "run"
    run_dir.mkdir(parents=True, exist_ok=True)

    def report(rec: dict[str, Any]) -> None:  # ASHA decides on the validation passes
        if METRIC in rec:
            tune.report({k: v for k, v in rec.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})

    train_model(
        cfg,
        with_memory_banks(cfg, train_data),
        run_dir,
        device="cuda" if use_gpu else "cpu",
        report=report,
        progress=False,
        validation=validation,
        fit_map=ray_task_map if occ_tasks else None,
    )


# ----------------------------------------------------------------------------- the search
def prepare_search(cfg: Config, out: Path) -> Config:
    """A new search's base configuration (paths absolute, the foreground resolved, validation passes every
    quarter of the steps unless set) and split, written to ``out``; the test split's files are not opened.

    Raises:
        RunFolderError: ``out`` already holds a search.
        LayoutError, ConfigError, WeightsError: as :func:`mapl_ray.main_job.check_inputs`.
    """
    from ..data.foreground import with_resolved_foreground
    from ..main_job import absolute_paths, check_inputs
    from ..runfolder import RunFolderError

    if (out / BASE_FILE).exists():
        raise RunFolderError(f"{out} already holds a search: `mapl tune --resume --out {out}` continues it")
    if cfg.data.stream:
        raise ConfigError("data.stream: mapl tune decodes the images once for all trials; drop --stream")
    if not cfg.data.root or not cfg.data.category:
        raise ConfigError("a search needs --data ROOT and --category NAME (or a --config file that sets them)")
    cfg, _ = with_resolved_foreground(absolute_paths(cfg))
    if not cfg.eval.validate_every:
        cfg = cfg.override({"eval.validate_every": max(1, cfg.train.steps // 4)})
    cfg.validate()
    split = check_inputs(cfg, check_test=False)
    out.mkdir(parents=True, exist_ok=True)
    cfg.save(out / BASE_FILE)
    split.to_json(out / SPLIT_FILE)
    return cfg


def make_searcher(points: list[dict[str, Any]], seed: int, max_concurrent: int = 0):
    """``(searcher, name)``: Optuna's TPE when ``optuna`` imports, else Ray Tune's random search; both
    start from ``points`` and run at most ``max_concurrent`` trials at once (0: no limit)."""
    try:
        import optuna  # noqa: F401
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        searcher = OptunaSearch(points_to_evaluate=points or None, seed=seed)
        return (ConcurrencyLimiter(searcher, max_concurrent) if max_concurrent else searcher), "optuna"
    except ImportError:
        from ray.tune.search.basic_variant import BasicVariantGenerator

        gen = BasicVariantGenerator(points_to_evaluate=points or None, random_state=seed, max_concurrent=max_concurrent)
        return gen, "random"


def tune_search(
    cfg: Config | None,
    out: str | Path,
    space: dict[str, dict[str, list]] | None = None,
    num_samples: int = 32,
    gpus_per_trial: float = 0.0,
    cpus_per_trial: float = 1.0,
    resume: bool = False,
    seed: int = 0,
    max_concurrent: int = 0,
    grace_steps: int | None = None,
    callbacks: list | None = None,
    occ_cpus_per_trial: int = 0,
) -> dict[str, Any]:
    """Run (or, with ``resume``, continue) a search and write its outputs into ``out`` (module docstring).

    Args:
        cfg: the base configuration (a new search; None with ``resume``: ``out/base.yaml``).
        space: the search space (:func:`load_search_space`; default the package's).
        resume: continue the search in ``out`` with its own space, trials and shares (``out/search.json``;
            the arguments for them are ignored).
        num_samples: trials; gpus_per_trial / cpus_per_trial: each trial's share (fractional GPUs share one).
        seed: the searcher's seed; max_concurrent: trials at once (0: as many as the resources allow).
        grace_steps: ASHA's least steps before it may stop a trial (default: half of ``train.steps``, at
            least ``eval.validate_every``).
        callbacks: Ray Tune callbacks (``RunConfig(callbacks=...)``).
        occ_cpus_per_trial: CPUs each trial keeps for Ray tasks fitting its pseudo-labeler's OCCs (one
            OCC each); 0: they fit one after the other in the trial's process, beside training.

    Returns:
        the summary: ``best`` (parameters, validation objective), ``trials``, ``searcher``, ``wall_s``, files.

    Raises:
        ConfigError, LayoutError, WeightsError, RunFolderError: bad input, before a trial starts.
        SearchInterrupted: the search stopped before every trial ended (its state is saved).
        TrainingFailed: no trial finished.
    """
    from ray import tune

    from ..data.split import Split
    from ..data.train_data import load_train_data

    out = Path(out).resolve()
    t0 = time.perf_counter()
    requested = {
        "space": space if space is not None else (None if resume else load_search_space()),
        "num_samples": num_samples,
        "gpus_per_trial": gpus_per_trial,
        "cpus_per_trial": cpus_per_trial,
        "occ_cpus_per_trial": occ_cpus_per_trial,
        "seed": seed,
    }
    if resume:  # a folder that holds no search is refused before Ray starts; the saved GPU share is checked
        cfg, settings = _open_search(cfg, out, resume, requested)
        init_ray(quiet=True)
        check_trial_gpus(settings["gpus_per_trial"])
    else:  # a GPU share no trial could get is refused before the search folder is written
        init_ray(quiet=True)
        check_trial_gpus(gpus_per_trial)
        cfg, settings = _open_search(cfg, out, resume, requested)
    space, num_samples = settings["space"], settings["num_samples"]
    gpus_per_trial, cpus_per_trial = settings["gpus_per_trial"], settings["cpus_per_trial"]
    occ_cpus_per_trial = settings["occ_cpus_per_trial"]
    split = Split.from_json(out / SPLIT_FILE)
    data, validation, _ = load_train_data(cfg, split)
    trainable = tune.with_resources(
        tune.with_parameters(
            _trial,
            base=cfg.to_dict(),
            data=(data, validation),
            occ_tasks=occ_cpus_per_trial > 0,
            threads=max(1, int(cpus_per_trial)),
        ),
        trial_resources(cpus_per_trial, gpus_per_trial, occ_cpus_per_trial),
    )
    if resume:
        tuner, searcher = (
            tune.Tuner.restore(str(out / EXPERIMENT), trainable=trainable, resume_errored=True),
            "restored",
        )
    else:
        tuner, searcher = _new_tuner(
            cfg, out, trainable, space, num_samples, seed, max_concurrent, grace_steps, callbacks
        )
    log.info("search: %d trials (%s), results in %s", num_samples, searcher, out)
    results = tuner.fit()
    # the experiment state as saved (an interrupted search saves its trials as they were: pending, running)
    saved = [t.status for t in tune.ExperimentAnalysis(str(out / EXPERIMENT)).trials]
    if any(status not in ("TERMINATED", "ERROR") for status in saved) or len(saved) < num_samples:
        raise SearchInterrupted(f"the search in {out} stopped early: `mapl tune --resume --out {out}` continues it")
    return _write_outputs(results, cfg, space, out, gpus_per_trial > 0, searcher, t0)


def _write_outputs(results, cfg: Config, space: dict, out: Path, use_gpu: bool, searcher: str, t0: float) -> dict:
    """best.yaml, the trial tables and the plot of a finished search; returns :func:`tune_search`'s summary.

    Raises:
        TrainingFailed: no trial ran all its steps.
    """
    from .ray_train import TrainingFailed

    rows = trial_rows(results, list(space), cfg.train.steps)
    finished = [r for r in rows if r["status"] == "finished" and r[METRIC] is not None]
    if not finished:
        raise TrainingFailed(f"no trial of the search in {out} finished: {[r['error'] for r in rows][:3]}")
    best = max(finished, key=lambda r: r[METRIC])
    best_cfg = trial_config(cfg, {k: best[k] for k in space}).override({"train.use_gpu": use_gpu})
    best_cfg.save(out / BEST_FILE)
    write_tables(rows, list(space), out)
    plot_search(results, rows, out / PLOT_FILE)
    return {
        "best": {k: best[k] for k in (*space, METRIC, "trial_id")},
        "trials": len(rows),
        "finished": len(finished),
        "stopped_early": sum(r["status"] == "stopped early" for r in rows),
        "errors": sum(r["status"] == "error" for r in rows),
        "searcher": searcher,
        "wall_s": time.perf_counter() - t0,
        "files": {name: str(out / name) for name in (BEST_FILE, TRIALS_CSV, TRIALS_MD, PLOT_FILE)},
    }


def check_trial_gpus(gpus_per_trial: float) -> None:
    """Refuse a GPU share per trial on a local Ray without a GPU of that size: every trial would wait for one
    forever (:func:`~mapl_ray.pipelines.ray_env.require_local_gpus`). Raises ConfigError."""
    require_local_gpus(
        gpus_per_trial, f"--gpus-per-trial {gpus_per_trial:g}", "drop --gpus-per-trial to search on the CPU"
    )


def _open_search(cfg: Config | None, out: Path, resume: bool, requested: dict[str, Any]) -> tuple[Config, dict]:
    """``(base configuration, settings)``: a new search's (:func:`prepare_search`, ``requested`` written to
    ``out/search.json``), or with ``resume`` the saved ones (the space, trials and shares as it started).

    Raises:
        ConfigError: ``resume`` and ``out`` holds no search; and :func:`prepare_search`'s errors.
    """
    from ray import tune

    if resume:
        if not tune.Tuner.can_restore(str(out / EXPERIMENT)) or not (out / SETTINGS_FILE).is_file():
            raise ConfigError(f"{out} holds no search to resume (expected {out / EXPERIMENT} and {SETTINGS_FILE})")
        return Config.load(out / BASE_FILE), json.loads((out / SETTINGS_FILE).read_text())
    cfg = prepare_search(cfg, out)
    (out / SETTINGS_FILE).write_text(json.dumps(requested, indent=2))
    return cfg, requested


def _new_tuner(cfg, out, trainable, space, num_samples, seed, max_concurrent, grace_steps, callbacks):
    """``(Tuner, searcher name)`` of a new search (:func:`tune_search`'s arguments): the base configuration
    as the first point, ASHA on the validation objective over training steps."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    base_point = {k: _field(cfg, k) for k in space}
    points = [base_point] if in_space(space, base_point) else []
    search_alg, searcher = make_searcher(points, seed, max_concurrent)
    steps = cfg.train.steps
    asha = ASHAScheduler(
        time_attr="step",
        max_t=steps,
        # half the steps by default: before that, validation ranks trials by noise (screw, 250 steps: every
        # trial near 0.45 at step 62, before the first refit's labels apply; bench/results/tune.json at 2c29bd1)
        grace_period=min(steps, grace_steps or max(cfg.eval.validate_every, steps // 2)),
        reduction_factor=2,
    )
    tuner = tune.Tuner(
        trainable,
        param_space=tune_domains(space),
        tune_config=tune.TuneConfig(
            metric=METRIC, mode="max", search_alg=search_alg, scheduler=asha, num_samples=num_samples
        ),
        run_config=tune.RunConfig(
            name=EXPERIMENT, storage_path=str(out), callbacks=callbacks, verbose=0, log_to_file=True
        ),
    )
    return tuner, searcher


def _field(cfg: Config, key: str) -> Any:
    section, name = key.split(".")
    value = getattr(getattr(cfg, section), name)
    return list(value) if isinstance(value, tuple) else value


# ----------------------------------------------------------------------------- outputs
def trial_rows(results, keys: list[str], steps: int) -> list[dict[str, Any]]:
    """One row per trial of a Ray Tune ``ResultGrid``: ``trial_id``, the parameters, ``status`` (finished,
    stopped early by ASHA, error), ``steps_run``, the last and best validation objective, ``wall_s``."""
    rows = []
    for r in results:
        m, curve = r.metrics or {}, r.metrics_dataframe
        values = [] if curve is None or METRIC not in curve else [v for v in curve[METRIC] if v == v]
        steps_run = int(m.get("step", 0) or 0)
        status = "error" if r.error else ("finished" if steps_run >= steps else "stopped early")
        rows.append(
            {
                "trial_id": m.get("trial_id") or Path(r.path).name,
                **{k: r.config.get(k) for k in keys},
                "status": status,
                "steps_run": steps_run,
                METRIC: m.get(METRIC),
                f"best_{METRIC}": max(values) if values else None,
                "wall_s": m.get("time_total_s"),
                "error": None if r.error is None else str(r.error).strip().splitlines()[-1][:200],
            }
        )
    return rows


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "null" if v is None else str(v)


def write_tables(rows: list[dict[str, Any]], keys: list[str], out: Path) -> None:
    """``trials.csv`` (every column) and ``trials.md`` (best validation first) of :func:`trial_rows`."""
    columns = list(rows[0])
    with (out / TRIALS_CSV).open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=columns)
        w.writeheader()
        w.writerows(rows)
    ranked = sorted(rows, key=lambda r: -(r[METRIC] if r[METRIC] is not None else -math.inf))
    shown = ["trial_id", "status", "steps_run", METRIC, "wall_s", *keys]
    lines = [
        f"# Search trials ({len(rows)}), by the validation objective (mean of image and pixel AUROC) (`{METRIC}`, last pass)",
        "",
        "| " + " | ".join(shown) + " |",
        "|" + "---|" * len(shown),
        *("| " + " | ".join(_fmt(r[c]) for c in shown) + " |" for r in ranked),
    ]
    (out / TRIALS_MD).write_text("\n".join(lines) + "\n")


def plot_search(results, rows: list[dict[str, Any]], path: Path) -> None:
    """Left: the validation objective over training steps, one line per trial (the best in red); right:
    the last value of each trial in the order they started, and the best so far."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    best = max((r for r in rows if r[METRIC] is not None and r["status"] == "finished"), key=lambda r: r[METRIC])
    for r, row in zip(results, rows):
        df = r.metrics_dataframe
        if df is None or METRIC not in df or "step" not in df:
            continue
        is_best = row["trial_id"] == best["trial_id"]
        a.plot(df["step"], df[METRIC], color="tab:red" if is_best else "0.6", lw=2 if is_best else 0.8, zorder=is_best)
    a.set(xlabel="training step", ylabel="validation objective", title="trials (ASHA stops the weak ones)")
    vals = np.array([r[METRIC] if r[METRIC] is not None else np.nan for r in rows], dtype=float)
    b.scatter(np.arange(len(vals)), vals, c=["tab:blue" if r["status"] == "finished" else "0.6" for r in rows], s=14)
    b.plot(np.arange(len(vals)), np.fmax.accumulate(np.nan_to_num(vals, nan=-np.inf)), color="tab:red", lw=1)
    b.set(xlabel="trial", ylabel="validation objective (last pass)", title="by trial (blue: ran to the end)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
