-- Prepares one warehouse database for InventorySync. Run as a superuser (or the owner of the
-- tables) in the warehouse database. Replace the role name and password.
--
-- 1. Server setting (postgresql.conf, needs a restart):
--      wal_level = logical
--      max_replication_slots >= 1 per warehouse database (default 10)
--      max_wal_senders       >= 1 per warehouse database (default 10)
--    Recommended: max_slot_wal_keep_size = '10GB' (a cap on WAL a stalled slot may retain;
--    past it the slot is invalidated and InventorySync stops with a clear error instead of
--    filling the disk).
--
-- 2. A login role that may replicate and read the published tables.
CREATE ROLE inventorysync WITH LOGIN REPLICATION PASSWORD 'change-me';
GRANT USAGE ON SCHEMA public TO inventorysync;
GRANT SELECT ON ALL TABLES IN SCHEMA public TO inventorysync;  -- initial load and resync read them
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT ON TABLES TO inventorysync;
-- pg_hba.conf needs a line for replication connections too, for example:
--   host  replication  inventorysync  10.0.0.0/8  scram-sha-256
--   host  all          inventorysync  10.0.0.0/8  scram-sha-256

-- 3. The publication: the tables InventorySync streams.
CREATE PUBLICATION inventorysync FOR TABLE stock_levels, products, locations;

-- 4. Replica identity. With a primary key (the default identity) updates and deletes carry the
--    key, which is all the central system needs. Use FULL on tables whose updates must carry
--    the whole old row (the `before` image), or whose large (TOASTed) columns must never be
--    left out of `after` when unchanged:
-- ALTER TABLE stock_levels REPLICA IDENTITY FULL;
-- A table without a primary key needs a unique index as identity, or FULL:
-- ALTER TABLE locations REPLICA IDENTITY USING INDEX locations_code_key;

-- 5. The engine creates its slot itself (inventorysync_<warehouse_id>, plugin pgoutput) with an
--    exported snapshot, reads the published tables in that snapshot (ACCESS SHARE locks only,
--    as any SELECT), then streams from the slot. To watch it:
-- SELECT slot_name, active, wal_status, confirmed_flush_lsn,
--        pg_size_pretty(pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)) AS retained_wal
--   FROM pg_replication_slots WHERE slot_name LIKE 'inventorysync_%';
-- To detach a warehouse for good (otherwise the slot keeps WAL forever):
-- SELECT pg_drop_replication_slot('inventorysync_wh_east');
