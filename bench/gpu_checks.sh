#!/usr/bin/env bash
# The GPU checks and figures in one go, for a one-GPU machine with a short lease:
# the GPU tests of what changed, then bench/gpu_data.py (JPEG input pipeline),
# bench/gpu_data_overlap.py (what its stages take from a step beside them) and
# bench/gpu_step.py --defaults (configs/gpu.yaml's checks and snapshots against a bare loop,
# with the slowest calls and the step each follows). About 8.5 minutes with the start.
# bench/syncbn.py on a shared GPU (measured once: 2.15) is left out to fit the lease:
#   python bench/syncbn.py --device cuda --gpus-per-worker 0.25 --image-size 224 --batch-size 256 --only time
# Usage, from the project's root: bench/gpu_checks.sh OUT_DIR [pytest -k expression]
# Each part has its own time limit, and the log is written as it goes, so a part that
# runs over still leaves the others' figures.
set -uo pipefail
out="${1:?usage: bench/gpu_checks.sh OUT_DIR [pytest -k expression]}"
select="${2:-share or nvjpeg or snapshot or nccl or resume}"
mkdir -p "$out"
log="$out/log"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore::DeprecationWarning
{ nvidia-smi -L; python -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"; } 2>&1 | tee "$log"
timeout 150 python -m pytest -q -p no:cacheprovider -m gpu -k "$select" \
    tests/test_gpu.py tests/test_jpeg.py tests/test_checkpoint.py tests/test_syncbn.py 2>&1 | tail -40 | tee -a "$log"
timeout 160 python bench/gpu_data.py --rounds 2 --json "$out/gpu_data.json" 2>&1 | grep -v "Warning\|warn(" | tee -a "$log"
timeout 60 python bench/gpu_data_overlap.py 2>&1 | grep -v "Warning\|warn(" | tee -a "$log"
timeout 130 python bench/gpu_step.py --defaults --rounds 1 --json "$out/gpu_step.json" 2>&1 | grep -v "Warning\|warn(" | tee -a "$log"
