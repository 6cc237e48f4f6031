//! The interface every checkpoint store backend implements: write-and-publish, read,
//! delete, list. The domain (which keys a run has, retention, tidying, registration) is
//! `store`'s, written once on top of it; a backend only keeps bytes under keys.
//!
//! Keys are store-relative paths like `runs/<run>/<kind>-<step>-<hash>.safetensors`,
//! checked by [`validate_rel_path`](crate::relpath) before they reach a backend. Two
//! backends: a directory (`dir_store`) and an S3 bucket (`s3_store`).
//!
//! Every backend keeps the same invariants (ARCHITECTURE.md, "The checkpoint store"):
//! a reader never sees part of an object; a put never replaces an object with other
//! bytes (keys carry the content's hash, so a key is written once: a retried put of the
//! same bytes succeeds, other bytes are [`RegistryError::ObjectConflict`]); an object is
//! durable before `put` returns, and so before it is registered.

use std::fmt;
use std::io::Write;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::checkpoints::{CheckpointKind, NewCheckpoint};
use crate::error::{RegistryError, Result};

/// Where checkpoint bytes live. Every method blocks: the store calls them from a
/// blocking thread (the training thread, or `spawn_blocking` in its async methods), so an
/// async backend (the `object_store` crate) may block on its runtime's handle.
pub trait ObjectStore: fmt::Debug + fmt::Display + Send + Sync {
    /// Writes `bytes` under `key` and publishes them at once, create-only: a reader, or a
    /// crash, sees no object or the whole one, and the object is durable when this
    /// returns. A key that holds the same bytes already is success (a retried write);
    /// one that holds other bytes is [`RegistryError::ObjectConflict`] and stays as it
    /// is. The size and SHA-256 are of the bytes written.
    fn put(&self, key: &str, bytes: &[u8]) -> Result<StoredFile>;

    /// The bytes under `key`; [`RegistryError::ObjectMissing`] when there are none.
    fn get(&self, key: &str) -> Result<Vec<u8>>;

    /// Streams the bytes under `key` into `out` (a cache file), returning how many.
    fn get_into(&self, key: &str, out: &mut dyn Write) -> Result<u64> {
        let bytes = self.get(key)?;
        out.write_all(&bytes).map_err(|e| RegistryError::Io {
            path: key.into(),
            source: e,
        })?;
        Ok(bytes.len() as u64)
    }

    /// Deletes `key`, durably; a key already gone is no error.
    fn delete(&self, key: &str) -> Result<()>;

    /// The objects directly under the folder `prefix` (e.g. `runs/7`), sorted by key;
    /// none for a folder with nothing in it. Writes cut short that a backend leaves
    /// behind (the directory's temp files) are listed too, so that tidying can find them.
    fn list(&self, prefix: &str) -> Result<Vec<Listed>>;

    /// Whether the store can be reached and read, sending as little as possible: run at
    /// start-up, so that a missing bucket or refused credentials stop the process with
    /// their reason instead of failing its first run.
    fn check(&self) -> Result<()> {
        Ok(())
    }

    /// Whether reading costs a network transfer (S3): a server then keeps a local cache.
    fn is_remote(&self) -> bool {
        false
    }
}

/// An object a listing found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub key: String,
    pub size_bytes: u64,
    /// When it was written (the directory's mtime, S3's `Last-Modified`).
    pub modified: SystemTime,
}

/// An object a store wrote, durable and ready to register.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredFile {
    /// The object's key: relative to the store's root, `/`-separated (what the registry
    /// keeps).
    pub path: String,
    pub size_bytes: u64,
    /// Lowercase hex SHA-256 of the bytes written.
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
