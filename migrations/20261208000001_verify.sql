-- Verify jobs (POST /sync/verify, issue 41). A job's options: `repair` (fix what it finds),
-- `strict` (a cycle with verify: it fails unless central equals the warehouse), `tables`.
ALTER TABLE sync_jobs ADD COLUMN IF NOT EXISTS options jsonb;
-- Per warehouse of a verify job: rows compared, findings per kind, repairs, what could not
-- be checked and why (JSON, rewritten after each chunk).
ALTER TABLE sync_job_warehouses ADD COLUMN IF NOT EXISTS verify jsonb;
-- Pairs (next xid, WAL position) read at one moment on a warehouse: a transaction whose xid
-- is at or above next_xid committed after lsn. A verify reads in a row's xmin that central's
-- version is from before the row's last change (`older_at_central`).
CREATE TABLE IF NOT EXISTS warehouse_xid_positions (
    warehouse_id text        NOT NULL,
    next_xid     bigint      NOT NULL,
    lsn          pg_lsn      NOT NULL,
    recorded_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (warehouse_id, next_xid)
);
