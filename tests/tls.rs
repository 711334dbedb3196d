//! AMQP over TLS against real TLS listeners: private RabbitMQ nodes with throwaway certificates
//! (`common::private_broker`), the deskbridge binary, browsers, and a desktop app on the
//! node's plain port.
//!
//! A node takes about ten seconds to boot, so each test starts one node and makes all of its
//! checks against it; the two nodes boot in parallel (one test thread each).

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::private_broker::{ClientCertificates, NodeOptions, PrivateBroker, UNNAMED_ADDRESS};
use common::process::{bridge_command, ConfigFile};
use common::*;
use deskbridge::config::Config;
use serde_json::json;

const BRIDGE: &str = env!("CARGO_BIN_EXE_deskbridge");

/// Starts a node with a TLS listener (off the async runtime's worker, which it would stall).
fn start_node(clients: ClientCertificates) -> PrivateBroker {
    tokio::task::block_in_place(|| {
        PrivateBroker::start(NodeOptions {
            tls: Some(clients),
            ..NodeOptions::default()
        })
    })
}

/// A bridge config for `broker`'s TLS listener, trusting the node's CA.
fn tls_config(test: &str, broker: &PrivateBroker) -> Config {
    let mut config = test_config(test);
    config.amqp.urls = vec![url(&broker.amqps_url())];
    config.amqp.tls.ca_file = Some(broker.certificates().ca.clone());
    config
}

fn launch(config: &Config) -> BridgeProcess {
    BridgeProcess::launch(BRIDGE, config).expect("deskbridge starts")
}

/// Waits for the bridge to log a link down with every one of `needles` (both links fail the
/// same way, and the reason is logged once, by whichever fails first); returns the line.
fn link_down_log(bridge: &BridgeProcess, needles: &[&str]) -> String {
    let mut wanted = vec![" link down: "];
    wanted.extend_from_slice(needles);
    tokio::task::block_in_place(|| bridge.wait_for_log(&wanted, DEADLINE))
}

/// `/health` says 503 with both links down, while the bridge still serves browsers.
async fn down_but_serving(bridge: &BridgeProcess) {
    let addr = bridge.addr;
    poll(DEADLINE, Duration::from_millis(20), || async move {
        let (status, body) = http_get(addr, "/health").await;
        let health: serde_json::Value = serde_json::from_str(&body).expect("health is JSON");
        let links = (
            health["amqp"]["consumer"].as_str(),
            health["amqp"]["publisher"].as_str(),
        );
        if status == 503 && links == (Some("down"), Some("down")) {
            Ok(())
        } else {
            Err(format!(
                "/health never said 503 with both links down: {status} {body}"
            ))
        }
    })
    .await;
    let (status, _) = http_get(bridge.addr, "/health/live").await;
    assert_eq!(status, 200);
    let mut browser = Browser::connect_to(bridge.addr).await;
    browser.subscribe(&["A"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqps_carries_events_both_ways_and_an_untrusted_broker_keeps_the_link_down() {
    let broker = start_node(ClientCertificates::Optional);
    let config = tls_config("tls", &broker);
    let bridge = launch(&config);
    let mut stranger_config = tls_config("tls-stranger", &broker);
    stranger_config.amqp.tls.ca_file = Some(broker.certificates().stranger_ca.clone());
    let stranger = launch(&stranger_config);
    let mut plain_port_config = tls_config("tls-plain-port", &broker);
    plain_port_config.amqp.urls = vec![url(&format!(
        "amqps://guest:guest@localhost:{}/%2f",
        broker.amqp_port
    ))];
    let plain_port = launch(&plain_port_config);
    let mut unnamed_host_config = tls_config("tls-unnamed-host", &broker);
    unnamed_host_config.amqp.urls = vec![url(&broker.amqps_url_at(UNNAMED_ADDRESS))];
    let unnamed_host = launch(&unnamed_host_config);

    bridge.wait_healthy(DEADLINE).await;
    let mut browser = Browser::connect_to(bridge.addr).await;
    browser.subscribe(&["A"]).await;
    let mut desktop = Desktop::connect_to(&broker.amqp_url());
    desktop.publish_json(
        &config.amqp.inbound_exchange,
        "A_new_example",
        &json!({"px": 101.5}),
    );
    let event = browser.recv().await;
    assert_eq!(
        (&event["op"], &event["desk"], &event["origin"], &event["data"]),
        (
            &json!("event"),
            &json!("A"),
            &json!("desktop"),
            &json!({"px": 101.5})
        ),
        "{event}"
    );
    let listener = Listener::bind_at(
        &broker.amqp_url(),
        &config.amqp.outbound_exchange,
        &["A_new_example"],
    );
    let ack = browser.publish("A", "new_example", json!({"qty": 3}), "c1").await;
    assert_eq!(
        (ack["op"].as_str(), ack["routed"].as_bool()),
        (Some("ack"), Some(true)),
        "{ack}"
    );
    let delivery = listener.next();
    assert_eq!(delivery.properties.message_id().as_deref(), ack["id"].as_str());
    let body: serde_json::Value = serde_json::from_slice(&delivery.body).expect("JSON body");
    assert_eq!(body, json!({"qty": 3}));

    let line = link_down_log(
        &stranger,
        &[
            "TLS handshake with amqps://guest:***@localhost:",
            "certificate verify failed",
            "is amqp.tls.ca_file the CA that signed the broker's certificate?",
        ],
    );
    assert!(
        !line.contains("guest:guest"),
        "the password stays out of logs: {line}"
    );
    down_but_serving(&stranger).await;

    link_down_log(&plain_port, &["TLS handshake with", "speak TLS?"]);
    down_but_serving(&plain_port).await;

    // The CA is right, but the certificate names localhost and 127.0.0.1, not 127.0.0.2.
    link_down_log(
        &unnamed_host,
        &["TLS handshake with", "mismatch", "does not name the URL's host"],
    );
    down_but_serving(&unnamed_host).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_requires_client_certificates_takes_ours_and_refuses_none() {
    let broker = start_node(ClientCertificates::Required);
    let mut config = tls_config("tls-client", &broker);
    config.amqp.tls.cert_file = Some(broker.certificates().client_cert.clone());
    config.amqp.tls.key_file = Some(broker.certificates().client_key.clone());
    let bridge = launch(&config);
    let anonymous = launch(&tls_config("tls-anonymous", &broker));

    bridge.wait_healthy(DEADLINE).await;
    let mut browser = Browser::connect_to(bridge.addr).await;
    let ack = browser.publish("A", "new_example", json!({"qty": 1}), "c1").await;
    assert_eq!(ack["op"], "ack", "{ack}");

    link_down_log(
        &anonymous,
        &[
            "TLS handshake with",
            "set amqp.tls.cert_file and amqp.tls.key_file",
        ],
    );
    down_but_serving(&anonymous).await;
}

/// Runs the binary on `text` and returns (exit code, stderr); fails if it is still running
/// after 10 s (it started instead of refusing).
fn refused(text: &str) -> (Option<i32>, String) {
    let config = ConfigFile::write(text);
    let mut child = bridge_command(BRIDGE, config.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run deskbridge");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for deskbridge") {
            break status;
        }
        if started.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("deskbridge started on a config it should refuse:\n{text}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut pipe, &mut stderr);
    }
    (status.code(), stderr)
}

#[test]
fn unusable_tls_settings_stop_start_up_naming_the_key() {
    let missing = std::env::temp_dir().join(format!("deskbridge-no-such-ca-{}.pem", std::process::id()));
    let missing = missing.display();
    let amqps = "[amqp]\nurls = [\"amqps://guest:guest@localhost:5671/%2f\"]\n";
    let cases: [(String, &[&str]); 4] = [
        (
            format!("{amqps}[amqp.tls]\nca_file = \"{missing}\"\n"),
            &["`amqp.tls.ca_file`", "cannot read", "No such file"],
        ),
        (
            format!("{amqps}[amqp.tls]\ncert_file = \"{missing}\"\n"),
            &["`amqp.tls.key_file`", "PKCS#8"],
        ),
        (
            format!("[amqp.tls]\nca_file = \"{missing}\"\n"),
            &["`amqp.tls`", "amqps://"],
        ),
        (format!("{amqps}[amqp.tls]\ninsecure = true\n"), &["insecure"]),
    ];
    for (text, says) in cases {
        let (code, stderr) = refused(&text);
        assert_eq!(code, Some(2), "{text}\n{stderr}");
        for needle in says {
            assert!(stderr.contains(needle), "stderr has `{needle}`:\n{stderr}");
        }
    }
    // The path in the message is the one configured, so the operator knows which to fix.
    let (_, stderr) = refused(&format!("{amqps}[amqp.tls]\nca_file = \"{missing}\"\n"));
    assert!(stderr.contains(&missing.to_string()), "{stderr}");
}
