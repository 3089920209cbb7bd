#!/usr/bin/env bash
# Assembles the Java server apps of the Java start-up benchmark from Debian 12's packages, one
# directory tree per app under /var/lib/kite/java-bench/<app>/, each meant to be mounted at
# /app in an image whose JDK is at /opt/java (hack/java-images.sh's layout). Idempotent: an
# app whose tree is complete and newer than its sources (this script, its Java sources, its
# Debian packages) is kept. Beside its files, each tree holds
#   argv.json    the JSON argv that runs it, `java ...`: the JVM is PID 1, leaves on SIGTERM
#                and takes JAVA_TOOL_OPTIONS as given
#   probe_path   the path of the readiness GET on :8080 (200 once the app serves)
# Class paths name jar files only (the JVM's CDS dump refuses a class path directory), each
# jar copied dereferenced (Debian's /usr/share/java symlinks) with its package's mtime. The
# apps only read /app (no empty directory in it matters: images leave them out) and write
# to /tmp only.
#   spring     hack/java/spring: Spring MVC 4.3 (DispatcherServlet, an annotation-configured
#              context with what @EnableWebMvc imports) on embedded Jetty 9.4, Jackson,
#              JdbcTemplate on an in-memory H2 database; GET / is JSON of a row
#   tomcat     Tomcat 10.1 (Bootstrap, catalina.home /app/tomcat, catalina.base /app/base,
#              logs and work dir in /tmp/tomcat): a ROOT webapp whose GET / is a JSP (compiled
#              by Jasper with ECJ on the first request) and /static.html a static page
#   zookeeper  ZooKeeper 3.8 standalone (data in /tmp), its AdminServer (embedded Jetty) on
#              :8080; GET /commands/ruok (200 a few tens of ms early: see 4.)
#   activemq   ActiveMQ 5.17 broker (KahaDB in /tmp, OpenWire on :61616) as /usr/bin/activemq
#              starts it; Debian ships neither the web console nor Jolokia: its configuration
#              ends with a Jetty on :8080, created once the broker has started; GET / is static
# The packages are installed without starting a service: a policy-rc.d refuses every start
# while apt runs (activemq ships an init script), and neither tomcat10 (its service wants
# systemd; its configuration comes from its .deb, unpacked, not installed) nor zookeeper (its
# scripts and configuration; it wants a desktop JRE) are installed: the jars come from
# tomcat10-common/libtomcat10-java and libzookeeper-java.
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
zookeeper_pkgs=(libzookeeper-java libjetty9-java libservlet-api-java libjackson2-databind-java libslf4j-java
                liblog4j1.2-java libdropwizard-metrics-java libsnappy-java)
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
  rc=0
  apt_out=$(apt-get update -qq 2>&1 &&
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" 2>&1) || rc=$?
  [ -z "$own_policy" ] || rm -f "$policy"
  [ $rc = 0 ] || { echo "$apt_out" >&2; exit $rc; }
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

# 2. spring: app.jar (hack/java/spring) and its libraries in lib/.
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
  # (The manifests of Debian's jars name jars of /usr/share/java that it need not have.)
  "$jdk17/bin/javac" --release 17 -nowarn -d "$tmp/classes" -cp "$(classpath "$tmp/lib" "$tmp/lib")" \
    "$java_src"/*.java 2>&1 | { grep -v 'bad path element' || true; }
  jar_create "$tmp/app.jar" "$tmp/classes" kite.bench.SpringBench
  rm -rf "$tmp/classes"
  finish spring "$tmp" / java -cp "/app/app.jar:$(classpath /app/lib "$tmp/lib")" kite.bench.SpringBench
fi

# 3. tomcat: Debian's Tomcat 10 (catalina.home /app/tomcat: bin/ and lib/ as tomcat10-common
#    has them, plus the ECJ compiler Jasper needs) and a catalina.base /app/base with the
#    configuration of Debian's tomcat10 package (not installed: it wants systemd; its .deb is
#    downloaded and unpacked) and a ROOT webapp, run by java as catalina.sh would. The base
#    is only read: logs, the work directory (compiled JSPs) and temp go to /tmp/tomcat and /tmp.
if ! fresh tomcat "$0" $(pkg_files "${tomcat_pkgs[@]}"); then
  log "tomcat"
  tmp=$out/tomcat.tmp
  rm -rf "$tmp" && mkdir -p "$tmp/tomcat/bin" "$tmp/base/conf" "$tmp/base/webapps/ROOT"
  version=$(dpkg-query -W -f='${Version}' tomcat10-common)
  debs=/var/lib/kite/java-build/debs
  deb=$debs/tomcat10_${version//:/%3a}_all.deb
  if ! [ -f "$deb" ]; then
    mkdir -p "$debs"
    download() { (cd "$debs" && apt-get download -qq -o APT::Sandbox::User=root "tomcat10=$version"); }
    download 2>/dev/null || { apt-get update -qq && download; }
  fi
  dpkg-deb -x "$deb" "$tmp/deb"
  cp --preserve=timestamps "$tmp/deb/usr/share/tomcat10/etc"/* "$tmp/base/conf/"
  rm -rf "$tmp/deb"
  # Debian's SecurityListener refuses to start Tomcat as root, which a container's java is.
  # The host creates no directories (conf/Catalina/localhost) and works in /tmp; the logs go
  # to /tmp/tomcat/logs (created by their first write).
  sed -i -e '/org.apache.catalina.security.SecurityListener/d' \
    -e 's|<Host name="localhost"  appBase="webapps"|& workDir="/tmp/tomcat/work" createDirs="false"|' \
    -e 's|directory="logs"|directory="/tmp/tomcat/logs"|' "$tmp/base/conf/server.xml"
  sed -i 's|${catalina.base}/logs|/tmp/tomcat/logs|' "$tmp/base/conf/logging.properties"
  grep -q 'workDir="/tmp/tomcat/work"' "$tmp/base/conf/server.xml" &&
    grep -q 'directory="/tmp/tomcat/logs"' "$tmp/base/conf/server.xml" &&
    ! grep -q 'catalina.base' "$tmp/base/conf/logging.properties" &&
    ! grep -q SecurityListener "$tmp/base/conf/server.xml" ||
    { echo "java-bench-apps: tomcat10's server.xml or logging.properties changed" >&2; exit 1; }
  copy_jars "$tmp/tomcat/bin" /usr/share/tomcat10/bin/bootstrap.jar /usr/share/tomcat10/bin/tomcat-juli.jar
  copy_jars "$tmp/tomcat/lib" /usr/share/tomcat10/lib/*.jar eclipse-jdt-core.jar
  cat >"$tmp/base/webapps/ROOT/index.jsp" <<'JSP'
<%@ page contentType="text/html; charset=UTF-8" session="false" import="java.time.Instant" %>
<!DOCTYPE html>
<html><head><title>kite tomcat bench</title></head>
<body>
<h1>Hello from Tomcat <%= application.getServerInfo() %></h1>
<p>java <%= Runtime.version() %>, <%= Instant.now() %>, <%= request.getRemoteAddr() %></p>
<ul><% for (String p : new String[] {"java.vm.name", "os.name", "catalina.base"}) { %>
<li><%= p %> = <%= System.getProperty(p) %></li><% } %></ul>
</body></html>
JSP
  cat >"$tmp/base/webapps/ROOT/static.html" <<'HTML'
<!DOCTYPE html>
<html><head><title>kite tomcat bench</title></head><body><h1>Hello from Tomcat</h1></body></html>
HTML
  # The JVM options of catalina.sh (Debian's tomcat-start.sh runs it).
  finish tomcat "$tmp" / java -Djava.util.logging.config.file=/app/base/conf/logging.properties \
    -Djava.util.logging.manager=org.apache.juli.ClassLoaderLogManager \
    -Djdk.tls.ephemeralDHKeySize=2048 -Djava.protocol.handler.pkgs=org.apache.catalina.webresources \
    -Dsun.io.useCanonCaches=false \
    --add-opens=java.base/java.lang=ALL-UNNAMED --add-opens=java.base/java.lang.reflect=ALL-UNNAMED \
    --add-opens=java.base/java.io=ALL-UNNAMED --add-opens=java.base/java.util=ALL-UNNAMED \
    --add-opens=java.base/java.util.concurrent=ALL-UNNAMED --add-opens=java.rmi/sun.rmi.transport=ALL-UNNAMED \
    -classpath /app/tomcat/bin/bootstrap.jar:/app/tomcat/bin/tomcat-juli.jar \
    -Dcatalina.home=/app/tomcat -Dcatalina.base=/app/base -Djava.io.tmpdir=/tmp \
    org.apache.catalina.startup.Bootstrap start
fi

# 4. zookeeper: ZooKeeper standalone as Debian's zkServer.sh start-foreground runs it (main
#    QuorumPeerMain, local JMX, log4j 1.2 through slf4j, logging to the console), data in
#    /tmp/zookeeper, the AdminServer (Jetty) on :8080. 3.8.0's AdminServer answers 200 to
#    every command, with an error in the JSON while the server does not serve, and it starts
#    just before the server loads its data and opens :2181: no URL of it answers 200 only
#    once ZooKeeper serves; /commands/ruok can pass up to the few tens of ms that takes.
zookeeper_jars=(zookeeper.jar zookeeper-jute.jar slf4j-api.jar slf4j-log4j12.jar log4j-1.2.jar
                jetty9-server.jar jetty9-servlet.jar jetty9-security.jar jetty9-http.jar
                jetty9-io.jar jetty9-util.jar servlet-api.jar
                jackson-databind.jar jackson-core.jar jackson-annotations.jar
                metrics-core.jar snappy-java.jar)
if ! fresh zookeeper "$0" $(pkg_files "${zookeeper_pkgs[@]}"); then
  log "zookeeper"
  tmp=$out/zookeeper.tmp
  rm -rf "$tmp" && mkdir -p "$tmp/conf"
  copy_jars "$tmp/lib" "${zookeeper_jars[@]}"
  cat >"$tmp/conf/zoo.cfg" <<'CFG'
tickTime=2000
initLimit=10
syncLimit=5
dataDir=/tmp/zookeeper/data
clientPort=2181
admin.enableServer=true
admin.serverAddress=0.0.0.0
admin.serverPort=8080
CFG
  cat >"$tmp/conf/log4j.properties" <<'CFG'
log4j.rootLogger=${zookeeper.root.logger}
log4j.appender.CONSOLE=org.apache.log4j.ConsoleAppender
log4j.appender.CONSOLE.Threshold=INFO
log4j.appender.CONSOLE.layout=org.apache.log4j.PatternLayout
log4j.appender.CONSOLE.layout.ConversionPattern=%d{ISO8601} - %-5p [%t:%C{1}@%L] - %m%n
CFG
  finish zookeeper "$tmp" /commands/ruok java -Dzookeeper.log.dir=/tmp/zookeeper/log \
    -Dzookeeper.root.logger=INFO,CONSOLE -Dlog4j.configuration=file:/app/conf/log4j.properties \
    -XX:+HeapDumpOnOutOfMemoryError "-XX:OnOutOfMemoryError=kill -9 %p" \
    -Dcom.sun.management.jmxremote -Dcom.sun.management.jmxremote.local.only=true \
    -cp "$(classpath /app/lib "$tmp/lib")" org.apache.zookeeper.server.quorum.QuorumPeerMain /app/conf/zoo.cfg
fi

# 5. activemq: the ActiveMQ broker as Debian's /usr/bin/activemq starts it (console Main, its
#    JVM options, xbean configuration), but on a flat class path: the jars of Debian's
#    /usr/share/activemq/lib and lib/optional (those that exist) plus Jetty. Debian ships
#    neither the web console nor Jolokia: the configuration (Debian's, data in /tmp) ends with
#    a Jetty on :8080 serving conf/www, defined after the broker so that it starts once the
#    broker has (as upstream's jetty.xml import for the web console).
activemq_jars=(jetty9-server.jar jetty9-http.jar jetty9-io.jar jetty9-util.jar servlet-api.jar)
if ! fresh activemq "$0" $(pkg_files "${activemq_pkgs[@]}" libjetty9-java); then
  log "activemq"
  tmp=$out/activemq.tmp
  rm -rf "$tmp" && mkdir -p "$tmp/conf/www"
  debian_jars=()
  for j in /usr/share/activemq/lib/*.jar /usr/share/activemq/lib/optional/*.jar; do
    [ -e "$j" ] && debian_jars+=("$j")  # a few of lib/optional's links point to no package's jar
  done
  copy_jars "$tmp/lib" "${debian_jars[@]}" "${activemq_jars[@]}"
  cat >"$tmp/conf/activemq.xml" <<'XML'
<beans
  xmlns="http://www.springframework.org/schema/beans"
  xmlns:amq="http://activemq.apache.org/schema/core"
  xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"
  xsi:schemaLocation="http://www.springframework.org/schema/beans http://www.springframework.org/schema/beans/spring-beans-2.0.xsd
  http://activemq.apache.org/schema/core http://activemq.apache.org/schema/core/activemq-core.xsd">

    <!-- ${...} from system properties (activemq.data, activemq.conf) -->
    <bean class="org.springframework.beans.factory.config.PropertyPlaceholderConfigurer"/>

    <!-- Debian's /etc/activemq/instances-available/main/activemq.xml, its data in activemq.data -->
    <broker xmlns="http://activemq.apache.org/schema/core"
            useJmx="false"
            brokerName="localhost"
            dataDirectory="${activemq.data}">
        <persistenceAdapter>
            <kahaDB directory="${activemq.data}/kahadb"/>
        </persistenceAdapter>
        <transportConnectors>
            <transportConnector name="openwire" uri="tcp://0.0.0.0:61616"/>
        </transportConnectors>
    </broker>

    <!-- The HTTP endpoint on :8080, created after the broker bean has started the broker. -->
    <bean id="jettyServer" class="org.eclipse.jetty.server.Server" init-method="start" destroy-method="stop">
        <constructor-arg value="8080"/>
        <property name="handler">
            <bean class="org.eclipse.jetty.server.handler.ContextHandler">
                <property name="contextPath" value="/"/>
                <property name="resourceBase" value="${activemq.conf}/www"/>
                <property name="handler">
                    <bean class="org.eclipse.jetty.server.handler.ResourceHandler">
                        <property name="welcomeFiles"><list><value>index.html</value></list></property>
                    </bean>
                </property>
            </bean>
        </property>
    </bean>
</beans>
XML
  cat >"$tmp/conf/log4j.properties" <<'CFG'
log4j.rootLogger=INFO, console
log4j.logger.org.apache.activemq.spring=WARN
log4j.logger.org.springframework=WARN
log4j.logger.org.apache.xbean=WARN
log4j.appender.console=org.apache.log4j.ConsoleAppender
log4j.appender.console.layout=org.apache.log4j.PatternLayout
log4j.appender.console.layout.ConversionPattern=%d | %-5p | %m | %c | %t%n
CFG
  echo '<!DOCTYPE html><html><head><title>ActiveMQ</title></head><body><h1>ActiveMQ broker localhost is up</h1></body></html>' \
    >"$tmp/conf/www/index.html"
  # The JVM options of /usr/bin/activemq with Debian's ACTIVEMQ_OPTS (activemq-options) but
  # its heap size (-Xms512M -Xmx512M): the JVM's default, as for the other apps.
  opens=(--add-reads=java.xml=java.logging
         --add-opens java.base/java.security=ALL-UNNAMED --add-opens java.base/java.net=ALL-UNNAMED
         --add-opens java.base/java.lang=ALL-UNNAMED --add-opens java.base/java.util=ALL-UNNAMED
         --add-opens java.naming/javax.naming.spi=ALL-UNNAMED
         --add-opens java.rmi/sun.rmi.transport.tcp=ALL-UNNAMED
         --add-opens java.base/java.util.concurrent=ALL-UNNAMED
         --add-opens java.base/java.util.concurrent.atomic=ALL-UNNAMED
         --add-exports=java.base/sun.net.www.protocol.http=ALL-UNNAMED
         --add-exports=java.base/sun.net.www.protocol.https=ALL-UNNAMED
         --add-exports=java.base/sun.net.www.protocol.jar=ALL-UNNAMED
         --add-exports=jdk.xml.dom/org.w3c.dom.html=ALL-UNNAMED
         --add-exports=jdk.naming.rmi/com.sun.jndi.url.rmi=ALL-UNNAMED)
  finish activemq "$tmp" / java -Dorg.apache.activemq.UseDedicatedTaskRunner=true \
    -Dlog4j.configuration=file:/app/conf/log4j.properties "${opens[@]}" \
    -Dactivemq.classpath=/app/conf -Dactivemq.home=/app -Dactivemq.base=/app \
    -Dactivemq.conf=/app/conf -Dactivemq.data=/tmp/activemq/data \
    -cp "$(classpath /app/lib "$tmp/lib")" org.apache.activemq.console.Main start xbean:file:/app/conf/activemq.xml
fi
