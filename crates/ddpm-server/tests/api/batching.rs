//! Step-level batching seen from outside: shared forward passes, short requests
//! overtaking long ones, cancelled clients, a full queue.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::helpers::{spawn_app, wait_until, Options};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_requests_share_forward_passes() {
    let app = spawn_app(Options::default()).await;
    let before = app.metric("ddpm_forward_passes_total").await;
    let images_before = app.metric("ddpm_images_generated_total").await;
    let requests = (0..8).map(|i| app.sample_json(json!({"class": i % 3, "seed": i, "steps": 40})));
    futures::future::join_all(requests).await;
    let passes = app.metric("ddpm_forward_passes_total").await - before;
    let images = app.metric("ddpm_images_generated_total").await - images_before;
    assert_eq!(images, 8.0);
    let per_image = passes / images;
    // Alone, each image would cost 40 passes.
    assert!(
        per_image < 20.0,
        "{passes} forward passes for {images} images: {per_image} per image"
    );
    app.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_short_request_arriving_mid_way_finishes_before_a_long_one() {
    let app = spawn_app(Options::default()).await;
    let started = Instant::now();
    let long = tokio::spawn({
        let client = app.client.clone();
        let url = app.url("/v1/samples");
        async move {
            let response = client
                .post(url)
                .json(&json!({"class": 0, "sampler": "ddpm", "steps": 1000, "seed": 1}))
                .send()
                .await
                .unwrap();
            (response.status(), Instant::now())
        }
    });
    // Wait until the long request is mid-way.
    let base = app.metric("ddpm_forward_passes_total").await;
    while app.metric("ddpm_forward_passes_total").await < base + 50.0 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the long request never started"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!long.is_finished());
    let short = app
        .sample_json(json!({"class": 1, "sampler": "ddim", "steps": 10, "seed": 2}))
        .await;
    let short_done = Instant::now();
    assert_eq!(short["images"].as_array().unwrap().len(), 1);
    let (status, long_done) = long.await.unwrap();
    assert_eq!(status, 200);
    assert!(
        short_done < long_done,
        "the short request waited for the long one"
    );
    app.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn samples_of_a_client_that_went_away_are_dropped() {
    let app = spawn_app(Options::default()).await;
    // 4 samples of 1000 DDPM steps: run to the end, they would cost 1000 forward passes.
    let gone = app
        .client
        .post(app.url("/v1/samples"))
        .timeout(Duration::from_millis(300))
        .json(&json!({"n": 4, "sampler": "ddpm", "steps": 1000}))
        .send()
        .await;
    assert!(
        gone.is_err(),
        "the request should have timed out on the client"
    );
    // The worker notices the closed reply channel and takes the samples out of the
    // slots: nothing stays active or queued.
    wait_until("the abandoned request's samples to be dropped", || async {
        app.metric("ddpm_requests_cancelled_total").await >= 1.0
            && app.metric("ddpm_active_samples").await == 0.0
            && app.metric("ddpm_queue_depth").await == 0.0
    })
    .await;
    let passes = app.metric("ddpm_forward_passes_total").await;
    assert!(
        passes < 1000.0,
        "{passes} forward passes: the abandoned samples ran to the end"
    );
    assert_eq!(app.metric("ddpm_images_generated_total").await, 0.0);
    // The next request runs alone: exactly its own 5 passes, and its one image.
    let body = app.sample_json(json!({"steps": 5})).await;
    assert_eq!(body["images"].as_array().unwrap().len(), 1);
    assert_eq!(
        app.metric("ddpm_forward_passes_total").await - passes,
        5.0,
        "the next request shared its passes with abandoned samples"
    );
    assert_eq!(app.metric("ddpm_images_generated_total").await, 1.0);
    app.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_queue_answers_429_with_retry_after() {
    let app = spawn_app(Options {
        queue_capacity: 4,
        max_images_per_request: 4,
        ..Options::default()
    })
    .await;
    let long = tokio::spawn({
        let client = app.client.clone();
        let url = app.url("/v1/samples");
        async move {
            client
                .post(url)
                .json(&json!({"n": 4, "sampler": "ddpm", "steps": 1000}))
                .send()
                .await
                .unwrap()
                .status()
        }
    });
    wait_until("the long request to fill the queue", || async {
        app.metric("ddpm_active_samples").await >= 4.0
    })
    .await;
    let refused = app.sample(json!({"steps": 5}), "application/json").await;
    assert_eq!(refused.status(), 429);
    assert_eq!(refused.headers()["retry-after"], "1");
    let body: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "overloaded");
    assert_eq!(long.await.unwrap(), 200);
    // Capacity is back once the long request is answered.
    app.sample_json(json!({"steps": 5})).await;
    app.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_past_its_deadline_answers_504() {
    let app = spawn_app(Options {
        request_timeout: Duration::from_millis(300),
        ..Options::default()
    })
    .await;
    let response = app
        .sample(
            json!({"sampler": "ddpm", "steps": 1000, "n": 4}),
            "application/json",
        )
        .await;
    assert_eq!(response.status(), 504);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "timeout");
    app.sample_json(json!({"steps": 2})).await;
    app.stop().await.unwrap();
}
