//! ddpm-server's integration tests: the real server on port 0 against a tiny checkpoint
//! trained in the test (see helpers.rs).

mod batching;
mod browser;
mod console;
mod control;
mod helpers;
mod ops;
mod policy;
mod runs;
mod samples;
mod streaming;
mod swap;
mod validation;
