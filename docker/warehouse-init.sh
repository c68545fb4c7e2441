#!/bin/sh
# Runs once in a fresh warehouse container (docker-entrypoint-initdb.d): the demo schema, its
# seed data (WAREHOUSE_NUMBER varies the quantities) and the publication.
set -e
psql -v ON_ERROR_STOP=1 -U "$POSTGRES_USER" -d "$POSTGRES_DB" -f /demo/demo_schema.sql
psql -v ON_ERROR_STOP=1 -U "$POSTGRES_USER" -d "$POSTGRES_DB" -v wh="${WAREHOUSE_NUMBER:-1}" -f /demo/demo_seed.sql
