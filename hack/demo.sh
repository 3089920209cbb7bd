#!/usr/bin/env bash
# kite's demo: sets the machine up (hack/setup.sh), then runs the sample image from the local
# registry in a microVM and shows the guest's kernel and how long each stage took; then the
# node agent (a pod from a manifest, an in-place update), the Java start-up cache, and the
# coordinator on a two-node rig (an app placed, rolled out in place, rolled back).
#   hack/demo.sh
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
"$here/hack/setup.sh"

image=127.0.0.1:5000/kite/busybox:latest
id=kite-demo-$$
ctr images pull --plain-http "$image" >/dev/null
echo
echo "host kernel:  $(uname -r)"
start=$(date +%s%N)
out=$(ctr run --rm --runtime io.containerd.kite.v2 "$image" "$id" sh -c 'echo "guest kernel: $(uname -r)"; echo "guest memory: $(free -m | awk "/Mem:/{print \$2}") MiB"')
total_ms=$(( ($(date +%s%N) - start) / 1000000 ))
echo "$out"
# The shim records each start's stages as a JSON line (timings_file in [shim]).
record=$(grep -F "\"container\":\"$id\"" /run/kite/timings.jsonl | tail -1)
field() { python3 -c 'import json, sys; print(round(json.loads(sys.argv[1])[sys.argv[2]]))' "$record" "$1"; }
accel=$(grep -qwE 'vmx|svm' /proc/cpuinfo && echo KVM || echo "TCG (software emulation: this host's CPU exposes no vmx/svm)")
cat <<TXT

stages of this container's start (accelerator: $accel):
  virtiofsd ready                  $(field virtiofsd_ms) ms
  VM boot to guest agent ready     $(field vm_boot_ms) ms
    guest kernel until PID 1       $(field guest_kernel_ms) ms
    guest agent start-up           $(field guest_agent_ms) ms
  create container (in the guest)  $(field create_ms) ms ($(field guest_create_ms) ms in the guest)
  start container                  $(field start_ms) ms
  shim's own time                  $(field shim_own_ms) ms
  ctr run, end to end              $total_ms ms
TXT

# The node agent: a pod from a Kubernetes manifest, its start as a waterfall, an in-place update.
pod=deploy/examples/web-pod.yaml
kitectl delete pod web >/dev/null 2>&1 || true
echo
echo "== kitectl run -f $pod"
kitectl run -f "$here/$pod"
ip=$(kitectl get pod web -o json | python3 -c 'import json, sys; print(json.load(sys.stdin)["status"]["podIP"])')
echo "GET http://$ip:8080/ -> $(curl -fsS "http://$ip:8080/")"
echo
echo "== kitectl describe pod web"
kitectl describe pod web | sed -n '/^Start/,/^Events/p' | sed '$d'
qemu_before=$(cat "/run/kite/sandboxes/$(kitectl get pod web -o wide | awk 'NR==2{print $NF}')"*/qemu.pid)
echo
echo "== kitectl set image pod/web web=127.0.0.1:5000/kite/web-v2:latest (in place)"
kitectl set image pod/web web=127.0.0.1:5000/kite/web-v2:latest
qemu_after=$(cat "/run/kite/sandboxes/$(kitectl get pod web -o wide | awk 'NR==2{print $NF}')"*/qemu.pid)
echo "GET http://$ip:8080/ -> $(curl -fsS "http://$ip:8080/") (same IP; QEMU pid $qemu_before before, $qemu_after after)"
kitectl delete pod web

# The Java start-up cache: the first start records the app's class archive (a training run off
# the pod's path), the next start maps it (the JVM's own log says so).
pod=deploy/examples/java-pod.yaml
for run in first second; do
  kitectl delete pod java >/dev/null 2>&1 || true
  echo
  echo "== kitectl run -f $pod ($run start)"
  # kitectl run shows each stage; "ready" is the container's start to its first ready probe.
  ready=$(kitectl run -f "$here/$pod" | awk '$1 == "ready" {print $2}')
  ip=$(kitectl get pod java -o json | python3 -c 'import json, sys; print(json.load(sys.stdin)["status"]["podIP"])')
  echo "GET http://$ip:8080/ -> $(curl -fsS "http://$ip:8080/"); container start -> ready $ready ms"
  # The verdict (mapped) or the training's end, whichever this start leads to.
  for _ in $(seq 300); do
    kitectl describe pod java | grep -qE 'JavaCache(Mapped|Trained|Unusable|Rejected|Skipped)' && break
    sleep 1
  done
  kitectl describe pod java | grep -E 'JavaCache' | sed 's/^/  /'
done
kitectl delete pod java

# The coordinator: a two-node rig (each node a network namespace with its own containerd,
# snapshotter and agent, joined with a token over mutual TLS), an app placed over both, an
# in-place rollout, a broken one that rolls back by itself.
app=deploy/examples/web-app.yaml
echo
echo "== hack/rig.sh up 2"
"$here/hack/rig.sh" up 2
eval "$("$here/hack/rig.sh" env)"
kitectl get nodes
echo
echo "== kitectl apply -f $app"
kitectl apply -f "$here/$app"
kitectl get pods
ips() { kitectl get pods -o json | python3 -c 'import json, sys; print(" ".join(p["ip"] for p in json.load(sys.stdin)["items"]))'; }
for ip in $(ips); do echo "GET http://$ip:8080/ -> $(curl -fsS "http://$ip:8080/")"; done
echo
echo "== rollout to web-v2 (in place)"
sed 's#kite/web-v1#kite/web-v2#' "$here/$app" | kitectl apply -f -
for ip in $(ips); do echo "GET http://$ip:8080/ -> $(curl -fsS "http://$ip:8080/") (same IPs)"; done
echo
echo "== rollout to web-broken (its first batch fails; the app rolls back by itself)"
sed 's#kite/web-v1#kite/web-broken#' "$here/$app" | kitectl apply -f - || true
kitectl rollout history deployment/web
for ip in $(ips); do echo "GET http://$ip:8080/ -> $(curl -fsS "http://$ip:8080/")"; done
kitectl delete deployment web
"$here/hack/rig.sh" down
