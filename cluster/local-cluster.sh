#!/usr/bin/env bash
# A real two-node Ray cluster on one machine: a head node and a worker node, each started by its own `ray start`
# from its own working directory, with its own temp dir, its own CPUs and a custom resource naming it
# (node_head / node_worker), so a job can pin work to a node and nothing relies on a path only one node sees.
#
#   cluster/local-cluster.sh start     start both nodes (prints the dashboard address for `ray job submit`)
#   cluster/local-cluster.sh status    `ray status` of the cluster
#   cluster/local-cluster.sh stop      stop both nodes
#   cluster/local-cluster.sh stop-worker   stop only the worker node (a node failure)
#   cluster/local-cluster.sh start-worker  start the worker node again (its replacement)
#
# Settings (environment): CLUSTER_DIR (default ${TMPDIR:-/tmp}/reconray-cluster), RAY_PORT (6390), DASHBOARD_PORT
# (8266), HEAD_CPUS and WORKER_CPUS (1 each; WORKER_CPUS=0: the head alone), OBJECT_STORE_MB (512 a node).
# Object storage is configured the usual way (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...): both nodes inherit this
# shell's environment.
set -euo pipefail
# Both nodes listen on loopback only; Ray's token authentication (on by default for `ray start --head` in 2.60) is
# turned off so that the clients of this shell (`ray job submit`, `ray status`, `reconray` with RAY_ADDRESS) need no
# token. A cluster reachable from a network keeps it on: see docs.ray.io ray-security/token-auth.
export RAY_AUTH_MODE=disabled
cluster_dir=${CLUSTER_DIR:-${TMPDIR:-/tmp}/reconray-cluster}
port=${RAY_PORT:-6390}
dashboard_port=${DASHBOARD_PORT:-8266}

node_pids() {  # the processes whose command line names this node's temp dir (raylet, GCS, workers, ...)
  pgrep -f -- "$cluster_dir/$1/ray" || true
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

start_node() {  # start_node NAME [ray start args...]
  local name=$1
  shift
  mkdir -p "$cluster_dir/$name/work" "$cluster_dir/$name/ray"
  # Each node's dashboard agent gets a port of its own: Ray's fixed default (52365) is taken by the first node (or by
  # any other Ray on this machine), and a node whose agent cannot listen takes no jobs.
  (cd "$cluster_dir/$name/work" && ray start --temp-dir "$cluster_dir/$name/ray" \
    --dashboard-agent-listen-port "$(free_port)" \
    --resources "{\"node_$name\": 1}" --object-store-memory $((${OBJECT_STORE_MB:-512} * 1024 * 1024)) \
    --disable-usage-stats "$@")
}

stop_node() {  # stop_node NAME: SIGTERM, then SIGKILL what is left of it
  local pids
  pids=$(node_pids "$1")
  [ -z "$pids" ] && return 0
  kill $pids 2>/dev/null || true
  for _ in $(seq 50); do
    [ -z "$(node_pids "$1")" ] && return 0
    sleep 0.2
  done
  kill -9 $(node_pids "$1") 2>/dev/null || true
}

start_worker() {
  start_node worker --address "127.0.0.1:$port" --num-cpus "${WORKER_CPUS:-1}" --node-ip-address 127.0.0.1
}

case ${1:-} in
  start)
    start_node head --head --port "$port" --num-cpus "${HEAD_CPUS:-1}" --include-dashboard=true \
      --ray-client-server-port "$(free_port)" \
      --dashboard-host 127.0.0.1 --dashboard-port "$dashboard_port" --node-ip-address 127.0.0.1
    [ "${WORKER_CPUS:-1}" = 0 ] || start_worker
    # The head's job agent starts after `ray start` returns; until it is up, a submitted job is refused ("No
    # available agent"). A no-op job, submitted until it is accepted, says when the cluster takes jobs.
    for attempt in $(seq 120); do
      if ray job submit --address "http://127.0.0.1:$dashboard_port" --submission-id "local-cluster-ready-$(date +%s%N)" \
          --no-wait -- true > /dev/null 2>&1; then
        break
      fi
      [ "$attempt" = 120 ] && { echo "the cluster takes no jobs after 60 s" >&2; exit 1; }
      sleep 0.5
    done
    echo "cluster up: RAY_ADDRESS=127.0.0.1:$port, jobs: ray job submit --address http://127.0.0.1:$dashboard_port"
    ;;
  status)
    ray status --address "127.0.0.1:$port"
    ;;
  stop-worker)
    stop_node worker
    ;;
  start-worker)
    start_worker
    ;;
  stop)
    stop_node worker
    stop_node head
    ;;
  *)
    echo "usage: $0 start|status|stop|stop-worker|start-worker" >&2
    exit 2
    ;;
esac
