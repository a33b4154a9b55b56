"""The ``mapl`` command line on real images: predict, evaluate, and errors a new user would hit."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import SCREW, TEXTURES, TINY_CLI, needs_data
from PIL import Image

from mapl_ray.cli import main

pytestmark = needs_data


def _train_args(root: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--data",
        str(root),
        "--category",
        "screw",
        "--textures",
        str(TEXTURES),
        "--out",
        str(out),
        "--no-ray",
        "--quiet",
        "--steps",
        "2",
        *TINY_CLI,
        "--set",
        "eval.validation_normals=3",
        *extra,
    ]


def test_trained_run_folder_contract(trained_run):
    for name in (
        "config.yaml",
        "split.json",
        "metrics.json",
        "report.md",
        "train_log.jsonl",
        "checkpoint/model.safetensors",
        "checkpoint/state.json",
        "checkpoint/optimizer.pt",
        "plots/roc.png",
    ):
        assert (trained_run / name).is_file(), name
    assert list((trained_run / "heatmaps").glob("*.png"))
    # every file with the mode open() gives (safetensors and mkstemp wrote 0600: another user could not serve it)
    umask = os.umask(0o022)
    os.umask(umask)
    modes = {
        p.relative_to(trained_run).as_posix(): p.stat().st_mode & 0o777 for p in trained_run.rglob("*") if p.is_file()
    }
    assert {k: oct(m) for k, m in modes.items() if m != 0o666 & ~umask} == {}
    metrics = json.loads((trained_run / "metrics.json").read_text())
    for key in ("image_auroc", "pixel_auroc", "aupro", "f1_max"):
        assert 0.0 <= metrics["overall"][key] <= 1.0
    assert set(metrics["per_defect"]) == {"scratch_head", "thread_top"}
    state = json.loads((trained_run / "checkpoint" / "state.json").read_text())
    assert state["threshold"] is not None and "held-out labeled normal" in state["threshold_source"]
    report = (trained_run / "report.md").read_text()
    assert "plots/roc.png" in report and "heatmaps/" in report and "(scores.csv)" in report
    # per-image scores: every test image once, highest score first, and they give the reported image AUROC
    import csv

    from sklearn.metrics import roc_auc_score

    rows = list(csv.DictReader((trained_run / "scores.csv").open()))
    split = json.loads((trained_run / "split.json").read_text())
    assert len(rows) == len(split["test"]) and len({r["path"] for r in rows}) == len(rows)
    scores = [float(r["score"]) for r in rows]
    assert scores == sorted(scores, reverse=True)
    assert roc_auc_score([int(r["label"]) for r in rows], scores) == pytest.approx(
        metrics["overall"]["image_auroc"], abs=1e-4
    )
    assert all(r["anomalous"] == str(int(float(r["score"]) >= state["threshold"])) for r in rows)


def test_predict_on_real_images(trained_run, capsys, tmp_path):
    good = sorted((SCREW / "test" / "good").glob("*.png"))[5]
    bad = sorted((SCREW / "test" / "thread_top").glob("*.png"))[5]
    assert main(["predict", str(trained_run), str(good), str(bad), "--heatmaps", str(tmp_path / "h")]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [rec["path"] for rec in lines] == [str(good), str(bad)]
    for rec in lines:
        assert isinstance(rec["score"], float) and rec["label"] in (0, 1)
        assert Image.open(rec["heatmap"]).size[0] > 0


def test_evaluate_rewrites_metrics(trained_run, capsys):
    before = json.loads((trained_run / "metrics.json").read_text())["overall"]["image_auroc"]
    assert main(["evaluate", str(trained_run)]) == 0
    after = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert after["image_auroc"] == pytest.approx(before)
    run_info = json.loads((trained_run / "metrics.json").read_text())["run"]
    assert "training" in run_info and "skipped_images" in run_info["data"]  # kept from the training run


def test_predict_unreadable_image_names_file_and_scores_the_rest(trained_run, tmp_path, capsys):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    good = sorted((SCREW / "test" / "good").glob("*.png"))[0]
    assert main(["predict", str(trained_run), str(bad), str(good), "--heatmaps", str(tmp_path / "h")]) == 1
    captured = capsys.readouterr()
    lines = [json.loads(line) for line in captured.out.splitlines()]
    assert lines[0]["path"] == str(bad) and str(bad) in lines[0]["error"] and "score" not in lines[0]
    assert lines[1]["path"] == str(good) and isinstance(lines[1]["score"], float)
    assert f"mapl predict: warning: cannot read image '{bad}'" in captured.err
    assert "1 of 2 images could not be read" in captured.err and "mapl predict: error" not in captured.err


def test_predict_refuses_the_images_mapl_serve_refuses(trained_run, tmp_path, capsys):
    """A 1x1 or a 4000x10 image squashed to the run's square would get a confident score: predict refuses
    them with serve's limits (named in the error), and still scores the others."""
    from PIL import Image

    from mapl_ray.data.io import DecodeLimits
    from mapl_ray.serving.settings import ServeSettings

    served = ServeSettings(run_dir=str(trained_run)).resolve(False, 64, 2).decode_limits()
    assert served == DecodeLimits.for_model(64)  # one set of defaults for both
    tiny, thin = tmp_path / "tiny.png", tmp_path / "thin.png"
    Image.new("RGB", (1, 1)).save(tiny)
    Image.new("RGB", (4000, 10)).save(thin)
    good = sorted((SCREW / "test" / "good").glob("*.png"))[0]
    assert main(["predict", str(trained_run), str(tiny), str(thin), str(good), "--heatmaps", str(tmp_path / "h")]) == 1
    captured = capsys.readouterr()
    lines = [json.loads(line) for line in captured.out.splitlines()]
    assert "min_side=8" in lines[0]["error"] and "score" not in lines[0]
    assert "max_aspect=4" in lines[1]["error"]
    assert isinstance(lines[2]["score"], float)
    assert "2 of 3 images could not be read" in captured.err


def test_predict_says_what_mapl_serve_warns_about(trained_run, tmp_path, capsys):
    """A 16-bit PNG (rescaled) and an animated GIF (first frame scored) carry the warnings mapl serve answers
    with; a plain image has none. A folder scan finds the GIF as serve accepts it."""
    from PIL import Image

    from mapl_ray.serving.results import image_result

    deep, anim = tmp_path / "deep.png", tmp_path / "anim.gif"
    Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)).save(deep)
    frames = [Image.new("RGB", (64, 64), (40 * i, 0, 0)) for i in range(3)]
    frames[0].save(anim, save_all=True, append_images=frames[1:])
    good = sorted((SCREW / "test" / "good").glob("*.png"))[0]
    assert main(["predict", str(trained_run), str(tmp_path), str(good), "--heatmaps", str(tmp_path / "h")]) == 0
    lines = {Path(r["path"]).name: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert lines["deep.png"]["warnings"] == ["I;16 (16-bit) image: rescaled to 8 bits (value / 257), as in training"]
    assert lines["anim.gif"]["warnings"] == ["animated / multi-frame image (3 frames): only the first frame was scored"]
    assert "warnings" not in lines[good.name]
    from mapl_ray.inference import Predictor

    decoded = Predictor(trained_run, device="cpu").decode(anim)  # the same text as the server's answer
    served = image_result(lines["anim.gif"], None, decoded, {}, threshold=None, version="v", max_regions=1)
    assert served["warnings"] == lines["anim.gif"]["warnings"]


def test_predict_a_folder_with_an_unreadable_image_scores_the_others(trained_run, tmp_path, capsys):
    """A folder (what a user passes most) with one broken file: every readable image is scored, the broken
    one is named with its reason on stdout and stderr, and the exit status is 1 (0 only when every image was
    scored, 2 when none was read)."""
    folder = tmp_path / "images"
    folder.mkdir()
    goods = sorted((SCREW / "test" / "good").glob("*.png"))[:2]
    for f in goods:
        shutil.copy(f, folder / f.name)
    (folder / "001_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    assert main(["predict", str(trained_run), str(folder), "--heatmaps", str(tmp_path / "h")]) == 1
    captured = capsys.readouterr()
    lines = {Path(r["path"]).name: r for r in map(json.loads, captured.out.splitlines())}
    assert sorted(lines) == sorted([*(f.name for f in goods), "001_broken.png"])
    assert all(isinstance(lines[f.name]["score"], float) for f in goods)
    reason = lines["001_broken.png"]["error"]
    assert "001_broken.png" in reason and reason in captured.err
    assert f"1 of {len(goods) + 1} images could not be read (their 'error' line above)" in captured.err
    (folder / goods[0].name).write_bytes(b"not an image")
    (folder / goods[1].name).unlink()
    assert main(["predict", str(trained_run), str(folder), "--heatmaps", str(tmp_path / "h")]) == 2
    captured = capsys.readouterr()
    assert all("error" in json.loads(line) for line in captured.out.splitlines())
    assert "none of the 2 images could be read" in captured.err


def test_predict_heatmaps_of_same_named_images_do_not_collide(trained_run, tmp_path, capsys):
    a = sorted((SCREW / "test" / "good").glob("*.png"))[0]
    b = SCREW / "test" / "thread_top" / a.name  # same file name, other folder
    assert b.is_file()
    out = tmp_path / "h"
    assert main(["predict", str(trained_run), str(a), str(b), "--heatmaps", str(out)]) == 0
    heat = [json.loads(line)["heatmap"] for line in capsys.readouterr().out.splitlines()]
    assert heat[0] != heat[1] and len(list(out.glob("*.png"))) == 2
    assert main(["predict", str(trained_run), str(a), "--heatmaps", str(out)]) == 0  # the same image: same file again
    assert json.loads(capsys.readouterr().out)["heatmap"] == heat[0] and len(list(out.glob("*.png"))) == 2


def test_evaluate_and_predict_need_a_run_folder(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path / "nowhere")]) == 2
    assert "does not exist (expected a folder written by `mapl train" in capsys.readouterr().err
    (tmp_path / "notes.txt").write_text("not a run")
    assert main(["evaluate", str(tmp_path / "notes.txt")]) == 2
    assert "notes.txt is a file, not a run folder" in capsys.readouterr().err
    (tmp_path / "half").mkdir()
    assert main(["predict", str(tmp_path / "half"), "x.png"]) == 2
    assert "not a trained run folder: config.yaml, checkpoint/state.json missing" in capsys.readouterr().err


def test_wrong_data_path(tmp_path, capsys):
    assert main(_train_args(tmp_path / "nowhere", tmp_path / "run")) == 2
    err = capsys.readouterr().err
    assert "data root" in err and "nowhere" in err and "does not exist" in err
    assert not (tmp_path / "run").exists()


def test_resume_of_a_folder_that_is_not_a_run(tmp_path, capsys):
    (tmp_path / "notrun").mkdir()
    assert main(["train", "--resume", "--out", str(tmp_path / "notrun"), "--steps", "5"]) == 2
    assert "is not a trained run folder" in capsys.readouterr().err


def test_resume_of_a_finished_run_changes_nothing(trained_run, tmp_path, capsys):
    run = tmp_path / "finished"
    shutil.copytree(trained_run, run)
    before = {p: p.read_bytes() for p in sorted((run / "checkpoint").iterdir()) if p.is_file()}
    assert main(["train", "--resume", "--out", str(run), "--no-ray"]) == 2
    err = capsys.readouterr().err
    assert "is finished" in err and "nothing was changed" in err and "mapl evaluate" in err
    assert {p: p.read_bytes() for p in sorted((run / "checkpoint").iterdir()) if p.is_file()} == before


def test_scoring_an_unfinished_run_warns(trained_run, tmp_path, capsys):
    run = tmp_path / "unfinished"
    shutil.copytree(trained_run, run)
    state_path = run / "checkpoint" / "state.json"
    state = json.loads(state_path.read_text())
    state["step"] = 1  # as a run interrupted before its end leaves it
    state.pop("threshold", None)
    state_path.write_text(json.dumps(state))
    image = json.loads((trained_run / "split.json").read_text())["test"][0]["path"]
    assert main(["predict", str(run), str(image)]) == 0
    err = capsys.readouterr().err
    assert f"run {run} stopped at step 1 of" in err and "labels are null" in err and "--resume --out" in err
    assert main(["predict", str(trained_run), str(image)]) == 0
    assert "stopped at step" not in capsys.readouterr().err  # a finished run: no warning


def test_split_errors_name_the_configuration_field(small_root, tmp_path, capsys):
    args = _train_args(small_root, tmp_path / "run", "--set", "data.split_validation_normals=1000")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "data.split_validation_normals=1000 but the category has 14 train/good images" in err
    assert not (tmp_path / "run").exists()


def test_missing_mask_and_corrupt_png(small_root, tmp_path, capsys):
    root = tmp_path / "data"
    shutil.copytree(small_root, root)
    mask = next((root / "screw" / "ground_truth" / "thread_top").glob("*_mask.png"))
    mask.unlink()
    assert main(_train_args(root, tmp_path / "r1")) == 2
    assert mask.name in capsys.readouterr().err

    shutil.rmtree(root)
    shutil.copytree(small_root, root)
    corrupt = root / "screw" / "train" / "good" / "000.png"
    corrupt.write_bytes(corrupt.read_bytes()[:200])  # truncated PNG
    assert main(_train_args(root, tmp_path / "r2")) == 2
    assert "000.png" in capsys.readouterr().err


def test_mask_size_mismatch(small_root, tmp_path, capsys):
    root = tmp_path / "data"
    shutil.copytree(small_root, root)
    mask = next((root / "screw" / "ground_truth" / "scratch_head").glob("*_mask.png"))
    Image.open(mask).resize((100, 80)).save(mask)
    assert main(_train_args(root, tmp_path / "r")) == 2
    err = capsys.readouterr().err
    assert mask.name in err and "100" in err


def test_empty_texture_folder(small_root, tmp_path, capsys):
    empty = tmp_path / "textures"
    empty.mkdir()
    args = _train_args(small_root, tmp_path / "r")
    args[args.index("--textures") + 1] = str(empty)
    assert main(args) == 2
    assert "no texture images found" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_existing_run_folder_is_kept(trained_run, small_root, capsys):
    before = (trained_run / "checkpoint" / "model.safetensors").read_bytes()
    assert main(_train_args(small_root, trained_run)) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (trained_run / "checkpoint" / "model.safetensors").read_bytes() == before


def test_unknown_config_field(small_root, tmp_path, capsys):
    assert main(_train_args(small_root, tmp_path / "r", "--set", "train.stepz=3")) == 2
    assert "train.stepz" in capsys.readouterr().err


def test_a_truncated_or_missing_checkpoint_is_one_line_naming_the_file(trained_run, tmp_path, capsys):
    run = tmp_path / "truncated"
    shutil.copytree(trained_run, run)
    weights = run / "checkpoint" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # a copy cut short
    image = json.loads((trained_run / "split.json").read_text())["test"][0]["path"]
    assert main(["predict", str(run), str(image)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mapl predict: error: ") and str(weights) in err and "Traceback" not in err
    # score checks the weights before it starts Ray or writes its output folder
    src = str(Path(image).parent)
    assert main(["score", str(run), src, "--out", str(tmp_path / "scores"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mapl score: error: ") and str(weights) in err
    assert not (tmp_path / "scores").exists()


def test_predict_refuses_a_heatmaps_path_that_is_a_file_before_scoring(trained_run, tmp_path, capsys):
    target = tmp_path / "notes.txt"
    target.write_text("keep me")
    image = json.loads((trained_run / "split.json").read_text())["test"][0]["path"]
    assert main(["predict", str(trained_run), str(image), "--heatmaps", str(target)]) == 2
    assert f"--heatmaps {target} is a file" in capsys.readouterr().err
    assert target.read_text() == "keep me"


def test_output_folders_under_a_file_are_one_line_each(trained_run, small_root, tmp_path, capsys):
    """An output path whose parent is a regular file: train's --out and predict's --heatmaps say which
    folder cannot be created and why, exit 2, and the file is kept (a NotADirectoryError traceback before)."""
    blocker = tmp_path / "afile"
    blocker.write_text("keep me")
    assert main(_train_args(small_root, blocker / "run")) == 2
    assert f"run folder {blocker / 'run'} cannot be created: Not a directory" in capsys.readouterr().err
    image = json.loads((trained_run / "split.json").read_text())["test"][0]["path"]
    assert main(["predict", str(trained_run), str(image), "--heatmaps", str(blocker / "h")]) == 2
    assert f"--heatmaps folder {blocker / 'h'} cannot be created: Not a directory" in capsys.readouterr().err
    assert blocker.read_text() == "keep me"


def test_resume_with_unloadable_weights_changes_nothing(trained_run, tmp_path, capsys):
    run = tmp_path / "broken"
    shutil.copytree(trained_run, run)
    (run / "metrics.json").unlink()  # as if stopped before its end, so resuming is allowed
    (run / "checkpoint" / "model.safetensors").unlink()
    before = {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}
    assert main(["train", "--resume", "--out", str(run), "--no-ray", "--steps", "50"]) == 2
    err = capsys.readouterr().err
    assert "model.safetensors not found" in err and "Traceback" not in err
    assert {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()} == before  # config.yaml kept


def test_a_flag_of_another_command_gets_that_commands_usage(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["train", "--data", "x", "--device", "cuda"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "mapl train: error: unrecognized arguments: --device cuda; mapl train runs on GPUs with --gpu" in err


def test_serve_on_another_interface_without_a_token_warns_and_a_blank_token_is_refused(
    trained_run, monkeypatch, caplog, capsys
):
    """Checked before Ray starts (init_ray is stopped at once here): a blank $MAPL_SERVE_TOKEN is a
    mistake, not "no token"; an open bind without a token is said."""
    import logging
    import os

    from mapl_ray.pipelines import ray_env

    def no_ray(*a, **k):
        raise KeyboardInterrupt  # stops cmd_serve where Ray would start, as Ctrl-C does

    monkeypatch.setattr(ray_env, "init_ray", no_ray)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    saved = dict(os.environ)  # mapl serve sets Ray Serve's variables for the local Ray it starts
    try:
        monkeypatch.setenv("MAPL_SERVE_TOKEN", "  ")
        assert main(["serve", str(trained_run), "--host", "0.0.0.0"]) == 2
        assert "$MAPL_SERVE_TOKEN is set but empty" in capsys.readouterr().err
        monkeypatch.delenv("MAPL_SERVE_TOKEN")
        with caplog.at_level(logging.WARNING, logger="mapl_ray.cli"):
            assert main(["serve", str(trained_run), "--host", "0.0.0.0"]) == 0
        assert "serving on 0.0.0.0 without a token" in caplog.text
        caplog.clear()
        monkeypatch.setenv("MAPL_SERVE_TOKEN", "s3cret")
        with caplog.at_level(logging.WARNING, logger="mapl_ray.cli"):
            assert main(["serve", str(trained_run), "--host", "0.0.0.0"]) == 0
        assert "without a token" not in caplog.text
    finally:
        os.environ.clear()
        os.environ.update(saved)
