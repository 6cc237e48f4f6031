//! Run control: cancel, restart and delete over HTTP, against SQLite and PostgreSQL,
//! behind the bearer token (and refused on a server without one).

use std::path::PathBuf;

use chrono::Utc;
use ddpm_registry::{FinalStatus, Lease, MetricPoint, Run, RunStatus};
use reqwest::Method;
use serde_json::{json, Value};

use crate::helpers::{add_checkpoint_bytes, new_run, spawn_app, Db, Options, TestApp};

const TOKEN: &str = "s3cret";

/// `method path` with `token` as bearer and `body` as JSON (none: no body and no
/// `Content-Type`); the status and the decoded JSON body (`Null` when not JSON).
async fn call(
    app: &TestApp,
    method: Method,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let mut request = app.client.request(method, app.url(path));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.expect("request");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn get(app: &TestApp, path: &str) -> (u16, Value) {
    call(app, Method::GET, path, Some(TOKEN), None).await
}

/// A new run, claimed by `worker`: running.
async fn running_run(app: &TestApp, worker: &str) -> Run {
    let id = app.registry.create_run(&new_run()).await.unwrap().id;
    let run = app
        .registry
        .claim_run(id, worker)
        .await
        .unwrap()
        .expect("the new run to be claimable");
    assert_eq!((run.id, run.status), (id, RunStatus::Running));
    run
}

/// A new run that ran and ended as `status` (with `error`).
async fn ended_run(app: &TestApp, status: FinalStatus, error: Option<&str>) -> Run {
    let run = running_run(app, "trainer-a").await;
    app.registry
        .leased(Lease::of(&run).unwrap())
        .finish(status, error)
        .await
        .unwrap();
    let run = app.registry.get_run(run.id).await.unwrap().unwrap();
    assert_eq!(run.status, RunStatus::from(status));
    run
}

fn run_dir(app: &TestApp, id: i64) -> PathBuf {
    app.checkpoints.join(format!("runs/{id}"))
}

/// Files in run `id`'s folder (0 when it does not exist).
fn files_of(app: &TestApp, id: i64) -> usize {
    std::fs::read_dir(run_dir(app, id)).map_or(0, |d| d.count())
}

fn metric_points(steps: std::ops::RangeInclusive<i64>) -> Vec<MetricPoint> {
    steps
        .map(|step| MetricPoint {
            step,
            loss: 1.0 / step as f64,
            learning_rate: 3e-4,
            grad_norm: None,
            images_per_sec: None,
            recorded_at: Utc::now(),
            loss_smoothed: None,
            loss_by_timestep: [None; 4],
        })
        .collect()
}

fn code(body: &Value) -> Option<&str> {
    body["error"]["code"].as_str()
}

async fn run_control(db: Db) {
    let app = spawn_app(Options {
        db,
        checkpoint: false,
        api_token: Some(TOKEN.into()),
        ..Options::default()
    })
    .await;
    let t = Some(TOKEN);

    // A queued run is cancelled at once.
    let queued = app.run_id;
    add_checkpoint_bytes(&app.registry, &app.store, queued, 10, b"queued".to_vec()).await;
    let (status, run) = call(
        &app,
        Method::POST,
        &format!("/v1/runs/{queued}/cancel"),
        t,
        None,
    )
    .await;
    assert_eq!(status, 200, "{run}");
    assert_eq!(
        (run["id"].as_i64(), run["status"].as_str()),
        (Some(queued), Some("cancelled"))
    );
    assert!(run["finished_at"].is_string(), "{run}");
    assert_eq!(
        get(&app, &format!("/v1/runs/{queued}")).await.1["status"],
        "cancelled"
    );
    // Again: nothing changes.
    let (status, again) = call(
        &app,
        Method::POST,
        &format!("/v1/runs/{queued}/cancel"),
        t,
        None,
    )
    .await;
    assert_eq!((status, again["status"].as_str()), (200, Some("cancelled")));
    assert_eq!(again["finished_at"], run["finished_at"]);

    // A running run is asked to stop: it stays running until its worker stops it.
    let running = running_run(&app, "trainer-b").await;
    add_checkpoint_bytes(
        &app.registry,
        &app.store,
        running.id,
        20,
        b"running".to_vec(),
    )
    .await;
    assert!(running.cancel_requested_at.is_none());
    let path = format!("/v1/runs/{}/cancel", running.id);
    let (status, run) = call(&app, Method::POST, &path, t, None).await;
    assert_eq!(status, 200, "{run}");
    assert_eq!(run["status"], "running");
    assert_eq!(run["host"], "trainer-b");
    assert!(run["cancel_requested_at"].is_string(), "{run}");
    let stored = app.registry.get_run(running.id).await.unwrap().unwrap();
    assert_eq!(stored.status, RunStatus::Running);
    assert!(stored.cancel_requested_at.is_some());

    // Deleting or restarting it is refused while it runs, and changes nothing.
    let path = format!("/v1/runs/{}", running.id);
    let (status, refused) = call(&app, Method::DELETE, &path, t, None).await;
    assert_eq!(
        (status, code(&refused)),
        (409, Some("conflict")),
        "{refused}"
    );
    assert!(
        refused["error"]["message"]
            .as_str()
            .unwrap()
            .contains("running"),
        "{refused}"
    );
    let path = format!("/v1/runs/{}/restart", running.id);
    let (status, refused) = call(
        &app,
        Method::POST,
        &path,
        t,
        Some(json!({"from_scratch": true})),
    )
    .await;
    assert_eq!(
        (status, code(&refused)),
        (409, Some("conflict")),
        "{refused}"
    );
    let (status, still) = get(&app, &format!("/v1/runs/{}", running.id)).await;
    assert_eq!((status, still["status"].as_str()), (200, Some("running")));
    assert_eq!(
        app.registry
            .list_checkpoints(running.id)
            .await
            .unwrap()
            .len(),
        1
    );
    assert_eq!(files_of(&app, running.id), 1);

    // Its worker stops it as cancelled; then it can be deleted, files and all.
    app.registry
        .leased(Lease::of(&running).unwrap())
        .finish(FinalStatus::Cancelled, None)
        .await
        .unwrap();
    let path = format!("/v1/runs/{}", running.id);
    let (status, deleted) = call(&app, Method::DELETE, &path, t, None).await;
    assert_eq!(status, 200, "{deleted}");
    assert_eq!(
        (deleted["id"].as_i64(), deleted["status"].as_str()),
        (Some(running.id), Some("cancelled"))
    );
    let (status, gone) = get(&app, &path).await;
    assert_eq!((status, code(&gone)), (404, Some("not_found")));
    assert!(
        !run_dir(&app, running.id).exists(),
        "its folder is still there"
    );
    let (status, gone) = call(&app, Method::DELETE, &path, t, None).await;
    assert_eq!((status, code(&gone)), (404, Some("not_found")));

    // A cancelled run that never ran is deleted the same way; the others stay.
    let (status, deleted) =
        call(&app, Method::DELETE, &format!("/v1/runs/{queued}"), t, None).await;
    assert_eq!(
        (status, deleted["id"].as_i64()),
        (200, Some(queued)),
        "{deleted}"
    );
    assert_eq!(get(&app, &format!("/v1/runs/{queued}")).await.0, 404);
    assert!(!run_dir(&app, queued).exists());

    // A failed run restarts as interrupted (a trainer resumes it), its error cleared;
    // no body and no Content-Type is a plain restart.
    let failed = ended_run(&app, FinalStatus::Failed, Some("x")).await;
    assert_eq!(failed.error.as_deref(), Some("x"));
    let path = format!("/v1/runs/{}/restart", failed.id);
    let (status, run) = call(&app, Method::POST, &path, t, None).await;
    assert_eq!(status, 200, "{run}");
    assert_eq!(
        (run["id"].as_i64(), run["status"].as_str()),
        (Some(failed.id), Some("interrupted"))
    );
    assert_eq!(run["error"], Value::Null);
    assert_eq!(
        app.registry
            .get_run(failed.id)
            .await
            .unwrap()
            .unwrap()
            .status,
        RunStatus::Interrupted
    );
    // Cancelling an interrupted run cancels it.
    let path = format!("/v1/runs/{}/cancel", failed.id);
    let (status, run) = call(&app, Method::POST, &path, t, None).await;
    assert_eq!((status, run["status"].as_str()), (200, Some("cancelled")));

    // A completed run: refused without from_scratch, cancel refused too; from scratch
    // its checkpoints (rows and files) and metrics are gone and it is queued at step 0.
    let completed = running_run(&app, "trainer-c").await;
    app.registry
        .record_metrics(completed.id, &metric_points(1..=30))
        .await
        .unwrap();
    add_checkpoint_bytes(
        &app.registry,
        &app.store,
        completed.id,
        30,
        b"done".to_vec(),
    )
    .await;
    app.registry
        .leased(Lease::of(&completed).unwrap())
        .heartbeat(30)
        .await
        .unwrap();
    app.registry
        .leased(Lease::of(&completed).unwrap())
        .finish(FinalStatus::Completed, None)
        .await
        .unwrap();
    assert_eq!(files_of(&app, completed.id), 1);
    let restart = format!("/v1/runs/{}/restart", completed.id);
    for body in [
        None,
        Some(Value::Null),
        Some(json!({})),
        Some(json!({"from_scratch": false})),
    ] {
        let (status, refused) = call(&app, Method::POST, &restart, t, body.clone()).await;
        assert_eq!(
            (status, code(&refused)),
            (409, Some("conflict")),
            "{body:?}: {refused}"
        );
        assert!(
            refused["error"]["message"]
                .as_str()
                .unwrap()
                .contains("from scratch"),
            "{refused}"
        );
    }
    let path = format!("/v1/runs/{}/cancel", completed.id);
    let (status, refused) = call(&app, Method::POST, &path, t, None).await;
    assert_eq!(
        (status, code(&refused)),
        (409, Some("conflict")),
        "{refused}"
    );
    // Bodies that are not a restart request.
    for (body, content_type, want, want_code) in [
        (
            r#"{"from_scratch": true, "force": true}"#,
            "application/json",
            422,
            "invalid_request",
        ),
        (
            r#"{"from_scratch": "yes"}"#,
            "application/json",
            422,
            "invalid_request",
        ),
        ("[]", "application/json", 422, "invalid_request"),
        ("[true]", "application/json", 422, "invalid_request"),
        ("true", "application/json", 422, "invalid_request"),
        (
            r#"{"from_scratch": tru"#,
            "application/json",
            400,
            "malformed_json",
        ),
        (
            r#"{"from_scratch": true}"#,
            "text/plain",
            415,
            "unsupported_media_type",
        ),
    ] {
        let response = app
            .client
            .post(app.url(&restart))
            .bearer_auth(TOKEN)
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let answer: Value = response.json().await.unwrap();
        assert_eq!((status, code(&answer)), (want, Some(want_code)), "{body}");
    }
    let (_, unchanged) = get(&app, &format!("/v1/runs/{}", completed.id)).await;
    assert_eq!(
        (
            unchanged["status"].as_str(),
            unchanged["current_step"].as_i64()
        ),
        (Some("completed"), Some(30))
    );
    let (status, run) = call(
        &app,
        Method::POST,
        &restart,
        t,
        Some(json!({"from_scratch": true})),
    )
    .await;
    assert_eq!(status, 200, "{run}");
    assert_eq!(
        (run["status"].as_str(), run["current_step"].as_i64()),
        (Some("queued"), Some(0))
    );
    assert_eq!(run["finished_at"], Value::Null);
    let (_, checkpoints) = get(&app, &format!("/v1/runs/{}/checkpoints", completed.id)).await;
    assert_eq!(checkpoints["checkpoints"], json!([]));
    let (_, series) = get(&app, &format!("/v1/runs/{}/metrics", completed.id)).await;
    assert_eq!(series["points"], json!([]));
    assert_eq!(files_of(&app, completed.id), 0);
    // Queued now: restarting again is refused.
    let (status, refused) = call(
        &app,
        Method::POST,
        &restart,
        t,
        Some(json!({"from_scratch": true})),
    )
    .await;
    assert_eq!(
        (status, code(&refused)),
        (409, Some("conflict")),
        "{refused}"
    );

    // Unknown runs and ids that are not ids.
    for (method, path, want, want_code) in [
        (Method::POST, "/v1/runs/9999/cancel", 404, "not_found"),
        (Method::POST, "/v1/runs/9999/restart", 404, "not_found"),
        (Method::DELETE, "/v1/runs/9999", 404, "not_found"),
        (Method::POST, "/v1/runs/abc/cancel", 422, "invalid_id"),
        (Method::POST, "/v1/runs/abc/restart", 422, "invalid_id"),
        (Method::DELETE, "/v1/runs/abc", 422, "invalid_id"),
    ] {
        let (status, body) = call(&app, method.clone(), path, t, None).await;
        assert_eq!(
            (status, code(&body)),
            (want, Some(want_code)),
            "{method} {path}"
        );
    }

    // Without the token, or with a wrong one: 401, and nothing changes.
    let target = ended_run(&app, FinalStatus::Failed, Some("boom")).await;
    let control = [
        (Method::POST, format!("/v1/runs/{}/cancel", target.id)),
        (Method::POST, format!("/v1/runs/{}/restart", target.id)),
        (Method::DELETE, format!("/v1/runs/{}", target.id)),
    ];
    for token in [None, Some("guess")] {
        for (method, path) in &control {
            let (status, body) = call(&app, method.clone(), path, token, None).await;
            assert_eq!(
                (status, code(&body)),
                (401, Some("unauthorized")),
                "{method} {path}"
            );
        }
    }
    let unchanged = app.registry.get_run(target.id).await.unwrap().unwrap();
    assert_eq!(unchanged.status, RunStatus::Failed);
    assert_eq!(unchanged.error.as_deref(), Some("boom"));
    app.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn run_control_on_sqlite() {
    run_control(Db::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn run_control_on_postgres() {
    run_control(Db::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_token_run_control_is_disabled() {
    let app = spawn_app(Options {
        checkpoint: false,
        ..Options::default()
    })
    .await;
    let id = app.run_id;
    add_checkpoint_bytes(&app.registry, &app.store, id, 10, b"kept".to_vec()).await;
    for (method, path, body) in [
        (Method::POST, format!("/v1/runs/{id}/cancel"), None),
        (
            Method::POST,
            format!("/v1/runs/{id}/restart"),
            Some(json!({"from_scratch": true})),
        ),
        (Method::DELETE, format!("/v1/runs/{id}"), None),
        // Refused before the id is even read.
        (Method::DELETE, "/v1/runs/9999".to_string(), None),
    ] {
        let (status, answer) = call(&app, method.clone(), &path, None, body).await;
        assert_eq!(
            (status, code(&answer)),
            (403, Some("control_disabled")),
            "{method} {path}"
        );
        assert!(
            answer["error"]["message"]
                .as_str()
                .unwrap()
                .contains("DDPM_API_TOKEN"),
            "{answer}"
        );
    }
    // Nothing changed, and reading stays open.
    let (status, run) = call(&app, Method::GET, &format!("/v1/runs/{id}"), None, None).await;
    assert_eq!((status, run["status"].as_str()), (200, Some("queued")));
    assert_eq!(run["cancel_requested_at"], Value::Null);
    assert_eq!(app.registry.list_checkpoints(id).await.unwrap().len(), 1);
    assert_eq!(files_of(&app, id), 1);
    // The document says so.
    let (_, doc) = call(&app, Method::GET, "/openapi.json", None, None).await;
    for (method, path) in [
        ("post", "/v1/runs/{id}/cancel"),
        ("post", "/v1/runs/{id}/restart"),
        ("delete", "/v1/runs/{id}"),
    ] {
        let op = &doc["paths"][path][method];
        assert!(op["responses"]["403"].is_object(), "{method} {path}");
        assert!(op["responses"].get("401").is_none(), "{method} {path}");
    }
    app.stop().await.unwrap();
}
