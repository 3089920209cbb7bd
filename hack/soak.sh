#!/usr/bin/env bash
# Soak under faults: CYCLES cycles of pods through the CRI (kite and runc: run, exec, logs, a
# lazily pulled image read back, delete), one fault per cycle at a random moment (kill -9 of
# QEMU, virtiofsd, the shim, kite-snapshotter, kite-lazyfs, kite-agent, kite-pool; containerd
# restarted; the registry stopped; the cache's filesystem full; the VM frozen past the boot
# timeout), the invariants checked after each; prints the counts per fault. SEED replays a run.
#   hack/soak.sh [CYCLES] [SEED]      (default 22: each fault twice)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
"$here/hack/setup.sh" >/dev/null
cd "$here"
# The full-disk fault's files go whatever becomes of the soak (it aborts on a panic).
trap 'rm -f /var/lib/kite/snapshotter/soak-filler-*' EXIT
cargo run --release --locked -q -p kite-e2e --example soak -- "${1:-22}" ${2:+"$2"}
