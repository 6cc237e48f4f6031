//! Checkpoint scores and promotions (issue 9): a score lands in the checkpoint's own
//! registration, outlives its row, is replaced when the step is registered again and
//! goes with the run's history; retention keeps promoted and best-scored checkpoints;
//! promotions roll back in order; a database from before 0005 upgrades.

use ddpm_registry::{
    CheckpointKind, CheckpointRecord, CheckpointStore, RegistryError, ScoreValues, StoredFile,
};
use ddpm_testkit::both_backends;

use crate::helpers::{
    lease, lease_as, running_run, save, store, with_database_at_version, TestContext,
};

fn values(kid: f64) -> ScoreValues {
    ScoreValues {
        samples_per_class: 16,
        holdout_images: 24,
        class_accuracy: Some(0.75),
        fd: Some(kid * 10.0),
        fd_floor: Some(0.4),
        kid: Some(kid),
        kid_std: Some(kid / 4.0),
        diversity: Some(0.9),
        probe_accuracy: Some(0.98),
        settings: serde_json::json!({"sampler": "ddpm", "steps": 25}),
        seconds: 1.5,
    }
}

/// Writes and registers an EMA checkpoint of `run_id` at `step` through `leased`,
/// with `score`.
async fn scored(
    t: &TestContext,
    store: &CheckpointStore,
    run: &ddpm_registry::Run,
    step: i64,
    score: Option<ScoreValues>,
) -> CheckpointRecord {
    let rel = store.path_for(run.id, step, CheckpointKind::Ema);
    let file: StoredFile = store
        .write_bytes(&rel, format!("ema {step}").as_bytes())
        .unwrap();
    let new = file.checkpoint(run.id, step, CheckpointKind::Ema).unwrap();
    lease(&t.registry, run)
        .register_scored_checkpoint(&new, score.as_ref())
        .await
        .unwrap()
}

async fn a_score_is_registered_with_its_checkpoint(t: TestContext) {
    let store = store(&t);
    let run = running_run(&t.registry, "w").await;
    let first = scored(&t, &store, &run, 100, Some(values(0.5))).await;
    scored(&t, &store, &run, 200, None).await;
    let mut nan = values(0.2);
    nan.diversity = Some(f64::NAN);
    let third = scored(&t, &store, &run, 300, Some(nan)).await;

    let scores = t.registry.scores(run.id).await.unwrap();
    assert_eq!(
        scores.iter().map(|s| s.step).collect::<Vec<_>>(),
        [100, 300]
    );
    assert_eq!(scores[0].checkpoint_id, first.id);
    assert_eq!(scores[0].values, values(0.5));
    assert_eq!(scores[1].values.diversity, None, "NaN is stored as NULL");
    assert_eq!(
        t.registry
            .score_at(run.id, 300)
            .await
            .unwrap()
            .unwrap()
            .checkpoint_id,
        third.id
    );
    // The same step registered again (a resumed attempt replays it): the new row and
    // the new score replace the old ones.
    let again = scored(&t, &store, &run, 100, Some(values(0.4))).await;
    let now = t.registry.score_at(run.id, 100).await.unwrap().unwrap();
    assert_eq!((now.checkpoint_id, now.values.kid), (again.id, Some(0.4)));
    // A worker that lost the lease records neither row nor score.
    let rel = store.path_for(run.id, 400, CheckpointKind::Ema);
    let file = store.write_bytes(&rel, b"late").unwrap();
    let new = file.checkpoint(run.id, 400, CheckpointKind::Ema).unwrap();
    let refused = lease_as(&t.registry, &run, "someone-else")
        .register_scored_checkpoint(&new, Some(&values(0.1)))
        .await;
    assert!(matches!(refused, Err(RegistryError::ClaimLost { .. })));
    assert!(t.registry.score_at(run.id, 400).await.unwrap().is_none());
    // The score outlives the checkpoint's row (retention), as a series.
    t.registry.delete_checkpoint(third.id).await.unwrap();
    assert!(t.registry.score_at(run.id, 300).await.unwrap().is_some());
}

async fn retention_keeps_promoted_and_best_scored_checkpoints(t: TestContext) {
    let store = store(&t);
    let run = running_run(&t.registry, "w").await;
    let kids = [0.9, 0.1, 0.5, 0.7, 0.6];
    let mut ids = Vec::new();
    for (i, kid) in kids.into_iter().enumerate() {
        ids.push(
            scored(&t, &store, &run, 100 * (i as i64 + 1), Some(values(kid)))
                .await
                .id,
        );
    }
    t.registry
        .promote_checkpoint(ids[0], "ops", "the first one looked right")
        .await
        .unwrap();
    let leased = lease(&t.registry, &run);
    let deleted = store.apply_retention(&leased, run.id, 1).await.unwrap();
    let left: Vec<i64> = t
        .registry
        .list_checkpoints(run.id)
        .await
        .unwrap()
        .iter()
        .map(|c| c.id)
        .collect();
    // Promoted (step 100), best KID (step 200), newest (step 500).
    assert_eq!(left, [ids[0], ids[1], ids[4]]);
    assert_eq!(
        deleted.iter().map(|c| c.id).collect::<Vec<_>>(),
        [ids[2], ids[3]]
    );
}

async fn promotions_roll_back_in_order(t: TestContext) {
    let store = store(&t);
    let run = running_run(&t.registry, "w").await;
    let a = scored(&t, &store, &run, 100, None).await;
    let b = scored(&t, &store, &run, 200, None).await;
    assert_eq!(t.registry.current_promotion().await.unwrap(), None);
    let pa = t
        .registry
        .promote_checkpoint(a.id, "ann", "first")
        .await
        .unwrap();
    assert_eq!((pa.checkpoint_id, pa.run_id, pa.step), (a.id, run.id, 100));
    t.registry
        .promote_checkpoint(b.id, "bob", "second")
        .await
        .unwrap();
    let current = t.registry.current_promotion().await.unwrap().unwrap();
    assert_eq!(
        (current.checkpoint_id, current.promoted_by.as_str()),
        (b.id, "bob")
    );
    let back = t
        .registry
        .rollback_promotion("carol")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(back.id, pa.id);
    assert_eq!(t.registry.rollback_promotion("carol").await.unwrap(), None);
    assert!(matches!(
        t.registry.rollback_promotion("carol").await,
        Err(RegistryError::InvalidArgument(_))
    ));
    let history = t.registry.promotions(10).await.unwrap();
    assert_eq!(history.len(), 2);
    assert!(history
        .iter()
        .all(|p| p.revoked_by.as_deref() == Some("carol")));
    // Only EMA checkpoints that exist, with a who and a why.
    let state = save(
        &store,
        &lease(&t.registry, &run),
        run.id,
        100,
        CheckpointKind::State,
        b"state",
    )
    .await
    .unwrap();
    for (id, by, reason) in [(state.id, "x", "y"), (a.id, "", "y"), (a.id, "x", " ")] {
        assert!(matches!(
            t.registry.promote_checkpoint(id, by, reason).await,
            Err(RegistryError::InvalidArgument(_))
        ));
    }
    assert!(matches!(
        t.registry.promote_checkpoint(999_999, "x", "y").await,
        Err(RegistryError::CheckpointNotFound(999_999))
    ));
}

async fn scores_and_promotions_go_with_the_history(t: TestContext) {
    let store = store(&t);
    let run = running_run(&t.registry, "w").await;
    let c = scored(&t, &store, &run, 100, Some(values(0.3))).await;
    t.registry
        .promote_checkpoint(c.id, "ops", "ok")
        .await
        .unwrap();
    lease(&t.registry, &run)
        .finish(ddpm_registry::FinalStatus::Failed, Some("test"))
        .await
        .unwrap();
    t.registry.restart_run(run.id, true, &store).await.unwrap();
    assert!(t.registry.scores(run.id).await.unwrap().is_empty());
    assert_eq!(t.registry.current_promotion().await.unwrap(), None);
    t.registry.delete_run(run.id, &store).await.unwrap();
    assert!(t.registry.scores(run.id).await.unwrap().is_empty());
}

both_backends!(
    crate::helpers::run;
    a_score_is_registered_with_its_checkpoint,
    retention_keeps_promoted_and_best_scored_checkpoints,
    promotions_roll_back_in_order,
    scores_and_promotions_go_with_the_history,
    a_database_from_before_scores_upgrades,
);

/// A database that release 0004 left, with a run and a checkpoint, takes the new
/// tables on connect and scores its existing checkpoint.
async fn a_database_from_before_scores_upgrades(t: TestContext) {
    with_database_at_version(t.db, 4, |url| async move {
        let raw = sqlx::AnyPool::connect(&url).await.unwrap();
        let (run_id,): (i64,) = sqlx::query_as(
            "INSERT INTO runs (status, config, dataset, total_steps, created_at, updated_at) \
             VALUES ('completed', '{}', '{}', 100, 0, 0) RETURNING id",
        )
        .fetch_one(&raw)
        .await
        .unwrap();
        let (checkpoint_id,): (i64,) = sqlx::query_as(
            "INSERT INTO checkpoints (run_id, step, kind, path, size_bytes, sha256, created_at) \
             VALUES ($1, 100, 'ema', 'runs/1/ema-00000100.safetensors', 1, $2, 0) RETURNING id",
        )
        .bind(run_id)
        .bind("ab".repeat(32))
        .fetch_one(&raw)
        .await
        .unwrap();
        raw.close().await;
        let registry = ddpm_registry::Registry::connect(&url).await.unwrap();
        assert!(registry.scores(run_id).await.unwrap().is_empty());
        registry
            .record_score(run_id, 100, checkpoint_id, &values(0.2))
            .await
            .unwrap();
        registry
            .promote_checkpoint(checkpoint_id, "ops", "upgraded")
            .await
            .unwrap();
        assert_eq!(
            registry.scores(run_id).await.unwrap()[0].checkpoint_id,
            checkpoint_id
        );
        registry.close().await;
    })
    .await;
}
