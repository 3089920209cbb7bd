#!/usr/bin/env bash
# The coordinator's benchmarks, in one run:
# - simulated scale: a real kite-coordinator and NODES simulated agents (joined with tokens,
#   mutual TLS, answering assignments with ready pods, no pods run): APPS apps of REPLICAS
#   replicas; time to place an app, assignment latency p50/p99, the coordinator's memory;
# - on a two-node rig (hack/rig.sh): scale-out 0 → N ready (runc 20, kite 4) with the fetch
#   started at the bind or after the sandbox, and an in-place rollout of 4 replicas against a
#   recreate rollout. The criterion bench of one placement decision is
#   `cargo bench -p kite-benches --bench placement`.
#   hack/bench-coordinator.sh [NODES APPS REPLICAS [ROUNDS MIB]]   (defaults 1000 10 1000 3 64)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
"$here/hack/setup.sh" >/dev/null
cd "$here"
cargo build --release --locked -q -p kite-e2e --example coordinator_scale --example rig_bench
target/release/examples/coordinator_scale "${1:-1000}" "${2:-10}" "${3:-1000}"
target/release/examples/rig_bench "${4:-3}" "${5:-64}"
