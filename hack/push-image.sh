#!/usr/bin/env bash
# Builds an image with hack/mkimage.py and pushes it to the local registry as
# 127.0.0.1:5000/kite/NAME:latest, unless the registry has it already.
#   hack/push-image.sh NAME [mkimage.py options: --cmd '…', --binary PATH …]
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
name=$1; shift
ref=127.0.0.1:5000/kite/$name:latest
curl -fsS -H "Accept: application/vnd.oci.image.manifest.v1+json" \
  "http://127.0.0.1:5000/v2/kite/$name/manifests/latest" >/dev/null 2>&1 && exit 0
echo "push-image: $ref"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 "$here/hack/mkimage.py" "$tmp/image.tar" "$ref" "$@" >/dev/null
ctr images import --no-unpack "$tmp/image.tar" >/dev/null
ctr images push --plain-http "$ref" >/dev/null
