//! `deskbridge` binary: parse configuration, start the bridge, stop it on SIGINT/SIGTERM.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use deskbridge::config::{Config, Overrides};
use deskbridge::Transforms;

/// Routes messages between browsers (WebSocket) and desktop apps (RabbitMQ).
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// TOML configuration file (optional; every key has a default).
    #[arg(long, env = "DESKBRIDGE_CONFIG")]
    config: Option<PathBuf>,
    /// HTTP/WebSocket listen address, e.g. 0.0.0.0:8080.
    #[arg(long, env = "DESKBRIDGE_BIND")]
    bind: Option<String>,
    /// AMQP URL, or a comma-separated list tried in order.
    #[arg(long, env = "AMQP_URL")]
    amqp_url: Option<String>,
}

#[actix_web::main]
async fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    let overrides = Overrides {
        bind: cli.bind,
        amqp_url: cli.amqp_url,
    };
    let config = match Config::load(cli.config.as_deref(), &overrides) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("deskbridge: {error}");
            return ExitCode::from(2);
        }
    };
    match deskbridge::fd_limit::raise_to_hard_limit() {
        Ok((before, after)) => {
            log::info!("open-files limit: {after} (was {before})");
            let needed = config.ws.max_sessions as u64 + 64;
            if after < needed {
                log::warn!(
                    "open-files limit {after} is below ws.max_sessions + 64 = {needed}: raise `ulimit -Hn` \
                     or lower ws.max_sessions, or new connections will fail before the limit"
                );
            }
        }
        Err(error) => log::warn!("cannot raise the open-files limit: {error}"),
    }
    let transforms = Transforms::from_rules(&config.transforms);
    let bridge = match deskbridge::start(config, transforms).await {
        Ok(bridge) => bridge,
        Err(error) => {
            eprintln!("deskbridge: {error}");
            return ExitCode::from(1);
        }
    };
    log::info!(
        "deskbridge {} {}{}",
        deskbridge::VERSION,
        deskbridge::LISTENING_ON,
        bridge.local_addr()
    );
    match wait_for_signal().await {
        Ok(signal) => log::info!("{signal}: shutting down"),
        Err(error) => log::error!("cannot listen for signals ({error}); shutting down"),
    }
    bridge.shutdown().await;
    ExitCode::SUCCESS
}

async fn wait_for_signal() -> std::io::Result<&'static str> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = terminate.recv() => Ok("SIGTERM"),
        _ = interrupt.recv() => Ok("SIGINT"),
    }
}
