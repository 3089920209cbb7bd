#!/usr/bin/env bash
# A kite cluster of N nodes on one machine, for the coordinator's tests, the demo and the
# benchmarks. Each node is a network namespace with its own containerd (own root, state, socket
# and config), kite-snapshotter (+ kite-lazyfs) and kite-agent; the nodes reach the coordinator
# (on the host) over a veth on the rig's bridge, and their pods reach each other through the host.
#
#   hack/rig.sh up [N]        the coordinator and nodes 1..N (default 2); idempotent
#   hack/rig.sh node-up I     (re)starts node I's daemons (after node-kill), joining if new
#   hack/rig.sh node-kill I   SIGKILLs node I's agent and containerd (its pods keep running)
#   hack/rig.sh coordinator-kill|coordinator-up [J]   SIGKILLs or (re)starts the coordinator(s)
#   hack/rig.sh coordinator-pause|coordinator-resume J  SIGSTOP / SIGCONT coordinator J
#   hack/rig.sh down          removes everything: pods, daemons, mounts, namespaces, links, state
#   hack/rig.sh env           prints the variables kitectl needs for the rig
#
# RIG (0-9, default 0) names a rig: several may run side by side (tests use their own).
#   bridge kiterig$RIG 10.99.$RIG.1/24, node I at 10.99.$RIG.(10+I), its pods 10.$((100+RIG)).I.0/24
# ETCD_ENDPOINTS (the client URLs of an etcd, e.g. from hack/etcd.sh) makes the rig highly
# available: COORDINATORS (default 3) coordinators on $HOST_IP:9620, :9622, … share the state in
# etcd under /kite-rig$RIG, one leads (lease LEASE_TTL_SECS, default 4), and the nodes and kitectl
# are given all their addresses. Every call of the script for that rig passes the same variables.
# The rig needs hack/setup.sh's machine (containerd, the shim, the registry on 127.0.0.1:5000).
set -euo pipefail
RIG=${RIG:-0}
case "$RIG" in [0-9]) ;; *) echo "rig.sh: RIG must be 0-9" >&2; exit 2 ;; esac
BIN=${KITE_BIN:-/usr/local/bin}
STATE=/var/lib/kite/rig$RIG
RUN=/run/kite/rig$RIG
ETC=/etc/kite/rig$RIG
LOGS=/var/log/kite/rig$RIG
BR=kiterig$RIG
HOST_IP=10.99.$RIG.1
ETCD_ENDPOINTS=${ETCD_ENDPOINTS:-}
NCOORD=1
[ -z "$ETCD_ENDPOINTS" ] || NCOORD=${COORDINATORS:-3}
coord_addr() { echo "$HOST_IP:$((9620 + 2 * ($1 - 1)))"; }
coord_name() { if [ "$NCOORD" = 1 ]; then echo coordinator; else echo "coordinator$1"; fi; }
COORD=$(for j in $(seq "$NCOORD"); do coord_addr "$j"; done | paste -sd,)

log() { echo "rig$RIG: $*" >&2; }
ns_of() { echo "kite-r$RIG-n$1"; }
node_ip() { echo "10.99.$RIG.$((10 + $1))"; }
pod_net() { echo "10.$((100 + RIG)).$1.0/24"; }
pidfile() { echo "$RUN/$1.pid"; }

# Starts "$@" in the background (in netns $ns when set) unless $name's pid lives.
daemon() {
  local name=$1 ns=$2; shift 2
  local pf; pf=$(pidfile "$name")
  if [ -f "$pf" ] && kill -0 "$(cat "$pf")" 2>/dev/null; then return 0; fi
  if [ -n "$ns" ]; then
    # nsenter, not `ip netns exec`: that also remounts /sys, hiding the cgroup mounts runc needs.
    setsid nohup nsenter "--net=/run/netns/$ns" "$@" >>"$LOGS/$name.log" 2>&1 </dev/null &
  else
    setsid nohup "$@" >>"$LOGS/$name.log" 2>&1 </dev/null &
  fi
  echo $! >"$pf"
}

# SIGTERM (or $SIG) to the named daemons together, up to 10 s for them to go, then SIGKILL.
stop_daemons() {
  local pids=() name pf
  for name in "$@"; do
    pf=$(pidfile "$name")
    [ -f "$pf" ] || continue
    pids+=("$(cat "$pf")")
    rm -f "$pf"
  done
  [ ${#pids[@]} -gt 0 ] || return 0
  kill "-${SIG:-TERM}" "${pids[@]}" 2>/dev/null || true
  for _ in $(seq 100); do
    local alive=0 pid
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ $alive = 1 ] || return 0
    sleep 0.1
  done
  kill -KILL "${pids[@]}" 2>/dev/null || true
}

wait_for() { # what, command...
  local what=$1; shift
  for _ in $(seq 300); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  log "$what did not come up (logs in $LOGS)"; return 1
}

sock_answers() { python3 -c 'import socket,sys; s=socket.socket(socket.AF_UNIX); s.settimeout(2); s.connect(sys.argv[1])' "$1"; }

kitectl_rig() { "$BIN/kitectl" --coordinator "$COORD" --credentials "$ETC/pki" "$@"; }

# Starts coordinators J... (default: all) and waits until one leads.
coordinator_up() {
  mkdir -p "$STATE" "$RUN" "$ETC" "$LOGS"
  sysctl -qw net.ipv4.ip_forward=1
  if ! ip link show "$BR" >/dev/null 2>&1; then
    ip link add "$BR" type bridge
    ip addr add "$HOST_IP/24" dev "$BR"
    ip link set "$BR" up
  fi
  # The registry, for the nodes: on the rig's bridge (forwarded to 127.0.0.1:5000).
  daemon registry-fwd "" socat "TCP-LISTEN:5000,bind=$HOST_IP,reuseaddr,fork" TCP:127.0.0.1:5000
  local which=("$@") j name cfg metrics
  [ ${#which[@]} -gt 0 ] || mapfile -t which < <(seq "$NCOORD")
  for j in "${which[@]}"; do
    name=$(coord_name "$j")
    cfg="$ETC/$name.toml"
    metrics=$((9630 + RIG))
    [ "$NCOORD" = 1 ] || metrics=$((19600 + 10 * RIG + j))
    cat >"$cfg" <<EOF
[coordinator]
cluster_name = "rig$RIG"
state_dir = "$STATE/$name"
pki_dir = "$ETC/pki"
listen = "$(coord_addr "$j")"
metrics_addr = "127.0.0.1:$metrics"
node_timeout_secs = ${NODE_TIMEOUT_SECS:-6}
pod_eviction_secs = ${POD_EVICTION_SECS:-6}
EOF
    if [ -n "$ETCD_ENDPOINTS" ]; then
      cat >>"$cfg" <<EOF
store = "etcd"

[coordinator.etcd]
endpoints = [$(echo "$ETCD_ENDPOINTS" | sed 's/[^,][^,]*/"&"/g')]
prefix = "/kite-rig$RIG"
lease_ttl_secs = ${LEASE_TTL_SECS:-4}
EOF
    fi
    # One CA and serving certificate for the rig: every coordinator listens on $HOST_IP.
    [ -f "$ETC/pki/ca.key" ] || "$BIN/kite-coordinator" --config "$cfg" init >/dev/null
    daemon "$name" "" "$BIN/kite-coordinator" --config "$cfg"
  done
  wait_for "a leading coordinator" kitectl_rig get nodes
}

coordinator_signal() { # SIG J
  local pf; pf=$(pidfile "$(coord_name "$2")")
  [ -f "$pf" ] && kill "-$1" "$(cat "$pf")"
}

node_net() {
  local i=$1 ns; ns=$(ns_of "$i")
  ip netns list | grep -qw "$ns" || ip netns add "$ns"
  if ! ip link show "rig$RIG-$i" >/dev/null 2>&1; then
    ip link add "rig$RIG-$i" type veth peer name eth0 netns "$ns"
    ip link set "rig$RIG-$i" master "$BR" up
    ip -n "$ns" addr add "$(node_ip "$i")/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" link set lo up
    ip -n "$ns" route add default via "$HOST_IP"
  fi
  ip netns exec "$ns" sysctl -qw net.ipv4.ip_forward=1
  ip route replace "$(pod_net "$i")" via "$(node_ip "$i")"
}

node_config() {
  local i=$1
  local d="$ETC/node$i" s="$STATE/node$i" r="$RUN/node$i"
  mkdir -p "$d/cni" "$s" "$r" "$LOGS"
  cat >"$d/cni/10-kite.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "kite-r$RIG-n$i",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "kite0",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "ranges": [[{ "subnet": "$(pod_net "$i")" }]],
        "routes": [{ "dst": "0.0.0.0/0" }]
      }
    }
  ]
}
EOF
  cat >"$d/containerd.toml" <<EOF
version = 2
root = "$s/containerd"
state = "$r/containerd"
[grpc]
  address = "$r/containerd.sock"
[ttrpc]
  address = "$r/containerd.sock.ttrpc"
[proxy_plugins.kite]
  type = "snapshot"
  address = "$r/snapshotter.sock"
[plugins."io.containerd.grpc.v1.cri"]
  restrict_oom_score_adj = true
  sandbox_image = "127.0.0.1:5000/kite/pause:latest"
  # Pods' network namespaces under the node's state, not /run/netns: the node's teardown finds
  # (and releases) every one of them even when its containerd died.
  netns_mounts_under_state_dir = true
[plugins."io.containerd.grpc.v1.cri".cni]
  bin_dir = "/usr/lib/cni"
  conf_dir = "$d/cni"
[plugins."io.containerd.grpc.v1.cri".containerd]
  default_runtime_name = "runc"
  snapshotter = "kite"
  disable_snapshot_annotations = false
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.kite]
  runtime_type = "io.containerd.kite.v2"
  pod_annotations = ["io.kite.*"]
  privileged_without_host_devices = true
[plugins."io.containerd.grpc.v1.cri".registry.mirrors."127.0.0.1:5000"]
  endpoint = ["http://127.0.0.1:5000"]
EOF
  cat >"$d/kite.toml" <<EOF
[snapshotter]
root = "$s/snapshotter"
socket = "$r/snapshotter.sock"
prefetch_socket = "$r/prefetch.sock"
lazyfs_socket = "$r/lazyfs.sock"
metrics_address = "127.0.0.1:9612"

[agent]
cri_socket = "$r/containerd.sock"
api_socket = "$r/agent.sock"
prefetch_socket = "$r/prefetch.sock"
state_dir = "$s/agent"
log_dir = "$s/pods"
agent_id = "rig$RIG-node$i"
metrics_addr = "127.0.0.1:9611"
${AGENT_EXTRA:-}

[agent.java_cache]
dir = "$s/java-cache"

[agent.coordinator]
address = "$COORD"
ca_file = "$ETC/pki/ca.crt"
token_file = "$d/token"
node_name = "node$i"
heartbeat_secs = 1
EOF
}

node_up() {
  local i=$1
  local ns r="$RUN/node$i"; ns=$(ns_of "$i")
  node_net "$i"
  node_config "$i"
  # The registry inside the node, where images say it is.
  daemon "node$i-registry-fwd" "$ns" socat TCP-LISTEN:5000,bind=127.0.0.1,reuseaddr,fork "TCP:$HOST_IP:5000"
  daemon "node$i-containerd" "$ns" env PATH="/usr/local/bin:$PATH" containerd --config "$ETC/node$i/containerd.toml"
  wait_for "node$i's containerd" sock_answers "$r/containerd.sock"
  daemon "node$i-snapshotter" "$ns" "$BIN/kite-snapshotter" --config "$ETC/node$i/kite.toml"
  wait_for "node$i's snapshotter" sock_answers "$r/snapshotter.sock"
  if [ ! -f "$STATE/node$i/agent/coordinator/node.crt" ] && [ ! -s "$ETC/node$i/token" ]; then
    kitectl_rig token create --ttl 1h --description "rig node$i" >"$ETC/node$i/token"
  fi
  daemon "node$i-agent" "$ns" "$BIN/kite-agent" --config "$ETC/node$i/kite.toml"
  wait_for "node$i's agent" sock_answers "$r/agent.sock"
}

node_kill() {
  local i=$1
  SIG=KILL stop_daemons "node$i-agent" "node$i-containerd"
}

# What a node holds, released: pods (through its agent, or its containerd when the agent is
# gone), daemons, lazy mounts, the namespace and its link.
node_down() {
  local i=$1
  local ns r="$RUN/node$i"; ns=$(ns_of "$i")
  unset KITE_COORDINATOR
  if [ -S "$r/agent.sock" ] && sock_answers "$r/agent.sock"; then
    for p in $("$BIN/kitectl" --socket "$r/agent.sock" get pods -A -o json 2>/dev/null |
      python3 -c 'import json,sys; [print(i["metadata"]["namespace"]+"/"+i["metadata"]["name"]) for i in json.load(sys.stdin)["items"]]' 2>/dev/null); do
      "$BIN/kitectl" --socket "$r/agent.sock" -n "${p%/*}" delete pod "${p#*/}" --grace-period 1 >/dev/null 2>&1 || true
    done
  fi
  stop_daemons "node$i-agent"
  # Sandboxes the agent could not remove (it was dead): through the node's own CRI.
  if ! sock_answers "$r/containerd.sock" 2>/dev/null; then
    daemon "node$i-containerd" "$ns" env PATH="/usr/local/bin:$PATH" containerd --config "$ETC/node$i/containerd.toml" 2>/dev/null || true
    wait_for "node$i's containerd" sock_answers "$r/containerd.sock" || true
  fi
  if sock_answers "$r/containerd.sock" 2>/dev/null; then
    python3 - "$r/containerd.sock" <<'EOF' || true
import subprocess, sys, json
sock = sys.argv[1]
def crictl(*a):
    return subprocess.run(["ctr", "--address", sock, "-n", "k8s.io", *a], capture_output=True, text=True)
# Tasks first (their shims and VMs go with them), then containers.
for line in crictl("tasks", "ls", "-q").stdout.split():
    crictl("tasks", "kill", "-s", "SIGKILL", line)
for line in crictl("tasks", "ls", "-q").stdout.split():
    crictl("tasks", "rm", "-f", line)
for line in crictl("containers", "ls", "-q").stdout.split():
    crictl("containers", "rm", line)
EOF
  fi
  stop_daemons "node$i-snapshotter" "node$i-containerd" "node$i-registry-fwd"
  # What is left in the namespace (kite-lazyfs, shims) goes with it.
  if ip netns list | grep -qw "$ns"; then
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
  fi
  for m in $(awk -v a="$STATE/node$i" -v b="$r" 'index($2, a) == 1 || index($2, b) == 1 {print $2}' /proc/mounts | sort -r); do
    umount -l "$m" 2>/dev/null || true
  done
  ip route del "$(pod_net "$i")" 2>/dev/null || true
  ip link del "rig$RIG-$i" 2>/dev/null || true
  ip netns del "$ns" 2>/dev/null || true
  rm -rf "/var/lib/cni/networks/kite-r$RIG-n$i" "$r" "$STATE/node$i" "$ETC/node$i"
}

down() {
  for d in "$ETC"/node*; do
    [ -d "$d" ] || continue
    node_down "${d##*node}"
  done
  for j in $(seq "$NCOORD"); do coordinator_signal CONT "$j" 2>/dev/null || true; done
  # shellcheck disable=SC2046
  stop_daemons $(for j in $(seq "$NCOORD"); do coord_name "$j"; done) registry-fwd
  ip link del "$BR" 2>/dev/null || true
  # The rig's state in etcd goes with it (the etcd itself is not the rig's).
  if [ -n "$ETCD_ENDPOINTS" ]; then
    ETCDCTL_API=3 etcdctl --endpoints "$ETCD_ENDPOINTS" --dial-timeout 2s del --prefix "/kite-rig$RIG" >/dev/null 2>&1 || true
  fi
  rm -rf "$STATE" "$RUN" "$ETC"
}

case "${1:-}" in
  up)
    n=${2:-2}
    coordinator_up
    for i in $(seq "$n"); do node_up "$i"; done
    wait_for "$n ready nodes" sh -c "[ \$($BIN/kitectl --coordinator $COORD --credentials $ETC/pki get nodes | grep -cw Ready) -ge $n ]"
    log "up: $n nodes; kitectl --coordinator $COORD --credentials $ETC/pki get nodes"
    ;;
  node-up) coordinator_up; node_up "$2" ;;
  node-kill) node_kill "$2" ;;
  coordinator-kill)
    shift
    # shellcheck disable=SC2046
    SIG=KILL stop_daemons $(if [ $# -gt 0 ]; then for j in "$@"; do coord_name "$j"; done; else
      for j in $(seq "$NCOORD"); do coord_name "$j"; done; fi)
    ;;
  coordinator-up) shift; coordinator_up "$@" ;;
  coordinator-pause) coordinator_signal STOP "$2" ;;
  coordinator-resume) coordinator_signal CONT "$2" ;;
  down) down; log "down" ;;
  env) echo "export KITE_COORDINATOR=$COORD KITE_CREDENTIALS=$ETC/pki" ;;
  *) sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
