//! Model loading and hot swap: a newer checkpoint replaces the model with no failed
//! request, a corrupt one never does, one whose file is missing is tried again once it
//! appears, and without a model sampling answers 503.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use serde_json::json;

use crate::helpers::{
    add_checkpoint, add_checkpoint_bytes, checkpoint_for, spawn_app, wait_until, Db, Options,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_newer_checkpoint_is_swapped_in_with_no_failed_request() {
    let app = spawn_app(Options::default()).await;
    assert_eq!(app.model_step().await, Some(100));
    let stop = Arc::new(AtomicBool::new(false));
    // The `x-ddpm-step` of every answer, in the order they came.
    let seen = Arc::new(Mutex::new(Vec::<String>::new()));
    // Clients keep sampling through the swap.
    let clients: Vec<_> = (0..3)
        .map(|k| {
            let (client, url) = (app.client.clone(), app.url("/v1/samples"));
            let (stop, seen) = (stop.clone(), seen.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let response = client
                        .post(&url)
                        .json(&json!({"class": k, "n": 2, "steps": 30, "seed": k}))
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(response.status(), 200, "a request failed during the swap");
                    let step = response.headers()["x-ddpm-step"].to_str().unwrap();
                    seen.lock().unwrap().push(step.to_string());
                }
            })
        })
        .collect();
    let answers_from = |step: &str| seen.lock().unwrap().iter().filter(|s| *s == step).count();
    wait_until("answers from the first model", || async move {
        answers_from("100") >= 3
    })
    .await;
    add_checkpoint(&app.registry, &app.store, app.run_id, 200).await;
    assert!(
        app.wait_for_step(200, Duration::from_secs(30)).await,
        "the newer checkpoint was not loaded"
    );
    wait_until("answers from the swapped-in model", || async move {
        answers_from("200") >= 3
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    assert_eq!(app.metric("ddpm_model_step").await, 200.0);
    assert_eq!(app.metric("ddpm_model_swaps_total").await, 2.0);
    app.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn corrupt_or_mismatched_newer_checkpoints_are_ignored() {
    let app = spawn_app(Options::default()).await;
    // Each bad checkpoint, once registered, is the newest: the watcher must try it and
    // refuse it before the next one comes.
    let refused = |n: f64| {
        let app = &app;
        async move {
            wait_until("the bad checkpoint to be tried", || async move {
                app.metric("ddpm_model_load_failures_total").await >= n
            })
            .await;
            assert_eq!(
                app.model_step().await,
                Some(100),
                "a bad checkpoint replaced the good model"
            );
        }
    };
    // Not a checkpoint at all (its registered SHA-256 is right: the file is what was written).
    add_checkpoint_bytes(
        &app.registry,
        &app.store,
        app.run_id,
        200,
        b"not a safetensors file".to_vec(),
    )
    .await;
    refused(1.0).await;
    // A good file truncated after registration (the checksum no longer matches).
    let truncated = add_checkpoint(&app.registry, &app.store, app.run_id, 300).await;
    let path = app.checkpoints.join(&truncated.path);
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    refused(2.0).await;
    // Bits flipped inside the tensors, registered with the flipped file's SHA-256: only the
    // checkpoint's own checksum catches it.
    let mut flipped = checkpoint_for(app.run_id, 400);
    let at = flipped.len() - 100;
    flipped[at] ^= 0xff;
    add_checkpoint_bytes(&app.registry, &app.store, app.run_id, 400, flipped).await;
    refused(3.0).await;
    // A manifest that contradicts its registration (step 999 registered as step 500).
    add_checkpoint_bytes(
        &app.registry,
        &app.store,
        app.run_id,
        500,
        checkpoint_for(app.run_id, 999),
    )
    .await;
    refused(4.0).await;
    app.sample_json(json!({"class": "red", "steps": 5})).await;

    // A good one after them is taken.
    add_checkpoint(&app.registry, &app.store, app.run_id, 600).await;
    assert!(app.wait_for_step(600, Duration::from_secs(30)).await);
    assert_eq!(app.metric("ddpm_model_load_failures_total").await, 4.0);
    app.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_checkpoint_whose_file_is_missing_is_tried_again_once_it_appears() {
    let app = spawn_app(Options::default()).await;
    // The file is registered before it is in place (a volume not yet synced): the first
    // loads fail with "not found", a reason that may pass.
    let staged = {
        let bytes = checkpoint_for(app.run_id, 200);
        app.store
            .write_bytes(std::path::Path::new("staging/ema.safetensors"), &bytes)
            .unwrap()
    };
    let rel = app
        .store
        .path_for(app.run_id, 200, ddpm_registry::CheckpointKind::Ema);
    app.registry
        .register_checkpoint(&ddpm_registry::NewCheckpoint {
            run_id: app.run_id,
            step: 200,
            kind: ddpm_registry::CheckpointKind::Ema,
            path: rel.to_string_lossy().into_owned(),
            size_bytes: staged.size_bytes as i64,
            sha256: staged.sha256.clone(),
        })
        .await
        .unwrap();
    wait_until("a failed load", || async {
        app.metric("ddpm_model_load_failures_total").await >= 1.0
    })
    .await;
    assert_eq!(app.model_step().await, Some(100), "the old model stays");
    std::fs::rename(
        app.checkpoints.join(&staged.path),
        app.checkpoints.join(&rel),
    )
    .unwrap();
    // Retried after its backoff (2 s, then 4 s, …), not refused for good.
    assert!(app.wait_for_step(200, Duration::from_secs(30)).await);
    app.sample_json(json!({"class": "red", "steps": 3})).await;
    app.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_a_model_sampling_answers_503_until_one_is_registered() {
    let app = spawn_app(Options {
        checkpoint: false,
        ..Options::default()
    })
    .await;
    let response = app.sample(json!({"class": 0}), "image/png").await;
    assert_eq!(response.status(), 503);
    assert!(response.headers().contains_key("retry-after"));
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "model_not_loaded");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("no model is loaded"));
    assert_eq!(app.get_json("/v1/model").await.0, 503);
    let (status, ready) = app.get_json("/readyz").await;
    assert_eq!(status, 503);
    assert_eq!(ready["model_loaded"], false);
    assert_eq!(ready["registry_reachable"], true);

    add_checkpoint(&app.registry, &app.store, app.run_id, 50).await;
    assert!(app.wait_for_step(50, Duration::from_secs(30)).await);
    assert_eq!(app.get_json("/readyz").await.0, 200);
    app.sample_json(json!({"class": 0, "steps": 3})).await;
    app.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_notifications_swap_without_waiting_for_the_poll() {
    let app = spawn_app(Options {
        db: Db::Postgres,
        poll_interval: Duration::from_secs(3600),
        ..Options::default()
    })
    .await;
    assert_eq!(app.model_step().await, Some(100));
    // The watcher's LISTEN connection is up once PostgreSQL shows it.
    wait_until("the server to LISTEN", || app.postgres_listening()).await;
    add_checkpoint(&app.registry, &app.store, app.run_id, 200).await;
    assert!(
        app.wait_for_step(200, Duration::from_secs(20)).await,
        "the notification did not trigger a swap (the poll interval is an hour)"
    );
    app.stop().await.unwrap();
}
