# Shared by scripts/bench-consumer and scripts/bench-faults: the binary to measure, a
# throwaway PostgreSQL with the demo schema (warehouse `wh`, state DB `state`), the reference
# central server, run's configuration and helpers (applied, wait_applied, load_stock, cpu_s).
# Source it after scripts/lib/pg.sh with ROWS set; it defines bin, dir, port, cport, url,
# psql, pids (killed on exit), central_pid and the functions below.

# BENCH_BIN=PATH measures that binary instead of building this tree's (to compare two builds);
# BENCH_CENTRAL_BIN=PATH runs the reference central server from another binary (an older
# engine against this tree's central, whose `applied_at_least` the waits use);
# BENCH_MAX_CHANGES=N sets run's `[batch] max_changes` (500 by default).
if [ -n "${BENCH_BIN:-}" ]; then
  bin=$BENCH_BIN
else
  cargo build --release --quiet
  bin="${CARGO_TARGET_DIR:-$PWD/target}/release/inventorysync"
fi

dir=$(mktemp -d /tmp/inventorysync-bench.XXXXXX)
port=$(free_port)
cport=$(free_port)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  # BENCH_KEEP_LOGS=DIR keeps the processes' logs.
  [ -n "${BENCH_KEEP_LOGS:-}" ] && mkdir -p "$BENCH_KEEP_LOGS" && cp "$dir"/*.log "$BENCH_KEEP_LOGS"/
  stop_pg "$dir"
  rm -rf "$dir"
}
trap cleanup EXIT
start_pg "$dir" "$port"
# Locations: 100, or as many as ROWS stock levels of 2,000 SKUs need.
locations=$((ROWS / 2000 > 100 ? ROWS / 2000 : 100))
psql=(psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U postgres)
"${psql[@]}" -d postgres -c "CREATE DATABASE wh" -c "CREATE DATABASE state"
"${psql[@]}" -d wh -f sql/demo_schema.sql
"${psql[@]}" -d wh -c "CREATE PUBLICATION inventorysync FOR TABLE products, locations, stock_levels;
  INSERT INTO products (sku, name, unit_price) SELECT 'SKU-' || g, 'product ' || g, g / 100.0 FROM generate_series(1, 2000) g;
  INSERT INTO locations SELECT 'L-' || g, 'zone ' || (g % 7) FROM generate_series(1, $locations) g;"

"${BENCH_CENTRAL_BIN:-$bin}" central --listen "127.0.0.1:$cport" 2>"$dir/central.log" &
central_pid=$!
pids+=($central_pid)
cpu_s() { awk '{printf "%.2f", ($14 + $15) / 100}' "/proc/$1/stat"; }
# The CPU seconds of every PostgreSQL process running now (the benchmark's cluster: its
# walsenders and backends; one that ended in between is not counted).
pg_cpu_s() {
  local p
  for p in $(pgrep -u postgres -x postgres); do cat "/proc/$p/stat" 2>/dev/null; done |
    awk '{ s += $14 + $15 } END { printf "%.2f", s / 100 }'
}
stats() { curl -sf "http://127.0.0.1:$cport/admin/stats${1:-}"; }
applied() { # [at least]: central's count of applied changes (once it reached that many,
  # or after 60 s); without a Python start per call
  local s
  s=$(stats "?latency=false${1:+&applied_at_least=$1&wait_s=60}") # no sorting of the samples
  [[ $s =~ \"applied\":([0-9]+) ]] && echo "${BASH_REMATCH[1]}"
}
until curl -sf "http://127.0.0.1:$cport/health" >/dev/null; do sleep 0.1; done

url="postgres://postgres@127.0.0.1:$port/wh?sslmode=disable"
{ sed "s/^max_changes = 500/max_changes = ${BENCH_MAX_CHANGES:-500}/" sql/demo_mapping.toml; printf "\n[[warehouses]]\nid = 'bench'\nurl = '%s'\n" "$url"; } >"$dir/run.toml"
export DB_URL="postgres://postgres@127.0.0.1:$port/state?sslmode=disable"
export WAREHOUSE_API_ENDPOINT="http://127.0.0.1:$cport/api/warehouse"
export INVENTORYSYNC_LOG=${BENCH_LOG:-warn}

cat >"$dir/steady.sql" <<'SQL'
\set sku random(1, 2000)
\set loc random(1, 91)
UPDATE stock_levels SET qty_on_hand = qty_on_hand + 1
 WHERE sku = 'SKU-' || :sku AND location_code IN (SELECT 'L-' || g FROM generate_series(:loc, :loc + 9) g);
SQL

wait_applied() { # target: waits until central has applied at least that many changes, in
  # requests that central answers only then (polling every 20 ms took a third of the two
  # cores from the run measured: a curl costs about 10 ms of CPU)
  local n
  until n=$(applied "$1") && [ "$n" -ge "$1" ]; do sleep 0.1; done
}

wait_jobs_done() { # until the state DB has no sync job queued or running: an initial load
  # stopped before it is done goes on in the next run, whose changes would count in a phase
  until [ "$("${psql[@]}" -d state -Atc "SELECT count(*) FROM sync_jobs WHERE status IN ('queued', 'running')")" = 0 ]; do
    sleep 0.1
  done
}

metric_of() { # API port, then samples as /metrics writes them (name{labels}): their values in
  # one line, 0 for one that is absent
  local m s out=()
  m=$(curl -sf "http://127.0.0.1:$1/metrics" || true)
  shift
  for s in "$@"; do
    out+=("$(awk -v s="$s" '$1 == s { v = $2 } END { print v + 0 }' <<<"$m")")
  done
  echo "${out[*]}"
}

load_stock() { # ROWS stock levels in transactions of 1,000 (2,000 SKUs at 100 locations, or more)
  for t in $(seq 0 $((ROWS / 1000 - 1))); do
    echo "INSERT INTO stock_levels (sku, location_code, qty_on_hand, qty_reserved)
          SELECT 'SKU-' || (1 + (($t * 1000 + g) % 2000)), 'L-' || (1 + (($t * 1000 + g) / 2000) % $locations), g % 50, g % 5
          FROM generate_series(0, 999) g ON CONFLICT DO NOTHING;"
  done | "${psql[@]}" -d wh >/dev/null
}
