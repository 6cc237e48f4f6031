//! Checkpoint scores: how good the samples of an EMA checkpoint are, as the trainer
//! measured them with the run's class probe (issue 9). One row per `(run, step)`, so
//! a run's scores are a series that outlives the retention of the checkpoints
//! themselves; the trainer records a score in the same transaction as its
//! checkpoint's row ([`LeasedRun::register_scored_checkpoint`](crate::LeasedRun)).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::{Any, Executor};

use crate::db::{from_millis, run_fk, Backend, Registry};
use crate::error::{RegistryError, Result};

/// What the trainer measured on one EMA checkpoint. Every value that could not be
/// computed (or is not finite) is `None`; SQLite cannot store NaN.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScoreValues {
    /// Generated images per class (K).
    pub samples_per_class: i64,
    /// Held-out real images the samples are compared with.
    pub holdout_images: i64,
    /// The fraction of samples that the probe assigns to the class asked for.
    pub class_accuracy: Option<f64>,
    /// Fréchet distance between the samples and the held-out images in the probe's
    /// penultimate features.
    pub fd: Option<f64>,
    /// The same distance for as many real training images as there are samples: what a
    /// model that draws the data exactly would score at this N.
    pub fd_floor: Option<f64>,
    /// Kernel inception distance (unbiased MMD² with the cubic polynomial kernel) in the
    /// same features, averaged over subsets.
    pub kid: Option<f64>,
    /// Its standard deviation over the subsets.
    pub kid_std: Option<f64>,
    /// Mean within-class distance between samples' features over the same for real
    /// images, averaged over classes: 1 is as varied as the data, near 0 a collapse.
    pub diversity: Option<f64>,
    /// The probe's own accuracy on the held-out real images: scores from a probe that
    /// cannot tell the real classes apart mean little.
    pub probe_accuracy: Option<f64>,
    /// How the samples were drawn and scored (sampler, steps, guidance, seed, …).
    pub settings: serde_json::Value,
    /// Wall-clock seconds the scoring took (sampling included).
    pub seconds: f64,
}

/// A recorded score.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointScore {
    pub run_id: i64,
    pub step: i64,
    /// The EMA checkpoint scored; its row may since have gone to retention.
    pub checkpoint_id: i64,
    #[serde(flatten)]
    pub values: ScoreValues,
    pub created_at: DateTime<Utc>,
}

const SCORE_COLUMNS: &str = "run_id, step, checkpoint_id, samples_per_class, holdout_images, \
     class_accuracy, fd, fd_floor, kid, kid_std, diversity, probe_accuracy, settings, seconds, \
     created_at";

#[derive(sqlx::FromRow)]
struct ScoreRow {
    run_id: i64,
    step: i64,
    checkpoint_id: i64,
    samples_per_class: i64,
    holdout_images: i64,
    class_accuracy: Option<f64>,
    fd: Option<f64>,
    fd_floor: Option<f64>,
    kid: Option<f64>,
    kid_std: Option<f64>,
    diversity: Option<f64>,
    probe_accuracy: Option<f64>,
    settings: String,
    seconds: f64,
    created_at: i64,
}

impl TryFrom<ScoreRow> for CheckpointScore {
    type Error = RegistryError;

    fn try_from(row: ScoreRow) -> Result<CheckpointScore> {
        let settings =
            serde_json::from_str(&row.settings).map_err(|e| RegistryError::CorruptRow {
                table: "checkpoint_scores",
                id: row.checkpoint_id,
                reason: format!("settings: {e}"),
            })?;
        Ok(CheckpointScore {
            run_id: row.run_id,
            step: row.step,
            checkpoint_id: row.checkpoint_id,
            values: ScoreValues {
                samples_per_class: row.samples_per_class,
                holdout_images: row.holdout_images,
                class_accuracy: row.class_accuracy,
                fd: row.fd,
                fd_floor: row.fd_floor,
                kid: row.kid,
                kid_std: row.kid_std,
                diversity: row.diversity,
                probe_accuracy: row.probe_accuracy,
                settings,
                seconds: row.seconds,
            },
            created_at: from_millis("checkpoint_scores", row.checkpoint_id, row.created_at)?,
        })
    }
}

/// Not finite as NULL (SQLite stores NaN as NULL anyway; this makes both backends agree).
fn finite(x: Option<f64>) -> Option<f64> {
    x.filter(|v| v.is_finite())
}

/// Records (or replaces) the score of the checkpoint `checkpoint_id` of `run_id` at `step`.
pub(crate) async fn upsert_score<'e>(
    ex: impl Executor<'e, Database = Any>,
    backend: Backend,
    run_id: i64,
    step: i64,
    checkpoint_id: i64,
    v: &ScoreValues,
) -> Result<()> {
    let now = backend.now_ms();
    let sql = format!(
        "INSERT INTO checkpoint_scores ({SCORE_COLUMNS}) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, {now}) \
         ON CONFLICT (run_id, step) DO UPDATE SET checkpoint_id = excluded.checkpoint_id, \
             samples_per_class = excluded.samples_per_class, \
             holdout_images = excluded.holdout_images, \
             class_accuracy = excluded.class_accuracy, fd = excluded.fd, \
             fd_floor = excluded.fd_floor, kid = excluded.kid, kid_std = excluded.kid_std, \
             diversity = excluded.diversity, probe_accuracy = excluded.probe_accuracy, \
             settings = excluded.settings, seconds = excluded.seconds, \
             created_at = excluded.created_at"
    );
    sqlx::query(&sql)
        .bind(run_id)
        .bind(step)
        .bind(checkpoint_id)
        .bind(v.samples_per_class)
        .bind(v.holdout_images)
        .bind(finite(v.class_accuracy))
        .bind(finite(v.fd))
        .bind(finite(v.fd_floor))
        .bind(finite(v.kid))
        .bind(finite(v.kid_std))
        .bind(finite(v.diversity))
        .bind(finite(v.probe_accuracy))
        .bind(v.settings.to_string())
        .bind(if v.seconds.is_finite() {
            v.seconds
        } else {
            0.0
        })
        .execute(ex)
        .await
        .map_err(run_fk(run_id))?;
    Ok(())
}

async fn select_run_scores<'e>(
    ex: impl Executor<'e, Database = Any>,
    run_id: i64,
) -> Result<Vec<CheckpointScore>> {
    let sql =
        format!("SELECT {SCORE_COLUMNS} FROM checkpoint_scores WHERE run_id = $1 ORDER BY step");
    let rows: Vec<ScoreRow> = sqlx::query_as(&sql).bind(run_id).fetch_all(ex).await?;
    rows.into_iter().map(CheckpointScore::try_from).collect()
}

async fn select_score<'e>(
    ex: impl Executor<'e, Database = Any>,
    run_id: i64,
    step: i64,
) -> Result<Option<CheckpointScore>> {
    let sql =
        format!("SELECT {SCORE_COLUMNS} FROM checkpoint_scores WHERE run_id = $1 AND step = $2");
    let row: Option<ScoreRow> = sqlx::query_as(&sql)
        .bind(run_id)
        .bind(step)
        .fetch_optional(ex)
        .await?;
    row.map(CheckpointScore::try_from).transpose()
}

impl Registry {
    /// Records the score of a checkpoint outside any lease (re-scoring an existing
    /// checkpoint by hand or in a test); replaces an earlier score of the same step.
    #[tracing::instrument(skip(self, values))]
    pub async fn record_score(
        &self,
        run_id: i64,
        step: i64,
        checkpoint_id: i64,
        values: &ScoreValues,
    ) -> Result<()> {
        upsert_score(
            &self.pool,
            self.backend,
            run_id,
            step,
            checkpoint_id,
            values,
        )
        .await
    }

    /// The scores of run `run_id`, by step (also those whose checkpoint is gone).
    #[tracing::instrument(skip(self))]
    pub async fn scores(&self, run_id: i64) -> Result<Vec<CheckpointScore>> {
        select_run_scores(&self.pool, run_id).await
    }

    /// The score recorded for run `run_id` at `step`, if any.
    #[tracing::instrument(skip(self))]
    pub async fn score_at(&self, run_id: i64, step: i64) -> Result<Option<CheckpointScore>> {
        select_score(&self.pool, run_id, step).await
    }
}
