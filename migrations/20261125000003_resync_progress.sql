-- A forced resync's progress per table, saved after each chunk is delivered: a restarted
-- resync continues after the last saved key.
CREATE TABLE IF NOT EXISTS sync_resync_progress (
    job_id        text    NOT NULL REFERENCES sync_jobs (id) ON DELETE CASCADE,
    warehouse_id  text    NOT NULL,
    table_name    text    NOT NULL,
    -- The primary key (text of each column) of the last row delivered.
    last_key      jsonb,
    chunks        bigint  NOT NULL DEFAULT 0,
    rows_read     bigint  NOT NULL DEFAULT 0,
    rows_emitted  bigint  NOT NULL DEFAULT 0,
    done          boolean NOT NULL DEFAULT false,
    PRIMARY KEY (job_id, warehouse_id, table_name)
);
