# Sourced by scripts/test: sets tansu_bin to a tansu broker (the tests' real Kafka-protocol
# broker, DESIGN §8), building it once into a cache.
#
# tansu 0.6.0 as published has fetch bugs that lose records silently, fixed by
# tansu-fetch.patch until a release fixes them:
# - it answers a fetch from inside a record batch with the batches after it (its dynostore
#   lists batches from the fetch offset on), so a consumer group that resumes at a committed
#   offset in the middle of a producer's batch skips the rest of that batch (seen as the
#   Kafka chaos test losing changes on restarts). The fix returns the whole batch, and the
#   fetch service then counts on from that batch's end: counting the records returned from
#   the fetch offset overshot, and the next read of the same fetch skipped as many records
#   as the batch held before the offset (seen as the chaos test losing the records written
#   while a restarted consumer read its backlog);
#   kafka::a_consumer_resuming_inside_a_record_batch_… fails on a broker without the fixes;
# - it raises a partition's high watermark before it stores the batch, and a fetch lists
#   whatever batches are stored, so while one batch is still being written a fetch could
#   return the one after it (and the one before it again);
#   kafka::a_consumer_at_the_tail_reads_every_offset_… fails on a broker without the fix.
# The broker is built from the published crates with the patch applied.
# INVENTORYSYNC_TEST_TANSU names another broker binary.
tansu_version=0.6.0
tansu_fix=3 # raise when the patch changes: the cache is rebuilt
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
  patch -s -d "$tansu_src/tansu-storage-$tansu_version" -p1 < "$(dirname "${BASH_SOURCE[0]}")/tansu-fetch.patch"
  # The published lock file pins every other dependency; only tansu-storage is replaced.
  printf '\n[patch.crates-io]\ntansu-storage = { path = "../tansu-storage-%s" }\n' "$tansu_version" \
    >> "$tansu_src/tansu-$tansu_version/Cargo.toml"
  cargo build --release --quiet --features dynostore \
    --manifest-path "$tansu_src/tansu-$tansu_version/Cargo.toml" \
    --target-dir "$tansu_home/target"
  cp "$tansu_home/target/release/tansu" "$tansu_bin"
  rm -rf "$tansu_home/target" "$tansu_src"
fi
