//! Step-level batching seen from outside: shared forward passes, short requests
//! overtaking long ones, cancelled clients, a full queue.

use std::time::{Duration, Instant};

use serde_json::json;

use ddpm_server::SchedulerPolicy;

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
    let backlog = app.metric("ddpm_backlog_seconds").await;
    let refused = app.sample(json!({"steps": 5}), "application/json").await;
    assert_eq!(refused.status(), 429);
    // The wait is the backlog's estimated time to finish, in whole seconds (at least 1).
    let retry: f64 = refused.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        retry >= 1.0 && retry <= backlog.ceil().max(1.0),
        "{retry} s for a {backlog} s backlog"
    );
    let body: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "overloaded");
    assert_eq!(long.await.unwrap(), 200);
    // Capacity is back once the long request is answered.
    app.sample_json(json!({"steps": 5})).await;
    app.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_past_its_deadline_answers_504() {
    // FIFO admits by images only (the fair scheduler would refuse this request up front).
    let app = spawn_app(Options {
        request_timeout: Duration::from_millis(300),
        scheduler: SchedulerPolicy::Fifo,
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

/// Forward passes the model ran while a 10-step request was served behind a running
/// 16-image, 1000-step one, and whether the long one still finished.
async fn passes_for_a_short_request_behind_a_long_one(scheduler: SchedulerPolicy) -> f64 {
    let app = spawn_app(Options {
        scheduler,
        ..Options::default()
    })
    .await;
    let long = tokio::spawn({
        let request = app
            .client
            .post(app.url("/v1/samples"))
            .json(&json!({"n": 16, "class": 0, "sampler": "ddpm", "steps": 1000}));
        async move { request.send().await.unwrap().status() }
    });
    wait_until("the long request to fill the batch", || async {
        app.metric("ddpm_active_samples").await == 16.0
    })
    .await;
    let before = app.metric("ddpm_forward_passes_total").await;
    app.sample_json(json!({"class": 1, "sampler": "ddim", "steps": 10}))
        .await;
    let passes = app.metric("ddpm_forward_passes_total").await - before;
    assert_eq!(long.await.unwrap(), 200, "the long request finished");
    app.stop().await.unwrap();
    passes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_fair_scheduler_serves_a_short_request_through_a_full_batch() {
    // Fair: the short request's sample joins the very next passes (10 of them, plus the
    // few the HTTP round trip overlaps). FIFO: it waits for the 1000-step request.
    let fair = passes_for_a_short_request_behind_a_long_one(SchedulerPolicy::Fair).await;
    assert!(fair <= 40.0, "fair: {fair} passes for a 10-step request");
    let fifo = passes_for_a_short_request_behind_a_long_one(SchedulerPolicy::Fifo).await;
    assert!(
        fifo >= 900.0,
        "fifo: {fifo} passes (the baseline this test tells apart)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn work_that_cannot_finish_in_time_is_refused_up_front_and_accepted_work_finishes() {
    let timeout = Duration::from_secs(4);
    let app = spawn_app(Options {
        request_timeout: timeout,
        max_images_per_request: 16,
        queue_capacity: 1024,
        ..Options::default()
    })
    .await;
    // The first request calibrates the pass time.
    app.sample_json(json!({"steps": 2})).await;
    // Far more work than the timeout allows, even alone: 422 too_costly, nothing queued.
    let huge = app
        .sample(
            json!({"n": 16, "class": 0, "sampler": "ddpm", "steps": 1000}),
            "application/json",
        )
        .await;
    let status = huge.status();
    let body: serde_json::Value = huge.json().await.unwrap();
    if status == 422 {
        assert_eq!(body["error"]["code"], "too_costly");
    } else {
        // A machine fast enough to do it in time: then it must succeed.
        assert_eq!(status, 200, "{body}");
    }
    // Requests that fit alone, sent together until the backlog is full: each is either
    // accepted and finished within its deadline (200, never 504), or refused at once
    // with 429 and a Retry-After from the backlog.
    let body = json!({"n": 4, "class": 2, "sampler": "ddpm", "steps": 250});
    let mut accepted = Vec::new();
    let mut refused = None;
    for _ in 0..50 {
        let burst: Vec<_> = (0..8)
            .map(|_| {
                let request = app.client.post(app.url("/v1/samples")).json(&body);
                tokio::spawn(async move { request.send().await.unwrap() })
            })
            .collect();
        // Admission answers at once; accepted requests take seconds.
        tokio::time::sleep(Duration::from_millis(50)).await;
        for sent in burst {
            if sent.is_finished() {
                let response = sent.await.unwrap();
                if response.status() == 429 {
                    refused.get_or_insert(response);
                    continue;
                }
                assert_eq!(response.status(), 200);
            } else {
                accepted.push(sent);
            }
        }
        if refused.is_some() {
            break;
        }
    }
    let refused = refused.expect("the backlog never filled");
    let retry: u64 = refused.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        retry >= 1 && retry <= timeout.as_secs() + 1,
        "retry after {retry} s"
    );
    let body: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "overloaded");
    assert!(!accepted.is_empty());
    for sent in accepted {
        assert_eq!(sent.await.unwrap().status(), 200, "accepted work timed out");
    }
    assert_eq!(app.metric("ddpm_requests_timed_out_total").await, 0.0);
    app.stop().await.unwrap();
}
