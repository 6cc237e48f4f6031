-- When a deferred run may next be tried. Same column and meaning as
-- migrations/postgres; see the comment there.

ALTER TABLE runs ADD COLUMN retry_at INTEGER;
ALTER TABLE runs ADD COLUMN crashes INTEGER NOT NULL DEFAULT 0;
