-- Which relations at a warehouse each configured mapping is bound to (issue 39): a mapping
-- names a table, but binds to the relation (its OID), so that it still holds once the table
-- is renamed or moved to another schema, also across restarts. A relation's row stays while
-- it exists: changes still in the WAL name it by its old name.
CREATE TABLE IF NOT EXISTS mapping_bindings (
    warehouse_id  text        NOT NULL,
    relation_oid  bigint      NOT NULL,
    -- The mapping's table as the configuration names it (`schema.table`).
    mapped_table  text        NOT NULL,
    -- The relation's name when it was last seen (`schema.table`).
    current_name  text        NOT NULL,
    -- The fingerprint of the mapping (entity, key and data fields) when the consumer stage
    -- last bound it: a change resets the warehouse's lane positions (consumer_lanes), whose
    -- lanes come from the key's hash.
    fingerprint   text,
    bound_at      timestamptz NOT NULL DEFAULT now(),
    seen_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (warehouse_id, relation_oid)
);
