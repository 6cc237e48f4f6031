//! Metric series: idempotent recording, truncation on resume, downsampling,
//! summaries, the smoothed and per-timestep losses, upgrading a series logged
//! before those existed.

use chrono::{DateTime, Utc};
use ddpm_registry::{MetricPoint, Registry, RegistryError};
use ddpm_testkit::both_backends;

use crate::helpers::{running_run, with_database_at_version, TestContext};

fn at(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(1_700_000_000_000 + ms).unwrap()
}

/// A row with every value set, except that one timestep quarter (which one
/// depends on the step) is `None` in four rows of five, so that the series
/// tests below also carry the newer columns and a missing quarter in each
/// position.
fn point(step: i64, loss: f64) -> MetricPoint {
    let mut by_timestep = [0.25, 0.5, 1.5, 3.0].map(|f| Some(f * loss));
    if let Some(quarter) = by_timestep.get_mut(step.rem_euclid(5) as usize) {
        *quarter = None;
    }
    MetricPoint {
        step,
        loss,
        learning_rate: 3e-4,
        grad_norm: Some(0.5 + step as f64),
        images_per_sec: Some(120.0),
        recorded_at: at(step),
        loss_smoothed: Some(loss + 0.125),
        loss_by_timestep: by_timestep,
    }
}

/// Steps 1..=n, loss 1/step.
fn series(n: i64) -> Vec<MetricPoint> {
    (1..=n).map(|s| point(s, 1.0 / s as f64)).collect()
}

fn steps(points: &[MetricPoint]) -> Vec<i64> {
    points.iter().map(|p| p.step).collect()
}

async fn recorded_rows_read_back(t: TestContext) {
    let run = running_run(&t.registry, "h").await;
    let rows = vec![
        point(10, 0.9),
        MetricPoint {
            grad_norm: None,
            images_per_sec: None,
            ..point(20, 0.8)
        },
    ];
    t.registry.record_metrics(run.id, &rows).await.unwrap();
    let stored = t.registry.metrics(run.id, None, None, 100).await.unwrap();
    assert_eq!(stored, rows);
    // Nothing to record is fine.
    t.registry.record_metrics(run.id, &[]).await.unwrap();
    // Another run's series is separate.
    let other = running_run(&t.registry, "h").await;
    assert!(t
        .registry
        .metrics(other.id, None, None, 100)
        .await
        .unwrap()
        .is_empty());
}

async fn replays_never_duplicate(t: TestContext) {
    let run = running_run(&t.registry, "h").await;
    t.registry
        .record_metrics(run.id, &series(50))
        .await
        .unwrap();
    t.registry
        .record_metrics(run.id, &series(50))
        .await
        .unwrap();
    // Overlapping and duplicated steps in one batch: the last given wins.
    let mut batch = series(60)[40..].to_vec();
    batch.push(point(45, 7.0));
    t.registry.record_metrics(run.id, &batch).await.unwrap();

    let stored = t.registry.metrics(run.id, None, None, 1000).await.unwrap();
    assert_eq!(steps(&stored), (1..=60).collect::<Vec<_>>());
    assert_eq!(stored[44].loss, 7.0);
    assert_eq!(stored[43].loss, 1.0 / 44.0);
    assert_eq!(
        t.registry
            .metric_summary(run.id)
            .await
            .unwrap()
            .unwrap()
            .count,
        60
    );
}

async fn big_batches_span_several_statements(t: TestContext) {
    let run = running_run(&t.registry, "h").await;
    t.registry
        .record_metrics(run.id, &series(2500))
        .await
        .unwrap();
    let stored = t.registry.metrics(run.id, None, None, 5000).await.unwrap();
    assert_eq!(stored.len(), 2500);
    assert_eq!(stored, series(2500));
}

async fn metrics_of_unknown_runs_are_refused(t: TestContext) {
    assert!(matches!(
        t.registry.record_metrics(4242, &series(3)).await,
        Err(RegistryError::RunNotFound(4242))
    ));
}

async fn diverged_steps_keep_their_nan(t: TestContext) {
    let run = running_run(&t.registry, "h").await;
    let rows = vec![
        point(1, 2.0),
        MetricPoint {
            grad_norm: Some(f64::NAN),
            ..point(2, f64::NAN)
        },
        point(3, f64::INFINITY),
    ];
    t.registry.record_metrics(run.id, &rows).await.unwrap();
    let stored = t.registry.metrics(run.id, None, None, 10).await.unwrap();
    assert!(stored[1].loss.is_nan());
    assert_eq!(stored[1].grad_norm, None);
    assert_eq!(stored[2].loss, f64::INFINITY);
    let summary = t.registry.metric_summary(run.id).await.unwrap().unwrap();
    assert_eq!(summary.min_loss, Some(2.0));
}

async fn truncation_makes_room_for_the_resumed_steps(t: TestContext) {
    let run = running_run(&t.registry, "h").await;
    t.registry
        .record_metrics(run.id, &series(100))
        .await
        .unwrap();
    // The trainer died after step 100; its newest state is from step 60.
    assert_eq!(
        t.registry.truncate_metrics_after(run.id, 60).await.unwrap(),
        40
    );
    let stored = t.registry.metrics(run.id, None, None, 1000).await.unwrap();
    assert_eq!(steps(&stored), (1..=60).collect::<Vec<_>>());
    assert_eq!(
        t.registry.truncate_metrics_after(run.id, 60).await.unwrap(),
        0
    );
    // The resumed attempt logs 61.. again, with new values.
    let resumed: Vec<_> = (61..=100).map(|s| point(s, 0.001)).collect();
    t.registry.record_metrics(run.id, &resumed).await.unwrap();
    let stored = t.registry.metrics(run.id, None, None, 1000).await.unwrap();
    assert_eq!(steps(&stored), (1..=100).collect::<Vec<_>>());
    assert!(stored[60..].iter().all(|p| p.loss == 0.001));
}

async fn downsampling_keeps_every_kth_row_and_the_last(t: TestContext) {
    let run = running_run(&t.registry, "h").await;
    t.registry
        .record_metrics(run.id, &series(10))
        .await
        .unwrap();
    let metrics = |from, to, max| {
        let registry = t.registry.clone();
        async move { steps(&registry.metrics(run.id, from, to, max).await.unwrap()) }
    };
    assert_eq!(metrics(None, None, 4).await, [1, 4, 7, 10]);
    assert_eq!(metrics(None, None, 3).await, [2, 6, 10]);
    assert_eq!(metrics(None, None, 2).await, [5, 10]);
    assert_eq!(metrics(None, None, 1).await, [10]);
    assert!(metrics(None, None, 0).await.is_empty());
    assert_eq!(metrics(None, None, 10).await, (1..=10).collect::<Vec<_>>());
    assert_eq!(
        metrics(None, None, 1000).await,
        (1..=10).collect::<Vec<_>>()
    );
    assert_eq!(metrics(Some(3), Some(7), 100).await, [3, 4, 5, 6, 7]);
    assert_eq!(metrics(Some(3), Some(7), 3).await, [3, 5, 7]);
    assert_eq!(metrics(Some(8), None, 100).await, [8, 9, 10]);
    assert_eq!(metrics(None, Some(2), 1).await, [2]);
    assert!(metrics(Some(11), None, 5).await.is_empty());
}

/// Rows, not steps, are counted: irregular steps (a run that logged at another interval
/// after a resume) are thinned by position; another run's rows never count.
async fn downsampling_counts_rows_not_steps(t: TestContext) {
    let run = running_run(&t.registry, "h").await;
    let other = running_run(&t.registry, "h").await;
    let irregular = [1, 2, 3, 10, 20, 30, 100, 200, 300, 1000];
    let rows: Vec<_> = irregular.iter().map(|&s| point(s, 1.0)).collect();
    t.registry.record_metrics(run.id, &rows).await.unwrap();
    t.registry
        .record_metrics(other.id, &series(50))
        .await
        .unwrap();
    let got = |from, to, max| {
        let registry = t.registry.clone();
        async move { steps(&registry.metrics(run.id, from, to, max).await.unwrap()) }
    };
    // k = (10 - 1) / 4 + 1 = 3: rows 9, 6, 3 and 0 from the last.
    assert_eq!(got(None, None, 4).await, [1, 10, 100, 1000]);
    assert_eq!(got(None, None, 2).await, [20, 1000]);
    // Steps 10..=300 are 6 rows: k = 3.
    assert_eq!(got(Some(4), Some(300), 2).await, [30, 300]);
    assert_eq!(got(Some(4), Some(999), 1).await, [300]);
    assert_eq!(got(Some(1001), None, 3).await, Vec::<i64>::new());
}

async fn downsampling_a_long_series(t: TestContext) {
    let run = running_run(&t.registry, "h").await;
    t.registry
        .record_metrics(run.id, &series(1000))
        .await
        .unwrap();
    for max in [2usize, 3, 7, 100, 333, 999] {
        let got = t.registry.metrics(run.id, None, None, max).await.unwrap();
        assert!(got.len() <= max, "{} rows for max {max}", got.len());
        assert!(
            got.len() * 2 > max.min(1000),
            "{} rows for max {max}",
            got.len()
        );
        assert_eq!(got.last().unwrap().step, 1000);
        // Evenly spaced and ordered by step.
        let gaps: Vec<i64> = got.windows(2).map(|w| w[1].step - w[0].step).collect();
        assert!(
            gaps.windows(2).all(|g| g[0] == g[1] && g[0] > 0),
            "{gaps:?}"
        );
        // Rows come back whole.
        assert_eq!(got[0].loss, 1.0 / got[0].step as f64);
        assert_eq!(got[0], point(got[0].step, 1.0 / got[0].step as f64));
    }
}

async fn summaries_describe_the_series(t: TestContext) {
    let run = running_run(&t.registry, "h").await;
    assert_eq!(t.registry.metric_summary(run.id).await.unwrap(), None);
    // Steps 1..=20, loss 1/step, then a bump at the end.
    let mut rows = series(20);
    rows[19].loss = 0.5;
    t.registry.record_metrics(run.id, &rows).await.unwrap();
    let s = t.registry.metric_summary(run.id).await.unwrap().unwrap();
    assert_eq!((s.count, s.first_step, s.last_step), (20, 1, 20));
    assert_eq!(s.first_loss, 1.0);
    assert_eq!(s.last_loss, 0.5);
    assert_eq!(s.min_loss, Some(1.0 / 19.0));
    // The last 10 %: steps 19 and 20.
    assert_eq!(s.tail_count, 2);
    let expected = (1.0 / 19.0 + 0.5) / 2.0;
    assert!((s.tail_mean_loss.unwrap() - expected).abs() < 1e-12);

    let one = running_run(&t.registry, "h").await;
    t.registry
        .record_metrics(one.id, &[point(5, 0.25)])
        .await
        .unwrap();
    let s = t.registry.metric_summary(one.id).await.unwrap().unwrap();
    assert_eq!(
        (s.count, s.first_step, s.last_step, s.tail_count),
        (1, 5, 5, 1)
    );
    assert_eq!((s.first_loss, s.last_loss), (0.25, 0.25));
    assert_eq!((s.min_loss, s.tail_mean_loss), (Some(0.25), Some(0.25)));
}

async fn smoothed_and_per_timestep_losses_round_trip(t: TestContext) {
    let run = running_run(&t.registry, "h").await;
    let rows = vec![
        MetricPoint {
            loss_smoothed: Some(0.042),
            loss_by_timestep: [Some(0.0101), Some(0.0312), Some(0.0455), Some(0.0731)],
            ..point(1, 0.0412)
        },
        // Not computed at all.
        MetricPoint {
            loss_smoothed: None,
            loss_by_timestep: [None; 4],
            ..point(2, 0.04)
        },
        // A small window whose samples missed two quarters; infinity is a value.
        MetricPoint {
            loss_smoothed: Some(f64::INFINITY),
            loss_by_timestep: [None, Some(0.2), None, Some(0.9)],
            ..point(3, 0.3)
        },
    ];
    t.registry.record_metrics(run.id, &rows).await.unwrap();
    assert_eq!(
        t.registry.metrics(run.id, None, None, 100).await.unwrap(),
        rows
    );

    // A diverged window: NaN is stored as NULL and reads back as None.
    let diverged = MetricPoint {
        loss_smoothed: Some(f64::NAN),
        loss_by_timestep: [Some(f64::NAN), Some(0.1), Some(f64::NAN), None],
        ..point(4, f64::NAN)
    };
    t.registry
        .record_metrics(run.id, &[diverged])
        .await
        .unwrap();
    let stored = t
        .registry
        .metrics(run.id, Some(4), Some(4), 10)
        .await
        .unwrap();
    assert_eq!(stored.len(), 1);
    assert!(stored[0].loss.is_nan());
    assert_eq!(stored[0].loss_smoothed, None);
    assert_eq!(stored[0].loss_by_timestep, [None, Some(0.1), None, None]);
    let raw = sqlx::AnyPool::connect(&t.url).await.unwrap();
    let (nulls,): (i64,) = sqlx::query_as(
        "SELECT COUNT(*) FROM metrics WHERE run_id = $1 AND step = 4 \
             AND loss_smoothed IS NULL AND loss_t_q1 IS NULL AND loss_t_q3 IS NULL \
             AND loss_t_q2 = 0.1 AND loss_t_q4 IS NULL",
    )
    .bind(run.id)
    .fetch_one(&raw)
    .await
    .unwrap();
    assert_eq!(nulls, 1, "NaN is stored as NULL");
    raw.close().await;

    // A step recorded again replaces its values, the newer ones included:
    // nothing of the old row survives.
    let replaced = MetricPoint {
        loss_smoothed: None,
        loss_by_timestep: [None, None, Some(0.5), None],
        ..point(1, 0.5)
    };
    t.registry
        .record_metrics(run.id, &[replaced])
        .await
        .unwrap();
    let stored = t.registry.metrics(run.id, None, Some(1), 10).await.unwrap();
    assert_eq!(stored, [replaced]);
}

/// Each single-row upsert is the same statement text. Once a connection has run
/// it with NULLs (NaN or `None`), later runs on that connection with values
/// must still be stored: sqlx's `Any` driver binds a NULL `f64` as `real`, and
/// a statement cached with that type refused the 8-byte value ("incorrect
/// binary data format in bind parameter").
async fn values_after_nulls_in_the_same_columns_are_stored(t: TestContext) {
    let run = running_run(&t.registry, "h").await;
    let empty = |step| MetricPoint {
        grad_norm: None,
        images_per_sec: None,
        loss_smoothed: None,
        loss_by_timestep: [None; 4],
        ..point(step, f64::NAN)
    };
    let full = |step| MetricPoint {
        loss_by_timestep: [0.1, 0.2, 0.3, 0.4].map(Some),
        ..point(step, 0.5)
    };
    // One at a time, so the pool hands out its idle connections in turn and
    // every one of them (at most 10) has run the statement with NULLs.
    for step in 1..=10 {
        t.registry
            .record_metrics(run.id, &[empty(step)])
            .await
            .unwrap();
    }
    for step in 11..=20 {
        t.registry
            .record_metrics(run.id, &[full(step)])
            .await
            .unwrap();
    }
    let stored = t.registry.metrics(run.id, None, None, 100).await.unwrap();
    assert_eq!(stored.len(), 20);
    assert_eq!(stored[10..], (11..=20).map(full).collect::<Vec<_>>());
    assert!(stored[..10]
        .iter()
        .all(|p| p.loss.is_nan() && p.loss_smoothed.is_none() && p.loss_by_timestep == [None; 4]));
}

async fn rows_logged_before_the_detail_columns_read_back_as_none(t: TestContext) {
    with_database_at_version(t.db, 1, |url| async move {
        // A database as release 0001 left it, with a run and its series
        // written by that release's statements.
        let raw = sqlx::AnyPool::connect(&url).await.unwrap();
        let (applied,): (i64,) =
            sqlx::query_as("SELECT COUNT(*) FROM _sqlx_migrations WHERE success")
                .fetch_one(&raw)
                .await
                .unwrap();
        assert_eq!(applied, 1, "only 0001 is applied yet");
        let (run_id,): (i64,) = sqlx::query_as(
            "INSERT INTO runs (status, config, dataset, total_steps, created_at, updated_at) \
             VALUES ('running', '{}', '{}', 100, 0, 0) RETURNING id",
        )
        .fetch_one(&raw)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO metrics (run_id, step, loss, learning_rate, grad_norm, \
                 images_per_sec, recorded_at) \
             VALUES ($1, 10, 0.5, 0.001, 1.5, NULL, $2), ($1, 20, NULL, 0.001, NULL, 90.0, $3)",
        )
        .bind(run_id)
        .bind(at(10).timestamp_millis())
        .bind(at(20).timestamp_millis())
        .execute(&raw)
        .await
        .unwrap();
        raw.close().await;

        // Connecting applies the newer migrations to the populated table.
        let registry = Registry::connect(&url).await.unwrap();
        let old = |step, loss, grad_norm, images_per_sec| MetricPoint {
            step,
            loss,
            learning_rate: 0.001,
            grad_norm,
            images_per_sec,
            recorded_at: at(step),
            loss_smoothed: None,
            loss_by_timestep: [None; 4],
        };
        let stored = registry.metrics(run_id, None, None, 100).await.unwrap();
        assert_eq!(stored.len(), 2);
        assert_eq!(stored[0], old(10, 0.5, Some(1.5), None));
        assert!(stored[1].loss.is_nan());
        assert_eq!(
            MetricPoint {
                loss: 0.0,
                ..stored[1]
            },
            old(20, 0.0, None, Some(90.0))
        );
        let summary = registry.metric_summary(run_id).await.unwrap().unwrap();
        assert_eq!((summary.count, summary.min_loss), (2, Some(0.5)));

        // The resumed run logs on into the upgraded table, newer values and all.
        registry
            .record_metrics(run_id, &[point(30, 0.25)])
            .await
            .unwrap();
        let stored = registry.metrics(run_id, None, None, 100).await.unwrap();
        assert_eq!(stored.len(), 3);
        assert_eq!(stored[2], point(30, 0.25));
        assert_eq!(stored[0], old(10, 0.5, Some(1.5), None));
        registry.close().await;
    })
    .await;
}

both_backends!(
    crate::helpers::run;
    recorded_rows_read_back,
    replays_never_duplicate,
    big_batches_span_several_statements,
    metrics_of_unknown_runs_are_refused,
    diverged_steps_keep_their_nan,
    truncation_makes_room_for_the_resumed_steps,
    downsampling_keeps_every_kth_row_and_the_last,
    downsampling_a_long_series,
    downsampling_counts_rows_not_steps,
    summaries_describe_the_series,
    smoothed_and_per_timestep_losses_round_trip,
    values_after_nulls_in_the_same_columns_are_stored,
    rows_logged_before_the_detail_columns_read_back_as_none,
);
