#!/usr/bin/env bash
# Starts (or restarts, or stops) kite-snapshotter for machines without a service manager; it
# logs to /var/log/kite/snapshotter.log, and starts kite-lazyfs (lazy layers), which outlives
# it: restart and stop leave kite-lazyfs serving running containers; stop-all stops it too.
# wait-containerd waits until containerd reaches it (after a restart containerd redials with a
# backoff of up to a few seconds).
#   hack/snapshotter.sh start|restart|stop|stop-all|wait-containerd
set -euo pipefail
action=${1:-start}
socket=/run/kite/snapshotter.sock
here=$(cd "$(dirname "$0")" && pwd)
. "$here/daemon-lib.sh"
alive() { alive_pids kite-snapshotte; }
answers() { answers_on "$socket"; }
stop() { stop_named kite-snapshotte snapshotter.sh; }
wait_answers() { for _ in $(seq "$1"); do answers && return 0; sleep 0.1; done; return 1; }
start() {
  mkdir -p /var/log/kite /run/kite
  answers && return 0
  # One still starting (it mounts lazy layers again before it listens) is given time, one going
  # away (killed a moment ago) is waited for, one that never answers is replaced.
  # (up to 30 s: at its start it may wait 20 s for kite-lazyfs, then mount layers again)
  for _ in $(seq 300); do
    [ -n "$(alive)" ] || break
    answers && return 0
    sleep 0.1
  done
  [ -z "$(alive)" ] || stop
  setsid nohup /usr/local/bin/kite-snapshotter >>/var/log/kite/snapshotter.log 2>&1 < /dev/null &
  wait_answers 300 && return 0
  echo "snapshotter.sh: kite-snapshotter did not start (see /var/log/kite/snapshotter.log)" >&2
  return 1
}
stop_lazyfs() { stop_named kite-lazyfs snapshotter.sh; }
# containerd reaches the snapshotter when a Prepare through containerd works. (`ctr snapshots ls`
# proves nothing: containerd answers it from its own metadata without calling the snapshotter.)
reaches() {
  local key="kite-ready-$$-$RANDOM"
  ctr -n kite-probe snapshots --snapshotter kite prepare "$key" >/dev/null 2>&1 || return 1
  ctr -n kite-probe snapshots --snapshotter kite rm "$key" >/dev/null 2>&1 || true
}
wait_containerd() {
  for _ in $(seq 150); do reaches && return 0; sleep 0.2; done
  echo "snapshotter.sh: containerd does not reach kite-snapshotter (see /var/log/kite/containerd.log)" >&2
  return 1
}
case "$action" in
  start) start ;;
  stop) stop ;;
  stop-all) stop; stop_lazyfs ;;
  restart) stop; start ;;
  wait-containerd) wait_containerd ;;
  *) echo "usage: $0 start|restart|stop|stop-all|wait-containerd" >&2; exit 2 ;;
esac
