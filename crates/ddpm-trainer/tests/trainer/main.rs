//! The trainer's integration tests: the real binary as a child process, against SQLite
//! and PostgreSQL (`DDPM_TEST_POSTGRES_URL`; see scripts/test.sh), with the checkpoints
//! in a directory or in a bucket of an S3 test server (`DDPM_TEST_S3_URL`).

mod audit;
mod configs;
mod control;
mod faults;
// Real SIGKILLs at named points need the binary built with them (`failpoints`).
#[cfg(feature = "failpoints")]
mod fault_suite;
mod helpers;
mod linkage;
mod parallel;
mod quality;
mod queue;
mod resume;
mod s3;
mod train;
