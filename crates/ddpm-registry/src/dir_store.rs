//! The directory backend of the store: objects are files under a root directory (a
//! shared volume in deployment).
//!
//! A put goes to a temp file beside its target, is hashed as it is written, fsynced and
//! renamed to the target only if no file is there (`renameat2(RENAME_NOREPLACE)`, or a
//! hard link where that is missing), and the directory is fsynced: a reader (or a crash)
//! sees no file or the whole one, never a torn one, a file that is registered is on
//! disk, and a file is never replaced. Folders exist only while they hold a file, as
//! with object storage.

use std::fmt;
use std::fs::File;
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::backend::{Listed, ObjectStore, StoredFile};
use crate::error::{RegistryError, Result};
use crate::relpath::validate_rel_path;

/// Objects as files under one root directory.
#[derive(Debug)]
pub struct DirStore {
    root: PathBuf,
}

impl DirStore {
    /// A store rooted at `root`, created (with its parents) when missing.
    pub fn new(root: impl Into<PathBuf>) -> Result<DirStore> {
        let root = root.into();
        std::fs::create_dir_all(&root).map_err(RegistryError::io(&root))?;
        Ok(DirStore { root })
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The file of `key`; [`RegistryError::InvalidPath`] for a key that is absolute or
    /// climbs out of the root.
    fn file(&self, key: &str) -> Result<PathBuf> {
        validate_rel_path(Path::new(key))?;
        Ok(self.root.join(key))
    }

    /// A temp file in `dir` for the target named `name`, creating `dir` (and fsyncing the
    /// parent of every folder created) when missing. Tried twice: a delete that emptied
    /// the folder may remove it between the two steps.
    fn temp_file(&self, dir: &Path, name: &str) -> Result<tempfile::NamedTempFile> {
        let prefix = format!(".{name}.");
        let mut tries = 0;
        loop {
            create_dirs(dir)?;
            match temp_builder(&prefix).tempfile_in(dir) {
                Err(e) if e.kind() == ErrorKind::NotFound && tries == 0 => tries += 1,
                made => return made.map_err(RegistryError::io(dir)),
            }
        }
    }
}

impl fmt::Display for DirStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.root.display())
    }
}

impl ObjectStore for DirStore {
    fn put(&self, key: &str, bytes: &[u8]) -> Result<StoredFile> {
        let path = validate_rel_path(Path::new(key))?;
        let target = self.root.join(&path);
        let (dir, name) = match (target.parent(), target.file_name()) {
            (Some(dir), Some(name)) => (dir, name.to_string_lossy().into_owned()),
            _ => return Err(RegistryError::InvalidPath(path)),
        };
        // Removed on drop unless persisted: an error or panic below leaves nothing.
        let mut temp = self.temp_file(dir, &name)?;
        let sha256 = hex::encode(Sha256::digest(bytes));
        temp.write_all(bytes)
            .and_then(|()| temp.as_file().sync_all())
            .map_err(RegistryError::io(&target))?;
        crate::failpoint::hit("store.written");
        match temp.persist_noclobber(&target) {
            Ok(_) => {}
            // Taken: the same bytes are a retried write (done), others a conflict. The
            // temp file goes when `e.file` drops.
            Err(e) if e.error.kind() == ErrorKind::AlreadyExists => {
                let existing = std::fs::read(&target).map_err(RegistryError::io(&target))?;
                if hex::encode(Sha256::digest(&existing)) != sha256 {
                    return Err(RegistryError::ObjectConflict(path));
                }
            }
            Err(e) => return Err(RegistryError::io(&target)(e.error)),
        }
        sync_dir(dir)?;
        crate::failpoint::hit("store.published");
        tracing::debug!(path = %target.display(), size_bytes = bytes.len(), "checkpoint file written");
        Ok(StoredFile {
            path,
            size_bytes: bytes.len() as u64,
            sha256,
        })
    }

    fn get(&self, key: &str) -> Result<Vec<u8>> {
        let file = self.file(key)?;
        std::fs::read(&file).map_err(|e| match e.kind() {
            ErrorKind::NotFound => RegistryError::ObjectMissing(key.to_owned()),
            _ => RegistryError::io(&file)(e),
        })
    }

    fn delete(&self, key: &str) -> Result<()> {
        let file = self.file(key)?;
        match std::fs::remove_file(&file) {
            Err(e) if e.kind() != ErrorKind::NotFound => return Err(RegistryError::io(&file)(e)),
            _ => {}
        }
        let Some(dir) = file.parent().filter(|dir| *dir != self.root) else {
            return sync_dir(&self.root);
        };
        // The folder goes with its last file; one that still holds some stays.
        match std::fs::remove_dir(dir) {
            Ok(()) => sync_dir(dir.parent().unwrap_or(&self.root)),
            Err(_) => sync_dir(dir),
        }
    }

    fn list(&self, prefix: &str) -> Result<Vec<Listed>> {
        let dir = self.file(prefix)?;
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(RegistryError::io(&dir)(e)),
        };
        let mut keys = Vec::new();
        for entry in entries {
            let entry = entry.map_err(RegistryError::io(&dir))?;
            let Ok(meta) = entry.metadata() else {
                continue; // gone since the listing: nothing to report
            };
            if meta.is_file() {
                let name = entry.file_name().to_string_lossy().into_owned();
                keys.push(Listed {
                    key: format!("{}/{name}", prefix.trim_end_matches('/')),
                    size_bytes: meta.len(),
                    modified: meta.modified().map_err(RegistryError::io(entry.path()))?,
                });
            }
        }
        keys.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(keys)
    }
}

/// Creates `dir` and fsyncs the parent of every directory it created.
fn create_dirs(dir: &Path) -> Result<()> {
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

/// Makes a directory's entries (a rename, a new or removed file) durable.
fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(RegistryError::io(dir))?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    #[test]
    fn written_files_are_readable_by_others() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let store = DirStore::new(dir.path()).unwrap();
        let file = store.put("a/b.bin", b"x").unwrap();
        let mode = std::fs::metadata(dir.path().join(&file.path))
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

    #[test]
    fn a_put_never_replaces_other_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let store = DirStore::new(dir.path()).unwrap();
        let first = store.put("runs/1/a", b"a").unwrap();
        // A retried write of the same bytes is success.
        assert_eq!(store.put("runs/1/a", b"a").unwrap(), first);
        assert!(matches!(
            store.put("runs/1/a", b"b"),
            Err(RegistryError::ObjectConflict(key)) if key == "runs/1/a"
        ));
        assert_eq!(store.get("runs/1/a").unwrap(), b"a");
        // No temp file is left behind by either.
        let names: Vec<_> = store
            .list("runs/1")
            .unwrap()
            .into_iter()
            .map(|l| l.key)
            .collect();
        assert_eq!(names, ["runs/1/a"]);
    }

    #[test]
    fn a_folder_goes_with_its_last_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = DirStore::new(dir.path()).unwrap();
        store.put("runs/1/a", b"a").unwrap();
        store.put("runs/1/b", b"b").unwrap();
        store.delete("runs/1/a").unwrap();
        assert!(dir.path().join("runs/1").is_dir());
        store.delete("runs/1/b").unwrap();
        assert!(!dir.path().join("runs/1").exists());
        assert!(dir.path().is_dir());
        // And comes back with the next file.
        store.put("runs/1/c", b"c").unwrap();
        assert_eq!(store.get("runs/1/c").unwrap(), b"c");
    }
}
