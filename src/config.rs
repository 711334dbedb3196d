//! Configuration: defaults, an optional TOML file, environment overrides and validation.
//!
//! Precedence, lowest first: built-in defaults, the `--config` file, `AMQP_URL` /
//! `DESKBRIDGE_BIND`, command-line flags. Validation runs once, on the merged result, so a
//! mistake is reported with the key that holds it whatever its source.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::broker_url::{mask_passwords, BrokerUrl};
use crate::transform::TransformRule;

/// Everything deskbridge needs to run; each field has a default (see `README.md`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// HTTP/WebSocket listen address; port 0 picks a free port (tests).
    pub bind: String,
    /// HTTP worker threads; 0 means one per core.
    pub workers: usize,
    /// Desks a browser may subscribe to; a routing key's desk is the text before its first `_`.
    pub desks: Vec<String>,
    /// Event names accepted in both directions.
    pub events: Vec<String>,
    /// Upper bound for a graceful shutdown, in milliseconds.
    pub shutdown_timeout_ms: u64,
    /// RabbitMQ side.
    pub amqp: AmqpConfig,
    /// Browser side.
    pub ws: WsConfig,
    /// Who may connect, and with which rights.
    pub auth: AuthConfig,
    /// Per-desk data transforms, applied in order.
    pub transforms: Vec<TransformRule>,
    /// Retained, offset-addressed history on RabbitMQ streams; off: v1 queue mode.
    pub history: HistoryConfig,
    /// What happens to a browser too slow for a desk's events, per desk.
    pub desk_policy: Vec<DeskPolicy>,
    /// Who is connected, across instances.
    pub presence: PresenceConfig,
}

/// `[presence]`: how instances tell each other they are alive.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PresenceConfig {
    /// Each instance publishes its sessions this often; one silent for 3 × this is gone, and
    /// its sessions leave the presence view.
    pub heartbeat_ms: u64,
}

impl Default for PresenceConfig {
    fn default() -> Self {
        PresenceConfig { heartbeat_ms: 5_000 }
    }
}

/// `[history]`: per-desk RabbitMQ streams that every instance reads, for resume, snapshots and
/// many instances.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HistoryConfig {
    /// On: each desk's events go through the stream `<stream_prefix>.<desk>`; `listener` is
    /// not used.
    pub enabled: bool,
    /// Stream retention by age (`x-max-age`, e.g. `"1h"`, `"7D"`).
    pub max_age: String,
    /// Stream retention by size (`x-max-length-bytes`).
    pub max_bytes: u64,
    /// Streams are named `<stream_prefix>.<desk>`.
    pub stream_prefix: String,
    /// Each desk's latest events kept in memory, framed, for resumes and slow readers; older
    /// ones are read back from the stream.
    pub memory_bytes: usize,
    /// Events read from a stream per replay step (plus what the broker had already sent when
    /// the step ended: at most the reader's prefetch, 1 000); one step runs at a time per
    /// instance.
    pub replay_batch: usize,
    /// Largest `since: {last: K}`.
    pub max_snapshot: usize,
    /// `x-initial-cluster-size` of new streams (replicas on a cluster); none: the broker's default.
    pub initial_cluster_size: Option<u32>,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        HistoryConfig {
            enabled: false,
            max_age: "1h".into(),
            max_bytes: 1_073_741_824,
            stream_prefix: "deskbridge.history".into(),
            memory_bytes: 16 * 1024 * 1024,
            replay_batch: 2_000,
            max_snapshot: 10_000,
            initial_cluster_size: None,
        }
    }
}

/// `[[desk_policy]]`: the slow-reader policy of one desk.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeskPolicy {
    /// A configured desk.
    pub desk: String,
    /// What to do with a browser whose outbound queue is full.
    pub slow: SlowPolicy,
    /// With `slow = "latest"`: the field of `data` (as browsers get it, after `to_web`
    /// transforms) whose value identifies a key.
    #[serde(default)]
    pub conflate_key: Option<String>,
}

/// What happens to a browser that cannot take a desk's events as fast as they come.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SlowPolicy {
    /// Close it with 1013 (v1 behaviour; the default without history).
    Close,
    /// Feed it from the history until it is current again; never closed for slowness (the
    /// default with history).
    CatchUp,
    /// Keep only the newest event per `conflate_key` value while it is behind, then one `gap`.
    Latest,
}

impl Config {
    /// The slow-reader policy of `desk`, and its conflation key.
    pub fn slow_policy(&self, desk: &str) -> (SlowPolicy, Option<&str>) {
        match self.desk_policy.iter().find(|policy| policy.desk == desk) {
            Some(policy) => (policy.slow, policy.conflate_key.as_deref()),
            None if self.history.enabled => (SlowPolicy::CatchUp, None),
            None => (SlowPolicy::Close, None),
        }
    }
}

/// RabbitMQ connection, topology and buffering settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AmqpConfig {
    /// Broker URLs tried in order on every (re)connect: the first is the primary.
    pub urls: Vec<BrokerUrl>,
    /// Unacknowledged deliveries the broker may push to the consumer at once.
    pub prefetch: u16,
    /// Direct exchange desktop apps publish to (desktop → web).
    pub inbound_exchange: String,
    /// Queue bound to `inbound_exchange` for every desk × event; its dead letters go to
    /// `<queue>.dlx` (fanout) and are kept in `<queue>.dead`.
    pub inbound_queue: String,
    /// Direct exchange browsers' events are published to (web → desktop).
    pub outbound_exchange: String,
    /// Topic exchange session changes and instance heartbeats are published to.
    pub presence_exchange: String,
    /// First reconnect delay in milliseconds.
    pub reconnect_initial_ms: u64,
    /// Reconnect delay cap in milliseconds.
    pub reconnect_max_ms: u64,
    /// Browser publishes held (buffered or awaiting confirm) before new ones are refused.
    pub publish_buffer_messages: usize,
    /// Bytes held for browser publishes (buffered or awaiting confirm: bodies, the web copy
    /// of their data, ids) before new publishes are refused.
    pub publish_buffer_bytes: usize,
    /// How long a publish may wait for the broker to come back, in milliseconds.
    pub publish_ttl_ms: u64,
    /// Certificates for `amqps://` URLs.
    pub tls: TlsConfig,
}

/// `amqp.tls`: the files `amqps://` connections use. The broker's certificate is always
/// verified against the URL's host; there is deliberately no switch to turn that off.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM CA certificate(s) that sign the broker's certificate, trusted instead of the
    /// system's trust store; `None` uses the system's trust store.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate (chain after it), for brokers that require one; with `key_file`.
    pub cert_file: Option<PathBuf>,
    /// Unencrypted PKCS#8 PEM private key of `cert_file`.
    pub key_file: Option<PathBuf>,
}

impl TlsConfig {
    /// True when any file is set.
    pub fn is_set(&self) -> bool {
        *self != TlsConfig::default()
    }

    /// Reads the files (again: a renewed certificate is picked up at the next connect) and
    /// builds the TLS connector for `amqps://` URLs.
    pub fn connector(&self) -> Result<native_tls::TlsConnector, crate::tls::TlsFileError> {
        let client = self.cert_file.as_deref().zip(self.key_file.as_deref());
        crate::tls::connector(self.ca_file.as_deref(), client)
    }
}

/// WebSocket session limits and heartbeat.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WsConfig {
    /// Largest accepted frame (or reassembled message); larger ones close with 1009.
    pub max_frame_bytes: usize,
    /// Server ping interval in milliseconds.
    pub heartbeat_interval_ms: u64,
    /// Silence after which a peer is considered dead, in milliseconds.
    pub client_timeout_ms: u64,
    /// Frames queued for one browser before it is closed as too slow (1013); 0 (the default)
    /// sets no frame limit, so that a burst of small events cannot close a browser that keeps
    /// up: the byte budget governs. A run of one desk's events queued together (desktop
    /// events; with history on, live stream events; up to 64 KiB) counts as one.
    pub outbound_queue_frames: usize,
    /// Bytes queued for one browser (each frame counted with its queueing overhead) before it
    /// is closed as too slow (1013).
    pub outbound_queue_bytes: usize,
    /// Concurrent sessions; further upgrades get 503.
    pub max_sessions: usize,
    /// Desks named in one subscribe or unsubscribe.
    pub max_desks_per_subscribe: usize,
    /// Frames a browser may send per second before getting `rate_limited`.
    pub max_frames_per_second: u32,
    /// Browser requests waiting for the router, all sessions together; past it a request is
    /// answered `rate_limited` at once instead of queueing without bound.
    pub max_queued_requests: usize,
    /// Browser `request`s one session may have waiting for their answer; past it a request is
    /// answered `rate_limited`. High enough that a real app never meets it: it only stops a
    /// session from holding the router's memory with requests nobody answers.
    pub max_pending_requests: usize,
    /// Origins whose pages may open a WebSocket: `[]` only the bridge's own origin (Origin
    /// host:port = Host), `["*"]` any, else exact origins like `https://desk.example.com`. A
    /// handshake without `Origin` (not a browser) is always allowed.
    pub allowed_origins: Vec<String>,
    /// Concurrent sessions from one IP address (an IPv6 address counts by its /64); further
    /// upgrades get 429.
    pub max_sessions_per_ip: usize,
    /// On a loopback bind, the `Host` names a handshake may carry besides loopback ones
    /// (`localhost`, 127.0.0.0/8, `[::1]`); others get 403 (DNS rebinding). `name` allows any
    /// port, `name:port` that port only. Not checked on other binds.
    pub allowed_hosts: Vec<String>,
}

/// `[auth]`: identity and permissions.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// `none` (anyone who can reach the port) or `jwt`.
    pub mode: AuthMode,
    /// With `mode = "none"`, allow a bind address that is not loopback.
    pub allow_anonymous: bool,
    /// How long a session may take to send its `auth` frame, in milliseconds.
    pub timeout_ms: u64,
    /// Keys and claim rules for `mode = "jwt"`.
    pub jwt: JwtConfig,
}

/// How browsers are identified.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthMode {
    /// No identity: every session may do everything.
    #[default]
    None,
    /// A JWT on `?token=` or in the first `auth` frame.
    Jwt,
}

/// `[auth.jwt]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JwtConfig {
    /// File holding the HS256 secret (a trailing newline is ignored).
    pub hs256_secret_file: Option<PathBuf>,
    /// The HS256 secret from `DESKBRIDGE_JWT_SECRET`; wins over the file.
    #[serde(skip)]
    pub hs256_secret: Option<Secret>,
    /// PEM public key (RSA for RS256, P-256 EC for ES256).
    pub public_key_file: Option<PathBuf>,
    /// When set, tokens must carry this `iss`.
    pub issuer: Option<String>,
    /// When set, tokens must carry this `aud`.
    pub audience: Option<String>,
}

impl std::str::FromStr for AuthMode {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "none" => Ok(AuthMode::None),
            "jwt" => Ok(AuthMode::Jwt),
            other => Err(format!("`{other}` is not an auth mode: none or jwt")),
        }
    }
}

/// A secret that never shows in `Debug` output or logs.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(secret: String) -> Self {
        Secret(secret)
    }

    /// The secret itself, for the one place that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            mode: AuthMode::None,
            allow_anonymous: false,
            timeout_ms: 5_000,
            jwt: JwtConfig::default(),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            bind: "127.0.0.1:8080".into(),
            workers: 0,
            desks: vec!["A".into(), "B".into()],
            events: vec![
                "new_example".into(),
                "update_example".into(),
                "delete_example".into(),
            ],
            shutdown_timeout_ms: 10_000,
            amqp: AmqpConfig::default(),
            ws: WsConfig::default(),
            auth: AuthConfig::default(),
            transforms: Vec::new(),
            history: HistoryConfig::default(),
            desk_policy: Vec::new(),
            presence: PresenceConfig::default(),
        }
    }
}

impl Default for AmqpConfig {
    fn default() -> Self {
        AmqpConfig {
            // A constant that parses.
            urls: vec!["amqp://guest:guest@127.0.0.1:5672/%2f"
                .parse()
                .expect("the default URL is valid")],
            prefetch: 256,
            inbound_exchange: "example".into(),
            inbound_queue: "listener".into(),
            outbound_exchange: "bwic".into(),
            presence_exchange: "deskbridge.presence".into(),
            reconnect_initial_ms: 100,
            reconnect_max_ms: 10_000,
            publish_buffer_messages: 10_000,
            publish_buffer_bytes: 64 * 1024 * 1024,
            publish_ttl_ms: 30_000,
            tls: TlsConfig::default(),
        }
    }
}

impl Default for WsConfig {
    fn default() -> Self {
        WsConfig {
            max_frame_bytes: 64 * 1024,
            heartbeat_interval_ms: 10_000,
            client_timeout_ms: 30_000,
            outbound_queue_frames: 0,
            outbound_queue_bytes: 8 * 1024 * 1024,
            max_sessions: 10_000,
            max_desks_per_subscribe: 64,
            max_frames_per_second: 1000,
            max_queued_requests: 65_536,
            max_pending_requests: 1000,
            allowed_origins: Vec::new(),
            max_sessions_per_ip: 256,
            allowed_hosts: Vec::new(),
        }
    }
}

/// Why a configuration was refused; each names the file or key to fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The `--config` file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// File given with `--config`.
        path: PathBuf,
        /// Underlying I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML or has a key of the wrong type or name. The offending line
    /// is quoted with any URL password masked: the file may hold secrets.
    #[error("config file {path}, line {line}: {message}\n    {excerpt}")]
    Parse {
        /// File given with `--config`.
        path: PathBuf,
        /// 1-based line of the mistake.
        line: usize,
        /// That line, passwords masked.
        excerpt: String,
        /// TOML's explanation, which names the key when it is unknown or mistyped.
        message: String,
    },
    /// A value parsed but makes no sense.
    #[error("config key `{key}`: {reason}")]
    Invalid {
        /// Dotted key path, e.g. `amqp.prefetch`.
        key: String,
        /// What is wrong and what is allowed.
        reason: String,
    },
}

/// Values that override the file, gathered from flags and the environment by `main`.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    /// `--bind` or `DESKBRIDGE_BIND`.
    pub bind: Option<String>,
    /// `AMQP_URL`: one URL or a comma-separated list.
    pub amqp_url: Option<String>,
    /// `--auth-mode` or `DESKBRIDGE_AUTH_MODE`.
    pub auth_mode: Option<AuthMode>,
    /// `--allow-anonymous` or `DESKBRIDGE_ALLOW_ANONYMOUS`.
    pub allow_anonymous: Option<bool>,
    /// `DESKBRIDGE_JWT_SECRET`: the HS256 secret itself.
    pub jwt_secret: Option<Secret>,
}

impl Config {
    /// Builds the configuration: defaults, then `path` if given, then `overrides`, then validates.
    pub fn load(path: Option<&Path>, overrides: &Overrides) -> Result<Config, ConfigError> {
        let mut config = match path {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        if let Some(bind) = &overrides.bind {
            config.bind = bind.clone();
        }
        if let Some(mode) = overrides.auth_mode {
            config.auth.mode = mode;
        }
        if let Some(allow) = overrides.allow_anonymous {
            config.auth.allow_anonymous = allow;
        }
        if let Some(secret) = &overrides.jwt_secret {
            config.auth.jwt.hs256_secret = Some(secret.clone());
        }
        if let Some(urls) = &overrides.amqp_url {
            config.amqp.urls = split_urls(urls)
                .iter()
                .map(|url| BrokerUrl::parse(url))
                .collect::<Result<_, _>>()
                .map_err(|error| ConfigError::Invalid {
                    key: "amqp.urls (from AMQP_URL)".into(),
                    reason: error.to_string(),
                })?;
        }
        config.validate()?;
        Ok(config)
    }

    fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::from_toml(&text, path)
    }

    /// Parses TOML text read from `path` (named in errors).
    fn from_toml(text: &str, path: &Path) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|error| {
            let start = error.span().map_or(0, |span| span.start).min(text.len());
            let line_start = text[..start].rfind('\n').map_or(0, |i| i + 1);
            let line_end = text[start..].find('\n').map_or(text.len(), |i| start + i);
            let line = text[line_start..line_end].trim();
            let (excerpt, message) = match line.split_once('=') {
                // A mistyped secret key must not print the secret it holds.
                Some((key, _)) if looks_secret(key) => (
                    format!("{} = ***", key.trim()),
                    "this key is not accepted here (value hidden)".into(),
                ),
                _ => (mask_passwords(line), mask_passwords(error.message())),
            };
            ConfigError::Parse {
                path: path.to_owned(),
                line: text[..start].matches('\n').count() + 1,
                excerpt,
                message,
            }
        })
    }

    /// Checks cross-field rules that serde cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.bind.parse::<std::net::SocketAddr>().is_err() {
            return invalid(
                "bind",
                format!("`{}` is not an address like 127.0.0.1:8080", self.bind),
            );
        }
        check_names("desks", &self.desks, true)?;
        check_names("events", &self.events, false)?;
        self.check_amqp()?;
        self.check_limits()?;
        self.check_access()?;
        self.check_history()?;
        self.check_transforms()
    }

    /// Stream settings make sense, and each desk policy names a desk and can be carried out.
    fn check_history(&self) -> Result<(), ConfigError> {
        let history = &self.history;
        if history.stream_prefix.is_empty() {
            return invalid("history.stream_prefix", "must not be empty");
        }
        if !valid_max_age(&history.max_age) {
            return invalid(
                "history.max_age",
                format!(
                    "`{}` is not a RabbitMQ age: a number and one of Y M D h m s, like \"1h\" or \"7D\"",
                    history.max_age
                ),
            );
        }
        for (key, value) in [
            ("history.max_bytes", history.max_bytes),
            ("history.memory_bytes", history.memory_bytes as u64),
            ("history.replay_batch", history.replay_batch as u64),
            ("history.max_snapshot", history.max_snapshot as u64),
        ] {
            if value == 0 {
                return invalid(key, "must be greater than 0");
            }
        }
        for (i, policy) in self.desk_policy.iter().enumerate() {
            let key = format!("desk_policy[{i}]");
            if !self.desks.contains(&policy.desk) {
                return invalid(
                    &format!("{key}.desk"),
                    format!("`{}` is not a configured desk", policy.desk),
                );
            }
            if self.desk_policy[..i]
                .iter()
                .any(|other| other.desk == policy.desk)
            {
                return invalid(
                    &format!("{key}.desk"),
                    format!("desk `{}` has two policies", policy.desk),
                );
            }
            if policy.slow != SlowPolicy::Close && !history.enabled {
                return invalid(
                    &format!("{key}.slow"),
                    "catch_up and latest need history.enabled = true: a browser that fell behind is fed \
                     from the desk's history",
                );
            }
            match (policy.slow, &policy.conflate_key) {
                (SlowPolicy::Latest, None) => {
                    return invalid(
                        &format!("{key}.conflate_key"),
                        "is required with slow = \"latest\": the field of data that identifies a key",
                    )
                }
                (SlowPolicy::Close | SlowPolicy::CatchUp, Some(_)) => {
                    return invalid(
                        &format!("{key}.conflate_key"),
                        "is only used with slow = \"latest\"",
                    )
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// True when `bind` is a loopback address: only this machine reaches the bridge, and a
    /// handshake's `Host` must say so (`ws.allowed_hosts`).
    pub fn loopback_bind(&self) -> bool {
        self.bind
            .parse::<std::net::SocketAddr>()
            .is_ok_and(|addr| addr.ip().is_loopback())
    }

    /// Who may connect: an open bridge only on loopback unless explicitly allowed; origins that
    /// parse.
    fn check_access(&self) -> Result<(), ConfigError> {
        let loopback = self.loopback_bind();
        if self.auth.mode == AuthMode::None && !loopback && !self.auth.allow_anonymous {
            return invalid(
                "auth.mode",
                format!(
                    "is \"none\" but bind {} is reachable from other machines: anyone there could read \
                     and publish on every desk. Set auth.mode = \"jwt\" (DESKBRIDGE_AUTH_MODE=jwt), or \
                     auth.allow_anonymous = true (DESKBRIDGE_ALLOW_ANONYMOUS=true) on a trusted network",
                    self.bind
                ),
            );
        }
        for host in &self.ws.allowed_hosts {
            if crate::host::split_host(host).is_none() {
                return invalid(
                    "ws.allowed_hosts",
                    format!("`{host}` is not a host name like desk.example.com or desk.example.com:8080"),
                );
            }
        }
        for origin in &self.ws.allowed_origins {
            if origin == "*" {
                if self.ws.allowed_origins.len() > 1 {
                    return invalid("ws.allowed_origins", "`*` allows every origin: list it alone");
                }
                continue;
            }
            let parsed = url::Url::parse(origin).ok().filter(|url| {
                matches!(url.scheme(), "http" | "https") && url.host().is_some() && url.path() == "/"
            });
            if parsed.is_none() {
                return invalid(
                    "ws.allowed_origins",
                    format!("`{origin}` is not an origin like https://desk.example.com or http://host:8080"),
                );
            }
        }
        Ok(())
    }

    /// URLs, names and backoff of the AMQP side.
    fn check_amqp(&self) -> Result<(), ConfigError> {
        if self.amqp.urls.is_empty() {
            return invalid("amqp.urls", "at least one amqp:// or amqps:// URL is required");
        }
        for (key, value) in [
            ("amqp.inbound_exchange", &self.amqp.inbound_exchange),
            ("amqp.inbound_queue", &self.amqp.inbound_queue),
            ("amqp.outbound_exchange", &self.amqp.outbound_exchange),
            ("amqp.presence_exchange", &self.amqp.presence_exchange),
        ] {
            if value.is_empty() {
                return invalid(key, "must not be empty");
            }
        }
        // Below 100 ms heartbeats would be most of the presence traffic.
        if self.presence.heartbeat_ms < 100 {
            return invalid("presence.heartbeat_ms", "must be at least 100");
        }
        if self.amqp.reconnect_max_ms < self.amqp.reconnect_initial_ms {
            return invalid(
                "amqp.reconnect_max_ms",
                "must be at least amqp.reconnect_initial_ms",
            );
        }
        self.check_tls()
    }

    /// `amqp.tls` goes with `amqps://` URLs, and its files load now rather than at the first
    /// connect: a typo in a path stops start-up instead of leaving the link down.
    fn check_tls(&self) -> Result<(), ConfigError> {
        let tls = &self.amqp.tls;
        match (&tls.cert_file, &tls.key_file) {
            (Some(_), None) => {
                return invalid(
                    "amqp.tls.key_file",
                    "is required with amqp.tls.cert_file (its unencrypted PKCS#8 PEM key)",
                )
            }
            (None, Some(_)) => {
                return invalid(
                    "amqp.tls.cert_file",
                    "is required with amqp.tls.key_file (the client certificate, PEM)",
                )
            }
            _ => {}
        }
        let any_tls_url = self.amqp.urls.iter().any(|url| url.tls);
        if tls.is_set() && !any_tls_url {
            // Certificates without an amqps:// URL would connect in clear text while the
            // operator believes otherwise.
            return invalid(
                "amqp.tls",
                "is set but no URL in amqp.urls is amqps://, so nothing would be encrypted: \
                 use amqps:// URLs (port 5671 by default) or remove amqp.tls",
            );
        }
        if any_tls_url {
            tls.connector().map_err(|error| ConfigError::Invalid {
                key: error.key().into(),
                reason: error.to_string(),
            })?;
        }
        Ok(())
    }

    /// Every count, size and interval must be positive; the heartbeat must fit its timeout.
    fn check_limits(&self) -> Result<(), ConfigError> {
        for (key, value) in [
            ("amqp.prefetch", self.amqp.prefetch as u64),
            ("amqp.reconnect_initial_ms", self.amqp.reconnect_initial_ms),
            (
                "amqp.publish_buffer_messages",
                self.amqp.publish_buffer_messages as u64,
            ),
            ("amqp.publish_buffer_bytes", self.amqp.publish_buffer_bytes as u64),
            ("amqp.publish_ttl_ms", self.amqp.publish_ttl_ms),
            ("ws.max_frame_bytes", self.ws.max_frame_bytes as u64),
            ("ws.heartbeat_interval_ms", self.ws.heartbeat_interval_ms),
            ("ws.outbound_queue_bytes", self.ws.outbound_queue_bytes as u64),
            ("ws.max_sessions", self.ws.max_sessions as u64),
            (
                "ws.max_desks_per_subscribe",
                self.ws.max_desks_per_subscribe as u64,
            ),
            ("ws.max_frames_per_second", self.ws.max_frames_per_second as u64),
            ("ws.max_queued_requests", self.ws.max_queued_requests as u64),
            ("ws.max_pending_requests", self.ws.max_pending_requests as u64),
            ("ws.max_sessions_per_ip", self.ws.max_sessions_per_ip as u64),
            ("auth.timeout_ms", self.auth.timeout_ms),
        ] {
            if value == 0 {
                return invalid(key, "must be greater than 0");
            }
        }
        if self.ws.client_timeout_ms <= self.ws.heartbeat_interval_ms {
            return invalid(
                "ws.client_timeout_ms",
                "must be longer than ws.heartbeat_interval_ms",
            );
        }
        Ok(())
    }

    /// Transform rules name configured desks and events (or `*`).
    fn check_transforms(&self) -> Result<(), ConfigError> {
        for (i, rule) in self.transforms.iter().enumerate() {
            let key = format!("transforms[{i}]");
            if rule.desk != "*" && !self.desks.contains(&rule.desk) {
                return invalid(
                    &format!("{key}.desk"),
                    format!("`{}` is neither a configured desk nor `*`", rule.desk),
                );
            }
            if rule.event != "*" && !self.events.contains(&rule.event) {
                return invalid(
                    &format!("{key}.event"),
                    format!("`{}` is neither a configured event nor `*`", rule.event),
                );
            }
        }
        Ok(())
    }

    /// `shutdown_timeout_ms` as a duration.
    pub fn shutdown_timeout(&self) -> Duration {
        Duration::from_millis(self.shutdown_timeout_ms)
    }
}

/// True for an age RabbitMQ accepts as `x-max-age`: digits then one unit of `YMDhms`.
fn valid_max_age(age: &str) -> bool {
    let Some(unit) = age.chars().last() else {
        return false;
    };
    let digits = &age[..age.len() - unit.len_utf8()];
    "YMDhms".contains(unit) && !digits.is_empty() && digits.chars().all(|c| c.is_ascii_digit())
}

/// True for a key whose value is probably a secret (`hs256_secret`, `password`, `token`...).
fn looks_secret(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    ["secret", "password", "token", "passwd"]
        .iter()
        .any(|word| key.contains(word))
}

/// Splits `AMQP_URL`'s comma-separated list, ignoring blanks.
pub fn split_urls(list: &str) -> Vec<String> {
    list.split(',')
        .map(str::trim)
        .filter(|url| !url.is_empty())
        .map(String::from)
        .collect()
}

fn check_names(key: &str, names: &[String], is_desk: bool) -> Result<(), ConfigError> {
    if names.is_empty() {
        return invalid(key, "at least one name is required");
    }
    for name in names {
        let ok_char = |c: char| c.is_ascii_alphanumeric() || c == '-' || (!is_desk && c == '_');
        if name.is_empty() || !name.chars().all(ok_char) {
            let allowed = if is_desk {
                "letters, digits and `-` (no `_`: it separates desk from event in routing keys)"
            } else {
                "letters, digits, `-` and `_`"
            };
            return invalid(key, format!("`{name}` may only contain {allowed}"));
        }
    }
    let mut sorted: Vec<&String> = names.iter().collect();
    sorted.sort();
    if let Some(pair) = sorted.windows(2).find(|pair| pair[0] == pair[1]) {
        return invalid(key, format!("`{}` is listed twice", pair[0]));
    }
    Ok(())
}

fn invalid<T>(key: &str, reason: impl Into<String>) -> Result<T, ConfigError> {
    Err(ConfigError::Invalid {
        key: key.into(),
        reason: reason.into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        let config = Config::from_toml(text, Path::new("test.toml"))?;
        config.validate()?;
        Ok(config)
    }

    #[test]
    fn defaults_are_valid_and_match_the_seed_names() {
        let config = parse("").expect("defaults validate");
        assert_eq!(config.bind, "127.0.0.1:8080");
        assert_eq!(config.desks, ["A", "B"]);
        assert_eq!(config.amqp.inbound_exchange, "example");
        assert_eq!(config.amqp.inbound_queue, "listener");
        assert_eq!(config.amqp.outbound_exchange, "bwic");
        assert_eq!(config.amqp.prefetch, 256);
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            ("desks = []", "desks"),
            ("desks = [\"A_1\"]", "desks"),
            ("events = [\"x\", \"x\"]", "events"),
            ("bind = \"nowhere\"", "bind"),
            ("[amqp]\nprefetch = 0", "amqp.prefetch"),
            ("[ws]\nclient_timeout_ms = 5", "ws.client_timeout_ms"),
            ("bind = \"0.0.0.0:8080\"", "auth.mode"),
            (
                "[ws]\nallowed_origins = [\"desk.example.com\"]",
                "ws.allowed_origins",
            ),
            (
                "[ws]\nallowed_origins = [\"*\", \"https://a.example\"]",
                "ws.allowed_origins",
            ),
            ("[ws]\nallowed_hosts = [\"*\"]", "ws.allowed_hosts"),
            (
                "[ws]\nallowed_hosts = [\"https://desk.example.com\"]",
                "ws.allowed_hosts",
            ),
            ("[ws]\nallowed_hosts = [\"desk:http\"]", "ws.allowed_hosts"),
            (
                "[[transforms]]\ndesk = \"Z\"\ndirection = \"to_web\"",
                "transforms[0].desk",
            ),
            ("[amqp.tls]\ncert_file = \"c.pem\"", "amqp.tls.key_file"),
            ("[amqp.tls]\nkey_file = \"k.pem\"", "amqp.tls.cert_file"),
            ("[amqp.tls]\nca_file = \"ca.pem\"", "amqp.tls"),
            ("[amqp.tls]\nverify = false", "verify"),
            (
                "[amqp]\nurls = [\"amqps://h\"]\n[amqp.tls]\nca_file = \"/no/such/ca.pem\"",
                "amqp.tls.ca_file",
            ),
            ("[history]\nmax_age = \"60\"", "history.max_age"),
            ("[history]\nstream_prefix = \"\"", "history.stream_prefix"),
            (
                "[[desk_policy]]\ndesk = \"Z\"\nslow = \"close\"",
                "desk_policy[0].desk",
            ),
            (
                "[[desk_policy]]\ndesk = \"A\"\nslow = \"catch_up\"",
                "desk_policy[0].slow",
            ),
            (
                "[history]\nenabled = true\n[[desk_policy]]\ndesk = \"A\"\nslow = \"latest\"",
                "desk_policy[0].conflate_key",
            ),
            (
                "[history]\nenabled = true\n[[desk_policy]]\ndesk = \"A\"\nslow = \"close\"\n\
                 [[desk_policy]]\ndesk = \"A\"\nslow = \"close\"",
                "desk_policy[1].desk",
            ),
        ];
        for (text, key) in cases {
            let err = parse(text).expect_err(text).to_string();
            assert!(err.contains(&format!("`{key}`")), "{text:?} gave {err}");
        }
    }

    #[test]
    fn an_open_bridge_off_loopback_needs_a_decision() {
        for text in [
            "bind = \"0.0.0.0:8080\"\n[auth]\nallow_anonymous = true",
            "bind = \"0.0.0.0:8080\"\n[auth]\nmode = \"jwt\"",
            "bind = \"[::1]:8080\"",
            "[ws]\nallowed_origins = [\"https://desk.example.com\", \"http://127.0.0.1:8080\"]",
            "[ws]\nallowed_hosts = [\"desk.example.com\", \"desk.example.com:8443\", \"[fd00::1]:80\"]",
        ] {
            parse(text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
        }
    }

    #[test]
    fn amqps_without_a_ca_file_uses_the_system_trust_store() {
        let config =
            parse("[amqp]\nurls = [\"amqps://u:p@rabbit/%2f\", \"amqp://fallback\"]").expect("valid");
        assert!(config.amqp.urls[0].tls && !config.amqp.urls[1].tls);
        assert!(!config.amqp.tls.is_set());
        config
            .amqp
            .tls
            .connector()
            .expect("the system's trust store loads");
    }

    #[test]
    fn a_bad_broker_url_is_shown_without_its_password() {
        let err = parse("[amqp]\nurls = [\"http://u:secret@x\"]")
            .expect_err("bad URL")
            .to_string();
        assert!(err.contains("urls") && err.contains("amqp://"), "{err}");
        assert!(!err.contains("secret"), "{err}");
    }

    #[test]
    fn a_misplaced_secret_is_never_printed() {
        let err = parse("[auth.jwt]\nhs256_secret = \"s3cr3t-value\"")
            .expect_err("unknown key")
            .to_string();
        assert!(err.contains("hs256_secret") && !err.contains("s3cr3t"), "{err}");
    }

    #[test]
    fn unknown_and_ill_typed_keys_are_refused_by_name() {
        let err = parse("[amqp]\nprefech = 10").expect_err("typo").to_string();
        assert!(err.contains("prefech"), "{err}");
        let err = parse("[ws]\nmax_frame_bytes = \"big\"")
            .expect_err("type")
            .to_string();
        assert!(err.contains("max_frame_bytes"), "{err}");
    }

    #[test]
    fn overrides_beat_the_file() {
        let dir = std::env::temp_dir().join(format!("deskbridge-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("c.toml");
        std::fs::write(&path, "bind = \"127.0.0.1:1\"\n").expect("write");
        let overrides = Overrides {
            bind: Some("127.0.0.1:2".into()),
            amqp_url: Some("amqp://a:5672/%2f, amqp://b:5672/%2f".into()),
            ..Overrides::default()
        };
        let config = Config::load(Some(&path), &overrides).expect("valid");
        assert_eq!(config.bind, "127.0.0.1:2");
        let urls: Vec<String> = config.amqp.urls.iter().map(ToString::to_string).collect();
        assert_eq!(urls, ["amqp://a:5672/%2f", "amqp://b:5672/%2f"]);
        let bad = Overrides {
            amqp_url: Some("amqp://a, http://u:secret@b".into()),
            ..Overrides::default()
        };
        let error = Config::load(Some(&path), &bad).expect_err("bad URL").to_string();
        assert!(error.contains("AMQP_URL") && !error.contains("secret"), "{error}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
