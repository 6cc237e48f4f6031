//! ddpm-core's integration tests, one binary (see helpers.rs for the shared parts).

mod batching;
mod checkpoints;
mod helpers;
mod learning;
mod linkage;
mod reference;
