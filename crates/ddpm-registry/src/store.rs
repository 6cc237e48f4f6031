//! The checkpoint store: a local directory of checkpoint files, written
//! atomically and registered only once durable, with retention.
//!
//! A write goes to a temp file in the target's directory, is fsynced, hashed
//! and renamed over the target, and the directory is fsynced: a reader (or a
//! crash) sees the old file or the new one, never a torn one, and a file that
//! is registered is on disk.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::checkpoints::{CheckpointKind, CheckpointRecord, NewCheckpoint};
use crate::db::Registry;
use crate::error::{BoxError, RegistryError, Result};
use crate::lease::LeasedRun;
use crate::relpath::validate_rel_path;
use crate::runs::RunStatus;

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

/// A file the store wrote, durable and ready to register.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredFile {
    /// Relative to the store's root, `/`-separated (what the registry keeps).
    pub path: String,
    pub size_bytes: u64,
    /// Lowercase hex SHA-256 of the bytes on disk.
    pub sha256: String,
}

impl StoredFile {
    /// The registration of this file as checkpoint `kind` of run `run_id` at `step`.
    pub fn checkpoint(
        &self,
        run_id: i64,
        step: i64,
        kind: CheckpointKind,
    ) -> Result<NewCheckpoint> {
        let size_bytes = i64::try_from(self.size_bytes).map_err(|_| {
            RegistryError::InvalidArgument(format!("file size {} overflows", self.size_bytes))
        })?;
        Ok(NewCheckpoint {
            run_id,
            step,
            kind,
            path: self.path.clone(),
            size_bytes,
            sha256: self.sha256.clone(),
        })
    }
}

/// Checkpoint files under one root directory. Cloning is cheap.
#[derive(Debug, Clone)]
pub struct CheckpointStore {
    root: PathBuf,
}

impl CheckpointStore {
    /// A store rooted at `root`, created (with its parents) when missing.
    pub fn new(root: impl Into<PathBuf>) -> Result<CheckpointStore> {
        let root = root.into();
        std::fs::create_dir_all(&root).map_err(RegistryError::io(&root))?;
        Ok(CheckpointStore { root })
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where a checkpoint of run `run_id` at `step` goes, relative to the
    /// root: `runs/<run>/<kind>-<step, 8 digits>.safetensors`.
    pub fn path_for(&self, run_id: i64, step: i64, kind: CheckpointKind) -> PathBuf {
        PathBuf::from(format!("runs/{run_id}/{kind}-{step:08}.safetensors"))
    }

    /// Where the sample grid of the EMA checkpoint at `checkpoint` goes: the
    /// same stem with `.png`.
    pub fn grid_path_for(checkpoint: &Path) -> PathBuf {
        checkpoint.with_extension("png")
    }

    /// The absolute path of a relative store path (as kept in the registry).
    /// Fails with [`RegistryError::InvalidPath`] for a path that is absolute
    /// or climbs out of the root.
    pub fn resolve(&self, rel: impl AsRef<Path>) -> Result<PathBuf> {
        let rel = rel.as_ref();
        validate_rel_path(rel)?;
        Ok(self.root.join(rel))
    }

    /// Writes `rel` atomically: `write` fills a temp file beside the target
    /// (it gets the temp file's path and may create or truncate it), which is
    /// then fsynced, hashed, renamed over the target, and the directory
    /// fsynced. When `write` fails (or panics) the temp file is removed and
    /// the target is left as it was.
    ///
    /// Blocking: call it from a blocking thread, or use
    /// [`save_and_register`](Self::save_and_register) from async code.
    pub fn write_atomic<E>(
        &self,
        rel: &Path,
        write: impl FnOnce(&Path) -> Result<(), E>,
    ) -> Result<StoredFile>
    where
        E: Into<BoxError>,
    {
        let path = validate_rel_path(rel)?;
        let target = self.root.join(rel);
        let dir = target
            .parent()
            .ok_or_else(|| RegistryError::InvalidPath(path.clone()))?;
        let prefix = match target.file_name() {
            Some(name) => format!(".{}.", name.to_string_lossy()),
            None => return Err(RegistryError::InvalidPath(path)),
        };
        self.create_dirs(dir)?;

        // Removed on drop unless persisted: an error or panic below leaves nothing.
        let temp = temp_builder(&prefix)
            .tempfile_in(dir)
            .map_err(RegistryError::io(dir))?
            .into_temp_path();
        write(&temp).map_err(|e| RegistryError::Write {
            path: target.clone(),
            source: e.into(),
        })?;
        let (size_bytes, sha256) = sync_and_digest(&temp)?;
        crate::failpoint::hit("store.temp_written");
        temp.persist(&target)
            .map_err(|e| RegistryError::io(&target)(e.error))?;
        sync_dir(dir)?;
        crate::failpoint::hit("store.renamed");
        tracing::debug!(path = %target.display(), size_bytes, "checkpoint file written");
        Ok(StoredFile {
            path,
            size_bytes,
            sha256,
        })
    }

    /// [`write_atomic`](Self::write_atomic) with the content in memory.
    pub fn write_bytes(&self, rel: &Path, bytes: &[u8]) -> Result<StoredFile> {
        self.write_atomic(rel, |temp| std::fs::write(temp, bytes))
    }

    /// Lowercase hex SHA-256 of a file's bytes.
    pub fn sha256_file(path: &Path) -> Result<String> {
        let file = File::open(path).map_err(RegistryError::io(path))?;
        Ok(digest(file, path)?.1)
    }

    /// Checks that a registered checkpoint's file exists with the registered
    /// size and SHA-256, and returns its absolute path. Fails with
    /// [`RegistryError::ChecksumMismatch`] for a changed file and
    /// [`RegistryError::Io`] for a missing one.
    pub fn verify(&self, record: &CheckpointRecord) -> Result<PathBuf> {
        let path = self.resolve(&record.path)?;
        let file = File::open(&path).map_err(RegistryError::io(&path))?;
        let (size, sha256) = digest(file, &path)?;
        if sha256 != record.sha256 || i64::try_from(size).ok() != Some(record.size_bytes) {
            return Err(RegistryError::ChecksumMismatch {
                path,
                expected: record.sha256.clone(),
                actual: sha256,
            });
        }
        Ok(path)
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

    /// Writes the checkpoint of run `run_id` at `step` to
    /// [`path_for`](Self::path_for) on a blocking thread (see
    /// [`write_atomic`](Self::write_atomic)), and registers it once it is
    /// durable. A failed write registers nothing.
    ///
    /// `write` must be `'static` to move to the blocking thread; a caller
    /// that borrows its data calls `write_atomic` and [`register`](Self::register).
    #[tracing::instrument(skip(self, registry, write))]
    pub async fn save_and_register<F, E>(
        &self,
        registry: &impl CheckpointLedger,
        run_id: i64,
        step: i64,
        kind: CheckpointKind,
        write: F,
    ) -> Result<CheckpointRecord>
    where
        F: FnOnce(&Path) -> Result<(), E> + Send + 'static,
        E: Into<BoxError>,
    {
        let rel = self.path_for(run_id, step, kind);
        let store = self.clone();
        let target = self.root.join(&rel);
        let file = match tokio::task::spawn_blocking(move || store.write_atomic(&rel, write)).await
        {
            Ok(file) => file?,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => {
                return Err(RegistryError::Write {
                    path: target,
                    source: Box::new(e),
                })
            }
        };
        self.register(registry, run_id, step, kind, &file).await
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
        let path = self.resolve(&record.path)?;
        registry.delete_checkpoint(record.id).await?;
        crate::failpoint::hit("store.row_deleted");
        remove_if_exists(&path).await?;
        if record.kind == CheckpointKind::Ema {
            remove_if_exists(&Self::grid_path_for(&path)).await?;
        }
        Ok(())
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

    /// Removes what ended attempts of run `run_id` left in its folder: temp files of
    /// writes a crash cut short, and checkpoint files (with their grids) that no record
    /// in `registered` names: written, but never registered (the worker died or lost
    /// its lease first). Such a file is not registered late: the metric rows up to its
    /// step may be missing too, and resuming from it would leave a gap in the series.
    ///
    /// Call it holding the run's lease, before the attempt writes anything: no other
    /// writer is legitimate then. Files it does not recognise are left alone. Returns
    /// the removed paths, relative to the root.
    #[tracing::instrument(skip(self, registered))]
    pub async fn tidy_run(
        &self,
        run_id: i64,
        registered: &[CheckpointRecord],
    ) -> Result<Vec<String>> {
        let dir_rel = format!("runs/{run_id}");
        let dir = self.root.join(&dir_rel);
        let keep: std::collections::HashSet<String> = registered
            .iter()
            .flat_map(|r| {
                let grid = Self::grid_path_for(Path::new(&r.path));
                [r.path.clone(), grid.to_string_lossy().into_owned()]
            })
            .collect();
        tokio::task::spawn_blocking(move || -> Result<Vec<String>> {
            let entries = match std::fs::read_dir(&dir) {
                Ok(entries) => entries,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
                Err(e) => return Err(RegistryError::io(&dir)(e)),
            };
            let mut removed = Vec::new();
            for entry in entries {
                let entry = entry.map_err(RegistryError::io(&dir))?;
                let name = entry.file_name().to_string_lossy().into_owned();
                let rel = format!("{dir_rel}/{name}");
                let leftover = match leftover_kind(&name) {
                    Some(Leftover::Temp) => true,
                    Some(Leftover::Checkpoint) => !keep.contains(&rel),
                    None => false,
                };
                if leftover && entry.file_type().is_ok_and(|t| t.is_file()) {
                    let path = entry.path();
                    std::fs::remove_file(&path).map_err(RegistryError::io(&path))?;
                    removed.push(rel);
                }
            }
            if !removed.is_empty() {
                sync_dir(&dir)?;
            }
            removed.sort();
            Ok(removed)
        })
        .await
        .map_err(|e| RegistryError::Write {
            path: self.root.join(format!("runs/{run_id}")),
            source: Box::new(e),
        })?
    }

    /// Removes run `run_id`'s folder with everything in it (deleting the run).
    #[tracing::instrument(skip(self))]
    pub async fn remove_run(&self, run_id: i64) -> Result<()> {
        let dir = self.root.join(format!("runs/{run_id}"));
        match tokio::fs::remove_dir_all(&dir).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(RegistryError::io(&dir)(e)),
        }
    }

    /// Creates `dir` and fsyncs the parent of every directory it created.
    fn create_dirs(&self, dir: &Path) -> Result<()> {
        if dir.is_dir() {
            return Ok(());
        }
        let missing: Vec<&Path> = dir.ancestors().take_while(|d| !d.exists()).collect();
        std::fs::create_dir_all(dir).map_err(RegistryError::io(dir))?;
        for created in missing {
            if let Some(parent) = created.parent() {
                sync_dir(parent)?;
            }
        }
        Ok(())
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
    /// `ema-<step>.safetensors`, `ema-<step>.png`, `state-<step>.safetensors`.
    Checkpoint,
}

fn leftover_kind(name: &str) -> Option<Leftover> {
    if name.starts_with('.') && name.ends_with(".tmp") {
        return Some(Leftover::Temp);
    }
    let (kind, rest) = name.split_once('-')?;
    let (step, ext) = rest.split_once('.')?;
    let known_kind = CheckpointKind::ALL.iter().any(|k| k.as_str() == kind);
    let known_ext = ext == "safetensors" || (kind == "ema" && ext == "png");
    (known_kind && known_ext && !step.is_empty() && step.bytes().all(|b| b.is_ascii_digit()))
        .then_some(Leftover::Checkpoint)
}

/// Temp files are `<prefix><random>.tmp`, readable like files `File::create`
/// makes (0666 less the umask), so a server running as another user can read
/// the renamed checkpoint.
fn temp_builder(prefix: &str) -> tempfile::Builder<'_, 'static> {
    let mut builder = tempfile::Builder::new();
    builder.prefix(prefix).suffix(".tmp");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        builder.permissions(std::fs::Permissions::from_mode(0o666));
    }
    builder
}

/// Size and SHA-256 of everything `reader` yields.
fn digest(mut reader: impl Read, path: &Path) -> Result<(u64, String)> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut size = 0u64;
    loop {
        let n = reader.read(&mut buf).map_err(RegistryError::io(path))?;
        if n == 0 {
            break;
        }
        size += n as u64;
        hasher.update(&buf[..n]);
    }
    Ok((size, hex::encode(hasher.finalize())))
}

/// Flushes a written file to the disk and returns its size and SHA-256.
fn sync_and_digest(path: &Path) -> Result<(u64, String)> {
    // Write access: some platforms refuse to flush a read-only handle.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(RegistryError::io(path))?;
    file.sync_all().map_err(RegistryError::io(path))?;
    digest(file, path)
}

/// Makes a directory's entries (a rename, a new file) durable.
fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(RegistryError::io(dir))?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

async fn remove_if_exists(path: &Path) -> Result<()> {
    match tokio::fs::remove_file(path).await {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(RegistryError::io(path)(e)),
    }
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
        assert!(store.root().is_dir());
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
        assert!(store.resolve("../x").is_err());
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
        ] {
            assert_eq!(leftover_kind(name), Some(Leftover::Checkpoint), "{name}");
        }
        for name in [
            "state-00000100.png",
            "notes.txt",
            "ema-.safetensors",
            "ema-12x.safetensors",
            "grid.png",
        ] {
            assert_eq!(leftover_kind(name), None, "{name}");
        }
    }

    #[test]
    fn digest_matches_a_known_vector() {
        let (size, sha) = digest(&b"abc"[..], Path::new("mem")).unwrap();
        assert_eq!(size, 3);
        assert_eq!(
            sha,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[cfg(unix)]
    #[test]
    fn written_files_are_readable_by_others() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let store = CheckpointStore::new(dir.path()).unwrap();
        let file = store.write_bytes(Path::new("a/b.bin"), b"x").unwrap();
        let mode = std::fs::metadata(store.resolve(&file.path).unwrap())
            .unwrap()
            .permissions()
            .mode();
        // At least as open as File::create under a 022 umask.
        assert_eq!(mode & 0o600, 0o600);
        assert_eq!(mode & 0o044, 0o044 & !current_umask());
    }

    #[cfg(unix)]
    fn current_umask() -> u32 {
        let probe = tempfile::tempdir().unwrap();
        let path = probe.path().join("probe");
        std::fs::File::create(&path).unwrap();
        use std::os::unix::fs::PermissionsExt;
        !std::fs::metadata(&path).unwrap().permissions().mode() & 0o666
    }
}
