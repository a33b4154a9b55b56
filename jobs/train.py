"""Cluster batch job: the main job (``mapl train``'s arguments, plus ``--scratch``; see --help).

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/train.py --config /mnt/shared/screw.yaml --out /mnt/shared/runs/screw \
        --num-workers 2 --gpu --max-failures 3

The data and --out must be on storage every node reads, or URIs (s3://, gs://: copied in and out, see
mapl_ray/pipelines/jobs.py). --max-failures N restarts the workers after a lost worker or node, from the
last checkpoint (train.checkpoint_every). Inside a job ``ray.init()`` joins the cluster the job runs on.
"""

import sys

from mapl_ray.cli import command_parser, run_command
from mapl_ray.pipelines.jobs import run_job

if __name__ == "__main__":
    sys.exit(run_job("train", command_parser, run_command))
