#!/usr/bin/env bash
# Submit a distrib training run to any Ray cluster with `ray job submit`, wait for it and
# exit with its status. The repository is uploaded as the job's working directory, so the
# driver and every replica import this copy of distrib; the cluster's Python must have
# torch, torchvision and pyyaml (the image in deploy/Dockerfile does; so does cluster.yaml's setup).
#
#   RAY_ADDRESS=http://127.0.0.1:8265 deploy/submit.sh --config configs/local.yaml --set run_dir=$PWD/runs/job-1
#   deploy/submit.sh --address http://localhost:8265 --config configs/gpu.yaml --set run_dir=/home/ray/runs/exp1
#
# All arguments but --address go to `distrib train`; start them with `scale` to run a
# scaling sweep instead (`deploy/submit.sh scale --config configs/sweep-gpu.yaml`; give a
# sweep an absolute out_dir, as that file does). Metrics and checkpoints are written by the
# driver, on the head node, and the job's working directory is a temporary copy that Ray
# may delete: so unless you pass run_dir (or --resume) or the config's run_dir is absolute
# or a URI, `train` gets --set run_dir=$DISTRIB_JOB_RUNS/{time} (default: /home/ray/runs,
# the home of Ray's images). Fetch the results afterwards with
#   ray rsync-down cluster.yaml /home/ray/runs/ ./runs/   # trailing slashes: no runs/runs
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

# An absolute run directory for `train` unless one is given (see above).
runs="${DISTRIB_JOB_RUNS:-/home/ray/runs}"
chosen=""
config=""
previous=""
for arg in "$@"; do
  case "$arg" in
    run_dir=* | --set=run_dir=* | --resume | --resume=*) chosen=yes ;;
    --config=*) config="${arg#--config=}" ;;
  esac
  if [ "$previous" = "--config" ]; then config="$arg"; fi
  previous="$arg"
done
if [ "$command" = train ] && [ -z "$chosen" ] && [ -n "$config" ]; then
  # The config path is read in the job's working directory (this repository), or as given.
  file="$repo/$config"
  [ -f "$file" ] || file="$config"
  if [ ! -f "$file" ]; then
    echo "submit.sh: cannot read $config here; its run_dir (if any) is used as it is" >&2
    chosen=yes
  else
    value="$(sed -n 's/^run_dir:[[:space:]]*//p' "$file" | head -n 1 | sed 's/[[:space:]]#.*//; s/^["'\'']//; s/["'\''][[:space:]]*$//; s/[[:space:]]*$//')"
    case "$value" in
      /* | *://*) chosen=yes ;;
    esac
  fi
fi
extra=()
if [ "$command" = train ] && [ -z "$chosen" ]; then
  extra=(--set "run_dir=$runs/{time}")
  echo "submit.sh: run_dir=$runs/{time} on the head node (pass --set run_dir=... to choose)" >&2
fi

# The upload skips what .gitignore lists (the venv, runs); these are named again to be sure.
# `ray job stop` sends the driver SIGTERM, then SIGKILL after RAY_JOB_STOP_WAIT_TIME_S (Ray's
# default: 3 s, too short for a checkpoint); 60 s covers the driver's stop_grace_s (20 s).
# deploy/kuberay-rayjob.yaml sets the same in its runtimeEnvYAML.
exec ray job submit --address "$address" --working-dir "$repo" \
  --runtime-env-json '{"excludes": [".venv", "runs", ".device-wheels", ".git"],
                       "env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": "60"}}' \
  -- python -m distrib "$command" "$@" ${extra[@]+"${extra[@]}"}
