"""Cost of the patch bank's greedy coreset (:func:`mapl_ray.model.patch_bank.greedy_coreset`) on this CPU: the
matrix-vector product of each greedy step over the candidate rows held row by row (as before) and column by
column (what the CPU path does now), side by side in one run, and whether both choose the same rows.

A run's final phase fills the patch bank from ``KNN_CANDIDATES x model.knn_patches`` candidate patches
(65,536 x 128 after the random projection by default) with ``model.knn_patches`` (16,384) greedy steps; on
the 2-core CI machine that took most of a CPU run's final phase (128 s of it in a 30-step screw run).
The script times ``--steps`` greedy steps of each layout and scales them to ``--size``.

    python bench/coreset_cost.py [--rows 65536] [--dim 272] [--size 16384] [--steps 1024]
        [--out bench/results/coreset_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from mapl_ray.model.patch_bank import PROJECTION_DIM, greedy_coreset  # noqa: E402


def greedy_rowwise(patches: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """The greedy coreset as it was before the CPU layout change (every product over the rows as held)."""
    n, x = patches.shape[0], patches.float()
    if x.shape[1] > PROJECTION_DIM:
        x = x @ (torch.randn(x.shape[1], PROJECTION_DIM, generator=generator) / math.sqrt(PROJECTION_DIM))
    chosen = torch.empty(size, dtype=torch.int64)
    chosen[0] = int(torch.randint(n, (1,), generator=generator))
    x_sq, nearest = x.pow(2).sum(1), torch.full((n,), float("inf"))
    for i in range(size):
        if i:
            chosen[i] = nearest.argmax()
        c = chosen[i]
        torch.minimum(nearest, (x_sq + x_sq[c]).sub_(torch.mv(x, x[c]), alpha=2.0), out=nearest)
    return chosen


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=65536, help="candidate patches")
    p.add_argument("--dim", type=int, default=272, help="patch embedding channels (projected to 128)")
    p.add_argument("--size", type=int, default=16384, help="coreset size the time is scaled to")
    p.add_argument("--steps", type=int, default=1024, help="greedy steps timed per layout")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(HERE / "results" / "coreset_cpu.json"))
    a = p.parse_args()
    gen = torch.Generator().manual_seed(a.seed)
    patches = torch.randn(a.rows, a.dim, generator=gen) * torch.rand(a.rows, 1, generator=gen)
    out = {}
    chosen = {}
    for name, fn in (("rows", greedy_rowwise), ("columns", greedy_coreset)):
        t = time.perf_counter()
        chosen[name] = fn(patches, a.steps, torch.Generator().manual_seed(a.seed))
        s = time.perf_counter() - t
        out[name] = {
            "s": round(s, 3),
            "ms_per_step": round(1000 * s / a.steps, 3),
            "scaled_s": round(s * a.size / a.steps, 1),
        }
    result = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "load_average_1m": round(os.getloadavg()[0], 2),
        },
        "command": "python " + " ".join(sys.argv),
        "settings": {
            "rows": a.rows,
            "dim": a.dim,
            "projection_dim": PROJECTION_DIM,
            "steps_timed": a.steps,
            "scaled_to_size": a.size,
            "dtype": "float32",
            "device": "cpu",
            "seed": a.seed,
        },
        "layouts": out,
        "speedup": round(out["rows"]["s"] / out["columns"]["s"], 2),
        "same_rows_chosen": bool(torch.equal(chosen["rows"], chosen["columns"])),
    }
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
