//! `deskbridge` binary: parse configuration, start the bridge, stop it on SIGINT/SIGTERM; or,
//! with `token`, mint a development token.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use deskbridge::auth::{self, Claims};
use deskbridge::config::{AuthMode, Config, Overrides, Secret};
use deskbridge::{StartError, Transforms};

/// Routes messages between browsers (WebSocket) and desktop apps (RabbitMQ).
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// TOML configuration file (optional; every key has a default).
    #[arg(long, env = "DESKBRIDGE_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// HTTP/WebSocket listen address, e.g. 0.0.0.0:8080.
    #[arg(long, env = "DESKBRIDGE_BIND")]
    bind: Option<String>,
    /// AMQP URL, or a comma-separated list tried in order.
    #[arg(long, env = "AMQP_URL")]
    amqp_url: Option<String>,
    /// `none` or `jwt` (auth.mode).
    #[arg(long, env = "DESKBRIDGE_AUTH_MODE")]
    auth_mode: Option<AuthMode>,
    /// Allow auth.mode = none on a non-loopback bind (auth.allow_anonymous).
    #[arg(long, env = "DESKBRIDGE_ALLOW_ANONYMOUS")]
    allow_anonymous: Option<bool>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Print an HS256 token signed with the configured secret (auth.jwt.hs256_secret_file or
    /// DESKBRIDGE_JWT_SECRET), for development: `deskbridge token --sub alice --desk A:subscribe,publish`.
    Token {
        /// The user (`sub` claim).
        #[arg(long)]
        sub: String,
        /// DESK:right[,right...] with rights subscribe, publish, request; `*` for every desk. Repeat it.
        #[arg(long = "desk", value_parser = auth::parse_desk_grant)]
        desks: Vec<(String, Vec<auth::Right>)>,
        /// Lifetime in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl: u64,
    },
}

#[actix_web::main]
async fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    let overrides = Overrides {
        bind: cli.bind,
        amqp_url: cli.amqp_url,
        auth_mode: cli.auth_mode,
        allow_anonymous: cli.allow_anonymous,
        jwt_secret: std::env::var("DESKBRIDGE_JWT_SECRET").ok().map(Secret::new),
    };
    let config = match Config::load(cli.config.as_deref(), &overrides) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("deskbridge: {error}");
            return ExitCode::from(2);
        }
    };
    match cli.command {
        Some(Command::Token { sub, desks, ttl }) => mint(&config, sub, desks, ttl),
        None => run(config).await,
    }
}

fn mint(config: &Config, sub: String, desks: Vec<(String, Vec<auth::Right>)>, ttl: u64) -> ExitCode {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let claims = Claims {
        sub,
        exp: now + ttl,
        desks: desks.into_iter().collect(),
        iss: config.auth.jwt.issuer.clone(),
        aud: config.auth.jwt.audience.clone(),
    };
    match auth::mint_hs256(&config.auth.jwt, &claims) {
        Ok(token) => {
            println!("{token}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("deskbridge token: {error}");
            ExitCode::from(2)
        }
    }
}

async fn run(config: Config) -> ExitCode {
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
        // Both are fixed by the configuration, like the errors found while reading it.
        Err(error @ (StartError::Keys(_) | StartError::Bind { .. })) => {
            eprintln!("deskbridge: {error}");
            return ExitCode::from(2);
        }
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
