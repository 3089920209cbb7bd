#!/usr/bin/env bash
# Installs and starts everything kite needs on a Debian 12 machine, as root. Idempotent.
#   hack/setup.sh        packages, virtiofsd, guest kernel + initrd, kite binaries,
#                        containerd (configured and started), kite-snapshotter, kite-agent,
#                        kite-pool (the warm pool), local registry on 127.0.0.1:5000
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
log() { echo "setup: $*"; }
[ "$(id -u)" = 0 ] || { echo "setup: run as root" >&2; exit 1; }

# 1. Debian packages.
pkgs=(containerd runc qemu-system-x86 containernetworking-plugins docker-registry
      libseccomp-dev libcap-ng-dev pkg-config cpio kmod iproute2 iptables busybox-static
      python3 python3-pip curl ca-certificates procps psmisc util-linux gcc protobuf-compiler iperf3
      openjdk-17-jdk-headless socat xz-utils etcd-server etcd-client libprotobuf-dev)
missing=()
for p in "${pkgs[@]}"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# The kernel package list must be current for build-guest.sh to resolve the cloud kernel.
apt-cache show linux-image-cloud-amd64 >/dev/null 2>&1 || apt-get update -qq

# 2. Rust toolchain (the machine's rustup one) and virtiofsd from crates.io.
command -v cargo >/dev/null || { [ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"; }
command -v cargo >/dev/null || { echo "setup: cargo is missing (install Rust with rustup)" >&2; exit 1; }
if ! [ -x /usr/local/bin/virtiofsd ]; then
  log "building virtiofsd (about two minutes)"
  cargo install --locked virtiofsd --root /usr/local -q
fi

# 3. kite: the shim on the host, the guest kernel and initrd.
log "building kite"
(cd "$here" && cargo build --release --locked -q -p kite-shim -p kite-snapshotter -p kite-agent -p kitectl -p kite-coordinator -p kite-deploy)
install -m 0755 "$here/target/release/containerd-shim-kite-v2" /usr/local/bin/
install -m 0755 "$here/target/release/kitectl" /usr/local/bin/
install -m 0755 "$here/target/release/kite-coordinator" /usr/local/bin/
# A new kite-pool takes over the ready VMs of the old one.
if ! cmp -s "$here/target/release/kite-pool" /usr/local/bin/kite-pool; then
  install -m 0755 "$here/target/release/kite-pool" /usr/local/bin/
  "$here/hack/pool.sh" stop
fi
# A running agent keeps the old binary until it is restarted (its pods keep running).
if ! cmp -s "$here/target/release/kite-agent" /usr/local/bin/kite-agent; then
  install -m 0755 "$here/target/release/kite-agent" /usr/local/bin/
  "$here/hack/agent.sh" stop
fi
# A running snapshotter keeps the old binary until it is restarted.
if ! cmp -s "$here/target/release/kite-snapshotter" /usr/local/bin/kite-snapshotter; then
  install -m 0755 "$here/target/release/kite-snapshotter" /usr/local/bin/
  "$here/hack/snapshotter.sh" stop
fi
# kite-lazyfs serves lazy layers and outlives the snapshotter; a new one ends the old mounts
# (the snapshotter mounts them again).
if ! cmp -s "$here/target/release/kite-lazyfs" /usr/local/bin/kite-lazyfs; then
  install -m 0755 "$here/target/release/kite-lazyfs" /usr/local/bin/
  "$here/hack/snapshotter.sh" stop-all
fi
"$here/hack/build-guest.sh" /var/lib/kite/guest
mkdir -p /etc/kite /run/kite
# kite.toml: installed when missing, and replaced by the current one while it is still a version
# this script installed (any version of deploy/kite.toml in the history); an edited one is kept.
installed_toml() {
  [ -f /etc/kite/kite.toml ] || return 1
  cmp -s "$here/deploy/kite.toml" /etc/kite/kite.toml && return 0
  local c
  for c in $(git -C "$here" log --format=%H -- deploy/kite.toml 2>/dev/null); do
    git -C "$here" show "$c:deploy/kite.toml" 2>/dev/null | cmp -s - /etc/kite/kite.toml && return 0
  done
  return 1
}
if [ ! -f /etc/kite/kite.toml ] || installed_toml; then
  cmp -s "$here/deploy/kite.toml" /etc/kite/kite.toml 2>/dev/null ||
    install -m 0644 "$here/deploy/kite.toml" /etc/kite/kite.toml
else
  log "keeping /etc/kite/kite.toml (edited; the current defaults are in deploy/kite.toml)"
fi
install -m 0644 "$here/deploy/kite-macvtap.toml" /etc/kite/kite-macvtap.toml

# 4. kite-snapshotter (containerd's proxy plugin `kite`), containerd with the kite runtime,
#    and the pods' CNI network (bridge kite0, 10.88.0.0/16).
mkdir -p /etc/containerd /var/log/kite /etc/cni/net.d
cmp -s "$here/deploy/cni/10-kite.conflist" /etc/cni/net.d/10-kite.conflist ||
  install -m 0644 "$here/deploy/cni/10-kite.conflist" /etc/cni/net.d/10-kite.conflist
if ! cmp -s "$here/deploy/containerd-config.toml" /etc/containerd/config.toml; then
  install -m 0644 "$here/deploy/containerd-config.toml" /etc/containerd/config.toml
  "$here/hack/containerd.sh" stop
fi
"$here/hack/snapshotter.sh" start
"$here/hack/containerd.sh" start
# containerd redials a proxy snapshotter that went away with a backoff (up to a few seconds):
# ready means a call through containerd reaches it.
"$here/hack/snapshotter.sh" wait-containerd

# The node agent beside containerd and the snapshotter (kitectl talks to it).
"$here/hack/agent.sh" start
# The warm pool ([shim.pool] in kite.toml): VMs booted ahead for kite pods to adopt.
"$here/hack/pool.sh" start

# 5. A local registry on 127.0.0.1:5000.
if ! curl -fsS http://127.0.0.1:5000/v2/ >/dev/null 2>&1; then
  log "starting the registry on 127.0.0.1:5000"
  mkdir -p /var/lib/kite/registry
  install -m 0644 "$here/deploy/registry.yml" /etc/kite/registry.yml
  setsid nohup docker-registry serve /etc/kite/registry.yml >>/var/log/kite/registry.log 2>&1 < /dev/null &
  for _ in $(seq 100); do curl -fsS http://127.0.0.1:5000/v2/ >/dev/null 2>&1 && break; sleep 0.1; done
  curl -fsS http://127.0.0.1:5000/v2/ >/dev/null || { echo "setup: registry did not start" >&2; exit 1; }
fi

# 6. The sample image and the CRI's pause image, in the registry.
"$here/hack/push-image.sh" busybox
# A pod's sandbox ("pause") container only holds the pod's namespaces under runc; kite does not
# run it at all (the VM holds them).
"$here/hack/push-image.sh" pause --cmd 'exec sleep 2147483647'
# The node agent's sample app: busybox httpd on :8080 serving its version (v1, v2), and one
# whose command does not exist (an update to it must roll back).
for v in v1 v2; do
  "$here/hack/push-image.sh" "web-$v" --cmd "echo serving $v; mkdir -p /www && echo $v > /www/index.html && exec httpd -f -p 8080 -h /www"
done
"$here/hack/push-image.sh" web-broken --exec /no/such/command
# The Java cache's apps (JDK 17 from Debian, JDK 25 from PyPI).
"$here/hack/java-images.sh"
ref=127.0.0.1:5000/kite/busybox:latest
log "ready: containerd with runtime io.containerd.kite.v2, registry 127.0.0.1:5000, image $ref"
