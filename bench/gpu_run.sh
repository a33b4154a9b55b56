#!/usr/bin/env bash
# One device call on the GPU machine: install the carried Python packages, then run a bench script against
# the carried data, its JSON written into $OUT. Usage, as the device command:
#   bash bench/gpu_run.sh semi.py --categories screw,metal_plate [more args]
#   bash bench/gpu_run.sh accuracy.py --grid bench/grids/accuracy_gpu.yaml --gpus-per-trial 0.2 --cpus-per-trial 3 \
#       --deadline-s 450 --bundle $OUT/docs.tar
#   bash bench/gpu_run.sh serve_load.py --data .data/mvtec_ad --textures .data/dtd256 --weights .data/w/... [...]
# carry: .pack (bench/gpu_payload.py --pack .pack: site.tar.xz, data.tar.xz, w.tar.xz), or .whl_gpu and .pack
# without a site tarball, or .data/dtd256, .data/w and the .data/<dataset> folders the bench reads.
# PACK=DIR reads another pack folder (e.g. PACK=.pack3 for a second payload carried beside the first).
set -o pipefail
pack=${PACK:-.pack}
# $pack/*.tar.xz but site.tar.xz: bench/gpu_payload.py's .data folders packed to fit one call's 64 MiB
#   (tar cf - -C .data mvtec_ad mpdd magnetic_tile dtd256 | xz -9 > .pack/data.tar.xz; likewise w.tar.xz)
# (both steps are skipped when an earlier bench of the same call did them)
# (a warm machine keeps .data between calls: unpack again when the pack differs, by names and sizes)
sig=$(ls -l "$pack"/*.tar.xz 2>/dev/null | awk '{print $5, $9}')
if [ ! -f .data/.unpacked ] || [ "$(cat .data/.unpacked)" != "$sig" ]; then
  mkdir -p .data
  for f in "$pack"/*.tar.xz; do
    [ "$(basename "$f")" = site.tar.xz ] && continue
    [ -f "$f" ] && { tar xJf "$f" -C .data || exit 1; }
  done
  echo "$sig" > .data/.unpacked
fi
# $pack/site.tar.xz: Ray and the peer (anomalib) already installed for Python 3.12; else the .whl_gpu wheels
if [ ! -d /tmp/site/ray ]; then
  if [ -f "$pack/site.tar.xz" ]; then
    mkdir -p /tmp/site && tar xJf "$pack/site.tar.xz" -C /tmp/site || exit 1
  else
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl_gpu/*.whl || exit 1
  fi
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 RAY_AUTH_MODE=disabled RAY_DEDUP_LOGS=1 TQDM_DISABLE=1
# bytecode as a pip install leaves it: the carried packages come without it and the machine's torch may not be
# writable, so every fresh process compiled thousands of modules (4.8 s of a cold run's profile, 2026-12-05)
export PYTHONPYCACHEPREFIX=/tmp/pycache
mkdir -p /tmp/pycache
if [ ! -f /tmp/pycache/.done ]; then
  python3 -m compileall -q -j 0 /tmp/site "$(python3 -c 'import os, torch; print(os.path.dirname(torch.__file__))')" \
    > /dev/null 2>&1
  touch /tmp/pycache/.done
fi
bench=$1
shift
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
# GPU utilisation sampled every second while the bench runs
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader -l 1 > "$OUT/gpu_util_${bench%.py}.csv" &
smi=$!
# the grid benches (bench/common.py's or mapl benchmark's arguments) get the carried data here; others take theirs in "$@"
common=()
grep -q -E "add_grid_arguments|mapl_ray.cli import main" "bench/$bench" &&
  common=(--data-root .data --textures .data/dtd256 --weights .data/w/tf_efficientnet_lite2.safetensors)
python3 "bench/$bench" "${common[@]}" --out "$OUT/${bench%.py}.json" "$@" 2>&1 | grep -v -E "WARNING|^\s*$" | tail -n 150
rc=$?
kill $smi
exit $rc
