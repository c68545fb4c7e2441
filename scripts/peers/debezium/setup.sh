# Sourced by scripts/bench-drain: installs the Debezium peer once into a cache (the jars of
# pom.xml from Maven Central, and Drain.java compiled against them) and sets dbz_home (run
# it with `java -cp "$dbz_home/classes:$dbz_home/lib/*" Drain ...`) and dbz_version.
dbz_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
dbz_version=$(sed -n 's:.*<debezium.version>\(.*\)</debezium.version>.*:\1:p' "$dbz_dir/pom.xml")
dbz_sum=$(cat "$dbz_dir/pom.xml" "$dbz_dir/Drain.java" | sha256sum | cut -c1-12)
dbz_home="${XDG_CACHE_HOME:-$HOME/.cache}/inventorysync/debezium-$dbz_version-$dbz_sum"
if [ ! -f "$dbz_home/classes/Drain.class" ]; then
  echo "bench: installing the Debezium $dbz_version peer from Maven Central (once)" >&2
  rm -rf "$dbz_home.part"
  mvn -q -B -f "$dbz_dir/pom.xml" dependency:copy-dependencies \
    -DincludeScope=runtime -DoutputDirectory="$dbz_home.part/lib" || return 1
  javac -nowarn -cp "$dbz_home.part/lib/*" -d "$dbz_home.part/classes" "$dbz_dir/Drain.java" || return 1
  rm -rf "$dbz_home" && mv "$dbz_home.part" "$dbz_home"
fi
