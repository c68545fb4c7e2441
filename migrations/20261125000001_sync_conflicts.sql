-- Changes that did not simply apply at central: what happened, both sides, and what an
-- operator can do about it. Ops read it with `SELECT * FROM sync_conflicts`.
CREATE TABLE IF NOT EXISTS sync_conflicts (
    id              bigserial PRIMARY KEY,
    warehouse_id    text        NOT NULL,
    table_name      text        NOT NULL,
    entity          text,
    entity_key      jsonb       NOT NULL,
    -- stale_version: central holds a newer version; rejected: central refused the change;
    -- invalid: a business rule failed before sending; truncate: a table was truncated.
    kind            text        NOT NULL,
    rule            text,
    reason          text        NOT NULL,
    source_version  text        NOT NULL,
    central_version text,
    source_value    jsonb,
    central_value   jsonb,
    dead_lettered   boolean     NOT NULL DEFAULT false,
    hint            text        NOT NULL,
    status          text        NOT NULL DEFAULT 'open',
    created_at      timestamptz NOT NULL DEFAULT now(),
    resolved_at     timestamptz
);
-- A replayed change records its conflict once.
CREATE UNIQUE INDEX IF NOT EXISTS sync_conflicts_once
    ON sync_conflicts (warehouse_id, table_name, source_version, kind, entity_key);
CREATE INDEX IF NOT EXISTS sync_conflicts_open
    ON sync_conflicts (warehouse_id, status, created_at);

-- The dead-letter queue of the embedded bus (with Kafka it is the inventorysync.dlq topic).
CREATE TABLE IF NOT EXISTS sync_dead_letters (
    id             bigserial PRIMARY KEY,
    warehouse_id   text        NOT NULL,
    table_name     text        NOT NULL,
    source_version text        NOT NULL,
    rule           text        NOT NULL,
    reason         text        NOT NULL,
    event          jsonb,
    raw_event      bytea       NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    UNIQUE (warehouse_id, table_name, source_version, rule)
);

-- Per warehouse, the highest version the consumer stage has sent to central (written before
-- the request). A `stale` answer naming a version at or below it is our own newer change,
-- applied before a replay: superseded, not a conflict.
CREATE TABLE IF NOT EXISTS consumer_progress (
    warehouse_id text PRIMARY KEY,
    sent_version text        NOT NULL,
    updated_at   timestamptz NOT NULL DEFAULT now()
);
