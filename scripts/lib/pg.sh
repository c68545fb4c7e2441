# Shared by the scripts: PostgreSQL server binaries (installed from Debian's packages when
# missing and running as root), a throwaway server and a few helpers.
# Source it; it defines pg_bin, as_pg, free_port, start_pg DIR PORT, stop_pg DIR, machine_line.

find_pg_bin() {
  for v in 15 16 17 14; do
    if [ -x "/usr/lib/postgresql/$v/bin/initdb" ]; then echo "/usr/lib/postgresql/$v/bin"; return 0; fi
  done
  return 1
}

if ! pg_bin=$(find_pg_bin); then
  if [ "$(id -u)" = 0 ]; then
    echo "$0: installing the PostgreSQL server packages (once)" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql-15 >/dev/null \
      || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  fi
  pg_bin=$(find_pg_bin) || { echo "$0: no PostgreSQL server binaries (install postgresql-15)" >&2; exit 1; }
fi

as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# start_pg DIR PORT: initdb into DIR/data and start with wal_level=logical (fsync off: the
# benchmarks measure the streaming path, not the disk; BENCH_PG_DURABLE=1 keeps fsync and full
# page writes on, as a production server has them).
start_pg() {
  local dir=$1 port=$2 durable="-c fsync=off -c full_page_writes=off"
  [ "${BENCH_PG_DURABLE:-0}" = 1 ] && durable=""
  [ "$(id -u)" = 0 ] && chown postgres "$dir"
  as_pg "$pg_bin/initdb" -D "$dir/data" -A trust -U postgres -E UTF8 --no-sync >/dev/null
  as_pg "$pg_bin/pg_ctl" -D "$dir/data" -l "$dir/log" -w start -o "-c port=$port -c listen_addresses=127.0.0.1 \
    -c unix_socket_directories=$dir -c wal_level=logical -c max_wal_senders=20 -c max_replication_slots=20 \
    -c shared_buffers=256MB -c max_wal_size=8GB $durable" >/dev/null
}

stop_pg() { as_pg "$pg_bin/pg_ctl" -D "$1/data" -m immediate stop >/dev/null 2>&1 || true; }

machine_line() {
  echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB; PostgreSQL $("$pg_bin/postgres" --version | awk '{print $3}')$([ "${BENCH_PG_DURABLE:-0}" = 1 ] && echo ' (fsync on)')"
}
