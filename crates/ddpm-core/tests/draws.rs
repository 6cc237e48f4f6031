//! A data-parallel rank's share of a step's random draws. Alone in its test binary: it
//! seeds libtorch's process-wide generator, which tests running beside it would draw from.

use ddpm_core::{training::StepDraws, NoiseSchedule, ScheduleConfig};
use tch::{Device, Kind, Tensor};

#[test]
fn a_shares_draws_are_its_slice_of_the_global_batchs() {
    let schedule = NoiseSchedule::new(ScheduleConfig::default(), Device::Cpu).unwrap();
    let x0 = Tensor::zeros([6, 3, 4, 4], (Kind::Float, Device::Cpu));
    tch::manual_seed(11);
    let whole = StepDraws::sample(&schedule, &x0, 0.5);
    let mut parts = Vec::new();
    for share in [0..2, 2..4, 4..6] {
        tch::manual_seed(11);
        let x = x0.narrow(0, share.start, 2);
        parts.push(StepDraws::sample_share(&schedule, &x, 6, share, 0.5).unwrap());
    }
    let cat =
        |f: &dyn Fn(&StepDraws) -> Tensor| Tensor::cat(&parts.iter().map(f).collect::<Vec<_>>(), 0);
    assert!(cat(&|d| d.t.shallow_clone()).equal(&whole.t));
    assert!(cat(&|d| d.noise.shallow_clone()).equal(&whole.noise));
    let dropped = cat(&|d| d.dropped.as_ref().unwrap().shallow_clone());
    assert!(dropped.equal(whole.dropped.as_ref().unwrap()));
    // A share that does not match its images is refused.
    let x = x0.narrow(0, 0, 3);
    assert!(StepDraws::sample_share(&schedule, &x, 6, 0..2, 0.5).is_err());
    assert!(StepDraws::sample_share(&schedule, &x, 6, 4..7, 0.5).is_err());
}
