-- The `run` processes sharing this state DB, one row each: a heartbeat with an expiry, and
-- the warehouses the process owns (it holds their advisory locks on its lease connection).
-- Every process balances ownership over the live rows (expires_at in the future, not
-- draining): each owns ⌊N/P⌋ or ⌈N/P⌉ of the N warehouses. A process restarted under the same
-- worker_id before its row expired takes its row back, so a quick restart moves nothing.
CREATE TABLE IF NOT EXISTS sync_workers (
    worker_id    text        PRIMARY KEY,
    -- Which start of the process writes the row: another with the same worker_id takes it.
    session      text        NOT NULL,
    host         text        NOT NULL,
    pid          integer     NOT NULL,
    api          text        NOT NULL,
    version      text        NOT NULL,
    started_at   timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL,
    -- Set at SIGTERM: the process hands its warehouses over and counts no more.
    draining     boolean     NOT NULL DEFAULT false,
    owned        text[]      NOT NULL DEFAULT '{}'
);
