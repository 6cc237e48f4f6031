//! The interface every checkpoint store backend implements: write-and-publish, read,
//! delete, list. The domain (which keys a run has, retention, tidying, registration) is
//! `store`'s, written once on top of it; a backend only keeps bytes under keys.
//!
//! Keys are store-relative paths like `runs/<run>/<kind>-<step>.safetensors`, checked by
//! [`validate_rel_path`](crate::relpath) before they reach a backend. The directory
//! backend (`dir_store`) is the only one for now; object storage (S3) is planned.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::checkpoints::{CheckpointKind, NewCheckpoint};
use crate::error::{RegistryError, Result};

/// Where checkpoint bytes live. Every method blocks: the store calls them from a
/// blocking thread (the training thread, or `spawn_blocking` in its async methods), so an
/// async backend (the `object_store` crate) may block on its runtime's handle.
pub trait ObjectStore: fmt::Debug + fmt::Display + Send + Sync {
    /// Writes `bytes` under `key` and publishes them at once: a reader, or a crash, sees
    /// the old object or the new one, never part of one, and the object is durable when
    /// this returns. The size and SHA-256 are of the bytes written.
    fn put(&self, key: &str, bytes: &[u8]) -> Result<StoredFile>;

    /// The bytes under `key`; [`RegistryError::ObjectMissing`] when there are none.
    fn get(&self, key: &str) -> Result<Vec<u8>>;

    /// Deletes `key`, durably; a key already gone is no error.
    fn delete(&self, key: &str) -> Result<()>;

    /// The keys directly under the folder `prefix` (e.g. `runs/7`), sorted; none for a
    /// folder with nothing in it. Writes cut short that a backend leaves behind (the
    /// directory's temp files) are listed too, so that tidying can find them.
    fn list(&self, prefix: &str) -> Result<Vec<String>>;
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
