//! The run history as the API shows it: the registry's records mirrored field by field
//! (the conversions destructure them whole, so a field added to the registry does not
//! compile until it is added here, and so to the document).

use chrono::{DateTime, Utc};
use ddpm_registry::{
    CheckpointKind, CheckpointRecord, CheckpointScore, MetricPoint, Run, RunStatus, RunWorld,
    ScoreValues,
};
use serde::Serialize;
use utoipa::{
    openapi::{ObjectBuilder, Type},
    ToSchema,
};

/// A training run.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Run)]
pub struct RunBody {
    pub id: i64,
    #[schema(schema_with = run_status_schema)]
    pub status: RunStatus,
    /// The full training config it was queued with.
    #[schema(value_type = Object)]
    pub config: serde_json::Value,
    /// The dataset's summary: path, image count, class names.
    #[schema(value_type = Object)]
    pub dataset: serde_json::Value,
    pub total_steps: i64,
    /// The step of the newest heartbeat.
    pub current_step: i64,
    /// The worker that holds the run, or held it last.
    pub host: Option<String>,
    /// How many times the run was claimed (1 for a run never resumed).
    pub attempts: i64,
    /// Why a failed run failed, or why an interrupted one was deferred.
    pub error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub updated_at: DateTime<Utc>,
    /// The worker's latest sign of life.
    pub heartbeat_at: Option<DateTime<Utc>>,
    /// A deferred run is not resumed before this (null: no delay).
    pub retry_at: Option<DateTime<Utc>>,
    /// Times an attempt died: the run was taken over from a worker that stopped
    /// heartbeating (or that a launcher restarted), or a rank process of it died.
    pub crashes: i64,
    /// When an operator asked this running run to stop; its worker saves a state and
    /// ends it as cancelled.
    pub cancel_requested_at: Option<DateTime<Utc>>,
    /// The rank processes the newest attempt trains on; null until that attempt has
    /// recorded them.
    pub world: Option<WorldBody>,
    /// The key a launcher created the run under (one run per launch); null for a run
    /// queued by hand.
    pub launch_key: Option<String>,
}

/// The processes an attempt trains on (data-parallel training: one per rank).
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = RunWorld)]
pub struct WorldBody {
    /// How many rank processes.
    #[schema(minimum = 1)]
    pub size: i64,
    /// Each rank's device, by rank (`cuda:0`, `cpu`, …): `size` of them.
    pub devices: Vec<String>,
}

impl From<RunWorld> for WorldBody {
    fn from(world: RunWorld) -> Self {
        let RunWorld { size, devices } = world;
        WorldBody { size, devices }
    }
}

impl From<Run> for RunBody {
    fn from(run: Run) -> Self {
        let Run {
            id,
            status,
            config,
            dataset,
            total_steps,
            current_step,
            host,
            attempts,
            error,
            created_at,
            started_at,
            finished_at,
            updated_at,
            heartbeat_at,
            retry_at,
            crashes,
            cancel_requested_at,
            world,
            launch_key,
        } = run;
        RunBody {
            id,
            status,
            config,
            dataset,
            total_steps,
            current_step,
            host,
            attempts,
            error,
            created_at,
            started_at,
            finished_at,
            updated_at,
            heartbeat_at,
            retry_at,
            crashes,
            cancel_requested_at,
            world: world.map(WorldBody::from),
            launch_key,
        }
    }
}

/// One logged training window.
#[derive(Debug, Serialize, ToSchema)]
pub struct MetricPointBody {
    /// The last optimiser step of the logging window the point describes.
    pub step: i64,
    /// The plain, unweighted ε-MSE averaged over the logging window; null for a diverged
    /// (NaN) window.
    pub loss: Option<f64>,
    pub learning_rate: Option<f64>,
    /// Gradient norm before clipping, when the trainer computes it.
    pub grad_norm: Option<f64>,
    pub images_per_sec: Option<f64>,
    pub recorded_at: DateTime<Utc>,
    /// Exponential moving average of the per-step loss, bias-corrected, as of `step`; null
    /// when not recorded (rows logged before the trainer computed it).
    pub loss_smoothed: Option<f64>,
    /// Mean ε-MSE of the window's samples by the quarter of [0, T) their diffusion
    /// timestep t falls in: [0, T/4) (least noise), [T/4, T/2), [T/2, 3T/4), [3T/4, T)
    /// (most noise). An entry is null when no sample of the window fell in that quarter,
    /// and all four are null for rows logged before the trainer recorded them.
    #[schema(min_items = 4, max_items = 4)]
    pub loss_by_timestep: [Option<f64>; 4],
}

impl From<MetricPoint> for MetricPointBody {
    fn from(point: MetricPoint) -> Self {
        let MetricPoint {
            step,
            loss,
            learning_rate,
            grad_norm,
            images_per_sec,
            recorded_at,
            loss_smoothed,
            loss_by_timestep,
        } = point;
        // JSON has no NaN: the registry reads a diverged window's loss back as NaN.
        let finite = |x: f64| x.is_finite().then_some(x);
        MetricPointBody {
            step,
            loss: finite(loss),
            learning_rate: finite(learning_rate),
            grad_norm,
            images_per_sec,
            recorded_at,
            loss_smoothed,
            loss_by_timestep,
        }
    }
}

/// A registered checkpoint.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Checkpoint)]
pub struct CheckpointBody {
    pub id: i64,
    pub run_id: i64,
    pub step: i64,
    #[schema(schema_with = checkpoint_kind_schema)]
    pub kind: CheckpointKind,
    /// Relative to the checkpoint store's root, `/`-separated.
    pub path: String,
    pub size_bytes: i64,
    /// Lowercase hex SHA-256 of the file.
    pub sha256: String,
    pub created_at: DateTime<Utc>,
    /// The trainer's score of an EMA checkpoint; null for a training state, a run that is
    /// not scored, or a checkpoint written when the run was stopped.
    pub score: Option<ScoreBody>,
}

impl CheckpointBody {
    /// `record` with its score, found among `scores` by its run and step.
    pub fn scored(record: CheckpointRecord, scores: &[CheckpointScore]) -> Self {
        let score = (record.kind == CheckpointKind::Ema)
            .then(|| {
                scores
                    .iter()
                    .find(|s| s.run_id == record.run_id && s.step == record.step)
            })
            .flatten()
            .cloned()
            .map(ScoreBody::from);
        CheckpointBody {
            score,
            ..record.into()
        }
    }
}

/// How good an EMA checkpoint's samples are, as the trainer measured them with a class
/// probe trained on the run's own data (K images per class, fixed seeds, compared with
/// images held out from training).
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = CheckpointScore)]
pub struct ScoreBody {
    pub run_id: i64,
    pub step: i64,
    /// The EMA checkpoint scored (its row may since have gone to retention).
    pub checkpoint_id: i64,
    /// Generated images per class (K).
    pub samples_per_class: i64,
    /// Held-out real images the samples are compared with.
    pub holdout_images: i64,
    /// The fraction of samples the probe assigns to the class asked for.
    pub class_accuracy: Option<f64>,
    /// Fréchet distance to the held-out images in the probe's penultimate features.
    pub fd: Option<f64>,
    /// The same distance for as many real training images: the floor at this N.
    pub fd_floor: Option<f64>,
    /// KID (unbiased MMD², cubic kernel) in the same features, mean over subsets.
    pub kid: Option<f64>,
    /// Its standard deviation over the subsets.
    pub kid_std: Option<f64>,
    /// Within-class spread of the samples relative to real images (1: as varied).
    pub diversity: Option<f64>,
    /// The probe's accuracy on the held-out images: low means the scores mean little.
    pub probe_accuracy: Option<f64>,
    /// How the samples were drawn and scored (sampler, steps, guidance scale, seed, …).
    #[schema(value_type = Object)]
    pub settings: serde_json::Value,
    /// Seconds the scoring took.
    pub seconds: f64,
    pub created_at: DateTime<Utc>,
}

impl From<CheckpointScore> for ScoreBody {
    fn from(score: CheckpointScore) -> Self {
        let CheckpointScore {
            run_id,
            step,
            checkpoint_id,
            values:
                ScoreValues {
                    samples_per_class,
                    holdout_images,
                    class_accuracy,
                    fd,
                    fd_floor,
                    kid,
                    kid_std,
                    diversity,
                    probe_accuracy,
                    settings,
                    seconds,
                },
            created_at,
        } = score;
        ScoreBody {
            run_id,
            step,
            checkpoint_id,
            samples_per_class,
            holdout_images,
            class_accuracy,
            fd,
            fd_floor,
            kid,
            kid_std,
            diversity,
            probe_accuracy,
            settings,
            seconds,
            created_at,
        }
    }
}

impl From<CheckpointRecord> for CheckpointBody {
    fn from(record: CheckpointRecord) -> Self {
        let CheckpointRecord {
            id,
            run_id,
            step,
            kind,
            path,
            size_bytes,
            sha256,
            created_at,
        } = record;
        CheckpointBody {
            id,
            run_id,
            step,
            kind,
            path,
            size_bytes,
            sha256,
            created_at,
            score: None,
        }
    }
}

fn run_status_schema() -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(RunStatus::ALL.map(RunStatus::as_str)))
}

fn checkpoint_kind_schema() -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(CheckpointKind::ALL.map(CheckpointKind::as_str)))
}
