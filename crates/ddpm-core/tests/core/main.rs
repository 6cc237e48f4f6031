//! ddpm-core's integration tests, one binary (see helpers.rs for the shared parts).
//!
//! libtorch runs one intra-op thread per test: the harness already runs tests in
//! parallel, and on a small CPU nested thread pools spin against each other.

mod batching;
mod checkpoints;
mod helpers;
mod init;
mod learning;
mod linkage;
mod parity;
mod reference;
