-- Tables are loaded by themselves (issue 39): a table that joins the publication, or whose
-- mapping is new or changed, gets a `load` job for that table alone while streaming goes on.
-- Per warehouse and relation, what the last load of it covered: the mapping's fingerprint
-- then ('unmapped' when no mapping named it).
CREATE TABLE IF NOT EXISTS table_loads (
    warehouse_id  text        NOT NULL,
    relation_oid  bigint      NOT NULL,
    table_name    text        NOT NULL,
    fingerprint   text        NOT NULL,
    job_id        text,
    loaded_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (warehouse_id, relation_oid)
);
-- A load of some tables only (null: every published table).
ALTER TABLE sync_jobs ADD COLUMN IF NOT EXISTS tables text[];
-- A table that vanished (dropped, unpublished) while a load or resync read it: why it was
-- skipped; the job goes on with the others.
ALTER TABLE sync_resync_progress ADD COLUMN IF NOT EXISTS skipped text;
