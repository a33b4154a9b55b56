"""Cluster batch-job entry point for a Ray Tune search (same flags as ``mapl tune``).

Submit to a Ray cluster (the data root and --out must be on storage every node can read; the trials
run on any node, fractional GPUs let several share one):

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/tune.py --data /mnt/data/mvtec_ad --category screw --textures /mnt/data/dtd/images \
        --num-samples 64 --gpus-per-trial 0.25 --cpus-per-trial 4 --out /mnt/tune/screw

Resume an interrupted search with ``--resume --out /mnt/tune/screw``. Inside a job, ``ray.init()`` joins
the cluster the job runs on (``RAY_ADDRESS`` is set by Ray).
"""

import sys

from mapl_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
