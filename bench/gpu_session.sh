#!/usr/bin/env bash
# One device session for `make bench-gpu` on a machine without this project installed and
# without network: the missing wheels travel in .whl/ (bench/gpu_wheels.sh: diffusers, pydantic,
# ray slimmed, webdataset, ...) and go into a fresh folder on PYTHONPATH; the machine's torch and
# transformers are kept. Ends inside BENCH_TIMEOUT seconds (default 470, under 8 minutes) with
# whatever it measured by then (the JSON report is rewritten after every row).
#   bash bench/gpu_session.sh [OUT]      (OUT: where the <= 5 result files go; default ./gpu-out)
# The device call (no GPU lent to issue 28's session, so not run there):
#   run(command="bash bench/gpu_session.sh $OUT", carry=[".whl"], timeout_s=540)
# Its CPU smoke run here (the same script, tiny models, Ray declaring a GPU; see BENCHMARKS.md):
#   WHEEL_PY=3.11 WHL=/tmp/whl311 bash bench/gpu_wheels.sh
#   PY=.venv/bin/python WHL=/tmp/whl311 BENCH_GPU_ARGS="--device cpu --parts e2e stages --ray --pairs 8 \
#     --images 8 --size 256 --batch-sizes 4" bash bench/gpu_session.sh /tmp/gpu-out
set -uo pipefail
OUT=${OUT:-${1:-gpu-out}}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
PY=${PY:-python3}
WHL=${WHL:-.whl}
SITE=$(mktemp -d /tmp/cf-site.XXXXXX)  # a fresh folder: nothing of an earlier install mixes in
{
  "$PY" -c "import sys, torch, transformers; print(sys.version.split()[0], 'torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA')"
  nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm --format=csv || true
  nproc
} 2>&1 | tee "$OUT/env.txt"
if [ -d "$WHL" ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHL"/*.whl \
    || { echo "wheel install failed"; exit 3; }
  export PYTHONPATH=$SITE:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
"$PY" -c "import diffusers, pydantic, ray, counterfactory.stages.models.inpaint; print('diffusers', diffusers.__version__, 'pydantic', pydantic.__version__, 'ray', ray.__version__, 'from', ray.__file__)" 2>&1 | tee -a "$OUT/env.txt"
timeout "${BENCH_TIMEOUT:-470}" "$PY" bench/bench_gpu.py --work /tmp/cf-bench --out "$OUT/bench_gpu.json" \
  --table "$OUT/bench_gpu.md" ${BENCH_GPU_ARGS:-} \
  2>&1 | grep --line-buffered -v -E "Writing model shards|Loading (weights|pipeline)|it/s\]$" | tee "$OUT/bench_gpu.log"
echo "exit ${PIPESTATUS[0]}" | tee -a "$OUT/bench_gpu.log"
