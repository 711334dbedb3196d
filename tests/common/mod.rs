//! Shared test and bench support: a real bridge (in process on port 0, or the binary as a child
//! process), real browsers (tokio-tungstenite) and a real desktop app (amiquip) against the
//! RabbitMQ on `AMQP_URL` (default `amqp://guest:guest@127.0.0.1:5672/%2f`).
//!
//! Every test binary compiles its own copy (`mod common;`), and so does the load bench
//! (`benches/load/main.rs`: `#[path = "../../tests/common/mod.rs"] mod common;`): each uses
//! only part of it.
//!
//! - `amqp`: broker connections, exchange/queue declaration, clean-up;
//! - `bridge`: `TestBridge`, the bridge on its own thread, and `test_config`;
//! - `process`: `BridgeProcess`, the deskbridge binary as a child process;
//! - `http`: minimal HTTP/1.0 requests and waiting for `/health`;
//! - `browser`: `Browser`, a WebSocket client of `/ws`;
//! - `cluster`: `Cluster`, a three-node RabbitMQ cluster of the test's own (`scripts/cluster.sh`);
//! - `desktop`: `Desktop` (publishes) and `Listener` (consumes), the desktop app's side;
//! - `history`: desk A's numbered desktop events followed across instances (`Publisher`, `Seen`,
//!   `assert_every_event_once`);
//! - `private_broker`: `PrivateBroker`, a RabbitMQ node of the test's own (TLS, free ports);
//! - `webdriver`: `Chrome`, headless Chromium driven over WebDriver (the console, the browser client).
#![allow(dead_code)]

pub mod amqp;
pub mod bridge;
pub mod browser;
pub mod cluster;
pub mod desktop;
pub mod history;
pub mod http;
pub mod private_broker;
pub mod process;
pub mod webdriver;

use std::future::Future;
use std::time::{Duration, Instant};

// What most tests use, for `use common::*` (each test binary uses only some of it).
#[allow(unused_imports)]
pub use self::{
    amqp::{amqp_url, broker, delete_topology, queue_depth, url},
    bridge::{test_config, TestBridge},
    browser::Browser,
    desktop::{Desktop, Listener},
    http::{http_get, http_request, try_http_get},
    process::BridgeProcess,
    webdriver::Chrome,
};

/// How long any single condition may take before a test fails.
pub const DEADLINE: Duration = Duration::from_secs(15);

/// A name no other test (or run) uses.
pub fn unique(prefix: &str) -> String {
    format!(
        "dbt.{prefix}.{}",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    )
}

/// A routing key from desk and event.
pub fn key(desk: &str, event: &str) -> String {
    format!("{desk}_{event}")
}

/// Waits for `condition` to hold, polling every 10 ms, failing with `what` after the deadline.
pub async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    poll(DEADLINE, Duration::from_millis(10), || {
        let held = condition();
        std::future::ready(if held {
            Ok(())
        } else {
            Err(format!("timed out waiting for {what}"))
        })
    })
    .await
}

/// Runs `probe` every `every` until it returns `Ok`, and returns that; once `within` has
/// passed, an `Err` fails the test with its message.
pub async fn poll<T, Probe>(within: Duration, every: Duration, mut probe: impl FnMut() -> Probe) -> T
where
    Probe: Future<Output = Result<T, String>>,
{
    let started = Instant::now();
    loop {
        match probe().await {
            Ok(value) => return value,
            Err(why) => assert!(started.elapsed() < within, "{why}"),
        }
        tokio::time::sleep(every).await;
    }
}
