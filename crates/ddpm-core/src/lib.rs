//! # ddpm-core
//!
//! Denoising diffusion probabilistic models (Ho et al. 2020) with classifier-free guidance
//! (Ho & Salimans 2022) and EMA weights, on libtorch through `tch`. The math and the
//! network only: no I/O (checkpoints are bytes in and out), no async. Everything runs on the CPU or
//! a CUDA GPU, chosen at run time ([`DeviceChoice`]).
//!
//! ## Layout
//!
//! - [`schedule`]: β schedules (linear, cosine), ᾱ, posterior variance, q(x_t | x_0).
//! - [`unet`]: the noise-prediction UNet (the seed's architecture as a preset, every size
//!   configurable), with fused scaled-dot-product attention.
//! - [`training`]: the ε-prediction loss with per-sample label dropout.
//! - [`guidance`]: guided ε̃ from one forward pass over conditional + unconditional inputs.
//! - [`sampler`]: DDPM, DDIM and DPM-Solver++(2M) as per-sample step coefficients; one
//!   denoising step over a batch of samples at different timesteps; whole trajectories
//!   built on it.
//! - [`noise`]: per-sample seeded noise streams.
//! - [`flat`], [`optim`], [`ema`]: parameters in one flat buffer, AdamW and the EMA over it.
//! - [`checkpoint`]: EMA checkpoints with a manifest and resumable training states, as
//!   bytes, and verified loads from bytes.
//! - [`device`]: run-time device choice.
//! - [`tile`]: images tiled on a canvas (sample grids).

pub mod checkpoint;
pub mod device;
pub mod ema;
mod error;
pub mod flat;
pub mod guidance;
pub mod noise;
pub mod optim;
pub mod sampler;
pub mod schedule;
pub mod tile;
pub mod training;
pub mod unet;

pub use device::{device_arg, set_cpu_threads, DeviceChoice};
pub use error::{CoreError, DeviceFault, Result};
pub use sampler::{AncestralVariance, SampleSpec, SamplerConfig, SamplerKind, TimestepSpacing};
pub use schedule::{NoiseSchedule, ScheduleConfig};
pub use unet::{Model, UNetConfig};

/// The libtorch version this crate is built against (the `torch` wheel it expects).
pub const LIBTORCH_VERSION: &str = "2.11.0";
