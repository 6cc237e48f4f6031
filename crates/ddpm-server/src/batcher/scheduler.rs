//! The queue of requests and which samples step in the next forward pass: a pure state
//! machine, with time and the forward pass's cost passed in.
//!
//! A request is one [`Entry`] from admission to its answer: its place in line (priority,
//! arrival, deadline), its samples' progress and the caller's record `R` (for the server,
//! the model, the reply and stream ends). [`Scheduler::admit`] decides whether a new
//! request fits behind the accepted ones ([`cost::admit`] over the entries themselves);
//! [`Scheduler::enqueue`] adds it. Before every pass [`Scheduler::select`] marks the
//! samples that step in it, the caller steps them, and [`Scheduler::retire`] removes the
//! samples that are done and hands back each request whose samples are all done. A
//! request can be dropped at any time ([`Scheduler::cancel`]). Nothing here knows about
//! tensors or channels: a sample is any [`Work`], a record any `R`.
//!
//! Two policies:
//! - [`Policy::Fifo`]: requests in arrival order, each filling every free slot before the
//!   next gets one (the server's behaviour before cost-based scheduling; kept as the
//!   benchmark's baseline).
//! - [`Policy::Fair`]: shortest remaining work first, with ageing. Requests are ordered by
//!   [`urgency`]: their remaining work in seconds (weighted by priority) minus the time they
//!   have waited, so a long request overtakes newer short ones once it has waited about as
//!   long as it needs. The first request and every request no longer than twice its
//!   remaining steps share the pass round-robin (one sample each, then a second each, ...).
//!   Longer requests fill the rest of the pass only while that keeps the pass within
//!   `stretch` × the time it would take without them: on a GPU, where a bigger batch costs
//!   almost nothing, they fill it; on a CPU, where the pass time grows with the batch, a
//!   10-step request is not slowed 16× by a 1000-step one sharing its passes.

use std::time::Instant;

use serde::Serialize;

use super::cost::{self, urgency, Load, PassTime, Priority, Refusal, Remaining, RequestId};

/// How the pass is shared.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Policy {
    Fifo,
    /// `stretch` ≥ 1: how much longer a pass may take, for the requests due first, so
    /// that longer requests share it.
    Fair {
        stretch: f64,
    },
}

/// What the scheduler needs to know of a sample.
pub trait Work {
    /// Batch rows its next step costs (2 for a guided conditional sample inside its
    /// guidance interval, else 1).
    fn rows(&self) -> usize;
    /// Batch rows of all its steps left: its remaining work.
    fn rows_left(&self) -> usize;
    /// Steps taken and in all.
    fn progress(&self) -> (usize, usize);

    fn steps_left(&self) -> usize {
        let (done, total) = self.progress();
        total.saturating_sub(done)
    }
}

/// How far along a request is: sample-steps taken and in all, and images finished.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Progress {
    pub step: usize,
    pub total: usize,
    pub images_done: usize,
    pub images: usize,
}

#[derive(Debug)]
struct Live<T> {
    index: usize,
    sample: T,
    selected: bool,
}

/// One request, from admission to its answer.
#[derive(Debug)]
pub struct Entry<T, R> {
    id: RequestId,
    priority: Priority,
    arrived: Instant,
    deadline: Instant,
    /// Samples not finished, in request order.
    live: Vec<Live<T>>,
    /// Samples that finished, by index.
    finished: Vec<(usize, T)>,
    total: usize,
    /// The caller's part of the record.
    pub request: R,
}

/// The steps left of `samples` and their batch rows: a request's remaining work.
pub fn remaining<'a, T: Work + 'a>(samples: impl IntoIterator<Item = &'a T>) -> Remaining {
    samples
        .into_iter()
        .map(|s| Remaining {
            steps: s.steps_left() as f64,
            rows: s.rows_left() as f64,
        })
        .sum()
}

impl<T: Work, R> Entry<T, R> {
    pub fn id(&self) -> RequestId {
        self.id
    }

    /// When the request must be answered by.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    fn remaining(&self) -> Remaining {
        remaining(self.live.iter().map(|l| &l.sample))
    }

    /// The request as admission sees it.
    fn load(&self) -> Load {
        Load {
            priority: self.priority,
            arrived: self.arrived,
            deadline: self.deadline,
            work: self.remaining(),
        }
    }

    fn steps_left(&self) -> usize {
        self.live
            .iter()
            .map(|l| l.sample.steps_left())
            .max()
            .unwrap_or(0)
    }
}

/// A request whose samples are all done, in request order, with its record.
#[derive(Debug, PartialEq)]
pub struct Completed<T, R> {
    pub id: RequestId,
    pub samples: Vec<T>,
    pub request: R,
}

/// The requests not yet completed and their samples: the queue.
#[derive(Debug)]
pub struct Scheduler<T, R> {
    max_batch: usize,
    policy: Policy,
    /// Arrival order.
    entries: Vec<Entry<T, R>>,
}

/// Requests no longer than this many times the first one's remaining steps share the pass
/// with it freely: they are about as urgent, and batching them costs them nothing.
const SIMILAR: usize = 2;

impl<T: Work, R> Scheduler<T, R> {
    /// At most `max_batch` (≥ 1) samples step together.
    pub fn new(max_batch: usize, policy: Policy) -> Self {
        Scheduler {
            max_batch: max_batch.max(1),
            policy,
            entries: Vec::new(),
        }
    }

    pub fn policy(&self) -> Policy {
        self.policy
    }

    /// Where a request arriving `now` with this work would stand (0: served first), or why
    /// it is refused: under the fair policy, once `pass` is measured, every accepted
    /// request and the new one must finish by their deadlines at passes
    /// [`cost::ADMISSION_MARGIN`] slower than `pass`. Otherwise it goes behind everything.
    pub fn admit(
        &self,
        priority: Priority,
        work: Remaining,
        now: Instant,
        deadline: Instant,
        pass: Option<&PassTime>,
    ) -> Result<usize, Refusal> {
        let (Policy::Fair { .. }, Some(pass)) = (self.policy, pass) else {
            return Ok(self.entries.len());
        };
        let accepted: Vec<Load> = self.entries.iter().map(Entry::load).collect();
        let new = Load {
            priority,
            arrived: now,
            deadline,
            work,
        };
        cost::admit(
            &accepted,
            &new,
            now,
            &pass.scaled(cost::ADMISSION_MARGIN),
            self.max_batch,
        )
    }

    /// Queues a request with its samples (in request order). An empty request completes at
    /// the next [`retire`](Self::retire).
    pub fn enqueue(
        &mut self,
        id: RequestId,
        samples: Vec<T>,
        priority: Priority,
        now: Instant,
        deadline: Instant,
        request: R,
    ) {
        let total = samples.len();
        self.entries.push(Entry {
            id,
            priority,
            arrived: now,
            deadline,
            request,
            live: samples
                .into_iter()
                .enumerate()
                .map(|(index, sample)| Live {
                    index,
                    sample,
                    selected: false,
                })
                .collect(),
            finished: Vec::with_capacity(total),
            total,
        });
    }

    /// The requests with samples left, most urgent first.
    fn order(&self, now: Instant, pass: &PassTime) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.entries.len())
            .filter(|&i| !self.entries[i].live.is_empty())
            .collect();
        if let Policy::Fair { .. } = self.policy {
            let price = pass.price(self.max_batch);
            let keys: Vec<f64> = self
                .entries
                .iter()
                .map(|e| {
                    let waited = now.saturating_duration_since(e.arrived).as_secs_f64();
                    urgency(e.priority, price.seconds(e.remaining()), waited)
                })
                .collect();
            // Stable: equal keys keep arrival order.
            order.sort_by(|&a, &b| keys[a].total_cmp(&keys[b]));
        }
        order
    }

    /// Marks the samples of the next pass; returns how many.
    pub fn select(&mut self, now: Instant, pass: &PassTime) -> usize {
        let order = self.order(now, pass);
        for entry in &mut self.entries {
            for live in &mut entry.live {
                live.selected = false;
            }
        }
        match self.policy {
            Policy::Fifo => {
                let mut count = 0;
                'fill: for &i in &order {
                    for live in &mut self.entries[i].live {
                        if count == self.max_batch {
                            break 'fill;
                        }
                        live.selected = true;
                        count += 1;
                    }
                }
                count
            }
            Policy::Fair { stretch } => {
                let Some(&head) = order.first() else {
                    return 0;
                };
                let head_left = self.entries[head].steps_left();
                let (core, rest): (Vec<usize>, Vec<usize>) = order
                    .iter()
                    .partition(|&&i| self.entries[i].steps_left() <= SIMILAR * head_left);
                let mut pass_rows = 0;
                let mut count = 0;
                self.round_robin(&core, &mut count, &mut pass_rows, |_| true);
                let budget = stretch.max(1.0) * pass.seconds(pass_rows);
                self.round_robin(&rest, &mut count, &mut pass_rows, |rows| {
                    pass.seconds(rows) <= budget
                });
                count
            }
        }
    }

    /// Selects one more sample of each request in `order` per round while slots remain
    /// and `fits(rows of the pass with it)` holds; stops after a round that adds nothing.
    fn round_robin(
        &mut self,
        order: &[usize],
        count: &mut usize,
        pass_rows: &mut usize,
        fits: impl Fn(usize) -> bool,
    ) {
        for round in 0.. {
            let mut added = false;
            for &i in order {
                if *count == self.max_batch {
                    return;
                }
                let Some(live) = self.entries[i].live.get_mut(round) else {
                    continue;
                };
                let rows = *pass_rows + live.sample.rows();
                if fits(rows) {
                    live.selected = true;
                    *pass_rows = rows;
                    *count += 1;
                    added = true;
                }
            }
            if !added {
                return;
            }
        }
    }

    /// The selected samples' requests and their indices in them, in arrival and request
    /// order.
    pub fn selected(&self) -> Vec<(RequestId, usize)> {
        self.entries
            .iter()
            .flat_map(|e| {
                e.live
                    .iter()
                    .filter(|l| l.selected)
                    .map(move |l| (e.id, l.index))
            })
            .collect()
    }

    /// The selected samples, to step together, with their requests and their indices in
    /// them.
    pub fn selected_mut(&mut self) -> Vec<(RequestId, usize, &mut T)> {
        self.entries
            .iter_mut()
            .flat_map(|e| {
                let id = e.id;
                e.live
                    .iter_mut()
                    .filter(|l| l.selected)
                    .map(move |l| (id, l.index, &mut l.sample))
            })
            .collect()
    }

    /// Removes the samples that are done, calling `finished(request, index, record)` for
    /// each, and returns the requests that are now complete, oldest first.
    pub fn retire(
        &mut self,
        mut finished: impl FnMut(RequestId, usize, &R),
    ) -> Vec<Completed<T, R>> {
        for entry in &mut self.entries {
            let (done, live): (Vec<_>, Vec<_>) = std::mem::take(&mut entry.live)
                .into_iter()
                .partition(|l| l.sample.steps_left() == 0);
            entry.live = live;
            for l in done {
                finished(entry.id, l.index, &entry.request);
                entry.finished.push((l.index, l.sample));
            }
        }
        let mut completed = Vec::new();
        let mut i = 0;
        while i < self.entries.len() {
            if self.entries[i].finished.len() == self.entries[i].total {
                let mut entry = self.entries.remove(i);
                entry.finished.sort_by_key(|(index, _)| *index);
                completed.push(Completed {
                    id: entry.id,
                    samples: entry.finished.into_iter().map(|(_, s)| s).collect(),
                    request: entry.request,
                });
            } else {
                i += 1;
            }
        }
        completed
    }

    /// Drops a request and its samples, handing back its record if it was there.
    pub fn cancel(&mut self, request: RequestId) -> Option<R> {
        let i = self.entries.iter().position(|e| e.id == request)?;
        Some(self.entries.remove(i).request)
    }

    /// The requests not yet completed, in arrival order.
    pub fn requests(&self) -> impl Iterator<Item = &Entry<T, R>> + '_ {
        self.entries.iter()
    }

    /// Each request's id and record, in arrival order.
    pub fn requests_mut(&mut self) -> impl Iterator<Item = (RequestId, &mut R)> + '_ {
        self.entries.iter_mut().map(|e| (e.id, &mut e.request))
    }

    /// A request's record.
    pub fn request(&self, id: RequestId) -> Option<&R> {
        self.entries.iter().find(|e| e.id == id).map(|e| &e.request)
    }

    /// Estimated seconds of accepted work left at full-batch throughput.
    pub fn backlog_seconds(&self, pass: &PassTime) -> f64 {
        let work: Remaining = self.entries.iter().map(Entry::remaining).sum();
        pass.price(self.max_batch).seconds(work)
    }

    pub fn progress(&self, request: RequestId) -> Option<Progress> {
        let e = self.entries.iter().find(|e| e.id == request)?;
        let mut p = Progress {
            images_done: e.finished.len(),
            images: e.total,
            ..Progress::default()
        };
        for (done, total) in e
            .live
            .iter()
            .map(|l| l.sample.progress())
            .chain(e.finished.iter().map(|(_, s)| s.progress()))
        {
            p.step += done;
            p.total += total;
        }
        Some(p)
    }

    /// Samples not selected for the coming pass.
    pub fn waiting_samples(&self) -> usize {
        self.entries
            .iter()
            .flat_map(|e| &e.live)
            .filter(|l| !l.selected)
            .count()
    }

    /// Samples selected for the coming pass.
    pub fn active(&self) -> usize {
        self.entries
            .iter()
            .flat_map(|e| &e.live)
            .filter(|l| l.selected)
            .count()
    }

    pub fn is_idle(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// A deadline far enough away never to matter.
    const HOUR: Duration = Duration::from_secs(3600);

    /// A sample of `total` steps, `done` taken, costing `rows` per step.
    #[derive(Debug, Clone, Copy, PartialEq)]
    struct Fake {
        tag: u32,
        done: usize,
        total: usize,
        rows: usize,
    }

    impl Work for Fake {
        fn rows(&self) -> usize {
            self.rows
        }
        fn rows_left(&self) -> usize {
            self.rows * self.steps_left()
        }
        fn progress(&self) -> (usize, usize) {
            (self.done, self.total)
        }
    }

    fn samples(tag: u32, n: usize, steps: usize) -> Vec<Fake> {
        (0..n)
            .map(|i| Fake {
                tag: tag * 100 + i as u32,
                done: 0,
                total: steps,
                rows: 2,
            })
            .collect()
    }

    /// A CPU-like pass: 4 ms fixed, 1 ms per row (cost grows with the batch, as measured
    /// on the development machine: 32 rows cost ~8× 2 rows).
    const CPU: PassTime = PassTime {
        fixed: 0.004,
        per_row: 0.001,
    };
    /// A GPU-like pass: 10 ms whatever the batch.
    const GPU: PassTime = PassTime {
        fixed: 0.010,
        per_row: 0.0,
    };
    const FAIR: Policy = Policy::Fair { stretch: 1.5 };

    /// One iteration at `now`: select, step every selected sample, retire. Returns the
    /// selected (request, tag) pairs and the completed requests.
    fn iterate(
        set: &mut Scheduler<Fake, ()>,
        now: Instant,
        pass: &PassTime,
    ) -> (Vec<(u64, u32)>, Vec<u64>) {
        set.select(now, pass);
        let mut picked = Vec::new();
        for (id, _, s) in set.selected_mut() {
            s.done += 1;
            picked.push((id, s.tag));
        }
        let done = set.retire(|_, _, _| {}).into_iter().map(|c| c.id).collect();
        (picked, done)
    }

    /// Queues a request due in an hour.
    fn add(set: &mut Scheduler<Fake, ()>, id: u64, s: Vec<Fake>, p: Priority, now: Instant) {
        set.enqueue(id, s, p, now, now + HOUR, ());
    }

    fn requests_in(picked: &[(u64, u32)]) -> Vec<u64> {
        let mut ids: Vec<u64> = picked.iter().map(|p| p.0).collect();
        ids.dedup();
        ids
    }

    #[test]
    fn fifo_fills_every_slot_with_the_oldest_request_first() {
        let now = Instant::now();
        let mut set = Scheduler::new(4, Policy::Fifo);
        add(&mut set, 1, samples(1, 64, 1000), Priority::Normal, now);
        add(&mut set, 2, samples(2, 1, 10), Priority::High, now);
        let (picked, _) = iterate(&mut set, now, &CPU);
        assert_eq!(picked.len(), 4);
        assert_eq!(requests_in(&picked), [1], "FIFO: the short request waits");
    }

    #[test]
    fn a_short_request_behind_a_long_one_runs_at_once_and_nearly_alone_on_a_cpu() {
        let now = Instant::now();
        let mut set = Scheduler::new(16, FAIR);
        add(&mut set, 1, samples(1, 64, 1000), Priority::Normal, now);
        for _ in 0..5 {
            let (picked, _) = iterate(&mut set, now, &CPU);
            assert_eq!(picked.len(), 16, "alone, the long request fills the pass");
        }
        let later = now + Duration::from_secs(1);
        add(&mut set, 2, samples(2, 1, 10), Priority::Normal, later);
        let mut passes = 0;
        loop {
            let (picked, done) = iterate(&mut set, later, &CPU);
            passes += 1;
            assert!(
                picked.contains(&(2, 200)),
                "pass {passes}: the short sample waits"
            );
            // 2 rows alone take 6 ms; the stretch 1.5 allows 9 ms: one more sample.
            let rows: usize = picked.len() * 2;
            assert!(
                CPU.seconds(rows) <= 1.5 * CPU.seconds(2) + 1e-12,
                "{rows} rows"
            );
            assert!(
                picked.iter().any(|p| p.0 == 1),
                "the long request is not starved"
            );
            if done.contains(&2) {
                break;
            }
        }
        assert_eq!(passes, 10, "the short request finished in its own 10 steps");
        let (picked, _) = iterate(&mut set, later, &CPU);
        assert_eq!(picked.len(), 16, "the long request takes the pass back");
    }

    #[test]
    fn on_a_gpu_the_long_request_fills_the_rest_of_the_pass() {
        let now = Instant::now();
        let mut set = Scheduler::new(16, FAIR);
        add(&mut set, 1, samples(1, 64, 1000), Priority::Normal, now);
        add(&mut set, 2, samples(2, 1, 10), Priority::Normal, now);
        let (picked, _) = iterate(&mut set, now, &GPU);
        assert_eq!(picked.len(), 16);
        assert_eq!(picked[0], (1, 100), "arrival order within the pass");
        assert!(picked.contains(&(2, 200)));
    }

    #[test]
    fn similar_requests_share_the_pass_round_robin() {
        let now = Instant::now();
        let mut set = Scheduler::new(4, FAIR);
        add(&mut set, 1, samples(1, 8, 20), Priority::Normal, now);
        add(&mut set, 2, samples(2, 8, 20), Priority::Normal, now);
        add(&mut set, 3, samples(3, 1, 20), Priority::Normal, now);
        let (picked, _) = iterate(&mut set, now, &CPU);
        let mut per_request = [0; 4];
        for (id, _) in &picked {
            per_request[*id as usize] += 1;
        }
        assert_eq!(picked.len(), 4, "equal requests batch fully, even on a CPU");
        assert_eq!(per_request[3], 1, "no request holds the pass: {picked:?}");
        assert!(per_request[1] >= 1 && per_request[2] >= 1, "{picked:?}");
    }

    #[test]
    fn a_long_request_that_waited_long_enough_goes_first() {
        // 2 samples × 2 rows × 100 steps = 400 row-steps: 0.4 s at 1 ms per row.
        let pass = PassTime {
            fixed: 0.0,
            per_row: 0.001,
        };
        for (waited, first) in [(0.1, 3), (1.0, 1)] {
            let now = Instant::now();
            let mut set = Scheduler::new(2, FAIR);
            add(&mut set, 1, samples(1, 2, 100), Priority::Normal, now);
            let later = now + Duration::from_secs_f64(waited);
            add(&mut set, 3, samples(3, 2, 10), Priority::Normal, later);
            let (picked, _) = iterate(&mut set, later, &pass);
            assert_eq!(picked[0].0, first, "after {waited} s: {picked:?}");
        }
    }

    #[test]
    fn priority_weighs_remaining_work() {
        let now = Instant::now();
        let pass = PassTime {
            fixed: 0.0,
            per_row: 0.001,
        };
        let mut set = Scheduler::new(1, FAIR);
        add(&mut set, 1, samples(1, 1, 10), Priority::Low, now);
        add(&mut set, 2, samples(2, 1, 30), Priority::High, now);
        let (picked, _) = iterate(&mut set, now, &pass);
        assert_eq!(
            picked,
            [(2, 200)],
            "a high request 3× longer than a low one goes first"
        );
    }

    #[test]
    fn samples_come_back_in_request_order_and_are_reported_as_they_finish() {
        let now = Instant::now();
        let mut set = Scheduler::new(2, FAIR);
        let mut s = samples(7, 3, 0);
        for (sample, steps) in s.iter_mut().zip([3, 1, 2]) {
            sample.total = steps;
        }
        add(&mut set, 7, s, Priority::Normal, now);
        let mut finished_order = Vec::new();
        let mut completed = Vec::new();
        while !set.is_idle() {
            set.select(now, &CPU);
            for (_, _, s) in set.selected_mut() {
                s.done += 1;
            }
            completed.extend(set.retire(|_, index, _| finished_order.push(index)));
        }
        assert_eq!(finished_order, [1, 0, 2]);
        assert_eq!(completed.len(), 1);
        assert_eq!(
            completed[0]
                .samples
                .iter()
                .map(|s| s.tag)
                .collect::<Vec<_>>(),
            [700, 701, 702]
        );
    }

    #[test]
    fn progress_counts_sample_steps_and_finished_images() {
        let now = Instant::now();
        let mut set = Scheduler::new(1, FAIR);
        add(&mut set, 1, samples(1, 2, 3), Priority::Normal, now);
        for _ in 0..4 {
            iterate(&mut set, now, &CPU);
        }
        let p = set.progress(1).unwrap();
        assert_eq!((p.step, p.total, p.images_done, p.images), (4, 6, 1, 2));
        assert_eq!(set.progress(9), None);
    }

    #[test]
    fn cancellation_frees_the_slots_at_the_next_selection() {
        let now = Instant::now();
        let mut set = Scheduler::new(2, FAIR);
        add(&mut set, 1, samples(1, 3, 5), Priority::Normal, now);
        add(&mut set, 2, samples(2, 1, 5), Priority::Normal, now);
        set.select(now, &CPU);
        assert!(set.cancel(1).is_some());
        assert!(set.cancel(1).is_none());
        assert_eq!(set.select(now, &CPU), 1);
        assert_eq!(set.selected_mut()[0].0, 2);
        assert_eq!(set.requests().map(Entry::id).collect::<Vec<_>>(), [2]);
        assert_eq!(set.waiting_samples(), 0);
    }

    #[test]
    fn admission_weighs_the_queued_requests_remaining_work() {
        // 1 ms per row: a request of 1 sample × 2 rows × 1000 steps is 2 s of work.
        let pass = PassTime {
            fixed: 0.0,
            per_row: 0.001,
        };
        let now = Instant::now();
        let ten_s = now + Duration::from_secs(10);
        let mut set = Scheduler::new(4, FAIR);
        set.enqueue(1, samples(1, 4, 1000), Priority::Normal, now, ten_s, ());
        // 8 s queued (10 s with the margin): a 2 s request due in 10 s is refused, but
        // not as too costly, and not before anything is measured.
        let (work, late) = (remaining(&samples(9, 1, 1000)), ten_s);
        assert!(matches!(
            set.admit(Priority::Normal, work, now, late, Some(&pass)),
            Err(Refusal::Busy { .. })
        ));
        assert_eq!(set.admit(Priority::Normal, work, now, late, None), Ok(1));
        // Once the queued request has stepped half way, there is room ((4 + 2 s) × 1.25).
        for _ in 0..500 {
            iterate(&mut set, now, &pass);
        }
        assert!((set.backlog_seconds(&pass) - 4.0).abs() < 1e-9);
        assert_eq!(
            set.admit(Priority::Normal, work, now, late, Some(&pass)),
            Ok(0)
        );
        let fifo: Scheduler<Fake, ()> = Scheduler::new(1, Policy::Fifo);
        assert_eq!(
            fifo.admit(Priority::High, work, now, late, Some(&pass)),
            Ok(0)
        );
    }

    #[test]
    fn an_empty_request_completes_at_once() {
        let now = Instant::now();
        let mut set: Scheduler<Fake, ()> = Scheduler::new(2, FAIR);
        add(&mut set, 3, Vec::new(), Priority::Normal, now);
        let done = set.retire(|_, _, _| {});
        assert_eq!(
            done,
            [Completed {
                id: 3,
                samples: vec![],
                request: ()
            }]
        );
        assert!(set.is_idle());
    }

    #[test]
    fn a_batch_of_one_still_finishes_everything() {
        for policy in [Policy::Fifo, FAIR] {
            let now = Instant::now();
            let mut set = Scheduler::new(1, policy);
            add(&mut set, 1, samples(1, 1, 2), Priority::Normal, now);
            add(&mut set, 2, samples(2, 1, 1), Priority::Normal, now);
            let mut passes = 0;
            let mut order = Vec::new();
            while !set.is_idle() {
                let (picked, done) = iterate(&mut set, now, &CPU);
                assert_eq!(picked.len(), 1);
                passes += 1;
                order.extend(done);
            }
            assert_eq!(passes, 3);
            let expected: &[u64] = if policy == Policy::Fifo {
                &[1, 2]
            } else {
                &[2, 1]
            };
            assert_eq!(order, expected, "{policy:?}");
        }
    }
}
