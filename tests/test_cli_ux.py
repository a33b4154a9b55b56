"""What a new user sees (issue 20): the foreground preset, mask names, Ctrl-C and --resume, the
validation hold-out, CLI help and hints, a quiet console, and the report's decisions."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TEXTURES, TINY_CLI, needs_data, tiny_config

from mapl_ray.cli import build_parser, main
from mapl_ray.config import Config, ConfigError, parse_yaml_mapping
from mapl_ray.data.foreground import (
    FOREGROUND_PRESETS,
    ForegroundConfig,
    resolve_foreground,
    with_resolved_foreground,
)

TINY = [*TINY_CLI, "--set", "eval.heatmaps=2"]


# 1. the foreground preset ------------------------------------------------------------------------
def test_foreground_preset_chosen_by_folder_name_is_said_and_written_out():
    cfg = Config().override({"data.category": "metal plate"})  # the folder name with a space
    resolved, note = with_resolved_foreground(cfg)
    assert "no foreground preset for category 'metal plate'" in note and "nearest: metal_plate" in note
    assert "the whole image is foreground" in note and "--foreground-preset" in note
    s = resolved.simulation
    assert (s.foreground, s.use_foreground_mask) == ("none", False)
    assert resolve_foreground(resolved) == ForegroundConfig()

    named = cfg.override({"simulation.foreground": "metal_plate"})  # the user names the preset
    resolved, note = with_resolved_foreground(named)
    assert "foreground preset 'metal_plate' (from simulation.foreground)" in note and "grey <= 100" in note
    assert resolve_foreground(resolved) == FOREGROUND_PRESETS["metal_plate"]
    s = resolved.simulation
    assert (s.foreground, s.use_foreground_mask, s.foreground_threshold, s.foreground_inverse) == (
        "metal_plate",
        True,
        100,
        True,
    )


@pytest.mark.parametrize("category", ["screw", "bottle", "leather", "my_part"])
def test_resolved_foreground_is_the_same_object_definition(category):
    cfg = Config().override({"data.category": category, "simulation.foreground_threshold": 77})
    resolved, _ = with_resolved_foreground(cfg)
    assert resolve_foreground(resolved) == resolve_foreground(cfg)
    assert resolved.simulation.foreground_threshold == 77  # an explicit override survives
    # a saved config.yaml no longer depends on the folder name
    moved = resolved.override({"data.category": "renamed"})
    assert resolve_foreground(moved) == resolve_foreground(cfg)


def test_unknown_foreground_preset_names_the_nearest():
    cfg = Config().override({"simulation.foreground": "metal-plate"})
    with pytest.raises(ConfigError, match="simulation.foreground = 'metal-plate'.*nearest: metal_plate"):
        resolve_foreground(cfg)


# 2. masks named like their images ----------------------------------------------------------------
@needs_data
def test_masks_named_like_their_images_are_found_and_stray_files_named(small_root, tmp_path, caplog):
    from mapl_ray.data.layout import scan_category

    root = tmp_path / "data"
    shutil.copytree(small_root, root)
    gt = root / "screw" / "ground_truth" / "thread_top"
    for mask in gt.glob("*_mask.png"):
        mask.rename(gt / mask.name.replace("_mask", ""))
    (gt / "notes.png").write_bytes((gt / next(gt.glob("*.png")).name).read_bytes())
    with caplog.at_level(logging.WARNING, logger="mapl_ray.data"):
        index = scan_category(root, "screw")
    top = [r for r in index.test if r.defect_type == "thread_top"]
    assert top and all(r.mask_path == str(gt / Path(r.path).name) for r in top)
    assert "notes.png" in caplog.text and "match no image of test/thread_top" in caplog.text


@needs_data
def test_missing_mask_error_names_the_flag(small_root, tmp_path, capsys):
    root = tmp_path / "data"
    shutil.copytree(small_root, root)
    next((root / "screw" / "ground_truth" / "scratch_head").glob("*_mask.png")).unlink()
    args = ["train", "--data", str(root), "--category", "screw", "--out", str(tmp_path / "r"), "--no-ray", *TINY]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "--no-masks" in err and "data.require_masks: false" in err and "require_masks=False" not in err


@needs_data
def test_unreadable_pool_images_are_named_together_with_what_to_do(small_root, tmp_path, capsys):
    pool = tmp_path / "pool" / "sub"
    pool.mkdir(parents=True)
    (pool / "empty.png").write_bytes(b"")
    (pool / "text.png").write_text("not an image")
    shutil.copy(next((small_root / "screw" / "train" / "good").glob("*.png")), pool.parent / "good.png")
    args = ["train", "--data", str(small_root), "--category", "screw", "--unlabeled", str(pool.parent)]
    assert main([*args, "--out", str(tmp_path / "r"), "--no-ray", *TINY]) == 2
    err = capsys.readouterr().err
    assert "empty.png' (empty file (0 bytes))" in err or "empty.png': empty file (0 bytes)" in err
    assert "text.png" in err and "--skip-bad-images" in err and "Traceback" not in err
    assert main(["train", "--data", str(pool.parent / "good.png"), "--category", "screw", "--no-ray"]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err


@needs_data
def test_weights_path_that_is_a_folder_says_so(small_root, tmp_path, capsys):
    run = tmp_path / "r"
    args = ["train", "--data", str(small_root), "--category", "screw", "--out", str(run), "--no-ray"]
    assert main([*args, "--weights", str(tmp_path), *TINY]) == 2
    err = capsys.readouterr().err
    assert f"encoder weights file {tmp_path} is a folder, not a file" in err and "Traceback" not in err
    assert main([*args, "--weights", str(tmp_path / "missing.safetensors"), *TINY]) == 2
    assert "missing.safetensors does not exist" in capsys.readouterr().err


@needs_data
def test_a_flags_bad_value_names_the_flag(small_root, tmp_path, capsys):
    args = ["train", "--data", str(small_root), "--category", "screw", "--out", str(tmp_path / "r"), "--no-ray"]
    assert main([*args, "--steps", "-5"]) == 2
    err = capsys.readouterr().err
    assert "--steps: train.steps = -5 is not allowed: expected >= 1" in err and "Traceback" not in err
    assert main([*args, "--set", "train.steps=-5"]) == 2
    assert "error: --set train.steps: train.steps = -5 is not allowed" in capsys.readouterr().err
    config = tmp_path / "c.yaml"
    config.write_text("train:\n  steps: 0\n")  # set in the file: the message names the file
    assert main([*args, "--config", str(config)]) == 2
    assert f"train.steps = 0 is not allowed: expected >= 1 (in --config {config})" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_a_config_file_that_repeats_a_key_is_refused(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("train:\n  steps: 5\nmodel:\n  memory_samples: 3\ntrain:\n  lr: 0.1\n")
    args = ["train", "--data", str(tmp_path), "--category", "screw", "--out", str(tmp_path / "r"), "--no-ray"]
    assert main([*args, "--config", str(config)]) == 2  # PyYAML alone keeps the second train: steps lost
    err = capsys.readouterr().err
    assert f"config file {config}: key 'train' appears twice (lines 1 and 5)" in err and "Traceback" not in err
    merged = parse_yaml_mapping("a: &b {steps: 5, lr: 1}\ntrain: {<<: *b, steps: 7}\n", "t")
    assert merged["train"] == {"steps": 7, "lr": 1}  # a key a merge (<<) brings in may be overridden
    assert main([*args, "--config", str(tmp_path)]) == 2
    assert f"config file {tmp_path} is a folder, expected a YAML file" in capsys.readouterr().err
    config.write_text("train:\n  steps: [1\n")
    assert main([*args, "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"config file {config} is not valid YAML" in err and "<unicode string>" not in err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    ("body", "field", "expected"),
    [
        ('train:\n  lr: "1e-4"\n', "train.lr", "a finite number"),
        ("train:\n  steps: '100'\n", "train.steps", "an integer"),
        ("eval:\n  q_weight: '0.5'\n", "eval.q_weight", "a finite number or null"),
        ("eval:\n  q_weight_grid: [0.0, '0.5']\n", "eval.q_weight_grid", "a list of finite numbers"),
        ("eval:\n  q_weight_grid: '0.0, 0.5'\n", "eval.q_weight_grid", "a list of finite numbers"),
        ("model:\n  pretrained: 'false'\n", "model.pretrained", "true or false"),
    ],
)
def test_a_quoted_number_in_a_config_file_names_the_field(body, field, expected, tmp_path, capsys):
    """A YAML string where a number is expected is a one-line error naming the file, the field and the type,
    not a value quietly parsed (a quoted value is text to YAML; `--set` values are text by nature)."""
    config = tmp_path / "c.yaml"
    config.write_text(body)
    with pytest.raises(ConfigError, match=f"{config}: {field}: cannot use .* \\(expected {expected}, not text"):
        Config.load(config)
    args = ["train", "--data", str(tmp_path), "--category", "screw", "--out", str(tmp_path / "r"), "--no-ray"]
    assert main([*args, "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"{field}: cannot use" in err and "write it without quotes" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_unquoted_exponents_in_yaml_and_set_values_as_text_are_numbers(tmp_path):
    """PyYAML (YAML 1.1) reads a dotless 1e-4 as a string; the config loader reads it as YAML 1.2 does, a
    number, so refusing strings costs no unquoted number. --set values arrive as text and are still parsed."""
    from mapl_ray.cli import resolve_config

    assert parse_yaml_mapping("a: 1e-4\nb: -2E3\nc: '1e-4'\nd: 1.5\ne: 10\n", "t") == {
        "a": 1e-4,
        "b": -2000.0,
        "c": "1e-4",
        "d": 1.5,
        "e": 10,
    }
    config = tmp_path / "c.yaml"
    config.write_text("train:\n  lr: 1e-3\n  min_lr: 1E-5\n  steps: 2e3\n")
    train = Config.load(config).train
    assert (train.lr, train.min_lr, train.steps) == (1e-3, 1e-5, 2000) and isinstance(train.steps, int)
    sets = ["train.lr=2e-3", "train.steps=7", "eval.q_weight=0.5", "eval.q_weight_grid=0.1,0.2"]
    argv = ["train", "--data", str(tmp_path), "--category", "screw", "--config", str(config), "--no-ray"]
    cfg = resolve_config(build_parser().parse_args([*argv, *(x for s in sets for x in ("--set", s))]))
    assert (cfg.train.lr, cfg.train.min_lr, cfg.train.steps) == (2e-3, 1e-5, 7)
    assert (cfg.eval.q_weight, cfg.eval.q_weight_grid) == (0.5, (0.1, 0.2))
    with pytest.raises(ConfigError, match="overrides: train.lr: cannot use 'fast' \\(expected a finite number\\)"):
        Config().override({"train.lr": "fast"})
    cfg.override({"data.category": "1e5"}).save(tmp_path / "saved.yaml")  # text that looks like 1e5 stays text
    assert Config.load(tmp_path / "saved.yaml").to_dict() == cfg.override({"data.category": "1e5"}).to_dict()


def test_storage_path_that_is_a_file_is_refused_before_anything_is_written(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    for storage in (afile, afile / "under"):
        run = tmp_path / "run"
        args = ["train", "--data", str(tmp_path), "--category", "screw", "--out", str(run), "--storage", str(storage)]
        assert main(args) == 2
        err = capsys.readouterr().err
        assert f"{afile} is a file" in err and "--storage" in err and "Traceback" not in err
        assert not run.exists()


# 3. Ctrl-C, --resume before the first checkpoint, the log's segments --------------------------------
@needs_data
def test_resume_before_the_first_checkpoint_says_rerun_without_resume(small_root, tmp_path, capsys):
    from mapl_ray.main_job import prepare_run

    run = tmp_path / "run"
    prepare_run(tiny_config(small_root), run)  # what a run interrupted before its first save leaves
    assert main(["train", "--resume", "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert "holds no checkpoint" in err and "rerun without --resume" in err
    assert f"mapl train --config {run / 'config.yaml'} --out {run}" in err
    assert main(["train", "--resume", "--out", str(tmp_path / "nowhere")]) == 2
    assert "cannot resume" in capsys.readouterr().err


def _mapl(*args: str, **kw) -> subprocess.Popen:
    """``mapl`` in a subprocess that takes SIGINT as a terminal's foreground job takes Ctrl-C.

    Python raises KeyboardInterrupt on SIGINT only when SIGINT was not ignored when it started, and a shell
    without job control starts background jobs (``pytest &``, ``nohup``) with SIGINT ignored, which their
    children inherit: a test runner started so passed it down to ``mapl train``, which then trained on after
    the SIGINT (the clean-clone run). The child puts Python's handler back, as a terminal's job has it."""
    code = (
        "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
        "from mapl_ray.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    return subprocess.Popen([sys.executable, "-c", code, *args], text=True, **kw)


def _interrupt_when(
    proc: subprocess.Popen, path: Path, timeout: float = 300, sig: int = signal.SIGINT
) -> tuple[int, str, str]:
    t0 = time.monotonic()
    while not path.exists() and proc.poll() is None and time.monotonic() - t0 < timeout:
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(sig)
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()  # the test fails; the process must not train on after it
        out, err = proc.communicate()
        raise AssertionError(f"still running 120 s after SIGINT; stderr:\n{err[-2000:]}") from None
    return proc.returncode, out, err


def _train_cmd(root: Path, run: Path, steps: int, *extra: str) -> list[str]:
    base = ["train", "--data", str(root), "--category", "screw", "--out", str(run), "--steps", str(steps), *TINY]
    return [*base, "--set", "train.checkpoint_every=3", "--set", "train.log_every=1", *extra]


@needs_data
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl_c", "sigterm"])
def test_ctrl_c_says_where_the_checkpoint_is_and_how_to_resume(small_root, tmp_path, sig):
    """Ctrl-C, and SIGTERM as a job scheduler's timeout sends it, stop a run with the resume hint."""
    run = tmp_path / "run"
    ignored = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as a runner started in the background has it
    try:
        proc = _mapl(
            *_train_cmd(small_root, run, 100000, "--no-ray", "--quiet"), stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
    finally:
        signal.signal(signal.SIGINT, ignored)
    rc, _, err = _interrupt_when(proc, run / "checkpoint" / "state.json", sig=sig)
    assert rc == 130, err
    step = json.loads((run / "checkpoint" / "state.json").read_text())["step"]
    assert f"interrupted; the last checkpoint is {run / 'checkpoint'} (step {step} of 100000)" in err
    assert f"mapl train --resume --out {run}" in err and "Traceback" not in err


def test_stop_hint_before_anything_was_written(tmp_path):
    from mapl_ray.runfolder import stop_hint

    assert "nothing was trained" in stop_hint(tmp_path / "never")


def test_resumed_segment_number_follows_the_log(tmp_path):
    from mapl_ray.runfolder import train_log_segment

    assert train_log_segment(tmp_path) == 1  # resumed before anything was logged
    log = tmp_path / "train_log.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": 0.1}) + "\n" for s in (1, 2)))  # a run from before segments
    assert train_log_segment(tmp_path) == 1
    with log.open("a") as fh:
        fh.write(json.dumps({"step": 2, "segment": 1, "loss": 0.1}) + "\n")
    assert train_log_segment(tmp_path) == 2


# 4. the validation hold-out ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("n", "expected"),
    [(320, 16), (54, 16), (53, 15), (30, 9), (14, 4), (7, 2), (4, 2), (3, 1), (1, 0)],
)
def test_validation_share_scales_with_the_set(n, expected):
    from mapl_ray.data.train_data import validation_count

    assert validation_count(n, 16, 0.3) == expected
    assert n - validation_count(n, 16, 0.3) >= min(2, n)  # something is left to train on


def test_runs_from_before_the_fraction_keep_their_hold_out(tmp_path):
    from mapl_ray.data.train_data import validation_count

    old = Config().to_dict()
    del old["eval"]["validation_fraction"]
    (tmp_path / "config.yaml").write_text(json.dumps(old))  # YAML is a superset of JSON
    cfg = Config.load_run(tmp_path / "config.yaml")
    assert cfg.eval.validation_fraction == 1.0
    assert validation_count(30, cfg.eval.validation_normals, cfg.eval.validation_fraction) == 16  # as before


# 5. the command line -----------------------------------------------------------------------------
def test_version_and_help(capsys):
    from mapl_ray import __version__

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"mapl {__version__}"
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    assert "mapl train --data ROOT --category NAME" in text and "required for a new run" in text
    assert "examples:" in text and "mapl train --resume --out runs/screw" in text


def test_every_option_has_help():
    parser = build_parser()
    subs = next(a for a in parser._actions if a.dest == "command").choices
    missing = [
        f"{name} {a.option_strings or a.dest}"
        for name, sub in subs.items()
        if name != "serve"  # the serve sub-command is maintained with mapl_ray.pipelines.serve
        for a in sub._actions
        if not a.help
    ]
    assert not missing


@pytest.mark.parametrize(
    ("override", "suggestion"),
    [("train.stepz=3", "train.steps"), ("model.steps=3", "train.steps"), ("lr=0.1", "train.lr")],
)
def test_unknown_set_field_lists_the_nearest_names(override, suggestion, capsys, tmp_path):
    assert main(["train", "--data", str(tmp_path), "--category", "screw", "--set", override]) == 2
    err = capsys.readouterr().err
    assert "did you mean" in err and suggestion in err
    assert err.startswith("mapl train: error:")  # nothing else printed first


@pytest.mark.parametrize(("typo", "section"), [("trian", "train"), ("modle", "model"), ("simulaton", "simulation")])
def test_section_name_typo_in_a_config_file_names_the_nearest_section(typo, section, capsys, tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text(f"{typo}:\n  steps: 3\n")
    assert main(["train", "--config", str(bad), "--data", str(tmp_path), "--category", "screw"]) == 2
    err = capsys.readouterr().err
    assert f"unknown section(s) {typo}; did you mean {section}?" in err and str(bad) in err
    assert len(err.strip().splitlines()) == 1


def test_unknown_section_without_a_near_name_lists_the_sections():
    with pytest.raises(ConfigError, match="unknown section.s. 7, zzz; sections are data, simulation, model"):
        Config.from_dict({"zzz": {}, 7: 1})


def test_a_section_that_is_not_a_mapping_is_named():
    with pytest.raises(ConfigError, match="section train must be a mapping of fields, got int"):
        Config.from_dict({"train": 20})
    with pytest.raises(ConfigError, match="the top level must be a mapping of fields, got list"):
        Config.from_dict([1])


def test_new_run_needs_data_and_category(capsys):
    assert main(["train", "--steps", "5"]) == 2
    assert "a new run needs --data ROOT and --category NAME" in capsys.readouterr().err


@needs_data
def test_predict_a_folder(trained_run, small_root, tmp_path, capsys):
    folder = small_root / "screw" / "test" / "thread_top"
    assert main(["predict", str(trained_run), str(folder), "--heatmaps", str(tmp_path / "h")]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["path"] for r in lines] == [str(p) for p in sorted(folder.glob("*.png"))]
    assert all(r["label"] in (0, 1) for r in lines)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["predict", str(trained_run), str(empty)]) == 2
    assert f"folder {empty} holds no image files" in capsys.readouterr().err


@needs_data
def test_new_user_run_prints_its_choices(small_root, tmp_path, capsys):
    # the same images under another folder name get no preset (said), unless the user names it
    root = tmp_path / "data"
    shutil.copytree(small_root / "screw", root / "screw copy")
    run = tmp_path / "run"
    args = ["train", "--data", str(root), "--category", "screw copy", "--out", str(run), "--no-ray", "--quiet"]
    assert main([*args, "--steps", "2", "--textures", str(TEXTURES), "--foreground-preset", "screw", *TINY]) == 0
    err = capsys.readouterr().err
    assert "mapl train: anomaly simulation: foreground preset 'screw' (from simulation.foreground)" in err
    saved = Config.load(run / "config.yaml").simulation
    assert (saved.foreground, saved.use_foreground_mask, saved.foreground_threshold) == ("screw", True, 130)
    # 14 labeled normals: 30% (4) held out, not 16, and the run says so
    assert "validation: 4 of 14 labeled normals held out" in err
    assert "unlabeled pool" not in err and "pseudo-labels" not in err  # no pool: nothing said about one
    assert len(json.loads((run / "data_info.json").read_text())["validation_normals"]) == 4


# 6. a quiet console ------------------------------------------------------------------------------
def test_console_logging(capsys):
    from mapl_ray.cli import setup_logging

    setup_logging("train")
    logging.getLogger("mapl_ray.data").info("held out 4")
    logging.getLogger("mapl_ray.data").warning("odd file")
    logging.getLogger("mapl_ray.train").info("step 10 loss 0.3")
    err = capsys.readouterr().err
    assert "mapl train: held out 4" in err and "mapl train: warning: odd file" in err and "step 10" not in err
    setup_logging("train", verbose=True)
    logging.getLogger("mapl_ray.train").info("step 20 loss 0.2")
    assert "mapl train: step 20 loss 0.2" in capsys.readouterr().err
    setup_logging("train")


def test_ray_token_note_is_dropped_but_its_security_warning_kept():
    from mapl_ray.pipelines.ray_env import _DropTokenAuthNote

    def record(msg: str) -> logging.LogRecord:
        return logging.LogRecord("ray", logging.WARNING, __file__, 1, msg, None, None)

    f = _DropTokenAuthNote()
    assert not f.filter(record("Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=..."))
    assert f.filter(record("Token authentication is disabled for this Ray cluster. Anyone with network access"))


def test_serves_reconnect_note_is_dropped_and_its_other_lines_kept(caplog):
    """mapl serve calls serve.start with --host/--port, then serve.run, which notes that it "connects to the
    existing Serve app" and applies no new HTTP options: after our own start that reads as --port ignored."""
    from mapl_ray.pipelines.ray_env import quiet_serve_reconnect_note

    quiet_serve_reconnect_note()
    quiet_serve_reconnect_note()  # installed once
    serve_log = logging.getLogger("ray.serve")
    assert sum(type(f).__name__ == "_DropServeReconnectNote" for f in serve_log.filters) == 1
    with caplog.at_level(logging.INFO, logger="ray.serve"):
        serve_log.info('Connecting to existing Serve app in namespace "serve". New http_options will not be applied.')
        serve_log.info("Application 'mapl' is ready at http://127.0.0.1:8391/.")
    assert [r.getMessage()[:11] for r in caplog.records] == ["Application"]


def test_progress_follows_rank0_log(tmp_path, capsys):
    from mapl_ray.cli import setup_logging
    from mapl_ray.pipelines.ray_train import _LogFollower

    setup_logging("train")
    log = tmp_path / "train_log.jsonl"
    log.write_text(json.dumps({"step": 10, "loss": 0.5}) + "\n")  # an earlier segment's line
    refit = {"refit_step": 12, "pseudo_pos": 3, "pseudo_neg": 20, "pseudo_unknown": 1}
    with _LogFollower(tmp_path, total=40, initial=10, poll_s=0.05) as follower:
        with log.open("a") as fh:
            fh.write(json.dumps({"step": 20, "loss": 0.4, **refit}) + "\n" + '{"step": 30, "lo')  # half-written
        time.sleep(0.3)
        assert follower.progress.n == 20
        with log.open("a") as fh:
            fh.write('ss": 0.3, "refit_step": 12, "pseudo_pos": 3, "pseudo_neg": 20, "pseudo_unknown": 1}\n')
    assert follower.progress.n == 30 and follower.progress.loss == 0.3
    err = capsys.readouterr().err
    # the refit's line once (later lines repeat its stats); no bar on a captured (non-TTY) stderr
    assert err.count("pseudo-labels of the refit at step 12: 3 anomalous, 20 normal, 1 unknown of 24") == 1
    assert "step 20/40 (50%), loss 0.4000" in err and "step 30/40 (75%), loss 0.3000" in err and "\r" not in err


class _FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_a_bar_on_a_terminal_and_log_lines_elsewhere(monkeypatch, capsys):
    from mapl_ray.cli import setup_logging
    from mapl_ray.engine.progress import TrainProgress

    setup_logging("train")
    p = TrainProgress(total=40, initial=0)  # stderr captured: not a TTY
    for step in range(1, 41):
        p.update(step, 0.5 if step >= 10 else None)
    p.phase("saving the final checkpoint")
    p.close()
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "step " in line]
    assert [line.split("step ")[1].split(" ")[0] for line in lines] == [f"{s}/40" for s in range(4, 41, 4)]
    assert "step 4/40 (10%), " in err and "step 12/40 (30%), loss 0.5000" in err
    assert "mapl train: saving the final checkpoint" in err and "\r" not in err and "|" not in err

    term = _FakeTerminal()
    monkeypatch.setattr(sys, "stderr", term)
    p = TrainProgress(total=40, initial=0)
    p.update(5, 0.25)
    p.phase("saving the final checkpoint")
    logging.getLogger("mapl_ray.pseudo").info("a refit line")  # written above the bar, not into it
    p.close()
    out = term.getvalue()
    assert "\r" in out and "5/40" in out and "loss=0.2500" in out and "train: saving the final checkpoint" in out
    assert "\rmapl train: a refit line\n" in out and "step 4/40" not in out  # the bar cleared, the line, the bar


def test_the_logged_pace_leaves_out_the_start_up_before_the_first_step(monkeypatch, capsys):
    from mapl_ray.cli import setup_logging
    from mapl_ray.engine import progress

    clock = [100.0]
    monkeypatch.setattr(progress.time, "perf_counter", lambda: clock[0])
    setup_logging("train")
    p = progress.TrainProgress(total=20, initial=0)
    clock[0] += 30.0  # data and memory-bank fill before the first step
    for step in range(1, 5):
        clock[0] += 0.5
        p.update(step)
    p.close()
    lines = [line for line in capsys.readouterr().err.splitlines() if "step " in line]
    assert lines[0].endswith("step 2/20 (10%), 0.50 s/step") and lines[1].endswith("step 4/20 (20%), 0.50 s/step")


def test_image_counts_are_plain_lines_in_a_redirected_log(capsys):
    from mapl_ray.cli import setup_logging
    from mapl_ray.engine.progress import CountProgress

    setup_logging("score")
    p = CountProgress(total=1000, desc="scored")  # stderr captured: not a TTY
    for _ in range(25):
        p.update(41)  # 1,025 counted: past the total, as a last partial batch may be
    p.close()
    err = capsys.readouterr().err
    counts = [int(line.split("scored: ")[1].split("/")[0]) for line in err.splitlines() if "scored: " in line]
    assert counts == [123, 205, 328, 410, 533, 615, 738, 820, 902, 1025]  # each tenth once, the end once
    assert "scored: 123/1000 img (12%), " in err and " img/s" in err and "\r" not in err
    q = CountProgress(total=None, desc="shards", interval_s=0.0)  # unknown total: by time
    q.update(7)
    q.close()
    assert "shards: 7 img, " in capsys.readouterr().err


def test_no_pool_image_labeled_anomalous_is_a_warning(caplog):
    from mapl_ray.pseudo.labeler import label_quality, report_pool_labels

    cfg = Config()
    canaries = np.array([False] * 8 + [True, True])
    truth = np.array([0] * 6 + [1, 1, -1, -1], dtype=np.int8)

    def refit(step, labels):
        return {"refit_step": step, **label_quality(np.array(labels, dtype=np.int8), truth, canaries)}

    none = refit(100, [0] * 6 + [0, -1, 0, 0])  # no anomalous label, both canaries in the normal stream
    with caplog.at_level(logging.INFO, logger="mapl_ray.pseudo"):
        report_pool_labels([refit(50, [0] * 6 + [1, 0, 1, 0]), none], cfg)
    info, warn = [r for r in caplog.records if r.levelno == logging.INFO], [r for r in caplog.records if r.levelno > 20]
    assert len(info) == 1 and "pseudo-labels at the end (2 refits, the last at step 100): 0 anomalous, 9 normal" in (
        info[0].getMessage()
    )
    assert "recall 0.00, 2 of 2 in the normal stream" in info[0].getMessage()
    assert "anomalous per refit: 2, 0" in info[0].getMessage()
    assert len(warn) == 1 and "no pool image was labeled anomalous at the last refit (step 100)" in warn[0].getMessage()
    assert "all 2 validation canaries went to the normal stream" in warn[0].getMessage()
    assert "used as normal data" in warn[0].getMessage() and "--labeled-anomalies" in warn[0].getMessage()
    for quiet in ([refit(50, [0] * 6 + [1, 0, 0, 0])], [refit(50, [0] * 6 + [0, 0, 0, -1])], []):
        caplog.clear()  # one labeled anomalous; a canary not in the normal stream; no pool (no refits)
        with caplog.at_level(logging.INFO, logger="mapl_ray.pseudo"):
            report_pool_labels(quiet, cfg)
        assert not [r for r in caplog.records if r.levelno > logging.INFO]
        assert len(caplog.records) == (1 if quiet else 0)


@needs_data
def test_pool_run_console_tells_the_pool_refits_and_phases_without_a_bar(small_root, tmp_path, capsys):
    """A redirected console (capsys: not a TTY) as a user reads it: the pool, one line per refit, the end
    summary, plain progress lines and the phases after the loop; no carriage return."""
    run = tmp_path / "run"
    pool = ["--set", "data.labeled_normals=7", "--set", "data.pool_anomaly_share=0.2"]
    refits = ["--set", "pseudo.warmup_steps=2", "--set", "pseudo.refit_every=3", "--set", "pseudo.pool_size=8"]
    args = ["train", "--data", str(small_root), "--category", "screw", "--out", str(run), "--no-ray", "--steps", "6"]
    assert main([*args, *TINY, *pool, *refits, "--set", "eval.validation_canaries=0.25"]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err
    summary = json.loads((run / "train_summary.json").read_text())
    info = json.loads((run / "data_info.json").read_text())
    m = info["unlabeled"] + len(info["validation_canaries"])
    assert f"unlabeled pool: {m} images ({len(info['validation_canaries'])} of them validation canaries" in err
    assert "OCC features knn (pseudo.features=auto), 2 refits in 6 steps, at step 2 then every 3" in err
    found = summary["pseudo_refits"]
    assert [r["refit_step"] for r in found] == [2, 5]
    for r in found:  # each refit's line says what train_summary.json holds
        counts = f"{r['pseudo_pos']} anomalous, {r['pseudo_neg']} normal, {r['pseudo_unknown']} unknown of {m}"
        assert f"mapl train: pseudo-labels of the refit at step {r['refit_step']}: {counts}" in err
        assert f"recall {r['canary_recall']:.2f}, {r['canaries_in_normal_stream']} of {r['canaries']} in the" in err
    assert "pseudo-labels at the end (2 refits, the last at step 5)" in err and "vs the split's truth: precision" in err
    order = [
        "step 6: validating",
        "step 6/6 (100%)",
        "saving the final checkpoint",
        "pseudo-labels at the end",
        "calibrating the decision threshold",
        "evaluating on the test split",
    ]
    assert [err.index(s) for s in order] == sorted(err.index(s) for s in order)
    told = re.search(r"threshold on (\d+) held-out validation images \((\d+) normals, (\d+) simulated anomalies\)", err)
    assert told and int(told[1]) == int(told[2]) + int(told[3])  # what the validation images are, not just how many


@pytest.mark.slow
@needs_data
def test_ray_console_is_quiet_and_ctrl_c_resumes(small_root, tmp_path):
    """The main job on Ray as a user runs it: no Ray lines on the console, Ctrl-C with a resume hint,
    and the resumed run marked in train_log.jsonl. About 3 minutes on 2 cores."""
    run = tmp_path / "run"
    env = {**os.environ, "RAY_ADDRESS": ""}
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "env": env}
    rc, _, err = _interrupt_when(
        _mapl(*_train_cmd(small_root, run, 100000), **pipes), run / "checkpoint" / "state.json"
    )
    assert rc == 130 and "interrupted; the last checkpoint is" in err, err
    step = json.loads((run / "checkpoint" / "state.json").read_text())["step"]
    assert f"(step {step} of 100000)" in err, err  # the workers' last checkpoint, not one before it
    proc = _mapl("train", "--resume", "--out", str(run), "--steps", str(step + 3), **pipes)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    others = [line for line in lines if not line.startswith(("mapl train:", "train:", "run folder:"))]
    assert not others, others  # no Ray INFO lines, worker prefixes, TrainingReport dumps or tracebacks
    assert json.loads(out)["run"] == str(run)
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert log[-1] == {**log[-1], "step": step + 3, "segment": 1}


# 7. the report -----------------------------------------------------------------------------------
def test_decision_counts_match_a_confusion_matrix():
    from sklearn.metrics import confusion_matrix

    from mapl_ray.eval.metrics import decision_counts

    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 60)
    scores = rng.random(60) + 0.3 * labels
    types = np.where(labels == 1, rng.choice(["crack", "hole"], 60), "good")
    d = decision_counts(labels, scores, types, threshold=0.7)
    tn, fp, fn, tp = confusion_matrix(labels, scores >= 0.7).ravel()
    assert (d["false_positives"], d["false_negatives"], d["correct"]) == (fp, fn, tp + tn)
    assert d["accuracy"] == pytest.approx((tp + tn) / 60)
    assert d["by_type"]["good"] == {"images": int((labels == 0).sum()), "flagged": int(fp)}
    assert sum(c["images"] - c["flagged"] for t, c in d["by_type"].items() if t != "good") == fn
    assert list(d["by_type"])[0] == "good"


def test_heatmap_colour_range_per_image_and_not_below_the_threshold():
    from mapl_ray.eval.report import decision_text, heatmap_range, map_threshold

    quiet = np.full((8, 8), 0.1)
    quiet[0, 0] = 0.2
    strong = np.zeros((8, 8))
    strong[2:4, 2:4] = 0.9
    assert heatmap_range(quiet, 0.5) == (0.1, 0.5)  # below the threshold: not stretched to look hot
    assert heatmap_range(strong, 0.5) == (0.0, 0.9)  # its own maximum, not the report's
    assert heatmap_range(quiet) == (0.1, 0.2)
    assert map_threshold(0.5, 0.0) == 0.5 and map_threshold(0.5, 0.2) is None  # q in the score: not map units
    assert decision_text(0.61, 0.5) == "score 0.61 >= threshold 0.5: defect"
    assert decision_text(0.4, 0.5) == "score 0.4 < threshold 0.5: good"


@needs_data
def test_report_has_decisions_and_no_training_internals(trained_run):
    report = (trained_run / "report.md").read_text()
    metrics = json.loads((trained_run / "metrics.json").read_text())
    d = metrics["decisions"]
    rows = list(csv.DictReader((trained_run / "scores.csv").open()))
    fp = sum(r["label"] == "0" and r["anomalous"] == "1" for r in rows)
    fn = sum(r["label"] == "1" and r["anomalous"] == "0" for r in rows)
    assert (d["false_positives"], d["false_negatives"]) == (fp, fn)
    assert "## Decisions at the threshold" in report
    assert f"{fp} false positive(s) (good images flagged), {fn} false negative(s) (defects missed)" in report
    assert "training time" in report and "loader_wait_s" not in report and "final_losses" not in report
    assert "loader_wait_s" in json.dumps(metrics["run"]["training"])  # kept in metrics.json


def test_device_port_and_gpu_mistakes_are_clear_errors(tmp_path, capsys, monkeypatch):
    import torch

    from mapl_ray.tensors import resolve_device

    with pytest.raises(SystemExit) as e:
        main(["serve", str(tmp_path), "--port", "99999"])
    assert e.value.code == 2 and "port number 1-65535" in capsys.readouterr().err
    # a bad --set value and a missing run folder, both named in one message (neither hides the other)
    assert main(["serve", str(tmp_path / "nowhere"), "--set", "graph_batch_sizes=bogus"]) == 2
    err = capsys.readouterr().err
    assert "graph_batch_sizes must be one of pow2, fine, got 'bogus'" in err and "nowhere does not exist" in err
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            resolve_device("cuda")
    with pytest.raises(ConfigError, match="not a device name"):
        resolve_device("gpu0")
    import ray

    from mapl_ray.pipelines.ray_train import check_gpus

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    with pytest.raises(ConfigError, match="local Ray sees 0 GPU"):
        check_gpus(Config().override({"train.use_gpu": True}))
    check_gpus(Config())  # no GPU asked for: nothing to check
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # a cluster may autoscale GPU nodes
    check_gpus(Config().override({"train.use_gpu": True}))


@needs_data
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_train_with_gpu_on_a_machine_without_one_stops_before_writing_the_run(
    small_root, tmp_path, capsys, monkeypatch
):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    run = tmp_path / "r"
    args = ["train", "--data", str(small_root), "--category", "screw", "--out", str(run), "--gpu", *TINY]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "local Ray sees 0 GPU" in err and "Traceback" not in err
    assert not run.exists()  # refused before the run folder is written and the data loaded


@pytest.mark.parametrize(
    "flag, value",
    [("--batch-size", "0"), ("--actors", "0"), ("--rows-per-file", "0"), ("--gpus-per-actor", "-1"), ("--actors", "x")],
)
def test_score_refuses_a_bad_count_with_a_usage_error(flag, value, tmp_path, capsys):
    """Each was a traceback from deep in Ray Data or the file split (ZeroDivisionError, range() arg 3...)."""
    with pytest.raises(SystemExit) as stop:
        build_parser().parse_args(["score", str(tmp_path), str(tmp_path), "--out", str(tmp_path / "o"), flag, value])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: expected" in err and repr(value) in err


@pytest.mark.parametrize(
    "args",
    [
        ["prepare", "SRC", "--out", "O", "--image-size", "0"],
        ["prepare", "SRC", "--out", "O", "--image-size", "-64"],
        ["prepare", "SRC", "--out", "O", "--rows-per-shard", "0"],
        ["prepare", "SRC", "--out", "O", "--concurrency", "0"],
        ["tune", "--data", "D", "--category", "c", "--num-samples", "0"],
    ],
)
def test_prepare_and_tune_refuse_a_count_below_one_with_a_usage_error(args, capsys):
    """--image-size 0 was taken for "not set"; the others were tracebacks or a search of 1 trial."""
    with pytest.raises(SystemExit) as stop:
        build_parser().parse_args(args)
    assert stop.value.code == 2
    assert f"argument {args[-2]}: expected an integer >= 1, got {args[-1]!r}" in capsys.readouterr().err


def test_tune_resume_says_which_flags_it_ignores(tmp_path, caplog, capsys):
    """A resumed search runs with the settings it started with: flags given beside --resume are named."""
    with caplog.at_level(logging.WARNING, logger="mapl_ray.cli"):
        rc = main(
            ["tune", "--resume", "--out", str(tmp_path / "nothing"), "--num-samples", "3", "--gpus-per-trial", "0"]
        )
    assert rc == 2 and "holds no search to resume" in capsys.readouterr().err
    assert "ignored: --num-samples" in caplog.text and "--gpus-per-trial" not in caplog.text  # 0 is the default


def test_a_config_file_that_sets_nothing_is_warned_about(tmp_path, caplog):
    """An empty --config (or one of comments only) trains the defaults: said, not silent."""
    config = tmp_path / "best.yaml"
    for body in ("", "# train:\n#   lr: 0.001\n"):
        config.write_text(body)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="mapl_ray.config"):
            assert Config.load(config) == Config()
        assert f"config file {config} sets nothing" in caplog.text
    config.write_text("train:\n  lr: 0.001\n")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mapl_ray.config"):
        assert Config.load(config).train.lr == 0.001
    assert "sets nothing" not in caplog.text


def test_a_word_where_a_number_belongs_is_not_told_to_drop_quotes(tmp_path):
    """Only text that would be right unquoted gets the quotes hint; `lr: fast` was wrong either way."""
    config = tmp_path / "c.yaml"
    for body, field in (("train:\n  lr: fast\n", "train.lr"), ("model:\n  pretrained: n\n", "model.pretrained")):
        config.write_text(body)
        with pytest.raises(ConfigError, match=f"{field}: cannot use") as e:
            Config.load(config)
        assert "quotes" not in str(e.value)


def test_a_diverging_run_stops_at_the_first_nan_loss_with_one_line_naming_the_learning_rate(
    small_root, tmp_path, capsys
):
    """A learning rate far too high makes the loss NaN: stopped there with exit 2 and one line naming train.lr,
    not a traceback from evaluating a model of NaN weights."""
    out = tmp_path / "r"
    args = ["train", "--data", str(small_root), "--category", "screw", "--out", str(out), "--no-ray", *TINY]
    assert main([*args, "--lr", "1e30", "--set", "train.log_every=1", "--set", "train.steps=6"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("mapl train: error: training diverged: the loss is nan at step ")
    assert "train.lr 1e+30" in err[-1] and "Traceback" not in "\n".join(err)
    assert not (out / "metrics.json").exists()
