# Sourced by scripts/test: schemathesis (the OpenAPI fuzzer) in a virtual environment of its
# own for api::schemathesis_finds_no_answer_the_openapi_document_does_not_allow, installed
# once when missing. Exports INVENTORYSYNC_TEST_SCHEMATHESIS (its `st`).
schemathesis_version=4.32.5
schemathesis_dir="${XDG_CACHE_HOME:-$HOME/.cache}/inventorysync/schemathesis"
if ! "$schemathesis_dir/bin/st" --version 2>/dev/null | grep -q "$schemathesis_version"; then
  echo "scripts/test: installing schemathesis $schemathesis_version for the OpenAPI test (once)" >&2
  rm -rf "$schemathesis_dir"
  python3 -m venv "$schemathesis_dir"
  "$schemathesis_dir/bin/pip" install -q --disable-pip-version-check "schemathesis==$schemathesis_version" >/dev/null
fi
export INVENTORYSYNC_TEST_SCHEMATHESIS="$schemathesis_dir/bin/st"
