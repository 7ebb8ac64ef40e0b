#!/usr/bin/env bash
# A real two-node Ray cluster on one machine (a head and a worker node), then a reconray job submitted to it.
# Usage: cluster/local_two_node.sh [reconray args...]   (default: `reconray run --out runs/two-node`)
set -euo pipefail
port=${RAY_PORT:-6390}
ray start --head --port "$port" --num-cpus "${HEAD_CPUS:-1}" --include-dashboard=true --dashboard-port 8265 --disable-usage-stats
ray start --address "127.0.0.1:$port" --num-cpus "${WORKER_CPUS:-1}" --disable-usage-stats
trap 'ray stop --force' EXIT
args=("$@"); [ ${#args[@]} -gt 0 ] || args=(run --out runs/two-node)
ray job submit --address http://127.0.0.1:8265 --working-dir . --runtime-env cluster/runtime_env.yaml -- reconray "${args[@]}"
