#!/usr/bin/env bash
# Starts (or restarts, or stops) kite-agent for machines without a service manager (hosts with
# systemd use deploy/systemd/kite-agent.service); it logs to /var/log/kite/agent.log. Stopping the agent
# leaves its pods running: the next agent adopts them.
#   hack/agent.sh start|restart|stop
set -euo pipefail
action=${1:-start}
socket=/run/kite/agent.sock
here=$(cd "$(dirname "$0")" && pwd)
. "$here/daemon-lib.sh"
alive() { alive_pids kite-agent; }
answers() { answers_on "$socket"; }
stop() { stop_named kite-agent agent.sh; }
start() {
  mkdir -p /var/log/kite /run/kite
  answers && return 0
  # One starting (it adopts the pods of its records before it serves) is given time.
  for _ in $(seq 300); do
    [ -n "$(alive)" ] || break
    answers && return 0
    sleep 0.1
  done
  [ -z "$(alive)" ] || stop
  setsid nohup /usr/local/bin/kite-agent >>/var/log/kite/agent.log 2>&1 < /dev/null &
  for _ in $(seq 600); do answers && return 0; sleep 0.1; done
  echo "agent.sh: kite-agent did not start (see /var/log/kite/agent.log)" >&2
  return 1
}
case "$action" in
  start) start ;;
  stop) stop ;;
  restart) stop; start ;;
  *) echo "usage: $0 start|restart|stop" >&2; exit 2 ;;
esac
