-- Runs, their metric series and their checkpoints.
-- Timestamps are unix milliseconds (BIGINT) taken from the database clock, the
-- same representation as in migrations/sqlite, so one set of queries serves both.
-- JSON documents are TEXT for the same reason.

CREATE TABLE runs (
    id           BIGSERIAL PRIMARY KEY,
    status       TEXT   NOT NULL
                 CHECK (status IN ('queued', 'running', 'completed', 'failed', 'interrupted')),
    -- the run's full training config, JSON
    config       TEXT   NOT NULL,
    -- the dataset's summary (path, image count, class names), JSON
    dataset      TEXT   NOT NULL,
    total_steps  BIGINT NOT NULL CHECK (total_steps > 0),
    current_step BIGINT NOT NULL DEFAULT 0,
    -- the worker that holds (or last held) the run
    host         TEXT,
    -- how many times the run was claimed (1 + resumptions)
    attempts     BIGINT NOT NULL DEFAULT 0,
    -- why a failed run failed
    error        TEXT,
    created_at   BIGINT NOT NULL,
    started_at   BIGINT,
    finished_at  BIGINT,
    updated_at   BIGINT NOT NULL,
    heartbeat_at BIGINT
);

-- The queue (oldest queued first) and the status filter of listings.
CREATE INDEX runs_status_id ON runs (status, id);

CREATE TABLE metrics (
    run_id         BIGINT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    step           BIGINT NOT NULL,
    -- NULL stands for NaN (a diverged step) on both backends
    loss           DOUBLE PRECISION,
    learning_rate  DOUBLE PRECISION,
    grad_norm      DOUBLE PRECISION,
    images_per_sec DOUBLE PRECISION,
    recorded_at    BIGINT NOT NULL,
    PRIMARY KEY (run_id, step)
);

CREATE TABLE checkpoints (
    id         BIGSERIAL PRIMARY KEY,
    run_id     BIGINT NOT NULL REFERENCES runs (id),
    step       BIGINT NOT NULL,
    kind       TEXT   NOT NULL CHECK (kind IN ('ema', 'state')),
    -- relative to the checkpoint store's root, '/'-separated
    path       TEXT   NOT NULL UNIQUE,
    size_bytes BIGINT NOT NULL CHECK (size_bytes >= 0),
    -- lowercase hex SHA-256 of the file
    sha256     TEXT   NOT NULL CHECK (length(sha256) = 64),
    created_at BIGINT NOT NULL
);

-- The newest checkpoint of a kind, overall and per run.
CREATE INDEX checkpoints_kind_id ON checkpoints (kind, id);
CREATE INDEX checkpoints_run_kind_id ON checkpoints (run_id, kind, id);
