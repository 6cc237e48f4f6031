//! The web console in a real headless Chromium (see browser.rs) against the real server
//! and a trained tiny checkpoint: what a user sees on each page. Screenshots of every page
//! land in `target/console-screenshots/`.

use std::path::Path;

use chrono::{Duration as ChronoDuration, Utc};
use ddpm_registry::{
    CheckpointStore, FinalStatus, Lease, MetricPoint, RunStatus, RunWorld, ScoreValues,
};
use fantoccini::actions::{InputSource, MouseActions, PointerAction, MOUSE_BUTTON_LEFT};
use serde_json::{json, Value};

use crate::{
    browser::Browser,
    helpers::{new_run, spawn_app, Db, Options, TestApp, CLASSES, IMAGE_SIZE},
};

const DESKTOP: (u32, u32) = (1280, 1000);
const PHONE: (u32, u32) = (390, 844);
/// The sample grid written beside the checkpoint: a row per class, 4 columns.
const GRID_COLUMNS: u32 = 4;

/// `n` logged windows of a run that learns: the loss falls, the rate warms up.
fn metric_points(n: i64) -> Vec<MetricPoint> {
    let start = Utc::now() - ChronoDuration::seconds(n);
    (1..=n)
        .map(|i| {
            let step = i * 3;
            MetricPoint {
                step,
                loss: 0.05 + 0.9 / (1.0 + i as f64 / 20.0) + 0.02 * ((i * 7919) % 13) as f64 / 13.0,
                learning_rate: 2e-4 * (i as f64 / 50.0).min(1.0),
                grad_norm: Some(1.0 + 1.0 / (i as f64).sqrt()),
                images_per_sec: Some(120.0 + (i % 5) as f64),
                recorded_at: start + ChronoDuration::seconds(i),
                loss_smoothed: None,
                loss_by_timestep: [None; 4],
            }
        })
        .collect()
}

/// A run with a history worth looking at: its metrics, the trainer's sample grid beside
/// its EMA checkpoint (a real PNG), a score, and the run marked completed.
async fn with_history(app: &TestApp) -> (i64, (u32, u32)) {
    let registry = &app.registry;
    registry
        .record_metrics(app.run_id, &metric_points(300))
        .await
        .expect("record metrics");
    let checkpoints = registry.list_checkpoints(app.run_id).await.unwrap();
    let ema = checkpoints.last().expect("the trained checkpoint");
    let size = (GRID_COLUMNS * IMAGE_SIZE, CLASSES.len() as u32 * IMAGE_SIZE);
    let grid = image::RgbImage::from_fn(size.0, size.1, |x, y| {
        let mut px = [40u8, 40, 40];
        px[(y / IMAGE_SIZE) as usize % 3] = 200 + (x % 50) as u8;
        image::Rgb(px)
    });
    let mut png = Vec::new();
    grid.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    app.store
        .write_bytes(&CheckpointStore::grid_path_for(Path::new(&ema.path)), &png)
        .expect("write the grid");
    let values = ScoreValues {
        samples_per_class: 8,
        holdout_images: 24,
        class_accuracy: Some(0.75),
        fd: Some(12.5),
        fd_floor: Some(1.5),
        kid: Some(0.02),
        kid_std: Some(0.005),
        diversity: Some(0.9),
        probe_accuracy: Some(1.0),
        settings: json!({"sampler": "ddim", "steps": 25}),
        seconds: 2.0,
    };
    registry
        .record_score(ema.run_id, ema.step, ema.id, &values)
        .await
        .unwrap();
    let run = claim(app, app.run_id).await;
    // Trained on two rank processes, as data-parallel training records it.
    app.registry
        .leased(Lease::of(&run).unwrap())
        .record_world(&RunWorld {
            size: 2,
            devices: vec!["cuda:0".into(), "cuda:1".into()],
        })
        .await
        .unwrap();
    end_claimed(app, &run, 1000, FinalStatus::Completed, None).await;
    (ema.id, size)
}

/// Claims run `id` as a trainer would.
async fn claim(app: &TestApp, id: i64) -> ddpm_registry::Run {
    app.registry
        .claim_run(id, "trainer-a")
        .await
        .unwrap()
        .expect("the run to be claimable")
}

/// Claims run `id` as a trainer would, reports `step`, and ends it as `status`.
async fn end_run(app: &TestApp, id: i64, step: i64, status: FinalStatus, error: Option<&str>) {
    let run = claim(app, id).await;
    end_claimed(app, &run, step, status, error).await;
}

/// Reports `step` for the claimed `run` and ends it as `status`.
async fn end_claimed(
    app: &TestApp,
    run: &ddpm_registry::Run,
    step: i64,
    status: FinalStatus,
    error: Option<&str>,
) {
    let lease = app.registry.leased(Lease::of(run).unwrap());
    lease.heartbeat(step).await.unwrap();
    lease.finish(status, error).await.unwrap();
}

/// The pixels of a canvas under `css` that are not blank.
const INKED_PIXELS: &str = r#"
    const canvas = document.querySelector(arguments[0]);
    if (!canvas || !canvas.width) return 0;
    const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
    let inked = 0;
    for (let i = 3; i < data.length; i += 4) if (data[i] > 0) inked++;
    return inked;
"#;

#[tokio::test]
async fn runs_list_shows_the_run_with_progress_and_best_score() {
    let app = spawn_app(Options::default()).await;
    with_history(&app).await;
    let browser = Browser::start(DESKTOP.0, DESKTOP.1).await;
    browser.open(&app.url("/")).await;

    let row = format!("#runs tr[data-run-id=\"{}\"]", app.run_id);
    browser.wait_for(&row).await;
    let text = browser
        .wait_until(
            "the run's row with its score",
            &format!(
                "const r = document.querySelector('{row}'); \
                 return r && r.textContent.includes('FD') ? r.textContent : null;"
            ),
        )
        .await;
    let text = text.as_str().unwrap();
    assert!(text.contains(&format!("#{}", app.run_id)), "{text}");
    assert!(text.contains("completed"), "{text}");
    assert!(text.contains("FD 12.5"), "the best score: {text}");
    // The newest loss: the last point's, as the API rounds it to 4 digits.
    let last = metric_points(300).last().unwrap().loss;
    let shown = format!("{}", (last * 1e4).round() / 1e4);
    assert!(text.contains(&shown[..5]), "loss {shown} in {text}");
    browser.screenshot("runs").await;

    // Live: a run queued now shows up without a reload.
    let queued = app.registry.create_run(&new_run()).await.unwrap().id;
    let status = browser
        .text(&format!("#runs tr[data-run-id=\"{queued}\"] td.status"))
        .await;
    assert_eq!(status.trim(), "queued");

    // The status filter: no running run.
    set_select(&browser, "status-filter", "running").await;
    browser
        .wait_until(
            "the empty filtered list",
            "return document.querySelector('#runs td.empty')?.textContent ?? null;",
        )
        .await;
    assert!(browser
        .client
        .current_url()
        .await
        .unwrap()
        .as_str()
        .ends_with("#/runs?status=running"));

    // The model page names the device and the classes.
    browser.open(&app.url("/#/model")).await;
    assert_eq!(browser.text("#model-device").await, "cpu");
    let classes = browser.text("ol.classes").await;
    for class in CLASSES {
        assert!(classes.contains(class), "{classes}");
    }
    browser.screenshot("model").await;
    assert_no_page_error(&browser).await;
    browser.close().await;
    app.stop().await.unwrap();
}

#[tokio::test]
async fn run_page_draws_the_loss_chart_and_the_checkpoint_grid() {
    let app = spawn_app(Options::default()).await;
    let (checkpoint_id, grid_size) = with_history(&app).await;
    let other = app.registry.create_run(&new_run()).await.unwrap().id;
    app.registry
        .record_metrics(other, &metric_points(100))
        .await
        .unwrap();
    // Tall enough for the whole page in its screenshot (the README shows it).
    let browser = Browser::start(DESKTOP.0, 2000).await;
    browser
        .open(&app.url(&format!("/#/runs/{}", app.run_id)))
        .await;

    // The loss chart has drawn its series.
    browser.wait_for("#chart-loss canvas").await;
    let inked = browser
        .wait_until(
            "ink on the loss chart",
            &format!(
                "const f = function() {{ {INKED_PIXELS} }}; \
                 const n = f.apply(null, ['#chart-loss canvas']); return n > 500 ? n : null;"
            ),
        )
        .await;
    assert!(inked.as_u64().unwrap() > 500);
    for chart in ["lr", "grad", "ips", "fd"] {
        browser.wait_for(&format!("#chart-{chart} canvas")).await;
    }

    // The grid of the served checkpoint loads and decodes at the size written.
    browser
        .wait_for(&format!(
            "img.grid-main[data-checkpoint-id=\"{checkpoint_id}\"]"
        ))
        .await;
    let decoded = browser
        .wait_until(
            "the decoded grid",
            "const img = document.querySelector('img.grid-main'); \
             return img && img.complete && img.naturalWidth > 0 \
               ? [img.naturalWidth, img.naturalHeight] : null;",
        )
        .await;
    assert_eq!(decoded, json!([grid_size.0, grid_size.1]));
    let facts = browser.text(".checkpoint-detail").await;
    assert!(
        facts.contains("serving"),
        "the served checkpoint is marked: {facts}"
    );
    assert!(facts.contains("12.5"), "its FD: {facts}");
    let sha = app
        .registry
        .get_checkpoint(checkpoint_id)
        .await
        .unwrap()
        .unwrap()
        .sha256;
    assert!(facts.contains(&sha), "its SHA-256: {facts}");
    let served = browser.text("#served").await;
    assert!(served.contains(&format!("#{checkpoint_id}")), "{served}");
    let config = browser.text("#run-config").await;
    assert!(config.contains("Skipped"), "{config}");
    let summary = browser.text("#run-summary").await;
    assert!(
        summary.contains("World") && summary.contains("2 ranks (cuda:0, cuda:1)"),
        "the world its attempt recorded: {summary}"
    );
    browser.screenshot("run").await;
    assert_no_page_error(&browser).await;

    // The wall-clock axis draws the same series.
    set_select(&browser, "x-axis", "wall").await;
    browser
        .wait_until(
            "the loss chart on a time axis",
            &format!(
                "const f = function() {{ {INKED_PIXELS} }}; \
                 const n = f.apply(null, ['#chart-loss canvas']); \
                 const legend = document.querySelector('#chart-loss .u-legend')?.textContent ?? ''; \
                 return n > 500 && /time/i.test(legend) ? n : null;"
            ),
        )
        .await;

    // Back on steps, a drag across the loss chart zooms in: the range is asked for again.
    set_select(&browser, "x-axis", "step").await;
    browser
        .wait_until(
            "the step axis",
            "return /step/i.test(document.querySelector('#chart-loss .u-legend')?.textContent ?? '');",
        )
        .await;
    // A real drag (WebDriver actions): from a quarter of the plot's width to its middle.
    let over = browser.wait_for("#chart-loss .u-over").await;
    let (_, _, width, _) = over.rectangle().await.unwrap();
    let drag = MouseActions::new("mouse".into())
        .then(PointerAction::MoveToElement {
            element: over,
            duration: None,
            x: -width / 4.0,
            y: 0.0,
        })
        .then(PointerAction::Down {
            button: MOUSE_BUTTON_LEFT,
        })
        .then(PointerAction::MoveBy {
            duration: Some(std::time::Duration::from_millis(300)),
            x: width / 4.0,
            y: 0.0,
        })
        .then(PointerAction::Up {
            button: MOUSE_BUTTON_LEFT,
        });
    browser.client.perform_actions(drag).await.unwrap();
    browser
        .wait_until(
            "the zoomed range fetched",
            "return !document.getElementById('reset-zoom').hidden && \
               performance.getEntriesByType('resource').some(e => e.name.includes('from_step='));",
        )
        .await;

    // Another run overlaid on the charts.
    browser
        .wait_for("details.overlays summary")
        .await
        .click()
        .await
        .unwrap();
    browser
        .wait_for(&format!("details.overlays input[value=\"{other}\"]"))
        .await
        .click()
        .await
        .unwrap();
    browser
        .wait_until(
            "the other run in the loss chart's legend",
            &format!(
                "return document.querySelector('#chart-loss .u-legend')?.textContent.includes('#{other}');"
            ),
        )
        .await;

    // Every request the page made is the console's own file or a documented API route.
    let requested = browser
        .eval(
            "return performance.getEntriesByType('resource').map(e => new URL(e.name).pathname);",
            vec![],
        )
        .await;
    for path in requested.as_array().unwrap() {
        let path = path.as_str().unwrap();
        assert!(
            path.starts_with("/console/") || is_api_route(path),
            "the console asked for {path}, which the API does not document"
        );
    }
    browser.close().await;
    app.stop().await.unwrap();
}

/// Whether `path` is one of the API's routes (`{…}` in a template matches one segment).
fn is_api_route(path: &str) -> bool {
    ddpm_server::http::ROUTES.iter().any(|(_, template)| {
        let (a, b): (Vec<_>, Vec<_>) = (template.split('/').collect(), path.split('/').collect());
        a.len() == b.len()
            && a.iter()
                .zip(&b)
                .all(|(t, p)| t == p || (t.starts_with('{') && t.ends_with('}') && !p.is_empty()))
    })
}

/// Fails on an error the page reported in its banner: a script error, a rejected
/// promise nobody handled, or something its security policy blocked.
async fn assert_no_page_error(browser: &Browser) {
    let banner = browser
        .eval(
            "const b = document.getElementById('banner'); return b.hidden ? '' : b.textContent;",
            vec![],
        )
        .await;
    let banner = banner.as_str().unwrap_or_default();
    assert!(
        !banner.contains("hit an error") && !banner.contains("security policy"),
        "the page reported: {banner}"
    );
}

/// Types `token` into the token dialog and submits it.
async fn submit_token(browser: &Browser, token: &str) {
    let input = browser.wait_for("#token-input").await;
    input.send_keys(token).await.unwrap();
    browser.wait_for("#token-save").await.click().await.unwrap();
}

async fn set_select(browser: &Browser, id: &str, value: &str) {
    browser
        .eval(
            "const s = document.getElementById(arguments[0]); s.value = arguments[1]; \
             s.dispatchEvent(new Event('change'));",
            vec![json!(id), json!(value)],
        )
        .await;
}

#[tokio::test]
async fn playground_shows_images_of_the_requested_size_and_the_guidance_strip() {
    let app = spawn_app(Options::default()).await;
    let browser = Browser::start(DESKTOP.0, DESKTOP.1).await;
    browser.open(&app.url("/#/playground")).await;

    browser.wait_for("#playground-form").await;
    browser
        .eval(
            "const set = (id, v) => { document.getElementById(id).value = v; }; \
             set('pg-class', '2'); set('pg-n', '3'); set('pg-sampler', 'ddim'); set('pg-steps', '8'); \
             set('pg-seed', '42'); set('pg-spacing', 'leading'); set('pg-rescale', '0.5'); \
             set('pg-interval-lo', '100'); set('pg-interval-hi', '800'); \
             window.sentBodies = []; const send = window.fetch; \
             window.fetch = (url, init) => { if (init && init.body) window.sentBodies.push(JSON.parse(init.body)); \
               return send(url, init); };",
            vec![],
        )
        .await;
    set_select(&browser, "pg-sampler", "ddim").await;
    set_select(&browser, "pg-thresholding", "dynamic").await;
    browser
        .eval(
            "document.getElementById('pg-threshold-ratio').value = '0.9';",
            vec![],
        )
        .await;
    browser.wait_for("#generate").await.click().await.unwrap();
    let sizes = browser
        .wait_until(
            "three finished images",
            "const imgs = [...document.querySelectorAll('#results img.sample')]; \
             const done = imgs.filter(i => !i.classList.contains('pending') && i.complete && i.naturalWidth); \
             return imgs.length === 3 && done.length === 3 \
               ? done.map(i => [i.naturalWidth, i.naturalHeight]) : null;",
        )
        .await;
    let size = IMAGE_SIZE as u64;
    assert_eq!(sizes, json!([[size, size], [size, size], [size, size]]));
    let progress = browser.text("#results").await;
    assert!(progress.contains("blue"), "the class asked for: {progress}");
    let links: Value = browser
        .eval(
            "return [...document.querySelectorAll('#results a.download')].map(a => a.download);",
            vec![],
        )
        .await;
    let links = links.as_array().unwrap();
    assert_eq!(links.len(), 3);
    assert!(
        links.iter().all(|l| l.as_str().unwrap().ends_with(".png")),
        "{links:?}"
    );
    assert!(links[0].as_str().unwrap().contains("seed42"), "{links:?}");
    // The sampler options went out as set, those left at the server default not at all.
    let sent: Value = browser.eval("return window.sentBodies;", vec![]).await;
    let sent = &sent[0];
    assert_eq!(sent["timestep_spacing"], "leading", "{sent}");
    assert_eq!(sent["thresholding"], "dynamic", "{sent}");
    assert_eq!(sent["dynamic_thresholding_ratio"], 0.9, "{sent}");
    assert_eq!(sent["guidance_rescale"], 0.5, "{sent}");
    assert_eq!(sent["guidance_interval"], json!([100, 800]), "{sent}");
    for unset in ["variance_type", "algorithm_type", "sample_max_value"] {
        assert!(sent.get(unset).is_none(), "{unset}: {sent}");
    }

    // The same seed at five guidance scales.
    browser
        .wait_for("#compare-guidance")
        .await
        .click()
        .await
        .unwrap();
    let strip = browser
        .wait_until(
            "the guidance strip",
            "const imgs = [...document.querySelectorAll('#guidance-strip img.sample')]; \
             return imgs.length === 5 && imgs.every(i => !i.classList.contains('pending') && i.complete && i.naturalWidth) \
               ? [...document.querySelectorAll('#guidance-strip figcaption')].map(c => c.textContent) : null;",
        )
        .await;
    let captions: Vec<&str> = strip
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    assert!(captions[0].starts_with("w = 0"), "{captions:?}");
    assert!(captions[4].starts_with("w = 7"), "{captions:?}");
    browser.screenshot("playground").await;
    assert_no_page_error(&browser).await;
    browser.close().await;
    app.stop().await.unwrap();
}

#[tokio::test]
async fn a_wrong_token_gets_a_clear_message_and_never_reaches_the_url() {
    let token = "console-token-7f3a";
    let app = spawn_app(Options {
        api_token: Some(token.into()),
        ..Options::default()
    })
    .await;
    let browser = Browser::start(DESKTOP.0, DESKTOP.1).await;
    browser.open(&app.url("/")).await;

    let message = browser
        .wait_until(
            "the token dialog",
            "const d = document.getElementById('token-dialog'); \
             return d.open ? document.getElementById('token-message').textContent : null;",
        )
        .await;
    assert!(
        message.as_str().unwrap().contains("needs its API token"),
        "{message}"
    );

    submit_token(&browser, "not-the-token").await;
    let refused = browser
        .wait_until(
            "the refusal",
            "const m = document.getElementById('token-message'); \
             return document.getElementById('token-dialog').open && m.classList.contains('error') \
               ? m.textContent : null;",
        )
        .await;
    assert!(
        refused.as_str().unwrap().contains("refused this token"),
        "{refused}"
    );
    browser.screenshot("wrong-token").await;

    submit_token(&browser, token).await;
    browser
        .wait_for(&format!("#runs tr[data-run-id=\"{}\"]", app.run_id))
        .await;
    let url = browser.client.current_url().await.unwrap();
    assert!(!url.as_str().contains(token), "{url}");
    // Asked once: a reload goes straight to the page.
    browser.client.refresh().await.unwrap();
    browser
        .wait_for(&format!("#runs tr[data-run-id=\"{}\"]", app.run_id))
        .await;
    let open = browser
        .eval(
            "return document.getElementById('token-dialog').open;",
            vec![],
        )
        .await;
    assert_eq!(open, json!(false));
    browser.close().await;
    app.stop().await.unwrap();
}

/// A run of 100,000 metric points (PostgreSQL: recording them is quick there): the charts
/// draw from the server's downsampled series, and the test prints how long the page took.
#[tokio::test]
async fn a_run_of_100k_points_draws_from_a_downsampled_series() {
    let app = spawn_app(Options {
        db: Db::Postgres,
        ..Options::default()
    })
    .await;
    let points = metric_points(100_000);
    for chunk in points.chunks(10_000) {
        app.registry
            .record_metrics(app.run_id, chunk)
            .await
            .unwrap();
    }
    let browser = Browser::start(DESKTOP.0, DESKTOP.1).await;
    browser
        .open(&app.url(&format!("/#/runs/{}", app.run_id)))
        .await;
    let drawn = browser
        .wait_until(
            "the charts drawn",
            "return performance.getEntriesByName('ddpm:charts-drawn')[0]?.startTime ?? null;",
        )
        .await;
    let inked = browser
        .eval(
            &format!("const f = function() {{ {INKED_PIXELS} }}; return f.apply(null, ['#chart-loss canvas']);"),
            vec![],
        )
        .await;
    assert!(inked.as_u64().unwrap() > 500, "{inked}");
    // The charts asked for a downsampled series, and got one.
    let series = browser
        .eval(
            "const e = performance.getEntriesByType('resource') \
               .find(e => e.name.includes('/metrics?max_points=1000')); \
             return e ? [e.responseStart - e.requestStart, e.responseEnd - e.startTime] : null;",
            vec![],
        )
        .await;
    // Not a benchmark (that is benches/console.rs): a bound 25 times the target, which
    // only a plan that sorts the whole series at every step (10 s here) would break.
    let waited = series[0].as_f64().unwrap();
    assert!(waited < 5000.0, "the series took {waited} ms on the server");
    let (_, body) = app
        .get_json(&format!("/v1/runs/{}/metrics?max_points=1000", app.run_id))
        .await;
    let served = body["points"].as_array().unwrap().len();
    assert!((500..=1000).contains(&served), "{served} points");
    println!(
        "console at 100,000 metric points: charts drawn {:.0} ms after navigation; the \
         series request waited {:.0} ms for the server, {:.0} ms in all; {served} points drawn",
        drawn.as_f64().unwrap(),
        series[0].as_f64().unwrap(),
        series[1].as_f64().unwrap(),
    );
    browser.close().await;
    app.stop().await.unwrap();
}

/// The operator's actions go through the API with the token: resuming a failed run and
/// promoting a checkpoint (its reason typed into the prompt) are recorded in the registry.
#[tokio::test]
async fn actions_resume_a_failed_run_and_promote_a_checkpoint() {
    let token = "console-actions-token";
    let app = spawn_app(Options {
        api_token: Some(token.into()),
        ..Options::default()
    })
    .await;
    let failed = app.registry.create_run(&new_run()).await.unwrap().id;
    end_run(&app, failed, 0, FinalStatus::Failed, Some("out of memory")).await;
    let browser = Browser::start(DESKTOP.0, DESKTOP.1).await;
    browser.open(&app.url(&format!("/#/runs/{failed}"))).await;
    submit_token(&browser, token).await;
    let error = browser.text("#run-summary").await;
    assert!(error.contains("out of memory"), "{error}");
    // Its attempt recorded no world: none is shown, and no stale one.
    assert!(
        error.contains("World") && !error.contains("rank"),
        "{error}"
    );

    browser.wait_for("#resume-run").await.click().await.unwrap();
    browser
        .wait_until(
            "the resumed run",
            "return document.querySelector('.page-head .badge')?.textContent === 'interrupted';",
        )
        .await;
    let resumed = app.registry.get_run(failed).await.unwrap().unwrap();
    assert_eq!(resumed.status, RunStatus::Interrupted);

    let ema = app.registry.list_checkpoints(app.run_id).await.unwrap()[0].clone();
    browser
        .open(&app.url(&format!("/#/runs/{}", app.run_id)))
        .await;
    browser.wait_for("#promote").await.click().await.unwrap();
    browser
        .client
        .send_alert_text("the sharpest grid")
        .await
        .unwrap();
    browser.client.accept_alert().await.unwrap();
    let banner = browser
        .wait_until(
            "the promotion's confirmation",
            "const b = document.getElementById('banner'); \
             return !b.hidden && b.textContent.includes('promoted') ? b.textContent : null;",
        )
        .await;
    assert!(
        banner.as_str().unwrap().contains(&format!("#{}", ema.id)),
        "{banner}"
    );
    let promotion = app.registry.current_promotion().await.unwrap().unwrap();
    assert_eq!(promotion.checkpoint_id, ema.id);
    assert_eq!(promotion.reason, "the sharpest grid");
    assert_eq!(promotion.promoted_by, "console");
    browser.close().await;
    app.stop().await.unwrap();
}

#[tokio::test]
async fn pages_fit_a_phone_screen() {
    let app = spawn_app(Options::default()).await;
    with_history(&app).await;
    let browser = Browser::phone(PHONE.0, PHONE.1).await;
    browser.open(&app.url("/")).await;
    let width = browser.eval("return window.innerWidth;", vec![]).await;
    assert_eq!(width, json!(PHONE.0), "the emulated phone's width");
    let overflow = "return document.documentElement.scrollWidth - window.innerWidth;";
    for (page, ready, name) in [
        (
            format!("/#/runs/{}", app.run_id),
            "#chart-loss canvas",
            "run-phone",
        ),
        ("/#/runs".to_string(), "#runs tbody tr", "runs-phone"),
        (
            "/#/playground".to_string(),
            "#playground-form",
            "playground-phone",
        ),
    ] {
        browser.open(&app.url(&page)).await;
        browser.wait_for(ready).await;
        let extra = browser.eval(overflow, vec![]).await;
        assert!(
            extra.as_i64().unwrap() <= 0,
            "{page} is {extra} px wider than the phone's screen"
        );
        browser.screenshot(name).await;
    }
    browser.close().await;
    app.stop().await.unwrap();
}

/// The console's files: served without the token, cached by tag, locked down by policy.
#[tokio::test]
async fn console_files_are_served_with_tags_and_a_strict_policy() {
    let app = spawn_app(Options {
        api_token: Some("secret".into()),
        checkpoint: false,
        ..Options::default()
    })
    .await;
    let page = app.client.get(app.url("/")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    let csp = page.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(csp.contains("script-src 'self'"), "{csp}");
    let etag = page.headers()["etag"].clone();
    assert!(page.text().await.unwrap().contains("/console/js/main.js"));
    let again = app
        .client
        .get(app.url("/"))
        .header("if-none-match", etag)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 304);
    let script = app
        .client
        .get(app.url("/console/js/main.js"))
        .send()
        .await
        .unwrap();
    assert_eq!(script.status(), 200);
    assert!(script.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/javascript"));
    let missing = app
        .client
        .get(app.url("/console/js/nope.js"))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    // The data stays behind the token.
    let runs = app.client.get(app.url("/v1/runs")).send().await.unwrap();
    assert_eq!(runs.status(), 401);
    app.stop().await.unwrap();
}
