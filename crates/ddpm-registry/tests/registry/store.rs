//! The checkpoint store with the registry: writes hashed as written, registration,
//! verified reads, deletion, retention; and what every backend promises
//! ([`ObjectStore`]). All of it goes through the backend `helpers::objects` returns, never
//! the file system, except the directory backend's own tests at the end.

use std::path::{Path, PathBuf};

use ddpm_registry::{
    CheckpointKind, CheckpointRecord, CheckpointStore, DirStore, FinalStatus, ObjectStore,
    RegistryError,
};
use ddpm_testkit::both_backends;
use sha2::{Digest, Sha256};

use crate::helpers::{lease, objects, objects_of, running_run, save, store, TestContext};

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
    objects.put(&record.path, &bytes).unwrap();
    assert!(matches!(
        store.open(&record),
        Err(RegistryError::ChecksumMismatch { expected, actual, .. })
            if expected == record.sha256 && actual == sha256_hex(&bytes)
    ));
    // Same bytes, one more: the size is checked too.
    bytes[7] ^= 1;
    bytes.push(0);
    objects.put(&record.path, &bytes).unwrap();
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

both_backends!(
    crate::helpers::run;
    saved_checkpoints_are_durable_and_registered,
    a_changed_file_fails_verification,
    deleting_removes_row_file_and_grid,
    retention_keeps_the_last_k_of_each_kind,
    retention_keeps_the_newest_of_a_completed_run,
);

/// Every backend under test, each in its own scratch space (kept alive by the guard).
fn backends() -> Vec<(Box<dyn ObjectStore>, tempfile::TempDir)> {
    let dir = tempfile::tempdir().unwrap();
    vec![(Box::new(DirStore::new(dir.path()).unwrap()), dir)]
}

#[test]
fn puts_replace_whole_objects_and_hash_what_is_written() {
    for (objects, _guard) in backends() {
        let first = objects.put("a/b/c.bin", b"first").unwrap();
        let second = objects.put("a/b/c.bin", b"second").unwrap();
        assert_eq!(first.sha256, sha256_hex(b"first"));
        assert_eq!(second.sha256, sha256_hex(b"second"));
        assert_eq!((second.size_bytes, second.path.as_str()), (6, "a/b/c.bin"));
        assert_eq!(objects.get("a/b/c.bin").unwrap(), b"second");
        assert!(matches!(
            objects.get("a/b/nothing.bin"),
            Err(RegistryError::ObjectMissing(key)) if key == "a/b/nothing.bin"
        ));
    }
}

#[test]
fn lists_show_a_folders_objects_and_deletes_are_idempotent() {
    for (objects, _guard) in backends() {
        assert!(objects.list("runs/1").unwrap().is_empty());
        for key in ["runs/1/b", "runs/1/a", "runs/12/a", "runs/1x"] {
            objects.put(key, key.as_bytes()).unwrap();
        }
        assert_eq!(objects.list("runs/1").unwrap(), ["runs/1/a", "runs/1/b"]);
        objects.delete("runs/1/a").unwrap();
        objects.delete("runs/1/a").unwrap();
        objects.delete("runs/1/b").unwrap();
        assert!(objects.list("runs/1").unwrap().is_empty());
        assert_eq!(objects.list("runs/12").unwrap(), ["runs/12/a"]);
        assert_eq!(objects.get("runs/1x").unwrap(), b"runs/1x");
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
