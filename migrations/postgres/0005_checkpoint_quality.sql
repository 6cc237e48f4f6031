-- The quality score of an EMA checkpoint (issue 9), computed by the trainer with a
-- class probe trained on the run's own data (see crates/ddpm-trainer/src/quality).
-- Keyed by (run, step) rather than by checkpoint id, so that the score survives the
-- retention that later deletes the checkpoint's row: the scores of a run form a
-- series like its metrics. `checkpoint_id` is the EMA checkpoint scored (its row may
-- be gone since). A checkpoint written again at the same step (a resumed attempt
-- replays it) replaces the row. Values that could not be computed are NULL.

CREATE TABLE checkpoint_scores (
    run_id            BIGINT           NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    step              BIGINT           NOT NULL,
    checkpoint_id     BIGINT           NOT NULL,
    -- generated images per class (K) and held-out real images compared with
    samples_per_class BIGINT           NOT NULL,
    holdout_images    BIGINT           NOT NULL,
    -- the fraction of samples the probe assigns to the class asked for
    class_accuracy    DOUBLE PRECISION,
    -- Fréchet distance (probe features) samples vs held-out images, and the same for
    -- as many real training images (the floor a perfect model would reach)
    fd                DOUBLE PRECISION,
    fd_floor          DOUBLE PRECISION,
    -- kernel inception distance in the same features: unbiased mean and std over subsets
    kid               DOUBLE PRECISION,
    kid_std           DOUBLE PRECISION,
    -- mean within-class feature distance of samples over that of real images (1 = as varied)
    diversity         DOUBLE PRECISION,
    -- the probe's own accuracy on the held-out images
    probe_accuracy    DOUBLE PRECISION,
    -- JSON: sampler, steps, guidance scale, seed, subsets, feature width
    settings          TEXT             NOT NULL,
    seconds           DOUBLE PRECISION NOT NULL,
    created_at        BIGINT           NOT NULL,
    PRIMARY KEY (run_id, step)
);

-- Promotions (issue 9): an operator's choice of the checkpoint to serve under the
-- server's `promoted` policy, with who made it, when and why. The one in force is the
-- newest that is not revoked; a rollback revokes it (the row stays, as history), which
-- puts the one before it back in force. A promoted checkpoint is kept by retention;
-- deleting its run deletes its promotions.

CREATE TABLE checkpoint_promotions (
    id            BIGSERIAL PRIMARY KEY,
    checkpoint_id BIGINT NOT NULL REFERENCES checkpoints (id) ON DELETE CASCADE,
    run_id        BIGINT NOT NULL,
    step          BIGINT NOT NULL,
    promoted_by   TEXT   NOT NULL,
    reason        TEXT   NOT NULL,
    created_at    BIGINT NOT NULL,
    revoked_at    BIGINT,
    revoked_by    TEXT
);

CREATE INDEX checkpoint_promotions_checkpoint ON checkpoint_promotions (checkpoint_id);
