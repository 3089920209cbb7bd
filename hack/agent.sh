#!/usr/bin/env bash
# Starts (or restarts, or stops) kite-agent for machines without a service manager (hosts with
# systemd use deploy/kite-agent.service); it logs to /var/log/kite/agent.log. Stopping the agent
# leaves its pods running: the next agent adopts them.
#   hack/agent.sh start|restart|stop
set -euo pipefail
action=${1:-start}
socket=/run/kite/agent.sock
alive_pids() { ps -eo pid=,stat=,comm= | awk '$3=="kite-agent" && $2 !~ /^Z/ {print $1}'; }
# Serving means a connect to the socket succeeds (the agent renames its socket into place only
# when it serves; a killed one leaves a file nobody answers on).
answers() {
  python3 -c 'import socket, sys; s = socket.socket(socket.AF_UNIX); s.settimeout(2); s.connect(sys.argv[1])' \
    "$socket" 2>/dev/null
}
stop() {
  local pids; pids=$(alive_pids)
  [ -n "$pids" ] || return 0
  kill $pids 2>/dev/null || true
  for _ in $(seq 100); do [ -z "$(alive_pids)" ] && return 0; sleep 0.1; done
  echo "agent.sh: kite-agent did not stop" >&2; return 1
}
start() {
  mkdir -p /var/log/kite /run/kite
  answers && return 0
  # One starting (it adopts the pods of its records before it serves) is given time.
  for _ in $(seq 300); do
    [ -n "$(alive_pids)" ] || break
    answers && return 0
    sleep 0.1
  done
  [ -z "$(alive_pids)" ] || stop
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
