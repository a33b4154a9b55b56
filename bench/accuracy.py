"""Detection quality beside a peer in the same run: the grid of issue 15 (`mapl benchmark`'s bench entry).

Runs a grid file (bench/grids/accuracy_gpu.yaml: MAPL defaults, MemSeg, anomalib's PatchCore, BHAD-style
corruption, labeled anomalies, ablations, over categories and seeds 101-103) as Ray tasks with fractional GPUs,
and writes bench/results/accuracy.json, docs/RESULTS.md and docs/img/accuracy/. On the GPU machine:

    bash bench/gpu_run.sh accuracy.py --grid bench/grids/accuracy_gpu.yaml --gpus-per-trial 0.2 \\
        --cpus-per-trial 3 --deadline-s 450 --bundle $OUT/docs.tar

then, here: ``tar xf docs.tar`` in the repository root (or ``python bench/accuracy.py --merge accuracy.json``
to fold a results JSON into bench/results/accuracy.json and rewrite the report). Reduced CPU version:

    python bench/accuracy.py --grid bench/grids/accuracy_cpu.yaml --out bench/results/accuracy_cpu.json \\
        --results-md /tmp/RESULTS_cpu.md --img-dir /tmp/accuracy_cpu_img --cpus-per-trial 2

Options: those of ``mapl benchmark`` (``--data-root`` is ``--data``).
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from mapl_ray.cli import main  # noqa: E402

# the repository's own results and report (`mapl benchmark` defaults to a folder of the current directory)
OUTPUTS = {
    "--out": HERE / "results" / "accuracy.json",
    "--results-md": HERE.parent / "docs" / "RESULTS.md",
    "--img-dir": HERE.parent / "docs" / "img" / "accuracy",
}

if __name__ == "__main__":
    args = sys.argv[1:]
    args += [str(a) for flag, path in OUTPUTS.items() if flag not in args for a in (flag, path)]
    if "--data" not in args and "--data-root" not in args and "--merge" not in args:
        args += ["--data", str(HERE.parent.parent / "shared" / "data")]
    if "--textures" not in args and "--merge" not in args:
        args += ["--textures", str(HERE.parent.parent / "shared" / "data" / "dtd_subset" / "images")]
    sys.exit(main(["benchmark", *args]))
