//! Which checkpoint is served (issue 9): `best` serves the best-scored checkpoint of the
//! candidate run and refuses one whose KID is worse than the serving one's by more than
//! its standard deviation; `promoted` serves only the promoted checkpoint, follows a
//! rollback, and every replica learns of a promotion (notify on PostgreSQL, poll on
//! SQLite). Real checkpoint files (the trained micro model, and an untrained one for the
//! poor checkpoints) with scores recorded as the trainer records them.

use std::{path::Path, time::Duration};

use ddpm_core::{
    checkpoint::{checkpoint_bytes, CheckpointInfo},
    Model, ScheduleConfig,
};
use ddpm_registry::{CheckpointRecord, CheckpointStore, Registry, ScoreValues};
use ddpm_server::{
    metrics::ModelMetrics,
    model::CurrentModel,
    watcher::{BestMetric, Pin, ServePolicy, Watcher},
};
use ddpm_testkit_model::micro_config;
use serde_json::json;
use tch::Device;
use tokio_util::sync::CancellationToken;

use crate::helpers::{
    add_checkpoint, add_checkpoint_bytes, new_run, spawn_app, wait_until, Db, FreshDatabase,
    Options, CLASSES,
};

/// A registry and a store of their own (no server), for watchers built by the test.
struct Env {
    registry: Registry,
    store: CheckpointStore,
    _database: FreshDatabase,
    _dir: tempfile::TempDir,
}

async fn env(db: Db) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let database = FreshDatabase::create(db, dir.path()).await;
    let registry = Registry::connect(&database.url).await.unwrap();
    let store = CheckpointStore::new(dir.path().join("checkpoints")).unwrap();
    Env {
        registry,
        store,
        _database: database,
        _dir: dir,
    }
}

fn watcher(env: &Env, pin: Pin, policy: ServePolicy, metric: BestMetric) -> Watcher {
    Watcher::new(
        env.registry.clone(),
        env.store.clone(),
        Device::Cpu,
        pin,
        CurrentModel::default(),
        ModelMetrics::default(),
    )
    .with_policy(policy, metric)
}

fn serving(w: &Watcher) -> Option<i64> {
    w.current.get().map(|m| m.checkpoint.id)
}

/// An untrained micro model's checkpoint: a real file that draws noise.
async fn add_untrained(env: &Env, run: i64, step: i64) -> CheckpointRecord {
    let bytes = tokio::task::spawn_blocking(move || {
        let model = Model::new(&micro_config(CLASSES.len() as i64), Device::Cpu).unwrap();
        let info = CheckpointInfo {
            schedule: ScheduleConfig::default(),
            class_names: CLASSES.iter().map(|c| c.to_string()).collect(),
            run_id: Some(run),
            step,
        };
        checkpoint_bytes(&model, &info).unwrap().0
    })
    .await
    .unwrap();
    add_checkpoint_bytes(&env.registry, &env.store, run, step, bytes).await
}

/// Records a score as the trainer would (only the values the policies read vary).
async fn score(registry: &Registry, c: &CheckpointRecord, kid: f64, kid_std: f64, accuracy: f64) {
    let values = ScoreValues {
        samples_per_class: 16,
        holdout_images: 24,
        class_accuracy: Some(accuracy),
        fd: Some(kid * 100.0),
        fd_floor: Some(0.5),
        kid: Some(kid),
        kid_std: Some(kid_std),
        diversity: Some(1.0),
        probe_accuracy: Some(1.0),
        settings: json!({"sampler": "ddpm", "steps": 25}),
        seconds: 1.0,
    };
    registry
        .record_score(c.run_id, c.step, c.id, &values)
        .await
        .unwrap();
}

async fn best_serves_the_best_and_refuses_a_worse_one(db: Db) {
    let env = env(db).await;
    let run = env.registry.create_run(&new_run()).await.unwrap().id;
    let poor = add_untrained(&env, run, 100).await;
    let good = add_checkpoint(&env.registry, &env.store, run, 200).await;
    let newest = add_untrained(&env, run, 300).await;
    score(&env.registry, &poor, 0.30, 0.02, 0.3).await;
    score(&env.registry, &good, 0.02, 0.005, 1.0).await;
    score(&env.registry, &newest, 0.25, 0.02, 0.4).await;

    let mut by_newest = watcher(&env, Pin::Newest, ServePolicy::Newest, BestMetric::Kid);
    by_newest.check().await.unwrap();
    assert_eq!(
        serving(&by_newest),
        Some(newest.id),
        "newest: today's behaviour"
    );

    let mut best = watcher(&env, Pin::Newest, ServePolicy::Best, BestMetric::Kid);
    best.check().await.unwrap();
    assert_eq!(
        serving(&best),
        Some(good.id),
        "the lowest KID, not the newest"
    );
    let mut by_accuracy = watcher(
        &env,
        Pin::Newest,
        ServePolicy::Best,
        BestMetric::ClassAccuracy,
    );
    by_accuracy.check().await.unwrap();
    assert_eq!(serving(&by_accuracy), Some(good.id));

    // A new run's first checkpoint is far worse than what is served: refused, and
    // refused again at the next look.
    let run2 = env.registry.create_run(&new_run()).await.unwrap().id;
    let worse = add_untrained(&env, run2, 100).await;
    score(&env.registry, &worse, 0.20, 0.01, 0.5).await;
    assert_eq!(best.check().await.unwrap(), None);
    assert_eq!(best.check().await.unwrap(), None);
    assert_eq!(
        serving(&best),
        Some(good.id),
        "the gate kept the better model"
    );
    // One within its own KID standard deviation of the serving one is swapped in.
    let close = add_checkpoint(&env.registry, &env.store, run2, 200).await;
    score(&env.registry, &close, 0.024, 0.005, 1.0).await;
    assert_eq!(best.check().await.unwrap(), Some(close.id));
    // Pinned to the first run, the best of that run.
    let mut pinned = watcher(&env, Pin::Run(run), ServePolicy::Best, BestMetric::Fd);
    pinned.check().await.unwrap();
    assert_eq!(serving(&pinned), Some(good.id));
    // A run with no score yet is served by its newest checkpoint (a server is never
    // left without a model for want of scores).
    let run3 = env.registry.create_run(&new_run()).await.unwrap().id;
    let unscored = add_checkpoint(&env.registry, &env.store, run3, 100).await;
    let mut fresh = watcher(&env, Pin::Newest, ServePolicy::Best, BestMetric::Kid);
    fresh.check().await.unwrap();
    assert_eq!(serving(&fresh), Some(unscored.id));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn best_serves_the_best_and_refuses_a_worse_one_sqlite() {
    best_serves_the_best_and_refuses_a_worse_one(Db::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn best_serves_the_best_and_refuses_a_worse_one_postgres() {
    best_serves_the_best_and_refuses_a_worse_one(Db::Postgres).await;
}

/// Two replicas under `promoted`: nothing served before a promotion; both swap to a
/// promoted checkpoint and back on a rollback. On PostgreSQL the replicas poll once an
/// hour, so only the notification can tell them.
async fn replicas_follow_promotions_and_rollbacks(db: Db) {
    let env = env(db).await;
    let run = env.registry.create_run(&new_run()).await.unwrap().id;
    let first = add_checkpoint(&env.registry, &env.store, run, 100).await;
    let second = add_untrained(&env, run, 200).await;
    let poll = match db {
        Db::Postgres => Duration::from_secs(3600),
        _ => Duration::from_millis(100),
    };
    let stop = CancellationToken::new();
    let mut replicas = Vec::new();
    for _ in 0..2 {
        let mut w = watcher(&env, Pin::Newest, ServePolicy::Promoted, BestMetric::Kid);
        w.check().await.unwrap();
        assert_eq!(serving(&w), None, "nothing is promoted yet");
        replicas.push(w.current.clone());
        tokio::spawn(w.run(poll, stop.clone()));
    }
    // The LISTEN connections are opened when the loops start.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let all_serve = |id: i64| {
        let replicas = replicas.clone();
        async move {
            replicas
                .iter()
                .all(|r| r.get().map(|m| m.checkpoint.id) == Some(id))
        }
    };
    env.registry
        .promote_checkpoint(first.id, "tester", "first good one")
        .await
        .unwrap();
    wait_until("both replicas serve the promoted checkpoint", || {
        all_serve(first.id)
    })
    .await;
    env.registry
        .promote_checkpoint(second.id, "tester", "try the newer one")
        .await
        .unwrap();
    wait_until("both replicas serve the second promotion", || {
        all_serve(second.id)
    })
    .await;
    let now = env.registry.rollback_promotion("tester").await.unwrap();
    assert_eq!(now.map(|p| p.checkpoint_id), Some(first.id));
    wait_until("both replicas rolled back", || all_serve(first.id)).await;
    stop.cancel();
    let history = env.registry.promotions(10).await.unwrap();
    assert_eq!(history.len(), 2);
    assert_eq!(history[0].revoked_by.as_deref(), Some("tester"));
    assert!(history[1].revoked_at.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_follow_promotions_and_rollbacks_sqlite() {
    replicas_follow_promotions_and_rollbacks(Db::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_follow_promotions_and_rollbacks_postgres() {
    replicas_follow_promotions_and_rollbacks(Db::Postgres).await;
}

/// The checkpoint routes: the record with its score, the grid, the score in the run's
/// checkpoint list and metric series, and promotion over HTTP (token, 403, 409, 422).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_have_their_score_grid_and_promotion_over_http() {
    let token = "test-token";
    let app = spawn_app(Options {
        api_token: Some(token.into()),
        ..Options::default()
    })
    .await;
    let ema = app
        .registry
        .newest_checkpoint(Some(app.run_id), ddpm_registry::CheckpointKind::Ema)
        .await
        .unwrap()
        .unwrap();
    score(&app.registry, &ema, 0.03, 0.004, 0.9).await;
    let auth = |r: reqwest::RequestBuilder| r.bearer_auth(token);
    let get = |path: String| auth(app.client.get(app.url(&path))).send();

    let body: serde_json::Value = get(format!("/v1/checkpoints/{}", ema.id))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body["id"], ema.id);
    assert_eq!(body["score"]["kid"], 0.03);
    assert_eq!(body["score"]["checkpoint_id"], ema.id);
    let list: serde_json::Value = get(format!("/v1/runs/{}/checkpoints", app.run_id))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["checkpoints"][0]["score"]["class_accuracy"], 0.9);
    let series: serde_json::Value = get(format!("/v1/runs/{}/metrics", app.run_id))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(series["scores"][0]["step"], ema.step);
    assert_eq!(
        get("/v1/checkpoints/999999".into()).await.unwrap().status(),
        404
    );

    // The grid: none written for this checkpoint yet, then the trainer's file.
    let grid_url = format!("/v1/checkpoints/{}/grid.png", ema.id);
    assert_eq!(get(grid_url.clone()).await.unwrap().status(), 404);
    // The route serves the file as the trainer wrote it; its content is not checked.
    let png = b"\x89PNG\r\n\x1a\n a grid".to_vec();
    app.store
        .write_bytes(&CheckpointStore::grid_path_for(Path::new(&ema.path)), &png)
        .unwrap();
    let response = get(grid_url).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "image/png");
    assert_eq!(response.bytes().await.unwrap().as_ref(), png.as_slice());

    // Promotion: recorded with who and why; refused without the token, for a blank
    // reason and for a training state.
    let promote = |id: i64, body: serde_json::Value| {
        app.client
            .post(app.url(&format!("/v1/checkpoints/{id}/promote")))
            .json(&body)
    };
    let response = auth(promote(
        ema.id,
        json!({"reason": "looks right", "by": "ops"}),
    ))
    .send()
    .await
    .unwrap();
    assert_eq!(response.status(), 200);
    let promotion: serde_json::Value = response.json().await.unwrap();
    assert_eq!(promotion["promoted_by"], "ops");
    assert_eq!(promotion["checkpoint_id"], ema.id);
    let current = app.registry.current_promotion().await.unwrap().unwrap();
    assert_eq!(
        (current.checkpoint_id, current.reason.as_str()),
        (ema.id, "looks right")
    );
    let anonymous = promote(ema.id, json!({"reason": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401);
    let blank = auth(promote(ema.id, json!({"reason": "  "})))
        .send()
        .await
        .unwrap();
    assert_eq!(blank.status(), 422);
    let kind = ddpm_registry::CheckpointKind::State;
    let rel = app.store.path_for(app.run_id, 100, kind);
    let file = app.store.write_bytes(&rel, b"state").unwrap();
    let state = app
        .store
        .register(&app.registry, app.run_id, 100, kind, &file)
        .await
        .unwrap();
    let refused = auth(promote(state.id, json!({"reason": "x"})))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 409);
    app.stop().await.unwrap();
}
