//! `ddpm-trainer`: parse the command line, start logging, run the command until it ends
//! or SIGINT / SIGTERM asks it to save and stop.

use anyhow::Context;
use clap::{CommandFactory, Parser};
use ddpm_service::{cli_spec, shutdown_signal, telemetry};
use ddpm_trainer::Cli;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    cli_spec::print_and_exit_if_asked(Cli::command);
    let cli = Cli::parse();
    telemetry::init(cli.global.common.log_format);
    ddpm_trainer::run(cli, shutdown_signal())
        .await
        .context("ddpm-trainer failed")
}
