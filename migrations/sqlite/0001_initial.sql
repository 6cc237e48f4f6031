-- Runs, their metric series and their checkpoints.
-- Same tables, columns and meaning as migrations/postgres; see the comments there.
-- Timestamps are unix milliseconds (INTEGER), JSON documents are TEXT.

CREATE TABLE runs (
    -- AUTOINCREMENT: ids are never reused, so "newest = highest id" holds
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    status       TEXT    NOT NULL
                 CHECK (status IN ('queued', 'running', 'completed', 'failed', 'interrupted')),
    config       TEXT    NOT NULL,
    dataset      TEXT    NOT NULL,
    total_steps  INTEGER NOT NULL CHECK (total_steps > 0),
    current_step INTEGER NOT NULL DEFAULT 0,
    host         TEXT,
    attempts     INTEGER NOT NULL DEFAULT 0,
    error        TEXT,
    created_at   INTEGER NOT NULL,
    started_at   INTEGER,
    finished_at  INTEGER,
    updated_at   INTEGER NOT NULL,
    heartbeat_at INTEGER
);

CREATE INDEX runs_status_id ON runs (status, id);

CREATE TABLE metrics (
    run_id         INTEGER NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    step           INTEGER NOT NULL,
    loss           REAL,
    learning_rate  REAL,
    grad_norm      REAL,
    images_per_sec REAL,
    recorded_at    INTEGER NOT NULL,
    PRIMARY KEY (run_id, step)
) WITHOUT ROWID;

CREATE TABLE checkpoints (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id     INTEGER NOT NULL REFERENCES runs (id),
    step       INTEGER NOT NULL,
    kind       TEXT    NOT NULL CHECK (kind IN ('ema', 'state')),
    path       TEXT    NOT NULL UNIQUE,
    size_bytes INTEGER NOT NULL CHECK (size_bytes >= 0),
    sha256     TEXT    NOT NULL CHECK (length(sha256) = 64),
    created_at INTEGER NOT NULL
);

CREATE INDEX checkpoints_kind_id ON checkpoints (kind, id);
CREATE INDEX checkpoints_run_kind_id ON checkpoints (run_id, kind, id);
