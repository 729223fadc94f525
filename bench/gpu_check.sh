#!/usr/bin/env bash
# The GPU check in one go (under 8 minutes): install what the GPU machine lacks from a folder of wheels, run the
# GPU training benchmark and the CUDA tests (training through desctune.training.loop.train_adapter, and one rank under
# torchrun), logs into $OUT.
#
#   make gpu-wheels                      # here, once: cp312 wheels into .whl/ (pydantic & co., bitsandbytes, trl)
#   bash bench/gpu_check.sh .whl         # there; or DESCTUNE_WHEELS=DIR bash bench/gpu_check.sh
#
# Expects Python 3.12 with torch (CUDA), transformers, peft, accelerate, pandas, pyarrow, numpy, pyyaml, filelock,
# safetensors, tokenizers and pytest; the wheels are installed into a scratch folder put first on PYTHONPATH.
set -uo pipefail
cd "$(dirname "$0")/.."
wheels="${1:-${DESCTUNE_WHEELS:-.whl}}"
logs="${OUT:-/tmp/desctune-gpu-check}"
site="${DESCTUNE_SITE:-/tmp/desctune-site}"
mkdir -p "$logs"

if compgen -G "$wheels/*.whl" >/dev/null; then
    python3 -m pip install --quiet --disable-pip-version-check --no-index --no-deps --target "$site" "$wheels"/*.whl \
        2>&1 | tee "$logs/pip.log" || exit 1
else
    echo "no wheels in $wheels: using what is installed" | tee "$logs/pip.log"
fi
export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv
    python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'transformers', transformers.__version__, 'peft', peft.__version__, 'device', torch.cuda.get_device_name())"
    python3 -c "import bitsandbytes; print('bitsandbytes', bitsandbytes.__version__)"
    python3 -c "import pyarrow, trl, datasets; print('pyarrow', pyarrow.__version__, 'trl', trl.__version__, 'datasets', datasets.__version__)"
} 2>&1 | tee "$logs/env.txt"

status=0
# The benchmark first: its figures are what a short lease is for.
SECONDS=0
# DESCTUNE_BENCH_ARGS: extra arguments (the test suite's CPU smoke passes tiny shapes and --device cpu).
timeout 220 python3 -m bench.train_gpu ${DESCTUNE_BENCH_ARGS:-} 2>&1 | tee "$logs/bench-train-gpu.log" || status=1
echo "benchmark: ${SECONDS} s" | tee -a "$logs/bench-train-gpu.log"
SECONDS=0
timeout 220 python3 -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py 2>&1 | tee "$logs/pytest-cuda.log" \
    || status=1
echo "CUDA tests: ${SECONDS} s" | tee -a "$logs/pytest-cuda.log"
exit "$status"
