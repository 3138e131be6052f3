#!/usr/bin/env bash
# The GPU checks and figures for a one-GPU machine with a short lease, in two parts that fit
# one device call together (each step has its own time limit):
#   step: the GPU tests of snapshots, bench/gpu_step.py --defaults over two rounds (configs/gpu.yaml's
#         checks and snapshots against a bare loop, each round's snapshot mid-round; the slowest
#         calls and the step each follows), bench/snapshot_pause.py at 224 and 64 px (the time a
#         mid-run snapshot costs the replica, then its check alone at the same steps);
#   data: the GPU tests of the JPEG path, bench/gpu_data_overlap.py (each stage of the nvjpeg
#         path beside a step, then a bare loop fed by the pipeline against synthetic data),
#         bench/checksum_cost.py (a check's checksums, per tensor against fused);
#   all: both (about 8 minutes on an H200).
# Measured in earlier sessions and left out to fit the lease:
#   python bench/gpu_data.py --rounds 1 --decoders nvjpeg    # distrib trained on JPEGs against synthetic data
#   python -m pytest -m gpu tests/test_gpu.py tests/test_syncbn.py
#   python bench/gpu_step.py --compile --only 224 --rounds 1
#   python bench/syncbn.py --device cuda --gpus-per-worker 0.25 --image-size 224 --batch-size 256 --only time
# Usage, from the project's root: bench/gpu_checks.sh OUT_DIR [step|data|all]
# The log is written as it goes, so a part that runs over still leaves the others' figures.
set -uo pipefail
out="${1:?usage: bench/gpu_checks.sh OUT_DIR [step|data|all]}"
part="${2:-all}"
mkdir -p "$out"
log="$out/log-$part"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore::DeprecationWarning
quiet() { grep -v "Warning\|warn(\|hostname of the client socket" | tee -a "$log"; }
{ nvidia-smi -L; python -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"; } 2>&1 | tee "$log"
if [[ $part == step || $part == all ]]; then
    timeout 30 python -m pytest -q -p no:cacheprovider -m gpu tests/test_checkpoint.py 2>&1 | tail -5 | tee -a "$log"
    timeout 240 python bench/gpu_step.py --defaults --rounds 2 --json "$out/gpu_step.json" 2>&1 | quiet
    for size in "224 --batch 256 --every 200" "64 --batch 32 --every 100"; do  # mid-run snapshots
        for only in "" --checks-only; do  # each snapshot comes with a check: the checks' own share
            timeout 70 python bench/snapshot_pause.py --device cuda --steps-per-call 10 --window 4 $only \
                --image-size $size 2>&1 | quiet
        done
    done
fi
if [[ $part == data || $part == all ]]; then
    timeout 60 python -m pytest -q -p no:cacheprovider -m gpu -k nvjpeg tests/test_gpu.py tests/test_jpeg.py 2>&1 \
        | tail -5 | tee -a "$log"
    timeout 150 python bench/gpu_data_overlap.py --rounds 2 2>&1 | quiet
    timeout 40 python bench/checksum_cost.py --device cuda 2>&1 | quiet
fi
