//! The S3 backend of the store: objects in a bucket under a key prefix, on AWS or any
//! S3-compatible server (MinIO, Ceph, R2, GCS's XML API), through the `object_store`
//! crate.
//!
//! S3 has no rename, so there is no temp file: one PUT per object is the atomic publish
//! (a reader sees the whole object or none). Every PUT is create-only
//! (`If-None-Match: *`): keys carry the content's hash, so an object that exists already
//! holds the same bytes when a write is retried after a lost response, and is taken as
//! success; an object with other bytes is a conflict, never overwritten.
//!
//! Failures are sorted for the callers: a server that does not answer, times out or
//! answers 5xx after the retries ([`S3Spec::timeout`]) is
//! [`RegistryError::StoreUnavailable`] (the trainer defers the run); refused credentials,
//! a missing bucket or an unsupported request are [`RegistryError::StoreRefused`].
//!
//! The `object_store` client is async; the trait is blocking. The store owns a small
//! runtime of its own and runs each request there, so that it can be called from any
//! thread: the training thread, a blocking pool thread, a test.

use std::fmt;
use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ddpm_service::S3Spec;
use futures::StreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as ObjectPath;
use object_store::{ClientOptions, ObjectStore as _, PutMode, PutOptions, PutPayload, RetryConfig};
use sha2::{Digest, Sha256};

use crate::backend::{Listed, ObjectStore, StoredFile};
use crate::error::{RegistryError, Result};
use crate::relpath::validate_rel_path;

/// Objects in an S3 bucket, under a prefix.
pub struct S3Store {
    client: Arc<AmazonS3>,
    /// The key prefix, without leading or trailing `/` (maybe empty).
    prefix: String,
    /// `s3://bucket/prefix at endpoint`, for logs and errors.
    name: String,
    runtime: OwnRuntime,
}

impl S3Store {
    /// A store on the bucket and prefix of `spec`. Builds the client only: nothing is
    /// sent until [`ObjectStore::check`] or the first request.
    pub fn new(spec: &S3Spec) -> Result<S3Store> {
        let mut builder = AmazonS3Builder::new()
            .with_bucket_name(&spec.bucket)
            .with_region(&spec.region)
            .with_allow_http(spec.allow_http)
            .with_virtual_hosted_style_request(spec.virtual_hosted_style)
            .with_retry(RetryConfig {
                max_retries: 10,
                retry_timeout: spec.timeout,
                backoff: object_store::BackoffConfig {
                    init_backoff: Duration::from_millis(100),
                    max_backoff: Duration::from_secs(5),
                    base: 2.0,
                },
            })
            .with_client_options(
                ClientOptions::new()
                    .with_allow_http(spec.allow_http)
                    .with_connect_timeout(Duration::from_secs(5))
                    // One request may carry a seed-size checkpoint (~90 MB): generous,
                    // but bounded so that a hung server counts as unavailable.
                    .with_timeout(spec.timeout.max(Duration::from_secs(60))),
            );
        if let Some(endpoint) = &spec.endpoint {
            builder = builder.with_endpoint(endpoint);
        }
        if let Some(key) = &spec.access_key_id {
            builder = builder.with_access_key_id(key);
        }
        if let Some(secret) = &spec.secret_access_key {
            builder = builder.with_secret_access_key(secret.expose());
        }
        if let Some(token) = &spec.session_token {
            builder = builder.with_token(token.expose());
        }
        let client = builder
            .build()
            .map_err(|e| RegistryError::StoreRefused(format!("{spec}: {e}")))?;
        Ok(S3Store {
            client: Arc::new(client),
            prefix: spec.prefix.clone(),
            name: spec.to_string(),
            runtime: OwnRuntime::new()?,
        })
    }

    /// The object path of `key` (checked like every store key).
    fn path(&self, key: &str) -> Result<ObjectPath> {
        let key = validate_rel_path(std::path::Path::new(key))?;
        Ok(if self.prefix.is_empty() {
            ObjectPath::from(key)
        } else {
            ObjectPath::from(format!("{}/{key}", self.prefix))
        })
    }

    /// The store key of an object path under the prefix.
    fn key_of(&self, path: &ObjectPath) -> String {
        let full = path.as_ref();
        if self.prefix.is_empty() {
            return full.to_owned();
        }
        full.strip_prefix(&self.prefix)
            .map(|rest| rest.trim_start_matches('/').to_owned())
            .unwrap_or_else(|| full.to_owned())
    }

    /// Sorts an `object_store` error for the callers (see the module doc); `what` says
    /// which request on which key.
    fn error(&self, what: &str, key: &str, e: object_store::Error) -> RegistryError {
        use object_store::Error as E;
        // S3 answers 404 for a missing bucket too; its error code tells the two apart.
        if e.to_string().contains("NoSuchBucket") {
            return RegistryError::StoreRefused(format!(
                "{}: the bucket does not exist ({what} {key:?})",
                self.name
            ));
        }
        let refused = matches!(e, E::PermissionDenied { .. } | E::Unauthenticated { .. })
            || is_refused_request(&e.to_string());
        match e {
            E::NotFound { .. } => RegistryError::ObjectMissing(key.to_owned()),
            _ if refused => RegistryError::StoreRefused(format!(
                "{}: {what} {key:?} was refused: {e} (check the credentials and the \
                     bucket's policy)",
                self.name
            )),
            E::NotImplemented | E::NotSupported { .. } | E::InvalidPath { .. } => {
                RegistryError::StoreRefused(format!("{}: {what} {key:?}: {e}", self.name))
            }
            e => RegistryError::StoreUnavailable(format!("{}: {what} {key:?}: {e}", self.name)),
        }
    }

    /// Runs `work` on the store's runtime and waits for it, from any thread.
    fn run<T: Send + 'static>(
        &self,
        work: impl std::future::Future<Output = T> + Send + 'static,
    ) -> T {
        self.runtime.run(work)
    }
}

/// Whether an error's text is S3 refusing the request's credentials or permissions.
/// `object_store` reports a 401 or 403 as such only for some requests; a refused listing
/// (the start-up check) comes as a generic error whose text carries the status and S3's
/// error code (moto's and AWS's answers alike; tested against moto checking credentials).
fn is_refused_request(text: &str) -> bool {
    const REFUSED: [&str; 8] = [
        "401 Unauthorized",
        "403 Forbidden",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "AccessDenied",
        "ExpiredToken",
        "InvalidToken",
        "AllAccessDisabled",
    ];
    REFUSED.iter().any(|code| text.contains(code))
}

impl fmt::Debug for S3Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Store").field("name", &self.name).finish()
    }
}

impl fmt::Display for S3Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

impl ObjectStore for S3Store {
    fn put(&self, key: &str, bytes: &[u8]) -> Result<StoredFile> {
        let path = self.path(key)?;
        let key = self.key_of(&path);
        let sha256 = hex::encode(Sha256::digest(bytes));
        let stored = StoredFile {
            path: key.clone(),
            size_bytes: bytes.len() as u64,
            sha256,
        };
        crate::failpoint::hit("store.written");
        let client = Arc::clone(&self.client);
        let payload = PutPayload::from(bytes.to_vec());
        let put_path = path.clone();
        let options = PutOptions::from(PutMode::Create);
        match self.run(async move { client.put_opts(&put_path, payload, options).await }) {
            Ok(_) => {}
            // Create-only: someone put this key first. Same bytes (our own write whose
            // answer was lost, retried): done. Other bytes: never overwritten.
            Err(object_store::Error::AlreadyExists { .. }) => {
                let existing = self.get(&key)?;
                if hex::encode(Sha256::digest(&existing)) != stored.sha256 {
                    return Err(RegistryError::ObjectConflict(key));
                }
                tracing::info!(key = %key, "object already stored with the same bytes (a retried write)");
            }
            Err(e) => return Err(self.error("writing", &key, e)),
        }
        crate::failpoint::hit("store.published");
        tracing::debug!(store = %self.name, key = %key, size_bytes = bytes.len(), "object written");
        Ok(stored)
    }

    fn get(&self, key: &str) -> Result<Vec<u8>> {
        let mut bytes = Vec::new();
        self.get_into(key, &mut bytes)?;
        Ok(bytes)
    }

    fn get_into(&self, key: &str, out: &mut dyn Write) -> Result<u64> {
        let path = self.path(key)?;
        let client = Arc::clone(&self.client);
        // The body streams through a bounded channel: the runtime reads chunks while this
        // thread writes them, so a large object never sits in memory twice.
        let (tx, mut rx) = tokio::sync::mpsc::channel::<object_store::Result<bytes::Bytes>>(8);
        let reading = self.runtime.spawn(async move {
            let mut stream = match client.get(&path).await {
                Ok(result) => result.into_stream(),
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            };
            while let Some(chunk) = stream.next().await {
                let failed = chunk.is_err();
                // The reader went away (a write failed): stop reading.
                if tx.send(chunk).await.is_err() || failed {
                    return;
                }
            }
        });
        let mut written = 0u64;
        let mut outcome = Ok(());
        // `futures`' executor, not `blocking_recv`: callable inside a runtime too. And
        // unconstrained: inside a tokio task the task's coop budget would run out after
        // 128 chunks and never be refilled (this thread does not yield to tokio), so
        // `recv` would answer Pending forever.
        while let Some(chunk) = futures::executor::block_on(tokio::task::unconstrained(rx.recv())) {
            match chunk {
                Ok(chunk) => {
                    if let Err(e) = out.write_all(&chunk) {
                        outcome = Err(RegistryError::Io {
                            path: key.into(),
                            source: e,
                        });
                        break;
                    }
                    written += chunk.len() as u64;
                }
                Err(e) => {
                    outcome = Err(self.error("reading", key, e));
                    break;
                }
            }
        }
        reading.abort();
        outcome.map(|()| written)
    }

    fn delete(&self, key: &str) -> Result<()> {
        let path = self.path(key)?;
        let client = Arc::clone(&self.client);
        match self.run(async move { client.delete(&path).await }) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.error("deleting", key, e)),
        }
    }

    fn list(&self, prefix: &str) -> Result<Vec<Listed>> {
        let path = self.path(prefix)?;
        let client = Arc::clone(&self.client);
        let listed = self
            .run(async move { client.list_with_delimiter(Some(&path)).await })
            .map_err(|e| self.error("listing", prefix, e))?;
        let mut objects: Vec<Listed> = listed
            .objects
            .into_iter()
            .map(|meta| Listed {
                key: self.key_of(&meta.location),
                size_bytes: meta.size,
                modified: SystemTime::from(meta.last_modified),
            })
            .collect();
        objects.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(objects)
    }

    fn check(&self) -> Result<()> {
        // Listing an empty folder costs one request and needs the bucket and the read
        // permission; a write would leave an object behind.
        self.list("runs").map(drop)
    }

    fn is_remote(&self) -> bool {
        true
    }
}

/// A small multi-thread runtime owned by one store, shut down without waiting when the
/// store goes (dropping a runtime inside another runtime's task would panic).
struct OwnRuntime(Option<tokio::runtime::Runtime>);

impl OwnRuntime {
    fn new() -> Result<OwnRuntime> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("ddpm-s3")
            .enable_all()
            .build()
            .map_err(|e| RegistryError::Io {
                path: "s3 runtime".into(),
                source: e,
            })?;
        Ok(OwnRuntime(Some(runtime)))
    }

    fn handle(&self) -> &tokio::runtime::Handle {
        self.0.as_ref().expect("runtime alive until drop").handle()
    }

    fn spawn<T: Send + 'static>(
        &self,
        work: impl std::future::Future<Output = T> + Send + 'static,
    ) -> tokio::task::JoinHandle<T> {
        self.handle().spawn(work)
    }

    /// Runs `work` there and blocks this thread until it ends. `futures`' executor
    /// rather than `Handle::block_on`: it may be called from inside another runtime's
    /// blocking thread or the training thread alike.
    fn run<T: Send + 'static>(
        &self,
        work: impl std::future::Future<Output = T> + Send + 'static,
    ) -> T {
        // Unconstrained: see `get_into`.
        match futures::executor::block_on(tokio::task::unconstrained(self.spawn(work))) {
            Ok(value) => value,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => panic!("the store's runtime cancelled a request: {e}"),
        }
    }
}

impl Drop for OwnRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}
