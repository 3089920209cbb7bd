#!/usr/bin/env bash
# Starts (or restarts) containerd with kite's configuration, for machines without a service
# manager.   hack/containerd.sh start|restart|stop
set -euo pipefail
action=${1:-start}
running() { pgrep -x containerd >/dev/null; }
stop() {
  running || return 0
  pkill -x containerd
  for _ in $(seq 100); do running || return 0; sleep 0.1; done
  echo "containerd.sh: containerd did not stop" >&2; return 1
}
start() {
  mkdir -p /var/log/kite
  if ! running; then
    PATH=/usr/local/bin:$PATH setsid nohup containerd --config /etc/containerd/config.toml \
      >>/var/log/kite/containerd.log 2>&1 < /dev/null &
  fi
  for _ in $(seq 100); do ctr version >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "containerd.sh: containerd did not start (see /var/log/kite/containerd.log)" >&2; return 1
}
case "$action" in
  start) start ;;
  stop) stop ;;
  restart) stop; start ;;
  *) echo "usage: $0 start|restart|stop" >&2; exit 2 ;;
esac
