-- Operator control of runs: the status 'cancelled' and runs.cancel_requested_at.
-- Same meaning as migrations/postgres; see the comments there.
--
-- SQLite cannot change a CHECK constraint in place, so `runs` is rebuilt with
-- SQLite's documented procedure (https://sqlite.org/lang_altertable.html, "other
-- kinds of table schema changes"): create the new table, copy, drop the old one,
-- rename. Registry::migrate runs the SQLite migrations with foreign keys OFF on
-- its connection (a PRAGMA inside a transaction would be ignored): with them on,
-- dropping `runs` would delete every metrics row through ON DELETE CASCADE. It
-- checks the foreign keys afterwards. The references of `metrics` and
-- `checkpoints` name `runs`, so they point at the new table once it is renamed.

CREATE TABLE runs_0004 (
    id                  INTEGER PRIMARY KEY AUTOINCREMENT,
    status              TEXT    NOT NULL
                        CHECK (status IN ('queued', 'running', 'completed', 'failed',
                                          'interrupted', 'cancelled')),
    config              TEXT    NOT NULL,
    dataset             TEXT    NOT NULL,
    total_steps         INTEGER NOT NULL CHECK (total_steps > 0),
    current_step        INTEGER NOT NULL DEFAULT 0,
    host                TEXT,
    attempts            INTEGER NOT NULL DEFAULT 0,
    error               TEXT,
    created_at          INTEGER NOT NULL,
    started_at          INTEGER,
    finished_at         INTEGER,
    updated_at          INTEGER NOT NULL,
    heartbeat_at        INTEGER,
    retry_at            INTEGER,
    crashes             INTEGER NOT NULL DEFAULT 0,
    cancel_requested_at INTEGER
);

INSERT INTO runs_0004 (id, status, config, dataset, total_steps, current_step, host,
                       attempts, error, created_at, started_at, finished_at, updated_at,
                       heartbeat_at, retry_at, crashes)
SELECT id, status, config, dataset, total_steps, current_step, host,
       attempts, error, created_at, started_at, finished_at, updated_at,
       heartbeat_at, retry_at, crashes
FROM runs;

-- Ids are never reused: carry the AUTOINCREMENT counter over (the copy only
-- raised it to the highest id still present; a deleted newest run is above it).
INSERT INTO sqlite_sequence (name, seq)
SELECT 'runs_0004', 0 WHERE NOT EXISTS (SELECT 1 FROM sqlite_sequence WHERE name = 'runs_0004');
UPDATE sqlite_sequence
SET seq = MAX(seq, COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'runs'), 0))
WHERE name = 'runs_0004';

DROP TABLE runs;
ALTER TABLE runs_0004 RENAME TO runs;
CREATE INDEX runs_status_id ON runs (status, id);
