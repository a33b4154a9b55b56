"""Test-time augmentation in the Predictor: views invert exactly, TTA maps are the mean of single-view
maps, and with all 8 flips / rotations the image score does not depend on the input's orientation."""

import numpy as np
import pytest
import torch

from mapl_ray.data.io import load_image
from mapl_ray.inference import Predictor
from mapl_ray.model.anomaly_map import apply_view, invert_view, tta_views


def test_views_invert_exactly_and_are_distinct():
    x = torch.rand(2, 3, 8, 8)
    for mode, n in (("none", 1), ("flip", 2), ("rot90", 8)):
        views = tta_views(mode)
        assert len(views) == n
        outs = [apply_view(x, k, f) for k, f in views]
        for (k, f), y in zip(views, outs):
            assert torch.equal(invert_view(y, k, f), x)
        # every view is a different image (no transform counted twice)
        assert len({tuple(o.flatten().tolist()) for o in outs}) == n
    with pytest.raises(ValueError, match="eval.tta"):
        tta_views("rot45")


def _test_images(trained_run, n=4):
    from mapl_ray.data.split import Split

    split = Split.from_json(trained_run / "split.json")
    paths = [r.path for r in split.test[:n]]
    return torch.from_numpy(np.stack([load_image(p, 64) for p in paths])).permute(0, 3, 1, 2).float() / 255


def test_flip_tta_is_the_mean_of_the_two_single_view_maps(trained_run):
    x = _test_images(trained_run)
    single = Predictor(trained_run, device="cpu", tta="none")
    plain = single.predict_tensor(x)["maps"]
    flipped = torch.flip(single.predict_tensor(torch.flip(x, dims=(-1,)))["maps"], dims=(-1,))
    tta = Predictor(trained_run, device="cpu", tta="flip").predict_tensor(x)
    torch.testing.assert_close(tta["maps"], (plain + flipped) / 2, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(plain, flipped, atol=1e-4)  # the model itself is not flip-invariant


def test_rot90_tta_score_does_not_depend_on_input_orientation(trained_run):
    x = _test_images(trained_run)
    turned = torch.rot90(x, 1, dims=(-2, -1))
    tta = Predictor(trained_run, device="cpu", tta="rot90")
    a, b = tta.predict_tensor(x), tta.predict_tensor(turned)
    torch.testing.assert_close(b["scores"], a["scores"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(b["maps"], torch.rot90(a["maps"], 1, dims=(-2, -1)), atol=1e-5, rtol=1e-4)
    single = Predictor(trained_run, device="cpu", tta="none")
    assert not torch.allclose(single.predict_tensor(turned)["scores"], single.predict_tensor(x)["scores"], atol=1e-4)


def test_run_written_before_tta_existed_keeps_scoring_without_it(trained_run, tmp_path):
    import shutil

    import yaml

    from mapl_ray.config import Config

    old = tmp_path / "old_run"
    shutil.copytree(trained_run, old)
    cfg = yaml.safe_load((old / "config.yaml").read_text())
    del cfg["eval"]["tta"]  # as in a config.yaml written before eval.tta was added
    (old / "config.yaml").write_text(yaml.safe_dump(cfg))
    x = _test_images(trained_run)
    pred = Predictor(old, device="cpu")
    assert pred.cfg.eval.tta == "none"
    torch.testing.assert_close(
        pred.predict_tensor(x)["scores"], Predictor(trained_run, device="cpu", tta="none").predict_tensor(x)["scores"]
    )
    # a user's partial config file still gets today's default
    (tmp_path / "user.yaml").write_text("eval:\n  top_k: 10\n")
    assert Config.load(tmp_path / "user.yaml").eval.tta == "rot90"


def test_memory_bank_ensemble_holds_the_listed_normals_and_averages_their_maps(trained_run):
    import json

    from mapl_ray.data.augment import rotated_copies
    from mapl_ray.tensors import to_tensor

    info = json.loads((trained_run / "data_info.json").read_text())
    banks = info["memory_banks"]
    assert [len(b) for b in banks] == [4, 4]  # tiny_config: model.memory_banks=2 of 4 samples
    assert not set(banks[0]) & set(banks[1])
    assert not set(banks[0] + banks[1]) & set(info["validation_normals"])
    # the report gets the count, not 8 paths in one table cell
    assert (
        json.loads((trained_run / "metrics.json").read_text())["run"]["data"]["memory_banks"] == "2 bank(s) of 4 images"
    )
    pred = Predictor(trained_run, device="cpu", tta="none")
    assert len(pred.model.banks) == 2
    # bank 1 holds the encoder features of its listed images (each at memory_rotations=2 orientations)
    imgs = rotated_copies(np.stack([load_image(p, 64) for p in banks[1]]), 2)
    with torch.no_grad():
        feats = pred.model.encoder(pred.model.preprocess(to_tensor(imgs, "cpu")))[1:4]
    for want, got in zip(feats, pred.model.banks[1].levels()):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    x = _test_images(trained_run)
    both = pred.predict_tensor(x)
    first = Predictor(trained_run, device="cpu", tta="none", memory_banks=1).predict_tensor(x)
    assert not torch.allclose(both["maps"], first["maps"], atol=1e-4)
    with pytest.raises(ValueError, match="memory_banks=3.*holds 2 memory bank"):
        Predictor(trained_run, device="cpu", memory_banks=3)


def test_fixed_batch_pads_a_short_chunk_and_drops_the_padding(trained_run):
    """``fixed_batch`` (``mapl score`` on CUDA: one graph shape) scores a short last chunk padded with copies
    of its last image to the batch size; the images' own results are those of the unpadded call (set here on a CPU, where
    the Predictor leaves it off: there is no graph to reuse)."""
    images = (_test_images(trained_run, n=5).permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
    pred = Predictor(trained_run, device="cpu", batch_size=3, fixed_batch=True)
    assert not pred.fixed_batch  # no CUDA graphs on a CPU
    plain = pred.predict_arrays(images)
    calls = []
    pred.predict_tensor = lambda x, f=pred.predict_tensor: calls.append(len(x)) or f(x)
    pred.fixed_batch = True
    padded = pred.predict_arrays(images)
    assert calls == [3, 3]  # 3 + (2 images and 1 of padding)
    for k in ("maps", "q", "scores"):
        assert padded[k].shape[0] == 5
        np.testing.assert_allclose(padded[k], plain[k], atol=1e-5)
