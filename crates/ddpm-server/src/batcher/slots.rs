//! Batch formation as a pure state machine: which samples occupy the forward pass's slots.
//!
//! Requests wait in FIFO order; each iteration [`SlotSet::admit`] moves waiting samples into
//! free slots (a request may be admitted partly, its remaining samples at later iterations),
//! the caller steps every active sample once, and [`SlotSet::retire`] removes the samples
//! that are done and hands back each request whose samples are all done. A request can be
//! dropped at any time ([`SlotSet::cancel`]). Nothing here knows about tensors: a sample is
//! any `T`, and "done" is a predicate the caller supplies.

use std::collections::VecDeque;

/// Identifies a request inside the worker.
pub type RequestId = u64;

/// A request's samples, in request order, with the slots they occupy.
#[derive(Debug)]
struct Entry<T> {
    id: RequestId,
    /// Samples not yet admitted: (index in the request, sample).
    waiting: VecDeque<(usize, T)>,
    /// Samples that finished, by index.
    finished: Vec<(usize, T)>,
    /// How many samples the request has in all.
    total: usize,
}

/// An active sample: which request it belongs to and where it sits in it.
#[derive(Debug)]
pub struct Slot<T> {
    pub request: RequestId,
    pub index: usize,
    pub sample: T,
}

/// A request whose samples are all done, in request order.
#[derive(Debug, PartialEq)]
pub struct Completed<T> {
    pub request: RequestId,
    pub samples: Vec<T>,
}

/// The waiting requests and the active slots.
#[derive(Debug)]
pub struct SlotSet<T> {
    max_batch: usize,
    /// Requests not yet completed, oldest first (admission order).
    entries: Vec<Entry<T>>,
    active: Vec<Slot<T>>,
}

impl<T> SlotSet<T> {
    /// At most `max_batch` (≥ 1) samples are active at once.
    pub fn new(max_batch: usize) -> Self {
        SlotSet {
            max_batch: max_batch.max(1),
            entries: Vec::new(),
            active: Vec::new(),
        }
    }

    /// Queues a request with its samples (in request order). An empty request completes at
    /// the next [`retire`](Self::retire).
    pub fn enqueue(&mut self, request: RequestId, samples: Vec<T>) {
        let total = samples.len();
        self.entries.push(Entry {
            id: request,
            waiting: samples.into_iter().enumerate().collect(),
            finished: Vec::with_capacity(total),
            total,
        });
    }

    /// Moves waiting samples, oldest request first, into the free slots; returns how many
    /// were admitted.
    pub fn admit(&mut self) -> usize {
        let mut admitted = 0;
        for entry in &mut self.entries {
            while self.active.len() < self.max_batch {
                let Some((index, sample)) = entry.waiting.pop_front() else {
                    break;
                };
                self.active.push(Slot {
                    request: entry.id,
                    index,
                    sample,
                });
                admitted += 1;
            }
            if self.active.len() >= self.max_batch {
                break;
            }
        }
        admitted
    }

    /// The active samples, to step together.
    pub fn active_mut(&mut self) -> &mut [Slot<T>] {
        &mut self.active
    }

    pub fn active(&self) -> &[Slot<T>] {
        &self.active
    }

    /// Removes the active samples for which `done` holds and returns the requests that are
    /// now complete, oldest first.
    pub fn retire(&mut self, mut done: impl FnMut(&T) -> bool) -> Vec<Completed<T>> {
        let mut still = Vec::with_capacity(self.active.len());
        for slot in self.active.drain(..) {
            if done(&slot.sample) {
                if let Some(entry) = self.entries.iter_mut().find(|e| e.id == slot.request) {
                    entry.finished.push((slot.index, slot.sample));
                }
            } else {
                still.push(slot);
            }
        }
        self.active = still;
        let mut completed = Vec::new();
        let mut i = 0;
        while i < self.entries.len() {
            if self.entries[i].finished.len() == self.entries[i].total {
                let mut entry = self.entries.remove(i);
                entry.finished.sort_by_key(|(index, _)| *index);
                completed.push(Completed {
                    request: entry.id,
                    samples: entry.finished.into_iter().map(|(_, s)| s).collect(),
                });
            } else {
                i += 1;
            }
        }
        completed
    }

    /// Drops a request: its waiting, active and finished samples. Returns whether it was
    /// there.
    pub fn cancel(&mut self, request: RequestId) -> bool {
        let before = self.entries.len();
        self.entries.retain(|e| e.id != request);
        self.active.retain(|s| s.request != request);
        self.entries.len() != before
    }

    /// The requests not yet completed, oldest first.
    pub fn requests(&self) -> impl Iterator<Item = RequestId> + '_ {
        self.entries.iter().map(|e| e.id)
    }

    /// Samples waiting for a slot.
    pub fn waiting_samples(&self) -> usize {
        self.entries.iter().map(|e| e.waiting.len()).sum()
    }

    pub fn is_idle(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sample that needs `left` more steps, tagged to tell samples apart.
    #[derive(Debug, Clone, Copy, PartialEq)]
    struct Fake {
        tag: u32,
        left: u32,
    }

    fn samples(tag: u32, steps: &[u32]) -> Vec<Fake> {
        steps
            .iter()
            .enumerate()
            .map(|(i, &left)| Fake {
                tag: tag * 100 + i as u32,
                left,
            })
            .collect()
    }

    /// One iteration: admit, step every active sample, retire.
    fn iterate(set: &mut SlotSet<Fake>) -> (usize, Vec<Completed<Fake>>) {
        set.admit();
        let batch = set.active().len();
        for slot in set.active_mut() {
            slot.sample.left -= 1;
        }
        (batch, set.retire(|s| s.left == 0))
    }

    #[test]
    fn admission_fills_free_slots_in_fifo_order_and_splits_requests() {
        let mut set = SlotSet::new(4);
        set.enqueue(1, samples(1, &[5, 5, 5]));
        set.enqueue(2, samples(2, &[5, 5, 5]));
        assert_eq!(set.admit(), 4);
        let active: Vec<(u64, usize)> = set.active().iter().map(|s| (s.request, s.index)).collect();
        assert_eq!(active, [(1, 0), (1, 1), (1, 2), (2, 0)]);
        assert_eq!(set.waiting_samples(), 2);
        assert_eq!(set.admit(), 0, "no free slot");
    }

    #[test]
    fn a_short_request_joins_mid_way_and_finishes_first() {
        let mut set = SlotSet::new(4);
        set.enqueue(1, samples(1, &[10]));
        for _ in 0..3 {
            let (batch, done) = iterate(&mut set);
            assert_eq!(batch, 1);
            assert!(done.is_empty());
        }
        set.enqueue(2, samples(2, &[2, 2]));
        let (batch, done) = iterate(&mut set);
        assert_eq!(batch, 3, "the new request shares the very next pass");
        assert!(done.is_empty());
        let (_, done) = iterate(&mut set);
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].request, 2);
        assert_eq!(
            done[0].samples.iter().map(|s| s.tag).collect::<Vec<_>>(),
            [200, 201]
        );
        let mut rest = Vec::new();
        while !set.is_idle() {
            rest.extend(iterate(&mut set).1);
        }
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].request, 1);
    }

    #[test]
    fn samples_come_back_in_request_order_whatever_order_they_finish_in() {
        let mut set = SlotSet::new(2);
        set.enqueue(7, samples(7, &[3, 1, 2]));
        let mut done = Vec::new();
        while !set.is_idle() {
            done.extend(iterate(&mut set).1);
        }
        assert_eq!(done.len(), 1);
        assert_eq!(
            done[0].samples.iter().map(|s| s.tag).collect::<Vec<_>>(),
            [700, 701, 702]
        );
    }

    #[test]
    fn retired_slots_are_refilled_at_the_next_admission() {
        let mut set = SlotSet::new(2);
        set.enqueue(1, samples(1, &[1, 3]));
        set.enqueue(2, samples(2, &[1]));
        let (batch, done) = iterate(&mut set);
        assert_eq!(batch, 2);
        assert!(done.is_empty(), "request 1 has a sample left");
        let (batch, done) = iterate(&mut set);
        assert_eq!(batch, 2, "request 2 took the freed slot");
        assert_eq!(done.iter().map(|c| c.request).collect::<Vec<_>>(), [2]);
        assert_eq!(set.active().len(), 1);
    }

    #[test]
    fn cancellation_frees_slots_and_waiting_samples() {
        let mut set = SlotSet::new(2);
        set.enqueue(1, samples(1, &[5, 5, 5]));
        set.enqueue(2, samples(2, &[5]));
        set.admit();
        assert!(set.cancel(1));
        assert!(!set.cancel(1));
        assert_eq!(set.active().len(), 0);
        assert_eq!(set.waiting_samples(), 1);
        assert_eq!(set.admit(), 1);
        assert_eq!(set.active()[0].request, 2);
        assert_eq!(set.requests().collect::<Vec<_>>(), [2]);
    }

    #[test]
    fn batch_of_one_serves_requests_one_sample_at_a_time() {
        let mut set = SlotSet::new(1);
        set.enqueue(1, samples(1, &[2]));
        set.enqueue(2, samples(2, &[1]));
        let mut order = Vec::new();
        let mut passes = 0;
        while !set.is_idle() {
            let (batch, done) = iterate(&mut set);
            assert_eq!(batch, 1);
            passes += 1;
            order.extend(done.into_iter().map(|c| c.request));
        }
        assert_eq!(order, [1, 2]);
        assert_eq!(passes, 3);
    }

    #[test]
    fn an_empty_request_completes_at_once() {
        let mut set: SlotSet<Fake> = SlotSet::new(2);
        set.enqueue(3, Vec::new());
        let done = set.retire(|_| true);
        assert_eq!(
            done,
            [Completed {
                request: 3,
                samples: vec![]
            }]
        );
        assert!(set.is_idle());
    }
}
