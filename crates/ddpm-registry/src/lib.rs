//! The run registry and the checkpoint store of `ddpm`.
//!
//! The registry records runs (config, dataset summary, status, timestamps,
//! heartbeat, progress), their metric series and their checkpoints, and is the
//! run queue that trainers claim work from. It runs on PostgreSQL (deployment)
//! or SQLite (the zero-configuration default); the connection URL picks which.
//! The checkpoint store keeps the checkpoint files on a backend behind one small
//! interface ([`ObjectStore`]: a directory, [`DirStore`], or an S3 bucket, [`S3Store`]),
//! which alone writes, hashes, publishes and deletes them; they are registered only once
//! durable.
//!
//! ```no_run
//! # async fn demo() -> Result<(), ddpm_registry::RegistryError> {
//! use ddpm_registry::{CheckpointKind, CheckpointStore, FinalStatus, Lease, NewRun, Registry};
//! use std::path::Path;
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
//!     // Blocking: a trainer writes from its training thread.
//!     let file = store.write_checkpoint(run.id, 1000, CheckpointKind::Ema, b"safetensors bytes")?;
//!     store
//!         .register(&leased, run.id, 1000, CheckpointKind::Ema, &file)
//!         .await?;
//!     store.apply_retention(&leased, run.id, 3).await?;
//!     leased.finish(FinalStatus::Completed, None).await?;
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
//! - `runs`: [`Run`], [`RunStatus`], [`FinalStatus`] (how a run ends), [`RunWorld`] (an
//!   attempt's rank processes), the queue ([`Registry::claim_next`], ordered by
//!   when a run may next be tried; [`Registry::claim_run`] for a foreground run;
//!   [`Registry::find_or_create_launched_run`] and [`Registry::claim_relaunched`] for a
//!   launcher's run), listing.
//! - `lease`: [`Lease`] and [`LeasedRun`]: a worker's writes (heartbeat, the attempt's
//!   world, metrics, checkpoints, retention, finishing, deferring, crashing), each conditional on still
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
//! - `store`: [`CheckpointStore`]: the layout of a run's files, reads verified against
//!   their rows, registration, deletion, retention, tidying after crashes, all on an
//!   [`ObjectStore`]; [`CheckpointLedger`], where it records files (the registry, or a
//!   lease).
//! - `backend`: [`ObjectStore`], what a backend implements (create-only
//!   write-and-publish, read, delete, list), and [`StoredFile`], what a write returns.
//! - `dir_store`: [`DirStore`], the directory backend: temp file, fsync, rename that
//!   never replaces, directory fsync.
//! - `s3_store`: [`S3Store`], the S3 backend (`object_store`'s client): one
//!   create-only PUT per object, failures sorted into unavailable and refused.
//! - `cache`: [`ObjectCache`], the local copies a server keeps of what it loaded from a
//!   remote store, named by SHA-256, bounded.
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
mod backend;
mod cache;
mod checkpoints;
mod control;
mod db;
mod dir_store;
mod error;
pub mod failpoint;
mod lease;
mod metrics;
mod promotions;
mod relpath;
mod runs;
mod s3_store;
mod scores;
mod store;

pub use announce::Announcements;
pub use backend::{Listed, ObjectStore, StoredFile};
pub use cache::ObjectCache;
pub use checkpoints::{CheckpointKind, CheckpointRecord, NewCheckpoint, CHECKPOINT_CHANNEL};
pub use db::{database_password, redact_password, Backend, Registry};
pub use dir_store::DirStore;
pub use error::{RegistryError, Result};
pub use lease::{Beat, Lease, LeasedRun};
pub use metrics::{MetricPoint, MetricSummary};
pub use promotions::Promotion;
pub use runs::{FinalStatus, NewRun, Run, RunStatus, RunWorld};
pub use s3_store::S3Store;
pub use scores::{CheckpointScore, ScoreValues};
pub use store::{CheckpointLedger, CheckpointStore};
