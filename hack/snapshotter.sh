#!/usr/bin/env bash
# Starts (or restarts, or stops) kite-snapshotter for machines without a service manager; it
# logs to /var/log/kite/snapshotter.log, and starts kite-lazyfs (lazy layers), which outlives
# it: restart and stop leave kite-lazyfs serving running containers; stop-all stops it too.
#   hack/snapshotter.sh start|restart|stop|stop-all
set -euo pipefail
action=${1:-start}
socket=/run/kite/snapshotter.sock
alive_pids() { ps -eo pid=,stat=,comm= | awk '$3=="kite-snapshotte" && $2 !~ /^Z/ {print $1}'; }
answers() { [ -S "$socket" ] && [ -n "$(alive_pids)" ]; }
stop() {
  local pids; pids=$(alive_pids)
  [ -n "$pids" ] || return 0
  kill $pids 2>/dev/null || true
  for _ in $(seq 100); do [ -z "$(alive_pids)" ] && return 0; sleep 0.1; done
  echo "snapshotter.sh: kite-snapshotter did not stop" >&2; return 1
}
start() {
  mkdir -p /var/log/kite /run/kite
  if ! answers; then
    [ -z "$(alive_pids)" ] || stop
    setsid nohup /usr/local/bin/kite-snapshotter >>/var/log/kite/snapshotter.log 2>&1 < /dev/null &
  fi
  for _ in $(seq 100); do answers && return 0; sleep 0.1; done
  echo "snapshotter.sh: kite-snapshotter did not start (see /var/log/kite/snapshotter.log)" >&2
  return 1
}
lazyfs_pids() { ps -eo pid=,stat=,comm= | awk '$3=="kite-lazyfs" && $2 !~ /^Z/ {print $1}'; }
stop_lazyfs() {
  local pids; pids=$(lazyfs_pids)
  [ -n "$pids" ] || return 0
  kill $pids 2>/dev/null || true
  for _ in $(seq 100); do [ -z "$(lazyfs_pids)" ] && return 0; sleep 0.1; done
  echo "snapshotter.sh: kite-lazyfs did not stop" >&2; return 1
}
case "$action" in
  start) start ;;
  stop) stop ;;
  stop-all) stop; stop_lazyfs ;;
  restart) stop; start ;;
  *) echo "usage: $0 start|restart|stop|stop-all" >&2; exit 2 ;;
esac
