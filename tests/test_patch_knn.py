"""Patch nearest-neighbour statistics of the pseudo-labeler (pseudo.features=knn): exact distances, no image
matched to itself, and real defects ranked above real normals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import DATA_ROOT, needs_data

from mapl_ray.pseudo.patch_knn import (
    STAT_NAMES,
    image_statistics,
    leave_fold_out_distances,
    nearest_distances,
    patch_embeddings,
    statistics_of,
)


def test_nearest_distances_equal_brute_force():
    g = torch.Generator().manual_seed(0)
    q, ref = torch.randn(5000, 12, generator=g), torch.randn(700, 12, generator=g)  # more than one query block
    expected = torch.cdist(q.double(), ref.double()).amin(1).float()
    torch.testing.assert_close(nearest_distances(q, ref), expected, atol=2e-4, rtol=1e-4)


def test_leave_fold_out_scores_each_image_against_the_other_folds_only():
    g = torch.Generator().manual_seed(3)
    patches = torch.randn(8, 10, 4, generator=g)
    patches[1] = patches[0]  # an exact duplicate: distance 0 only if it sits in another fold
    dist, ref = leave_fold_out_distances(patches, 2, reference_size=10_000, generator=torch.Generator().manual_seed(7))
    fold = torch.randperm(8, generator=torch.Generator().manual_seed(7)) % 2
    for i in range(8):
        others = patches[fold != fold[i]].reshape(-1, 4)
        expected = torch.cdist(patches[i].double(), others.double()).amin(1).float()
        torch.testing.assert_close(dist[i], expected, atol=3e-3, rtol=1e-3)  # sqrt of a GEMM-form 0
    same_fold = bool(fold[0] == fold[1])
    assert (dist[0].max() > 0.1) == same_fold and (dist[1].max() > 0.1) == same_fold
    assert ref.shape == (80, 4)  # every patch when the reference size exceeds them


def test_refined_reference_leaves_the_highest_scoring_pool_images_out():
    """pseudo.knn_refine (docs/results.md rule 6): a defect hidden by a like one in another pool image scores as
    normal in one pass; once the image scoring highest in that pass (which also has a defect of its own) is left
    out of the references, the hidden defect stands out. The labeled normals (the first ``keep_first``) are
    never left out, however they score."""
    g = torch.Generator().manual_seed(0)
    n, p, c = 12, 16, 6
    patches = 0.05 * torch.randn(n, p, c, generator=g)
    patches[0, 0] = 9.0  # a labeled normal with an odd patch: the highest score, kept all the same
    patches[5, 3], patches[5, 4] = 4.0, -4.0  # pool image 5: two defects, one of them unique
    patches[7, 3] = 4.0  # pool image 7: the like of image 5's first one
    gen = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    one_pass, ref1 = leave_fold_out_distances(patches, n, 10_000, gen())  # leave-one-out: 5 and 7 see each other
    refined, ref2 = leave_fold_out_distances(patches, n, 10_000, gen(), refine=1 / (n - 2), keep_first=2)
    assert float(one_pass[7, 3]) < 0.5 < 5.0 < float(one_pass[5, 4])  # 7 hidden by 5, whose other defect shows
    assert float(refined[7, 3]) > 5.0  # image 5 left out of every reference: nothing like it is left
    assert float(refined[[1, 2, 3]].max()) < 0.5  # plain images stay close to the others
    assert ref1.shape == (n * p, c) and ref2.shape == ((n - 1) * p, c)  # image 5 left out of it too
    assert bool((ref2 == 9.0).all(1).any()) and not bool((ref2 == -4.0).all(1).any())
    # the second pass keeps the first's folds, so its references only lose rows: no patch comes out closer
    patches[9, 2] = -4.0  # twins in pool images 9 and 10, whichever folds they fall in
    patches[10, 2] = -4.0
    for seed in range(6):
        g1, g2 = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        first = leave_fold_out_distances(patches, 2, 10_000, g1)[0]
        second = leave_fold_out_distances(patches, 2, 10_000, g2, refine=0.3, keep_first=2)[0]
        assert bool((second >= first - 3e-3).all())
    # 0 is the one-pass computation, draw for draw
    torch.testing.assert_close(leave_fold_out_distances(patches, 3, 50, gen(), refine=0.0)[0],
                               leave_fold_out_distances(patches, 3, 50, gen())[0])  # fmt: skip
    with pytest.raises(ValueError, match="refine"):
        leave_fold_out_distances(patches, 2, 50, gen(), refine=1.0)


def test_references_from_labeled_normals_leave_no_pool_image_to_hide_a_like_defect():
    """pseudo.knn_reference_from (docs/results.md rule 7): a defect repeated in three pool images hides itself
    in a leave-one-out reference over all images; a reference of the labeled normals (first ``keep_first``),
    alone or with the pool half closest to them, has nothing like it."""
    g = torch.Generator().manual_seed(0)
    n, p, c, labeled = 14, 16, 6, 4
    patches = 0.05 * torch.randn(n, p, c, generator=g)
    for i in (6, 8, 11):
        patches[i, 3] = 4.0  # the same defect in three pool images
    gen = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    hidden, _ = leave_fold_out_distances(patches, n, 10_000, gen(), keep_first=labeled)
    alone, ref = leave_fold_out_distances(patches, n, 10_000, gen(), keep_first=labeled, reference_from="labeled")
    closest, ref2 = leave_fold_out_distances(
        patches, 2, 10_000, gen(), keep_first=labeled, reference_from="labeled_closest"
    )
    assert float(hidden[[6, 8, 11], 3].max()) < 0.5
    assert float(alone[[6, 8, 11], 3].min()) > 5.0 and float(closest[[6, 8, 11], 3].min()) > 5.0
    assert ref.shape == (labeled * p, c) and ref2.shape == ((labeled + (n - labeled) // 2) * p, c)
    assert not bool((ref2 == 4.0).all(1).any())  # the defect images are not among the closest half
    for i in range(labeled):  # a labeled normal is scored against the other labeled normals only
        others = torch.cat([patches[j] for j in range(labeled) if j != i])
        expected = torch.cdist(patches[i].double(), others.double()).amin(1).float()
        torch.testing.assert_close(alone[i], expected, atol=3e-3, rtol=1e-3)
    # fewer than 2 labeled normals: the references come from all images, as by default
    torch.testing.assert_close(leave_fold_out_distances(patches, 3, 50, gen(), keep_first=1, reference_from="labeled")[0],
                               leave_fold_out_distances(patches, 3, 50, gen(), keep_first=1)[0])  # fmt: skip
    with pytest.raises(ValueError, match="reference_from"):
        leave_fold_out_distances(patches, 2, 50, gen(), reference_from="pool")


def test_matched_labeled_reference_scores_every_image_against_as_many_labeled_normals():
    """pseudo.knn_reference_from=labeled_matched (docs/results.md rule 8): each labeled normal meets the others
    (leave-one-out) and each pool image all labeled normals but one, dealt evenly; a pool image copying
    labeled normal j is at distance 0 unless j is the one it does not meet."""
    g = torch.Generator().manual_seed(0)
    labeled, copies, p, c = 3, 30, 8, 5
    normals = torch.randn(labeled, p, c, generator=g)
    patches = torch.cat([normals, normals[0:1].repeat(copies, 1, 1)])  # the pool: copies of labeled normal 0
    dist, ref = leave_fold_out_distances(
        patches, 2, 10_000, torch.Generator().manual_seed(1), keep_first=labeled, reference_from="labeled_matched"
    )
    pool_far = dist[labeled:].amax(1) > 0.1
    assert int(pool_far.sum()) == copies // labeled  # exactly the copies dealt to normal 0's own fold
    for i in range(labeled):  # a labeled normal is scored against the other labeled normals only
        others = torch.cat([normals[j] for j in range(labeled) if j != i])
        expected = torch.cdist(normals[i].double(), others.double()).amin(1).float()
        torch.testing.assert_close(dist[i], expected, atol=3e-3, rtol=1e-3)
    assert ref.shape == ((labeled - 1) * p, c)  # images outside the set meet labeled - 1 normals too


def test_leave_fold_out_refuses_too_few_images():
    with pytest.raises(ValueError, match="2 <= folds <= images"):
        leave_fold_out_distances(torch.zeros(1, 4, 3), 2, 10, torch.Generator())


def test_patch_embeddings_shape_and_statistics_order():
    levels = [torch.rand(2, c, 64 // s, 64 // s) for c, s in ((4, 2), (6, 4), (8, 8), (10, 16))]
    emb = patch_embeddings(levels)
    assert emb.shape == (2, 64, 18) and emb.dtype == torch.float32
    stats = image_statistics(torch.tensor([[0.0, 1.0, 3.0, 2.0]]))
    torch.testing.assert_close(stats, torch.tensor([[3.0, 3.0, 1.5]]))


def test_statistics_of_ratios_do_not_move_with_the_images_scale():
    """The ``*_over_median`` statistics are those of the image's own median patch distance: an image whose
    patches are all twice as far gets the same ratios (its scale-dependent statistics double)."""
    d = torch.tensor([[1.0, 2.0, 2.0, 2.0, 8.0], [2.0, 4.0, 4.0, 4.0, 16.0]])
    names = ("max", "median", "max_over_median", "top1pct_over_median")
    got = statistics_of(d, names)
    torch.testing.assert_close(got[0], torch.tensor([8.0, 2.0, 4.0, 4.0]))
    torch.testing.assert_close(got[1, 2:], got[0, 2:])
    torch.testing.assert_close(got[1, :2], 2 * got[0, :2])
    assert torch.equal(statistics_of(d, STAT_NAMES), image_statistics(d))
    with pytest.raises(ValueError, match="unknown patch-distance statistic.*'maximum'"):
        statistics_of(d, ("maximum",))


@needs_data
def test_knn_statistics_rank_real_pool_defects_above_normals():
    """metal_plate (MPDD), ImageNet Lite0 from its wheel, 128 px: 20 normals and 4 defective images in one pool;
    the leave-fold-out max patch distance ranks the defective ones high (image AUROC)."""
    from sklearn.metrics import roc_auc_score

    from mapl_ray.data.io import load_image
    from mapl_ray.model.encoder import build_encoder

    root = DATA_ROOT / "mpdd" / "metal_plate"
    if not root.is_dir():
        pytest.skip(f"no metal_plate at {root}")
    good = sorted((root / "train" / "good").glob("*.png"))[:20]
    bad = sorted((root / "test" / "defect").glob("*.png"))[:4]
    images = np.stack([load_image(p, 128) for p in good + bad])
    enc = build_encoder("tf_efficientnet_lite0").eval()
    with torch.no_grad():
        patches = patch_embeddings(enc(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255))
    dist, _ = leave_fold_out_distances(patches, 2, 4096, torch.Generator().manual_seed(0))
    score = image_statistics(dist)[:, 0].numpy()
    assert roc_auc_score([0] * len(good) + [1] * len(bad), score) >= 0.85


def test_knn_refine_and_reference_source_outside_their_values_are_refused_naming_the_field():
    from mapl_ray.config import Config, ConfigError

    assert Config().override({"pseudo.knn_refine": 0.2}).validate().pseudo.knn_refine == 0.2
    with pytest.raises(
        ConfigError, match="pseudo.knn_reference_from = 'pool'.*expected all, labeled, labeled_closest, labeled_matched"
    ):
        Config().override({"pseudo.knn_reference_from": "pool"}).validate()
    for bad in (1.0, -0.1):
        with pytest.raises(ConfigError, match=r"pseudo.knn_refine = .* expected a share in \[0, 1\)"):
            Config().override({"pseudo.knn_refine": bad}).validate()
