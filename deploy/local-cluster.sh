#!/usr/bin/env bash
# A multi-node Ray cluster on this one machine, for trying the cluster path without a cloud:
# a head node with no CPUs (it runs the driver and the job server) plus worker nodes with
# their own resources, all on the loopback interface.
#
#   deploy/local-cluster.sh start [NUM_NODES] [CPUS_PER_NODE]   # default: 2 nodes x 1 CPU
#   RAY_AUTH_MODE=token RAY_ADDRESS=http://127.0.0.1:8265 DISTRIB_JOB_RUNS=$PWD/runs deploy/submit.sh --set steps=20
#   deploy/local-cluster.sh stop      # `ray stop --force`: stops EVERY Ray on this machine
#
# `stop` (and `start` when a node fails to start, to undo what it started) runs `ray stop
# --force`, which kills every Ray process of this user on this machine, not only this
# cluster's: other Ray clusters or `ray.init()` sessions of yours on it end too.
# Ports: GCS 6380, dashboard and job server 8265 (both on 127.0.0.1 only). Override with
# DISTRIB_GCS_PORT and DISTRIB_DASHBOARD_PORT. Needs `ray` on PATH (e.g. .venv/bin).
set -euo pipefail
gcs_port="${DISTRIB_GCS_PORT:-6380}"
dashboard_port="${DISTRIB_DASHBOARD_PORT:-8265}"

# Ray's token authentication, with the token in ~/.ray/auth_token (made once if missing);
# `ray job submit` and drivers need the same RAY_AUTH_MODE=token to talk to this cluster.
export RAY_AUTH_MODE=token

case "${1:-}" in
  start)
    [ -s "$HOME/.ray/auth_token" ] || ray get-auth-token --generate >/dev/null
    num_nodes="${2:-2}"
    cpus="${3:-1}"
    ray start --head --node-ip-address=127.0.0.1 --port="$gcs_port" --num-cpus=0 \
      --include-dashboard=true --dashboard-host=127.0.0.1 --dashboard-port="$dashboard_port" --disable-usage-stats
    # The head is up: if a node fails to start (set -e exits then), stop what was started,
    # rather than leave a half-made cluster running. (Set only now, so a head that fails
    # to start, e.g. on a port in use, stops nothing that was already running.)
    trap 'status=$?; if [ "$status" -ne 0 ]; then
            echo "local-cluster.sh: start failed; stopping what it started (ray stop --force: every Ray on this machine)" >&2
            ray stop --force >/dev/null 2>&1 || true
          fi' EXIT
    for i in $(seq 1 "$num_nodes"); do
      ray start --address="127.0.0.1:$gcs_port" --node-ip-address=127.0.0.1 --num-cpus="$cpus" \
        --resources="{\"local_node_$i\": 1}" --disable-usage-stats
    done
    trap - EXIT
    echo "local cluster up: 1 head + $num_nodes nodes x $cpus CPU; job server at http://127.0.0.1:$dashboard_port"
    ;;
  stop)
    ray stop --force
    ;;
  *)
    echo "usage: $0 start [NUM_NODES] [CPUS_PER_NODE] | stop" >&2
    echo "  stop runs \`ray stop --force\`: it stops every Ray process of yours on this machine, not only this cluster" >&2
    exit 2
    ;;
esac
