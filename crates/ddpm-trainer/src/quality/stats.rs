//! Distances between two sets of feature vectors (`[N, D]` f64 tensors on the CPU):
//! the Fréchet distance (Heusel et al. 2017, "FID" in Inception features), the kernel
//! distance (Bińkowski et al. 2018, "KID": unbiased MMD² with the cubic polynomial
//! kernel, mean and standard deviation over subsets as torch-fidelity reports them),
//! within-class spread, and the bootstrap that puts standard errors on any of them.

use rand::{seq::index::sample, Rng, SeedableRng};
use rand_pcg::Pcg64Mcg;
use tch::{Kind, Tensor};

/// Mean `[D]` and unbiased covariance `[D, D]` of `x: [N, D]` (N ≥ 2).
fn moments(x: &Tensor) -> (Tensor, Tensor) {
    let n = x.size()[0];
    let mean = x.mean_dim([0i64].as_slice(), false, Kind::Double);
    let centered = x - &mean;
    let cov = centered.transpose(0, 1).matmul(&centered) / (n - 1) as f64;
    (mean, cov)
}

/// The square root of a symmetric positive semi-definite matrix, through its
/// eigendecomposition (eigenvalues below 0, rounding errors, clamped to 0).
fn sqrt_psd(m: &Tensor) -> Tensor {
    let sym = (m + m.transpose(0, 1)) / 2.0;
    let (values, vectors) = sym.linalg_eigh("L");
    let roots = values.clamp_min(0.0).sqrt();
    (&vectors * roots.unsqueeze(0)).matmul(&vectors.transpose(0, 1))
}

/// Fréchet distance between Gaussians fitted to `a: [N, D]` and `b: [M, D]`:
/// ‖μa − μb‖² + tr Σa + tr Σb − 2 tr (Σa^½ Σb Σa^½)^½. `None` with fewer than 2 rows.
///
/// tr (Σa Σb)^½ is computed as tr (Σa^½ Σb Σa^½)^½, which has the same eigenvalues and
/// is symmetric, so a symmetric eigensolver suffices (scipy's `sqrtm` of the product,
/// as pytorch-fid does, needs a general one).
pub fn frechet_distance(a: &Tensor, b: &Tensor) -> Option<f64> {
    if a.size()[0] < 2 || b.size()[0] < 2 {
        return None;
    }
    let (mu_a, cov_a) = moments(a);
    let (mu_b, cov_b) = moments(b);
    let root_a = sqrt_psd(&cov_a);
    let cross = sqrt_psd(&root_a.matmul(&cov_b).matmul(&root_a));
    let diff = (&mu_a - &mu_b).square().sum(Kind::Double);
    let d = diff + cov_a.trace() + cov_b.trace() - cross.trace() * 2.0;
    Some(d.double_value(&[]).max(0.0))
}

/// The cubic polynomial kernel of KID: k(x, y) = (x·y / D + 1)³, `[N, M]`.
fn kernel(x: &Tensor, y: &Tensor) -> Tensor {
    let d = x.size()[1] as f64;
    (x.matmul(&y.transpose(0, 1)) / d + 1.0).pow_tensor_scalar(3)
}

/// The unbiased estimate of MMD² between `x: [m, D]` and `y: [m, D]`: the mean of
/// k(x, x') and k(y, y') over distinct pairs, less twice the mean of k(x, y).
fn mmd2_unbiased(x: &Tensor, y: &Tensor) -> f64 {
    let m = x.size()[0] as f64;
    let off_diagonal_mean =
        |k: Tensor| (k.sum(Kind::Double) - k.diagonal(0, 0, 1).sum(Kind::Double)) / (m * (m - 1.0));
    let kxx = off_diagonal_mean(kernel(x, x));
    let kyy = off_diagonal_mean(kernel(y, y));
    let kxy = kernel(x, y).mean(Kind::Double);
    (kxx + kyy - kxy * 2.0).double_value(&[])
}

/// KID between `a: [N, D]` and `b: [M, D]`: the unbiased MMD² of `subsets` pairs of
/// subsets of min(N, M, 1000) rows each, drawn without replacement by a generator seeded
/// with `seed`; returns their mean and (population) standard deviation. `None` with
/// fewer than 2 rows in either set.
pub fn kernel_distance(a: &Tensor, b: &Tensor, subsets: usize, seed: u64) -> Option<(f64, f64)> {
    let (n, m) = (a.size()[0] as usize, b.size()[0] as usize);
    let size = n.min(m).min(1000);
    if size < 2 || subsets == 0 {
        return None;
    }
    let mut rng = Pcg64Mcg::seed_from_u64(seed);
    let mut draw = |of: &Tensor, total: usize| {
        let idx: Vec<i64> = sample(&mut rng, total, size)
            .into_iter()
            .map(|i| i as i64)
            .collect();
        of.index_select(0, &Tensor::from_slice(&idx))
    };
    let values: Vec<f64> = (0..subsets)
        .map(|_| {
            let x = draw(a, n);
            let y = draw(b, m);
            mmd2_unbiased(&x, &y)
        })
        .collect();
    let mean = values.iter().sum::<f64>() / values.len() as f64;
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / values.len() as f64;
    Some((mean, var.sqrt()))
}

/// The mean Euclidean distance between distinct rows of `x: [N, D]`; `None` for N < 2.
pub fn mean_pairwise_distance(x: &Tensor) -> Option<f64> {
    let n = x.size()[0];
    if n < 2 {
        return None;
    }
    let d = Tensor::cdist(x, x, 2.0, None::<i64>); // [N, N], zero diagonal
    Some(d.sum(Kind::Double).double_value(&[]) / (n * (n - 1)) as f64)
}

/// Within-class spread of generated features relative to real ones: for each class
/// with at least 2 rows on both sides, the mean pairwise distance of the generated rows
/// over that of the real rows; the mean of those ratios. `None` when no class has both.
pub fn relative_diversity(
    generated: &Tensor,
    generated_labels: &[i64],
    real: &Tensor,
    real_labels: &[i64],
    classes: i64,
) -> Option<f64> {
    let rows = |x: &Tensor, labels: &[i64], c: i64| {
        let idx: Vec<i64> = (0..labels.len() as i64)
            .filter(|&i| labels[i as usize] == c)
            .collect();
        x.index_select(0, &Tensor::from_slice(&idx))
    };
    let ratios: Vec<f64> = (0..classes)
        .filter_map(|c| {
            let g = mean_pairwise_distance(&rows(generated, generated_labels, c))?;
            let r = mean_pairwise_distance(&rows(real, real_labels, c))?;
            (r > 0.0).then_some(g / r)
        })
        .collect();
    (!ratios.is_empty()).then(|| ratios.iter().sum::<f64>() / ratios.len() as f64)
}

/// Row indices of `reps` bootstrap resamples of the rows whose classes are `labels`:
/// each resample draws, within every class, as many rows as the class has, with
/// replacement, so that every resample keeps the class counts (the within-class
/// statistics need them). Seeded: the same labels, `reps` and `seed` give the same
/// resamples, so two sample sets drawn with the same seeds (the same images' noise) can
/// be resampled alike and their difference judged pairwise.
pub fn stratified_resamples(labels: &[i64], reps: usize, seed: u64) -> Vec<Vec<i64>> {
    let mut rng = Pcg64Mcg::seed_from_u64(seed);
    let mut classes: Vec<i64> = labels.to_vec();
    classes.sort_unstable();
    classes.dedup();
    let members: Vec<Vec<i64>> = classes
        .iter()
        .map(|&c| {
            (0..labels.len() as i64)
                .filter(|&i| labels[i as usize] == c)
                .collect()
        })
        .collect();
    (0..reps)
        .map(|_| {
            members
                .iter()
                .flat_map(|rows| {
                    (0..rows.len())
                        .map(|_| rows[rng.random_range(0..rows.len())])
                        .collect::<Vec<_>>()
                })
                .collect()
        })
        .collect()
}

/// The standard deviation (with n − 1) of the finite `values`: the standard error of a
/// statistic when `values` are its bootstrap replicates. `None` with fewer than 2.
pub fn standard_error(values: &[f64]) -> Option<f64> {
    let finite: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    if finite.len() < 2 {
        return None;
    }
    let n = finite.len() as f64;
    let mean = finite.iter().sum::<f64>() / n;
    let var = finite.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0);
    Some(var.sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `[n, d]` standard normal rows, seeded.
    fn gaussian(n: i64, d: i64, seed: i64) -> Tensor {
        tch::manual_seed(seed);
        Tensor::randn([n, d], (Kind::Double, tch::Device::Cpu))
    }

    #[test]
    fn frechet_distance_follows_its_closed_form() {
        let _rng = ddpm_testkit_model::exclusive_rng();
        let x = gaussian(200, 5, 1);
        let x = &x - x.mean_dim([0i64].as_slice(), true, Kind::Double);
        assert!(frechet_distance(&x, &x).unwrap() < 1e-9);
        // A shift adds its squared length and nothing else.
        let shift = Tensor::from_slice(&[1.0f64, -2.0, 0.0, 0.5, 3.0]);
        let d = frechet_distance(&x, &(&x + &shift)).unwrap();
        let expected = shift.square().sum(Kind::Double).double_value(&[]);
        assert!((d - expected).abs() < 1e-9, "{d} vs {expected}");
        // Scaling a centred set by 2: tr Σ + 4 tr Σ − 2·tr (4Σ²)^½ = tr Σ.
        let (_, cov) = moments(&x);
        let d = frechet_distance(&x, &(&x * 2.0)).unwrap();
        let trace = cov.trace().double_value(&[]);
        assert!((d - trace).abs() < 1e-6 * trace, "{d} vs {trace}");
        assert_eq!(frechet_distance(&x.narrow(0, 0, 1), &x), None);
    }

    /// MMD² written out pair by pair, for comparison with the matrix form.
    fn mmd2_by_loops(x: &[Vec<f64>], y: &[Vec<f64>]) -> f64 {
        let d = x[0].len() as f64;
        let k = |a: &[f64], b: &[f64]| {
            (a.iter().zip(b).map(|(p, q)| p * q).sum::<f64>() / d + 1.0).powi(3)
        };
        let m = x.len() as f64;
        let (mut kxx, mut kyy, mut kxy) = (0.0, 0.0, 0.0);
        for i in 0..x.len() {
            for j in 0..x.len() {
                if i != j {
                    kxx += k(&x[i], &x[j]);
                    kyy += k(&y[i], &y[j]);
                }
                kxy += k(&x[i], &y[j]);
            }
        }
        kxx / (m * (m - 1.0)) + kyy / (m * (m - 1.0)) - 2.0 * kxy / (m * m)
    }

    #[test]
    fn kernel_distance_is_the_unbiased_mmd_and_grows_with_the_gap() {
        let _rng = ddpm_testkit_model::exclusive_rng();
        let (x, y) = (gaussian(12, 4, 2), gaussian(12, 4, 3) + 0.5);
        let rows = |t: &Tensor| -> Vec<Vec<f64>> {
            (0..t.size()[0])
                .map(|i| Vec::<f64>::try_from(t.get(i)).unwrap())
                .collect()
        };
        let direct = mmd2_by_loops(&rows(&x), &rows(&y));
        assert!((mmd2_unbiased(&x, &y) - direct).abs() < 1e-9);
        // With equal sizes every subset is a whole set: no spread.
        let (mean, std) = kernel_distance(&x, &y, 5, 0).unwrap();
        assert!((mean - direct).abs() < 1e-9 && std < 1e-9);
        // Repeatable, and larger for a set further away.
        let (a, b) = (gaussian(80, 4, 4), gaussian(40, 4, 5));
        let near = kernel_distance(&a, &(&b + 0.2), 20, 7).unwrap();
        assert_eq!(near, kernel_distance(&a, &(&b + 0.2), 20, 7).unwrap());
        let far = kernel_distance(&a, &(&b + 1.0), 20, 7).unwrap();
        assert!(far.0 > near.0 && near.1 > 0.0, "{near:?} {far:?}");
    }

    #[test]
    fn diversity_is_the_ratio_of_spreads() {
        let _rng = ddpm_testkit_model::exclusive_rng();
        let x = gaussian(20, 3, 6);
        let labels: Vec<i64> = (0..20).map(|i| i % 2).collect();
        let same = relative_diversity(&x, &labels, &x, &labels, 2).unwrap();
        assert!((same - 1.0).abs() < 1e-12);
        let half = relative_diversity(&(&x * 0.5), &labels, &x, &labels, 2).unwrap();
        assert!((half - 0.5).abs() < 1e-12);
        // A collapsed class (every sample alike) has no spread at all.
        let collapsed = Tensor::ones([20, 3], (Kind::Double, tch::Device::Cpu));
        let none = relative_diversity(&collapsed, &labels, &x, &labels, 2).unwrap();
        assert!(none.abs() < 1e-6);
        assert_eq!(relative_diversity(&x, &labels, &x, &labels, 0), None);
    }

    #[test]
    fn resamples_keep_the_class_counts_and_repeat() {
        let labels = [0i64, 1, 0, 2, 1, 0, 2, 2, 2];
        let reps = stratified_resamples(&labels, 50, 4);
        assert_eq!(reps.len(), 50);
        for rows in &reps {
            assert_eq!(rows.len(), labels.len());
            for c in 0..3 {
                let count = |it: &mut dyn Iterator<Item = i64>| it.filter(|&l| l == c).count();
                let drawn = count(&mut rows.iter().map(|&i| labels[i as usize]));
                assert_eq!(drawn, count(&mut labels.iter().copied()), "class {c}");
            }
        }
        assert_eq!(reps, stratified_resamples(&labels, 50, 4));
        assert_ne!(reps, stratified_resamples(&labels, 50, 5));
        // With replacement: some resample repeats a row.
        assert!(reps.iter().any(|rows| {
            let mut sorted = rows.clone();
            sorted.sort_unstable();
            sorted.windows(2).any(|w| w[0] == w[1])
        }));
    }

    #[test]
    fn the_bootstrap_standard_error_of_a_mean_is_sigma_over_root_n() {
        // 400 values with standard deviation 1: the mean's standard error is 0.05.
        let _rng = ddpm_testkit_model::exclusive_rng();
        let x = Vec::<f64>::try_from(gaussian(400, 1, 8).view([-1])).unwrap();
        let labels = vec![0i64; x.len()];
        let means: Vec<f64> = stratified_resamples(&labels, 400, 1)
            .iter()
            .map(|rows| rows.iter().map(|&i| x[i as usize]).sum::<f64>() / rows.len() as f64)
            .collect();
        let se = standard_error(&means).unwrap();
        assert!((0.04..0.06).contains(&se), "{se}");
        assert_eq!(standard_error(&[1.0, f64::NAN]), None);
        assert_eq!(standard_error(&[1.0, 3.0]), Some(2f64.sqrt()));
    }
}
