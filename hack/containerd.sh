#!/usr/bin/env bash
# Starts (or restarts) containerd with kite's configuration, for machines without a service
# manager.   hack/containerd.sh start|restart|stop
set -euo pipefail
action=${1:-start}
# A live containerd answers on its socket; a name match would also count zombies.
answers() { ctr version >/dev/null 2>&1; }
alive_pids() { ps -eo pid=,stat=,comm= | awk '$3=="containerd" && $2 !~ /^Z/ {print $1}'; }
stop() {
  local pids; pids=$(alive_pids)
  [ -n "$pids" ] || return 0
  kill $pids 2>/dev/null || true
  for _ in $(seq 100); do [ -z "$(alive_pids)" ] && return 0; sleep 0.1; done
  echo "containerd.sh: containerd did not stop" >&2; return 1
}
start() {
  mkdir -p /var/log/kite
  if ! answers; then
    [ -z "$(alive_pids)" ] || stop
    PATH=/usr/local/bin:$PATH setsid nohup containerd --config /etc/containerd/config.toml \
      >>/var/log/kite/containerd.log 2>&1 < /dev/null &
  fi
  for _ in $(seq 100); do answers && return 0; sleep 0.1; done
  echo "containerd.sh: containerd did not start (see /var/log/kite/containerd.log)" >&2; return 1
}
case "$action" in
  start) start ;;
  stop) stop ;;
  restart) stop; start ;;
  *) echo "usage: $0 start|restart|stop" >&2; exit 2 ;;
esac
