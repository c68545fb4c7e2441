-- The database cluster (system identifier) and timeline a checkpoint's positions belong to:
-- after a restore or a point-in-time recovery, positions of another history say nothing of
-- what central holds (see store::checkpoints::Origin).
ALTER TABLE replication_checkpoints
    ADD COLUMN IF NOT EXISTS system_id text,
    ADD COLUMN IF NOT EXISTS timeline integer;
