#!/usr/bin/env bash
# The coordinator's high availability, measured in one run (an etcd cluster of three members on
# loopback, hack/etcd.sh):
# - the store: one guarded commit, a 60-assignment commit and a 1,000-key list, embedded (redb)
#   against etcd (store_latency);
# - placement throughput: a real coordinator and NODES simulated agents, APPS apps of REPLICAS
#   replicas, on the embedded store and on etcd (coordinator_scale);
# - fail-over: three coordinators on a one-node rig, the leader SIGKILLed ROUNDS times (lease
#   TTL seconds): kill → new leader, kill → a new app placed (ha_failover).
#   hack/bench-coordinator-ha.sh [NODES APPS REPLICAS [ROUNDS TTL]]   (defaults 200 5 500 5 4)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
"$here/hack/setup.sh" >/dev/null
cd "$here"
cargo build --release --locked -q -p kite-e2e --example store_latency --example coordinator_scale --example ha_failover
export ETCD_ID=4
trap 'hack/etcd.sh down' EXIT
hack/etcd.sh up 3
endpoints=$(hack/etcd.sh endpoints)
echo "== store latency"
ETCD_ENDPOINTS=$endpoints target/release/examples/store_latency 500
echo "== placement, embedded store"
target/release/examples/coordinator_scale "${1:-200}" "${2:-5}" "${3:-500}"
echo "== placement, etcd"
ETCD_ENDPOINTS=$endpoints target/release/examples/coordinator_scale "${1:-200}" "${2:-5}" "${3:-500}"
echo "== fail-over"
target/release/examples/ha_failover "${4:-5}" "${5:-4}"
