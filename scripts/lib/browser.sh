# Sourced by scripts/test: Debian's Chromium and playwright-core for the console's browser
# test (tests/it/console.rs), installed once when missing. Exports INVENTORYSYNC_TEST_CHROMIUM
# and INVENTORYSYNC_TEST_PLAYWRIGHT.
playwright_version=1.64.1
playwright_dir="${XDG_CACHE_HOME:-$HOME/.cache}/inventorysync/playwright"
chromium_bin=$(command -v chromium || true)
if [ -z "$chromium_bin" ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "scripts/test: installing Debian's chromium for the console test (once)" >&2
    apt-get install -y -qq chromium >/dev/null 2>&1 || { apt-get update -qq >/dev/null && apt-get install -y -qq chromium >/dev/null; }
    chromium_bin=$(command -v chromium)
  else
    echo "scripts/test: chromium is missing (apt-get install chromium); the console test will fail" >&2
    chromium_bin=/usr/bin/chromium
  fi
fi
if [ ! -f "$playwright_dir/node_modules/playwright-core/package.json" ]; then
  echo "scripts/test: installing playwright-core $playwright_version for the console test (once)" >&2
  mkdir -p "$playwright_dir"
  npm install --silent --no-audit --no-fund --prefix "$playwright_dir" "playwright-core@$playwright_version" >/dev/null
fi
export INVENTORYSYNC_TEST_CHROMIUM="$chromium_bin"
export INVENTORYSYNC_TEST_PLAYWRIGHT="$playwright_dir/node_modules/playwright-core"
