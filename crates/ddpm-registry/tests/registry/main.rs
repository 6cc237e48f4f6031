//! The registry's integration tests: one binary; every test in a module that
//! calls `both_backends!` (from `ddpm-testkit`) runs on SQLite and on PostgreSQL, each
//! time in a fresh `helpers::TestContext`.

mod helpers;

mod checkpoints;
mod connect;
mod control;
mod metrics;
mod queue;
mod runs;
mod scores;
mod store;
mod world;
