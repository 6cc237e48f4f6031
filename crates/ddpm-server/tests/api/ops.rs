//! Operations: health, bearer token, metrics, OpenAPI, graceful shutdown, linkage.

use std::time::Duration;

use serde_json::json;

use crate::helpers::{spawn_app, wait_until, Options};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bearer_token_guards_every_route_but_health() {
    let app = spawn_app(Options {
        api_token: Some("s3cret".into()),
        ..Options::default()
    })
    .await;
    for path in ["/v1/model", "/v1/runs", "/metrics", "/openapi.json"] {
        let response = app.client.get(app.url(path)).send().await.unwrap();
        assert_eq!(response.status(), 401, "{path}");
        assert_eq!(response.headers()["www-authenticate"], "Bearer");
        let wrong = app
            .client
            .get(app.url(path))
            .bearer_auth("guess")
            .send()
            .await
            .unwrap();
        assert_eq!(wrong.status(), 401, "{path}");
        let right = app
            .client
            .get(app.url(path))
            .bearer_auth("s3cret")
            .send()
            .await
            .unwrap();
        assert_eq!(right.status(), 200, "{path}");
    }
    let response = app.sample(json!({"steps": 2}), "application/json").await;
    assert_eq!(response.status(), 401);
    assert_eq!(
        response.json::<serde_json::Value>().await.unwrap()["error"]["code"],
        "unauthorized"
    );
    for path in ["/healthz", "/readyz"] {
        assert_eq!(app.get_json(path).await.0, 200, "{path}");
    }
    // The document says so: a 401 on every route behind the token, none on the others.
    let doc: serde_json::Value = app
        .client
        .get(app.url("/openapi.json"))
        .bearer_auth("s3cret")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    for (method, path) in ddpm_server::http::ROUTES {
        let guarded = !["/healthz", "/readyz"].contains(path);
        let op = &doc["paths"][path][method];
        assert_eq!(op["responses"]["401"].is_object(), guarded, "{path}");
        assert_eq!(op["security"][0]["bearer"].is_array(), guarded, "{path}");
    }
    app.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_metrics_and_openapi_describe_the_server() {
    let app = spawn_app(Options::default()).await;
    let (status, model) = app.get_json("/v1/model").await;
    assert_eq!(status, 200);
    assert_eq!(model["run_id"], app.run_id);
    assert_eq!(model["step"], 100);
    assert_eq!(model["classes"], json!(["red", "green", "blue"]));
    assert_eq!(model["image_size"], 8);
    assert_eq!(model["device"], "cpu");
    assert!(model["loaded_at"].is_string());
    let (status, ready) = app.get_json("/readyz").await;
    assert_eq!((status, ready["status"].as_str()), (200, Some("ready")));

    app.sample_json(json!({"n": 2, "steps": 3})).await;
    let text = app
        .client
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for needle in [
        "ddpm_http_requests_total{method=\"POST\",route=\"/v1/samples\",status=\"200\"} 1",
        "ddpm_http_request_duration_seconds_bucket{le=\"+Inf\",route=\"/v1/samples\"} 1",
        "ddpm_queue_depth 0",
        "ddpm_batch_size_count",
        "ddpm_images_generated_total 2",
        "ddpm_forward_passes_total 3",
        "ddpm_model_step 100",
    ] {
        assert!(text.contains(needle), "{needle} missing from\n{text}");
    }

    let (status, doc) = app.get_json("/openapi.json").await;
    assert_eq!(status, 200);
    for (method, path) in ddpm_server::http::ROUTES {
        assert!(doc["paths"][path][method].is_object(), "{method} {path}");
        // And the route really exists on the server.
        if *method == "get" && !path.contains('{') {
            assert_ne!(app.get_json(path).await.0, 404, "{path}");
        }
        // No token configured: nothing is documented as needing one.
        assert!(doc["paths"][path][method].get("security").is_none());
    }
    // The generated document carries this server's limits and this model's classes.
    let schemas = &doc["components"]["schemas"];
    let request = &schemas["SampleRequest"]["properties"];
    assert_eq!(request["n"]["maximum"], 16, "--max-images-per-request");
    assert_eq!(request["classes"]["maxItems"], 16);
    assert_eq!(request["steps"]["maximum"], model["timesteps"]);
    assert_eq!(
        schemas["ClassRef"]["oneOf"][1]["enum"],
        json!(["red", "green", "blue"])
    );
    assert_eq!(schemas["ClassRef"]["oneOf"][0]["maximum"], 2);
    let codes = schemas["ErrorCode"]["enum"].as_array().unwrap();
    assert!(codes.contains(&json!("invalid_guidance_scale")));
    app.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shutdown_finishes_the_requests_in_flight() {
    let mut app = spawn_app(Options::default()).await;
    let in_flight = tokio::spawn({
        let client = app.client.clone();
        let url = app.url("/v1/samples");
        async move {
            client
                .post(url)
                .json(&json!({"n": 2, "sampler": "ddpm", "steps": 400}))
                .send()
                .await
                .map(|r| r.status())
        }
    });
    wait_until("the request to be in flight", || async {
        app.metric("ddpm_active_samples").await >= 2.0
    })
    .await;
    app.signal_shutdown();
    let server = app.take_server().unwrap();
    assert_eq!(
        in_flight.await.unwrap().unwrap(),
        200,
        "the request in flight was not finished"
    );
    tokio::time::timeout(Duration::from_secs(30), server)
        .await
        .expect("the server did not stop")
        .unwrap()
        .unwrap();
    assert!(
        app.client.get(app.url("/healthz")).send().await.is_err(),
        "still accepting"
    );
    app.stop().await.unwrap();
}

#[test]
fn the_binary_links_libtorch_cuda() {
    let exe = env!("CARGO_BIN_EXE_ddpm-server");
    let out = std::process::Command::new("readelf")
        .args(["-d", exe])
        .output()
        .expect("readelf (binutils) must be installed to run this test");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines()
            .any(|l| l.contains("(NEEDED)") && l.contains("[libtorch_cuda.so]")),
        "libtorch_cuda.so is not NEEDED by {exe}:\n{text}"
    );
}

#[test]
fn the_binary_documents_its_environment() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ddpm-server"))
        .arg("--help")
        .env("AWS_SECRET_ACCESS_KEY", "s3-secret-value")
        .env("DDPM_API_TOKEN", "api-token-value")
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    // Secrets set in the environment are not shown as the options' current values.
    for secret in ["s3-secret-value", "api-token-value"] {
        assert!(!help.contains(secret), "--help shows {secret}");
    }
    for var in [
        "DDPM_BIND",
        "DDPM_DATA_DIR",
        "DDPM_DATABASE_URL",
        "DDPM_CHECKPOINT_DIR",
        "DDPM_STORE",
        "AWS_ENDPOINT_URL",
        "AWS_SECRET_ACCESS_KEY",
        "DDPM_CACHE_DIR",
        "DDPM_DEVICE",
        "DDPM_LOG_FORMAT",
        "DDPM_MAX_BATCH",
        "DDPM_QUEUE_CAPACITY",
        "DDPM_MAX_IMAGES_PER_REQUEST",
        "DDPM_DEFAULT_SAMPLER",
        "DDPM_DEFAULT_STEPS",
        "DDPM_POLL_INTERVAL",
        "DDPM_REQUEST_TIMEOUT",
        "DDPM_PIN_RUN",
        "DDPM_PIN_CHECKPOINT",
        "DDPM_API_TOKEN",
    ] {
        assert!(help.contains(var), "{var} missing from --help");
    }
}

#[test]
fn the_binary_refuses_to_start_exposed() {
    let dir = tempfile::tempdir().unwrap();
    let start = |args: &[&str], token: Option<&str>| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_ddpm-server"));
        cmd.args(["--device", "cpu", "--data-dir"])
            .arg(dir.path())
            .args(args)
            .env_remove("DDPM_API_TOKEN")
            .env_remove("DDPM_INSECURE_NO_AUTH");
        if let Some(token) = token {
            cmd.env("DDPM_API_TOKEN", token);
        }
        let out = cmd.output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // Every address without a token, and a placeholder token anywhere: it exits at once.
    let (ok, err) = start(&["--bind", "0.0.0.0:0"], None);
    assert!(!ok && err.contains("no API token"), "{err}");
    let (ok, err) = start(&["--bind", "0.0.0.0:0"], Some(""));
    assert!(!ok && err.contains("no API token"), "{err}");
    let (ok, err) = start(&["--bind", "127.0.0.1:0"], Some("change-me-too"));
    assert!(!ok && err.contains("placeholder"), "{err}");
}

/// `ALLOW_CONNECTIONS` of the app's PostgreSQL database, and its sessions ended when
/// turned off: the database is away for the server as in an outage.
async fn set_database_reachable(app: &crate::helpers::TestApp, reachable: bool) {
    let name = app.database_url().rsplit('/').next().unwrap().to_string();
    let admin = sqlx::AnyPool::connect(&ddpm_testkit::postgres_server_url())
        .await
        .expect("connect as admin");
    sqlx::query(&format!(
        "ALTER DATABASE \"{name}\" ALLOW_CONNECTIONS {reachable}"
    ))
    .execute(&admin)
    .await
    .unwrap();
    if !reachable {
        sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1")
            .bind(&name)
            .execute(&admin)
            .await
            .unwrap();
    }
    admin.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_leaves_sampling_ready() {
    let app = spawn_app(Options {
        db: ddpm_testkit::Db::Postgres,
        ..Options::default()
    })
    .await;
    let (status, ready) = app.get_json("/readyz").await;
    assert_eq!(
        (status, ready["registry_reachable"].as_bool()),
        (200, Some(true))
    );

    set_database_reachable(&app, false).await;
    let (status, ready) = app.get_json("/readyz").await;
    assert_eq!(status, 200, "{ready}");
    assert_eq!(ready["registry_reachable"], false);
    assert_eq!(ready["model_thread_alive"], true);
    let (status, health) = app.get_json("/healthz").await;
    assert_eq!((status, health["status"].as_str()), (200, Some("ok")));
    // Sampling does not need the registry; the run history does.
    app.sample_json(json!({"n": 1, "steps": 3})).await;
    let (status, body) = app.get_json("/v1/runs").await;
    assert_eq!(status, 503, "{body}");

    set_database_reachable(&app, true).await;
    wait_until("the run history back with the database", || async {
        app.get_json("/v1/runs").await.0 == 200
    })
    .await;
    app.stop().await.unwrap();
}

/// Reads from `stream` until the server closes it; returns what it sent and how long
/// that took. Panics if the connection is still open after `limit`.
async fn read_until_closed(
    stream: &mut tokio::net::TcpStream,
    limit: Duration,
) -> (String, Duration) {
    use tokio::io::AsyncReadExt;
    let started = std::time::Instant::now();
    let mut received = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        match tokio::time::timeout(limit, stream.read(&mut buffer)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => received.extend_from_slice(&buffer[..n]),
            Err(_) => panic!("the connection is still open after {limit:?}"),
        }
    }
    (
        String::from_utf8_lossy(&received).into_owned(),
        started.elapsed(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_idle_connections_are_closed() {
    use tokio::io::AsyncWriteExt;
    let app = spawn_app(Options {
        header_read_timeout: Duration::from_millis(500),
        body_read_timeout: Duration::from_millis(500),
        ..Options::default()
    })
    .await;
    let address = app.address.trim_start_matches("http://").to_string();

    // A header that never ends.
    let mut slow = tokio::net::TcpStream::connect(&address).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .await
        .unwrap();
    let (_, after) = read_until_closed(&mut slow, Duration::from_secs(10)).await;
    assert!(
        after >= Duration::from_millis(400),
        "closed after {after:?}"
    );

    // A kept-alive connection that goes quiet after its answer.
    let mut idle = tokio::net::TcpStream::connect(&address).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let (answer, _) = read_until_closed(&mut idle, Duration::from_secs(10)).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    // A body that stops half way: the request is answered 408, not held.
    let mut stalled = tokio::net::TcpStream::connect(&address).await.unwrap();
    stalled
        .write_all(
            b"POST /v1/samples HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n\
              content-length: 100\r\n\r\n{\"steps\": ",
        )
        .await
        .unwrap();
    let (answer, _) = read_until_closed(&mut stalled, Duration::from_secs(10)).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");

    // Meanwhile the server serves as usual.
    app.sample_json(json!({"steps": 2})).await;
    app.stop().await.unwrap();
}
