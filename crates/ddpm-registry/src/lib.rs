//! The run registry and the checkpoint store of `ddpm`.
//!
//! The registry records runs (config, dataset summary, status, timestamps,
//! heartbeat, progress), their metric series and their checkpoints, and is the
//! run queue that trainers claim work from. It runs on PostgreSQL (deployment)
//! or SQLite (the zero-configuration default); the connection URL picks which.
//! The checkpoint store keeps the checkpoint files in a directory, writes them
//! atomically, and registers them only once they are durable.
//!
//! ```no_run
//! # async fn demo() -> Result<(), ddpm_registry::RegistryError> {
//! use ddpm_registry::{CheckpointKind, CheckpointStore, Lease, NewRun, Registry, RunStatus};
//! use std::time::Duration;
//!
//! let registry = Registry::connect("sqlite:data/registry.db").await?;
//! let store = CheckpointStore::new("data/checkpoints")?;
//! registry
//!     .create_run(&NewRun {
//!         config: serde_json::json!({ "lr": 3e-4 }),
//!         dataset: serde_json::json!({ "path": "data/cifar10", "images": 50000 }),
//!         total_steps: 100_000,
//!     })
//!     .await?;
//! let worker = "trainer-a:4242:9f3c";
//! if let Some(run) = registry.claim_next(worker, Duration::from_secs(60)).await? {
//!     // Every write from here on holds the lease, and fails once another worker has it.
//!     let leased = registry.leased(Lease::of(&run)?);
//!     leased.heartbeat(1000).await?;
//!     let bytes = b"safetensors bytes".to_vec();
//!     store
//!         .save_and_register(&leased, run.id, 1000, CheckpointKind::Ema, move |tmp| {
//!             std::fs::write(tmp, &bytes)
//!         })
//!         .await?;
//!     store.apply_retention(&leased, run.id, 3).await?;
//!     leased.finish(RunStatus::Completed, None).await?;
//! }
//! # Ok(())
//! # }
//! ```
//!
//! # Layout
//!
//! - `db`: [`Registry`] and [`Backend`]: connecting, backend choice from the
//!   URL, migrations (`migrations/postgres` and `migrations/sqlite` at the
//!   workspace root, embedded at compile time), the SQL that differs per
//!   dialect, timestamp conversion.
//! - `runs`: [`Run`], [`RunStatus`], the queue ([`Registry::claim_next`], ordered by
//!   when a run may next be tried; [`Registry::claim_run`] for a foreground run),
//!   listing.
//! - `lease`: [`Lease`] and [`LeasedRun`]: a worker's writes (heartbeat, metrics,
//!   checkpoints, retention, finishing, deferring), each conditional on still
//!   holding the run, in the same statement or transaction.
//! - `control`: the operator's [`Registry::cancel_run`], [`Registry::restart_run`]
//!   and [`Registry::delete_run`].
//! - `metrics`: [`MetricPoint`] rows, idempotent recording, truncation on
//!   resume, downsampled reads, [`MetricSummary`].
//! - `checkpoints`: [`CheckpointRecord`] rows and the PostgreSQL
//!   [`CHECKPOINT_CHANNEL`] notification.
//! - `scores`: [`CheckpointScore`]: the trainer's quality score of an EMA checkpoint,
//!   one row per (run, step), recorded with the checkpoint's row.
//! - `promotions`: [`Promotion`]: an operator's choice of the checkpoint to serve (who,
//!   when, why), rollback by revocation; what retention must keep for serving.
//! - `announce`: [`Announcements`], those notifications as a stream
//!   (`LISTEN`, reconnects), so that no caller needs database code.
//! - `store`: [`CheckpointStore`]: atomic writes, checksums, verification,
//!   retention, tidying after crashes; [`CheckpointLedger`], where it records files
//!   (the registry, or a lease).
//! - `relpath`: the one check of a store-relative path, which `checkpoints`
//!   and `store` share (neither depends on the other's internals).
//! - `error`: [`RegistryError`], the one error type.
//!
//! # Portability
//!
//! One [`sqlx::AnyPool`] and one set of runtime queries serve both backends:
//! the schema uses only types both share (BIGINT/INTEGER, DOUBLE/REAL, TEXT),
//! timestamps are unix milliseconds taken from the database clock (so that
//! heartbeats from different hosts compare on one clock) and converted to
//! `chrono` at the edge, and JSON documents are text. Only "now" and the
//! queue's row locking (`FOR UPDATE SKIP LOCKED` on PostgreSQL; SQLite's
//! database-wide write lock) differ, in [`Backend`]. Every query is a small
//! function taking an executor, wrapped by a [`Registry`] method, and is
//! tested on both backends (`tests/registry`; the PostgreSQL half needs
//! `DDPM_TEST_POSTGRES_URL`).

mod announce;
mod checkpoints;
mod control;
mod db;
mod error;
pub mod failpoint;
mod lease;
mod metrics;
mod promotions;
mod relpath;
mod runs;
mod scores;
mod store;

pub use announce::Announcements;
pub use checkpoints::{CheckpointKind, CheckpointRecord, NewCheckpoint, CHECKPOINT_CHANNEL};
pub use db::{database_password, redact_password, Backend, Registry};
pub use error::{BoxError, RegistryError, Result};
pub use lease::{Beat, Lease, LeasedRun};
pub use metrics::{MetricPoint, MetricSummary};
pub use promotions::Promotion;
pub use runs::{NewRun, Run, RunStatus};
pub use scores::{CheckpointScore, ScoreValues};
pub use store::{CheckpointLedger, CheckpointStore, StoredFile};
