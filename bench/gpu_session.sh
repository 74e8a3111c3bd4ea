#!/usr/bin/env bash
# One device session for `make bench-gpu` on a machine without this project installed and
# without network: the missing wheels travel in .whl/ (diffusers, pydantic, av, webdataset, ...)
# and go into a fresh folder on PYTHONPATH; the machine's torch and transformers are kept.
#   bash bench/gpu_session.sh [OUT]      (OUT: where the <= 5 result files go; default ./gpu-out)
set -uo pipefail
OUT=${OUT:-${1:-gpu-out}}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
{
  python3 -c "import sys, torch, transformers; print(sys.version.split()[0], 'torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
  nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm --format=csv
  nproc
} 2>&1 | tee "$OUT/env.txt"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/cf-site .whl/*.whl \
    || { echo "wheel install failed"; exit 3; }
  export PYTHONPATH=/tmp/cf-site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python3 -c "import diffusers, pydantic, counterfactory.stages.models.inpaint; print('diffusers', diffusers.__version__, 'pydantic', pydantic.__version__)" 2>&1 | tee -a "$OUT/env.txt"
python3 bench/bench_gpu.py --work /tmp/cf-bench --out "$OUT/bench_gpu.json" --table "$OUT/bench_gpu.md" ${BENCH_GPU_ARGS:-} \
  2>&1 | grep -v -E "Writing model shards|Loading (weights|pipeline)|it/s\]$" | tee "$OUT/bench_gpu.log"
