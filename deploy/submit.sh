#!/usr/bin/env bash
# Submit a distrib training run to any Ray cluster with `ray job submit`, wait for it and
# exit with its status. The repository is uploaded as the job's working directory, so the
# driver and every replica import this copy of distrib; the cluster's Python must have
# torch, torchvision and pyyaml (the image in deploy/Dockerfile does; so does cluster.yaml's setup).
#
#   RAY_ADDRESS=http://127.0.0.1:8265 deploy/submit.sh --config configs/local.yaml --set steps=20
#   deploy/submit.sh --address http://localhost:8265 --config configs/gpu.yaml --set run_dir=/home/ray/runs/exp1
#
# All arguments but --address go to `distrib train`; start them with `scale` to run a
# scaling sweep instead (`deploy/submit.sh scale --config configs/sweep-gpu.yaml`). Metrics and checkpoints are written by
# the driver, on the head node: give run_dir an absolute path there and fetch it afterwards
# (`ray rsync-down cluster.yaml /home/ray/runs ./runs`).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
address="${RAY_ADDRESS:-}"
if [ "${1:-}" = "--address" ]; then
  address="$2"
  shift 2
fi
if [ -z "$address" ]; then
  echo "submit.sh: no cluster: set RAY_ADDRESS or pass --address http://HEAD:8265" >&2
  exit 2
fi
command=train
if [ "${1:-}" = "scale" ] || [ "${1:-}" = "train" ]; then
  command="$1"
  shift
fi
# The upload skips what .gitignore lists (the venv, runs); these are named again to be sure.
# `ray job stop` sends the driver SIGTERM, then SIGKILL after RAY_JOB_STOP_WAIT_TIME_S (Ray's
# default: 3 s, too short for a checkpoint); 60 s covers the driver's stop_grace_s (20 s).
exec ray job submit --address "$address" --working-dir "$repo" \
  --runtime-env-json '{"excludes": [".venv", "runs", ".device-wheels", ".git"],
                       "env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": "60"}}' \
  -- python -m distrib "$command" "$@"
