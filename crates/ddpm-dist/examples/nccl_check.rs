//! The NCCL path on a real GPU, for `scripts/gpu-check.sh` (a GPU machine has no Rust:
//! this is built here and carried there). A world of one rank on `cuda:0`, through the
//! same `Store` and `ProcessGroup` as the CPU tests' Gloo groups: the all-reduce and the
//! broadcast must leave the right values, and the time of an all-reduce of the seed
//! model's gradient (23 M floats) is printed. Exits non-zero on any failure.

use std::time::{Duration, Instant};

use ddpm_dist::{GlooInterface, ProcessGroup, Store};
use tch::{Device, Kind, Tensor};

fn main() {
    let timeout = Duration::from_secs(60);
    assert!(
        ddpm_dist::has_nccl(),
        "this build has no NCCL (its build found no NCCL/CUDA headers)"
    );
    assert!(tch::Cuda::is_available(), "no CUDA device visible");
    let device = Device::Cuda(0);
    let store = Store::serve("127.0.0.1", 0, 1, timeout).expect("store");
    let group = ProcessGroup::new(
        &store,
        0,
        1,
        device,
        &GlooInterface::Hostname("127.0.0.1".into()),
        timeout,
    )
    .expect("NCCL group");
    assert_eq!(group.backend(), ddpm_dist::Backend::Nccl);

    let mut t = Tensor::from_slice(&[1f32, 2., 3.]).to_device(device);
    group.all_reduce_sum(&mut t).expect("all-reduce");
    assert_eq!(
        Vec::<f32>::try_from(&t.to_device(Device::Cpu)).unwrap(),
        [1., 2., 3.]
    );
    let mut b = Tensor::full([1000], 7.0, (Kind::Float, device));
    group.broadcast(&mut b, 0).expect("broadcast");
    assert_eq!(b.sum(Kind::Double).double_value(&[]), 7000.0);
    // A CPU tensor in an NCCL group is refused before NCCL sees it.
    let mut cpu = Tensor::ones([2], (Kind::Float, Device::Cpu));
    assert!(group.all_reduce_sum(&mut cpu).is_err());

    let mut grad = Tensor::randn([23_000_000], (Kind::Float, device));
    let expected = grad.sum(Kind::Double).double_value(&[]);
    for _ in 0..3 {
        group.all_reduce_sum(&mut grad).expect("warm-up");
    }
    tch::Cuda::synchronize(0);
    let n = 20;
    let start = Instant::now();
    for _ in 0..n {
        group.all_reduce_sum(&mut grad).expect("all-reduce");
    }
    tch::Cuda::synchronize(0);
    let ms = start.elapsed().as_secs_f64() * 1e3 / n as f64;
    let after = grad.sum(Kind::Double).double_value(&[]);
    assert!((after - expected).abs() <= 1e-3 * expected.abs().max(1.0));
    println!("nccl: world of 1 on cuda:0: all-reduce and broadcast correct; all-reduce of 23 M floats {ms:.3} ms");
}
