//! Per-sample noise: each sample draws x_T and every z_t from its own seeded generator, on
//! the host, so an image depends only on its own seed and settings — not on what it was
//! batched with, nor on the device (within float tolerance of the network itself).

use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};
use rand_pcg::Pcg64Mcg;

/// A sample's own standard-normal stream.
#[derive(Debug, Clone)]
pub struct SampleRng {
    rng: Pcg64Mcg,
}

impl SampleRng {
    pub fn new(seed: u64) -> Self {
        SampleRng {
            rng: Pcg64Mcg::seed_from_u64(seed),
        }
    }

    /// `n` draws from N(0, 1).
    pub fn normal(&mut self, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| StandardNormal.sample(&mut self.rng))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_stream_and_roughly_standard() {
        let a = SampleRng::new(7).normal(20_000);
        assert_eq!(a, SampleRng::new(7).normal(20_000));
        assert_ne!(a, SampleRng::new(8).normal(20_000));
        let mean = a.iter().map(|&v| v as f64).sum::<f64>() / a.len() as f64;
        let var = a.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / a.len() as f64;
        assert!(
            mean.abs() < 0.03 && (var - 1.0).abs() < 0.05,
            "mean {mean} var {var}"
        );
    }
}
