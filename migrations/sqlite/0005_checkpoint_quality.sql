-- Same table, columns and meaning as migrations/postgres/0005; see the comments there.
-- The quality score of an EMA checkpoint (issue 9), computed by the trainer with a
-- class probe trained on the run's own data (see crates/ddpm-trainer/src/quality).
-- Keyed by (run, step) rather than by checkpoint id, so that the score survives the
-- retention that later deletes the checkpoint's row: the scores of a run form a
-- series like its metrics. `checkpoint_id` is the EMA checkpoint scored (its row may
-- be gone since). A checkpoint written again at the same step (a resumed attempt
-- replays it) replaces the row. Values that could not be computed are NULL.

CREATE TABLE checkpoint_scores (
    run_id            INTEGER          NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    step              INTEGER          NOT NULL,
    checkpoint_id     INTEGER          NOT NULL,
    -- generated images per class (K) and held-out real images compared with
    samples_per_class INTEGER          NOT NULL,
    holdout_images    INTEGER          NOT NULL,
    -- the fraction of samples the probe assigns to the class asked for
    class_accuracy    REAL            ,
    -- Fréchet distance (probe features) samples vs held-out images, and the same for
    -- as many real training images (the floor a perfect model would reach)
    fd                REAL            ,
    fd_floor          REAL            ,
    -- kernel inception distance in the same features: unbiased mean and std over subsets
    kid               REAL            ,
    kid_std           REAL            ,
    -- mean within-class feature distance of samples over that of real images (1 = as varied)
    diversity         REAL            ,
    -- the probe's own accuracy on the held-out images
    probe_accuracy    REAL            ,
    -- JSON: sampler, steps, guidance scale, seed, subsets, feature width
    settings          TEXT             NOT NULL,
    seconds           REAL             NOT NULL,
    created_at        INTEGER          NOT NULL,
    PRIMARY KEY (run_id, step)
);

CREATE TABLE checkpoint_promotions (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    checkpoint_id INTEGER NOT NULL REFERENCES checkpoints (id) ON DELETE CASCADE,
    run_id        INTEGER NOT NULL,
    step          INTEGER NOT NULL,
    promoted_by   TEXT    NOT NULL,
    reason        TEXT    NOT NULL,
    created_at    INTEGER NOT NULL,
    revoked_at    INTEGER,
    revoked_by    TEXT
);

CREATE INDEX checkpoint_promotions_checkpoint ON checkpoint_promotions (checkpoint_id);
