//! The trainer's integration tests: the real binary as a child process, against SQLite
//! and PostgreSQL (`DDPM_TEST_POSTGRES_URL`; see scripts/test.sh).

mod configs;
mod control;
mod faults;
mod helpers;
mod linkage;
mod queue;
mod resume;
mod train;
