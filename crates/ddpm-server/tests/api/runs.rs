//! Run history against SQLite and PostgreSQL.

use std::collections::BTreeSet;

use chrono::Utc;
use ddpm_registry::{Lease, MetricPoint, RunStatus, RunWorld};
use serde_json::{json, Value};

use crate::helpers::{add_checkpoint, new_run, spawn_app, Db, Options};

/// The smoothed loss and the loss by timestep quarter recorded for `step`: each
/// kind of row the trainer writes, by `step % 4`.
fn detail(step: i64) -> (Option<f64>, [Option<f64>; 4]) {
    let loss = 1.0 / step as f64;
    let smoothed = Some(loss * 1.5);
    match step % 4 {
        // A row logged before the trainer recorded these values.
        0 => (None, [None; 4]),
        // A window none of whose samples drew a timestep in the noisiest quarter.
        1 => (
            smoothed,
            [Some(loss * 0.25), Some(loss * 0.5), Some(loss * 2.0), None],
        ),
        // A diverged quarter: NaN, stored as NULL, travels as null.
        2 => (
            smoothed,
            [
                Some(loss * 0.25),
                Some(f64::NAN),
                Some(loss * 2.0),
                Some(loss * 4.0),
            ],
        ),
        _ => (
            smoothed,
            [
                Some(loss * 0.25),
                Some(loss * 0.5),
                Some(loss * 2.0),
                Some(loss * 4.0),
            ],
        ),
    }
}

/// `served` is JSON null where `recorded` is `None` or NaN, else the number.
/// Within a relative 1e-12: serde_json's default float parsing on the client
/// may be off in the last digit (the registry's tests compare exactly).
fn assert_number(served: &Value, recorded: Option<f64>, step: i64) {
    match recorded.filter(|v| !v.is_nan()) {
        None => assert_eq!(*served, Value::Null, "step {step}"),
        Some(recorded) => {
            let served = served
                .as_f64()
                .unwrap_or_else(|| panic!("step {step}: {served} is not a number"));
            assert!(
                (served - recorded).abs() <= 1e-12 * recorded.abs(),
                "step {step}: {served} != {recorded}"
            );
        }
    }
}

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
            loss_smoothed: detail(step).0,
            loss_by_timestep: detail(step).1,
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

    // Before its attempt records a world, the run has none; then it has that world.
    let (_, run) = app.get_json(&format!("/v1/runs/{}", running.id)).await;
    assert_eq!(
        (&run["world"], &run["launch_key"]),
        (&Value::Null, &Value::Null)
    );
    registry
        .leased(Lease::of(&running).unwrap())
        .record_world(&RunWorld {
            size: 2,
            devices: vec!["cuda:0".into(), "cuda:1".into()],
        })
        .await
        .unwrap();
    let (status, run) = app.get_json(&format!("/v1/runs/{}", running.id)).await;
    assert_eq!(status, 200);
    assert_eq!(run["host"], "trainer-a");
    assert_eq!(run["dataset"]["class_names"][0], "red");
    assert_eq!(
        run["world"],
        json!({"size": 2, "devices": ["cuda:0", "cuda:1"]})
    );
    // A launcher's run carries its key, in the list too.
    let (launched, _) = registry
        .find_or_create_launched_run(&new_run(), "job-7")
        .await
        .unwrap();
    let (_, page) = app.get_json("/v1/runs?limit=1").await;
    assert_eq!(page["runs"][0]["id"], launched.id);
    assert_eq!(page["runs"][0]["launch_key"], "job-7");
    assert_eq!(page["runs"][0]["world"], Value::Null);
    // The OpenAPI document describes exactly the fields a run and its world have.
    let (_, doc) = app.get_json("/openapi.json").await;
    let schemas = &doc["components"]["schemas"];
    let keys = |v: &Value| -> BTreeSet<String> {
        v.as_object().expect("an object").keys().cloned().collect()
    };
    assert_eq!(keys(&run), keys(&schemas["Run"]["properties"]));
    assert_eq!(
        keys(&run["world"]),
        keys(&schemas["RunWorld"]["properties"])
    );

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
    let all = all["points"].as_array().unwrap();
    assert_eq!(all.len(), 100);
    for p in all {
        let step = p["step"].as_i64().unwrap();
        let (smoothed, by_timestep) = detail(step);
        assert_number(&p["loss_smoothed"], smoothed, step);
        let served = p["loss_by_timestep"].as_array().expect("an array");
        assert_eq!(served.len(), 4, "step {step}");
        for (served, recorded) in served.iter().zip(by_timestep) {
            assert_number(served, recorded, step);
        }
    }
    // The same, spelled out, so the loop cannot pass by comparing nothing.
    assert_eq!(all[0]["loss_smoothed"], 1.5);
    assert_eq!(all[0]["loss_by_timestep"], json!([0.25, 0.5, 2.0, null]));
    assert_eq!(all[1]["loss_by_timestep"], json!([0.125, null, 1.0, 2.0]));
    assert_eq!(all[3]["loss_smoothed"], Value::Null);
    assert_eq!(all[3]["loss_by_timestep"], json!([null, null, null, null]));
    // The downsampled series carries them too.
    let (_, last) = app
        .get_json(&format!("/v1/runs/{}/metrics?max_points=1", running.id))
        .await;
    assert_eq!(last["points"][0]["step"], 100);
    assert_eq!(
        last["points"][0]["loss_by_timestep"],
        json!([null, null, null, null])
    );
    let (_, near_last) = app
        .get_json(&format!(
            "/v1/runs/{}/metrics?to_step=99&max_points=1",
            running.id
        ))
        .await;
    let near_last = &near_last["points"][0];
    assert_eq!(near_last["step"], 99);
    for (served, recorded) in near_last["loss_by_timestep"]
        .as_array()
        .expect("an array")
        .iter()
        .zip(detail(99).1)
    {
        assert_number(served, recorded, 99);
    }

    // The OpenAPI document describes exactly the fields a point has.
    let (_, doc) = app.get_json("/openapi.json").await;
    let documented: BTreeSet<&String> = doc["components"]["schemas"]["MetricSeries"]["properties"]
        ["points"]["items"]["properties"]
        .as_object()
        .expect("MetricSeries points are described")
        .keys()
        .collect();
    let served: BTreeSet<&String> = all[0].as_object().unwrap().keys().collect();
    assert_eq!(served, documented);

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
        ("/v1/runs/1/metrics?max_points=2.5", 422, "invalid_query"),
        ("/v1/runs/0/metrics", 404, "not_found"),
    ] {
        let (got, body) = app.get_json(path).await;
        assert_eq!(
            (got, body["error"]["code"].as_str()),
            (status, Some(code)),
            "{path}"
        );
    }
    // A range that ends before it starts is empty, not an error: the document describes
    // the two bounds separately and cannot forbid it.
    let (status, empty) = app
        .get_json(&format!(
            "/v1/runs/{}/metrics?from_step=10&to_step=5",
            running.id
        ))
        .await;
    assert_eq!(status, 200, "{empty}");
    assert_eq!(empty["points"], json!([]));
    assert_eq!(
        (empty["from_step"].as_i64(), empty["to_step"].as_i64()),
        (Some(10), Some(5))
    );
    // JSON Schema's integers include 2.0, in a query string too.
    let (status, page) = app.get_json("/v1/runs?limit=2.0&offset=0.0").await;
    assert_eq!((status, page["limit"].as_i64()), (200, Some(2)), "{page}");
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
