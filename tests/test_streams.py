"""Streamed training rows without Ray: the plan draws BatchMaker's images, steps are reassembled from any
block boundaries, and per-sample generators make augmentation independent of how rows are grouped."""

from __future__ import annotations

import numpy as np
import pytest

from mapl_ray.config import Config
from mapl_ray.data.batches import BatchMaker
from mapl_ray.data.streams import (
    KIND_ANOMALY,
    KIND_NORMAL,
    POOL_SIMULATED,
    POOL_UNLABELED,
    StreamedPool,
    StreamPlan,
    assemble_steps,
    augment_samples,
)
from mapl_ray.data.train_data import TrainData

SIZES = (10, 7, 3)


def _cfg(**kw) -> Config:
    return Config().override({"pseudo.pool_size": 3, **kw})


def test_plan_draws_the_images_batchmaker_draws():
    cfg = _cfg()
    rng = np.random.default_rng(0)
    data = TrainData(
        normals=rng.integers(0, 255, (SIZES[0], 4, 4, 3), dtype=np.uint8),
        memory_indices=np.arange(2),
        unlabeled=np.zeros((SIZES[1], 4, 4, 3), np.uint8),
        anomalies=np.zeros((SIZES[2], 4, 4, 3), np.uint8),
        anomaly_masks=np.zeros((SIZES[2], 4, 4), np.uint8),
    )
    for rank in (0, 1):
        bm = BatchMaker(cfg, data, simulator=None, rank=rank, world_size=2)
        plan = StreamPlan.from_config(cfg, SIZES, rank=rank, world=2)
        rows = plan.rows(np.arange(6))
        per = (bm.n_normal, bm.n_sim, bm.n_unl, bm.n_anom)
        assert plan.per_step == per
        for step in range(6):
            for kind in range(4):
                sel = (rows["step"] == step) & (rows["kind"] == kind)
                want = bm._stream(step, per[kind], SIZES[(0, 0, 1, 2)[kind]], kind)
                np.testing.assert_array_equal(rows["index"][sel], want)


def test_refit_steps_carry_the_pool_equal_on_every_rank():
    cfg = _cfg()
    plans = [StreamPlan.from_config(cfg, SIZES, rank=r, world=2, refit_steps={2}) for r in (0, 1)]
    rows = [p.rows(np.array([2])) for p in plans]
    pool = [{k: v[r["kind"] >= POOL_SIMULATED] for k, v in r.items()} for r in rows]
    for k in ("index", "sample_key", "kind"):
        np.testing.assert_array_equal(pool[0][k], pool[1][k])
    assert (pool[0]["kind"] == POOL_SIMULATED).sum() == 2 * 3 and (pool[0]["kind"] == POOL_UNLABELED).sum() == SIZES[1]
    assert len(rows[0]["step"]) == plans[0].rows_of(2) and plans[0].rows_of(3) == sum(plans[0].per_step)
    with pytest.raises(ValueError, match="at least 2 labeled normal"):
        StreamPlan.from_config(cfg, (1, 0, 0))


def _fake_rows(plan: StreamPlan, steps) -> dict[str, np.ndarray]:
    rows = plan.rows(np.asarray(steps))
    n = len(rows["step"])
    ids = np.arange(n, dtype=np.uint8)
    return {
        **rows,
        "image": np.broadcast_to(ids[:, None, None, None], (n, 2, 2, 3)).copy(),
        "mask": np.zeros((n, 2, 2), np.uint8),
    }


@pytest.mark.parametrize("cuts", [[], [1, 2, 3, 5, 40], [13, 14, 200]])
def test_steps_reassemble_from_any_block_boundaries(cuts):
    plan = StreamPlan.from_config(_cfg(), SIZES, refit_steps={1})
    rows = _fake_rows(plan, range(4))
    bounds = [0, *[c for c in cuts if c < len(rows["step"])], len(rows["step"])]
    blocks = [{k: v[a:b] for k, v in rows.items()} for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    got = list(assemble_steps(plan, blocks))
    assert len(got) == 4
    per = sum(plan.per_step)
    assert [len(b["kind"]) for b in got] == [per] * 4
    assert "pool" in got[1] and "pool" not in got[0]
    assert len(got[1]["pool"]["sims"]) == 6 and len(got[1]["pool"]["unlabeled"]) == SIZES[1]
    np.testing.assert_array_equal(got[1]["pool"]["normal_idx"], plan.pool_draws(1)[0])
    assert list(got[0]["kind"]) == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 2
    assert list(got[0]["label"]) == [0] * 4 + [1] * 4 + [-1] * 4 + [1] * 2
    # steps come out in order, each with its own rows
    firsts = [int(b["images"][0, 0, 0, 0]) for b in got]
    assert firsts == sorted(firsts)


def test_augmentation_depends_only_on_each_sample():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 255, (6, 8, 8, 3), dtype=np.uint8)
    masks = (rng.random((6, 8, 8)) > 0.5).astype(np.uint8)
    kinds = np.array([KIND_NORMAL, 1, 2, KIND_ANOMALY, 4, 0], np.int8)
    keys = np.arange(24).reshape(6, 4)
    full = augment_samples(images, masks, kinds, keys, seed=3, mode="rot90", jitter=0.1)
    parts = [
        augment_samples(images[s], masks[s], kinds[s], keys[s], 3, "rot90", 0.1) for s in (slice(0, 2), slice(2, 6))
    ]
    np.testing.assert_array_equal(full[0], np.concatenate([p[0] for p in parts]))
    np.testing.assert_array_equal(full[1], np.concatenate([p[1] for p in parts]))
    np.testing.assert_array_equal(full[0][[2, 4]], images[[2, 4]])  # unlabeled and pool rows stay as they are
    # a labeled anomaly's mask turns with its image: find the image's flip / rotation, apply it to the mask
    views = [(k, f) for k in range(4) for f in (False, True)]
    turn = lambda a, k, f: np.rot90(a, k, axes=(0, 1))[:, ::-1] if f else np.rot90(a, k, axes=(0, 1))  # noqa: E731
    (k, f), *_ = [v for v in views if (turn(images[3], *v) == full[0][3]).all()]
    np.testing.assert_array_equal(full[1][3], turn(masks[3], k, f))


def test_streamed_pool_has_a_length_and_no_pixels():
    pool = StreamedPool(5)
    assert len(pool) == 5
    with pytest.raises(TypeError, match="streamed"):
        pool[np.arange(2)]
