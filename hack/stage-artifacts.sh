#!/usr/bin/env bash
# Builds kite's release binaries and stages what a node install puts on a host (the kite-deploy
# image's and the Debian package's payload) in DIR: VERSION, bin/ (the shim, kite-snapshotter,
# kite-pool, kite-lazyfs, kite-agent, kitectl, kite-deploy, virtiofsd), share/guest/ (kernel, initrd).
#   hack/stage-artifacts.sh DIR VERSION
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
dest=$1 version=$2
rel=$here/target/release
# The same packages as hack/setup.sh builds (another set unifies features differently and
# rebuilds them all), and without the variables cargo sets for a test it runs (the deploy e2e
# test calls this): ring's build script depends on CARGO_MANIFEST_DIR, so a different value
# made cargo rebuild every binary from ring up (~10 minutes of a 2-core CI run).
for v in $(compgen -e | grep -E '^(CARGO_(MANIFEST_|PKG_|CRATE_|BIN_|TARGET_TMPDIR|PRIMARY_PACKAGE)|OUT_DIR$)'); do
  unset "$v"
done
(cd "$here" && cargo build --release --locked -q -p kite-shim -p kite-snapshotter -p kite-agent -p kitectl -p kite-coordinator -p kite-deploy)
for f in /var/lib/kite/guest/vmlinuz /var/lib/kite/guest/initrd.img /usr/local/bin/virtiofsd; do
  [ -f "$f" ] || { echo "stage-artifacts: $f is missing (run hack/setup.sh)" >&2; exit 1; }
done
mkdir -p "$dest/bin" "$dest/share/guest"
for b in containerd-shim-kite-v2 kite-pool kite-snapshotter kite-lazyfs kite-agent kitectl kite-deploy; do
  install -m 0755 "$rel/$b" "$dest/bin/$b"
done
install -m 0755 /usr/local/bin/virtiofsd "$dest/bin/virtiofsd"
install -m 0644 /var/lib/kite/guest/vmlinuz /var/lib/kite/guest/initrd.img "$dest/share/guest/"
echo "$version" >"$dest/VERSION"
