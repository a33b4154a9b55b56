"""Cluster batch-job entry point for the main job (same flags as ``mapl train``).

Submit to a Ray cluster (the data root and --out must be on storage every node can read):

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/train.py --data /mnt/data/mvtec_ad --category screw \
        --textures /mnt/data/dtd/images --out /mnt/runs/screw --num-workers 2 --gpu

Inside a job, ``ray.init()`` joins the cluster the job runs on (``RAY_ADDRESS`` is set by Ray).
"""

import sys

from mapl_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
