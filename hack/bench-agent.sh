#!/usr/bin/env bash
# Node agent benchmarks, in one run: bind → ready in a kubelet's order against the agent's
# parallel order (kite and runc pods, an ordinary image and its eStargz conversion, through a
# registry link paced to RATE MB/s), and an in-place update against a recreate.
#   hack/bench-agent.sh [ROUNDS] [TOTAL_MIB] [START_MIB] [RATE_MB]   (defaults 3 320 20 50)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
"$here/hack/setup.sh" >/dev/null
cd "$here"
cargo run --release --locked -q -p kite-e2e --example agent_bench -- "$@"
