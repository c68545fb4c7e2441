-- Sync cycles and forced resyncs (POST /sync/trigger, POST /sync/warehouses/{id}); they
-- survive restarts: any `run` process picks up queued and running jobs.
CREATE TABLE IF NOT EXISTS sync_jobs (
    id          text PRIMARY KEY,
    seq         bigserial   NOT NULL UNIQUE,
    -- cycle: every change committed before the trigger has an outcome; resync: re-read tables.
    kind        text        NOT NULL,
    -- queued, running, succeeded, failed
    status      text        NOT NULL DEFAULT 'queued',
    error       text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    started_at  timestamptz,
    finished_at timestamptz,
    deadline    timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS sync_jobs_active ON sync_jobs (status) WHERE status IN ('queued', 'running');

-- Each warehouse of a job: the WAL position to reach and how far it got.
CREATE TABLE IF NOT EXISTS sync_job_warehouses (
    job_id             text   NOT NULL REFERENCES sync_jobs (id) ON DELETE CASCADE,
    warehouse_id       text   NOT NULL,
    target_lsn         pg_lsn,
    delivered_lsn      pg_lsn,
    -- consumer_progress.delivered when the job started: changes delivered = now - this.
    delivered_baseline bigint,
    changes_delivered  bigint NOT NULL DEFAULT 0,
    conflicts          bigint NOT NULL DEFAULT 0,
    dead_letters       bigint NOT NULL DEFAULT 0,
    done               boolean NOT NULL DEFAULT false,
    error              text,
    PRIMARY KEY (job_id, warehouse_id)
);

-- Changes with an outcome at central, per warehouse (jobs report the difference).
ALTER TABLE consumer_progress ADD COLUMN IF NOT EXISTS delivered bigint NOT NULL DEFAULT 0;
