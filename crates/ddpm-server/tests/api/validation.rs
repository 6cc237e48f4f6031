//! Bad input never hurts the server: each is a 4xx JSON error with a stable code, and the
//! model keeps serving.

use serde_json::json;

use crate::helpers::{spawn_app, Options};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_bad_input_is_a_4xx_with_a_stable_code() {
    let app = spawn_app(Options::default()).await;
    let json_cases: Vec<(serde_json::Value, u16, &str)> = vec![
        (json!({"class": "purple"}), 422, "unknown_class"),
        (json!({"class": 17}), 422, "unknown_class"),
        (json!({"n": 0}), 422, "invalid_n"),
        (json!({"n": 17}), 422, "invalid_n"),
        (json!({"n": -3}), 422, "invalid_n"),
        (json!({"classes": []}), 422, "invalid_n"),
        (json!({"steps": 0}), 422, "invalid_steps"),
        (json!({"steps": 5000}), 422, "invalid_steps"),
        (json!({"sampler": "euler"}), 422, "invalid_sampler"),
        (json!({"sampler": 2}), 422, "invalid_request"),
        (json!({"priority": "urgent"}), 422, "invalid_stream_option"),
        (json!({"preview_every": 0}), 422, "invalid_stream_option"),
        (json!({"eta": 2.0}), 422, "invalid_eta"),
        (
            json!({"guidance_scale": "NaN"}),
            422,
            "invalid_guidance_scale",
        ),
        (
            json!({"guidance_scale": "inf"}),
            422,
            "invalid_guidance_scale",
        ),
        (
            json!({"guidance_scale": 1e300}),
            422,
            "invalid_guidance_scale",
        ),
        // The document says number: a numeric string is refused like any other.
        (
            json!({"guidance_scale": "2.5"}),
            422,
            "invalid_guidance_scale",
        ),
        (json!({"n": 2.5}), 422, "invalid_request"),
        (json!({"class": 0, "classes": [1]}), 422, "invalid_request"),
        (json!({"classes": [0, 1], "n": 1}), 422, "invalid_n"),
        (json!({"sampler": "ddpm", "eta": 0.5}), 422, "invalid_eta"),
        (
            json!({"timestep_spacing": "karras"}),
            422,
            "invalid_sampler_option",
        ),
        (json!({"timestep_spacing": 1}), 422, "invalid_request"),
        (
            json!({"thresholding": "clip"}),
            422,
            "invalid_sampler_option",
        ),
        (
            json!({"thresholding": "dynamic", "dynamic_thresholding_ratio": 0}),
            422,
            "invalid_sampler_option",
        ),
        (
            json!({"thresholding": "dynamic", "sample_max_value": 0.5}),
            422,
            "invalid_sampler_option",
        ),
        (
            json!({"sample_max_value": 2}),
            422,
            "invalid_sampler_option",
        ),
        (
            json!({"sampler": "ddpm", "algorithm_type": "sde-dpmsolver++"}),
            422,
            "invalid_sampler_option",
        ),
        (
            json!({"guidance_rescale": 2}),
            422,
            "invalid_sampler_option",
        ),
        (
            json!({"guidance_interval": [900, 100]}),
            422,
            "invalid_sampler_option",
        ),
        (
            json!({"guidance_interval": [0, 1000]}),
            422,
            "invalid_sampler_option",
        ),
        (
            json!({"guidance_interval": "0-500"}),
            422,
            "invalid_request",
        ),
        (
            json!({"sampler": "ddpm", "variance_type": "learned"}),
            422,
            "invalid_sampler_option",
        ),
        (
            json!({"sampler": "dpmpp_2m", "variance_type": "fixed_large"}),
            422,
            "invalid_sampler_option",
        ),
        (json!({"n": "four"}), 422, "invalid_request"),
        (json!({"colour": "red"}), 422, "invalid_request"),
        (json!([1, 2]), 422, "invalid_request"),
    ];
    for (body, status, code) in json_cases {
        let response = app.sample(body.clone(), "application/json").await;
        assert_eq!(response.status().as_u16(), status, "{body}");
        let error: serde_json::Value = response.json().await.unwrap();
        assert_eq!(error["error"]["code"], code, "{body}: {error}");
        assert!(!error["error"]["message"].as_str().unwrap().is_empty());
    }

    let raw = |body: Vec<u8>, content_type: Option<&str>| {
        let mut request = app.client.post(app.url("/v1/samples")).body(body);
        if let Some(ct) = content_type {
            request = request.header("content-type", ct);
        }
        request.send()
    };
    let cases: Vec<(Vec<u8>, Option<&str>, u16, &str)> = vec![
        (
            b"{\"class\": ".to_vec(),
            Some("application/json"),
            400,
            "malformed_json",
        ),
        (
            b"{\"guidance_scale\": NaN}".to_vec(),
            Some("application/json"),
            400,
            "malformed_json",
        ),
        (
            b"not json".to_vec(),
            Some("application/json"),
            400,
            "malformed_json",
        ),
        (
            b"{}".to_vec(),
            Some("text/plain"),
            415,
            "unsupported_media_type",
        ),
        (b"{}".to_vec(), None, 415, "unsupported_media_type"),
        (
            vec![b' '; 200 * 1024],
            Some("application/json"),
            413,
            "payload_too_large",
        ),
    ];
    for (body, content_type, status, code) in cases {
        let response = raw(body, content_type).await.unwrap();
        assert_eq!(response.status().as_u16(), status, "{code}");
        let error: serde_json::Value = response.json().await.unwrap();
        assert_eq!(error["error"]["code"], code);
    }

    let response = app.sample(json!({}), "text/html").await;
    assert_eq!(response.status(), 406);
    let response = app.client.get(app.url("/v1/samples")).send().await.unwrap();
    assert_eq!(response.status(), 405);
    assert_eq!(
        response.json::<serde_json::Value>().await.unwrap()["error"]["code"],
        "method_not_allowed"
    );
    let (status, body) = app.get_json("/v2/nothing").await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("not_found"))
    );

    // Nothing above hurt the server.
    let body = app.sample_json(json!({"class": "red", "steps": 5})).await;
    assert_eq!(body["images"].as_array().unwrap().len(), 1);
    // What the document allows is accepted: integers written 2.0 (JSON Schema's integers),
    // nulls for absent fields, n repeating the length of `classes`.
    let body = app
        .sample_json(json!({"class": 1.0, "n": 2.0, "steps": 3, "seed": null, "classes": null}))
        .await;
    assert_eq!(body["images"][1]["class"], "green");
    let body = app
        .sample_json(json!({"classes": ["red", 2], "n": 2, "steps": 3}))
        .await;
    assert_eq!(body["images"].as_array().unwrap().len(), 2);
    assert_eq!(app.get_json("/healthz").await.0, 200);
    app.stop().await.unwrap();
}
