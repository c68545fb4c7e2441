# Sourced by scripts/test: sets tansu_bin to a tansu broker (the tests' real Kafka-protocol
# broker, DESIGN §8), building it once into a cache.
#
# tansu 0.6.0 as published answers a fetch from inside a record batch with the batches after
# it (its dynostore lists batches from the fetch offset on), so a consumer group that resumes
# at a committed offset in the middle of a producer's batch silently skips the rest of that
# batch: records lost on every such restart (seen as the Kafka chaos test losing changes).
# Until a release fixes it, the broker is built from the published crates with
# tansu-fetch-inside-batch.patch applied; kafka::a_consumer_resuming_inside_a_record_batch_…
# fails on a broker without the fix. INVENTORYSYNC_TEST_TANSU names another broker binary.
tansu_version=0.6.0
tansu_fix=1 # raise when the patch changes: the cache is rebuilt
tansu_home="${XDG_CACHE_HOME:-$HOME/.cache}/inventorysync/tansu-$tansu_version-fix$tansu_fix"
tansu_bin="${INVENTORYSYNC_TEST_TANSU:-$tansu_home/bin/tansu}"

if [ ! -x "$tansu_bin" ]; then
  echo "scripts/test: building the tansu broker $tansu_version with its fetch fix (once, several minutes)" >&2
  for tool in curl patch; do
    if ! command -v "$tool" >/dev/null && [ "$(id -u)" = 0 ]; then
      apt-get install -y -qq "$tool" >/dev/null
    fi
  done
  tansu_src="$tansu_home/src"
  rm -rf "$tansu_src" && mkdir -p "$tansu_src" "$tansu_home/bin"
  for crate in tansu tansu-storage; do
    curl -sSfL "https://static.crates.io/crates/$crate/$crate-$tansu_version.crate" |
      tar xz -C "$tansu_src"
  done
  patch -s -d "$tansu_src/tansu-storage-$tansu_version" -p1 < "$(dirname "${BASH_SOURCE[0]}")/tansu-fetch-inside-batch.patch"
  # The published lock file pins every other dependency; only tansu-storage is replaced.
  printf '\n[patch.crates-io]\ntansu-storage = { path = "../tansu-storage-%s" }\n' "$tansu_version" \
    >> "$tansu_src/tansu-$tansu_version/Cargo.toml"
  cargo build --release --quiet --features dynostore \
    --manifest-path "$tansu_src/tansu-$tansu_version/Cargo.toml" \
    --target-dir "$tansu_home/target"
  cp "$tansu_home/target/release/tansu" "$tansu_bin"
  rm -rf "$tansu_home/target" "$tansu_src"
fi
