//! The checkpoint store: checkpoint files by run, on an [`ObjectStore`] backend (a
//! directory by default, or an S3 bucket), registered only once durable, with retention
//! and reconciliation.
//!
//! This module knows the layout (`runs/<run>/<kind>-<step>-<sha256 prefix>.safetensors`,
//! the grid `.png` beside), what is registered and what retention keeps; the backend
//! alone writes, hashes, publishes and deletes bytes (see `backend`). Its async methods
//! run the backend's blocking calls on blocking threads.

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ddpm_service::StoreSpec;
use sha2::{Digest, Sha256};

use crate::backend::{ObjectStore, StoredFile};
use crate::cache::ObjectCache;
use crate::checkpoints::{CheckpointKind, CheckpointRecord, NewCheckpoint};
use crate::db::Registry;
use crate::dir_store::DirStore;
use crate::error::{RegistryError, Result};
use crate::lease::LeasedRun;
use crate::relpath::validate_rel_path;
use crate::runs::RunStatus;
use crate::s3_store::S3Store;

/// Hex digits of the content's SHA-256 in a checkpoint's key: enough that two different
/// checkpoints of one run and step never share a key (48 bits), short enough to read.
const KEY_HASH_DIGITS: usize = 12;

/// Where the store records its files: the [`Registry`] itself (an operator's, a
/// tool's or a test's writes, unconditional) or a [`LeasedRun`] (a worker's, refused
/// with [`RegistryError::ClaimLost`] once its lease is gone).
pub trait CheckpointLedger: Sync {
    fn register_checkpoint(
        &self,
        new: &NewCheckpoint,
    ) -> impl std::future::Future<Output = Result<CheckpointRecord>> + Send;
    fn delete_checkpoint(&self, id: i64) -> impl std::future::Future<Output = Result<()>> + Send;
    fn list_checkpoints(
        &self,
        run_id: i64,
    ) -> impl std::future::Future<Output = Result<Vec<CheckpointRecord>>> + Send;
    /// Whether retention must keep the run's newest checkpoint of each kind whatever
    /// `keep_last` says: the run completed (a leased run is running: never).
    fn keeps_newest(&self, run_id: i64) -> impl std::future::Future<Output = Result<bool>> + Send;
    /// The registry underneath, for reads.
    fn registry(&self) -> &Registry;
}

impl CheckpointLedger for Registry {
    async fn register_checkpoint(&self, new: &NewCheckpoint) -> Result<CheckpointRecord> {
        Registry::register_checkpoint(self, new).await
    }
    async fn delete_checkpoint(&self, id: i64) -> Result<()> {
        Registry::delete_checkpoint(self, id).await
    }
    async fn list_checkpoints(&self, run_id: i64) -> Result<Vec<CheckpointRecord>> {
        Registry::list_checkpoints(self, run_id).await
    }
    async fn keeps_newest(&self, run_id: i64) -> Result<bool> {
        let run = self
            .get_run(run_id)
            .await?
            .ok_or(RegistryError::RunNotFound(run_id))?;
        Ok(run.status == RunStatus::Completed)
    }
    fn registry(&self) -> &Registry {
        self
    }
}

impl CheckpointLedger for LeasedRun {
    async fn register_checkpoint(&self, new: &NewCheckpoint) -> Result<CheckpointRecord> {
        LeasedRun::register_checkpoint(self, new).await
    }
    async fn delete_checkpoint(&self, id: i64) -> Result<()> {
        LeasedRun::delete_checkpoint(self, id).await
    }
    async fn list_checkpoints(&self, run_id: i64) -> Result<Vec<CheckpointRecord>> {
        self.registry().list_checkpoints(run_id).await
    }
    async fn keeps_newest(&self, _run_id: i64) -> Result<bool> {
        Ok(false)
    }
    fn registry(&self) -> &Registry {
        LeasedRun::registry(self)
    }
}

/// Checkpoint files on one backend. Cloning is cheap.
#[derive(Debug, Clone)]
pub struct CheckpointStore {
    objects: Arc<dyn ObjectStore>,
    /// Local copies of what `open` reads, for a remote backend (a server's).
    cache: Option<Arc<ObjectCache>>,
}

impl CheckpointStore {
    /// A store in the directory `root`, created (with its parents) when missing.
    pub fn new(root: impl Into<PathBuf>) -> Result<CheckpointStore> {
        Ok(CheckpointStore::on(Arc::new(DirStore::new(root)?)))
    }

    /// The store `spec` names: a directory (created when missing) or an S3 bucket (not
    /// contacted yet: see [`CheckpointStore::check`]).
    pub fn open_spec(spec: &StoreSpec) -> Result<CheckpointStore> {
        Ok(match spec {
            StoreSpec::Dir(root) => CheckpointStore::new(root)?,
            StoreSpec::S3(s3) => CheckpointStore::on(Arc::new(S3Store::new(s3)?)),
        })
    }

    /// A store on the backend `objects`.
    pub fn on(objects: Arc<dyn ObjectStore>) -> CheckpointStore {
        CheckpointStore {
            objects,
            cache: None,
        }
    }

    /// This store, reading checkpoints through `cache` (see [`CheckpointStore::open`]).
    pub fn with_cache(mut self, cache: ObjectCache) -> CheckpointStore {
        self.cache = Some(Arc::new(cache));
        self
    }

    /// Whether reading costs a network transfer (S3): worth a local cache.
    pub fn is_remote(&self) -> bool {
        self.objects.is_remote()
    }

    /// Whether the backend can be reached and read (one listing): a missing bucket or
    /// refused credentials come back as [`RegistryError::StoreRefused`], a server that
    /// does not answer as [`RegistryError::StoreUnavailable`].
    pub async fn check(&self) -> Result<()> {
        let objects = Arc::clone(&self.objects);
        blocking(move || objects.check()).await
    }

    /// A path for a checkpoint of run `run_id` at `step` whose content is not known:
    /// `runs/<run>/<kind>-<step, 8 digits>.safetensors`. Checkpoints are written with
    /// [`CheckpointStore::write_checkpoint`], whose keys carry their hash; this name
    /// is for tools and tests that place a file themselves.
    pub fn path_for(&self, run_id: i64, step: i64, kind: CheckpointKind) -> PathBuf {
        PathBuf::from(format!(
            "{}/{kind}-{step:08}.safetensors",
            run_folder(run_id)
        ))
    }

    /// Writes and publishes a checkpoint of run `run_id` at `step` under a key that
    /// carries its content's hash, `runs/<run>/<kind>-<step>-<sha256 prefix>.safetensors`:
    /// a key is written once, so no write (a retry, a zombie worker's) ever replaces
    /// another's object. Blocking.
    pub fn write_checkpoint(
        &self,
        run_id: i64,
        step: i64,
        kind: CheckpointKind,
        bytes: &[u8],
    ) -> Result<StoredFile> {
        let sha256 = hex::encode(Sha256::digest(bytes));
        let key = format!(
            "{}/{kind}-{step:08}-{}.safetensors",
            run_folder(run_id),
            &sha256[..KEY_HASH_DIGITS]
        );
        self.objects.put(&key, bytes)
    }

    /// Where the sample grid of the EMA checkpoint at `checkpoint` goes: the
    /// same stem with `.png`.
    pub fn grid_path_for(checkpoint: &Path) -> PathBuf {
        checkpoint.with_extension("png")
    }

    /// Writes and publishes `bytes` at `rel` (see [`ObjectStore::put`]). Fails with
    /// [`RegistryError::InvalidPath`] for a path that is absolute or climbs out of the
    /// root. Blocking: call it from a blocking thread.
    pub fn write_bytes(&self, rel: &Path, bytes: &[u8]) -> Result<StoredFile> {
        self.objects.put(&validate_rel_path(rel)?, bytes)
    }

    /// The bytes at `rel`, unchecked (a sample grid); [`RegistryError::ObjectMissing`]
    /// when there are none. Blocking.
    pub fn read(&self, rel: &Path) -> Result<Vec<u8>> {
        self.objects.get(&validate_rel_path(rel)?)
    }

    /// A registered checkpoint's bytes, checked against the registered size and SHA-256:
    /// [`RegistryError::ChecksumMismatch`] for a changed file,
    /// [`RegistryError::ObjectMissing`] for a missing one. With a cache, read from (or
    /// through) it. Blocking.
    pub fn open(&self, record: &CheckpointRecord) -> Result<Vec<u8>> {
        if let Some(cache) = &self.cache {
            validate_rel_path(Path::new(&record.path))?;
            return cache.fetch(&*self.objects, record);
        }
        let bytes = self.read(Path::new(&record.path))?;
        let sha256 = hex::encode(Sha256::digest(&bytes));
        if sha256 != record.sha256 || i64::try_from(bytes.len()).ok() != Some(record.size_bytes) {
            return Err(RegistryError::ChecksumMismatch {
                path: PathBuf::from(&record.path),
                expected: record.sha256.clone(),
                actual: sha256,
            });
        }
        Ok(bytes)
    }

    /// Registers a file this store wrote as a checkpoint of run `run_id`.
    pub async fn register(
        &self,
        registry: &impl CheckpointLedger,
        run_id: i64,
        step: i64,
        kind: CheckpointKind,
        file: &StoredFile,
    ) -> Result<CheckpointRecord> {
        registry
            .register_checkpoint(&file.checkpoint(run_id, step, kind)?)
            .await
    }

    /// Deletes a checkpoint: first its row (so nobody picks it up any more),
    /// then its file and, for an EMA checkpoint, its sample grid. Fails with
    /// [`RegistryError::CheckpointNotFound`], touching no file, when the row
    /// is gone already (the path may have been registered again since).
    #[tracing::instrument(skip_all, fields(id = record.id))]
    pub async fn delete(
        &self,
        registry: &impl CheckpointLedger,
        record: &CheckpointRecord,
    ) -> Result<()> {
        let path = validate_rel_path(Path::new(&record.path))?;
        registry.delete_checkpoint(record.id).await?;
        crate::failpoint::hit("store.row_deleted");
        let mut keys = vec![path];
        if record.kind == CheckpointKind::Ema {
            keys.push(grid_key(&keys[0]));
        }
        self.delete_keys(keys).await
    }

    /// Applies retention to run `run_id`: of each kind, the `keep_last`
    /// newest checkpoints stay, and so does the newest one of a completed run
    /// (even with `keep_last` 0); the others are deleted (row, file, grid).
    /// Returns what was deleted.
    #[tracing::instrument(skip(self, registry))]
    pub async fn apply_retention(
        &self,
        registry: &impl CheckpointLedger,
        run_id: i64,
        keep_last: usize,
    ) -> Result<Vec<CheckpointRecord>> {
        let keep_newest = registry.keeps_newest(run_id).await?;
        let records = registry.list_checkpoints(run_id).await?;
        // What a server may be told to serve stays: promoted checkpoints, and the
        // best-scored one (the `best` policy's choice by its default metric).
        let kept = registry.registry().servable_keepers(run_id).await?;
        let victims: Vec<CheckpointRecord> = retention_victims(records, keep_last, keep_newest)
            .into_iter()
            .filter(|r| !kept.contains(&r.id))
            .collect();
        let mut deleted = Vec::with_capacity(victims.len());
        for record in victims {
            match self.delete(registry, &record).await {
                Ok(()) => deleted.push(record),
                // Someone else deleted it meanwhile: nothing left to do.
                Err(RegistryError::CheckpointNotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(deleted)
    }

    /// Reconciles run `run_id`'s folder with its rows: removes temp files of writes a
    /// crash cut short, and checkpoint objects (with their grids) whose key is not in
    /// `keep` (the registered checkpoints' paths, and any the caller wrote and has yet to
    /// register): written, but never registered (the worker died or lost its
    /// lease first), and written more than `grace` ago. Such an object is not registered
    /// late: the metric rows up to its step may be missing too, and resuming from it
    /// would leave a gap in the series.
    ///
    /// Call it holding the run's lease. Before the attempt writes anything, with no
    /// grace: no other writer is legitimate then. During the attempt, with a grace
    /// longer than a write takes, so that the attempt's own objects between their put and
    /// their registration stay; a zombie worker's late objects are removed then.
    /// Objects it does not recognise are left alone. Returns the removed keys.
    #[tracing::instrument(skip(self, keep))]
    pub async fn reconcile_run(
        &self,
        run_id: i64,
        keep: &[&str],
        grace: Duration,
    ) -> Result<Vec<String>> {
        let keep: HashSet<String> = keep
            .iter()
            .flat_map(|path| [path.to_string(), grid_key(path)])
            .collect();
        let objects = Arc::clone(&self.objects);
        let folder = run_folder(run_id);
        let listed = blocking(move || objects.list(&folder)).await?;
        let cutoff = SystemTime::now()
            .checked_sub(grace)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let leftovers: Vec<String> = listed
            .into_iter()
            .filter(|object| {
                let name = object.key.rsplit('/').next().unwrap_or(&object.key);
                let old_enough = grace.is_zero() || object.modified <= cutoff;
                match leftover_kind(name) {
                    Some(Leftover::Temp) => old_enough,
                    Some(Leftover::Checkpoint) => old_enough && !keep.contains(&object.key),
                    None => false,
                }
            })
            .map(|object| object.key)
            .collect();
        self.delete_keys(leftovers.clone()).await?;
        Ok(leftovers)
    }

    /// [`CheckpointStore::reconcile_run`] before an attempt writes: no grace.
    pub async fn tidy_run(
        &self,
        run_id: i64,
        registered: &[CheckpointRecord],
    ) -> Result<Vec<String>> {
        let keep: Vec<&str> = registered.iter().map(|r| r.path.as_str()).collect();
        self.reconcile_run(run_id, &keep, Duration::ZERO).await
    }

    /// Evicts cached copies beyond the cache's bound (see [`ObjectCache::trim`]): first
    /// those whose hash is not in `live`, never `keep`. Nothing without a cache.
    pub async fn trim_cache(&self, live: HashSet<String>, keep: String) -> Result<Vec<String>> {
        let Some(cache) = self.cache.clone() else {
            return Ok(Vec::new());
        };
        blocking(move || cache.trim(&live, &keep)).await
    }

    /// Removes everything of run `run_id` (deleting the run).
    #[tracing::instrument(skip(self))]
    pub async fn remove_run(&self, run_id: i64) -> Result<()> {
        let keys = self.run_keys(run_id).await?;
        self.delete_keys(keys).await
    }

    /// The keys in run `run_id`'s folder, sorted.
    pub async fn run_keys(&self, run_id: i64) -> Result<Vec<String>> {
        let objects = Arc::clone(&self.objects);
        let listed = blocking(move || objects.list(&run_folder(run_id))).await?;
        Ok(listed.into_iter().map(|object| object.key).collect())
    }

    /// Deletes `keys` from the backend, in order.
    async fn delete_keys(&self, keys: Vec<String>) -> Result<()> {
        let objects = Arc::clone(&self.objects);
        blocking(move || keys.iter().try_for_each(|key| objects.delete(key))).await
    }
}

/// Where the store is, as its backend says (the directory's path), for logs.
impl fmt::Display for CheckpointStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&*self.objects, f)
    }
}

/// The folder of run `run_id`'s files.
fn run_folder(run_id: i64) -> String {
    format!("runs/{run_id}")
}

/// The key of the sample grid of the EMA checkpoint `key`.
fn grid_key(key: &str) -> String {
    CheckpointStore::grid_path_for(Path::new(key))
        .to_string_lossy()
        .into_owned()
}

/// Runs the backend's blocking `work` on a blocking thread; its panic is the caller's.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    match tokio::task::spawn_blocking(work).await {
        Ok(result) => result,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        // Cancelled: the runtime is shutting down, and the work never ran.
        Err(e) => Err(RegistryError::Io {
            path: PathBuf::new(),
            source: std::io::Error::other(e),
        }),
    }
}

/// The checkpoints retention deletes: of each kind, all but the `keep_last`
/// newest (highest id), and for a completed run never its newest one.
pub(crate) fn retention_victims(
    mut records: Vec<CheckpointRecord>,
    keep_last: usize,
    run_completed: bool,
) -> Vec<CheckpointRecord> {
    let keep = if run_completed {
        keep_last.max(1)
    } else {
        keep_last
    };
    records.sort_by_key(|r| std::cmp::Reverse(r.id));
    let mut victims = Vec::new();
    for kind in CheckpointKind::ALL {
        victims.extend(
            records
                .iter()
                .filter(|r| r.kind == kind)
                .skip(keep)
                .cloned(),
        );
    }
    victims.sort_by_key(|r| r.id);
    victims
}

/// What a file in a run's folder is, by its name.
#[derive(Debug, PartialEq, Eq)]
enum Leftover {
    /// `.<target>.<random>.tmp`: a write in progress, or cut short.
    Temp,
    /// `<kind>-<step>[-<hash>].safetensors`, `ema-<step>[-<hash>].png` (keys without the
    /// hash are those of earlier versions, and of [`CheckpointStore::path_for`]).
    Checkpoint,
}

fn leftover_kind(name: &str) -> Option<Leftover> {
    if name.starts_with('.') && name.ends_with(".tmp") {
        return Some(Leftover::Temp);
    }
    let (kind, rest) = name.split_once('-')?;
    let (stem, ext) = rest.split_once('.')?;
    let (step, hash) = stem.split_once('-').unwrap_or((stem, "0"));
    let known_kind = CheckpointKind::ALL.iter().any(|k| k.as_str() == kind);
    let known_ext = ext == "safetensors" || (kind == "ema" && ext == "png");
    let digits = |s: &str, hex: bool| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (hex && (b'a'..=b'f').contains(&b)))
    };
    (known_kind && known_ext && digits(step, false) && digits(hash, true))
        .then_some(Leftover::Checkpoint)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::DateTime;

    fn record(id: i64, step: i64, kind: CheckpointKind) -> CheckpointRecord {
        CheckpointRecord {
            id,
            run_id: 1,
            step,
            kind,
            path: format!("runs/1/{kind}-{step:08}.safetensors"),
            size_bytes: 1,
            sha256: "0".repeat(64),
            created_at: DateTime::from_timestamp_millis(0).unwrap(),
        }
    }

    fn ids(records: &[CheckpointRecord]) -> Vec<i64> {
        records.iter().map(|r| r.id).collect()
    }

    fn history() -> Vec<CheckpointRecord> {
        use CheckpointKind::{Ema, State};
        vec![
            record(1, 100, Ema),
            record(2, 100, State),
            record(3, 200, Ema),
            record(4, 200, State),
            record(5, 300, Ema),
            record(6, 300, State),
        ]
    }

    #[test]
    fn retention_keeps_the_last_k_of_each_kind() {
        assert_eq!(ids(&retention_victims(history(), 2, false)), [1, 2]);
        assert_eq!(ids(&retention_victims(history(), 1, false)), [1, 2, 3, 4]);
        assert!(retention_victims(history(), 3, false).is_empty());
        assert!(retention_victims(history(), 10, false).is_empty());
    }

    #[test]
    fn retention_always_keeps_the_newest_of_a_completed_run() {
        assert_eq!(
            ids(&retention_victims(history(), 0, false)),
            [1, 2, 3, 4, 5, 6]
        );
        assert_eq!(ids(&retention_victims(history(), 0, true)), [1, 2, 3, 4]);
    }

    #[test]
    fn retention_orders_by_registration_not_step() {
        // A resumed run registered step 150 after the abandoned step 200.
        let mut records = history();
        records.push(record(7, 150, CheckpointKind::Ema));
        assert_eq!(ids(&retention_victims(records, 1, false)), [1, 2, 3, 4, 5]);
    }

    #[test]
    fn checkpoint_paths_follow_the_layout() {
        let dir = tempfile::tempdir().unwrap();
        let store = CheckpointStore::new(dir.path().join("store")).unwrap();
        assert!(dir.path().join("store").is_dir());
        // Logs name the directory.
        assert_eq!(
            store.to_string(),
            dir.path().join("store").display().to_string()
        );
        assert_eq!(
            store.path_for(3, 1000, CheckpointKind::Ema),
            Path::new("runs/3/ema-00001000.safetensors")
        );
        assert_eq!(
            store.path_for(3, 1000, CheckpointKind::State),
            Path::new("runs/3/state-00001000.safetensors")
        );
        assert_eq!(
            CheckpointStore::grid_path_for(Path::new("runs/3/ema-00001000.safetensors")),
            Path::new("runs/3/ema-00001000.png")
        );
        assert!(matches!(
            store.read(Path::new("../x")),
            Err(RegistryError::InvalidPath(_))
        ));
    }

    #[test]
    fn leftovers_are_recognised_by_name() {
        assert_eq!(
            leftover_kind(".ema-00000100.safetensors.a1B2c3.tmp"),
            Some(Leftover::Temp)
        );
        for name in [
            "ema-00000100.safetensors",
            "ema-00000100.png",
            "state-00000100.safetensors",
            "ema-00000100-0a1b2c3d4e5f.safetensors",
            "ema-00000100-0a1b2c3d4e5f.png",
            "state-00000100-0a1b2c3d4e5f.safetensors",
        ] {
            assert_eq!(leftover_kind(name), Some(Leftover::Checkpoint), "{name}");
        }
        for name in [
            "state-00000100.png",
            "notes.txt",
            "ema-.safetensors",
            "ema-12x.safetensors",
            "ema-100-.safetensors",
            "ema-100-XYZ.safetensors",
            "grid.png",
        ] {
            assert_eq!(leftover_kind(name), None, "{name}");
        }
    }
}
