-- The conflict workflow (PATCH /sync/conflicts/{id}, POST /sync/dead-letters/{id}/replay):
-- who closed a conflict, when and why; and each dead letter's latest replay and its result.
-- A conflict is `open`, `resolved` (by an operator, or by the engine once central holds the
-- warehouse's value: resolved_by `inventorysync`) or `ignored` (an operator chose to leave
-- central as it is).
ALTER TABLE sync_conflicts ADD COLUMN IF NOT EXISTS resolved_by text;
ALTER TABLE sync_conflicts ADD COLUMN IF NOT EXISTS resolution_note text;
ALTER TABLE sync_dead_letters ADD COLUMN IF NOT EXISTS replays integer NOT NULL DEFAULT 0;
ALTER TABLE sync_dead_letters ADD COLUMN IF NOT EXISTS replayed_at timestamptz;
ALTER TABLE sync_dead_letters ADD COLUMN IF NOT EXISTS replayed_by text;
-- applied, duplicate, stale, rejected, refused (central refused the request) or invalid
-- (it still breaks a rule here, and was not sent).
ALTER TABLE sync_dead_letters ADD COLUMN IF NOT EXISTS replay_outcome text;
ALTER TABLE sync_dead_letters ADD COLUMN IF NOT EXISTS replay_detail text;
CREATE INDEX IF NOT EXISTS sync_dead_letters_warehouse ON sync_dead_letters (warehouse_id, id);
