"""Ray Data pipelines on tiny real data, one local Ray per module: ``mapl prepare`` (bad files skipped and
listed, duplicates reported), the simulation stage (identical across worker counts and batch sizes),
``mapl score`` (equal to ``mapl predict``, resumable) and streamed training batches (shards == folder)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import copy_small_category, needs_data

from mapl_ray.data.io import load_image, load_mask
from mapl_ray.data.shards import images_from_column, open_shard_set

pytestmark = needs_data
SIZE = 64


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    from mapl_ray.pipelines.ray_env import init_ray

    init_ray(num_cpus=2, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def category(tmp_path_factory) -> Path:
    """A small screw category with one unreadable test image and one duplicated training image."""
    root = copy_small_category(tmp_path_factory.mktemp("data"), n_train=10, n_good=2, n_per_defect=2)
    cat = root / "screw"
    (cat / "test" / "good" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    shutil.copy(cat / "train" / "good" / "000.png", cat / "train" / "good" / "000_again.png")
    return cat


@pytest.fixture(scope="module")
def shards(ray_local, category, tmp_path_factory) -> tuple[Path, dict]:
    from mapl_ray.pipelines.ray_data import prepare_shards

    out = tmp_path_factory.mktemp("shards") / "screw"
    manifest = prepare_shards(category, out, image_size=SIZE, rows_per_shard=5, progress=False)
    return out, manifest


def _all_rows(folder: Path) -> list[dict]:
    files, _ = open_shard_set(folder)
    return [r for f in files for r in pq.read_table(f).to_pylist()]


def test_prepare_decodes_every_readable_image_and_lists_the_rest(shards, category):
    out, manifest = shards
    files = sorted(p for p in category.rglob("*.png") if "ground_truth" not in p.parts)
    assert manifest["images"] == len(files) - 1 and manifest["rejected"] == 1 and manifest["duplicates"] == 1
    rejected = [json.loads(line) for line in (out / "_rejected.jsonl").read_text().splitlines()]
    assert [r["path"] for r in rejected] == [str(category / "test" / "good" / "broken.png")] and rejected[0]["reason"]
    dup = json.loads((out / "_duplicates.jsonl").read_text())
    assert {dup["path"], dup["same_as"]} == {str(category / "train" / "good" / n) for n in ("000.png", "000_again.png")}
    rows = {r["path"]: r for r in _all_rows(out)}
    assert set(rows) == {str(p) for p in files if p.name != "broken.png"}
    import pandas as pd  # the side files start with "_": pandas / pyarrow read the folder as Parquet

    assert sorted(pd.read_parquet(out, columns=["path"])["path"]) == sorted(rows)
    for path, row in rows.items():
        np.testing.assert_array_equal(images_from_column([row["image"]], (SIZE, SIZE))[0], load_image(path, SIZE))
        assert row["hash"] == hashlib.sha256(Path(path).read_bytes()).hexdigest()
        defect = Path(path).parent.name
        if row["split"] == "test" and defect != "good":
            mask_path = category / "ground_truth" / defect / f"{Path(path).stem}_mask.png"
            got = images_from_column([row["mask"]], (SIZE, SIZE), channels=0)[0]
            np.testing.assert_array_equal(got, load_mask(mask_path, SIZE))
            assert row["label"] == 1 and row["defect_type"] == defect
        else:
            assert row["mask"] is None and row["label"] == 0
            assert row["split"] == ("train" if "train" in Path(path).parts else "test")


def test_prepare_from_a_list_file_and_from_parquet(ray_local, category, tmp_path):
    from mapl_ray.pipelines.ray_data import prepare_shards

    good = sorted((category / "train" / "good").glob("*.png"))[:3]
    from PIL import Image

    tiny, sliver = tmp_path / "tiny.png", tmp_path / "sliver.png"  # what mapl score / serve refuse
    Image.new("RGB", (4, 4)).save(tiny)
    Image.new("RGB", (1000, 100)).save(sliver)
    lst = tmp_path / "list.txt"
    lst.write_text("\n".join([str(good[0]), "missing.png", str(good[1]), str(tiny), str(sliver)]) + "\n")
    m = prepare_shards(lst, tmp_path / "from_list", image_size=SIZE, progress=False)
    assert (m["kind"], m["images"], m["rejected"]) == ("list", 2, 3)
    rejected = {
        json.loads(x)["path"]: json.loads(x)["reason"] for x in (tmp_path / "from_list" / "_rejected.jsonl").open()
    }
    assert set(rejected) == {str(tmp_path / "missing.png"), str(tiny), str(sliver)}
    assert "min_side" in rejected[str(tiny)] and "max_aspect" in rejected[str(sliver)]
    # a Parquet of encoded images (Hugging Face layout: image struct with bytes and path)
    src = tmp_path / "src"
    src.mkdir()
    images = [{"bytes": p.read_bytes(), "path": str(p)} for p in good[:2]] + [
        {"bytes": None, "path": str(good[2])},  # a path and no bytes: the file is read
        {"bytes": b"junk", "path": "junk.png"},
        {"bytes": None, "path": None},  # neither: listed, the others go on
        {"bytes": good[0].read_bytes(), "path": "labelled_five.png"},
    ]
    pq.write_table(pa.table({"image": images, "label": [0, 0, 0, 1, 0, 5]}), src / "a.parquet")
    m = prepare_shards(src, tmp_path / "from_parquet", image_size=SIZE, progress=False)
    assert (m["kind"], m["images"], m["rejected"]) == ("parquet", 3, 3)
    reasons = (tmp_path / "from_parquet" / "_rejected.jsonl").read_text()
    assert "no encoded bytes and no file path" in reasons and "label 5" in reasons and "junk.png" in reasons
    rows = sorted(_all_rows(tmp_path / "from_parquet"), key=lambda r: r["path"])
    assert [r["path"] for r in rows] == [str(p) for p in good]
    np.testing.assert_array_equal(
        images_from_column([r["image"] for r in rows], (SIZE, SIZE)), np.stack([load_image(p, SIZE) for p in good])
    )
    with pytest.raises(Exception, match="already holds shards"):
        prepare_shards(src, tmp_path / "from_parquet", image_size=SIZE, progress=False)


def test_prepare_names_the_file_and_row_of_a_rejected_parquet_row(ray_local, category, tmp_path):
    """A source Parquet's bad row is listed with its file and row index (from 0, across row groups and files);
    one with no path and no image path is listed as that place alone; the good rows are all written."""
    from mapl_ray.pipelines.ray_data import prepare_shards

    good = sorted((category / "train" / "good").glob("*.png"))[:4]
    src = tmp_path / "src"
    src.mkdir()
    # a.parquet: good rows only; b.parquet: row groups of 2 rows, the bad rows in the second and third
    pq.write_table(pa.table({"image": [good[0].read_bytes()], "path": [str(good[0])], "label": [0]}), src / "a.parquet")
    images = [good[1].read_bytes(), good[2].read_bytes(), good[3].read_bytes(), b"junk", None, good[0].read_bytes()]
    names = [str(good[1]), "", None, None, "", "five.png"]
    table = pa.table({"image": images, "path": names, "label": [0, 0, 0, 0, 0, 5]})
    pq.write_table(table, src / "b.parquet", row_group_size=2)
    b = str((src / "b.parquet").resolve())
    m = prepare_shards(src, tmp_path / "out", image_size=SIZE, rows_per_shard=3, progress=False)
    assert (m["kind"], m["images"], m["rejected"]) == ("parquet", 4, 3)
    rejected = [json.loads(x) for x in (tmp_path / "out" / "_rejected.jsonl").open()]
    by_path = {r["path"]: r["reason"] for r in rejected}
    assert len(by_path) == 3 and f"row 4 of {b}" in by_path  # no bytes, no path: the place is its name
    assert "no encoded bytes and no file path" in by_path[f"row 4 of {b}"]
    junk = next(p for p in by_path if p.startswith("sha256:"))  # nameless junk: named by its hash, placed by row
    assert by_path[junk].endswith(f"(row 3 of {b})")
    assert "label 5" in by_path["five.png"] and by_path["five.png"].endswith(f"(row 5 of {b})")
    rows = _all_rows(tmp_path / "out")
    assert sorted(r["hash"] for r in rows) == sorted(hashlib.sha256(p.read_bytes()).hexdigest() for p in good)
    assert sorted(r["path"] for r in rows if not r["path"].startswith("sha256:")) == sorted(map(str, good[:2]))


def test_prepare_reads_each_parquet_files_own_columns(ray_local, category, tmp_path):
    """Source Parquet files need not share columns: a label only the second file holds is kept (Ray Data's
    reader took the first file's columns and dropped it), the first file's rows get none; a column of another
    kind in a later file, or a file without images, is refused naming the files."""
    from mapl_ray.data.layout import LayoutError
    from mapl_ray.pipelines.ray_data import prepare_shards

    good = sorted((category / "train" / "good").glob("*.png"))[:3]
    src = tmp_path / "src"
    src.mkdir()
    pq.write_table(pa.table({"image": [good[0].read_bytes()], "path": [str(good[0])]}), src / "a.parquet")
    labeled = pa.table({"image": [p.read_bytes() for p in good[1:]], "path": list(map(str, good[1:])), "label": [0, 1]})
    pq.write_table(labeled, src / "b.parquet")
    m = prepare_shards(src, tmp_path / "out", image_size=SIZE, progress=False)
    assert (m["images"], m["rejected"]) == (3, 0)
    labels = {r["path"]: r["label"] for r in _all_rows(tmp_path / "out")}
    assert labels == {str(good[0]): -1, str(good[1]): 0, str(good[2]): 1}
    pq.write_table(pa.table({"image": [good[0].read_bytes()], "label": ["bad"]}), src / "c.parquet")
    with pytest.raises(LayoutError, match=r"column 'label' is string in .*c\.parquet but int64 in .*b\.parquet"):
        prepare_shards(src, tmp_path / "out2", image_size=SIZE, progress=False)
    (src / "c.parquet").unlink()
    pq.write_table(pa.table({"path": [str(good[0])]}), src / "d.parquet")
    with pytest.raises(LayoutError, match=r"d\.parquet has no 'image' column"):
        prepare_shards(src, tmp_path / "out3", image_size=SIZE, progress=False)


def test_cli_prepare_reports_counts(ray_local, category, tmp_path, capsys):
    from mapl_ray.cli import main

    assert main(["prepare", str(category / "test"), "--out", str(tmp_path / "s"), "--image-size", "32", "--quiet"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (out["kind"], out["rejected"], out["image_size"]) == ("folder", 1, [32, 32])
    assert main(["prepare", str(tmp_path / "nothing"), "--out", str(tmp_path / "t")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "afile").write_text("x")
    assert main(["prepare", str(category / "test"), "--out", str(tmp_path / "afile" / "s")]) == 2
    assert f"--out {tmp_path / 'afile' / 's'} cannot be created" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["prepare", str(tmp_path / "empty"), "--out", str(tmp_path / "e")]) == 2
    assert "contains no image files" in capsys.readouterr().err and not (tmp_path / "e").exists()
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: {align: portrait}\n")
    assert main(["prepare", str(category / "test"), "--out", str(tmp_path / "u"), "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "data.align = 'portrait' is not allowed" in err and str(bad) in err and not (tmp_path / "u").exists()


def test_prepare_lists_a_folders_files_without_an_image_extension_as_rejected(ray_local, category, tmp_path, capsys):
    """A folder's files without an image extension are not decoded: each is a _rejected.jsonl line with its
    extension and the ones expected, counted in the manifest and the summary line; the images are all
    written, and hidden files and folders stay out of both."""
    from mapl_ray.cli import main
    from mapl_ray.data.layout import IMAGE_EXTENSIONS

    src = tmp_path / "pool"
    shutil.copytree(category / "test" / "good", src / "good")
    images = sorted(str(p) for p in src.rglob("*.png") if p.name != "broken.png")
    (src / "notes.txt").write_text("not an image")
    (src / "good" / "labels.CSV").write_text("a,b\n")
    (src / "README").write_text("no extension")
    (src / ".DS_Store").write_bytes(b"\0\0")
    (src / ".cache").mkdir()
    (src / ".cache" / "x.txt").write_text("hidden folder")
    out = tmp_path / "shards"
    assert main(["prepare", str(src), "--out", str(out), "--image-size", str(SIZE), "--quiet"]) == 0
    captured = capsys.readouterr()
    manifest = json.loads(captured.out.strip().splitlines()[-1])
    assert (manifest["kind"], manifest["images"]) == ("folder", len(images))
    assert (manifest["rejected"], manifest["no_image_extension"]) == (4, 3)  # + broken.png, unreadable
    assert "4 rejected (3 without an image extension" in captured.err
    rejected = {json.loads(x)["path"]: json.loads(x)["reason"] for x in (out / "_rejected.jsonl").open()}
    expected = "expected one of " + " ".join(sorted(IMAGE_EXTENSIONS))
    assert rejected[str(src / "notes.txt")] == f"not an image extension (.txt); {expected}"
    assert rejected[str(src / "good" / "labels.CSV")] == f"not an image extension (.CSV); {expected}"
    assert rejected[str(src / "README")] == f"no file extension; {expected}"
    assert set(rejected) == {str(src / n) for n in ("notes.txt", "good/labels.CSV", "README", "good/broken.png")}
    assert sorted(r["path"] for r in _all_rows(out)) == images


def test_prepare_takes_a_path_listed_twice_once(ray_local, category, tmp_path, capsys):
    """A list file naming one image on two lines gives one shard row (two rows of one path made the path
    ambiguous for mapl score) and a _rejected.jsonl line naming both line numbers."""
    from mapl_ray.cli import main

    good = sorted((category / "train" / "good").glob("00[1-3].png"))
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(str(p) for p in [good[0], good[1], good[0], good[2]]) + "\n")
    out = tmp_path / "shards"
    assert main(["prepare", str(listing), "--out", str(out), "--image-size", str(SIZE), "--quiet"]) == 0
    captured = capsys.readouterr()
    manifest = json.loads(captured.out.strip().splitlines()[-1])
    assert (manifest["images"], manifest["rejected"], manifest["listed_again"]) == (3, 1, 1)
    assert "1 rejected (1 listed again" in captured.err
    assert sorted(r["path"] for r in _all_rows(out)) == sorted(str(p.resolve()) for p in good)
    (line,) = [json.loads(x) for x in (out / "_rejected.jsonl").open()]
    assert line["path"] == str(good[0].resolve()) and f"line 3 of {listing}; first on line 1" in line["reason"]


def test_prepare_warns_of_defect_images_without_a_mask(ray_local, category, tmp_path, caplog):
    from mapl_ray.pipelines.ray_data import _source_dataset

    copy = tmp_path / "screw"
    shutil.copytree(category, copy)
    mask = sorted((copy / "ground_truth").rglob("*_mask.png"))[0]
    mask.unlink()
    with caplog.at_level("WARNING", logger="mapl_ray.data"):
        _, total, _ = _source_dataset(str(copy), "category")
    assert total == len([p for p in copy.rglob("*.png") if "ground_truth" not in p.parts])  # the image is kept
    assert "1 defect images have no mask" in caplog.text and mask.name.replace("_mask", "") in caplog.text


def test_prepare_pose_normalises_as_mapl_train_would(category, tmp_path):
    """A screw category (folder name or the config's data.category) gets screw's preset, as mapl train applies
    it, so `mapl train --stream --shards` reads the shards without a data.align mismatch."""
    from mapl_ray.cli import build_parser, prepare_config
    from mapl_ray.config import ConfigError
    from mapl_ray.data.pose import build_pose_estimator
    from mapl_ray.data.shards import ShardSpec

    def config(*extra):
        return prepare_config(build_parser().parse_args(["prepare", str(category), "--out", "x", *extra]))

    cfg = config("--image-size", "32")
    assert (cfg.data.align, cfg.data.category) == ("principal_axis", "screw")
    assert config("--no-category-preset").data.align == "none"
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("data: {category: screw, image_size: 64, align: none}\n")  # the file's choice wins
    assert config("--config", str(yaml_file)).data.align == "none"
    with pytest.raises(ConfigError, match="--image-size 32 differs from data.image_size 64"):
        config("--config", str(yaml_file), "--image-size", "32")
    spec = ShardSpec.of(32, build_pose_estimator(cfg))
    assert spec.align_text().startswith("principal_axis")  # what the manifest says


def test_simulation_stage_is_identical_across_workers_and_batch_sizes(ray_local, category):
    from conftest import tiny_config

    from mapl_ray.data.simulation import build_simulator
    from mapl_ray.data.streams import simulate_samples
    from mapl_ray.pipelines.ray_data import simulate

    cfg = tiny_config(category.parent)
    paths = sorted((category / "train" / "good").glob("*.png"))[:7]
    images = np.stack([load_image(p, SIZE) for p in paths])
    keys = np.arange(100, 100 + len(paths))
    items = [{"image": img, "sample_key": int(k)} for img, k in zip(images, keys)]

    def run(concurrency, batch_size):
        ds = ray_local.data.from_items(items, override_num_blocks=3)
        out = simulate(ds, cfg, seed=5, concurrency=concurrency, batch_size=batch_size).take_all()
        out.sort(key=lambda r: r["sample_key"])
        return np.stack([r["image"] for r in out]), np.stack([r["mask"] for r in out])

    one, two = run(1, 3), run(2, 5)
    loop = simulate_samples(build_simulator(cfg), images, keys, seed=5)
    for a, b in ((one, two), (one, loop)):
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
    assert all(m.any() for m in one[1])  # every sample got an anomaly
    changed = (one[0] != images).any(axis=-1)
    assert not (changed & (one[1] == 0)).any()  # pixels outside the mask stay as they were
    other_seed = simulate_samples(build_simulator(cfg), images, keys, seed=6)[0]
    assert (other_seed != one[0]).any()


def test_ray_data_stages_use_no_deprecated_argument(ray_local, category, trained_run, tmp_path, capfd):
    """`mapl score`, `mapl prepare --concurrency` and the simulation stage print no Ray Data deprecation warning
    (Ray 2.51 deprecated map_batches(concurrency=N) for compute=ActorPoolStrategy / TaskPoolStrategy). Read
    on the file descriptor: Ray Data re-configures its loggers when a dataset runs."""
    from conftest import tiny_config

    from mapl_ray.cli import main
    from mapl_ray.pipelines.ray_data import prepare_shards, simulate

    two = tmp_path / "two"
    two.mkdir()
    for f in sorted((category / "test" / "thread_top").glob("*.png"))[:2]:
        shutil.copy(f, two / f.name)
    capfd.readouterr()
    assert main(["score", str(trained_run), str(two), "--out", str(tmp_path / "scores"), "--quiet"]) == 0
    prepare_shards(two, tmp_path / "shards", image_size=32, concurrency=1, progress=False)
    ds = ray_local.data.from_items([{"image": np.zeros((SIZE, SIZE, 3), np.uint8), "sample_key": 0}])
    simulate(ds, tiny_config(category.parent), seed=0, concurrency=1)  # lazy: the stage is only built
    err = capfd.readouterr().err
    assert sum(len(pq.read_table(f)) for f in (tmp_path / "scores").glob("*.parquet")) == 2
    assert "deprecated" not in err, err


def _scores(folder: Path) -> dict[str, dict]:
    return {r["path"]: r for f in sorted(folder.glob("*.parquet")) for r in pq.read_table(f).to_pylist()}


def test_score_equals_predict_and_a_rerun_skips_written_files(ray_local, shards, trained_run, tmp_path):
    from PIL import Image

    from mapl_ray.inference import Predictor
    from mapl_ray.pipelines.ray_data import score_source

    folder, manifest = shards
    out = tmp_path / "scores"
    first = score_source(trained_run, folder, out, batch_size=4, maps=True, progress=False)
    assert (first["images"], first["files_written"], first["files_skipped"]) == (
        manifest["images"],
        manifest["shards"],
        0,
    )
    stages = first["stages_s"]  # where the time went, the actors' part from their timing files
    assert stages["actors"] >= 1 and stages["actor_ready_at_s"][0] <= stages["first_batch_in_at_s"][1]
    sizes = {int(k): v for k, v in stages["batch_sizes"].items()}  # whole batches but the last
    assert sum(k * v for k, v in sizes.items()) == manifest["images"] and len(sizes) <= 2
    assert sizes.get(4, 0) == manifest["images"] // 4 and not (out / ".actor_timings").exists()
    got = _scores(out)
    pred = Predictor(trained_run, device="cpu")
    paths = sorted(got)
    records, _, maps = pred.predict_paths(paths)
    assert pred.threshold is not None
    for rec, amap in zip(records, maps):
        row = got[rec["path"]]
        assert row["score"] == pytest.approx(rec["score"], abs=1e-5)
        assert row["normalised_score"] == pytest.approx(rec["normalised_score"], abs=1e-4)
        assert (row["label"], row["threshold"]) == (rec["label"], pytest.approx(pred.threshold))
        png = np.asarray(Image.open(row["map"]), dtype=np.float64) / 255.0
        assert np.abs(png - amap).max() <= 0.5 / 255 + 1e-5
    assert {row["known_label"] for row in got.values()} == {0, 1}
    import pandas as pd

    # the claim, summary and maps beside the scores are skipped by Parquet readers: the folder reads as a table
    assert (out / "_maps").is_dir() and (out / "_summary.json").is_file() and (out / "_score.json").is_file()
    assert sorted(pd.read_parquet(out)["path"]) == paths
    # a stopped job: one output file missing -> the rerun scores that shard only, to the same values
    written = sorted(out.glob("*.parquet"))
    stamps = {f: f.stat().st_mtime_ns for f in written}
    written[1].unlink()
    again = score_source(trained_run, folder, out, batch_size=3, progress=False)
    assert (again["files_written"], again["files_skipped"]) == (1, len(written) - 1)
    assert all(f.stat().st_mtime_ns == stamps[f] for f in written if f != written[1])
    regot = _scores(out)
    assert regot.keys() == got.keys()
    for p in paths:
        assert regot[p]["score"] == pytest.approx(got[p]["score"], abs=1e-5)


@pytest.mark.slow  # ~1.5 min on 2 busy cores
def test_cli_score_on_a_folder_scores_like_shards_and_names_unreadable_files(
    ray_local, shards, category, trained_run, tmp_path, capsys
):
    from mapl_ray.cli import main

    out = tmp_path / "folder_scores"
    args = [
        "score",
        str(trained_run),
        str(category),
        "--out",
        str(out),
        "--batch-size",
        "3",
        "--rows-per-file",
        "7",
        "--quiet",
    ]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["unreadable"] == 1 and summary["files_written"] == 3
    from_folder = _scores(out)
    broken = from_folder.pop(str(category / "test" / "good" / "broken.png"))
    assert broken["score"] is None and broken["error"]
    from_shards = _scores_of_shards(trained_run, shards[0], tmp_path)
    assert from_folder.keys() == from_shards.keys()
    for p, row in from_folder.items():
        assert row["score"] == pytest.approx(from_shards[p]["score"], abs=1e-5)
    assert main(args) == 0  # nothing left to do
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["files_skipped"] == 3
    other = ["score", str(trained_run), str(category / "test"), "--out", str(out), "--quiet"]
    assert main(other) == 2 and "holds scores of run" in capsys.readouterr().err


def _scores_of_shards(run, folder, tmp_path) -> dict[str, dict]:
    from mapl_ray.pipelines.ray_data import score_source

    score_source(run, folder, tmp_path / "shard_scores", batch_size=8, progress=False)
    return _scores(tmp_path / "shard_scores")


def _stream_config(category: Path, **kw):
    from conftest import tiny_config

    from mapl_ray.main_job import absolute_paths

    base = {
        "data.unlabeled_fraction": 0.3,
        "data.labeled_anomalies": 1,
        "eval.validation_normals": 2,
        "train.steps": 4,
        "pseudo.warmup_steps": 1,
        "pseudo.refit_every": 2,
        "pseudo.pool_size": 2,
    }
    return absolute_paths(tiny_config(category.parent, **{**base, **kw}))


def test_training_batches_from_shards_equal_those_from_the_folder(ray_local, shards, category, tmp_path):
    from mapl_ray.data.streams import assemble_steps
    from mapl_ray.main_job import check_inputs
    from mapl_ray.pipelines.ray_data import load_streamed_train_data, train_stream

    cfg = _stream_config(category)
    split = check_inputs(cfg)
    data, _, info, sources = load_streamed_train_data(cfg, split)
    assert len(data.unlabeled) == len(split.unlabeled) > 0 and info["unlabeled_streamed"]
    ray_local.data.DataContext.get_current().execution_options.preserve_order = True

    def batches(**kw):
        stream = train_stream(cfg, sources, tmp_path, **kw)
        ds = stream.datasets(1)["batches_rank0"]
        return list(assemble_steps(stream.plan(0, 1), ds.iter_batches(batch_size=None, batch_format="numpy"))), stream

    from_folder, stream = batches(concurrency=1)
    from_shards, _ = batches(shards=[shards[0]], concurrency=2)
    assert len(from_folder) == len(from_shards) == 4
    assert stream.refit_steps == {1, 3}
    for a, b in zip(from_folder, from_shards):
        assert a.keys() == b.keys()
        for k in ("images", "masks", "kind", "label"):
            np.testing.assert_array_equal(a[k], b[k])
        if "pool" in a:
            for k in ("normal_idx", "sims", "unlabeled"):
                np.testing.assert_array_equal(a["pool"][k], b["pool"][k])
    first = from_folder[0]
    assert list(np.bincount(first["kind"])) == [4, 4, 4, 2]
    assert first["masks"][first["kind"] == 1].reshape(4, -1).any(axis=1).all()  # every simulated image has a defect
    assert not first["masks"][first["kind"] == 0].any()
    # a normal of the batch is a flipped / rotated decoded training normal (train.augment=rot90)
    plan = stream.plan(0, 1)
    normal = data.normals[plan.rows(np.array([0]))["index"][:1][0]]
    views = [np.rot90(normal, k, axes=(0, 1)) for k in range(4)]
    assert any((first["images"][0] == v).all() or (first["images"][0] == v[:, ::-1]).all() for v in views)
    pool = from_folder[1]["pool"]
    assert len(pool["sims"]) == 4 and len(pool["unlabeled"]) == len(split.unlabeled)


@pytest.mark.slow  # ~1.5 min on 2 busy cores
def test_ray_train_takes_its_batches_from_the_shards(ray_local, shards, category, tmp_path):
    from mapl_ray.main_job import prepare_run
    from mapl_ray.pipelines.ray_data import train_streamed

    cfg = _stream_config(category, **{"train.steps": 3})
    run = tmp_path / "run"
    split = prepare_run(cfg, run)
    summary, validation, info = train_streamed(cfg, split, run, shards=[shards[0]], progress=False)
    assert summary["steps_run"] == 3 and summary["loader_workers"] == 0 and summary["per_worker_batch"] == 14
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in log)
    # the pseudo-labeler was refitted at step 1 on the streamed pool (unlabeled images from the shards)
    assert sum(summary["pseudo"][k] for k in ("pseudo_pos", "pseudo_neg", "pseudo_unknown")) == len(split.unlabeled)
    assert len(validation.normals) == 2 and info["unlabeled"] == len(split.unlabeled)
    assert (run / "checkpoint" / "model.safetensors").is_file()


def test_stream_needs_ray_and_shards_need_stream(category, tmp_path):
    from mapl_ray.config import ConfigError
    from mapl_ray.main_job import run_train_job

    cfg = _stream_config(category, **{"data.stream": True})
    with pytest.raises(ConfigError, match="drop --no-ray"):
        run_train_job(cfg, tmp_path / "run", use_ray=False)
    assert not (tmp_path / "run").exists()  # refused before the run folder was made
    with pytest.raises(ConfigError, match="data.shards"):
        _stream_config(category, **{"data.shards": str(tmp_path)}).validate()


@pytest.mark.slow  # ~2 min on 2 busy cores
def test_main_job_streams_from_shards(ray_local, shards, category, tmp_path):
    from mapl_ray.main_job import run_train_job

    cfg = _stream_config(category, **{"train.steps": 3, "data.stream": True, "data.shards": str(shards[0])})
    broken = category / "test" / "good" / "broken.png"  # rejected by prepare; evaluation would stop on it
    broken.rename(tmp_path / "broken.png")
    try:
        metrics = run_train_job(cfg, tmp_path / "run", progress=False)
    finally:
        (tmp_path / "broken.png").rename(broken)
    info = json.loads((tmp_path / "run" / "data_info.json").read_text())
    assert info["unlabeled_streamed"] and info["unlabeled"] > 0
    assert 0 <= metrics["overall"]["image_auroc"] <= 1 and metrics["validation"]["image_auroc"] is not None


def test_score_rows_reach_their_files_in_source_order_when_ray_delivers_them_shuffled(tmp_path):
    """With many actors Ray Data delivered score rows out of order (H200, 16 actors); each output file
    must still hold exactly its source's rows, in the source's order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mapl_ray.pipelines.ray_data import _Unit, _write_units

    units = [_Unit(f"u{k}.parquet", 3, records=[{"path": f"img{k}_{i}.png"} for i in range(3)]) for k in range(2)]
    order = ["img1_2.png", "img0_1.png", "img1_0.png", "img0_0.png", "img1_1.png", "img0_2.png"]

    class Shuffled:
        def iter_batches(self, **_):
            for i in range(0, len(order), 2):
                paths = order[i : i + 2]
                yield pa.table({"path": paths, "score": [float(p[3] + p[5]) for p in paths], "error": [None, None]})

    counts = _write_units(Shuffled(), units, tmp_path, progress=False)
    assert counts["images"] == 6 and counts["unreadable"] == 0
    assert counts["steady_images_per_s"] is None  # 2 batches after the first: too few to time a rate
    for k, unit in enumerate(units):
        table = pq.read_table(tmp_path / unit.name)
        assert table.column("path").to_pylist() == [f"img{k}_{i}.png" for i in range(3)]
        assert table.column("score").to_pylist() == [float(f"{k}{i}") for i in range(3)]


def test_actor_rate_comes_from_the_actors_own_timings(tmp_path):
    """The actors' rate: rows after each actor's first batch over the time from the first batch out (any
    actor) to the last; the driver's view of it came in bursts (two batches 0.05 s apart)."""
    from mapl_ray.pipelines.ray_data import _actor_stages

    t0 = 1000.0
    common = {"start": t0, "torch_imported": t0 + 1, "model_loaded": t0 + 2, "warmed_up": t0 + 3, "busy_s": 2.0}
    actors = [
        {**common, "first_in": t0 + 9, "first_out": t0 + 10, "last_out": t0 + 12, "rows": 12, "first_rows": 4},
        {**common, "first_in": t0 + 10, "first_out": t0 + 11, "last_out": t0 + 14, "rows": 8, "first_rows": 4},
    ]
    for i, a in enumerate(actors):
        a.update(batches=a["rows"] // 4, sizes={"4": a["rows"] // 4})
        (tmp_path / f"actor-{i}.json").write_text(json.dumps(a))
    stages = _actor_stages(tmp_path, t0, t0 + 15)
    assert stages["actor_images_per_s"] == pytest.approx((8 + 4) / 4.0)
    assert stages["first_batch_out_at_s"] == [10.0, 11.0] and not tmp_path.exists()


def test_score_refuses_to_continue_an_out_of_an_earlier_model_of_the_same_run(tmp_path):
    """A resumed or retrained run has a new model version: continuing its old --out would keep the old model's
    scores and threshold in the files already written, so it is refused; the same version continues, and a
    folder claimed before versions were recorded continues and records the version."""
    from PIL import Image

    from mapl_ray.data.layout import LayoutError
    from mapl_ray.data.shards import ShardSpec
    from mapl_ray.pipelines.ray_data import SCORE_RUN_FILE, _check_output, _claim_output, _score_units

    src = tmp_path / "images"
    src.mkdir()
    Image.new("L", (16, 16), 1).save(src / "0.png")
    run, out = tmp_path / "run", tmp_path / "scores"
    names = [u.name for u in _score_units(str(src), ShardSpec.of(SIZE, None), 3)[0]]
    _claim_output(out, _check_output(out, run, str(src), names, "sha256:aaaa"))
    assert json.loads((out / SCORE_RUN_FILE).read_text())["model_version"] == "sha256:aaaa"
    _claim_output(out, _check_output(out, run, str(src), names, "sha256:aaaa"))
    with pytest.raises(LayoutError, match=r"earlier model of run .*sha256:aaaa.*sha256:bbbb now.*nothing was written"):
        _check_output(out, run, str(src), names, "sha256:bbbb")
    legacy = {"run": str(run.resolve()), "source": os.path.abspath(src)}
    (out / SCORE_RUN_FILE).write_text(json.dumps(legacy))
    _claim_output(out, _check_output(out, run, str(src), names, "sha256:bbbb"))
    assert json.loads((out / SCORE_RUN_FILE).read_text()) == {**legacy, "model_version": "sha256:bbbb"}


def test_score_refuses_an_out_that_a_rerun_would_fill_with_duplicates(tmp_path):
    """A rerun with another --rows-per-file (or after the folder changed) splits the images into other files:
    scoring them again beside the old files would list every image twice, so it is refused; a plain rerun
    (the same split) and a new folder are not. An --out that is a file, or inside the run or the source, is
    refused with a message."""
    from PIL import Image

    from mapl_ray.data.layout import LayoutError
    from mapl_ray.data.shards import ShardSpec
    from mapl_ray.pipelines.ray_data import _check_output, _claim_output, _score_units

    src = tmp_path / "images"
    src.mkdir()
    for i in range(5):
        Image.new("L", (16, 16), i).save(src / f"{i}.png")
    run, out, spec = tmp_path / "run", tmp_path / "scores", ShardSpec.of(SIZE, None)
    units, _ = _score_units(str(src), spec, 3)
    _claim_output(out, _check_output(out, run, str(src), [u.name for u in units]))
    for u in units:  # as a finished job leaves them
        pq.write_table(pa.table({"path": u.paths()}), out / u.name)
    _claim_output(out, _check_output(out, run, str(src), [u.name for u in units]))  # the same rerun continues
    other, _ = _score_units(str(src), spec, 2)
    with pytest.raises(LayoutError, match="rows-per-file"):
        _check_output(out, run, str(src), [u.name for u in other])
    Image.new("L", (16, 16), 9).save(src / "9.png")  # the folder changed
    grown, _ = _score_units(str(src), spec, 3)
    with pytest.raises(LayoutError, match="would not write"):
        _check_output(out, run, str(src), [u.name for u in grown])
    _check_output(tmp_path / "new", run, str(src), [u.name for u in grown])
    with pytest.raises(LayoutError, match="is a file"):
        _check_output(src / "0.png", run, str(src), [u.name for u in grown])
    old = tmp_path / "old_scores"  # a folder written before the claim file was renamed _score.json
    old.mkdir()
    (old / "score.json").write_text(json.dumps({"run": "/elsewhere", "source": str(src)}))
    with pytest.raises(LayoutError, match="holds scores of run /elsewhere"):
        _check_output(old, run, str(src), [u.name for u in grown])
    run.mkdir()  # score files in the run folder, or among the source's images or shards
    for inside, what in ((run, "the run folder"), (run / "scores", "the run folder"), (src / "out", "the source")):
        with pytest.raises(LayoutError, match=f"is inside {what}"):
            _check_output(inside, run, str(src), [u.name for u in grown])
    # another run's folder, or any folder of other files, is not a score folder (score files went in among them)
    other_run = tmp_path / "other_run"
    (other_run / "checkpoint").mkdir(parents=True)
    (other_run / "config.yaml").write_text("data: {}\n")
    with pytest.raises(LayoutError, match="is a run folder .*holds no mapl score output"):
        _check_output(other_run, run, str(src), [u.name for u in grown])
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("x")
    with pytest.raises(LayoutError, match=r"is not empty \(todo.txt, ...\)"):
        _check_output(tmp_path / "notes", run, str(src), [u.name for u in grown])
    (tmp_path / "hidden_only").mkdir()
    (tmp_path / "hidden_only" / ".DS_Store").write_bytes(b"")
    _check_output(tmp_path / "hidden_only", run, str(src), [u.name for u in grown])


def test_score_of_a_list_with_no_readable_image_says_so(ray_local, trained_run, tmp_path, capsys):
    from mapl_ray.cli import main

    listing = tmp_path / "notes.txt"
    listing.write_text("these are\nnot image paths\n")
    out = tmp_path / "scores"
    assert main(["score", str(trained_run), str(listing), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "none of the 2 files" in err and "nothing was scored" in err
    rows = pq.read_table(next(out.glob("*.parquet"))).to_pylist()
    assert [r["score"] for r in rows] == [None, None] and all(r["error"] for r in rows)
    assert main(["prepare", str(listing), "--out", str(tmp_path / "shards"), "--quiet"]) == 2
    assert "none of the 2 files" in capsys.readouterr().err


def test_score_on_a_gpu_device_where_the_cluster_has_none_is_one_line(
    ray_local, trained_run, category, tmp_path, capsys
):
    import ray

    from mapl_ray.cli import main

    if ray.cluster_resources().get("GPU"):
        pytest.skip("this Ray cluster has a GPU")
    src, out = str(category / "test"), tmp_path / "scores"
    assert main(["score", str(trained_run), src, "--out", str(out), "--device", "cuda", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mapl score: error: --device cuda: the Ray cluster has no GPU") and "Traceback" not in err
    assert not out.exists()
    assert main(["score", str(trained_run), src, "--out", str(out), "--device", "tpu9", "--quiet"]) == 2
    assert "--device 'tpu9' is not a device name" in capsys.readouterr().err


def test_score_refuses_what_predict_refuses_from_a_folder_and_from_shards(trained_run, tmp_path):
    """An image `mapl predict` and `mapl serve` refuse (too small, too elongated) gets no score from `mapl
    score` either: the folder path decodes under the same limits, the shard path checks the original size."""
    from PIL import Image

    from mapl_ray.cli import main
    from mapl_ray.data.shards import ShardSpec
    from mapl_ray.inference import Predictor
    from mapl_ray.pipelines.ray_data import _decode_in_order
    from mapl_ray.scoring import score_table

    pred = Predictor(trained_run, device="cpu")
    rng = np.random.default_rng(0)
    files = {"ok.png": (48, 40), "tiny.png": (2, 2), "long.png": (200, 20)}  # (W, H)
    for name, (w, h) in files.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(tmp_path / name)
    paths = [str(tmp_path / n) for n in files]
    for p in paths[1:]:  # what predict says
        assert main(["predict", str(trained_run), p]) == 2
    spec = ShardSpec.of(pred.image_size, None)
    decoded = _decode_in_order(pa.Table.from_pylist([{"path": p, "label": None} for p in paths]), spec, None)
    errors = decoded.column("error").to_pylist()
    assert errors[0] is None and "min_side" in errors[1] and "max_aspect" in errors[2]
    # shard rows hold every image decoded; their original sizes decide
    image = np.zeros((pred.image_size, pred.image_size, 3), np.uint8).tobytes()
    rows = pa.Table.from_pylist(
        [
            {"path": p, "image": image, "pose": None, "orig_width": w, "orig_height": h}
            for p, (w, h) in zip(paths, files.values())
        ]
    )
    scored = score_table(pred, rows).to_pylist()
    assert scored[0]["score"] is not None and scored[0]["error"] is None
    assert [r["score"] for r in scored[1:]] == [None, None]
    assert "min_side" in scored[1]["error"] and "max_aspect" in scored[2]["error"]
