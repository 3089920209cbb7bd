#!/usr/bin/env bash
# Builds the kite-deploy image from the release binaries and the guest kernel + initrd, and
# pushes it to the local registry.
#   hack/build-deploy-image.sh [VERSION]   (default: the workspace version + the git commit,
#                                           also pushed as :latest)
# The image: /usr/local/bin/kite-deploy (the entrypoint: install, uninstall, status) and the
# artifacts it installs under /opt/kite-artifacts (VERSION, bin/, share/guest/). Prints the
# image's reference. Needs hack/setup.sh's machine (the release build, the guest, the registry).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
version=${1:-}
if [ -z "$version" ]; then
  v=$(sed -n 's/^version = "\(.*\)"/\1/p' "$here/Cargo.toml" | head -1)
  version="$v-$(git -C "$here" rev-parse --short=12 HEAD 2>/dev/null || echo dev)"
fi
tag_latest=false
[ -n "${1:-}" ] || tag_latest=true
ref=127.0.0.1:5000/kite/kite-deploy:$version
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
stage=$tmp/artifacts
"$here/hack/stage-artifacts.sh" "$stage" "$version"
install -m 0755 "$stage/bin/kite-deploy" "$tmp/kite-deploy"
python3 "$here/hack/mkimage.py" "$tmp/image.tar" "$ref" \
  --tree "$stage:/opt/kite-artifacts" --file "$tmp/kite-deploy:/usr/local/bin/kite-deploy" \
  --argv '["/usr/local/bin/kite-deploy", "install", "--wait"]' >/dev/null
ctr images import --no-unpack "$tmp/image.tar" >/dev/null
ctr images push --plain-http "$ref" >/dev/null
if $tag_latest; then
  # deploy/kubernetes/kustomization.yaml names :latest.
  latest=127.0.0.1:5000/kite/kite-deploy:latest
  ctr images tag --force "$ref" "$latest" >/dev/null
  ctr images push --plain-http "$latest" >/dev/null
  ctr images rm "$latest" >/dev/null 2>&1 || true
fi
ctr images rm "$ref" >/dev/null 2>&1 || true
echo "$ref"
