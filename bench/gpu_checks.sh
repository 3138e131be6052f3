#!/usr/bin/env bash
# The GPU checks and figures for a one-GPU machine with a short lease, in two parts that each
# fit one device call (3-5 minutes each; run them back to back on the warm machine):
#   data: the GPU tests of the JPEG path, bench/gpu_data.py (nvjpeg against synthetic data), then
#         bench/gpu_data_overlap.py (each stage beside a step, the compiled canvas among them);
#   step: the GPU tests of snapshots, bench/gpu_step.py --defaults over two rounds (configs/gpu.yaml's
#         checks and snapshots against a bare loop; the slowest calls and the step each follows,
#         so the first snapshot and a later one), bench/snapshot_pause.py at 64 and 224 px (the
#         time a mid-run snapshot costs), then --compile at 224 px.
# Measured in earlier sessions and left out to fit the lease:
#   python -m pytest -m gpu tests/test_gpu.py tests/test_syncbn.py
#   python bench/gpu_data.py --decoders torchvision,pil       # the CPU decoders, plain DataLoader
#   python bench/syncbn.py --device cuda --gpus-per-worker 0.25 --image-size 224 --batch-size 256 --only time
# Usage, from the project's root: bench/gpu_checks.sh OUT_DIR [data|step|all]
# Each part has its own time limit, and the log is written as it goes, so a part that
# runs over still leaves the others' figures.
set -uo pipefail
out="${1:?usage: bench/gpu_checks.sh OUT_DIR [data|step|all]}"
part="${2:-all}"
mkdir -p "$out"
log="$out/log-$part"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore::DeprecationWarning
quiet() { grep -v "Warning\|warn(" | tee -a "$log"; }
{ nvidia-smi -L; python -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"; } 2>&1 | tee "$log"
if [[ $part == data || $part == all ]]; then
    timeout 120 python -m pytest -q -p no:cacheprovider -m gpu -k nvjpeg tests/test_gpu.py tests/test_jpeg.py 2>&1 \
        | tail -30 | tee -a "$log"
    timeout 200 python bench/gpu_data.py --rounds 2 --decoders nvjpeg --json "$out/gpu_data.json" 2>&1 | quiet
    timeout 120 python bench/gpu_data_overlap.py 2>&1 | quiet   # with the compiled canvas, a candidate
fi
if [[ $part == step || $part == all ]]; then
    timeout 60 python -m pytest -q -p no:cacheprovider -m gpu tests/test_checkpoint.py 2>&1 | tail -20 | tee -a "$log"
    timeout 250 python bench/gpu_step.py --defaults --rounds 2 --json "$out/gpu_step.json" 2>&1 | quiet
    for size in "64 --batch 32 --every 100" "224 --batch 256 --every 200"; do  # mid-run snapshots
        timeout 90 python bench/snapshot_pause.py --device cuda --steps-per-call 10 --window 4 --image-size $size \
            2>&1 | quiet
    done
    timeout 180 python bench/gpu_step.py --compile --only 224 --rounds 1 --json "$out/gpu_compile.json" 2>&1 | quiet
fi
