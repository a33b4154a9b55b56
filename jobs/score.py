"""Cluster batch-job entry point for ``mapl score`` (same arguments): a run's scores for shards or a folder.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/score.py /mnt/runs/screw /mnt/shards/line --out /mnt/scores/line --maps

RUN, SRC and --out must be on storage every node reads; one scoring actor per GPU by default. A rerun
with the same arguments skips the output files already written.
"""

import sys

from mapl_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["score", *sys.argv[1:]]))
