#!/usr/bin/env bash
# Assembles the Java server apps of the Java start-up benchmark from Debian 12's packages, one
# directory tree per app under /var/lib/kite/java-bench/<app>/, each meant to be mounted at
# /app in an image whose JDK is at /opt/java (hack/java-images.sh's layout). Idempotent: an
# app whose tree is complete and newer than its sources (this script, its Java sources, its
# Debian packages) is kept. Beside its files, each tree holds
#   argv.json    the JSON argv that runs it (`java ...`, or `sh -c '... exec java ...'`):
#                the JVM is PID 1, leaves on SIGTERM and takes JAVA_TOOL_OPTIONS as given
#   probe_path   the path of the readiness GET on :8080 (200 once the app serves)
# Class paths name jar files only (the JVM's CDS dump refuses a class path directory), each
# jar copied dereferenced (Debian's /usr/share/java symlinks) with its package's mtime; state
# goes to /tmp only.
#   spring     hack/java/spring: Spring MVC 4.3 (DispatcherServlet, @EnableWebMvc) on embedded
#              Jetty 9.4, Jackson, JdbcTemplate on an in-memory H2 database; GET / is JSON
#   tomcat     Tomcat 10.1 (Bootstrap, catalina.home /app/tomcat, catalina.base /app/base,
#              work dir in /tmp): a ROOT webapp whose GET / is a JSP (compiled by Jasper/ECJ
#              on the first request) and /static.html a static page
#   zookeeper  ZooKeeper 3.8 standalone (data in /tmp), its AdminServer (embedded Jetty) on
#              :8080; GET /commands/ruok
#   activemq   ActiveMQ 5.17 broker (KahaDB in /tmp, OpenWire on :61616) started by
#              hack/java/spring/ActiveMqBench.java, which answers GET / on :8080 once the broker
#              has started (Debian ships neither the web console nor Jolokia)
# The packages are installed without starting a service (a policy-rc.d refuses every start
# while apt runs; tomcat10 and zookeeper, the packages with services, are not installed: their
# jars come from tomcat10-common/libtomcat10-java and libzookeeper-java).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
log() { echo "java-bench-apps: $*"; }
[ "$(id -u)" = 0 ] || { echo "java-bench-apps: run as root" >&2; exit 1; }
jdk17=/usr/lib/jvm/java-17-openjdk-amd64
out=/var/lib/kite/java-bench
java_src=$here/hack/java/spring
sj=/usr/share/java
[ -x "$jdk17/bin/javac" ] || { echo "java-bench-apps: $jdk17/bin/javac is missing (openjdk-17-jdk-headless)" >&2; exit 1; }

# 1. Debian packages (the jars land in /usr/share/java).
spring_pkgs=(libspring-core-java libspring-beans-java libspring-context-java libspring-aop-java
             libspring-expression-java libspring-web-java libspring-web-servlet-java
             libspring-jdbc-java libspring-transaction-java libjetty9-java libservlet-api-java
             libjackson2-databind-java libh2-java libcommons-logging-java)
tomcat_pkgs=(tomcat10-common libtomcat10-java libeclipse-jdt-core-java)
zookeeper_pkgs=(libzookeeper-java libjetty9-java libjackson2-databind-java libslf4j-java
                liblog4j1.2-java libcommons-cli-java libdropwizard-metrics-java)
activemq_pkgs=(activemq libactivemq-java)
missing=()
for p in "${spring_pkgs[@]}" "${tomcat_pkgs[@]}" "${zookeeper_pkgs[@]}" "${activemq_pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]}"
  # activemq ships an init script: no service may start while apt runs (invoke-rc.d asks
  # policy-rc.d; there is no systemd here). An existing policy-rc.d is left as it is.
  policy=/usr/sbin/policy-rc.d own_policy=
  if ! [ -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 0755 "$policy" && own_policy=1
  fi
  apt-get update -qq
  rc=0
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null || rc=$?
  [ -z "$own_policy" ] || rm -f "$policy"
  [ $rc = 0 ] || exit $rc
fi

# fresh APP SRC...: the tree of APP is complete (argv.json is written last) and no source is newer.
fresh() {
  local app=$1; shift
  [ -f "$out/$app/argv.json" ] && [ -z "$(find "$@" -newer "$out/$app/argv.json" -print -quit 2>/dev/null)" ]
}
# pkg_files PKG...: the dpkg file lists of the packages (a package's upgrade rewrites its list).
pkg_files() { local p; for p in "$@"; do echo "/var/lib/dpkg/info/$p.list"; done; }
# copy_jars DIR JAR...: the jars (names under /usr/share/java, or paths) into DIR, dereferenced,
# with their mtimes.
copy_jars() {
  local dir=$1 j; shift
  mkdir -p "$dir"
  for j in "$@"; do
    [[ $j == /* ]] || j=$sj/$j
    cp -L --preserve=timestamps "$j" "$dir/"
  done
}
# classpath PREFIX DIR: the jars of DIR, sorted, as a class path of PREFIX/<name>.
classpath() { (cd "$2" && ls -1 *.jar | LC_ALL=C sort | sed "s|^|$1/|" | paste -sd:); }
# json_argv ARG...: the args as a JSON array.
json_argv() { python3 -c 'import json, sys; print(json.dumps(sys.argv[1:]))' "$@"; }
# finish APP TMPDIR PROBE ARG...: writes probe_path and argv.json into TMPDIR, which replaces the
# tree of APP.
finish() {
  local app=$1 tmp=$2 probe=$3; shift 3
  echo "$probe" >"$tmp/probe_path"
  json_argv "$@" >"$tmp/argv.json"
  rm -rf "${out:?}/$app" && mv "$tmp" "$out/$app"
}
# jar_create JAR CLASSES [MAIN]: a reproducible jar of CLASSES.
jar_create() {
  "$jdk17/bin/jar" --create --date=2026-01-01T00:00:00Z --file "$1" ${3:+--main-class "$3"} -C "$2" .
  touch -d '2026-01-01 00:00:00 UTC' "$1"
}
mkdir -p "$out"

# 2. spring: app.jar (hack/java/spring, but ActiveMqBench) and its libraries in lib/.
spring_jars=(spring3-core.jar spring3-beans.jar spring3-context.jar spring3-aop.jar
             spring3-expression.jar spring3-web.jar spring3-web.servlet.jar spring3-jdbc.jar
             spring3-transaction.jar commons-logging.jar servlet-api.jar
             jetty9-server.jar jetty9-servlet.jar jetty9-security.jar jetty9-http.jar
             jetty9-io.jar jetty9-util.jar
             jackson-databind.jar jackson-core.jar jackson-annotations.jar h2.jar)
if ! fresh spring "$0" "$java_src" $(pkg_files "${spring_pkgs[@]}"); then
  log "spring"
  tmp=$out/spring.tmp
  rm -rf "$tmp" && mkdir -p "$tmp"
  copy_jars "$tmp/lib" "${spring_jars[@]}"
  srcs=()
  for f in "$java_src"/*.java; do [ "$(basename "$f")" = ActiveMqBench.java ] || srcs+=("$f"); done
  "$jdk17/bin/javac" --release 17 -nowarn -d "$tmp/classes" -cp "$(classpath "$tmp/lib" "$tmp/lib")" "${srcs[@]}" 2>&1 |
    { grep -v 'bad path element' || true; }
  jar_create "$tmp/app.jar" "$tmp/classes" kite.bench.SpringBench
  rm -rf "$tmp/classes"
  finish spring "$tmp" / java -cp "/app/app.jar:$(classpath /app/lib "$tmp/lib")" kite.bench.SpringBench
fi
