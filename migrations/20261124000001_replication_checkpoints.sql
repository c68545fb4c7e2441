-- Where each warehouse's stream is durable up to: the highest commit end LSN whose events are
-- all acknowledged downstream. Only ever moves forward (see store::checkpoints).
CREATE TABLE IF NOT EXISTS replication_checkpoints (
    warehouse_id text PRIMARY KEY,
    slot_name    text        NOT NULL,
    flush_lsn    pg_lsn      NOT NULL,
    updated_at   timestamptz NOT NULL DEFAULT now()
);
