"""The run folder: the contract between train, evaluate, predict, serve (and tune), in one module.

``RUN/``: ``config.yaml`` (the resolved configuration), ``split.json`` (which files were labeled normal /
unlabeled / labeled anomaly / test, and the seed), ``checkpoint/`` (below), ``data_info.json`` (the
images used), ``train_log.jsonl``, ``train_summary.json``, ``metrics.json``, ``report.md``,
``scores.csv``, ``plots/``, ``heatmaps/``.

``train_log.jsonl`` holds one JSON object per logged step; its ``segment`` counts resumes (0: the first
run, 1 after the first ``--resume``...). A resumed run logs again from its checkpoint's step, so steps
logged after the last checkpoint of a stopped segment appear twice, once per segment. When Ray Train
restarts the workers of a run after a worker or node died (``train.max_failures``), the new attempt is a new
segment too, and a marker line ``{"event": "restart", "segment", "step", "steps_repeated", "time", "fit"}``
precedes its steps (lines with an ``event`` are markers, not steps); ``train_summary.json`` lists them
under ``restarts``.

``RUN/checkpoint/``: everything a served model needs, nothing unpickled:
  model.safetensors      network weights and the memory bank buffers (safetensors)
  optimizer.pt           optimizer + LR-scheduler state (torch state dicts, loadable weights_only=True)
  pseudo.safetensors     one-class classifier parameters and thresholds (arrays), with pseudo.json
  state.json             step, encoder name, image size, score normalisation, decision threshold
A checkpoint is written to ``checkpoint.tmp/`` and swapped in with ``os.replace``, so a crash while
saving never destroys the previous checkpoint.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file as load_np
from safetensors.numpy import save_file as save_np
from safetensors.torch import load_file, save_file

from .config import Config
from .data.split import Split


class CheckpointError(RuntimeError):
    """A run folder has no (or an unreadable) checkpoint."""


class RunFolderError(RuntimeError):
    """The output folder cannot be used (it holds another run and ``--resume`` was not given...)."""


CONFIG_FILE, SPLIT_FILE, DATA_INFO_FILE, SUMMARY_FILE, TRAIN_LOG_FILE = (
    "config.yaml",
    "split.json",
    "data_info.json",
    "train_summary.json",
    "train_log.jsonl",
)
#: the unlabeled pool's final pseudo-labels, one row per image (mapl_ray.pseudo.labeler.write_pool_labels)
POOL_LABELS_FILE = "pool_labels.csv"


def _scalars_to_floats(obj: Any) -> Any:
    """0-dim tensors (a CUDA-graph run's device learning rates) -> floats, in nested dicts / lists, so
    ``optimizer.pt`` resumes on any device and with either training step."""
    if isinstance(obj, torch.Tensor) and obj.ndim == 0 and obj.is_floating_point():
        return float(obj.item())
    if isinstance(obj, dict):
        return {k: _scalars_to_floats(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_scalars_to_floats(v) for v in obj]
    return obj


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoint"


@dataclass(frozen=True)
class CheckpointSnapshot:
    """The contents of one ``RUN/checkpoint`` in host memory, owned by the snapshot (nothing the training
    mutates afterwards is shared with it), ready for :func:`write_checkpoint`, e.g. in another thread.

    ``model``: the state dict, contiguous CPU tensors; ``training``: what ``optimizer.pt`` holds (None: no
    optimizer); ``pseudo``: the pseudo-labeler's arrays and ``pseudo.json``'s text; ``state``: ``state.json``'s text.
    """

    model: dict[str, torch.Tensor]
    training: dict[str, Any] | None
    pseudo: tuple[dict[str, np.ndarray], str] | None
    state: str


def _host_copy(obj: Any, layout: torch.memory_format = torch.preserve_format) -> Any:
    """A copy of ``obj`` whose tensors are new CPU tensors (of memory format ``layout``) and whose dicts /
    lists / tuples are new containers: nothing shared with the live training state."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", memory_format=layout, copy=True)
    if isinstance(obj, dict):
        return {k: _host_copy(v, layout) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_host_copy(v, layout) for v in obj)
    return obj


def snapshot_checkpoint(
    model: torch.nn.Module,
    state: dict[str, Any],
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    pseudo: tuple[dict[str, np.ndarray], dict[str, Any]] | None = None,
    extra: dict[str, Any] | None = None,
    reuse: dict[str, torch.Tensor] | None = None,
) -> CheckpointSnapshot:
    """Copy a checkpoint's contents into host memory (device tensors: a device-to-host copy), for
    :func:`write_checkpoint`.

    ``extra``: more training state stored in ``optimizer.pt`` (tensors / lists / numbers only).

    ``reuse``: state-dict entries already copied by an earlier snapshot whose values have not changed
    since (e.g. the memory banks of a frozen encoder): taken as they are, not copied again. The caller
    guarantees that they are equal to the model's and never written to.
    """
    reuse = reuse or {}
    sd = {k: reuse[k] if k in reuse else _host_copy(v, torch.contiguous_format) for k, v in model.state_dict().items()}
    training = None
    if optimizer is not None:
        opt_sd = optimizer.state_dict()
        training = {
            "optimizer": {
                **opt_sd,
                "state": _host_copy(opt_sd["state"]),
                "param_groups": [_scalars_to_floats(g) for g in opt_sd["param_groups"]],
            },
            "scheduler": _scalars_to_floats(scheduler.state_dict()) if scheduler else None,
            **_host_copy(extra or {}),
        }
    saved_pseudo = None
    if pseudo is not None:
        arrays, meta = pseudo
        saved_pseudo = ({k: np.array(v, order="C", copy=True) for k, v in arrays.items()}, json.dumps(meta, indent=2))
    return CheckpointSnapshot(sd, training, saved_pseudo, json.dumps(state, indent=2))


# the umask, read once at import (setting it is process-wide, so not from the checkpoint writer's thread)
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def _plain_mode(*paths: Path) -> None:
    """Give files the mode ``open()`` gives (0666 less the umask): safetensors writes 0600, which kept another
    user (one running ``mapl serve``) from reading a run's weights."""
    for p in paths:
        os.chmod(p, 0o666 & ~_UMASK)


def write_checkpoint(run_dir: str | Path, snapshot: CheckpointSnapshot) -> Path:
    """Atomically write ``snapshot`` to ``RUN/checkpoint/`` (see module docstring). Returns the checkpoint folder."""
    final = checkpoint_dir(run_dir)
    tmp = final.with_name("checkpoint.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file(snapshot.model, str(tmp / "model.safetensors"))
    _plain_mode(tmp / "model.safetensors")
    if snapshot.training is not None:
        torch.save(snapshot.training, tmp / "optimizer.pt")
    if snapshot.pseudo is not None:
        arrays, meta = snapshot.pseudo
        save_np(arrays, str(tmp / "pseudo.safetensors"))
        _plain_mode(tmp / "pseudo.safetensors")
        (tmp / "pseudo.json").write_text(meta)
    (tmp / "state.json").write_text(snapshot.state)
    _swap_in(tmp, final)
    return final


def require_run_folder(run_dir: str | Path) -> Path:
    """Check that ``run_dir`` is a run folder written by ``mapl train`` (``config.yaml`` and
    ``checkpoint/state.json``); returns it as a Path.

    Raises:
        CheckpointError: naming the folder and what is missing.
    """
    run = Path(run_dir)
    if run.exists() and not run.is_dir():
        raise CheckpointError(f"{run} is a file, not a run folder (expected the output folder of `mapl train`)")
    if not run.is_dir():
        raise CheckpointError(
            f"run folder {run} does not exist (expected a folder written by `mapl train --out {run}`)"
        )
    missing = [n for n in (CONFIG_FILE, "checkpoint/state.json") if not (run / n).is_file()]
    if missing:
        raise CheckpointError(
            f"{run} is not a trained run folder: {', '.join(missing)} missing "
            "(expected the output folder of `mapl train`)"
        )
    return run


def load_run_config(run_dir: str | Path) -> Config:
    """The resolved configuration of a trained run (``config.yaml``; fields added since the run was
    written take the values that reproduce it, :meth:`Config.load_run`).

    Raises:
        CheckpointError: ``run_dir`` is not a trained run folder; ConfigError: an unreadable ``config.yaml``.
    """
    return Config.load_run(require_run_folder(run_dir) / CONFIG_FILE)


def has_checkpoint(run_dir: str | Path) -> bool:
    """Whether ``run_dir`` holds a checkpoint (``checkpoint/state.json``)."""
    return (checkpoint_dir(run_dir) / "state.json").is_file()


def rerun_hint(run_dir: str | Path) -> str:
    """What to do with a run folder that holds no checkpoint yet: start it again without ``--resume``."""
    run = Path(run_dir)
    return (
        f"it holds no checkpoint (the run stopped before its first save), so there is nothing to resume: "
        f"rerun without --resume, "
        f"e.g. `mapl train --config {run / CONFIG_FILE} --out {run}` (the folder is reused)"
    )


def load_resume_config(run_dir: str | Path) -> Config:
    """The configuration of a stopped run to continue with ``mapl train --resume`` (as :func:`load_run_config`).

    Raises:
        RunFolderError: ``run_dir`` does not exist or holds no run (no ``config.yaml``), or it holds no
            checkpoint yet (the message says to rerun without ``--resume``).
        ConfigError: an unreadable ``config.yaml``.
    """
    run = Path(run_dir)
    if not (run / CONFIG_FILE).is_file():
        what = "does not exist" if not run.exists() else f"is not a trained run folder ({CONFIG_FILE} missing)"
        raise RunFolderError(f"cannot resume {run}: it {what}; --out must name the folder of a stopped `mapl train`")
    if not has_checkpoint(run):
        raise RunFolderError(f"cannot resume {run}: {rerun_hint(run)}")
    return Config.load_run(run / CONFIG_FILE)


def stop_hint(run_dir: str | Path) -> str:
    """Where a stopped (interrupted) run stands and the command that continues it, for the CLI."""
    run = Path(run_dir)
    if not has_checkpoint(run):
        if not (run / CONFIG_FILE).is_file():
            return f"stopped before the run started: nothing was trained in {run}"
        return f"{run}: {rerun_hint(run)}"
    state = read_state(run)
    step, total = int(state["step"]), state.get("total_steps")
    at = f"step {step}" + (f" of {total}" if total else "")
    return (
        f"the last checkpoint is {checkpoint_dir(run)} ({at}); continue with `mapl train --resume --out {run}` "
        "(add --steps N to change the length)"
    )


def train_log_segment(run_dir: str | Path) -> int:
    """The ``segment`` a run resumed in ``run_dir`` logs under in ``train_log.jsonl``: one more than the
    last logged line's (1 when the log is missing or holds no segment)."""
    path = Path(run_dir) / TRAIN_LOG_FILE
    if not path.is_file():
        return 1
    lines = path.read_text().strip().splitlines()
    try:
        return int(json.loads(lines[-1]).get("segment", 0)) + 1 if lines else 1
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
        return 1


def _train_log_records(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / TRAIN_LOG_FILE
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a crash while it was written
            continue
    return out


def last_logged_step(run_dir: str | Path) -> int:
    """The step of the last step line of ``train_log.jsonl`` (markers skipped); 0 when none."""
    steps = [r for r in _train_log_records(run_dir) if "event" not in r]
    return int(steps[-1]["step"]) if steps else 0


def restart_markers(run_dir: str | Path, fit: str | None = None) -> list[dict[str, Any]]:
    """The restart markers of ``train_log.jsonl`` (of the training call ``fit`` only, when given)."""
    return [
        r for r in _train_log_records(run_dir) if r.get("event") == "restart" and (fit is None or r.get("fit") == fit)
    ]


def install_checkpoint(run_dir: str | Path, src: str | Path) -> bool:
    """Make the checkpoint folder ``src`` (e.g. a ``ray.train.Checkpoint``'s) the run's ``RUN/checkpoint``
    unless the run already holds one at the same or a later step; swapped in atomically like a save.
    Returns whether it was installed.

    Raises:
        CheckpointError: ``src`` has no readable ``state.json``.
    """
    src, final = Path(src), checkpoint_dir(run_dir)
    if src.resolve() == final.resolve():
        return False
    try:
        step = int(json.loads((src / "state.json").read_text())["step"])
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{src} is not a checkpoint folder (state.json: {e})") from e
    if has_checkpoint(run_dir) and int(read_state(run_dir)["step"]) >= step:
        return False
    tmp = final.with_name("checkpoint.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(src, tmp)
    _swap_in(tmp, final)
    return True


def _swap_in(tmp: Path, final: Path) -> None:
    """Replace ``final`` by the complete folder ``tmp`` (the old one is kept until the new one is in place)."""
    old = final.with_name("checkpoint.old")
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)


def make_output_dir(path: str | Path, what: str) -> Path:
    """Create the output folder ``path`` (and its parents) if it is not there; ``what`` names it in the error
    (``"--heatmaps"``, ``"run folder"``).

    Raises:
        RunFolderError: it cannot be created (a parent is a file, no permission...), naming it and why.
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunFolderError(f"{what} {path} cannot be created: {e.strerror or e}") from e
    return path


def write_run_start(run_dir: str | Path, cfg: Config, split: Split) -> None:
    """Create ``run_dir`` with ``config.yaml`` and ``split.json``: what a run is before it trains.

    Raises:
        RunFolderError: ``run_dir`` cannot be created (:func:`make_output_dir`).
    """
    run_dir = make_output_dir(run_dir, "run folder")
    cfg.save(run_dir / CONFIG_FILE)
    split.to_json(run_dir / SPLIT_FILE)


def read_state(run_dir: str | Path) -> dict[str, Any]:
    """``state.json`` of a run's checkpoint. Raises CheckpointError naming the missing file."""
    path = checkpoint_dir(run_dir) / "state.json"
    if not path.is_file():
        raise CheckpointError(f"{path} not found: {run_dir} holds no checkpoint (did `mapl train` finish a save?)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e


def _checkpoint_file(run_dir: str | Path, name: str, why: str = "") -> Path:
    """``RUN/checkpoint/<name>``. Raises CheckpointError (``<path> not found``, then ``why``) where it is missing."""
    path = checkpoint_dir(run_dir) / name
    if not path.is_file():
        raise CheckpointError(f"{path} not found{why}")
    return path


def check_model_weights(run_dir: str | Path) -> Path:
    """The run's ``checkpoint/model.safetensors``, after reading its header (not its tensors): a cheap check,
    before a job starts workers, that the weights can be loaded.

    Raises:
        CheckpointError: the file is missing, or its header is unreadable (truncated, not safetensors).
    """
    path = _checkpoint_file(run_dir, "model.safetensors")
    try:
        with safe_open(str(path), framework="pt") as f:
            if not list(f.keys()):
                raise CheckpointError(f"{path} holds no tensors: the run's weights are missing")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e}): copy the run folder again") from e
    return path


def load_model_weights(run_dir: str | Path, model: torch.nn.Module) -> None:
    """Load ``model.safetensors`` into ``model`` (strict).

    Raises:
        CheckpointError: the file is missing, unreadable (truncated, not safetensors) or holds other tensors.
    """
    path = _checkpoint_file(run_dir, "model.safetensors")
    try:
        sd = load_file(str(path))
        model.load_state_dict(sd, strict=True)
    except (RuntimeError, OSError, SafetensorError) as e:
        raise CheckpointError(f"cannot load {path} into the model: {e}") from e


def load_training_state(run_dir: str | Path, optimizer: torch.optim.Optimizer, scheduler: Any) -> dict[str, Any]:
    """Restore optimizer and scheduler from ``optimizer.pt`` (``weights_only=True``); returns the other entries."""
    path = _checkpoint_file(run_dir, "optimizer.pt", f": cannot resume training from {run_dir}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as e:
        raise CheckpointError(f"{path} is not a readable optimizer checkpoint ({e}): cannot resume from it") from e
    optimizer.load_state_dict(blob["optimizer"])
    if scheduler is not None and blob.get("scheduler") is not None:
        scheduler.load_state_dict(blob["scheduler"])
    return {k: v for k, v in blob.items() if k not in ("optimizer", "scheduler")}


def load_pseudo(run_dir: str | Path) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
    """(arrays, meta) of the pseudo-labeler, or None when the run saved none.

    Raises:
        CheckpointError: the file or its ``.json`` is unreadable.
    """
    path = checkpoint_dir(run_dir) / "pseudo.safetensors"
    if not path.is_file():
        return None
    try:
        return load_np(str(path)), json.loads((path.with_suffix(".json")).read_text())
    except (SafetensorError, OSError, ValueError) as e:  # json.JSONDecodeError is a ValueError
        raise CheckpointError(f"the pseudo-labeler's checkpoint {path} (or its .json) is unreadable: {e}") from e


def unfinished_note(run_dir: str | Path) -> str | None:
    """What a user of a run's scores should know when the run is not finished: it stopped before its last
    step (``state.json`` step below ``train.steps``), or it has no decision threshold (labels are then
    null). None for a finished run with a threshold.

    Raises:
        CheckpointError / ConfigError: ``run_dir`` is not a trained run folder (:func:`read_state`,
            :func:`load_run_config`).
    """
    steps = load_run_config(run_dir).train.steps  # first: its error says best what a run folder is
    state = read_state(run_dir)
    step, no_threshold = int(state.get("step", 0)), state.get("threshold") is None
    if step < steps:
        return (
            f"run {run_dir} stopped at step {step} of {steps}"
            + ("; it has no decision threshold yet, so labels are null" if no_threshold else "")
            + f": finish it with mapl train --resume --out {run_dir}"
        )
    if no_threshold:
        return f"run {run_dir} has no decision threshold (too few validation normals): scores only, labels are null"
    return None


def open_run_folder(run_dir: str | Path, resume: bool, steps: int) -> bool:
    """Check that ``run_dir`` may receive a run; returns whether it holds a checkpoint to resume.

    A folder left by a run that failed before its first checkpoint holds nothing trained and is reused.

    Args:
        run_dir: the output folder (``--out``).
        resume: continue the run in ``run_dir`` (``--resume``).
        steps: ``train.steps`` of the (resumed) run.

    Raises:
        RunFolderError: ``run_dir`` is a file; it already holds a run and ``resume`` is False (nothing
            is overwritten); ``resume`` with no checkpoint yet, with fewer steps than it has done, or of a
            run that is finished (all its steps done and ``metrics.json`` written: resuming it would rewrite
            its checkpoint and threshold for nothing).
        CheckpointError: ``resume`` with model weights or optimizer state missing or unreadable.
    """
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunFolderError(f"--out {run_dir} exists and is not a folder")
    saved = has_checkpoint(run_dir)
    if resume:
        if not saved or not (run_dir / SPLIT_FILE).is_file():
            raise RunFolderError(f"cannot resume {run_dir}: {rerun_hint(run_dir)}")
        done = int(read_state(run_dir)["step"])
        if steps < done:
            raise RunFolderError(
                f"cannot resume {run_dir} with train.steps={steps}: the checkpoint is already at step {done}"
            )
        if steps == done and (run_dir / "metrics.json").is_file():  # trained and evaluated: resuming redoes the end
            raise RunFolderError(
                f"{run_dir} is finished (step {done} of {steps}, evaluated: metrics.json); nothing to resume and "
                f"nothing was changed. To train it longer: --resume with --steps above {done}; to evaluate it "
                f"again: mapl evaluate {run_dir}"
            )
        # before anything is rewritten (config.yaml takes the new train.steps): a checkpoint it cannot load
        check_model_weights(run_dir)
        _checkpoint_file(run_dir, "optimizer.pt", f": cannot resume training from {run_dir} (nothing was changed)")
        return True
    if saved:
        raise RunFolderError(
            f"{run_dir} already holds a run; pass --resume to continue it or choose another --out (nothing was overwritten)"
        )
    return False


def _logged_wall_s(run_dir: Path, summarised: set[Any]) -> float | None:
    """Seconds the train_log.jsonl segments that no summary covers (``summarised``: segment numbers) ran up to
    their last line (``wall_s``), added up; None when none has a line with ``wall_s`` (logs before 2026-12-07)."""
    last: dict[int, float] = {}
    for rec in _train_log_records(run_dir):  # a line cut short by the stop is left out there
        if isinstance(rec, dict) and "wall_s" in rec and rec.get("segment") not in summarised:
            seg = rec.get("segment")
            last[seg] = max(last.get(seg, 0.0), float(rec["wall_s"]))
    return sum(last.values()) if last else None


def write_train_summary(run_dir: Path, summary: dict[str, Any], resumed: bool) -> None:
    """Write ``train_summary.json``. After ``--resume`` the summaries of the earlier segments are kept
    under ``earlier_segments`` (oldest first) and ``steps_run_total`` / ``train_wall_s_total`` add them up.
    A segment stopped before it wrote its summary (Ctrl-C, SIGTERM, a crash) is counted from the resumed
    segment's ``start_step``: ``{"steps_run": ..., "interrupted": true}``, with ``train_wall_s`` up to its
    last train_log.jsonl line (:func:`_logged_wall_s`; the time after that line is not known)."""
    path = run_dir / SUMMARY_FILE
    earlier: list[dict[str, Any]] = []
    if resumed and path.is_file():
        old = json.loads(path.read_text())
        earlier = old.pop("earlier_segments", []) + [{k: v for k, v in old.items() if not k.endswith("_total")}]
    before = sum(int(s.get("steps_run", 0)) for s in earlier)
    if resumed and int(summary.get("start_step", before)) > before:
        gap: dict[str, Any] = {"steps_run": int(summary["start_step"]) - before, "interrupted": True}
        summarised = {s.get("segment") for s in earlier} | {summary.get("segment")}
        logged = _logged_wall_s(run_dir, summarised)
        if logged is not None:
            gap.update(train_wall_s=logged, train_wall_s_until_last_log=True)
        earlier.append(gap)
    segments = earlier + [summary]
    summary["earlier_segments"] = earlier
    summary["steps_run_total"] = sum(int(s.get("steps_run", 0)) for s in segments)
    summary["train_wall_s_total"] = sum(float(s.get("train_wall_s", 0.0)) for s in segments)
    path.write_text(json.dumps(summary, indent=2))
