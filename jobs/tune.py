"""Cluster batch job: a Ray Tune search (``mapl tune``'s arguments, plus ``--scratch``; see --help).

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/tune.py --data /mnt/shared/mvtec_ad --category screw --textures /mnt/shared/dtd/images \
        --num-samples 64 --gpus-per-trial 0.25 --cpus-per-trial 4 --out /mnt/shared/tune/screw

The data and --out must be on storage every node reads, or URIs (copied in and out, see
mapl_ray/pipelines/jobs.py); the trials run on any node, fractional GPUs let several share one. Resume an
interrupted search with ``--resume --out /mnt/shared/tune/screw``.
"""

import sys

from mapl_ray.cli import command_parser, run_command
from mapl_ray.pipelines.jobs import run_job

if __name__ == "__main__":
    sys.exit(run_job("tune", command_parser, run_command))
