"""The accuracy benchmark's parts on the CPU: BHAD-style corruption, grid files, the report, `mapl benchmark` errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import copy_small_category, needs_data
from PIL import Image

from mapl_ray.cli import main
from mapl_ray.data.corruption import Corruption, corrupt_category, corrupt_image, image_rng
from mapl_ray.eval.accuracy_report import summarise, write_results
from mapl_ray.eval.grid_spec import GridError, expand, load_grid

REPO = Path(__file__).resolve().parents[1]


def _image(seed: int = 0, grey: bool = False) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = rng.integers(40, 215, size=(48, 40, 1 if grey else 3), dtype=np.uint8)
    return np.repeat(img, 3, axis=2) if grey else img


# -- corruption ------------------------------------------------------------------------------------


def test_corruption_is_seeded_per_file_name():
    c, img = Corruption(noise_std=10, seed=3), _image()
    a = corrupt_image(img, c, image_rng(3, "test/crack/000.png"))
    b = corrupt_image(img, c, image_rng(3, "test/crack/000.png"))
    other_name = corrupt_image(img, c, image_rng(3, "test/crack/001.png"))
    other_seed = corrupt_image(img, c, image_rng(4, "test/crack/000.png"))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, other_name) and not np.array_equal(a, other_seed)
    assert not np.array_equal(a, img) and a.dtype == np.uint8 and a.shape == img.shape


def test_contrast_scales_about_the_mean_within_the_documented_range():
    img = _image(1).astype(np.uint8)
    out = corrupt_image(img, Corruption(noise_std=0, contrast_min=0.5, contrast_max=0.6), image_rng(0, "x"))
    ratio = out.astype(float).std() / img.astype(float).std()
    assert 0.5 - 0.01 <= ratio <= 0.6 + 0.01
    assert abs(out.astype(float).mean() - img.astype(float).mean()) < 0.6  # rounding only


def test_noise_has_the_documented_spread_and_grey_stays_grey():
    flat = np.full((128, 128, 3), 128, np.uint8)
    out = corrupt_image(flat, Corruption(noise_std=12, contrast_min=1, contrast_max=1), image_rng(0, "g.png"))
    assert 11 < out.astype(float).std() < 13
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()  # one draw per pixel
    colour = corrupt_image(_image(2), Corruption(noise_std=12), image_rng(0, "c.png"))
    assert not (colour[..., 0] == colour[..., 1]).all()


def test_corruption_rejects_bad_parameters_and_images():
    with pytest.raises(ValueError, match="contrast_min"):
        Corruption(contrast_min=0.9, contrast_max=0.5)
    with pytest.raises(ValueError, match="noise_std"):
        Corruption(noise_std=-1)
    with pytest.raises(ValueError, match="uint8"):
        corrupt_image(np.zeros((4, 4, 3), np.float32), Corruption(), image_rng(0, "x"))


@needs_data
def test_corrupt_category_changes_images_resizes_masks_and_reuses_a_copy(tmp_path):
    from mapl_ray.data.io import load_image, load_mask

    src = copy_small_category(tmp_path / "src", n_train=2, n_good=1, n_per_defect=1) / "screw"
    dst = tmp_path / "bhad" / "screw"
    c = Corruption(seed=5)
    n = corrupt_category(src, dst, c, size=64)
    assert n == 2 + 1 + 2  # train, test/good, one per defect type
    for f in (src / "train" / "good").glob("*.png"):
        bad = np.array(Image.open(dst / "train" / "good" / f.name))
        rel = f.relative_to(src).as_posix()
        assert np.array_equal(bad, corrupt_image(load_image(f, 64), c, image_rng(5, rel)))  # at the read size
    for m in (src / "ground_truth").rglob("*.png"):
        assert np.array_equal(np.array(Image.open(dst / m.relative_to(src))) // 255, load_mask(m, 64))
    assert corrupt_category(src, dst, c, size=64) == 0  # same parameters: the copy is kept
    assert corrupt_category(src, dst, Corruption(seed=6), size=64) == n  # other parameters: made again
    assert corrupt_category(src, tmp_path / "full", c, size=None) == n
    m = next((src / "ground_truth").rglob("*.png"))
    assert (tmp_path / "full" / m.relative_to(src)).read_bytes() == m.read_bytes()  # own size: masks copied


# -- grid files ------------------------------------------------------------------------------------


def test_gpu_grid_parses_and_expands_to_the_expected_trials():
    spec = load_grid(REPO / "bench" / "grids" / "accuracy_gpu.yaml")
    assert spec.seeds == [101, 102, 103] and len(spec.categories) == 5
    trials = expand(spec, "/data", "/tex", "/w.safetensors", bhad_root="/bhad")
    count = {}
    for t in trials:
        key = (t.meta["row"], t.meta["condition"])
        count[key] = count.get(key, 0) + 1
    assert count == {
        ("mapl", "clean"): 15,
        ("mapl", "bhad"): 3,
        ("memseg", "clean"): 15,
        ("memseg", "bhad"): 3,
        ("patchcore", "clean"): 15,
        ("patchcore", "bhad"): 3,
        ("mapl_decoder_map", "clean"): 15,
        ("mapl_5_labeled", "clean"): 9,
        ("mapl_coordinate_attention", "clean"): 3,
        ("mapl_scratch_encoder", "clean"): 3,
    }
    assert len({t.name for t in trials}) == len(trials)
    by = {t.name: t.config for t in trials}
    screw = by["mvtec_ad-screw-memseg-bhad-102"]
    assert screw["data"]["root"] == "/bhad/mvtec_ad" and screw["data"]["seed"] == screw["train"]["seed"] == 102
    assert screw["pseudo"]["enabled"] is False and screw["data"]["align"] == "principal_axis"  # screw preset
    assert by["magnetic_tile-magnetic_tile-mapl_decoder_map-clean-103"]["eval"]["knn_weight"] == 0.0
    assert by["elpv-solar_cell-mapl-clean-101"]["data"]["require_masks"] is False
    scratch = by["mvtec_ad-screw-mapl_scratch_encoder-clean-101"]["model"]
    assert scratch["encoder"] == "mapl" and scratch["weights"] is None and not scratch["freeze_encoder"]
    assert {t.meta["detector"] for t in trials if t.meta["row"] == "patchcore"} == {"patchcore"}


def test_cpu_grid_parses_and_a_category_subset_expands():
    spec = load_grid(REPO / "bench" / "grids" / "accuracy_cpu.yaml")
    trials = expand(spec, "/d", None, bhad_root="/b", categories=["mpdd/metal_plate"], steps=5)
    assert trials and all(t.meta["category"] == "mpdd/metal_plate" for t in trials)
    assert all(t.config["train"]["steps"] == 5 for t in trials)
    assert all(t.config["data"]["image_size"] == 128 for t in trials)  # the grid's own set
    memseg = [t for t in expand(spec, "/d", None, bhad_root="/b") if t.meta["row"] == "memseg"]
    assert memseg and all(t.config["pseudo"]["enabled"] is False for t in memseg)  # the row's set on top


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("seeds: [1]\ncategories: [a/b]\nrows: {x: {}}\nbogus: 1\n", "unknown key"),
        ("seeds: [1]\ncategories: [a/b]\nrows: {x: {detector: efficientad}}\n", "detector"),
        ("seeds: [1]\ncategories: [a/b]\nrows: {x: {set: {model.no_such: 1}}}\n", "no configuration field"),
        ("seeds: [1]\ncategories: [a/b]\nrows: {x: {conditions: [foggy]}}\n", "conditions"),
        ("seeds: [1]\ncategories: [a/b]\nrows: {x: {categories: [c/d]}}\n", "not in the grid"),
        ("seeds: []\ncategories: [a/b]\nrows: {x: {}}\n", "seeds is required"),
        ("categories: [screw]\nseeds: [1]\nrows: {x: {}}\n", "DATASET/CATEGORY"),
        ("- a\n- b\n", "mapping"),
        ("seeds: [1]\ncategories: [a/b]\nrows: {x: {preset: maybe}}\n", "preset must be true or false"),
        ("seeds: [1]\ncategories: [a/b]\nrows: {x: {preset: 'false'}}\n", "preset must be true or false"),
        ("seeds: [1]\ncategories: [a/b]\nimage_level_only: [c/d]\nrows: {x: {}}\n", "image_level_only"),
        ("seeds: [1]\ncategories: [a/b]\npeer: {bogus: 1}\nrows: {x: {}}\n", "peer: unknown key.*coreset_ratio"),
        ("seeds: [1]\ncategories: [a/b]\npeer: {num_neighbors: x}\nrows: {x: {}}\n", "peer.num_neighbors"),
        ("seeds: [1]\ncategories: [a/b]\npeer: {coreset_ratio: 0}\nrows: {x: {}}\n", "peer.coreset_ratio"),
        ("seeds: [1]\ncategories: [a/b]\nrows: {x: {set: {train.lr: '1e-4'}}}\n", "train.lr: .*without quotes"),
        ("seeds: [1]\ncategories: [a/b]\ncorruption: {noise_std: '12'}\nrows: {x: {}}\n", "noise_std must be a finite"),
        ("seeds: [1]\ncategories: [a/b]\ncorruption: {seed: '0'}\nrows: {x: {}}\n", "seed must be an integer"),
        ("seeds: [1]\ncategories: [a/b]\ncorruption: {noise: 3}\nrows: {x: {}}\n", "unknown key.*'noise'.*noise_std"),
        ("seeds: [1]\ncategories: [a/b]\nset: {model.pretrained: 'no'}\nrows: {x: {}}\n", "set: .*without quotes"),
    ],
)
def test_bad_grid_files_name_the_file_and_the_fault(tmp_path, text, message):
    p = tmp_path / "g.yaml"
    p.write_text(text)
    with pytest.raises(GridError, match=message) as e:
        load_grid(p)
    assert str(p) in str(e.value)


def test_bhad_rows_need_the_corrupted_root():
    spec = load_grid(REPO / "bench" / "grids" / "accuracy_gpu.yaml")
    with pytest.raises(GridError, match="bhad_root"):
        expand(spec, "/data", None)


def test_mapl_benchmark_with_a_bad_grid_file_says_so(tmp_path, capsys):
    bad = tmp_path / "grid.yaml"
    bad.write_text("seeds: [1]\ncategories: [mvtec_ad/screw]\nrows: {mapl: {set: {train.stepz: 5}}}\n")
    assert main(["benchmark", "--grid", str(bad), "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "mapl benchmark: error" in err and str(bad) in err and "train.steps" in err  # names the near field
    assert main(["benchmark", "--grid", str(tmp_path / "missing.yaml"), "--data", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["benchmark", "--data", str(tmp_path)]) == 2
    assert "--grid" in capsys.readouterr().err


# -- report ----------------------------------------------------------------------------------------


def _records() -> list[dict]:
    recs = []
    for seed, (m, p) in zip((101, 102, 103), ((0.9, 0.8), (1.0, 0.9), (0.8, 0.7))):
        recs.append(
            {
                "category": "mvtec_ad/screw",
                "condition": "clean",
                "row": "mapl",
                "seed": seed,
                "name": f"s-mapl-{seed}",
                "image_auroc": m,
                "pixel_auroc": 0.95,
                "aupro": None,
                "wall_s": 30.0,
            }
        )
        recs.append(
            {
                "category": "mvtec_ad/screw",
                "condition": "clean",
                "row": "patchcore",
                "seed": seed,
                "name": f"s-pc-{seed}",
                "image_auroc": p,
                "pixel_auroc": None,
                "aupro": None,
                "wall_s": 10.0,
            }
        )
    recs.append(
        {
            "category": "mvtec_ad/screw",
            "condition": "bhad",
            "row": "mapl",
            "seed": 101,
            "name": "s-mapl-bhad-101",
            "error": "cancelled after 430 s",
        }
    )
    return recs


def test_summary_is_mean_and_sample_spread_of_finished_trials():
    s = summarise(_records())["mvtec_ad/screw"]
    mapl = s["clean"]["mapl"]
    assert mapl["image_auroc"]["mean"] == pytest.approx(0.9) and mapl["image_auroc"]["std"] == pytest.approx(0.1)
    assert mapl["runs"] == 3 and mapl["failed"] == 0 and mapl["aupro"] is None
    assert s["bhad"]["mapl"]["runs"] == 0 and s["bhad"]["mapl"]["failed"] == 1


def test_report_writes_mean_and_spread_failures_and_figures(tmp_path):
    result = {
        "runs": _records(),
        "categories": ["mvtec_ad/screw"],
        "rows": {"mapl": "MAPL (defaults)", "patchcore": "PatchCore (anomalib)"},
        "seeds": [101, 102, 103],
        "steps": 500,
        "command": "bench/accuracy.py --grid g.yaml",
        "machine": {"gpu": "none"},
        "wall_s": 12.0,
    }
    md = write_results(result, tmp_path / "docs" / "RESULTS.md", tmp_path / "docs" / "img" / "accuracy", ["x: why"])
    text = md.read_text()
    assert "| MAPL (defaults) | 0.900 ± 0.100 |" in text
    assert "| PatchCore (anomalib) | 0.800 ± 0.100 |" in text
    assert "s-mapl-bhad-101: cancelled after 430 s" in text and "- x: why" in text
    assert "](img/accuracy/bars_mvtec_ad_screw.png)" in text
    bars = tmp_path / "docs" / "img" / "accuracy" / "bars_mvtec_ad_screw.png"
    assert Image.open(bars).size[0] > 100
    json.dumps(summarise(result["runs"]))  # the JSON's summary serialises


def test_merge_folds_a_brought_back_json_and_rewrites_the_report(tmp_path):
    old = {"runs": _records()[:2], "categories": ["mvtec_ad/screw"], "rows": {"mapl": "M", "patchcore": "P"}}
    new = {"runs": _records()[2:], "categories": ["mvtec_ad/screw"], "rows": {"mapl": "M", "patchcore": "P"}}
    (tmp_path / "old.json").write_text(json.dumps(old))
    (tmp_path / "new.json").write_text(json.dumps(new))
    args = ["benchmark", "--merge", str(tmp_path / "new.json"), "--out", str(tmp_path / "old.json")]
    md = tmp_path / "R.md"
    assert main([*args, "--results-md", str(md), "--img-dir", str(tmp_path / "img")]) == 0
    merged = json.loads((tmp_path / "old.json").read_text())
    assert len(merged["runs"]) == len(_records()) and "0.900 ± 0.100" in md.read_text()


def test_benchmark_report_defaults_beside_its_json_not_the_repositorys(tmp_path, monkeypatch, capsys):
    """From the repository root, `mapl benchmark` without --results-md / --img-dir writes OUT.md and OUT_img/
    beside the JSON: docs/RESULTS.md (bench/accuracy.py's report) is left alone."""
    new = {"runs": _records(), "categories": ["mvtec_ad/screw"], "rows": {"mapl": "M", "patchcore": "P"}}
    (tmp_path / "new.json").write_text(json.dumps(new))
    before = (REPO / "docs" / "RESULTS.md").read_bytes()
    monkeypatch.chdir(REPO)
    out = tmp_path / "res" / "grid.json"
    assert main(["benchmark", "--merge", str(tmp_path / "new.json"), "--out", str(out)]) == 0
    assert "0.900 ± 0.100" in (tmp_path / "res" / "grid.md").read_text()
    assert list((tmp_path / "res" / "grid_img").glob("*.png"))
    assert (REPO / "docs" / "RESULTS.md").read_bytes() == before
    assert str(tmp_path / "res" / "grid.md") in capsys.readouterr().out


def test_benchmark_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["benchmark", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for default in ("default benchmark/accuracy.json", "default: --out with .md", "default 2", "default 0"):
        assert default in text
    assert "docs/RESULTS.md" in text  # says that bench/accuracy.py, not mapl benchmark, writes it


def test_an_interrupted_benchmark_says_what_finished_and_its_merge_writes_the_report(tmp_path, monkeypatch, capsys):
    """Ctrl-C during the grid: exit 130 and one line naming the finished trials (saved as they finish), not a
    KeyboardInterrupt traceback; the line's --merge command writes the report from them."""
    import mapl_ray.pipelines.benchmark as benchmark

    out = tmp_path / "res" / "grid.json"
    grid = tmp_path / "g.yaml"
    grid.write_text("seeds: [1]\ncategories: [mvtec_ad/screw]\nrows: {mapl: {}}\n")

    def interrupted(*args, **kwargs):  # two trials saved, then Ctrl-C while waiting for the rest
        out.parent.mkdir(parents=True, exist_ok=True)
        rows = {"mapl": "M", "patchcore": "P"}
        out.write_text(json.dumps({"runs": _records()[:2], "categories": ["mvtec_ad/screw"], "rows": rows}))
        raise KeyboardInterrupt

    monkeypatch.setattr(benchmark, "run_benchmark", interrupted)
    assert main(["benchmark", "--grid", str(grid), "--data", str(tmp_path), "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert f"interrupted; 2 finished trial(s) in {out}" in err and "Traceback" not in err
    assert main(["benchmark", "--merge", str(out), "--out", str(out)]) == 0
    assert len(json.loads(out.read_text())["runs"]) == 2 and (tmp_path / "res" / "grid.md").is_file()


def test_an_interrupted_benchmark_before_any_trial_says_nothing_was_written(tmp_path, monkeypatch, capsys):
    import mapl_ray.pipelines.benchmark as benchmark

    grid, out = tmp_path / "g.yaml", tmp_path / "res" / "grid.json"
    grid.write_text("seeds: [1]\ncategories: [mvtec_ad/screw]\nrows: {mapl: {}}\n")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(benchmark, "run_benchmark", interrupted)
    assert main(["benchmark", "--grid", str(grid), "--data", str(tmp_path), "--out", str(out)]) == 130
    assert "interrupted; no trial had finished (nothing written)" in capsys.readouterr().err and not out.exists()
