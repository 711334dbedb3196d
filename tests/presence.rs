//! Presence across instances, against the real broker with real WebSocket clients: lifecycle
//! messages on the presence exchange, the `presence` query, `join` / `leave` frames, a late
//! instance learning the others at once, shutdown, a SIGKILLed instance leaving the view within
//! 3 heartbeats, users and rights with auth, and garbage on the exchange.

mod common;

use std::time::{Duration, Instant};

use amiquip::{AmqpProperties, Delivery};
use deskbridge::config::Config;
use serde_json::{json, Value};

use common::bridge::{hs256_token, jwt_test_config, unix_now};
use common::process::BridgeProcess;
use common::{test_config, Browser, Desktop, Listener, TestBridge};

/// A config for a second instance: its own queues and exchanges, the same presence exchange.
fn beside(first: &Config, test: &str) -> Config {
    let mut config = test_config(test);
    config.amqp.presence_exchange = first.amqp.presence_exchange.clone();
    config.presence.heartbeat_ms = first.presence.heartbeat_ms;
    config
}

/// A child process's exchanges and queues, deleted on drop (a killed bridge cannot).
struct Topology(Config);

impl Drop for Topology {
    fn drop(&mut self) {
        common::amqp::delete_topology(&self.0);
    }
}

fn with_heartbeat(mut config: Config, heartbeat_ms: u64) -> Config {
    config.presence.heartbeat_ms = heartbeat_ms;
    config
}

/// A presence message's key and JSON body.
fn read(delivery: &Delivery) -> (String, Value) {
    let body = serde_json::from_slice(&delivery.body).expect("presence bodies are JSON");
    (delivery.routing_key.clone(), body)
}

/// The next `session.*` message about `session` (heartbeats and other sessions skipped).
fn next_change(listener: &Listener, session: &str) -> (String, Value) {
    loop {
        let (key, body) = read(&listener.next());
        if key.starts_with("session.") && body["session"] == session {
            return (key, body);
        }
    }
}

async fn subscribe_watching(browser: &mut Browser, desks: &[&str]) {
    browser
        .send(json!({"op": "subscribe", "desks": desks, "presence": true}))
        .await;
    assert_eq!(browser.recv().await, json!({"op": "subscribed", "desks": desks}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_on_two_instances_see_each_other_and_desktop_apps_see_every_change() {
    let first = TestBridge::start_healthy(test_config("presence")).await;
    let second = TestBridge::start_healthy(beside(&first.config, "presence2")).await;
    let changes = Listener::bind_topic(&first.config.amqp.presence_exchange, &["session.*"]);

    let mut watcher = Browser::connect(&first).await;
    subscribe_watching(&mut watcher, &["A"]).await;
    let (key, connected) = next_change(&changes, &watcher.session);
    assert_eq!(key, "session.connected");
    assert_eq!(connected["desks"], json!([]));
    let (key, subscribed) = next_change(&changes, &watcher.session);
    assert_eq!(
        (key.as_str(), &subscribed["desks"], &subscribed["reason"]),
        ("session.subscribed", &json!(["A"]), &Value::Null)
    );
    let first_instance = subscribed["instance"].as_str().expect("instance").to_string();
    assert!(subscribed["at"].as_u64().is_some(), "{subscribed}");

    // A session on the other instance comes, is seen, and goes.
    let mut other = Browser::connect(&second).await;
    other.subscribe(&["A", "B"]).await;
    let join = watcher.recv().await;
    assert_eq!(join, json!({"op": "join", "desk": "A", "session": other.session}));
    let expected = [watcher.session.clone(), other.session.clone()];
    watcher.wait_presence("A", &expected).await;
    let expected = [watcher.session.clone(), other.session.clone()];
    other.wait_presence("A", &expected).await;
    let expected = [other.session.clone()];
    watcher.wait_presence("B", &expected).await;
    let (key, subscribed) = next_change(&changes, &other.session);
    assert_eq!(key, "session.connected");
    assert_ne!(subscribed["instance"], first_instance.as_str(), "{subscribed}");
    let (key, subscribed) = next_change(&changes, &other.session);
    assert_eq!(
        (key.as_str(), &subscribed["desks"]),
        ("session.subscribed", &json!(["A", "B"]))
    );

    other.send(json!({"op": "unsubscribe", "desks": ["A"]})).await;
    assert_eq!(other.recv().await, json!({"op": "unsubscribed", "desks": ["A"]}));
    assert_eq!(
        watcher.recv().await,
        json!({"op": "leave", "desk": "A", "session": other.session})
    );
    let (key, left) = next_change(&changes, &other.session);
    assert_eq!(
        (key.as_str(), &left["desks"]),
        ("session.unsubscribed", &json!(["A"]))
    );
    // The socket closes: the session leaves B (no news for a watcher of A only) and ends.
    let other_session = other.session.clone();
    drop(other);
    let (key, gone) = next_change(&changes, &other_session);
    assert_eq!(
        (key.as_str(), &gone["desks"], &gone["reason"]),
        ("session.disconnected", &json!(["B"]), &json!("closed"))
    );
    watcher.wait_presence("B", &[]).await;
    watcher.assert_quiet().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_instance_learns_the_others_at_once_and_a_stopped_one_says_goodbye() {
    // Heartbeats a minute apart: only the greeting can explain what the new instance knows.
    let first = TestBridge::start_healthy(with_heartbeat(test_config("presence-late"), 60_000)).await;
    let lifecycle = Listener::bind_topic(&first.config.amqp.presence_exchange, &["#"]);
    let mut early = Browser::connect(&first).await;
    subscribe_watching(&mut early, &["A"]).await;

    let second = TestBridge::start_healthy(beside(&first.config, "presence-late2")).await;
    let mut late = Browser::connect(&second).await;
    late.subscribe(&["A"]).await;
    let expected = [early.session.clone(), late.session.clone()];
    late.wait_presence("A", &expected).await;
    assert_eq!(
        early.recv().await,
        json!({"op": "join", "desk": "A", "session": late.session})
    );

    // A graceful stop: its sessions end with reason `shutdown`, then the instance says so.
    let late_session = late.session.clone();
    let (second, _) = second.shut_down().await;
    assert_eq!(
        early.recv().await,
        json!({"op": "leave", "desk": "A", "session": late_session})
    );
    let expected = [early.session.clone()];
    early.wait_presence("A", &expected).await;
    let (key, gone) = next_change(&lifecycle, &late_session);
    assert_eq!(key, "session.connected");
    let (key, _) = next_change(&lifecycle, &late_session);
    assert_eq!(key, "session.subscribed");
    let (key, gone_body) = next_change(&lifecycle, &late_session);
    assert_eq!(
        (key.as_str(), &gone_body["reason"], &gone_body["desks"]),
        ("session.disconnected", &json!("shutdown"), &json!(["A"]))
    );
    let stopped = loop {
        let (key, body) = read(&lifecycle.next());
        if key == "instance.stopped" {
            break body;
        }
    };
    assert_eq!(stopped["instance"], gone["instance"]);
    drop(second);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_instance_leaves_the_presence_view_within_three_heartbeats() {
    const HEARTBEAT_MS: u64 = 1_000;
    let first = TestBridge::start_healthy(with_heartbeat(test_config("presence-kill"), HEARTBEAT_MS)).await;
    let mut watcher = Browser::connect(&first).await;
    subscribe_watching(&mut watcher, &["A"]).await;
    let doomed_config = Topology(beside(&first.config, "presence-kill2"));
    let mut doomed =
        BridgeProcess::launch(env!("CARGO_BIN_EXE_deskbridge"), &doomed_config.0).expect("start deskbridge");
    doomed.wait_healthy(common::DEADLINE).await;
    let mut browsers = Vec::new();
    for _ in 0..3 {
        let mut browser = Browser::connect_to(doomed.addr).await;
        browser.subscribe(&["A"]).await;
        let join = watcher.recv().await;
        assert_eq!(
            (join["op"].as_str(), join["session"].as_str()),
            (Some("join"), Some(browser.session.as_str()))
        );
        browsers.push(browser);
    }

    let killed = Instant::now();
    doomed.kill();
    let mut left = Vec::new();
    while left.len() < browsers.len() {
        let leave = watcher.recv().await;
        assert_eq!(leave["op"], "leave", "{leave}");
        left.push(leave["session"].as_str().expect("session").to_string());
    }
    let took = killed.elapsed();
    assert!(
        took <= Duration::from_millis(3 * HEARTBEAT_MS),
        "the killed instance's sessions left after {took:?}, more than 3 heartbeats"
    );
    left.sort();
    let mut expected: Vec<String> = browsers.iter().map(|b| b.session.clone()).collect();
    expected.sort();
    assert_eq!(left, expected);
    let expected = [watcher.session.clone()];
    watcher.wait_presence("A", &expected).await;
    first
        .wait_metric("deskbridge_presence_instances_lost_total 1")
        .await;
    first.wait_metric("deskbridge_presence_instances 0").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_auth_presence_shows_users_and_needs_the_right_to_read_the_desk() {
    const SECRET: &str = "presence-secret";
    let bridge = TestBridge::start_healthy(jwt_test_config("presence-auth", SECRET)).await;
    let changes = Listener::bind_topic(&bridge.config.amqp.presence_exchange, &["session.*"]);
    let token = |sub: &str, desks: Value| {
        hs256_token(
            SECRET,
            &json!({"sub": sub, "exp": unix_now() + 600, "desks": desks}),
        )
    };
    let connect = |token: String| {
        let url = format!("{}?token={token}", bridge.ws_url());
        async move {
            let ws = common::browser::handshake(url)
                .await
                .unwrap_or_else(|(status, body)| panic!("refused {status}: {body}"));
            Browser::from_stream(ws).await
        }
    };
    let mut alice = connect(token("alice", json!({"A": ["subscribe"]}))).await;
    subscribe_watching(&mut alice, &["A"]).await;
    let mut bob = connect(token("bob", json!({"A": ["subscribe"], "B": ["subscribe"]}))).await;
    bob.subscribe(&["A"]).await;
    assert_eq!(
        alice.recv().await,
        json!({"op": "join", "desk": "A", "session": bob.session, "user": "bob"})
    );
    let mut users: Vec<Option<String>> = alice.presence("A").await.into_iter().map(|(_, u)| u).collect();
    users.sort();
    assert_eq!(users, [Some("alice".to_string()), Some("bob".to_string())]);
    let (key, connected) = next_change(&changes, &bob.session);
    assert_eq!(
        (key.as_str(), &connected["user"]),
        ("session.connected", &json!("bob"))
    );

    // Who reads desk B is for readers of B only.
    alice
        .send(json!({"op": "presence", "desk": "B", "ref": "q2"}))
        .await;
    let refused = alice.recv().await;
    assert_eq!(
        (refused["code"].as_str(), refused["ref"].as_str()),
        (Some("forbidden"), Some("q2")),
        "{refused}"
    );
    alice
        .send(json!({"op": "presence", "desk": "Z", "ref": "q3"}))
        .await;
    let refused = alice.recv().await;
    assert_eq!(refused["code"], "forbidden", "{refused}");
    assert_eq!(bob.presence("B").await, []);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_presence_exchange_is_counted_and_skipped() {
    let bridge = TestBridge::start_healthy(test_config("presence-garbage")).await;
    let mut desktop = Desktop::connect();
    let exchange = &bridge.config.amqp.presence_exchange;
    desktop.publish_with(
        exchange,
        "session.connected",
        b"not json",
        AmqpProperties::default(),
    );
    desktop.publish_with(exchange, "session.teleported", b"{}", AmqpProperties::default());
    bridge
        .wait_metric("deskbridge_presence_messages_total{outcome=\"garbage\"} 2")
        .await;
    let mut browser = Browser::connect(&bridge).await;
    browser.subscribe(&["A"]).await;
    let expected = [browser.session.clone()];
    browser.wait_presence("A", &expected).await;
    let (status, health) = common::http::http_get(bridge.addr, "/health").await;
    assert_eq!(status, 200, "{health}");
}
