"""Cluster batch-job entry point for ``mapl prepare`` (same arguments): images -> Parquet shards.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/prepare.py /mnt/data/line_images --out /mnt/shards/line --config /mnt/runs/screw

SRC and --out must be on storage every node reads (decode tasks run on any node and write the shards).
"""

import sys

from mapl_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["prepare", *sys.argv[1:]]))
