"""Cluster batch job: ``mapl score`` (a run's scores for shards or a folder; its arguments plus ``--scratch``
and ``--config``, a YAML of these options by name, e.g. ``batch_size: 512`` and ``maps: true``).

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/score.py /mnt/shared/runs/screw /mnt/shared/shards/line --out /mnt/shared/scores/line --maps

RUN, SRC and --out must be on storage every node reads, or URIs (copied in and out, see
mapl_ray/pipelines/jobs.py); one scoring actor per GPU by default. A rerun with the same arguments skips
the output files already written.
"""

import sys

from mapl_ray.cli import command_parser, run_command
from mapl_ray.pipelines.jobs import run_job

if __name__ == "__main__":
    sys.exit(run_job("score", command_parser, run_command))
