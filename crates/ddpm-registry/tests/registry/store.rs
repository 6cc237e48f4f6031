//! The checkpoint store with the registry: writes hashed as written, registration,
//! verified reads, deletion, retention, reconciliation, the server's cache; and what
//! every backend promises ([`ObjectStore`]). All of it goes through the backend
//! `helpers::objects` returns, never the file system, except the directory backend's own
//! tests at the end. Each test runs on a directory (with SQLite and with PostgreSQL) and
//! on a bucket of the S3 test server (moto's, `DDPM_TEST_S3_URL`).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ddpm_registry::{
    CheckpointKind, CheckpointRecord, CheckpointStore, DirStore, FinalStatus, ObjectCache,
    ObjectStore, RegistryError, S3Store,
};
use ddpm_testkit::both_backends;
use sha2::{Digest, Sha256};

use crate::helpers::{lease, objects, objects_of, running_run, save, store, TestContext};

/// Replaces the object at `key` behind the registry's back (puts never replace).
fn tamper(objects: &dyn ObjectStore, key: &str, bytes: &[u8]) {
    objects.delete(key).unwrap();
    objects.put(key, bytes).unwrap();
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Deterministic content of a checkpoint at `step`.
fn content(step: i64) -> Vec<u8> {
    (0..4096u32).map(|i| (i as i64 * 31 + step) as u8).collect()
}

/// The EMA checkpoint of run `run_id` at step 100, saved and registered.
async fn ema_at_100(t: &TestContext, store: &CheckpointStore, run_id: i64) -> CheckpointRecord {
    save(
        store,
        &t.registry,
        run_id,
        100,
        CheckpointKind::Ema,
        &content(100),
    )
    .await
    .unwrap()
}

async fn saved_checkpoints_are_durable_and_registered(t: TestContext) {
    let store = store(&t);
    let run = running_run(&t.registry, "h").await;
    let bytes = content(1000);
    let record = save(
        &store,
        &t.registry,
        run.id,
        1000,
        CheckpointKind::Ema,
        &bytes,
    )
    .await
    .unwrap();

    assert_eq!(
        record.path,
        format!("runs/{}/ema-00001000.safetensors", run.id)
    );
    assert_eq!(record.sha256, sha256_hex(&bytes));
    assert_eq!(record.size_bytes, bytes.len() as i64);
    assert_eq!(store.open(&record).unwrap(), bytes);
    // Nothing else left behind (no temp file).
    assert_eq!(
        objects_of(&*objects(&t), run.id),
        ["ema-00001000.safetensors"]
    );
    assert_eq!(
        t.registry
            .newest_checkpoint(Some(run.id), CheckpointKind::Ema)
            .await
            .unwrap(),
        Some(record)
    );
}

async fn a_changed_file_fails_verification(t: TestContext) {
    let (store, objects) = (store(&t), objects(&t));
    let run = running_run(&t.registry, "h").await;
    let record = ema_at_100(&t, &store, run.id).await;
    let mut bytes = objects.get(&record.path).unwrap();
    bytes[7] ^= 1;
    tamper(&*objects, &record.path, &bytes);
    assert!(matches!(
        store.open(&record),
        Err(RegistryError::ChecksumMismatch { expected, actual, .. })
            if expected == record.sha256 && actual == sha256_hex(&bytes)
    ));
    // Same bytes, one more: the size is checked too.
    bytes[7] ^= 1;
    bytes.push(0);
    tamper(&*objects, &record.path, &bytes);
    assert!(matches!(
        store.open(&record),
        Err(RegistryError::ChecksumMismatch { .. })
    ));
    objects.delete(&record.path).unwrap();
    assert!(matches!(
        store.open(&record),
        Err(RegistryError::ObjectMissing(key)) if key == record.path
    ));
}

async fn deleting_removes_row_file_and_grid(t: TestContext) {
    let (store, objects) = (store(&t), objects(&t));
    let run = running_run(&t.registry, "h").await;
    let rel = store.path_for(run.id, 100, CheckpointKind::Ema);
    store
        .write_bytes(&CheckpointStore::grid_path_for(&rel), b"png")
        .unwrap();
    let record = ema_at_100(&t, &store, run.id).await;
    assert_eq!(objects_of(&*objects, run.id).len(), 2);
    store.delete(&t.registry, &record).await.unwrap();
    assert!(objects_of(&*objects, run.id).is_empty());
    assert_eq!(t.registry.get_checkpoint(record.id).await.unwrap(), None);
    // A stale record touches no file.
    save(
        &store,
        &t.registry,
        run.id,
        100,
        CheckpointKind::Ema,
        b"new",
    )
    .await
    .unwrap();
    assert!(matches!(
        store.delete(&t.registry, &record).await,
        Err(RegistryError::CheckpointNotFound(_))
    ));
    assert_eq!(objects_of(&*objects, run.id).len(), 1);
}

/// Saves EMA (with grid) and state checkpoints at steps 100, 200, … .
async fn save_history(t: &TestContext, store: &CheckpointStore, run_id: i64, saves: i64) {
    for i in 1..=saves {
        let step = i * 100;
        let grid =
            CheckpointStore::grid_path_for(&store.path_for(run_id, step, CheckpointKind::Ema));
        store.write_bytes(&grid, b"png").unwrap();
        for kind in CheckpointKind::ALL {
            save(store, &t.registry, run_id, step, kind, &content(step))
                .await
                .unwrap();
        }
    }
}

async fn retention_keeps_the_last_k_of_each_kind(t: TestContext) {
    let (store, objects) = (store(&t), objects(&t));
    let run = running_run(&t.registry, "h").await;
    save_history(&t, &store, run.id, 5).await;
    assert_eq!(objects_of(&*objects, run.id).len(), 15);

    let deleted = store.apply_retention(&t.registry, run.id, 2).await.unwrap();
    let mut deleted_steps: Vec<_> = deleted.iter().map(|c| (c.step, c.kind)).collect();
    deleted_steps.sort_by_key(|(step, kind)| (*step, kind.as_str()));
    assert_eq!(
        deleted_steps,
        [
            (100, CheckpointKind::Ema),
            (100, CheckpointKind::State),
            (200, CheckpointKind::Ema),
            (200, CheckpointKind::State),
            (300, CheckpointKind::Ema),
            (300, CheckpointKind::State),
        ]
    );
    let kept: Vec<_> = t
        .registry
        .list_checkpoints(run.id)
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.step)
        .collect();
    assert_eq!(kept, [400, 400, 500, 500]);
    assert_eq!(
        objects_of(&*objects, run.id),
        [
            "ema-00000400.png",
            "ema-00000400.safetensors",
            "ema-00000500.png",
            "ema-00000500.safetensors",
            "state-00000400.safetensors",
            "state-00000500.safetensors",
        ]
    );
    // Applying it again changes nothing.
    assert!(store
        .apply_retention(&t.registry, run.id, 2)
        .await
        .unwrap()
        .is_empty());
}

async fn retention_keeps_the_newest_of_a_completed_run(t: TestContext) {
    let (store, objects) = (store(&t), objects(&t));
    let done = running_run(&t.registry, "h").await;
    save_history(&t, &store, done.id, 3).await;
    lease(&t.registry, &done)
        .finish(FinalStatus::Completed, None)
        .await
        .unwrap();
    let failed = running_run(&t.registry, "h").await;
    save_history(&t, &store, failed.id, 2).await;
    lease(&t.registry, &failed)
        .finish(FinalStatus::Failed, Some("diverged"))
        .await
        .unwrap();

    // keep_last 0: a completed run still keeps its newest checkpoint of each kind…
    store
        .apply_retention(&t.registry, done.id, 0)
        .await
        .unwrap();
    let kept: Vec<_> = t
        .registry
        .list_checkpoints(done.id)
        .await
        .unwrap()
        .into_iter()
        .map(|c| (c.step, c.kind))
        .collect();
    assert_eq!(
        kept,
        [(300, CheckpointKind::Ema), (300, CheckpointKind::State)]
    );
    let newest = t
        .registry
        .newest_checkpoint(None, CheckpointKind::Ema)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(newest.run_id, failed.id);
    // …and a failed one does not.
    let deleted = store
        .apply_retention(&t.registry, failed.id, 0)
        .await
        .unwrap();
    assert_eq!(deleted.len(), 4);
    assert!(t
        .registry
        .list_checkpoints(failed.id)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        t.registry
            .newest_checkpoint(None, CheckpointKind::Ema)
            .await
            .unwrap()
            .map(|c| c.run_id),
        Some(done.id)
    );
    // Files follow rows: the completed run's newest two files and its grid.
    assert_eq!(objects_of(&*objects, done.id).len(), 3);
    assert!(objects_of(&*objects, failed.id).is_empty());
    assert!(matches!(
        store.apply_retention(&t.registry, failed.id + 100, 1).await,
        Err(RegistryError::RunNotFound(_))
    ));
}

/// A checkpoint's key carries its hash, so a retried write lands on the same key and
/// succeeds, and no write ever replaces another's object.
async fn checkpoint_keys_carry_their_hash_and_are_written_once(t: TestContext) {
    let (store, objects) = (store(&t), objects(&t));
    let run = running_run(&t.registry, "h").await;
    let bytes = content(700);
    let file = store
        .write_checkpoint(run.id, 700, CheckpointKind::State, &bytes)
        .unwrap();
    let sha = sha256_hex(&bytes);
    assert_eq!(
        file.path,
        format!("runs/{}/state-00000700-{}.safetensors", run.id, &sha[..12])
    );
    assert_eq!(file.sha256, sha);
    // The response was lost and the write retried: the same key, success.
    let again = store
        .write_checkpoint(run.id, 700, CheckpointKind::State, &bytes)
        .unwrap();
    assert_eq!(again, file);
    // Other bytes under a key that is taken (a zombie, a collision): refused, and the
    // object stays as it was.
    assert!(matches!(
        objects.put(&file.path, b"other bytes"),
        Err(RegistryError::ObjectConflict(key)) if key == file.path
    ));
    assert_eq!(objects.get(&file.path).unwrap(), bytes);
    let record = store
        .register(&t.registry, run.id, 700, CheckpointKind::State, &file)
        .await
        .unwrap();
    assert_eq!(store.open(&record).unwrap(), bytes);
    assert_eq!(objects_of(&*objects, run.id).len(), 1);
}

/// Reconciliation removes objects without a row, older than the grace period, and
/// keeps rows' objects, their grids, the keys it is told to keep and what it does not
/// recognise.
async fn reconciliation_removes_old_objects_without_a_row(t: TestContext) {
    let (store, objects) = (store(&t), objects(&t));
    let run = running_run(&t.registry, "h").await;
    let grid_of = |path: &str| {
        store
            .write_bytes(&CheckpointStore::grid_path_for(Path::new(path)), b"png")
            .unwrap()
    };
    let kept = ema_at_100(&t, &store, run.id).await;
    grid_of(&kept.path);
    let orphan = store
        .write_checkpoint(run.id, 200, CheckpointKind::Ema, &content(200))
        .unwrap();
    grid_of(&orphan.path);
    let waiting = store
        .write_checkpoint(run.id, 300, CheckpointKind::State, &content(300))
        .unwrap();
    objects
        .put(&format!("runs/{}/notes.txt", run.id), b"an operator's")
        .unwrap();
    let registered = t.registry.list_checkpoints(run.id).await.unwrap();
    let keep: Vec<&str> = registered
        .iter()
        .map(|r| r.path.as_str())
        .chain([waiting.path.as_str()])
        .collect();
    // Everything is younger than an hour: nothing goes.
    let removed = store
        .reconcile_run(run.id, &keep, Duration::from_secs(3600))
        .await
        .unwrap();
    assert!(removed.is_empty(), "{removed:?}");
    assert_eq!(objects_of(&*objects, run.id).len(), 6);
    // Past the grace (S3's clock has second resolution: wait it out).
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let mut removed = store
        .reconcile_run(run.id, &keep, Duration::from_secs(1))
        .await
        .unwrap();
    removed.sort();
    let grid = CheckpointStore::grid_path_for(Path::new(&orphan.path))
        .to_string_lossy()
        .into_owned();
    let mut expected = vec![orphan.path.clone(), grid];
    expected.sort();
    assert_eq!(removed, expected);
    let mut left = objects_of(&*objects, run.id);
    left.sort();
    assert_eq!(left.len(), 4, "{left:?}");
    assert!(left.contains(&"notes.txt".to_string()));
    assert_eq!(store.open(&kept).unwrap(), content(100));
}

/// A server's cache: the first open streams the object into the cache, the next is
/// served from it; a wrong hash (the object changed behind the registry's back) is a
/// checksum mismatch and nothing is cached; trimming drops copies no row names.
async fn the_cache_serves_verified_copies(t: TestContext) {
    let objects = objects(&t);
    let cache_dir = t.dir.path().join("cache");
    let store = CheckpointStore::on(Arc::clone(&objects))
        .with_cache(ObjectCache::new(&cache_dir, 1).unwrap());
    let run = running_run(&t.registry, "h").await;
    let first = ema_at_100(&t, &store, run.id).await;
    assert_eq!(store.open(&first).unwrap(), content(100));
    assert!(cache_dir.join(&first.sha256).is_file());
    // Served from the cache: the object may be gone from the store meanwhile.
    let bytes = objects.get(&first.path).unwrap();
    objects.delete(&first.path).unwrap();
    assert_eq!(store.open(&first).unwrap(), content(100));
    objects.put(&first.path, &bytes).unwrap();
    // A checkpoint whose object no longer matches its row.
    let second = save(
        &store,
        &t.registry,
        run.id,
        200,
        CheckpointKind::Ema,
        &content(200),
    )
    .await
    .unwrap();
    let mut bad = content(200);
    bad[0] ^= 0xff;
    tamper(&*objects, &second.path, &bad);
    assert!(matches!(
        store.open(&second),
        Err(RegistryError::ChecksumMismatch { expected, .. }) if expected == second.sha256
    ));
    assert!(!cache_dir.join(&second.sha256).exists());
    // The bound is 1 byte: trimming keeps only the one in use.
    let live = t.registry.checkpoint_hashes().await.unwrap();
    assert!(live.contains(&first.sha256) && live.contains(&second.sha256));
    let evicted = store
        .trim_cache(live.clone(), second.sha256.clone())
        .await
        .unwrap();
    assert_eq!(evicted, std::slice::from_ref(&first.sha256));
    assert!(store
        .trim_cache(HashSet::new(), String::new())
        .await
        .unwrap()
        .is_empty());
}

/// Each test on a directory store (on SQLite and on PostgreSQL) and, in `s3`, on a bucket
/// of the S3 test server: one list, so that no test runs on one backend only.
macro_rules! on_every_store {
    ($($test:ident),* $(,)?) => {
        both_backends!(crate::helpers::run; $($test),*);

        mod s3 {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    crate::helpers::run_on_s3(super::$test).await
                }
            )*
        }
    };
}

on_every_store!(
    saved_checkpoints_are_durable_and_registered,
    a_changed_file_fails_verification,
    deleting_removes_row_file_and_grid,
    retention_keeps_the_last_k_of_each_kind,
    retention_keeps_the_newest_of_a_completed_run,
    checkpoint_keys_carry_their_hash_and_are_written_once,
    reconciliation_removes_old_objects_without_a_row,
    the_cache_serves_verified_copies,
);

/// Every backend under test, each in its own scratch space (kept alive by the guard):
/// a directory and a fresh bucket on the S3 test server.
fn backends() -> Vec<(Box<dyn ObjectStore>, tempfile::TempDir)> {
    let dir = tempfile::tempdir().unwrap();
    let s3 = S3Store::new(&ddpm_testkit::s3_bucket("some/prefix")).unwrap();
    vec![
        (Box::new(DirStore::new(dir.path()).unwrap()), dir),
        (Box::new(s3), tempfile::tempdir().unwrap()),
    ]
}

#[test]
fn puts_are_create_only_and_hash_what_is_written() {
    for (objects, _guard) in backends() {
        let first = objects.put("a/b/c.bin", b"first").unwrap();
        assert_eq!(first.sha256, sha256_hex(b"first"));
        assert_eq!((first.size_bytes, first.path.as_str()), (5, "a/b/c.bin"));
        // A retried put of the same bytes is success; other bytes are refused.
        assert_eq!(objects.put("a/b/c.bin", b"first").unwrap(), first);
        assert!(
            matches!(
                objects.put("a/b/c.bin", b"second"),
                Err(RegistryError::ObjectConflict(key)) if key == "a/b/c.bin"
            ),
            "{objects}"
        );
        assert_eq!(objects.get("a/b/c.bin").unwrap(), b"first");
        let mut streamed = Vec::new();
        assert_eq!(objects.get_into("a/b/c.bin", &mut streamed).unwrap(), 5);
        assert_eq!(streamed, b"first");
        assert!(matches!(
            objects.get("a/b/nothing.bin"),
            Err(RegistryError::ObjectMissing(key)) if key == "a/b/nothing.bin"
        ));
        objects.check().unwrap();
    }
}

#[test]
fn lists_show_a_folders_objects_and_deletes_are_idempotent() {
    for (objects, _guard) in backends() {
        assert!(objects.list("runs/1").unwrap().is_empty());
        for key in ["runs/1/b", "runs/1/a", "runs/12/a", "runs/1x"] {
            objects.put(key, key.as_bytes()).unwrap();
        }
        let listed = objects.list("runs/1").unwrap();
        let keys: Vec<&str> = listed.iter().map(|l| l.key.as_str()).collect();
        assert_eq!(keys, ["runs/1/a", "runs/1/b"]);
        assert_eq!(listed[0].size_bytes, 8);
        let age = listed[0].modified.elapsed().unwrap_or_default();
        assert!(age < Duration::from_secs(60), "{age:?}");
        objects.delete("runs/1/a").unwrap();
        objects.delete("runs/1/a").unwrap();
        objects.delete("runs/1/b").unwrap();
        assert!(objects.list("runs/1").unwrap().is_empty());
        let keys: Vec<String> = objects
            .list("runs/12")
            .unwrap()
            .into_iter()
            .map(|l| l.key)
            .collect();
        assert_eq!(keys, ["runs/12/a"]);
        assert_eq!(objects.get("runs/1x").unwrap(), b"runs/1x");
    }
}

/// A large object (a seed-size checkpoint is ~90 MB) streams through in one piece, also
/// when the blocking call is made inside a tokio task (a test, a bench): thousands of
/// chunks exhaust a task's coop budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_object_round_trips() {
    let bytes: Vec<u8> = (0..24u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    for (objects, _guard) in backends() {
        let file = objects.put("runs/9/big.safetensors", &bytes).unwrap();
        assert_eq!(file.sha256, sha256_hex(&bytes));
        let mut streamed = Vec::new();
        objects
            .get_into("runs/9/big.safetensors", &mut streamed)
            .unwrap();
        assert!(streamed == bytes, "{objects}: the bytes differ");
    }
}

/// An S3 server that does not answer is unavailable (the trainer defers, the server
/// retries); a bucket that does not exist, or credentials the server refuses, are refused
/// for good, and say which.
#[test]
fn s3_failures_are_sorted_into_unavailable_and_refused() {
    // A port nobody listens on: connection refused, retried until the timeout.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let mut down =
        ddpm_service::S3Spec::at_endpoint(&format!("http://127.0.0.1:{port}"), "ddpm-nobody", "p");
    down.timeout = Duration::from_secs(1);
    let store = S3Store::new(&down).unwrap();
    let started = std::time::Instant::now();
    for result in [
        store.put("runs/1/a", b"a").map(drop),
        store.get("runs/1/a").map(drop),
        store.check(),
    ] {
        assert!(
            matches!(result, Err(RegistryError::StoreUnavailable(_))),
            "{result:?}"
        );
    }
    assert!(started.elapsed() < Duration::from_secs(30));

    let mut missing = ddpm_testkit::s3_bucket("p");
    missing.bucket = format!("{}-missing", missing.bucket);
    let store = S3Store::new(&missing).unwrap();
    for result in [store.check(), store.put("runs/1/a", b"a").map(drop)] {
        match result {
            Err(RegistryError::StoreRefused(message)) => {
                assert!(message.contains("bucket does not exist"), "{message}")
            }
            other => panic!("{other:?}"),
        }
    }

    // A server that checks credentials and knows none of ours (403 InvalidAccessKeyId).
    let refused = ddpm_service::S3Spec::at_endpoint(
        &ddpm_testkit::s3_auth_server_url(),
        "ddpm-test-refused",
        "p",
    );
    let store = S3Store::new(&refused).unwrap();
    for result in [
        store.check(),
        store.put("runs/1/a", b"a").map(drop),
        store.get("runs/1/a").map(drop),
        store.delete("runs/1/a"),
    ] {
        match result {
            Err(RegistryError::StoreRefused(message)) => {
                assert!(message.contains("check the credentials"), "{message}")
            }
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn keys_outside_the_store_are_refused() {
    for (objects, _guard) in backends() {
        let store = CheckpointStore::on(objects.into());
        for bad in ["../escape.bin", "/abs.bin", "a/../../up"] {
            assert!(
                matches!(
                    store.write_bytes(Path::new(bad), b"x"),
                    Err(RegistryError::InvalidPath(_))
                ),
                "{bad}"
            );
            assert!(matches!(
                store.read(Path::new(bad)),
                Err(RegistryError::InvalidPath(_))
            ));
        }
    }
}

/// Every file under `dir`, relative, sorted.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(root, &path, out);
            } else {
                out.push(path.strip_prefix(root).unwrap().to_path_buf());
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

#[test]
fn a_failed_put_leaves_no_temp_file_and_the_target_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let objects = DirStore::new(dir.path()).unwrap();
    // The target is a folder: the rename over it fails after the temp file is written.
    std::fs::create_dir_all(dir.path().join("runs/1/state-00000500.safetensors")).unwrap();
    std::fs::write(
        dir.path().join("runs/1/state-00000500.safetensors/keep"),
        b"k",
    )
    .unwrap();
    assert!(matches!(
        objects.put("runs/1/state-00000500.safetensors", b"half a checkpoint"),
        Err(RegistryError::Io { .. })
    ));
    assert_eq!(
        files_under(dir.path()),
        [PathBuf::from("runs/1/state-00000500.safetensors/keep")]
    );
    assert!(objects.list("runs/1").unwrap().is_empty());
}
