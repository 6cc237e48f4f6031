//! The local copies a server keeps of checkpoints it loaded from a remote store (S3), so
//! that a restart or a swap back to an earlier checkpoint reads the disk, not the network.
//!
//! Files are named by the SHA-256 of their content: a cached file is the registered
//! checkpoint or nothing. An object is streamed from the store into a temp file, hashed
//! while written, compared with its row and only then renamed into place; a mismatch is a
//! corrupt checkpoint ([`RegistryError::ChecksumMismatch`]) and leaves nothing cached. A
//! hit is hashed again as it is read (a disk can rot), and a bad copy is dropped and
//! fetched anew. The cache is bounded: [`ObjectCache::trim`] evicts least recently used
//! copies, first those no row refers to any more.

use std::collections::HashSet;
use std::fs::File;
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use sha2::{Digest, Sha256};

use crate::backend::ObjectStore;
use crate::checkpoints::CheckpointRecord;
use crate::error::{RegistryError, Result};

/// A bounded directory of objects named by their SHA-256.
#[derive(Debug)]
pub struct ObjectCache {
    dir: PathBuf,
    max_bytes: u64,
}

impl ObjectCache {
    /// A cache in `dir` (created when missing) holding at most `max_bytes`, beyond the
    /// one object in use. Temp files a crash left there are removed.
    pub fn new(dir: impl Into<PathBuf>, max_bytes: u64) -> Result<ObjectCache> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(RegistryError::io(&dir))?;
        for entry in std::fs::read_dir(&dir).map_err(RegistryError::io(&dir))? {
            let entry = entry.map_err(RegistryError::io(&dir))?;
            if entry.file_name().to_string_lossy().ends_with(".part") {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(ObjectCache { dir, max_bytes })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn file(&self, sha256: &str) -> Result<PathBuf> {
        // The name comes from a row: it must be a hash, not a path.
        if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(RegistryError::InvalidArgument(format!(
                "{sha256:?} is not a SHA-256"
            )));
        }
        Ok(self.dir.join(sha256.to_ascii_lowercase()))
    }

    /// The bytes of the checkpoint `record`: the cached copy when it is there and intact,
    /// else fetched from `objects` into the cache. Blocking.
    pub fn fetch(&self, objects: &dyn ObjectStore, record: &CheckpointRecord) -> Result<Vec<u8>> {
        let file = self.file(&record.sha256)?;
        match std::fs::read(&file) {
            Ok(bytes) if hex::encode(Sha256::digest(&bytes)) == record.sha256 => {
                // Recently used: last to be evicted.
                let _ = File::options()
                    .append(true)
                    .open(&file)
                    .and_then(|f| f.set_modified(SystemTime::now()));
                tracing::debug!(sha256 = %record.sha256, "checkpoint read from the cache");
                return Ok(bytes);
            }
            Ok(_) => {
                tracing::warn!(file = %file.display(), "cached copy does not match its name: fetched again");
                let _ = std::fs::remove_file(&file);
            }
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(RegistryError::io(&file)(e)),
        }
        let mut temp = tempfile::Builder::new()
            .prefix(".")
            .suffix(".part")
            .tempfile_in(&self.dir)
            .map_err(RegistryError::io(&self.dir))?;
        let mut hashing = HashingWriter {
            out: temp.as_file_mut(),
            hasher: Sha256::new(),
        };
        let size = objects.get_into(&record.path, &mut hashing)?;
        let sha256 = hex::encode(hashing.hasher.finalize());
        if sha256 != record.sha256 || i64::try_from(size).ok() != Some(record.size_bytes) {
            return Err(RegistryError::ChecksumMismatch {
                path: PathBuf::from(&record.path),
                expected: record.sha256.clone(),
                actual: sha256,
            });
        }
        temp.as_file()
            .sync_all()
            .map_err(RegistryError::io(&file))?;
        temp.persist(&file)
            .map_err(|e| RegistryError::io(&file)(e.error))?;
        std::fs::read(&file).map_err(RegistryError::io(&file))
    }

    /// Evicts cached copies, least recently used first, until the cache holds at most
    /// its bound: first copies whose hash is not in `live` (no row refers to them any
    /// more), then the others, never `keep` (the one in use). Returns the evicted hashes.
    pub fn trim(&self, live: &HashSet<String>, keep: &str) -> Result<Vec<String>> {
        let mut copies = Vec::new();
        for entry in std::fs::read_dir(&self.dir).map_err(RegistryError::io(&self.dir))? {
            let entry = entry.map_err(RegistryError::io(&self.dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_file() && !name.starts_with('.') {
                let used = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                copies.push((name, meta.len(), used));
            }
        }
        let mut total: u64 = copies.iter().map(|(_, size, _)| size).sum();
        // Dead copies first, then by last use.
        copies.sort_by_key(|(name, _, used)| (live.contains(name), *used));
        let mut evicted = Vec::new();
        for (name, size, _) in copies {
            if total <= self.max_bytes {
                break;
            }
            if name == keep {
                continue;
            }
            let path = self.dir.join(&name);
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(RegistryError::io(&path)(e)),
            }
            total -= size;
            evicted.push(name);
        }
        Ok(evicted)
    }
}

/// Writes through to `out`, hashing what passes.
struct HashingWriter<'a> {
    out: &'a mut File,
    hasher: Sha256,
}

impl Write for HashingWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.out.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoints::CheckpointKind;
    use crate::dir_store::DirStore;

    fn record(path: &str, bytes: &[u8]) -> CheckpointRecord {
        CheckpointRecord {
            id: 1,
            run_id: 1,
            step: 1,
            kind: CheckpointKind::Ema,
            path: path.into(),
            size_bytes: bytes.len() as i64,
            sha256: hex::encode(Sha256::digest(bytes)),
            created_at: chrono::DateTime::from_timestamp_millis(0).unwrap(),
        }
    }

    #[test]
    fn a_fetch_is_cached_by_hash_and_checked() {
        let tmp = tempfile::tempdir().unwrap();
        let store = DirStore::new(tmp.path().join("store")).unwrap();
        let cache = ObjectCache::new(tmp.path().join("cache"), 1 << 20).unwrap();
        store.put("runs/1/a", b"alpha").unwrap();
        let good = record("runs/1/a", b"alpha");
        assert_eq!(cache.fetch(&store, &good).unwrap(), b"alpha");
        assert!(cache.dir().join(&good.sha256).is_file());
        // A hit needs no store: the object may be gone there.
        store.delete("runs/1/a").unwrap();
        assert_eq!(cache.fetch(&store, &good).unwrap(), b"alpha");
        // A rotten copy is dropped and fetched again (here: missing at the store).
        std::fs::write(cache.dir().join(&good.sha256), b"alphx").unwrap();
        assert!(matches!(
            cache.fetch(&store, &good),
            Err(RegistryError::ObjectMissing(_))
        ));
        assert!(!cache.dir().join(&good.sha256).exists());
        // Bytes that do not match their row are refused and not cached.
        store.put("runs/1/b", b"bravo").unwrap();
        let lying = record("runs/1/b", b"other");
        assert!(matches!(
            cache.fetch(&store, &lying),
            Err(RegistryError::ChecksumMismatch { .. })
        ));
        let names: Vec<_> = std::fs::read_dir(cache.dir()).unwrap().collect();
        assert!(names.is_empty(), "{names:?}");
        // A hash that is not one never becomes a path.
        let mut escaping = good.clone();
        escaping.sha256 = "../../etc/passwd".into();
        assert!(cache.fetch(&store, &escaping).is_err());
    }

    #[test]
    fn trimming_evicts_dead_then_least_recent_copies() {
        let tmp = tempfile::tempdir().unwrap();
        let store = DirStore::new(tmp.path().join("store")).unwrap();
        let cache = ObjectCache::new(tmp.path().join("cache"), 10).unwrap();
        let mut records = Vec::new();
        for (i, bytes) in [b"aaaaa", b"bbbbb", b"ccccc", b"ddddd"].iter().enumerate() {
            let key = format!("runs/1/{i}");
            store.put(&key, *bytes).unwrap();
            let r = record(&key, *bytes);
            cache.fetch(&store, &r).unwrap();
            // Distinct last-use times, oldest first.
            let when = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1000 + i as u64);
            File::options()
                .append(true)
                .open(cache.dir().join(&r.sha256))
                .unwrap()
                .set_modified(when)
                .unwrap();
            records.push(r);
        }
        let hash = |i: usize| records[i].sha256.clone();
        // 20 bytes in a 10-byte cache: copy 2 is dead, so it goes first, then the
        // least recently used live one (0).
        let live: HashSet<String> = [0, 1, 3].into_iter().map(hash).collect();
        let evicted = cache.trim(&live, &hash(3)).unwrap();
        assert_eq!(evicted, [hash(2), hash(0)]);
        // The copy in use stays even when the bound cannot be met without it.
        let tight = ObjectCache::new(cache.dir(), 0).unwrap();
        assert_eq!(tight.trim(&live, &hash(3)).unwrap(), [hash(1)]);
        assert!(cache.dir().join(hash(3)).is_file());
    }
}
