# Shared by hack/snapshotter.sh and hack/agent.sh (sourced): a kite daemon that serves on a
# unix socket, for machines without a service manager.

# The live (not zombie) processes whose command name is $1 (as ps shows it: 15 characters).
alive_pids() { ps -eo pid=,stat=,comm= | awk -v c="$1" '$3==c && $2 !~ /^Z/ {print $1}'; }

# Serving means a connect to the socket $1 succeeds: a crashed daemon leaves its socket file
# behind, and a starting one renames its socket into place only when it is about to serve.
answers_on() {
  python3 -c 'import socket, sys; s = socket.socket(socket.AF_UNIX); s.settimeout(2); s.connect(sys.argv[1])' \
    "$1" 2>/dev/null
}

# SIGTERM to every process named $1, then up to 10 s for them to go ($2 names it in the error).
stop_named() {
  local pids; pids=$(alive_pids "$1")
  [ -n "$pids" ] || return 0
  kill $pids 2>/dev/null || true
  for _ in $(seq 100); do [ -z "$(alive_pids "$1")" ] && return 0; sleep 0.1; done
  echo "$2: $1 did not stop" >&2; return 1
}
