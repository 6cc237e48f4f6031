//! A run's metric series: one row per logging window, idempotent on
//! `(run_id, step)`, downsampled for charts, summarised for `runs show`.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::{Any, Executor};

use crate::db::{from_millis, run_fk, Backend, Registry};
use crate::error::{RegistryError, Result};

/// Bound parameters per metrics row in [`record_metrics`](Registry::record_metrics).
const PARAMS_PER_ROW: usize = 12;
/// Rows per `INSERT`: keeps a statement far below both backends' limit on
/// bound parameters (SQLite 32766, PostgreSQL 65535).
const ROWS_PER_INSERT: usize = 1000;
const _: () = assert!(ROWS_PER_INSERT * PARAMS_PER_ROW <= 32_766);

/// One row of a run's metric series: the trainer's logging window that ends
/// at `step`.
///
/// `loss` and `learning_rate` may be NaN (a diverged step); it is stored as
/// NULL on both backends, so aggregates skip it, and travels as JSON `null`.
/// A NaN in one of the optional values is stored as NULL too and reads back as
/// `None`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MetricPoint {
    /// The optimiser step this row describes (the window's last step).
    pub step: i64,
    /// Training loss: the plain, unweighted ε-MSE (MSE between the true and the
    /// predicted noise), averaged over the window's steps.
    #[serde(deserialize_with = "nan_if_null")]
    pub loss: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub learning_rate: f64,
    /// Gradient norm before clipping, when the trainer computes it.
    pub grad_norm: Option<f64>,
    /// Training throughput around this step.
    pub images_per_sec: Option<f64>,
    /// When the trainer logged the step.
    pub recorded_at: DateTime<Utc>,
    /// An exponential moving average of the per-step loss, with bias
    /// correction (so the first steps are not pulled towards zero), as of
    /// `step`. `None` when not computed: rows logged before it existed.
    #[serde(default)]
    pub loss_smoothed: Option<f64>,
    /// The mean ε-MSE of the window's samples by the quarter of [0, T) their
    /// diffusion timestep t falls in: index 0 is t in [0, T/4) (least noise),
    /// 1 is [T/4, T/2), 2 is [T/2, 3T/4), 3 is [3T/4, T) (most noise). An
    /// entry is `None` when no sample of the window fell in that quarter, and
    /// for rows logged before it existed. JSON: an array of 4 numbers or
    /// `null`s; absent reads as all `null`.
    #[serde(default)]
    pub loss_by_timestep: [Option<f64>; 4],
}

/// Reads JSON `null` (what serde_json writes for NaN) back as NaN.
fn nan_if_null<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// A run's metric series in a few numbers.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MetricSummary {
    /// Rows recorded.
    pub count: i64,
    pub first_step: i64,
    pub last_step: i64,
    /// Loss at `first_step` (NaN if that step diverged).
    #[serde(deserialize_with = "nan_if_null")]
    pub first_loss: f64,
    /// Loss at `last_step` (NaN if that step diverged).
    #[serde(deserialize_with = "nan_if_null")]
    pub last_loss: f64,
    /// Lowest loss; `None` when every loss is NaN.
    pub min_loss: Option<f64>,
    /// Mean loss over the last 10 % of the rows (at least one row), the
    /// number to compare runs by; `None` when all of those are NaN.
    pub tail_mean_loss: Option<f64>,
    /// How many rows `tail_mean_loss` averages.
    pub tail_count: i64,
}

/// A `metrics` row as stored.
#[derive(sqlx::FromRow)]
struct MetricRow {
    step: i64,
    loss: Option<f64>,
    learning_rate: Option<f64>,
    grad_norm: Option<f64>,
    images_per_sec: Option<f64>,
    recorded_at: i64,
    loss_smoothed: Option<f64>,
    loss_t_q1: Option<f64>,
    loss_t_q2: Option<f64>,
    loss_t_q3: Option<f64>,
    loss_t_q4: Option<f64>,
}

impl MetricRow {
    fn into_point(self, run_id: i64) -> Result<MetricPoint> {
        Ok(MetricPoint {
            step: self.step,
            loss: self.loss.unwrap_or(f64::NAN),
            learning_rate: self.learning_rate.unwrap_or(f64::NAN),
            grad_norm: self.grad_norm,
            images_per_sec: self.images_per_sec,
            recorded_at: from_millis("metrics", run_id, self.recorded_at)?,
            loss_smoothed: self.loss_smoothed,
            loss_by_timestep: [
                self.loss_t_q1,
                self.loss_t_q2,
                self.loss_t_q3,
                self.loss_t_q4,
            ],
        })
    }
}

const METRIC_COLUMNS: &str = "step, loss, learning_rate, grad_norm, images_per_sec, recorded_at, \
     loss_smoothed, loss_t_q1, loss_t_q2, loss_t_q3, loss_t_q4";

/// NaN as NULL: SQLite cannot store NaN, and NULL keeps both backends'
/// aggregates equal.
fn finite_or_null(x: f64) -> Option<f64> {
    (!x.is_nan()).then_some(x)
}

/// The rows to write: one per step, the last one given for a step winning,
/// ordered by step. (PostgreSQL refuses an upsert that hits a row twice.)
fn dedup_by_step(rows: &[MetricPoint]) -> Vec<MetricPoint> {
    let mut sorted: Vec<(usize, MetricPoint)> = rows.iter().copied().enumerate().collect();
    sorted.sort_by_key(|(i, p)| (p.step, std::cmp::Reverse(*i)));
    sorted.dedup_by_key(|(_, p)| p.step);
    sorted.into_iter().map(|(_, p)| p).collect()
}

/// `INSERT … VALUES ($1, …), (…) ON CONFLICT … DO UPDATE` for `rows` rows.
fn upsert_sql(rows: usize) -> String {
    let mut sql = String::from(
        "INSERT INTO metrics (run_id, step, loss, learning_rate, grad_norm, images_per_sec, \
         recorded_at, loss_smoothed, loss_t_q1, loss_t_q2, loss_t_q3, loss_t_q4) VALUES ",
    );
    for row in 0..rows {
        if row > 0 {
            sql.push_str(", ");
        }
        sql.push('(');
        for col in 0..PARAMS_PER_ROW {
            if col > 0 {
                sql.push_str(", ");
            }
            sql.push_str(&format!("${}", row * PARAMS_PER_ROW + col + 1));
        }
        sql.push(')');
    }
    sql.push_str(
        " ON CONFLICT (run_id, step) DO UPDATE SET loss = excluded.loss, \
         learning_rate = excluded.learning_rate, grad_norm = excluded.grad_norm, \
         images_per_sec = excluded.images_per_sec, recorded_at = excluded.recorded_at, \
         loss_smoothed = excluded.loss_smoothed, loss_t_q1 = excluded.loss_t_q1, \
         loss_t_q2 = excluded.loss_t_q2, loss_t_q3 = excluded.loss_t_q3, \
         loss_t_q4 = excluded.loss_t_q4",
    );
    sql
}

/// Upserts up to [`ROWS_PER_INSERT`] rows in one statement.
pub(crate) async fn upsert_metrics<'e>(
    ex: impl Executor<'e, Database = Any>,
    run_id: i64,
    rows: &[MetricPoint],
) -> Result<()> {
    let sql = upsert_sql(rows.len());
    // Not cached as a prepared statement: sqlx 0.8's `Any` driver binds a NULL
    // f64 as PostgreSQL `real` (its NULL mapping swaps real and double,
    // transact-rs/sqlx#4284), so a statement first prepared with a NULL in a
    // column refuses a value there later ("incorrect binary data format in
    // bind parameter"). The optional values are NULL often (a timestep quarter
    // no sample fell in, a diverged window); preparing per call costs little
    // at one call per logging window.
    let mut query = sqlx::query(&sql).persistent(false);
    for p in rows {
        query = query
            .bind(run_id)
            .bind(p.step)
            .bind(finite_or_null(p.loss))
            .bind(finite_or_null(p.learning_rate))
            .bind(p.grad_norm.and_then(finite_or_null))
            .bind(p.images_per_sec.and_then(finite_or_null))
            .bind(p.recorded_at.timestamp_millis())
            .bind(p.loss_smoothed.and_then(finite_or_null));
        for quarter in p.loss_by_timestep {
            query = query.bind(quarter.and_then(finite_or_null));
        }
    }
    query.execute(ex).await.map_err(run_fk(run_id))?;
    Ok(())
}

/// Upserts `rows` (the last of a step wins) inside `tx`.
pub(crate) async fn record_in(
    tx: &mut sqlx::Transaction<'static, Any>,
    run_id: i64,
    rows: &[MetricPoint],
) -> Result<()> {
    for chunk in dedup_by_step(rows).chunks(ROWS_PER_INSERT) {
        upsert_metrics(&mut **tx, run_id, chunk).await?;
    }
    Ok(())
}

/// Deletes the rows after `step`.
pub(crate) async fn delete_metrics_after<'e>(
    ex: impl Executor<'e, Database = Any>,
    run_id: i64,
    step: i64,
) -> Result<u64> {
    let done = sqlx::query("DELETE FROM metrics WHERE run_id = $1 AND step > $2")
        .bind(run_id)
        .bind(step)
        .execute(ex)
        .await?;
    Ok(done.rows_affected())
}

/// The positions a downsampled series keeps: every k-th of `n` rows counted back from
/// the last, with the smallest k that keeps at most `max_points` (≥ 1).
///
/// Rows at distance 0, k, 2k, … from the last number floor((n - 1) / k) + 1, which is
/// ≤ m exactly when k > (n - 1) / m, so k = floor((n - 1) / m) + 1 (1 when n ≤ m).
fn every_kth_from_last(n: usize, max_points: usize) -> impl Iterator<Item = usize> {
    let k = n.saturating_sub(1) / max_points.max(1) + 1;
    // The first kept row is as far from the start as the last is from it, modulo k.
    (n.saturating_sub(1) % k..n).step_by(k)
}

/// The newest row of a step range (what `max_points = 1` keeps), read from the end of
/// the `(run_id, step)` key without counting the range.
async fn select_newest<'e>(
    ex: impl Executor<'e, Database = Any>,
    run_id: i64,
    from_step: i64,
    to_step: i64,
) -> Result<Vec<MetricPoint>> {
    let rows: Vec<MetricRow> = sqlx::query_as(&format!(
        "SELECT {METRIC_COLUMNS} FROM metrics \
         WHERE run_id = $1 AND step >= $2 AND step <= $3 \
         ORDER BY step DESC LIMIT 1"
    ))
    .bind(run_id)
    .bind(from_step)
    .bind(to_step)
    .fetch_all(ex)
    .await?;
    rows.into_iter().map(|r| r.into_point(run_id)).collect()
}

/// [`every_kth_from_last`]'s rows of a step range, on SQLite: one statement counts the
/// range, walks the `(run_id, step)` key down from its last step skipping k - 1 rows at a
/// time (`OFFSET`), and reads whole only the rows it lands on; a range of at most m rows
/// is read as it is. SQLite walks a `WITHOUT ROWID` table's key whatever its statistics,
/// and one statement sees one state of the table while a trainer appends.
///
/// A numbered window over every row (this query's first form) read and sorted them all:
/// 1,000 of 100,000 rows took 200 ms, and take 25 ms so (BENCHMARKS.md, "Console").
async fn select_metrics_walk<'e>(
    ex: impl Executor<'e, Database = Any>,
    run_id: i64,
    from_step: i64,
    to_step: i64,
    max_points: i64,
) -> Result<Vec<MetricPoint>> {
    let sql = format!(
        "WITH RECURSIVE \
             span AS (SELECT COUNT(*) AS n, MAX(step) AS last FROM metrics \
                 WHERE run_id = $1 AND step >= $2 AND step <= $3), \
             pick(step) AS ( \
                 SELECT last FROM span WHERE n > $4 \
                 UNION ALL \
                 SELECT (SELECT m.step FROM metrics m \
                         WHERE m.run_id = $1 AND m.step < pick.step AND m.step >= $2 \
                         ORDER BY m.step DESC LIMIT 1 \
                         OFFSET (SELECT (n - 1) / $4 FROM span)) \
                 FROM pick WHERE pick.step IS NOT NULL) \
         SELECT {METRIC_COLUMNS} FROM ( \
             SELECT {METRIC_COLUMNS} FROM metrics \
             WHERE run_id = $1 AND step >= $2 AND step <= $3 \
                 AND (SELECT n FROM span) <= $4 \
             UNION ALL \
             SELECT {METRIC_COLUMNS} FROM metrics \
             WHERE run_id = $1 AND step IN (SELECT step FROM pick)) t \
         ORDER BY step"
    );
    let rows: Vec<MetricRow> = sqlx::query_as(&sql)
        .bind(run_id)
        .bind(from_step)
        .bind(to_step)
        .bind(max_points)
        .fetch_all(ex)
        .await?;
    rows.into_iter().map(|r| r.into_point(run_id)).collect()
}

/// [`every_kth_from_last`]'s rows of a step range, on PostgreSQL: the range's steps
/// (the key only), the positions chosen here, then those rows by step. PostgreSQL plans
/// the walk of [`select_metrics_walk`] by the table's statistics, and before autovacuum
/// has analysed a freshly filled table it sorts the whole range at each of the m steps
/// (10 s for 100,000 rows); reading the steps is linear whatever the plan (40 ms for
/// 100,000). A row deleted between the two reads (a resumed run's truncation) is simply
/// not returned.
async fn select_metrics_by_steps(
    pool: &sqlx::AnyPool,
    run_id: i64,
    from_step: i64,
    to_step: i64,
    max_points: i64,
) -> Result<Vec<MetricPoint>> {
    let steps: Vec<i64> = sqlx::query_scalar(
        "SELECT step FROM metrics WHERE run_id = $1 AND step >= $2 AND step <= $3 \
         ORDER BY step",
    )
    .bind(run_id)
    .bind(from_step)
    .bind(to_step)
    .fetch_all(pool)
    .await?;
    let max_points = usize::try_from(max_points).unwrap_or(usize::MAX);
    let picked: Vec<i64> = every_kth_from_last(steps.len(), max_points)
        .map(|i| steps[i])
        .collect();
    if picked.is_empty() {
        return Ok(Vec::new());
    }
    let placeholders: Vec<String> = (2..picked.len() + 2).map(|i| format!("${i}")).collect();
    let sql = format!(
        "SELECT {METRIC_COLUMNS} FROM metrics WHERE run_id = $1 AND step IN ({}) \
         ORDER BY step",
        placeholders.join(", ")
    );
    // Not cached: the statement's text changes with the number of steps.
    let mut query = sqlx::query_as::<_, MetricRow>(&sql)
        .persistent(false)
        .bind(run_id);
    for step in &picked {
        query = query.bind(*step);
    }
    let rows = query.fetch_all(pool).await?;
    rows.into_iter().map(|r| r.into_point(run_id)).collect()
}

#[derive(sqlx::FromRow)]
struct SummaryRow {
    count: i64,
    first_step: Option<i64>,
    last_step: Option<i64>,
    min_loss: Option<f64>,
    first_loss: Option<f64>,
    last_loss: Option<f64>,
}

/// Count, step range, first/last/min loss.
async fn select_summary<'e>(
    ex: impl Executor<'e, Database = Any>,
    run_id: i64,
) -> Result<SummaryRow> {
    Ok(sqlx::query_as(
        "SELECT COUNT(*) AS count, MIN(step) AS first_step, MAX(step) AS last_step, \
             MIN(loss) AS min_loss, \
             (SELECT loss FROM metrics WHERE run_id = $1 ORDER BY step LIMIT 1) AS first_loss, \
             (SELECT loss FROM metrics WHERE run_id = $1 ORDER BY step DESC LIMIT 1) AS last_loss \
         FROM metrics WHERE run_id = $1",
    )
    .bind(run_id)
    .fetch_one(ex)
    .await?)
}

/// Mean loss of the last `rows` rows.
async fn select_tail_mean<'e>(
    ex: impl Executor<'e, Database = Any>,
    run_id: i64,
    rows: i64,
) -> Result<Option<f64>> {
    let (mean,): (Option<f64>,) = sqlx::query_as(
        "SELECT AVG(loss) FROM ( \
             SELECT loss FROM metrics WHERE run_id = $1 ORDER BY step DESC LIMIT $2) t",
    )
    .bind(run_id)
    .bind(rows)
    .fetch_one(ex)
    .await?;
    Ok(mean)
}

/// The last 10 % of `count` rows, at least one.
fn tail_len(count: i64) -> i64 {
    ((count + 9) / 10).max(1)
}

impl Registry {
    /// Records metric rows of run `run_id` in one transaction. Idempotent on
    /// `(run_id, step)`: a step recorded again replaces its row, so a replay
    /// never duplicates. Fails with [`RegistryError::RunNotFound`] for an
    /// unknown run.
    #[tracing::instrument(skip(self, rows), fields(rows = rows.len()))]
    pub async fn record_metrics(&self, run_id: i64, rows: &[MetricPoint]) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        record_in(&mut tx, run_id, rows).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Deletes the rows of run `run_id` with a step after `step`; returns how
    /// many. A trainer resuming from a state saved at step S calls this with
    /// S: the steps after S are trained (and logged) again, so the series has
    /// neither gaps nor rows from the abandoned attempt.
    #[tracing::instrument(skip(self))]
    pub async fn truncate_metrics_after(&self, run_id: i64, step: i64) -> Result<u64> {
        delete_metrics_after(&self.pool, run_id, step).await
    }

    /// The rows of run `run_id` with `from_step ≤ step ≤ to_step` (unbounded
    /// when `None`), ordered by step and downsampled to at most `max_points`:
    /// every k-th row counted back from the last, with the smallest k that
    /// fits, so the rows are evenly spaced and the newest one is always there.
    #[tracing::instrument(skip(self))]
    pub async fn metrics(
        &self,
        run_id: i64,
        from_step: Option<i64>,
        to_step: Option<i64>,
        max_points: usize,
    ) -> Result<Vec<MetricPoint>> {
        let from = from_step.unwrap_or(i64::MIN);
        let to = to_step.unwrap_or(i64::MAX);
        if max_points == 0 {
            return Ok(Vec::new());
        }
        let max_points = i64::try_from(max_points).map_err(|_| {
            RegistryError::InvalidArgument(format!("max_points {max_points} is too large"))
        })?;
        if max_points == 1 {
            return select_newest(&self.pool, run_id, from, to).await;
        }
        match self.backend {
            Backend::Sqlite => select_metrics_walk(&self.pool, run_id, from, to, max_points).await,
            Backend::Postgres => {
                select_metrics_by_steps(&self.pool, run_id, from, to, max_points).await
            }
        }
    }

    /// The summary `runs show` prints; `None` when nothing was recorded.
    #[tracing::instrument(skip(self))]
    pub async fn metric_summary(&self, run_id: i64) -> Result<Option<MetricSummary>> {
        let mut tx = self.pool.begin().await?;
        let row = select_summary(&mut *tx, run_id).await?;
        let (Some(first_step), Some(last_step)) = (row.first_step, row.last_step) else {
            return Ok(None);
        };
        let tail_count = tail_len(row.count);
        let tail_mean_loss = select_tail_mean(&mut *tx, run_id, tail_count).await?;
        tx.commit().await?;
        Ok(Some(MetricSummary {
            count: row.count,
            first_step,
            last_step,
            first_loss: row.first_loss.unwrap_or(f64::NAN),
            last_loss: row.last_loss.unwrap_or(f64::NAN),
            min_loss: row.min_loss,
            tail_mean_loss,
            tail_count,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kth_row_counts_back_from_the_last() {
        let kept = |n, m| every_kth_from_last(n, m).collect::<Vec<_>>();
        assert_eq!(kept(10, 4), [0, 3, 6, 9]);
        assert_eq!(kept(10, 3), [1, 5, 9]);
        assert_eq!(kept(10, 1), [9]);
        assert_eq!(kept(10, 10), (0..10).collect::<Vec<_>>());
        assert_eq!(kept(3, 1000), [0, 1, 2]);
        assert!(kept(0, 5).is_empty());
        for (n, m) in [(100_000, 1000), (999, 7), (1001, 1000)] {
            let got = kept(n, m);
            assert!(
                got.len() <= m && got.len() * 2 > m.min(n),
                "{n} {m}: {}",
                got.len()
            );
            assert_eq!(got.last(), Some(&(n - 1)));
        }
    }

    fn point(step: i64, loss: f64) -> MetricPoint {
        MetricPoint {
            step,
            loss,
            learning_rate: 3e-4,
            grad_norm: None,
            images_per_sec: None,
            recorded_at: DateTime::from_timestamp_millis(1_700_000_000_000).unwrap(),
            loss_smoothed: None,
            loss_by_timestep: [None; 4],
        }
    }

    #[test]
    fn dedup_keeps_the_last_row_of_a_step_and_sorts() {
        let rows = [point(3, 1.0), point(1, 2.0), point(3, 4.0), point(2, 5.0)];
        let steps_losses: Vec<_> = dedup_by_step(&rows)
            .iter()
            .map(|p| (p.step, p.loss))
            .collect();
        assert_eq!(steps_losses, [(1, 2.0), (2, 5.0), (3, 4.0)]);
    }

    #[test]
    fn upsert_sql_numbers_every_parameter() {
        let sql = upsert_sql(2);
        assert!(sql.contains(
            "($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12), \
             ($13, $14, $15, $16, $17, $18, $19, $20, $21, $22, $23, $24)"
        ));
        assert!(!sql.contains("$25"));
        // As many columns as parameters per row.
        let columns = sql[sql.find('(').unwrap() + 1..sql.find(')').unwrap()]
            .split(',')
            .count();
        assert_eq!(columns, PARAMS_PER_ROW);
    }

    #[test]
    fn tail_is_a_tenth_rounded_up_and_never_empty() {
        assert_eq!(tail_len(1), 1);
        assert_eq!(tail_len(10), 1);
        assert_eq!(tail_len(11), 2);
        assert_eq!(tail_len(100), 10);
    }

    #[test]
    fn nan_is_stored_as_null() {
        assert_eq!(finite_or_null(f64::NAN), None);
        assert_eq!(finite_or_null(1.5), Some(1.5));
        assert_eq!(finite_or_null(f64::INFINITY), Some(f64::INFINITY));
    }

    #[test]
    fn nan_survives_json() {
        let json = serde_json::to_string(&point(1, f64::NAN)).unwrap();
        assert!(json.contains(r#""loss":null"#));
        let back: MetricPoint = serde_json::from_str(&json).unwrap();
        assert!(back.loss.is_nan());
        assert_eq!(back.step, 1);
    }

    #[test]
    fn timestep_quarters_travel_as_an_array_with_nulls() {
        let p = MetricPoint {
            loss_smoothed: Some(0.25),
            loss_by_timestep: [Some(0.5), None, Some(f64::NAN), Some(2.0)],
            ..point(1, 1.0)
        };
        let json = serde_json::to_value(p).unwrap();
        assert_eq!(json["loss_smoothed"], 0.25);
        assert_eq!(
            json["loss_by_timestep"],
            serde_json::json!([0.5, null, null, 2.0])
        );
        let back: MetricPoint = serde_json::from_value(json).unwrap();
        assert_eq!(back.loss_by_timestep, [Some(0.5), None, None, Some(2.0)]);
        assert_eq!(back.loss_smoothed, Some(0.25));
    }

    #[test]
    fn json_without_the_newer_fields_reads_as_none() {
        // What a client or cache that predates the two fields holds.
        let json = r#"{"step": 7, "loss": 0.5, "learning_rate": 0.001, "grad_norm": null,
            "images_per_sec": 10.0, "recorded_at": "2023-11-14T22:13:20Z"}"#;
        let p: MetricPoint = serde_json::from_str(json).unwrap();
        assert_eq!((p.step, p.loss), (7, 0.5));
        assert_eq!(p.loss_smoothed, None);
        assert_eq!(p.loss_by_timestep, [None; 4]);
        // Four entries exactly: a short array is an error, not silently padded.
        let short = json.replace(r#""step": 7"#, r#""step": 7, "loss_by_timestep": [1.0]"#);
        assert!(serde_json::from_str::<MetricPoint>(&short).is_err());
    }
}
