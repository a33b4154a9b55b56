"""Training loop: batches, schedule, checkpoint save/load and resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import needs_data, tiny_config

from mapl_ray.data.batches import BatchMaker, epoch_indices
from mapl_ray.data.simulation import build_simulator
from mapl_ray.data.train_data import load_train_data
from mapl_ray.engine.loop import train_model
from mapl_ray.engine.schedule import make_scheduler
from mapl_ray.main_job import prepare_run
from mapl_ray.model import build_model
from mapl_ray.runfolder import CheckpointError, RunFolderError, load_model_weights, read_state


def test_epoch_indices_use_every_normal_once_per_epoch():
    n = 7
    stream = epoch_indices(n, 0, 3 * n, seed=0, stream=0)
    for e in range(3):
        assert sorted(stream[e * n : (e + 1) * n]) == list(range(n))
    # any window of the stream is reproducible on its own (resume draws the same batches)
    assert np.array_equal(epoch_indices(n, 5, 9, 0, 0), stream[5:14])


def test_lr_schedule_warmup_then_cosine_to_floor():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=0.003)
    sched = make_scheduler(opt, steps=100, warmup_fraction=0.1, lr=0.003, min_lr=1e-4)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] < 0.0001  # warm-up starts low
    assert abs(max(lrs) - 0.003) < 1e-9 and int(np.argmax(lrs)) == 10
    assert abs(opt.param_groups[0]["lr"] - 1e-4) < 1e-9  # ends at the floor exactly at `steps`
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


@needs_data
def test_batch_holds_configured_mix_and_simulated_masks(small_root, tmp_path):
    cfg = tiny_config(small_root, **{"train.batch_normal": 3, "train.batch_simulated": 5})
    split = prepare_run(cfg, tmp_path / "run")
    data, _, _ = load_train_data(cfg, split)
    batch = BatchMaker(cfg, data, build_simulator(cfg))(0)
    assert list(batch["kind"]) == [0] * 3 + [1] * 5
    assert batch["images"].shape == (8, 64, 64, 3) and batch["images"].dtype == np.uint8
    assert batch["masks"][:3].sum() == 0
    assert all(batch["masks"][i].sum() > 0 for i in range(3, 8))


@needs_data
def test_checkpoint_roundtrip_and_resume_give_identical_weights(small_root, tmp_path):
    cfg = tiny_config(small_root)
    split = prepare_run(cfg, tmp_path / "straight")
    data, _, _ = load_train_data(cfg, split)
    straight, _ = train_model(cfg, data, tmp_path / "straight", progress=False)

    # saved checkpoint == in-memory weights
    loaded = build_model(cfg)
    loaded.refresh_memory(torch.zeros(1, 3, 64, 64))
    load_model_weights(tmp_path / "straight", loaded)
    for (k, a), b in zip(straight.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k

    # a run stopped after 3 steps and resumed ends with the same weights as the straight run
    prepare_run(cfg, tmp_path / "resumed")
    train_model(cfg, data, tmp_path / "resumed", progress=False, stop_at=3)  # pre-empted after step 3
    assert read_state(tmp_path / "resumed")["step"] == 3
    resumed, _ = train_model(cfg, data, tmp_path / "resumed", resume=True, progress=False)
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), k
    log = [json.loads(line) for line in (tmp_path / "resumed" / "train_log.jsonl").read_text().splitlines()]
    assert [(r["step"], r["segment"]) for r in log] == [(1, 0), (2, 0), (3, 0), (4, 1), (5, 1), (6, 1)]


@needs_data
def test_loader_worker_processes_draw_the_same_batches_as_the_main_process(small_root, tmp_path):
    # anomaly simulation in 2 loader processes (the GPU path) must not change what is trained on
    cfg = tiny_config(small_root, **{"train.loader_workers": 0})
    split = prepare_run(cfg, tmp_path / "inline")
    data, _, _ = load_train_data(cfg, split)
    inline, s0 = train_model(cfg, data, tmp_path / "inline", progress=False)
    cfg2 = cfg.override({"train.loader_workers": 2})
    prepare_run(cfg2, tmp_path / "workers")
    workers, s2 = train_model(cfg2, data, tmp_path / "workers", progress=False)
    assert s0["loader_workers"] == 0 and s2["loader_workers"] == 2
    for (k, a), b in zip(inline.state_dict().items(), workers.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), k
    assert s2["pseudo"] == s0["pseudo"] and s0["pseudo"]  # the prefetched refit pool is the same pool


@needs_data
def test_a_refit_pool_made_in_parts_by_the_loader_items_is_the_whole_pool(small_root, tmp_path):
    from mapl_ray.data.batches import POOL_CHUNKS, StepBatches, assemble_pool, pool_chunk_steps
    from mapl_ray.engine.loop import Trainer

    cfg = tiny_config(small_root, **{"pseudo.pool_size": 5})  # 10 simulated images in 8 parts: some hold none
    data, _, _ = load_train_data(cfg, prepare_run(cfg, tmp_path / "run"))
    bm = BatchMaker(cfg, data, build_simulator(cfg))
    refit = POOL_CHUNKS + 3
    items = StepBatches(bm, {refit})
    assert "pool_chunks" not in items[refit - POOL_CHUNKS] and "pool_chunks" not in items[refit + 1]
    parts = {items[s]["pool_chunks"][refit][0]: items[s]["pool_chunks"][refit][1] for s in pool_chunk_steps(refit)}
    assert sorted(parts) == list(range(POOL_CHUNKS))
    whole = bm.pool(refit)
    pooled = assemble_pool([parts[c] for c in range(POOL_CHUNKS)])
    assert len(whole["sims"]) == 10 and np.array_equal(pooled["sims"], whole["sims"])
    assert np.array_equal(pooled["normal_idx"], whole["normal_idx"])
    # a run resumed inside the window: the parts of the steps before it are made by the loop, the same parts
    trainer = Trainer(cfg, data, tmp_path / "run")
    trainer._pool_parts = {refit: {c: parts[c] for c in range(3, POOL_CHUNKS)}}
    assert np.array_equal(trainer._refit_pool(refit)["sims"], whole["sims"])


def test_weighted_losses_equal_the_losses_of_the_selected_samples():
    from mapl_ray.model import segmentation_loss
    from mapl_ray.model.losses import masked_bce

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 1, 8, 8, generator=g, requires_grad=True)
    target = (torch.rand(6, 1, 8, 8, generator=g) > 0.8).float()
    keep = torch.tensor([True, False, True, True, False, True])
    w = segmentation_loss(logits, target, weights=keep)
    ref = segmentation_loss(logits[keep], target[keep])
    for k in ("l1", "focal", "seg"):
        assert torch.allclose(w[k], ref[k], atol=1e-6), k
    q = torch.randn(6, generator=g, requires_grad=True)
    pseudo = torch.tensor([1, -1, 0, 1, -1, 0])
    sel = pseudo != -1
    ref_bce = torch.nn.functional.binary_cross_entropy_with_logits(q[sel], pseudo[sel].float())
    assert torch.allclose(masked_bce(q, pseudo, sel), ref_bce, atol=1e-6)
    none = masked_bce(q, pseudo, torch.zeros(6, dtype=torch.bool))
    assert none.item() == 0.0 and none.requires_grad  # nothing selected: an attached zero
    (w["seg"] + masked_bce(q, pseudo, sel)).backward()
    assert logits.grad[~keep].abs().sum() == 0 and logits.grad[keep].abs().sum() > 0


@needs_data
def test_failed_start_folder_is_reused_and_resume_needs_checkpoint(small_root, tmp_path):
    cfg = tiny_config(small_root)
    run = tmp_path / "run"
    prepare_run(cfg, run)  # a run that stopped before its first checkpoint leaves config + split
    with pytest.raises(RunFolderError, match="holds no checkpoint"):
        prepare_run(cfg, run, resume=True)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        read_state(run)
    prepare_run(cfg.override({"data.skip_bad_images": True}), run)  # starting again reuses the folder
    assert "skip_bad_images: true" in (run / "config.yaml").read_text()


def test_out_of_range_settings_fail_before_anything_is_written(tmp_path):
    from mapl_ray.config import Config, ConfigError

    for field, value in (
        ("train.steps", 0),
        ("train.lr", -1.0),
        ("train.num_workers", 0),
        ("eval.top_k", 0),
        ("model.memory_samples", 0),
        ("data.image_size", 8),
        ("data.image_size", 100_000),  # one batch would not fit any machine's memory
        ("model.decoder_channels", (96, -1, 48, 32)),
        ("model.decoder_channels", (96, 64)),
    ):
        cfg = Config().override({"data.root": str(tmp_path), "data.category": "x", field: value})
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            prepare_run(cfg, tmp_path / "run")
    for field, value, expected in (  # refused as the value is read
        ("train.lr", "inf", "a finite number"),  # inf passed lr > 0, then NaN scores at the end
        ("eval.q_weight_grid", [0, float("nan")], "a list of finite numbers"),
        ("train.steps", None, "null is not allowed \\(expected an integer\\)"),
        ("pseudo.pca_dim", "x", "an integer or null"),
        ("model.decoder_channels", [1.5, 2, 3, 4], "a list of integers"),
    ):
        with pytest.raises(ConfigError, match=f"{field}: .*{expected}"):
            Config().override({field: value})
    assert not (tmp_path / "run").exists()


def test_rotated_memory_copies():
    from mapl_ray.data.augment import rotated_copies

    rng = np.random.default_rng(0)
    imgs = (rng.random((2, 32, 32, 3)) * 255).astype(np.uint8)
    out = rotated_copies(imgs, 4)
    assert out.shape == (8, 32, 32, 3) and out.dtype == np.uint8
    assert np.array_equal(out[0], imgs[0]) and np.array_equal(out[4], imgs[1])  # rotation 0 kept as is
    # 90-degree steps of a square image are exact pixel permutations (PIL rotates counter-clockwise)
    assert np.array_equal(out[1], np.rot90(imgs[0], 1))
    assert rotated_copies(imgs, 1) is imgs


def test_run_shorter_than_the_pseudo_warmup_says_the_pseudo_labeler_was_never_fitted(small_root, tmp_path, caplog):
    cfg = tiny_config(small_root, **{"train.steps": 2, "pseudo.warmup_steps": 5})
    run = tmp_path / "run"
    split = prepare_run(cfg, run)
    data, _, _ = load_train_data(cfg, split)
    with caplog.at_level("WARNING", logger="mapl_ray.train"):
        train_model(cfg, data, run, progress=False)
    assert any("pseudo-labeler was never fitted" in r.getMessage() for r in caplog.records)
    assert read_state(run)["pseudo_fitted_step"] == -1
    assert not (run / "checkpoint" / "pseudo.safetensors").exists()


def test_device_learning_rate_follows_the_schedule_and_its_checkpoint_resumes_anywhere(tmp_path):
    from mapl_ray.engine.step import device_lr
    from mapl_ray.runfolder import load_training_state, snapshot_checkpoint, write_checkpoint

    model = torch.nn.Linear(3, 1)
    tensor_opt = torch.optim.AdamW(model.parameters(), lr=0.003, foreach=False)
    device_lr(tensor_opt, torch.device("cpu"))  # what a CUDA-graph run does on its GPU
    float_opt = torch.optim.AdamW(torch.nn.Linear(3, 1).parameters(), lr=0.003)
    scheds = [make_scheduler(o, steps=50, warmup_fraction=0.1, lr=0.003, min_lr=1e-4) for o in (tensor_opt, float_opt)]
    for _ in range(20):
        for o, s in zip((tensor_opt, float_opt), scheds):
            o.step()
            s.step()
    lr = tensor_opt.param_groups[0]["lr"]
    assert isinstance(lr, torch.Tensor) and abs(float(lr) - float_opt.param_groups[0]["lr"]) < 1e-8

    # the checkpoint stores plain floats: an eager (foreach, float LR) run resumes from it and vice versa
    write_checkpoint(tmp_path, snapshot_checkpoint(model, {"step": 20}, tensor_opt, scheds[0]))
    blob = torch.load(tmp_path / "checkpoint" / "optimizer.pt", weights_only=True)
    assert isinstance(blob["optimizer"]["param_groups"][0]["lr"], float)
    resumed = torch.optim.AdamW(model.parameters(), lr=0.003)
    resumed_sched = make_scheduler(resumed, steps=50, warmup_fraction=0.1, lr=0.003, min_lr=1e-4)
    load_training_state(tmp_path, resumed, resumed_sched)
    for _ in range(5):
        resumed.step()
        resumed_sched.step()
        float_opt.step()
        scheds[1].step()
    assert abs(resumed.param_groups[0]["lr"] - float_opt.param_groups[0]["lr"]) < 1e-8


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@needs_data
def test_cuda_graph_training_step_matches_the_eager_step(small_root, tmp_path):
    # 12 steps with pseudo-labeler refits at steps 2, 5, 8, 11: the graph is captured once, after the first
    # refit (later refits refill the ensemble's device tensors in place); steps 0-2 are eager
    # a loader process: its batches are pinned by a thread that runs while the main thread captures
    over = {"train.steps": 12, "train.amp": "off", "model.memory_backend": "torch", "train.loader_workers": 1}
    results = {}
    for graphs in (True, False):
        cfg = tiny_config(small_root, **over, **{"train.cuda_graphs": graphs})
        run = tmp_path / f"graphs_{graphs}"
        split = prepare_run(cfg, run)
        data, _, _ = load_train_data(cfg, split)
        model, summary = train_model(cfg, data, run, device="cuda", progress=False)
        losses = [json.loads(line)["loss"] for line in (run / "train_log.jsonl").read_text().splitlines()]
        results[graphs] = (model, summary, losses)
    graphed, eager = results[True], results[False]
    assert graphed[1]["cuda_graph_step"] and graphed[1]["graph_captures"] == 1 and graphed[1]["eager_steps"] == 3
    assert graphed[1]["graph_capture_error"] is None and not eager[1]["cuda_graph_step"]
    # two eager runs already differ by ~1e-4 in the loss (atomics in the convolutions' backward)
    np.testing.assert_allclose(graphed[2], eager[2], rtol=1e-2)
    # the weights moved the same way: GPU kernels are not bitwise deterministic and AdamW turns a tiny
    # gradient's noise into a full LR-sized step, so compare the gap with how far training moved them
    torch.manual_seed(cfg.train.seed)
    init = build_model(cfg).state_dict()
    trained = [k for k, p in eager[0].named_parameters() if p.requires_grad]
    moved = sum((eager[0].state_dict()[k].cpu() - init[k]).abs().sum() for k in trained)
    gap = sum((graphed[0].state_dict()[k].cpu() - eager[0].state_dict()[k].cpu()).abs().sum() for k in trained)
    assert gap < 0.05 * moved, (float(gap), float(moved))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@needs_data
def test_refit_features_replayed_as_a_cuda_graph_follow_the_weights(small_root, tmp_path):
    from mapl_ray.pseudo.labeler import PseudoLabeler

    cfg = tiny_config(
        small_root, **{"train.amp": "off", "model.memory_backend": "torch", "pseudo.feature_batch_size": 4}
    )
    data, _, _ = load_train_data(cfg, prepare_run(cfg, tmp_path / "run"))
    model = build_model(cfg).cuda().eval()
    model.refresh_memory(torch.rand(3, 3, cfg.data.image_size, cfg.data.image_size, device="cuda"))
    bm = BatchMaker(cfg, data, build_simulator(cfg))
    eager = PseudoLabeler(cfg, bm, torch.device("cuda"))
    graphed = PseudoLabeler(cfg, bm, torch.device("cuda"), cuda_graphs=True)
    images = data.normals[:6]  # a full batch of 4 and a padded one of 2: one captured shape
    for _ in range(2):
        np.testing.assert_allclose(graphed.features(model, images), eager.features(model, images), rtol=1e-4, atol=1e-5)
        with torch.no_grad():  # the weights move in place, as an optimizer step moves them
            for p in model.decoder.parameters():
                p.mul_(1.5)
    assert graphed._graphs[graphed.kind].captures == 1 and graphed._graphs[graphed.kind].failed is None


def test_resumed_run_keeps_the_earlier_training_summary(tmp_path):
    from mapl_ray.runfolder import write_train_summary

    write_train_summary(tmp_path, {"steps_run": 30, "train_wall_s": 25.0}, resumed=False)
    write_train_summary(tmp_path, {"steps_run": 10, "train_wall_s": 9.0}, resumed=True)
    write_train_summary(tmp_path, {"steps_run": 5, "train_wall_s": 4.0}, resumed=True)
    s = json.loads((tmp_path / "train_summary.json").read_text())
    assert s["steps_run"] == 5 and [e["steps_run"] for e in s["earlier_segments"]] == [30, 10]
    assert s["steps_run_total"] == 45 and s["train_wall_s_total"] == 38.0
    write_train_summary(tmp_path, {"steps_run": 7, "train_wall_s": 1.0}, resumed=False)  # a fresh run starts over
    assert json.loads((tmp_path / "train_summary.json").read_text())["steps_run_total"] == 7
    # Ctrl-C at step 150 of a fresh run: no summary written; the resumed segment (150 -> 300) counts it
    (tmp_path / "train_summary.json").unlink()
    write_train_summary(tmp_path, {"steps_run": 150, "start_step": 150, "train_wall_s": 2.0}, resumed=True)
    s = json.loads((tmp_path / "train_summary.json").read_text())
    assert s["earlier_segments"] == [{"steps_run": 150, "interrupted": True}] and s["steps_run_total"] == 300
    # a later interruption after a finished segment: only the steps no summary holds
    write_train_summary(tmp_path, {"steps_run": 20, "start_step": 320, "train_wall_s": 1.0}, resumed=True)
    s = json.loads((tmp_path / "train_summary.json").read_text())
    assert [e["steps_run"] for e in s["earlier_segments"]] == [150, 150, 20] and s["steps_run_total"] == 340


def test_an_interrupted_segment_counts_its_time_up_to_its_last_log_line(tmp_path):
    """Ctrl-C at step 100 wrote no summary: the resumed run's total adds the stopped segment's time up to its
    last train_log.jsonl line (it left it out before), and marks it as that."""
    from mapl_ray.runfolder import write_train_summary

    lines = [{"step": 50, "wall_s": 40.0, "segment": 0}, {"step": 100, "wall_s": 81.5, "segment": 0}]
    lines += [{"event": "restart", "segment": 1, "step": 100}, {"step": 150, "wall_s": 30.0, "segment": 1}]
    (tmp_path / "train_log.jsonl").write_text("\n".join(map(json.dumps, lines)) + '\n{"step": 1')  # a cut line
    write_train_summary(tmp_path, {"steps_run": 60, "start_step": 100, "train_wall_s": 50.0, "segment": 1}, True)
    s = json.loads((tmp_path / "train_summary.json").read_text())
    assert s["earlier_segments"] == [
        {"steps_run": 100, "interrupted": True, "train_wall_s": 81.5, "train_wall_s_until_last_log": True}
    ]
    assert s["steps_run_total"] == 160 and s["train_wall_s_total"] == 131.5


def test_report_gives_a_resumed_runs_whole_training_time():
    from mapl_ray.eval.report import _run_rows

    resumed = {"train_wall_s": 50.0, "steps_run": 60, "train_wall_s_total": 131.5, "steps_run_total": 160}
    assert dict(_run_rows({"training": resumed}))["training time"] == (
        "132 s over 160 steps, of which the last segment 50 s (60 steps)"
    )
    fresh = {"train_wall_s": 50.0, "steps_run": 60, "train_wall_s_total": 50.0, "steps_run_total": 60}
    assert dict(_run_rows({"training": fresh}))["training time"] == "50 s (60 steps)"
