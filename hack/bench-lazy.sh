#!/usr/bin/env bash
# Lazy pull benchmark through the CRI, in one run: time from PullImage to the container's first
# output for the full image, lazy (eStargz), and lazy + prefetch, through a registry link
# throttled to RATE MB/s; bytes fetched before the first output; read throughput through the
# lazy layer (FUSE) against the same files unpacked.
#   hack/bench-lazy.sh [ROUNDS] [TOTAL_MIB] [START_MIB] [RATE_MB]   (defaults 3 1024 20 50)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
"$here/hack/setup.sh" >/dev/null
cd "$here"
cargo run --release --locked -q -p kite-e2e --example lazy_bench -- "$@"
