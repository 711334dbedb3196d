//! The deskbridge binary as a child process, configured by a TOML file, as an operator runs it.
//!
//! The binary's path is a parameter: tests pass `env!("CARGO_BIN_EXE_deskbridge")` (set for
//! integration tests only), the bench its `--bridge-bin`.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, Command, ExitStatus, Stdio};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use deskbridge::config::Config;
use serde_json::Value;

use super::http::wait_health;
use super::DEADLINE;

/// A TOML config in a temp file of its own, deleted on drop.
pub struct ConfigFile {
    path: PathBuf,
}

impl ConfigFile {
    pub fn write(text: &str) -> ConfigFile {
        let name = format!("deskbridge-{}.toml", uuid::Uuid::new_v4().simple());
        let path = std::env::temp_dir().join(name);
        std::fs::write(&path, text).unwrap_or_else(|error| panic!("write {}: {error}", path.display()));
        ConfigFile { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ConfigFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// What a launched bridge takes from `config`, as TOML: `bind`, `workers`,
/// `shutdown_timeout_ms`, the AMQP URLs, names and `amqp.tls`, `presence.heartbeat_ms`,
/// `ws.max_sessions_per_ip`, `[history]` when it is enabled, and `[auth]` with its key files
/// when `auth.mode = "jwt"` (the rest keeps its defaults).
pub fn config_toml(config: &Config) -> String {
    let amqp = &config.amqp;
    let mut amqp_table = toml::Table::new();
    let urls: Vec<&str> = amqp.urls.iter().map(|url| url.reveal()).collect();
    amqp_table.insert("urls".into(), urls.into());
    amqp_table.insert("inbound_exchange".into(), amqp.inbound_exchange.clone().into());
    amqp_table.insert("inbound_queue".into(), amqp.inbound_queue.clone().into());
    amqp_table.insert("outbound_exchange".into(), amqp.outbound_exchange.clone().into());
    amqp_table.insert("presence_exchange".into(), amqp.presence_exchange.clone().into());
    let mut tls = toml::Table::new();
    for (key, path) in [
        ("ca_file", &amqp.tls.ca_file),
        ("cert_file", &amqp.tls.cert_file),
        ("key_file", &amqp.tls.key_file),
    ] {
        if let Some(path) = path {
            let path = path.to_str().expect("test paths are UTF-8");
            tls.insert(key.into(), path.into());
        }
    }
    if !tls.is_empty() {
        amqp_table.insert("tls".into(), tls.into());
    }
    let mut table = toml::Table::new();
    table.insert("bind".into(), config.bind.clone().into());
    table.insert("workers".into(), number(config.workers as u64));
    table.insert("shutdown_timeout_ms".into(), number(config.shutdown_timeout_ms));
    table.insert("amqp".into(), amqp_table.into());
    let mut presence = toml::Table::new();
    presence.insert("heartbeat_ms".into(), number(config.presence.heartbeat_ms));
    table.insert("presence".into(), presence.into());
    let mut ws = toml::Table::new();
    ws.insert(
        "max_sessions_per_ip".into(),
        number(config.ws.max_sessions_per_ip as u64),
    );
    table.insert("ws".into(), ws.into());
    if config.history.enabled {
        table.insert("history".into(), history_table(&config.history).into());
    }
    if config.auth.mode == deskbridge::config::AuthMode::Jwt {
        let jwt = &config.auth.jwt;
        let mut jwt_table = toml::Table::new();
        let path = |p: &Option<std::path::PathBuf>| p.as_ref().map(|p| p.display().to_string());
        for (key, value) in [
            ("hs256_secret_file", path(&jwt.hs256_secret_file)),
            ("public_key_file", path(&jwt.public_key_file)),
            ("issuer", jwt.issuer.clone()),
            ("audience", jwt.audience.clone()),
        ] {
            if let Some(value) = value {
                jwt_table.insert(key.into(), value.into());
            }
        }
        let mut auth = toml::Table::new();
        auth.insert("mode".into(), "jwt".into());
        auth.insert("jwt".into(), jwt_table.into());
        table.insert("auth".into(), auth.into());
    }
    table.to_string()
}

/// A count or size as a TOML integer.
fn number(n: u64) -> toml::Value {
    toml::Value::Integer(i64::try_from(n).expect("fits TOML's i64"))
}

/// `[history]` as TOML, every key written.
fn history_table(history: &deskbridge::config::HistoryConfig) -> toml::Table {
    let mut table = toml::Table::new();
    table.insert("enabled".into(), true.into());
    table.insert("max_age".into(), history.max_age.clone().into());
    table.insert("max_bytes".into(), number(history.max_bytes));
    table.insert("stream_prefix".into(), history.stream_prefix.clone().into());
    table.insert("memory_bytes".into(), number(history.memory_bytes as u64));
    table.insert("replay_batch".into(), number(history.replay_batch as u64));
    table.insert("max_snapshot".into(), number(history.max_snapshot as u64));
    if let Some(size) = history.initial_cluster_size {
        table.insert("initial_cluster_size".into(), number(size.into()));
    }
    table
}

/// `binary --config <config>` with the environment's overrides (`DESKBRIDGE_BIND`, `AMQP_URL`)
/// removed, so that the file alone decides.
pub fn bridge_command(binary: impl AsRef<OsStr>, config: &Path) -> Command {
    let mut command = Command::new(binary);
    command
        .arg("--config")
        .arg(config)
        .env_remove("DESKBRIDGE_BIND")
        .env_remove("AMQP_URL");
    command
}

/// A running deskbridge binary; killed (and its config file deleted) on drop.
pub struct BridgeProcess {
    child: Child,
    /// Where it serves HTTP and WebSocket, from its `LISTENING_ON` log line.
    pub addr: SocketAddr,
    /// Every line it logged so far.
    log: Log,
    _config: ConfigFile,
}

/// A child's log lines, appended by the thread that reads its stderr.
type Log = Arc<Mutex<Vec<String>>>;

impl BridgeProcess {
    /// Writes `config` (see `config_toml`) to a temp file, starts `binary` on it with
    /// `RUST_LOG=warn,deskbridge=info`, and returns once it logged its address (failing after
    /// `DEADLINE`). From then on its WARN and ERROR lines are copied to stderr as
    /// `  bridge: <line>`. `Err` when the binary cannot be started at all.
    pub fn launch(binary: impl AsRef<OsStr>, config: &Config) -> std::io::Result<BridgeProcess> {
        BridgeProcess::launch_logging(binary, config, "warn,deskbridge=info")
    }

    /// [`BridgeProcess::launch`] with this `RUST_LOG`.
    pub fn launch_logging(
        binary: impl AsRef<OsStr>,
        config: &Config,
        rust_log: &str,
    ) -> std::io::Result<BridgeProcess> {
        let file = ConfigFile::write(&config_toml(config));
        let mut child = bridge_command(binary, file.path())
            .env("RUST_LOG", rust_log)
            .stderr(Stdio::piped())
            .spawn()?;
        let log = Log::default();
        let address = follow_stderr(child.stderr.take().expect("stderr is piped"), Arc::clone(&log));
        match address.recv_timeout(DEADLINE) {
            Ok(addr) => Ok(BridgeProcess {
                child,
                addr,
                log,
                _config: file,
            }),
            Err(error) => {
                let _ = child.kill();
                let exit = child.wait();
                panic!("deskbridge never logged its address ({error}); it ended: {exit:?}")
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until `/health` answers 200 (both AMQP links up), failing after `within`.
    pub async fn wait_healthy(&self, within: Duration) -> Value {
        wait_health(self.addr, 200, within).await
    }

    /// Waits until a logged line contains every one of `needles` and returns it; fails the
    /// test after `within`, showing what was logged.
    pub fn wait_for_log(&self, needles: &[&str], within: Duration) -> String {
        let started = Instant::now();
        loop {
            let lines = self
                .log
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone();
            if let Some(line) = lines.iter().find(|line| needles.iter().all(|n| line.contains(n))) {
                return line.clone();
            }
            assert!(
                started.elapsed() < within,
                "deskbridge never logged a line with {needles:?}; it logged:\n{}",
                lines.join("\n")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The logged lines that contain `needle`.
    pub fn log_lines(&self, needle: &str) -> Vec<String> {
        let lines = self.log.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        lines
            .iter()
            .filter(|line| line.contains(needle))
            .cloned()
            .collect()
    }

    /// Sends SIGTERM, deskbridge's signal for a graceful shutdown.
    pub fn terminate(&self) -> std::io::Result<()> {
        let pid = libc::pid_t::try_from(self.child.id()).expect("a pid fits pid_t");
        // SAFETY: kill(2) touches no memory of ours. The pid is our child's and is not reaped
        // before `wait_exit` or `drop`, so it cannot name another process.
        if unsafe { libc::kill(pid, libc::SIGTERM) } == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    /// SIGKILL, as a crash: nothing is cleaned up, no goodbye is said.
    pub fn kill(&mut self) {
        self.child.kill().expect("kill deskbridge");
        self.child.wait().expect("reap deskbridge");
    }

    /// Waits up to `within` for the process to exit, polling every 20 ms; `None` while it runs.
    pub fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for deskbridge") {
                return Some(status);
            }
            if started.elapsed() >= within {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, up to 15 s for the graceful exit, then SIGKILL (by `drop`).
    pub fn stop(mut self) {
        let _ = self.terminate();
        let _ = self.wait_exit(Duration::from_secs(15));
    }
}

impl Drop for BridgeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads the bridge's stderr on a thread of its own until it closes: keeps every line in
/// `log`, sends the address of the `LISTENING_ON` line, copies WARN and ERROR lines to our
/// stderr.
fn follow_stderr(stderr: ChildStderr, log: Log) -> Receiver<SocketAddr> {
    let (address, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            log.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(line.clone());
            if let Some(addr) = line.split(deskbridge::LISTENING_ON).nth(1) {
                let addr = addr
                    .trim()
                    .parse()
                    .unwrap_or_else(|error| panic!("`{line}` ends in a socket address: {error}"));
                let _ = address.send(addr);
            } else if line.contains("WARN") || line.contains("ERROR") {
                eprintln!("  bridge: {line}");
            }
        }
    });
    receiver
}
