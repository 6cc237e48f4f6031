//! The data loader: batches made on a background thread, their images decoded and
//! augmented in parallel (rayon), a few batches ahead of the training step.
//!
//! The stream is a pure function of (seed, position): epoch e visits the images in a
//! permutation seeded by (seed, e), and sample g of the stream is augmented with an RNG
//! seeded by (seed, g). A loader started at batch k therefore yields exactly what an
//! uninterrupted one yields from batch k on, which is what a resume needs.

use std::{
    ops::Range,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::Duration,
};

use crossbeam_channel::{bounded, Receiver, RecvTimeoutError};
use rand::{seq::SliceRandom, SeedableRng};
use rand_pcg::Pcg64Mcg;
use rayon::prelude::*;

use crate::{
    dataset::{mix, ImageSource},
    error::{Result, TrainerError},
};

/// One batch, ready to become tensors.
#[derive(Debug)]
pub struct Batch {
    /// Position in the stream (0-based).
    pub index: u64,
    /// `[B, 3, S, S]` row-major, values in [−1, 1].
    pub images: Vec<f32>,
    /// `[B]`.
    pub labels: Vec<i64>,
}

/// A running loader; dropping it stops its thread.
pub struct DataLoader {
    rx: Option<Receiver<Result<Batch>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// The epoch's visiting order.
fn permutation(seed: u64, epoch: u64, n: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut Pcg64Mcg::seed_from_u64(mix(seed, epoch ^ 0xDA7A)));
    order
}

/// Makes samples `share` of batch `index` of a stream of `batch_size`-sample batches (a
/// rank's share of the global batch; `0..batch_size` for the whole batch).
pub fn make_batch(
    source: &ImageSource,
    seed: u64,
    batch_size: usize,
    share: Range<usize>,
    index: u64,
    order: &mut (u64, Vec<usize>),
) -> Result<Batch> {
    let n = source.len() as u64;
    let len = source.transform().sample_len();
    // Which image each sample is: the permutations are computed once per epoch.
    let positions: Vec<(u64, usize)> = (share.start as u64..share.end as u64)
        .map(|j| {
            let g = index * batch_size as u64 + j;
            let (epoch, pos) = (g / n, (g % n) as usize);
            if order.0 != epoch || order.1.is_empty() {
                *order = (epoch, permutation(seed, epoch, n as usize));
            }
            (g, order.1[pos])
        })
        .collect();
    let mut images = vec![0f32; positions.len() * len];
    let labels: Vec<Option<i64>> = images
        .par_chunks_mut(len)
        .zip(positions.par_iter())
        .map(|(out, &(g, i))| source.sample(i, mix(seed, g), out))
        .collect();
    let labels = labels
        .into_iter()
        .collect::<Option<Vec<i64>>>()
        .ok_or_else(|| {
            TrainerError::Loader("every image of the dataset failed to decode".into())
        })?;
    Ok(Batch {
        index,
        images,
        labels,
    })
}

impl DataLoader {
    /// Starts producing samples `share` of batches `first_batch, first_batch + 1, …` of
    /// `batch_size` samples each, keeping up to `prefetch` ready.
    pub fn start(
        source: Arc<ImageSource>,
        seed: u64,
        batch_size: usize,
        share: Range<usize>,
        first_batch: u64,
        prefetch: usize,
    ) -> DataLoader {
        let (tx, rx) = bounded(prefetch.max(1));
        let stop = Arc::new(AtomicBool::new(false));
        let stop_flag = stop.clone();
        let span = tracing::Span::current();
        let thread = std::thread::Builder::new()
            .name("ddpm-loader".into())
            .spawn(move || {
                let _span = span.entered();
                let mut order = (u64::MAX, Vec::new());
                let mut index = first_batch;
                while !stop_flag.load(Ordering::Relaxed) {
                    let batch =
                        make_batch(&source, seed, batch_size, share.clone(), index, &mut order);
                    let failed = batch.is_err();
                    if tx.send(batch).is_err() || failed {
                        break;
                    }
                    index += 1;
                }
            });
        match thread {
            Ok(handle) => DataLoader {
                rx: Some(rx),
                stop,
                thread: Some(handle),
            },
            Err(e) => {
                // No thread: the first `next` reports it.
                let (tx, rx) = bounded(1);
                let _ = tx.send(Err(TrainerError::Loader(format!(
                    "cannot start the loader thread: {e}"
                ))));
                DataLoader {
                    rx: Some(rx),
                    stop,
                    thread: None,
                }
            }
        }
    }

    /// The next batch, waiting for it if the loader is behind.
    pub fn next_batch(&self) -> Result<Batch> {
        let rx = self
            .rx
            .as_ref()
            .ok_or_else(|| TrainerError::Loader("stopped".into()))?;
        loop {
            match rx.recv_timeout(Duration::from_secs(60)) {
                Ok(batch) => return batch,
                Err(RecvTimeoutError::Timeout) => {
                    tracing::warn!("the data loader has produced nothing for 60 s");
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(TrainerError::Loader("the loader thread stopped".into()));
                }
            }
        }
    }
}

impl Drop for DataLoader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Dropping the receiver unblocks a producer waiting to send.
        self.rx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataset::{Item, Transform};
    use image::RgbImage;

    fn source(n: u32) -> (tempfile::TempDir, Arc<ImageSource>) {
        let dir = tempfile::tempdir().unwrap();
        let items = (0..n)
            .map(|i| {
                let path = dir.path().join(format!("{i}.png"));
                RgbImage::from_pixel(12, 12, image::Rgb([(i * 20) as u8, 0, 0]))
                    .save(&path)
                    .unwrap();
                Item {
                    path,
                    label: i as i64 % 3,
                    size: (12, 12),
                }
            })
            .collect();
        let t = Transform {
            image_size: 8,
            augment: true,
            flip: true,
        };
        (
            dir,
            Arc::new(ImageSource::new(items, t, false, Default::default())),
        )
    }

    #[test]
    fn a_loader_started_later_replays_the_same_stream() {
        let (_dir, src) = source(7);
        let full = DataLoader::start(src.clone(), 5, 4, 0..4, 0, 2);
        let batches: Vec<Batch> = (0..6).map(|_| full.next_batch().unwrap()).collect();
        drop(full);
        let resumed = DataLoader::start(src, 5, 4, 0..4, 3, 2);
        for expected in &batches[3..] {
            let b = resumed.next_batch().unwrap();
            assert_eq!(b.index, expected.index);
            assert_eq!(b.labels, expected.labels);
            assert_eq!(b.images, expected.images);
        }
        assert_eq!(batches[0].images.len(), 4 * 3 * 8 * 8);
    }

    #[test]
    fn every_epoch_visits_every_image_once() {
        let (_dir, src) = source(6);
        let loader = DataLoader::start(src, 1, 3, 0..3, 0, 1);
        // Two batches of 3 = one epoch of 6: labels 0,1,2 twice each.
        let mut labels: Vec<i64> = (0..2)
            .flat_map(|_| loader.next_batch().unwrap().labels)
            .collect();
        labels.sort();
        assert_eq!(labels, [0, 0, 1, 1, 2, 2]);
    }

    #[test]
    fn the_shares_of_a_batch_are_its_slices() {
        let (_dir, src) = source(7);
        let whole = DataLoader::start(src.clone(), 5, 4, 0..4, 2, 1);
        let low = DataLoader::start(src.clone(), 5, 4, 0..2, 2, 1);
        let high = DataLoader::start(src, 5, 4, 2..4, 2, 1);
        for _ in 0..3 {
            let (w, l, h) = (
                whole.next_batch().unwrap(),
                low.next_batch().unwrap(),
                high.next_batch().unwrap(),
            );
            assert_eq!((l.index, h.index), (w.index, w.index));
            assert_eq!([l.labels, h.labels].concat(), w.labels);
            assert_eq!([l.images, h.images].concat(), w.images);
        }
    }
}
