#!/usr/bin/env bash
# Boots N kite VMs in a row through containerd (`ctr run --rm … true`) and reports how many
# booted and the spread of the run times. Needs hack/setup.sh first.
#   hack/boot-reliability.sh [N]        (default 50)
set -uo pipefail
n=${1:-50}
image=${KITE_IMAGE:-127.0.0.1:5000/kite/busybox:latest}
ctr images pull --plain-http "$image" >/dev/null
ok=0; times=()
for i in $(seq "$n"); do
  s=$(date +%s%N)
  if timeout 120 ctr run --rm --runtime io.containerd.kite.v2 "$image" "kite-boot-$$-$i" true >/tmp/kite-boot.out 2>&1; then
    ok=$((ok + 1)); times+=($(( ($(date +%s%N) - s) / 1000000 )))
  else
    echo "boot $i failed: $(tail -c 600 /tmp/kite-boot.out)"
  fi
done
sorted=$(printf '%s\n' "${times[@]}" | sort -n)
pick() { echo "$sorted" | awk -v q="$1" '{a[NR]=$1} END {i=int((NR-1)*q)+1; print a[i]}'; }
accel=$(grep -q -wE 'vmx|svm' /proc/cpuinfo && echo kvm || echo tcg)
echo "boots: $ok/$n succeeded (accelerator $accel); ctr run time ms: min $(pick 0) p50 $(pick 0.5) p90 $(pick 0.9) max $(pick 1)"
[ "$ok" = "$n" ]
