-- A run's world (size and device of each rank) and the key a launcher created it
-- under. Same columns and meaning as migrations/postgres/0006; see the comments there.
-- Nullable columns without defaults, so SQLite adds them in place (no rebuild).

ALTER TABLE runs ADD COLUMN world_size INTEGER;
ALTER TABLE runs ADD COLUMN rank_devices TEXT;
ALTER TABLE runs ADD COLUMN launch_key TEXT;
CREATE UNIQUE INDEX runs_launch_key ON runs (launch_key);
