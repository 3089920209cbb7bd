#!/usr/bin/env bash
# An etcd cluster of N members on loopback (Debian's etcd-server), for the coordinator's high
# availability tests, benchmarks and demo. Members are plain processes (no service manager).
#
#   hack/etcd.sh up [N]       starts members 1..N (default 3) and waits for a healthy cluster
#   hack/etcd.sh stop M       SIGKILLs member M (its data stays: `start M` brings it back)
#   hack/etcd.sh start M      (re)starts member M
#   hack/etcd.sh endpoints    prints the client URLs, comma-separated
#   hack/etcd.sh down         stops every member and removes its data
#
# ETCD_ID (0-9, default 0) names a cluster: several may run side by side. Member M of cluster K
# serves clients on 127.0.0.1:$((32000 + 100*K + 10*M)) and peers on the port after.
set -euo pipefail
ID=${ETCD_ID:-0}
case "$ID" in [0-9]) ;; *) echo "etcd.sh: ETCD_ID must be 0-9" >&2; exit 2 ;; esac
STATE=/var/lib/kite/etcd$ID
RUN=/run/kite/etcd$ID
LOGS=/var/log/kite/etcd$ID
N_FILE=$RUN/members

log() { echo "etcd$ID: $*" >&2; }
client_port() { echo $((32000 + 100 * ID + 10 * $1)); }
peer_port() { echo $(($(client_port "$1") + 1)); }
members() { cat "$N_FILE" 2>/dev/null || echo "${1:-3}"; }

endpoints() {
  local n; n=$(members)
  for m in $(seq "$n"); do echo "http://127.0.0.1:$(client_port "$m")"; done | paste -sd,
}

alive() { [ -f "$RUN/m$1.pid" ] && kill -0 "$(cat "$RUN/m$1.pid")" 2>/dev/null; }

start_member() {
  local m=$1 n; n=$(members)
  alive "$m" && return 0
  local initial=""
  for i in $(seq "$n"); do initial+="${initial:+,}m$i=http://127.0.0.1:$(peer_port "$i")"; done
  mkdir -p "$STATE" "$RUN" "$LOGS"
  setsid nohup etcd --name "m$m" --data-dir "$STATE/m$m" \
    --listen-client-urls "http://127.0.0.1:$(client_port "$m")" \
    --advertise-client-urls "http://127.0.0.1:$(client_port "$m")" \
    --listen-peer-urls "http://127.0.0.1:$(peer_port "$m")" \
    --initial-advertise-peer-urls "http://127.0.0.1:$(peer_port "$m")" \
    --initial-cluster "$initial" --initial-cluster-state new \
    --initial-cluster-token "kite-etcd$ID" \
    --logger zap --log-level warn \
    >>"$LOGS/m$m.log" 2>&1 </dev/null &
  echo $! >"$RUN/m$m.pid"
}

stop_member() {
  local m=$1
  [ -f "$RUN/m$m.pid" ] || return 0
  local pid; pid=$(cat "$RUN/m$m.pid")
  kill -KILL "$pid" 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  rm -f "$RUN/m$m.pid"
}

healthy() {
  ETCDCTL_API=3 etcdctl --endpoints "$(endpoints)" --dial-timeout 2s endpoint health >/dev/null 2>&1
}

case "${1:-}" in
  up)
    command -v etcd >/dev/null || { log "etcd is missing (hack/setup.sh installs etcd-server)"; exit 1; }
    n=${2:-3}
    mkdir -p "$RUN"
    echo "$n" >"$N_FILE"
    for m in $(seq "$n"); do start_member "$m"; done
    for _ in $(seq 150); do healthy && { log "up: $(endpoints)"; exit 0; }; sleep 0.2; done
    log "not healthy after 30 s (logs in $LOGS)"; exit 1
    ;;
  stop) stop_member "$2" ;;
  start) start_member "$2" ;;
  endpoints) endpoints ;;
  down)
    if [ -f "$N_FILE" ]; then
      for m in $(seq "$(members)"); do stop_member "$m"; done
    fi
    rm -rf "$STATE" "$RUN"
    ;;
  *) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
