-- A new conflict is skipped while an open one already says the same of the same entity (a
-- resync reading a row that is still invalid); this index makes that check one lookup.
CREATE INDEX IF NOT EXISTS sync_conflicts_open_entity
    ON sync_conflicts (warehouse_id, table_name, entity_key, kind) WHERE status = 'open';
