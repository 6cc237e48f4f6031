//! Streamed sampling (Server-Sent Events) and cancellation, read by a real client.

use std::collections::BTreeSet;

use base64::Engine;
use serde_json::json;

use crate::helpers::{spawn_app, wait_until, Options, SseReader, TestApp, IMAGE_SIZE};

async fn stream(app: &TestApp, body: serde_json::Value) -> (String, SseReader) {
    let response = app
        .client
        .post(app.url("/v1/samples"))
        .header("accept", "text/event-stream")
        .json(&body)
        .send()
        .await
        .expect("request");
    let id = response.headers()["x-ddpm-request-id"]
        .to_str()
        .unwrap()
        .to_string();
    (id, SseReader::new(response))
}

/// Decodes a base64 PNG and returns its pixels, checking its size.
fn decode_png(b64: &serde_json::Value) -> Vec<u8> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64.as_str().expect("base64 string"))
        .expect("base64");
    let image = image::load_from_memory_with_format(&bytes, image::ImageFormat::Png)
        .expect("a PNG")
        .to_rgb8();
    assert_eq!(image.dimensions(), (IMAGE_SIZE, IMAGE_SIZE));
    image.into_raw()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stream_sends_queued_progress_previews_images_and_done_in_order() {
    let app = spawn_app(Options::default()).await;
    let body = json!({"classes": [0, 1, 2], "sampler": "ddim", "steps": 20, "seed": 11});
    let mut with_previews = body.clone();
    with_previews["preview_every"] = json!(5);
    let (id, mut reader) = stream(&app, with_previews).await;
    let events = reader.rest().await;
    let names: Vec<&str> = events.iter().map(|e| e.name.as_str()).collect();

    assert_eq!(names[0], "queued", "{names:?}");
    assert_eq!(events[0].data["id"], id.as_str(), "the id comes first");
    assert_eq!(events[0].data["position"], 0);
    assert_eq!(events[0].data["images"], 3);
    assert_eq!(names.last(), Some(&"done"), "{names:?}");
    assert_eq!(events.last().unwrap().data["images"], 3);

    // Progress only grows, counts steps over the 3 images, and ends complete.
    let progress: Vec<&serde_json::Value> = events
        .iter()
        .filter(|e| e.name == "progress")
        .map(|e| &e.data)
        .collect();
    assert!(!progress.is_empty());
    assert!(progress
        .iter()
        .all(|p| p["total"] == 60 && p["images"] == 3));
    let steps: Vec<u64> = progress
        .iter()
        .map(|p| p["step"].as_u64().unwrap())
        .collect();
    assert!(steps.windows(2).all(|w| w[0] <= w[1]), "{steps:?}");
    assert_eq!(progress.last().unwrap()["step"], 60);
    assert_eq!(progress.last().unwrap()["images_done"], 3);
    let first_progress = names.iter().position(|n| *n == "progress").unwrap();
    let first_image = names.iter().position(|n| *n == "image").unwrap();
    assert!(first_progress < first_image, "{names:?}");

    // Previews: x̂₀ every 5 steps (5, 10, 15) of each image, before that image is done.
    let previews: Vec<&serde_json::Value> = events
        .iter()
        .filter(|e| e.name == "preview")
        .map(|e| &e.data)
        .collect();
    for index in 0..3 {
        let at: Vec<u64> = previews
            .iter()
            .filter(|p| p["index"] == index)
            .map(|p| p["step"].as_u64().unwrap())
            .collect();
        assert_eq!(at, [5, 10, 15], "image {index}");
    }
    for p in &previews {
        decode_png(&p["png_base64"]);
    }

    // One image event per image, each a real PNG, and the same pixels as the JSON answer
    // to the same request (same seeds, same settings).
    let images: Vec<&serde_json::Value> = events
        .iter()
        .filter(|e| e.name == "image")
        .map(|e| &e.data)
        .collect();
    let indices: BTreeSet<u64> = images
        .iter()
        .map(|i| i["index"].as_u64().unwrap())
        .collect();
    assert_eq!(indices, BTreeSet::from([0, 1, 2]));
    let plain = app.sample_json(body).await;
    for image in &images {
        let index = image["index"].as_u64().unwrap() as usize;
        let expected = &plain["images"][index];
        assert_eq!(image["class"], expected["class"]);
        assert_eq!(image["seed"], expected["seed"]);
        assert_eq!(
            decode_png(&image["png_base64"]),
            decode_png(&expected["png_base64"]),
            "image {index} differs between the stream and the JSON answer"
        );
    }
    app.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn closing_a_stream_cancels_its_samples_at_the_next_step() {
    let app = spawn_app(Options::default()).await;
    let (_, mut reader) = stream(
        &app,
        json!({"n": 4, "class": 0, "sampler": "ddpm", "steps": 1000}),
    )
    .await;
    loop {
        let event = reader.next().await.expect("the stream ended early");
        if event.name == "progress" {
            break;
        }
    }
    assert_eq!(app.metric("ddpm_active_samples").await, 4.0);
    drop(reader);
    wait_until("the closed stream's samples to leave the batch", || async {
        app.metric("ddpm_requests_cancelled_total").await >= 1.0
            && app.metric("ddpm_active_samples").await == 0.0
    })
    .await;
    let passes = app.metric("ddpm_forward_passes_total").await;
    assert!(
        passes < 1000.0,
        "{passes} passes: the samples ran to the end"
    );
    assert_eq!(app.metric("ddpm_images_generated_total").await, 0.0);
    app.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn delete_cancels_a_request_in_flight_by_its_id() {
    let app = spawn_app(Options::default()).await;
    let long = tokio::spawn({
        let request = app
            .client
            .post(app.url("/v1/samples"))
            .header("x-ddpm-request-id", "job-42")
            .json(&json!({"n": 4, "class": 1, "sampler": "ddpm", "steps": 1000}));
        async move {
            let response = request.send().await.unwrap();
            let status = response.status();
            let body: serde_json::Value = response.json().await.unwrap();
            (status, body)
        }
    });
    wait_until("the request to run", || async {
        app.metric("ddpm_active_samples").await == 4.0
    })
    .await;
    // The same id cannot be used twice while the request is in flight.
    let duplicate = app
        .client
        .post(app.url("/v1/samples"))
        .header("x-ddpm-request-id", "job-42")
        .json(&json!({"steps": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(duplicate.status(), 409);

    let cancel = app
        .client
        .delete(app.url("/v1/samples/job-42"))
        .send()
        .await
        .unwrap();
    assert_eq!(cancel.status(), 202);
    let body: serde_json::Value = cancel.json().await.unwrap();
    assert_eq!(body, json!({"id": "job-42", "status": "cancelling"}));
    let (status, body) = long.await.unwrap();
    assert_eq!(status, 409);
    assert_eq!(body["error"]["code"], "cancelled");
    assert_eq!(app.metric("ddpm_active_samples").await, 0.0);
    assert!(app.metric("ddpm_forward_passes_total").await < 1000.0);

    // Gone now: a second cancel, or one of an id never seen, is 404.
    for id in ["job-42", "never-seen"] {
        let again = app
            .client
            .delete(app.url(&format!("/v1/samples/{id}")))
            .send()
            .await
            .unwrap();
        assert_eq!(again.status(), 404, "{id}");
    }
    // A malformed id is refused before any work.
    let bad = app
        .client
        .post(app.url("/v1/samples"))
        .header("x-ddpm-request-id", "has spaces")
        .json(&json!({"steps": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    app.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stream_is_cancelled_by_delete_with_an_error_event() {
    let app = spawn_app(Options {
        api_token: Some("t0ken".into()),
        ..Options::default()
    })
    .await;
    let response = app
        .client
        .post(app.url("/v1/samples"))
        .bearer_auth("t0ken")
        .header("accept", "text/event-stream")
        .json(&json!({"n": 2, "class": 2, "sampler": "ddpm", "steps": 1000}))
        .send()
        .await
        .unwrap();
    let mut reader = SseReader::new(response);
    let queued = reader.next().await.unwrap();
    let id = queued.data["id"].as_str().unwrap().to_string();
    // Cancelling is behind the token.
    let url = app.url(&format!("/v1/samples/{id}"));
    let anonymous = app.client.delete(&url).send().await.unwrap();
    assert_eq!(anonymous.status(), 401);
    let cancel = app
        .client
        .delete(&url)
        .bearer_auth("t0ken")
        .send()
        .await
        .unwrap();
    assert_eq!(cancel.status(), 202);
    let rest = reader.rest().await;
    let last = rest.last().expect("an event after the cancel");
    assert_eq!(last.name, "error");
    assert_eq!(last.data["error"]["code"], "cancelled");
    assert!(rest.iter().all(|e| e.name != "image" && e.name != "done"));
    app.stop().await.unwrap();
}
