//! A bridge inside the test process: its own thread and actix system, as in production.

use std::net::SocketAddr;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use deskbridge::config::Config;
use deskbridge::Transforms;
use serde_json::Value;

use super::amqp::{amqp_url, delete_topology, require_broker, url};
use super::browser::{ws_url, Browser};
use super::http::{http_get, wait_health};
use super::{poll, unique, DEADLINE};

/// A config for one test: port 0, unique exchanges and queue, short timeouts.
pub fn test_config(test: &str) -> Config {
    let mut config = Config {
        bind: "127.0.0.1:0".into(),
        workers: 1,
        shutdown_timeout_ms: 3_000,
        ..Config::default()
    };
    config.amqp.urls = vec![url(&amqp_url())];
    config.amqp.inbound_exchange = unique(&format!("{test}.in"));
    config.amqp.inbound_queue = unique(&format!("{test}.q"));
    config.amqp.outbound_exchange = unique(&format!("{test}.out"));
    config.amqp.presence_exchange = unique(&format!("{test}.presence"));
    config.amqp.reconnect_initial_ms = 50;
    config.amqp.reconnect_max_ms = 500;
    config
}

/// [`test_config`] with history on and a stream prefix of its own.
pub fn history_config(test: &str) -> Config {
    let mut config = test_config(test);
    config.history.enabled = true;
    config.history.stream_prefix = unique(&format!("{test}.h"));
    config
}

/// [`test_config`] for a bridge that verifies HS256 tokens signed with `secret`.
pub fn jwt_test_config(test: &str, secret: &str) -> Config {
    let mut config = test_config(test);
    config.auth.mode = deskbridge::config::AuthMode::Jwt;
    config.auth.jwt.hs256_secret = Some(deskbridge::config::Secret::new(secret.into()));
    config
}

/// An HS256 token over `claims`, as a token service signs it.
pub fn hs256_token(secret: &str, claims: &Value) -> String {
    let key = jsonwebtoken::EncodingKey::from_secret(secret.as_bytes());
    jsonwebtoken::encode(&jsonwebtoken::Header::default(), claims, &key).expect("sign test token")
}

/// Seconds since the Unix epoch, for `exp` claims.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A bridge running on its own thread and actix system, as in production.
pub struct TestBridge {
    pub addr: SocketAddr,
    pub config: Config,
    /// Whether `Drop` deletes the bridge's exchanges and queue on the tests' broker
    /// (`AMQP_URL`); off for a bridge on a broker of its own, which that broker's end cleans.
    cleanup: bool,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl TestBridge {
    /// Starts a bridge with the config's own transform rules.
    pub fn start(config: Config) -> TestBridge {
        let transforms = Transforms::from_rules(&config.transforms);
        TestBridge::start_with(config, transforms)
    }

    /// Starts a bridge with explicit transforms.
    pub fn start_with(config: Config, transforms: Transforms) -> TestBridge {
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread_config = config.clone();
        let thread = std::thread::spawn(move || {
            actix_web::rt::System::new().block_on(async move {
                let bridge = deskbridge::start(thread_config, transforms)
                    .await
                    .expect("bridge starts");
                addr_tx.send(bridge.local_addr()).expect("test is waiting");
                let _ = stop_rx.await;
                bridge.shutdown().await;
            });
        });
        let addr = addr_rx
            .recv_timeout(DEADLINE)
            .expect("bridge reports its address");
        TestBridge {
            addr,
            config,
            cleanup: true,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// Starts a bridge on a broker of the test's own (`config.amqp.urls`), thrown away with
    /// everything on it: `Drop` does not reach for the tests' broker to clean up, which would
    /// be another broker (or the machine's, on 5672).
    pub fn start_isolated(config: Config) -> TestBridge {
        let mut bridge = TestBridge::start(config);
        bridge.cleanup = false;
        bridge
    }

    /// Starts a bridge and waits until both AMQP links are up; on the tests' broker, fails at
    /// once (saying how to get one) when it is not there.
    pub async fn start_healthy(config: Config) -> TestBridge {
        let on_the_tests_broker = config
            .amqp
            .urls
            .first()
            .is_some_and(|first| first.reveal() == amqp_url());
        if on_the_tests_broker {
            require_broker();
        }
        let bridge = TestBridge::start(config);
        bridge.wait_health(200).await;
        bridge
    }

    /// Waits until the bridge is attached to the streams of `desks` (`[history]` on): until
    /// then a resume is answered `broker_unavailable`, once attached `subscribed`.
    pub async fn wait_attached(&self, desks: &[&str]) {
        wait_attached_at(self.addr, desks).await
    }

    pub fn ws_url(&self) -> String {
        ws_url(self.addr)
    }

    /// Waits until `/health` answers `status`; returns its body.
    pub async fn wait_health(&self, status: u16) -> Value {
        wait_health(self.addr, status, DEADLINE).await
    }

    /// Waits until `/metrics` has `line` (e.g. `deskbridge_own_echo_total 1`).
    pub async fn wait_metric(&self, line: &str) {
        poll(DEADLINE, Duration::from_millis(20), || async move {
            let (_, body) = http_get(self.addr, "/metrics").await;
            if body.lines().any(|l| l == line) {
                Ok(())
            } else {
                Err(format!("metric `{line}` never appeared:\n{body}"))
            }
        })
        .await
    }

    /// Waits until the counter `name` (exact series, labels included) reaches `at_least`.
    pub async fn wait_metric_at_least(&self, name: &str, at_least: u64) {
        poll(DEADLINE, Duration::from_millis(10), || async move {
            let (_, body) = http_get(self.addr, "/metrics").await;
            let value = body
                .lines()
                .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse::<f64>().ok())
                .unwrap_or(0.0);
            if value >= at_least as f64 {
                Ok(())
            } else {
                Err(format!("{name} stayed at {value} (wanted ≥ {at_least})"))
            }
        })
        .await
    }

    /// Stops the bridge off the test's runtime (so browsers can be read meanwhile); returns
    /// it (stopped, topology not yet deleted) and how long the shutdown took.
    pub async fn shut_down(mut self) -> (TestBridge, Duration) {
        let started = Instant::now();
        let bridge = tokio::task::spawn_blocking(move || {
            self.stop();
            self
        })
        .await
        .expect("shutdown completes");
        (bridge, started.elapsed())
    }

    /// Stops the bridge gracefully and waits for its thread.
    pub fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for TestBridge {
    fn drop(&mut self) {
        self.stop();
        if self.cleanup {
            delete_topology(&self.config);
        }
    }
}

/// Waits until the bridge at `addr` (in process or a child) is attached to the streams of
/// `desks`: before that a resume is answered `broker_unavailable`, once attached `subscribed`.
pub async fn wait_attached_at(addr: SocketAddr, desks: &[&str]) {
    let mut probe = Browser::connect_to(addr).await;
    let since: serde_json::Map<String, Value> = desks
        .iter()
        .map(|desk| (desk.to_string(), serde_json::json!({"last": 0})))
        .collect();
    let subscribe = serde_json::json!({"op": "subscribe", "desks": desks, "since": since});
    let started = Instant::now();
    loop {
        probe.send(subscribe.clone()).await;
        let reply = probe.recv().await;
        if reply["op"] == "subscribed" {
            return;
        }
        assert_eq!(reply["code"], "broker_unavailable", "{reply}");
        assert!(
            started.elapsed() < DEADLINE,
            "desk streams never attached: {reply}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
