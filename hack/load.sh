#!/usr/bin/env bash
# Load through the CRI: RUNC_PODS runc pods and KITE_PODS kite pods started at once, then removed
# at once; checks that no daemon falls over, nothing is left, and the daemons' open files return
# to idle; prints their open files and memory idle, under load and after.
#   hack/load.sh [RUNC_PODS] [KITE_PODS]      (default 50 and 8)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
"$here/hack/setup.sh" >/dev/null
cd "$here"
cargo run --release --locked -q -p kite-e2e --example load -- "${1:-50}" "${2:-8}"
