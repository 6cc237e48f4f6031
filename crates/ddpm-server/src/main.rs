//! `ddpm-server`: parses the configuration, starts logging and runs the server until
//! SIGINT or SIGTERM.

use anyhow::Context;
use clap::{CommandFactory, Parser};
use ddpm_server::Config;
use ddpm_service::{cli_spec, shutdown_signal, telemetry};
use tokio::net::TcpListener;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    cli_spec::print_and_exit_if_asked(Config::command);
    let config = Config::parse();
    telemetry::init(config.common.log_format);
    tracing::info!(?config, "configuration");
    let listener = TcpListener::bind(config.bind)
        .await
        .with_context(|| format!("binding {}", config.bind))?;
    ddpm_server::run(config, listener, shutdown_signal())
        .await
        .context("ddpm-server failed")
}
