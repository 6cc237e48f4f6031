//! The checkpoint store with the registry: atomic writes, checksums,
//! registration only once durable, deletion, retention.

use std::path::{Path, PathBuf};

use ddpm_registry::{CheckpointKind, CheckpointStore, RegistryError, RunStatus};
use sha2::{Digest, Sha256};

use crate::helpers::{lease, running_run, TestContext};

fn store(t: &TestContext) -> CheckpointStore {
    CheckpointStore::new(t.dir.path().join("checkpoints")).unwrap()
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

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Deterministic content of a checkpoint at `step`.
fn content(step: i64) -> Vec<u8> {
    (0..4096u32).map(|i| (i as i64 * 31 + step) as u8).collect()
}

async fn saved_checkpoints_are_durable_and_registered(t: TestContext) {
    let store = store(&t);
    let run = running_run(&t.registry, "h").await;
    let bytes = content(1000);
    let expected_sha = sha256_hex(&bytes);
    let written = bytes.clone();
    let record = store
        .save_and_register(&t.registry, run.id, 1000, CheckpointKind::Ema, move |tmp| {
            std::fs::write(tmp, &written)
        })
        .await
        .unwrap();

    assert_eq!(
        record.path,
        format!("runs/{}/ema-00001000.safetensors", run.id)
    );
    assert_eq!(record.sha256, expected_sha);
    assert_eq!(record.size_bytes, bytes.len() as i64);
    let path = store.resolve(&record.path).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), bytes);
    assert_eq!(CheckpointStore::sha256_file(&path).unwrap(), expected_sha);
    // No temp file left behind.
    assert_eq!(
        files_under(store.root()),
        [PathBuf::from(format!(
            "runs/{}/ema-00001000.safetensors",
            run.id
        ))]
    );
    assert_eq!(store.verify(&record).unwrap(), path);
    assert_eq!(
        t.registry
            .newest_checkpoint(Some(run.id), CheckpointKind::Ema)
            .await
            .unwrap(),
        Some(record)
    );
}

async fn a_failing_write_leaves_nothing_behind(t: TestContext) {
    let store = store(&t);
    let run = running_run(&t.registry, "h").await;
    let result = store
        .save_and_register(&t.registry, run.id, 500, CheckpointKind::State, |tmp| {
            std::fs::write(tmp, b"half a checkpoint")?;
            Err(std::io::Error::other("disk on fire"))
        })
        .await;
    match result {
        Err(RegistryError::Write { path, source }) => {
            assert!(path.ends_with("state-00000500.safetensors"));
            assert!(source.to_string().contains("disk on fire"));
        }
        other => panic!("expected a write error, got {other:?}"),
    }
    assert!(
        files_under(store.root()).is_empty(),
        "{:?}",
        files_under(store.root())
    );
    assert!(t
        .registry
        .list_checkpoints(run.id)
        .await
        .unwrap()
        .is_empty());
}

async fn a_failed_overwrite_keeps_the_old_file(t: TestContext) {
    let store = store(&t);
    let run = running_run(&t.registry, "h").await;
    let first = store
        .save_and_register(&t.registry, run.id, 100, CheckpointKind::Ema, |tmp| {
            std::fs::write(tmp, b"good")
        })
        .await
        .unwrap();
    let failed = store
        .save_and_register(
            &t.registry,
            run.id,
            100,
            CheckpointKind::Ema,
            |tmp| -> Result<(), ddpm_registry::BoxError> {
                std::fs::write(tmp, b"torn")?;
                Err("serialisation failed".into())
            },
        )
        .await;
    assert!(matches!(failed, Err(RegistryError::Write { .. })));
    assert_eq!(
        store.verify(&first).unwrap(),
        store.resolve(&first.path).unwrap()
    );
    assert_eq!(t.registry.list_checkpoints(run.id).await.unwrap(), [first]);
    assert_eq!(files_under(store.root()).len(), 1);
}

async fn a_changed_file_fails_verification(t: TestContext) {
    let store = store(&t);
    let run = running_run(&t.registry, "h").await;
    let record = store
        .save_and_register(&t.registry, run.id, 100, CheckpointKind::Ema, |tmp| {
            std::fs::write(tmp, content(100))
        })
        .await
        .unwrap();
    let path = store.resolve(&record.path).unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[7] ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    assert!(matches!(
        store.verify(&record),
        Err(RegistryError::ChecksumMismatch { expected, actual, .. })
            if expected == record.sha256 && actual == sha256_hex(&bytes)
    ));
    std::fs::remove_file(&path).unwrap();
    assert!(matches!(
        store.verify(&record),
        Err(RegistryError::Io { .. })
    ));
}

async fn deleting_removes_row_file_and_grid(t: TestContext) {
    let store = store(&t);
    let run = running_run(&t.registry, "h").await;
    let rel = store.path_for(run.id, 100, CheckpointKind::Ema);
    store
        .write_bytes(&CheckpointStore::grid_path_for(&rel), b"png")
        .unwrap();
    let file = store.write_bytes(&rel, &content(100)).unwrap();
    let record = store
        .register(&t.registry, run.id, 100, CheckpointKind::Ema, &file)
        .await
        .unwrap();
    assert_eq!(files_under(store.root()).len(), 2);
    store.delete(&t.registry, &record).await.unwrap();
    assert!(files_under(store.root()).is_empty());
    assert_eq!(t.registry.get_checkpoint(record.id).await.unwrap(), None);
    // A stale record touches no file.
    let again = store.write_bytes(&rel, b"new").unwrap();
    store
        .register(&t.registry, run.id, 100, CheckpointKind::Ema, &again)
        .await
        .unwrap();
    assert!(matches!(
        store.delete(&t.registry, &record).await,
        Err(RegistryError::CheckpointNotFound(_))
    ));
    assert_eq!(files_under(store.root()).len(), 1);
}

/// Saves EMA (with grid) and state checkpoints at steps 100, 200, … .
async fn save_history(t: &TestContext, store: &CheckpointStore, run_id: i64, saves: i64) {
    for i in 1..=saves {
        let step = i * 100;
        let grid =
            CheckpointStore::grid_path_for(&store.path_for(run_id, step, CheckpointKind::Ema));
        store.write_bytes(&grid, b"png").unwrap();
        for kind in CheckpointKind::ALL {
            store
                .save_and_register(&t.registry, run_id, step, kind, move |tmp| {
                    std::fs::write(tmp, content(step))
                })
                .await
                .unwrap();
        }
    }
}

async fn retention_keeps_the_last_k_of_each_kind(t: TestContext) {
    let store = store(&t);
    let run = running_run(&t.registry, "h").await;
    save_history(&t, &store, run.id, 5).await;
    assert_eq!(files_under(store.root()).len(), 15);

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
    let run_dir = format!("runs/{}", run.id);
    let files: Vec<PathBuf> = [
        "ema-00000400.png",
        "ema-00000400.safetensors",
        "ema-00000500.png",
        "ema-00000500.safetensors",
        "state-00000400.safetensors",
        "state-00000500.safetensors",
    ]
    .iter()
    .map(|f| Path::new(&run_dir).join(f))
    .collect();
    assert_eq!(files_under(store.root()), files);
    // Applying it again changes nothing.
    assert!(store
        .apply_retention(&t.registry, run.id, 2)
        .await
        .unwrap()
        .is_empty());
}

async fn retention_keeps_the_newest_of_a_completed_run(t: TestContext) {
    let store = store(&t);
    let done = running_run(&t.registry, "h").await;
    save_history(&t, &store, done.id, 3).await;
    lease(&t.registry, &done)
        .finish(RunStatus::Completed, None)
        .await
        .unwrap();
    let failed = running_run(&t.registry, "h").await;
    save_history(&t, &store, failed.id, 2).await;
    lease(&t.registry, &failed)
        .finish(RunStatus::Failed, Some("diverged"))
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
    assert_eq!(files_under(store.root()).len(), 3);
    assert!(matches!(
        store.apply_retention(&t.registry, failed.id + 100, 1).await,
        Err(RegistryError::RunNotFound(_))
    ));
}

both_backends!(
    saved_checkpoints_are_durable_and_registered,
    a_failing_write_leaves_nothing_behind,
    a_failed_overwrite_keeps_the_old_file,
    a_changed_file_fails_verification,
    deleting_removes_row_file_and_grid,
    retention_keeps_the_last_k_of_each_kind,
    retention_keeps_the_newest_of_a_completed_run,
);

#[test]
fn a_panicking_write_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let store = CheckpointStore::new(dir.path()).unwrap();
    let panicked = std::panic::catch_unwind(|| {
        store.write_atomic(
            Path::new("runs/1/x.safetensors"),
            |tmp| -> std::io::Result<()> {
                std::fs::write(tmp, b"partial")?;
                panic!("writer bug");
            },
        )
    });
    assert!(panicked.is_err());
    assert!(files_under(dir.path()).is_empty());
}

#[test]
fn writes_replace_atomically_and_hash_what_is_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let store = CheckpointStore::new(dir.path()).unwrap();
    let rel = Path::new("a/b/c.bin");
    let first = store.write_bytes(rel, b"first").unwrap();
    let second = store
        .write_atomic(rel, |tmp| -> std::io::Result<()> {
            // A writer that creates the file itself, in pieces.
            use std::io::Write;
            let mut f = std::fs::File::create(tmp)?;
            f.write_all(b"sec")?;
            f.write_all(b"ond")?;
            Ok(())
        })
        .unwrap();
    assert_eq!(first.sha256, sha256_hex(b"first"));
    assert_eq!(second.sha256, sha256_hex(b"second"));
    assert_eq!((second.size_bytes, second.path.as_str()), (6, "a/b/c.bin"));
    assert_eq!(std::fs::read(dir.path().join(rel)).unwrap(), b"second");
    assert_eq!(files_under(dir.path()), [PathBuf::from("a/b/c.bin")]);
    assert!(matches!(
        store.write_bytes(Path::new("../escape.bin"), b"x"),
        Err(RegistryError::InvalidPath(_))
    ));
    assert!(matches!(
        store.write_bytes(Path::new("/abs.bin"), b"x"),
        Err(RegistryError::InvalidPath(_))
    ));
}
