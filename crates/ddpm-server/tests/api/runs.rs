//! Run history against SQLite and PostgreSQL.

use chrono::Utc;
use ddpm_registry::{MetricPoint, RunStatus};

use crate::helpers::{add_checkpoint, new_run, spawn_app, Db, Options};

async fn run_history(db: Db) {
    let app = spawn_app(Options {
        db,
        checkpoint: false,
        ..Options::default()
    })
    .await;
    let registry = &app.registry;
    // app.run_id is run 1 (queued); two more, one of them running.
    registry.create_run(&new_run()).await.unwrap();
    registry.create_run(&new_run()).await.unwrap();
    let running = registry
        .claim_next_queued("trainer-a")
        .await
        .unwrap()
        .unwrap();
    let points: Vec<MetricPoint> = (1..=100)
        .map(|step| MetricPoint {
            step,
            loss: 1.0 / step as f64,
            learning_rate: 3e-4,
            grad_norm: None,
            images_per_sec: Some(100.0),
            recorded_at: Utc::now(),
            loss_smoothed: None,
            loss_by_timestep: [None; 4],
        })
        .collect();
    registry.record_metrics(running.id, &points).await.unwrap();
    add_checkpoint(registry, &app.store, running.id, 50).await;
    add_checkpoint(registry, &app.store, running.id, 100).await;

    let (status, page) = app.get_json("/v1/runs").await;
    assert_eq!(status, 200);
    assert_eq!(page["total"], 3);
    assert_eq!(page["runs"].as_array().unwrap().len(), 3);
    let (_, page) = app.get_json("/v1/runs?limit=2&offset=2").await;
    assert_eq!(page["runs"].as_array().unwrap().len(), 1);
    assert_eq!(
        (page["limit"].as_i64(), page["offset"].as_i64()),
        (Some(2), Some(2))
    );
    let (_, page) = app.get_json("/v1/runs?status=running").await;
    assert_eq!(page["total"], 1);
    assert_eq!(page["runs"][0]["id"], running.id);
    assert_eq!(page["runs"][0]["status"], RunStatus::Running.as_str());

    let (status, run) = app.get_json(&format!("/v1/runs/{}", running.id)).await;
    assert_eq!(status, 200);
    assert_eq!(run["host"], "trainer-a");
    assert_eq!(run["dataset"]["class_names"][0], "red");

    let (status, series) = app
        .get_json(&format!(
            "/v1/runs/{}/metrics?from_step=11&to_step=60&max_points=10",
            running.id
        ))
        .await;
    assert_eq!(status, 200);
    let steps: Vec<i64> = series["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["step"].as_i64().unwrap())
        .collect();
    assert!(!steps.is_empty() && steps.len() <= 10, "{steps:?}");
    assert_eq!(steps.last(), Some(&60));
    assert!(steps.iter().all(|s| (11..=60).contains(s)));
    let (_, all) = app
        .get_json(&format!("/v1/runs/{}/metrics", running.id))
        .await;
    assert_eq!(all["points"].as_array().unwrap().len(), 100);

    let (status, checkpoints) = app
        .get_json(&format!("/v1/runs/{}/checkpoints", running.id))
        .await;
    assert_eq!(status, 200);
    let steps: Vec<i64> = checkpoints["checkpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["step"].as_i64().unwrap())
        .collect();
    assert_eq!(steps, [50, 100]);
    assert_eq!(checkpoints["checkpoints"][0]["kind"], "ema");

    for (path, status, code) in [
        ("/v1/runs/9999", 404, "not_found"),
        ("/v1/runs/9999/metrics", 404, "not_found"),
        ("/v1/runs/9999/checkpoints", 404, "not_found"),
        ("/v1/runs/abc", 422, "invalid_id"),
        ("/v1/runs?status=sleeping", 422, "invalid_status"),
        ("/v1/runs?limit=0", 422, "invalid_query"),
        ("/v1/runs?limit=ten", 422, "invalid_query"),
        ("/v1/runs?offset=-1", 422, "invalid_query"),
        ("/v1/runs/1/metrics?max_points=0", 422, "invalid_query"),
        (
            "/v1/runs/1/metrics?from_step=10&to_step=5",
            422,
            "invalid_query",
        ),
    ] {
        let (got, body) = app.get_json(path).await;
        assert_eq!(
            (got, body["error"]["code"].as_str()),
            (status, Some(code)),
            "{path}"
        );
    }
    app.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn run_history_on_sqlite() {
    run_history(Db::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn run_history_on_postgres() {
    run_history(Db::Postgres).await;
}
