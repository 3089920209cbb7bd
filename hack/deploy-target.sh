#!/usr/bin/env bash
# A containerd "node" that has never had kite, for the installer's tests: its own config (the
# operator's file, no kite in it), root, state, socket and CNI network (bridge kitedep0,
# 10.98.0.0/16), beside hack/setup.sh's containerd.
#   hack/deploy-target.sh up        writes the operator's config (unless present) and starts it
#   hack/deploy-target.sh restart   what an operator's service manager would do (the installer's
#                                   KITE_CONTAINERD_RESTART command)
#   hack/deploy-target.sh down      stops it, removes its pods, state and config
#   hack/deploy-target.sh env       its paths, as shell variables
set -euo pipefail
ETC=/etc/kite-deploy-e2e
RUN=/run/kite-deploy-e2e
STATE=/var/lib/kite-deploy-e2e
LOGS=/var/log/kite-deploy-e2e
CONF=$ETC/containerd/config.toml
SOCK=$RUN/containerd.sock
PIDFILE=$RUN/containerd.pid

running() { [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; }

start() {
  mkdir -p "$RUN" "$STATE" "$LOGS"
  running && return 0
  # $STATE/bin stands for the node's /usr/local/bin: the machine's own holds the set-up's kite.
  setsid nohup env PATH="$STATE/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
    containerd --config "$CONF" >>"$LOGS/containerd.log" 2>&1 </dev/null &
  echo $! >"$PIDFILE"
  for _ in $(seq 300); do
    ctr --address "$SOCK" version >/dev/null 2>&1 && return 0
    running || break
    sleep 0.1
  done
  echo "deploy-target: containerd did not come up; its log:" >&2
  tail -20 "$LOGS/containerd.log" >&2
  exit 1
}

stop() {
  running || { rm -f "$PIDFILE"; return 0; }
  local pid; pid=$(cat "$PIDFILE")
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  rm -f "$PIDFILE"
}

case "${1:-}" in
  up)
    mkdir -p "$ETC/containerd" "$ETC/cni"
    [ -f "$ETC/cni/10-kitedep.conflist" ] || cat >"$ETC/cni/10-kitedep.conflist" <<CNI
{
  "cniVersion": "1.0.0",
  "name": "kitedep",
  "plugins": [
    { "type": "bridge", "bridge": "kitedep0", "isGateway": true, "ipMasq": false,
      "ipam": { "type": "host-local", "ranges": [[{ "subnet": "10.98.0.0/16" }]],
                "routes": [{ "dst": "0.0.0.0/0" }] } }
  ]
}
CNI
    [ -f "$CONF" ] || cat >"$CONF" <<TOML
# The operator's containerd config of a node without kite (hack/deploy-target.sh).
version = 2
root = "$STATE/containerd"
state = "$RUN/containerd"

[grpc]
  address = "$SOCK"

[ttrpc]
  address = "$SOCK.ttrpc"

[plugins."io.containerd.grpc.v1.cri"]
  restrict_oom_score_adj = true
  sandbox_image = "127.0.0.1:5000/kite/pause:latest"

[plugins."io.containerd.grpc.v1.cri".cni]
  bin_dir = "/usr/lib/cni"
  conf_dir = "$ETC/cni"

[plugins."io.containerd.grpc.v1.cri".containerd]
  default_runtime_name = "runc"

[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"

[plugins."io.containerd.grpc.v1.cri".registry.mirrors."127.0.0.1:5000"]
  endpoint = ["http://127.0.0.1:5000"]
TOML
    start ;;
  restart) stop; start ;;
  down)
    if running; then
      # Every pod of the node, then containerd.
      for ns in $(ctr --address "$SOCK" namespaces ls -q 2>/dev/null); do
        for t in $(ctr --address "$SOCK" -n "$ns" tasks ls -q 2>/dev/null); do
          ctr --address "$SOCK" -n "$ns" tasks kill -s SIGKILL "$t" >/dev/null 2>&1 || true
        done
      done
      sleep 1
      for ns in $(ctr --address "$SOCK" namespaces ls -q 2>/dev/null); do
        for t in $(ctr --address "$SOCK" -n "$ns" tasks ls -q 2>/dev/null); do
          ctr --address "$SOCK" -n "$ns" tasks delete -f "$t" >/dev/null 2>&1 || true
        done
      done
    fi
    stop
    { grep " $STATE\| $RUN" /proc/self/mountinfo || true; } | awk '{print $5}' | sort -r | while read -r m; do
      umount -l "$m" 2>/dev/null || true
    done
    rm -rf "$ETC" "$RUN" "$STATE" "$LOGS"
    ip link del kitedep0 2>/dev/null || true ;;
  env)
    echo "TARGET_CONFIG=$CONF TARGET_SOCKET=$SOCK TARGET_ETC=$ETC" ;;
  *) sed -n '2,12p' "$0" >&2; exit 2 ;;
esac
