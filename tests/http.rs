//! HTTP surface and the binary: health, metrics, console page, configuration errors.

mod common;

use common::process::{bridge_command, ConfigFile};
use common::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_200_with_the_broker_up() {
    let bridge = TestBridge::start(test_config("health"));
    let health = bridge.wait_health(200).await;
    assert_eq!(health["status"], "ok");
    assert_eq!(health["version"], deskbridge::VERSION);
    assert_eq!(
        health["amqp"],
        json!({"consumer": "up", "publisher": "up", "blocked": false})
    );
    assert_eq!(health["sessions"], 0);
    assert_eq!(health["desks"], json!({"A": 0, "B": 0}));
    assert!(health["uptime_seconds"].is_u64());
    let (status, _) = http_get(bridge.addr, "/health/live").await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_503_without_a_broker_and_the_bridge_still_serves_browsers() {
    let mut config = test_config("nobroker");
    // Port 1 on loopback: nothing listens there, the connection is refused at once.
    config.amqp.urls = vec![url("amqp://guest:guest@127.0.0.1:1/%2f")];
    let bridge = TestBridge::start(config);
    let health = bridge.wait_health(503).await;
    assert_eq!(health["status"], "degraded");
    for link in ["consumer", "publisher"] {
        let state = health["amqp"][link].as_str().expect("link state");
        assert!(state == "down" || state == "connecting", "{link}: {state}");
    }
    let (status, _) = http_get(bridge.addr, "/health/live").await;
    assert_eq!(status, 200, "live while serving, whatever the broker");
    let mut browser = Browser::connect(&bridge).await;
    browser.subscribe(&["A"]).await;
    browser.assert_quiet().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_prometheus_text() {
    let bridge = TestBridge::start_healthy(test_config("metrics")).await;
    let _browser = Browser::connect(&bridge).await;
    bridge.wait_metric("deskbridge_sessions 1").await;
    let (status, body) = http_get(bridge.addr, "/metrics").await;
    assert_eq!(status, 200);
    for name in [
        "# TYPE deskbridge_sessions gauge",
        "deskbridge_messages_in_total{direction=\"desktop_to_web\"} 0",
        "deskbridge_messages_in_total{direction=\"web_to_desktop\"} 0",
        "deskbridge_rejects_total{reason=\"bad_body\"} 0",
        "deskbridge_amqp_link_up{link=\"consumer\"} 1",
        "deskbridge_publish_confirm_seconds_count 0",
    ] {
        assert!(
            body.lines().any(|line| line == name),
            "missing `{name}` in\n{body}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_page_is_served() {
    let bridge = TestBridge::start(test_config("console"));
    let (status, body) = http_get(bridge.addr, "/").await;
    assert_eq!(status, 200);
    assert!(body.contains("<title>deskbridge console</title>"), "{body}");
    assert!(
        body.contains("/deskbridge.js"),
        "the page is built on the browser client"
    );
    let (status, client) = http_get(bridge.addr, "/deskbridge.js").await;
    assert_eq!(status, 200);
    assert!(
        client.contains("new WebSocket("),
        "the client opens the WebSocket"
    );
}

#[test]
fn a_bad_config_file_stops_start_up_naming_the_key() {
    let cases = [
        ("[amqp]\nprefetch = 0\n", "amqp.prefetch"),
        ("[ws]\nmax_frame_bytes = \"lots\"\n", "max_frame_bytes"),
        ("desks = [\"A_B\"]\n", "desks"),
        ("[amqp]\nno_such_key = 1\n", "no_such_key"),
    ];
    for (text, key) in cases {
        let config = ConfigFile::write(text);
        let output = bridge_command(env!("CARGO_BIN_EXE_deskbridge"), config.path())
            .output()
            .expect("run deskbridge");
        assert_eq!(output.status.code(), Some(2), "{text}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(key), "stderr names `{key}`: {stderr}");
    }
}

#[test]
fn a_taken_port_is_refused_with_a_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("a port");
    let addr = taken.local_addr().expect("addr").to_string();
    let mut config = test_config("taken");
    config.bind = addr.clone();
    let result = actix_web::rt::System::new().block_on(deskbridge::start(
        config.clone(),
        deskbridge::Transforms::default(),
    ));
    let error = result.err().expect("start fails on a taken port").to_string();
    assert!(error.contains(&addr) && error.contains("--bind"), "{error}");
    delete_topology(&config);
}

#[test]
fn the_binary_on_a_taken_port_prints_the_message_and_exits_2_without_a_panic() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("a port");
    let addr = taken.local_addr().expect("addr").to_string();
    let mut config = test_config("takenbin");
    config.bind = addr.clone();
    let file = ConfigFile::write(&common::process::config_toml(&config));
    let output = bridge_command(env!("CARGO_BIN_EXE_deskbridge"), file.path())
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("run deskbridge");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!("cannot listen on {addr}")) && stderr.contains("--bind"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("panicked") && !stderr.contains("backtrace"),
        "nothing but the message: {stderr}"
    );
    delete_topology(&config);
}

/// A WebSocket handshake request for `path`, with or without its `Sec-WebSocket-Key`.
fn handshake(path: &str, key: bool) -> String {
    let key = if key {
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    } else {
        ""
    };
    format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\n{key}\r\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_upgrades_get_clear_http_errors_and_leave_the_bridge_serving() {
    let bridge = TestBridge::start(test_config("upgrades"));
    let (status, body) = http_request(bridge.addr, &handshake("/elsewhere", true)).await;
    assert_eq!(status, 404, "{body}");
    let body: serde_json::Value = serde_json::from_str(&body).expect("JSON error body");
    assert_eq!(body["error"], "not_found");

    let (status, body) = http_request(bridge.addr, &handshake("/ws", false)).await;
    assert_eq!(status, 400, "a handshake without Sec-WebSocket-Key: {body}");

    let (status, body) = http_get(bridge.addr, "/ws").await;
    assert_eq!(status, 400, "{body}");
    let body: serde_json::Value = serde_json::from_str(&body).expect("JSON error body");
    assert_eq!(body["error"], "websocket_upgrade_required");

    let mut browser = Browser::connect(&bridge).await;
    browser.assert_quiet().await;
    let health = bridge.wait_health(200).await;
    assert_eq!(
        health["sessions"], 1,
        "refused upgrades hold no session: {health}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_on_one_inbound_queue_are_reported_by_both() {
    let first = TestBridge::start_healthy(test_config("sharedq")).await;
    assert_eq!(first.wait_health(200).await["warnings"], serde_json::json!([]));
    // A second instance with the same names: RabbitMQ would split events between them.
    let mut second = TestBridge::start(first.config.clone());
    let shared = |health: &serde_json::Value| health["warnings"] == serde_json::json!(["shared_queue"]);
    for (name, bridge) in [("the newcomer", &second), ("the first instance", &first)] {
        poll(DEADLINE, std::time::Duration::from_millis(100), || async {
            let (_, body) = http_get(bridge.addr, "/health").await;
            let health: serde_json::Value = serde_json::from_str(&body).map_err(|e| e.to_string())?;
            if shared(&health) {
                Ok(())
            } else {
                Err(format!("{name} never reported the shared queue: {health}"))
            }
        })
        .await;
    }
    second.stop(); // stopped, its (shared) topology left in place for the first
    poll(DEADLINE, std::time::Duration::from_millis(100), || async {
        let (_, body) = http_get(first.addr, "/health").await;
        if body.contains("\"warnings\":[]") {
            Ok(())
        } else {
            Err(format!(
                "the warning stayed after the second instance left: {body}"
            ))
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_monitoring_examples_name_only_metrics_the_bridge_exposes() {
    let bridge = TestBridge::start_healthy(test_config("monitoring")).await;
    let (_, metrics) = http_get(bridge.addr, "/metrics").await;
    // Sample names (`name` or `name{labels}` before the value) and full series.
    let series: Vec<&str> = metrics
        .lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .filter_map(|line| line.rsplit_once(' ').map(|(series, _)| series))
        .collect();
    let names: std::collections::HashSet<&str> =
        series.iter().map(|s| s.split('{').next().unwrap_or(s)).collect();
    let docs = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/monitoring");
    let alerts = std::fs::read_to_string(format!("{docs}/alerts.yml")).expect("alerts.yml");
    let dashboard = std::fs::read_to_string(format!("{docs}/grafana-dashboard.json")).expect("dashboard");
    let dashboard_json: serde_json::Value = serde_json::from_str(&dashboard).expect("the dashboard is JSON");
    let panels = dashboard_json["panels"].as_array().expect("panels");
    assert!(panels
        .iter()
        .all(|p| p["targets"].as_array().is_some_and(|t| !t.is_empty())));
    let mut named = 0;
    for (file, text) in [("alerts.yml", &alerts), ("grafana-dashboard.json", &dashboard)] {
        for (at, _) in text.match_indices("deskbridge_") {
            let name: String = text[at..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                .collect();
            // `uid`/`title` mention the product, not a metric.
            if name == "deskbridge_" {
                continue;
            }
            named += 1;
            assert!(
                names.contains(name.as_str()),
                "{file} names `{name}`, which /metrics lacks:\n{metrics}"
            );
            // A literal selector like name{reason="router_busy"} must match a real series.
            let rest = &text[at + name.len()..];
            if let Some(selector) = rest
                .strip_prefix('{')
                .and_then(|r| r.split_once('}'))
                .map(|(s, _)| s)
            {
                if !selector.contains('$') && selector.contains('=') {
                    let wanted = format!("{name}{{{}}}", selector.replace("\\\"", "\""));
                    assert!(series.contains(&wanted.as_str()), "{file}: no series {wanted}");
                }
            }
        }
    }
    assert!(named > 20, "the examples use the metrics ({named} mentions)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_broker_one_log_line_and_health_say_what_was_tried_and_how_to_start_one() {
    let mut config = test_config("nobroker-log");
    config.amqp.urls = vec![url("amqp://guest:secret@127.0.0.1:1/%2f")];
    config.amqp.reconnect_initial_ms = 20;
    config.amqp.reconnect_max_ms = 40;
    let bridge = common::process::BridgeProcess::launch(env!("CARGO_BIN_EXE_deskbridge"), &config)
        .expect("start deskbridge");
    let how = "rabbitmq-server -detached";
    let line = bridge.wait_for_log(&["cannot reach", "127.0.0.1:1", how], DEADLINE);
    assert!(
        !line.contains("secret"),
        "the password stays out of the log: {line}"
    );
    // Both links fail, again and again; the person reading the log is told once.
    let health = poll(DEADLINE, std::time::Duration::from_millis(50), || async {
        let (_, body) = http_get(bridge.addr, "/health").await;
        let health: serde_json::Value = serde_json::from_str(&body).map_err(|e| e.to_string())?;
        if health["amqp"]["consumer"] == "down" && health["amqp"]["publisher"] == "down" {
            Ok(health)
        } else {
            Err(format!("links not both down yet: {health}"))
        }
    })
    .await;
    let error = health["amqp"]["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("cannot reach") && error.contains(how),
        "/health says why: {health}"
    );
    assert!(!error.contains("secret"), "{error}");
    assert_eq!(
        bridge.log_lines("cannot reach").len(),
        1,
        "one line for both links and every retry"
    );
    bridge.stop();
}
