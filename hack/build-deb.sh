#!/usr/bin/env bash
# Builds kite's Debian package from the release binaries and the guest kernel + initrd.
#   hack/build-deb.sh [VERSION]   (default: the workspace version + the git commit)
# Writes target/debian/kite_VERSION_amd64.deb and prints its path. The package holds the same
# files as the kite-deploy image, under /usr/lib/kite/VERSION, and its maintainer scripts
# (deploy/debian) run kite-deploy on the host, which copies them to /opt/kite/VERSION as the
# DaemonSet does (so an upgrade's removal of the old package files leaves running pods' shims
# alone): `apt install ./kite_*.deb` installs a node.
# dpkg-deb is Debian's own packager (always present); cargo-deb would add a tool to install and
# a build of its own for the same result.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
version=${1:-}
if [ -z "$version" ]; then
  v=$(sed -n 's/^version = "\(.*\)"/\1/p' "$here/Cargo.toml" | head -1)
  version="$v+g$(git -C "$here" rev-parse --short=12 HEAD 2>/dev/null || echo dev)"
fi
case "$version" in *[!A-Za-z0-9.+~]*|"") echo "build-deb: bad version $version" >&2; exit 2 ;; esac
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
root=$tmp/root
"$here/hack/stage-artifacts.sh" "$root/usr/lib/kite/$version" "$version"
mkdir -p "$root/DEBIAN" "$root/usr/share/doc/kite"
install -m 0644 "$here/README.md" "$root/usr/share/doc/kite/README.md"
for f in control postinst prerm; do
  sed "s/@VERSION@/$version/g" "$here/deploy/debian/$f" >"$root/DEBIAN/$f"
done
chmod 0755 "$root/DEBIAN/postinst" "$root/DEBIAN/prerm"
echo "Installed-Size: $(du -sk "$root/usr" | cut -f1)" >>"$root/DEBIAN/control"
mkdir -p "$here/target/debian"
out=$here/target/debian/kite_${version}_amd64.deb
dpkg-deb --build --root-owner-group -Zxz -z1 "$root" "$out" >/dev/null
echo "$out"
