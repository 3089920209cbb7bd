#!/usr/bin/env bash
# Starts (or restarts, stops, drains) kite-pool, the warm pool's holder, for machines without a
# service manager (hosts with systemd use deploy/systemd/kite-pool.service); it logs to
# /var/log/kite/pool.log. Stopping kite-pool leaves its ready VMs for pods and the next
# kite-pool; drain releases them.
#   hack/pool.sh start|restart|stop|drain
set -euo pipefail
action=${1:-start}
metrics=${KITE_POOL_METRICS:-127.0.0.1:9613}
log=/var/log/kite/pool.log
here=$(cd "$(dirname "$0")" && pwd)
. "$here/daemon-lib.sh"
alive() { alive_pids kite-pool; }
answers() { curl -fsS -o /dev/null "http://$metrics/metrics" 2>/dev/null; }
stop() { stop_named kite-pool pool.sh; }
start() {
  mkdir -p /var/log/kite /run/kite
  [ -n "$(alive)" ] && answers && return 0
  [ -z "$(alive)" ] || stop
  setsid nohup /usr/local/bin/kite-pool run >>"$log" 2>&1 < /dev/null &
  for _ in $(seq 100); do
    answers && return 0
    if [ -z "$(alive)" ]; then
      # With [shim.pool] enabled = false it releases the pool and exits.
      tail -n 3 "$log" | grep -q "the pool is off" && return 0
      break
    fi
    sleep 0.1
  done
  echo "pool.sh: kite-pool did not start (see $log):" >&2
  tail -n 5 "$log" >&2
  return 1
}
case "$action" in
  start) start ;;
  stop) stop ;;
  restart) stop; start ;;
  drain) stop; /usr/local/bin/kite-pool drain ;;
  *) echo "usage: $0 start|restart|stop|drain" >&2; exit 2 ;;
esac
