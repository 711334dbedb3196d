//! Broker faults injected with `rabbitmqctl`: connections closed from the broker side, the broker
//! app stopped and started, a memory alarm (connection.blocked). Each test disturbs a private
//! RabbitMQ node of its own (free ports, its own directory, stopped and deleted when the test
//! ends, also when it fails), never the machine's broker, so they run in parallel with the rest
//! of the suite.

mod common;

use std::time::Duration;

use amiquip::QueueDeclareOptions;
use common::amqp::{connect, declare_bound_queue, url};
use common::private_broker::{NodeOptions, PrivateBroker};
use common::*;
use serde_json::{json, Value};

/// A private node for one test (booting takes about ten seconds).
fn private_node() -> PrivateBroker {
    tokio::task::block_in_place(|| PrivateBroker::start(NodeOptions::default()))
}

/// `rabbitmqctl -n <node> args`, which must succeed; its output.
fn rabbitmqctl(node: &PrivateBroker, args: &[&str]) -> String {
    let output = tokio::task::block_in_place(|| node.rabbitmqctl(args));
    assert!(
        output.status.success(),
        "rabbitmqctl -n {} {args:?} failed: {}",
        node.node(),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The node's app is stopped while this lives; dropping it starts the app and waits for it.
struct AppStopped<'a>(&'a PrivateBroker);

impl<'a> AppStopped<'a> {
    fn new(node: &'a PrivateBroker) -> AppStopped<'a> {
        rabbitmqctl(node, &["stop_app"]);
        AppStopped(node)
    }
}

impl Drop for AppStopped<'_> {
    fn drop(&mut self) {
        rabbitmqctl(self.0, &["start_app"]);
        rabbitmqctl(self.0, &["await_startup"]);
    }
}

/// A memory alarm is raised on the node while this lives (it blocks publishing connections).
struct MemoryAlarm<'a> {
    node: &'a PrivateBroker,
    watermark: String,
}

impl<'a> MemoryAlarm<'a> {
    fn new(node: &'a PrivateBroker) -> MemoryAlarm<'a> {
        let watermark = rabbitmqctl(
            node,
            &["eval", "vm_memory_monitor:get_vm_memory_high_watermark()."],
        )
        .trim()
        .to_string();
        rabbitmqctl(node, &["set_vm_memory_high_watermark", "0.000001"]);
        MemoryAlarm { node, watermark }
    }
}

impl Drop for MemoryAlarm<'_> {
    fn drop(&mut self) {
        let restore = if self.watermark.parse::<f64>().is_ok() {
            self.watermark.as_str()
        } else {
            "0.4"
        };
        rabbitmqctl(self.node, &["set_vm_memory_high_watermark", restore]);
    }
}

/// A durable queue on the node bound to `exchange` with `key`, standing for a desktop app's
/// queue that survives broker restarts (deleted with the node).
fn durable_queue(node: &PrivateBroker, exchange: &str, key: &str) -> String {
    let name = unique("desktop");
    let mut connection = connect(&node.amqp_url(), "Is the private node still running?");
    let channel = connection.open_channel(None).expect("channel");
    let options = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    declare_bound_queue(&channel, exchange, &name, options, &[key]);
    let _ = connection.close();
    name
}

/// A test config whose bridge uses `node`.
fn on_node(test: &str, node: &PrivateBroker) -> deskbridge::Config {
    let mut config = test_config(test);
    config.amqp.urls = vec![url(&node.amqp_url())];
    config
}

fn fast_reconnect(test: &str, node: &PrivateBroker) -> deskbridge::Config {
    let mut config = on_node(test, node);
    config.amqp.reconnect_initial_ms = 50;
    config.amqp.reconnect_max_ms = 300;
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_closed_by_the_broker_are_reopened_and_traffic_resumes() {
    let node = private_node();
    let bridge = TestBridge::start_healthy(fast_reconnect("closeall", &node)).await;
    let mut browser = Browser::connect(&bridge).await;
    browser.subscribe(&["A"]).await;

    rabbitmqctl(&node, &["close_all_connections", "deskbridge fault test"]);
    bridge
        .wait_metric("deskbridge_amqp_reconnects_total{link=\"consumer\"} 1")
        .await;
    bridge
        .wait_metric("deskbridge_amqp_reconnects_total{link=\"publisher\"} 1")
        .await;
    bridge.wait_health(200).await;

    browser.assert_quiet().await;
    let listener = Listener::bind_at(
        &node.amqp_url(),
        &bridge.config.amqp.outbound_exchange,
        &["A_new_example"],
    );
    let ack = browser
        .publish("A", "new_example", json!({"after": "reconnect"}), "r1")
        .await;
    assert_eq!(ack["op"], "ack", "{ack}");
    assert_eq!(
        listener.next().properties.message_id().as_deref(),
        ack["id"].as_str()
    );
    Desktop::connect_to(&node.amqp_url()).publish_json(
        &bridge.config.amqp.inbound_exchange,
        "A_new_example",
        &json!({"n": 1}),
    );
    assert_eq!(browser.recv().await["data"], json!({"n": 1}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_is_survived_and_publishes_made_during_it_are_delivered_and_acked() {
    let node = private_node();
    let bridge = TestBridge::start_healthy(fast_reconnect("restart", &node)).await;
    let desktop_queue = durable_queue(&node, &bridge.config.amqp.outbound_exchange, "A_new_example");
    let mut browser = Browser::connect(&bridge).await;
    browser.subscribe(&["A"]).await;

    let stopped = AppStopped::new(&node);
    let health = bridge.wait_health(503).await;
    assert_eq!(health["status"], "degraded");
    assert_eq!(
        health["sessions"], 1,
        "the browser stays connected during the outage"
    );
    browser.assert_quiet().await;
    for i in 0..20 {
        browser
            .send(json!({"op": "publish", "desk": "A", "event": "new_example", "data": {"i": i}, "ref": format!("p{i}")}))
            .await;
    }
    browser.assert_quiet().await; // buffered: no ack (and no error) while the broker is away
    drop(stopped);
    bridge.wait_health(200).await;

    let mut ids = Vec::new();
    for i in 0..20 {
        let ack = browser.recv().await;
        assert_eq!(
            (ack["op"].as_str(), ack["ref"].as_str(), ack["routed"].as_bool()),
            (Some("ack"), Some(format!("p{i}").as_str()), Some(true)),
            "{ack}"
        );
        ids.push(ack["id"].as_str().expect("ack id").to_string());
    }
    let desktop = Listener::existing_at(&node.amqp_url(), &desktop_queue);
    for (i, id) in ids.iter().enumerate() {
        let delivery = desktop.next();
        assert_eq!(
            delivery.properties.message_id().as_deref(),
            Some(id.as_str()),
            "in order"
        );
        let body: Value = serde_json::from_slice(&delivery.body).expect("JSON");
        assert_eq!(body, json!({"i": i}));
    }
    Desktop::connect_to(&node.amqp_url()).publish_json(
        &bridge.config.amqp.inbound_exchange,
        "A_new_example",
        &json!({"after": "restart"}),
    );
    assert_eq!(browser.recv().await["data"], json!({"after": "restart"}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flow_control_is_reported_and_does_not_freeze_browsers() {
    let node = private_node();
    let bridge = TestBridge::start_healthy(on_node("blocked", &node)).await;
    let desktop_queue = durable_queue(&node, &bridge.config.amqp.outbound_exchange, "A_new_example");
    let mut browser = Browser::connect(&bridge).await;

    let alarm = MemoryAlarm::new(&node);
    // The broker blocks a connection when it next publishes: publish to trigger it.
    browser
        .send(json!({"op": "publish", "desk": "A", "event": "new_example", "data": {"during": "alarm"}, "ref": "b1"}))
        .await;
    let started = std::time::Instant::now();
    loop {
        let (_, body) = http_get(bridge.addr, "/health").await;
        let health: Value = serde_json::from_str(&body).expect("JSON");
        if health["amqp"]["blocked"] == true {
            break;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "health never reported flow control: {health}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bridge
        .wait_metric("deskbridge_amqp_blocked{link=\"publisher\"} 1")
        .await;
    let mut other = Browser::connect(&bridge).await;
    other.subscribe(&["B"]).await;
    browser.assert_quiet().await; // no ack while blocked, and the session answers at once

    drop(alarm);
    let ack = browser.recv().await;
    assert_eq!(
        (ack["op"].as_str(), ack["ref"].as_str()),
        (Some("ack"), Some("b1")),
        "{ack}"
    );
    assert_eq!(
        Listener::existing_at(&node.amqp_url(), &desktop_queue)
            .next()
            .properties
            .message_id()
            .as_deref(),
        ack["id"].as_str()
    );
    bridge
        .wait_metric("deskbridge_amqp_blocked{link=\"publisher\"} 0")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_long_backoff_the_bridge_is_back_within_a_second_of_the_broker() {
    let node = private_node();
    let mut config = on_node("portwatch", &node);
    // Long delays: without noticing the broker's return, recovery would take 4–10 s more.
    config.amqp.reconnect_initial_ms = 8_000;
    config.amqp.reconnect_max_ms = 10_000;
    let bridge = TestBridge::start_healthy(config).await;
    let stopped = AppStopped::new(&node);
    bridge.wait_health(503).await;
    drop(stopped); // returns once the broker has fully booted
    let back = std::time::Instant::now();
    bridge.wait_health(200).await;
    let took = back.elapsed();
    // One second is the promise; the margin absorbs a loaded CI machine.
    assert!(
        took < Duration::from_secs(3),
        "health took {took:?} to return to 200"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_fits_in_shutdown_timeout_with_unconfirmed_publishes_and_silent_browsers() {
    let node = private_node();
    let mut config = on_node("shutdownbound", &node);
    config.shutdown_timeout_ms = 2_000;
    let bridge = TestBridge::start_healthy(config).await;
    let mut browser = Browser::connect(&bridge).await;
    // Never reads again, so it never answers the close handshake.
    let _silent = Browser::connect(&bridge).await;

    let alarm = MemoryAlarm::new(&node);
    browser
        .send(json!({"op": "publish", "desk": "A", "event": "new_example", "data": {}, "ref": "b1"}))
        .await;
    bridge
        .wait_metric("deskbridge_amqp_blocked{link=\"publisher\"} 1")
        .await;

    // Both waits (the broker's confirm, the silent browser's close) would each take the whole
    // timeout; the shutdown as a whole may not.
    let (mut bridge, took) = bridge.shut_down().await;
    assert!(
        took < Duration::from_millis(2_000 + 500),
        "shutdown_timeout_ms is 2 s, shutdown took {took:?}"
    );
    let error = browser.recv().await;
    assert_eq!(
        (error["code"].as_str(), error["ref"].as_str()),
        (Some("broker_unavailable"), Some("b1")),
        "{error}"
    );
    assert!(
        error["message"]
            .as_str()
            .is_some_and(|m| m.contains("may or may not")),
        "published but unconfirmed: {error}"
    );
    drop(alarm);
    bridge.stop();
}
