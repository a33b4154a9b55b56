#!/usr/bin/env bash
# one device call (not committed): #18 layouts (reduced), #14 pseudo cost new vs base, #13 score end to end
W=.data/w/tf_efficientnet_lite2.safetensors
python3 -m pip install -q --no-index --no-deps --target /tmp/site .hap/*.whl 2>&1 | tail -2
RAY_SERVE_THROUGHPUT_OPTIMIZED=1 timeout 330 bash bench/gpu_run.sh serve_load.py --data .data/mvtec_ad --category screw \
  --textures .data/dtd256 --weights $W --steps 100 --seconds 3 --requests 1500 --layouts two_tier,single \
  --fault-replicas '' --concurrency 1,32 --ingress haproxy 2>&1 | tail -45
echo "== serve done at $SECONDS s"
pkill -f ray:: ; ray stop --force > /dev/null 2>&1
timeout 100 bash bench/gpu_run.sh train_phases.py --data .data/mvtec_ad --category screw --textures .data/dtd256 \
  --weights $W --modes plain,plain 2>&1 | tail -2
echo "== new train_phases done at $SECONDS s"
(cd .base && PYTHONPATH=/tmp/site:$PWD PYTHONPYCACHEPREFIX=/tmp/pycache RAY_AUTH_MODE=disabled timeout 90 python3 \
  bench/train_phases.py --data ../.data/mvtec_ad --category screw --textures ../.data/dtd256 --weights ../$W \
  --modes plain,plain --out $OUT/train_phases_base.json 2>&1 | tail -2)
echo "== base train_phases done at $SECONDS s"
left=$((585 - SECONDS))
[ $left -gt 40 ] && timeout $left bash bench/gpu_run.sh ray_data.py --data-root .data --dataset mvtec_ad --category screw \
  --textures .data/dtd256 --weights $W --parts score --cpus 16 --score-images 24576 --score-batch 256 --score-actors 4 \
  --label gpu_score3 2>&1 | tail -4
echo "== all done at $SECONDS s"
