# Sourced by scripts/test: sets kafka_home to Apache Kafka's broker, the tests' Kafka
# (DESIGN §8), installed once into a cache from Maven Central: the jars that
# `mvn dependency:copy-dependencies` copies for scripts/lib/kafka/pom.xml, run by the tests
# with `java -cp "$kafka_home/lib/*"` (kafka.tools.StorageTool format, then kafka.Kafka; see
# tests/it/harness.rs). INVENTORYSYNC_TEST_KAFKA_HOME names another installation (a
# directory whose lib/ holds the jars).
kafka_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")/kafka" && pwd)"
kafka_version=$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$kafka_dir/pom.xml")
kafka_home="${INVENTORYSYNC_TEST_KAFKA_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/inventorysync/kafka-$kafka_version}"

if [ ! -f "$kafka_home/lib/kafka_2.13-$kafka_version.jar" ]; then
  echo "scripts/test: installing Apache Kafka $kafka_version from Maven Central (once)" >&2
  if ! command -v mvn >/dev/null || ! command -v java >/dev/null; then
    if [ "$(id -u)" = 0 ]; then
      apt-get install -y -qq maven openjdk-17-jre-headless >/dev/null
    fi
  fi
  rm -rf "$kafka_home.part"
  mvn -q -B -f "$kafka_dir/pom.xml" dependency:copy-dependencies \
    -DincludeScope=runtime -DoutputDirectory="$kafka_home.part/lib"
  cp "$kafka_dir/log4j2.properties" "$kafka_home.part/"
  rm -rf "$kafka_home" && mv "$kafka_home.part" "$kafka_home"
fi

# kafka_start DIR PORT: starts one KRaft node (broker and controller combined) on
# 127.0.0.1:PORT, its configuration, data and log (broker.log) in DIR, with KAFKA_HEAP
# (default 1g) of heap; sets kafka_pid and returns once it listens. For the benchmarks; the
# tests start theirs from tests/it/harness.rs.
kafka_start() {
  local dir=$1 port=$2 controller
  controller=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  mkdir -p "$dir"
  cat >"$dir/server.properties" <<PROPS
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$controller
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$controller
advertised.listeners=PLAINTEXT://127.0.0.1:$port
controller.listener.names=CONTROLLER
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
log.dirs=$dir/data
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
group.initial.rebalance.delay.ms=0
PROPS
  local java=(java "-Xms${KAFKA_HEAP:-1g}" "-Xmx${KAFKA_HEAP:-1g}" -XX:+UseG1GC -Djava.awt.headless=true
    "-Dlog4j2.configurationFile=$kafka_home/log4j2.properties" -cp "$kafka_home/lib/*")
  "${java[@]}" kafka.tools.StorageTool format --ignore-formatted -t aW52ZW50b3J5c3luYy1ibg \
    -c "$dir/server.properties" >"$dir/broker.log" 2>&1
  "${java[@]}" kafka.Kafka "$dir/server.properties" >>"$dir/broker.log" 2>&1 &
  kafka_pid=$!
  local _
  for _ in $(seq 600); do
    (echo >"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "Apache Kafka did not listen on 127.0.0.1:$port within 60 s; see $dir/broker.log" >&2
  return 1
}
