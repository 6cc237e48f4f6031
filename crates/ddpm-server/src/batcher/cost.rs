//! What work costs, the order it is served in, and whether it can be accepted: pure
//! functions of measured pass times. A leaf: the scheduler builds on it, never the reverse.
//!
//! [`PassTimes`] keeps a moving linear fit of a forward pass's seconds against its batch
//! rows, t(r) = fixed + per_row·r, from the passes the model thread runs (anchored by two
//! calibration passes per model, so that a stream of equal batches leaves the slope
//! defined). A request's cost is its [`Remaining`] work, its samples' steps left and the
//! batch rows of those steps (a guided conditional sample is 2 rows at a step inside its
//! guidance interval, 1 outside), priced at full-batch throughput ([`Price`]): a pass of
//! `max_batch` samples shares the fixed cost, every row pays its own. Its place in line is
//! its [`urgency`]. [`admit`] predicts, in the order the scheduler serves requests, when
//! each accepted request and the new one would finish at that throughput, and accepts the
//! new one only if every request still meets its deadline.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Identifies a request inside the batcher.
pub type RequestId = u64;

/// A request's claim on the model. Its weight multiplies the request's remaining work when
/// requests are ordered, so a `high` request counts as 4× shorter and a `low` one as 4×
/// longer; ageing still lets every request through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    Low,
    #[default]
    Normal,
    High,
}

impl Priority {
    pub fn weight(self) -> f64 {
        match self {
            Priority::Low => 4.0,
            Priority::Normal => 1.0,
            Priority::High => 0.25,
        }
    }
}

/// A request's place in line: smaller goes first. Its remaining work in seconds, weighted
/// by priority, minus the seconds it has waited.
pub fn urgency(priority: Priority, work_seconds: f64, waited_seconds: f64) -> f64 {
    priority.weight() * work_seconds - waited_seconds
}

/// Work left: sample-steps, and the batch rows of those steps.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Remaining {
    pub steps: f64,
    pub rows: f64,
}

impl std::ops::Add for Remaining {
    type Output = Remaining;

    fn add(self, other: Remaining) -> Remaining {
        Remaining {
            steps: self.steps + other.steps,
            rows: self.rows + other.rows,
        }
    }
}

impl std::iter::Sum for Remaining {
    fn sum<I: Iterator<Item = Remaining>>(iter: I) -> Remaining {
        iter.fold(Remaining::default(), |a, b| a + b)
    }
}

/// What work costs at full-batch throughput, for ordering and admission alike: a pass of
/// `max_batch` samples costs `fixed + per_row · rows`, so each sample-step pays a
/// `max_batch`-th of the fixed cost and each row its own.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Price {
    pub step: f64,
    pub row: f64,
}

impl Price {
    pub fn seconds(&self, work: Remaining) -> f64 {
        work.steps * self.step + work.rows * self.row
    }
}

/// Admission plans on forward passes this much slower than measured: the estimate lags a
/// device that slows down, and accepted work must not time out.
pub const ADMISSION_MARGIN: f64 = 1.25;

/// Seconds of one forward pass of `rows` batch rows: `fixed + per_row · rows`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PassTime {
    pub fixed: f64,
    pub per_row: f64,
}

impl PassTime {
    /// Before anything is measured: a pass costs the same whatever its size (so nothing
    /// is refused and every sample may share the pass).
    pub const UNMEASURED: PassTime = PassTime {
        fixed: 1e-3,
        per_row: 0.0,
    };

    /// Every pass `factor` times slower.
    pub fn scaled(&self, factor: f64) -> PassTime {
        PassTime {
            fixed: self.fixed * factor,
            per_row: self.per_row * factor,
        }
    }

    pub fn seconds(&self, rows: usize) -> f64 {
        self.fixed + self.per_row * rows as f64
    }

    /// The price of work in passes of `max_batch` samples.
    pub fn price(&self, max_batch: usize) -> Price {
        Price {
            step: self.fixed / max_batch.max(1) as f64,
            row: self.per_row,
        }
    }
}

/// How much one observation weighs against the past: a moving window of about 1/(1−DECAY)
/// passes (50).
const DECAY: f64 = 0.98;

/// A moving weighted least-squares fit of pass seconds against rows.
#[derive(Debug, Clone, Default)]
pub struct PassTimes {
    /// Calibration points: they stay in the fit (weight 1 each) so that it always has
    /// two distinct sizes.
    anchors: Vec<(f64, f64)>,
    /// Decayed sums of w, w·r, w·r², w·t, w·r·t over observed passes.
    sums: [f64; 5],
}

impl PassTimes {
    /// Starts a fit from calibration passes `(rows, seconds)`; observations fade in.
    pub fn calibrated(anchors: &[(usize, f64)]) -> PassTimes {
        PassTimes {
            anchors: anchors.iter().map(|&(r, t)| (r as f64, t)).collect(),
            sums: [0.0; 5],
        }
    }

    pub fn is_calibrated(&self) -> bool {
        !self.anchors.is_empty()
    }

    pub fn observe(&mut self, rows: usize, seconds: f64) {
        if !seconds.is_finite() || seconds < 0.0 {
            return;
        }
        let r = rows as f64;
        for (sum, add) in self
            .sums
            .iter_mut()
            .zip([1.0, r, r * r, seconds, r * seconds])
        {
            *sum = *sum * DECAY + add;
        }
    }

    /// The current estimate ([`PassTime::UNMEASURED`] before any calibration or pass).
    pub fn estimate(&self) -> PassTime {
        let [mut w, mut wr, mut wrr, mut wt, mut wrt] = self.sums;
        for &(r, t) in &self.anchors {
            w += 1.0;
            wr += r;
            wrr += r * r;
            wt += t;
            wrt += r * t;
        }
        if w == 0.0 {
            return PassTime::UNMEASURED;
        }
        let det = w * wrr - wr * wr;
        // All at one size: no slope to be had; count the time as fixed (the benign case).
        if det.abs() < 1e-9 * w * wrr.max(1.0) {
            return PassTime {
                fixed: wt / w,
                per_row: 0.0,
            };
        }
        let per_row = ((w * wrt - wr * wt) / det).max(0.0);
        let fixed = ((wt - per_row * wr) / w).max(0.0);
        PassTime { fixed, per_row }
    }
}

/// A request as admission sees it: a view the queue computes from its own record when it
/// admits, never stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Load {
    pub priority: Priority,
    pub arrived: Instant,
    pub deadline: Instant,
    pub work: Remaining,
}

/// Why a request is refused.
#[derive(Debug, Clone, PartialEq)]
pub enum Refusal {
    /// The backlog would make it, or a request already accepted, miss its deadline; it
    /// would fit after `retry_after`.
    Busy { retry_after: Duration },
    /// It would miss its deadline even on an idle server.
    TooCostly { needs: Duration },
}

/// Where `new` would stand, 0 = first, if it fits: every accepted request in `accepted`
/// and `new` finish by their deadlines when served in the scheduler's order at
/// full-batch throughput (passes of `max_batch` samples). Otherwise, how long to wait.
pub fn admit(
    accepted: &[Load],
    new: &Load,
    now: Instant,
    pass: &PassTime,
    max_batch: usize,
) -> Result<usize, Refusal> {
    let price = pass.price(max_batch);
    let alone = price.seconds(new.work);
    let timeout = new.deadline.saturating_duration_since(now).as_secs_f64();
    if alone > timeout {
        return Err(Refusal::TooCostly {
            needs: Duration::from_secs_f64(alone),
        });
    }
    let key = |b: &Load| {
        let waited = now.saturating_duration_since(b.arrived).as_secs_f64();
        urgency(b.priority, price.seconds(b.work), waited)
    };
    // Stable: equal keys keep arrival order, the new request last.
    let mut line: Vec<(bool, &Load)> = accepted
        .iter()
        .map(|b| (false, b))
        .chain([(true, new)])
        .collect();
    line.sort_by(|a, b| key(a.1).total_cmp(&key(b.1)));
    let mut ahead = 0.0;
    let mut retry_after: f64 = 0.0;
    let mut position = None;
    for (i, &(is_new, b)) in line.iter().enumerate() {
        ahead += price.seconds(b.work);
        let left = b.deadline.saturating_duration_since(now).as_secs_f64();
        if is_new {
            position = Some(i);
            // Waiting d seconds takes d seconds of work off what is ahead of it.
            retry_after = retry_after.max(ahead - left);
        } else if position.is_some() && ahead > left && ahead - alone <= left {
            // The new request would push this accepted one past its deadline: it fits
            // once that one is done (an upper bound: ageing may let it in sooner).
            retry_after = retry_after.max(ahead - alone);
        }
        // A request late even without the new one is not the new one's doing.
    }
    if retry_after > 0.0 {
        return Err(Refusal::Busy {
            retry_after: Duration::from_secs_f64(retry_after),
        });
    }
    Ok(position.unwrap_or(line.len() - 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fit(points: &[(usize, f64)]) -> PassTime {
        let mut times = PassTimes::default();
        for &(r, t) in points {
            times.observe(r, t);
        }
        times.estimate()
    }

    #[test]
    fn the_fit_recovers_a_line_and_survives_one_size() {
        let t = fit(&[(2, 0.006), (32, 0.036), (8, 0.012)]);
        assert!((t.fixed - 0.004).abs() < 1e-9, "{t:?}");
        assert!((t.per_row - 0.001).abs() < 1e-9, "{t:?}");
        assert_eq!(PassTimes::default().estimate(), PassTime::UNMEASURED);
        // Only full batches observed: the calibration keeps the slope.
        let mut times = PassTimes::calibrated(&[(2, 0.006), (32, 0.036)]);
        for _ in 0..500 {
            times.observe(32, 0.036);
        }
        let t = times.estimate();
        assert!((t.per_row - 0.001).abs() < 1e-6, "{t:?}");
        // Without calibration one size is all fixed cost.
        let t = fit(&[(32, 0.036), (32, 0.036)]);
        assert_eq!(t.per_row, 0.0);
        assert!((t.fixed - 0.036).abs() < 1e-12);
    }

    #[test]
    fn the_fit_follows_a_slower_device() {
        let mut times = PassTimes::calibrated(&[(2, 0.006), (32, 0.036)]);
        for i in 0..300 {
            times.observe(
                if i % 2 == 0 { 2 } else { 32 },
                if i % 2 == 0 { 0.012 } else { 0.072 },
            );
        }
        let t = times.estimate();
        assert!((t.seconds(32) - 0.072).abs() < 0.002, "{t:?}");
    }

    #[test]
    fn a_sample_step_pays_its_share_of_the_pass_and_each_row_its_own() {
        // 16 ms fixed, 1 ms per row: a full pass of 16 guided samples (32 rows) takes
        // 48 ms, one of 16 unguided samples (16 rows) 32 ms.
        let pass = PassTime {
            fixed: 0.016,
            per_row: 0.001,
        };
        let price = pass.price(16);
        let guided = Remaining {
            steps: 16.0,
            rows: 32.0,
        };
        let unguided = Remaining {
            steps: 16.0,
            rows: 16.0,
        };
        assert!((price.seconds(guided) - pass.seconds(32)).abs() < 1e-12);
        assert!((price.seconds(unguided) - pass.seconds(16)).abs() < 1e-12);
        // Half a pass of each is one full pass of mixed rows.
        let mixed = Remaining {
            steps: 16.0,
            rows: 24.0,
        };
        assert!((price.seconds(mixed) - pass.seconds(24)).abs() < 1e-12);
    }

    /// 1 ms per row, nothing fixed: 1000 row-steps take 1 s.
    const PASS: PassTime = PassTime {
        fixed: 0.0,
        per_row: 0.001,
    };

    /// Guided work: 2 rows per sample-step.
    fn load(now: Instant, rows: f64, timeout: f64) -> Load {
        Load {
            priority: Priority::Normal,
            arrived: now,
            deadline: now + Duration::from_secs_f64(timeout),
            work: Remaining {
                steps: rows / 2.0,
                rows,
            },
        }
    }

    #[test]
    fn work_that_fits_is_admitted_with_its_place_in_line() {
        let now = Instant::now();
        let long = load(now, 50_000.0, 120.0);
        let short = load(now, 20.0, 120.0);
        assert_eq!(
            admit(std::slice::from_ref(&long), &short, now, &PASS, 16),
            Ok(0)
        );
        let another_long = load(now, 50_000.0, 120.0);
        assert_eq!(admit(&[long, short], &another_long, now, &PASS, 16), Ok(2));
    }

    #[test]
    fn a_backlog_past_the_deadline_is_refused_with_the_wait_it_implies() {
        let now = Instant::now();
        // 100 s of work accepted 90 s ago (30 s left of its 120): a new 100 s request
        // goes behind it (ageing) and would finish at 130 s, 10 s late.
        let backlog = Load {
            arrived: now - Duration::from_secs(90),
            deadline: now + Duration::from_secs(30),
            ..load(now, 30_000.0, 0.0)
        };
        let new = load(now, 100_000.0, 120.0);
        match admit(std::slice::from_ref(&backlog), &new, now, &PASS, 16) {
            Err(Refusal::Busy { retry_after }) => {
                assert!(
                    (retry_after.as_secs_f64() - 10.0).abs() < 1e-6,
                    "{retry_after:?}"
                )
            }
            other => panic!("{other:?}"),
        }
        // A shorter new request goes first; it must not make an accepted one late.
        let old = Load {
            arrived: now - Duration::from_secs(5),
            deadline: now + Duration::from_secs(115),
            ..load(now, 110_000.0, 0.0)
        };
        let short = load(now, 10_000.0, 120.0);
        match admit(&[old], &short, now, &PASS, 16) {
            Err(Refusal::Busy { retry_after }) => {
                // It fits once the accepted request is done, 110 s from now.
                assert!(
                    (retry_after.as_secs_f64() - 110.0).abs() < 1e-6,
                    "{retry_after:?}"
                )
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_short_request_may_not_push_an_accepted_one_past_its_deadline() {
        let now = Instant::now();
        // 119.99 s of 120: no room for even 1 s ahead of it.
        let tight = load(now, 119_990.0, 120.0);
        let short = load(now, 1_000.0, 120.0);
        match admit(&[tight], &short, now, &PASS, 16) {
            Err(Refusal::Busy { retry_after }) => {
                // The tight request leaves the line when it finishes, in ~120 s.
                assert!(
                    (retry_after.as_secs_f64() - 119.99).abs() < 1e-6,
                    "{retry_after:?}"
                )
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn work_that_never_fits_is_too_costly() {
        let now = Instant::now();
        let huge = load(now, 200_000.0, 120.0);
        assert_eq!(
            admit(&[], &huge, now, &PASS, 16),
            Err(Refusal::TooCostly {
                needs: Duration::from_secs(200)
            })
        );
    }
}
