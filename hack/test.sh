#!/usr/bin/env bash
# kite's test command: sets the machine up (hack/setup.sh), then runs the lint, the unit tests
# and the end-to-end tests against the real containerd (ctr and the CRI), QEMU VMs, CNI and the
# local registry. Fuzzing is hack/fuzz.sh's (a nightly, sanitizer-instrumented build of its
# own: ~10 minutes of a 2-core CI run before a target had run a second).
#   hack/test.sh
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
"$here/hack/setup.sh"

echo "== lint"
cargo fmt --all -- --check
cargo fmt --manifest-path fuzz/Cargo.toml -- --check
cargo clippy --workspace --all-targets --locked -q -- -D warnings
# The misbehaving guest agent (a feature no workspace build turns on).
cargo clippy -p kite-guest --features misbehave --all-targets --locked -q -- -D warnings

echo "== unit tests"
cargo test --workspace --exclude kite-e2e --locked
cargo test -p kite-guest --features misbehave --locked --lib misbehave

echo "== the tests' misbehaving guest agent (tests/tests/untrusted_guest.rs)"
"$here/hack/build-guest.sh" /var/lib/kite/guest-misbehave misbehave

echo "== end-to-end tests (containerd, QEMU $(grep -qwE 'vmx|svm' /proc/cpuinfo && echo KVM || echo TCG), registry)"
# Each test checks its own sandbox for leaks, so they may run side by side (the agent tests run
# an agent each); the restart tests restart containerd and the snapshotter, and run alone, and
# so does the untrusted-guest test (its stalls and timeouts want the machine to themselves).
cargo test -p kite-e2e --locked --test shim --test failures --test network --test cri --test agent --test java_cache --test coordinator --test coordinator_ha --test deploy --test pool -- --test-threads=2
cargo test -p kite-e2e --locked --test restart --test snapshotter --test lazy --test lazy_faults --test registry_auth --test registry_bearer --test record --test untrusted_guest
