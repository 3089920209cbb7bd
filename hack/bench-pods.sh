#!/usr/bin/env bash
# Pod benchmark through the CRI, runc and kite in one run: pod start (RunPodSandbox → first
# output), host memory per idle pod, host ↔ pod TCP throughput (iperf3).
#   hack/bench-pods.sh [N]      (N pods of each kind, default 5)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
"$here/hack/setup.sh" >/dev/null
"$here/hack/push-image.sh" iperf3 --binary /usr/bin/iperf3
cd "$here"
cargo run --release --locked -q -p kite-e2e --example pod_bench -- "${1:-5}"
