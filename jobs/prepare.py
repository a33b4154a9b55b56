"""Cluster batch job: ``mapl prepare`` (images -> Parquet shards; its arguments plus ``--scratch``).

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/prepare.py /mnt/shared/data/line_images --out /mnt/shared/shards/line \
        --config /mnt/shared/runs/screw

SRC and --out must be on storage every node reads (decode tasks run on any node and write the shards), or
URIs (copied in and out, see mapl_ray/pipelines/jobs.py). --config: a config YAML or a run folder.
"""

import sys

from mapl_ray.cli import command_parser, run_command
from mapl_ray.pipelines.jobs import run_job

if __name__ == "__main__":
    sys.exit(run_job("prepare", command_parser, run_command))
