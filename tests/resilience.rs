//! Reliability without disturbing the shared broker: no broker at all, slow and dead browsers,
//! shutdown under load, SIGTERM, hostile broker messages.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use amiquip::{AmqpProperties, AmqpValue, FieldTable};
use common::*;
use deskbridge::transform::{Direction, TransformRule};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

fn without_broker(test: &str) -> deskbridge::Config {
    let mut config = test_config(test);
    // Port 1 on loopback: nothing listens, every connect is refused at once.
    config.amqp.urls = vec![url("amqp://guest:guest@127.0.0.1:1/%2f")];
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_broker_publishes_end_in_broker_unavailable_never_in_silence() {
    let mut config = without_broker("nobuffer");
    config.amqp.publish_buffer_messages = 3;
    config.amqp.publish_ttl_ms = 1_000;
    let bridge = TestBridge::start(config);
    bridge.wait_health(503).await;
    let mut browser = Browser::connect(&bridge).await;
    for i in 0..5 {
        browser
            .send(json!({"op": "publish", "desk": "A", "event": "new_example", "data": {"i": i}, "ref": format!("p{i}")}))
            .await;
    }
    // p3 and p4 find the buffer full at once; p0..p2 wait for the TTL, then fail, in order.
    let mut refs = Vec::new();
    for _ in 0..5 {
        let error = browser.recv().await;
        assert_eq!(
            (error["op"].as_str(), error["code"].as_str()),
            (Some("error"), Some("broker_unavailable")),
            "{error}"
        );
        refs.push(error["ref"].as_str().expect("ref echoed").to_string());
    }
    assert_eq!(refs, ["p3", "p4", "p0", "p1", "p2"]);
    bridge
        .wait_metric("deskbridge_publish_failures_total{reason=\"buffer_full\"} 2")
        .await;
    bridge
        .wait_metric("deskbridge_publish_failures_total{reason=\"expired\"} 3")
        .await;
    browser.assert_quiet().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_publish_buffer_counts_every_byte_it_holds_not_just_the_body() {
    let mut config = without_broker("budget");
    config.amqp.publish_buffer_bytes = 16 * 1024;
    // Long enough that a publish wrongly admitted to the buffer is never answered in time.
    config.amqp.publish_ttl_ms = 60_000;
    config.ws.max_frame_bytes = 256 * 1024;
    // The desktop never sees `blob`, but the bridge holds it for the web copy of the event.
    config.transforms = vec![TransformRule {
        desk: "*".into(),
        event: "*".into(),
        direction: Direction::ToDesktop,
        rename: Default::default(),
        drop: vec!["blob".into()],
        set: Default::default(),
        require: Vec::new(),
    }];
    let bridge = TestBridge::start(config);
    bridge.wait_health(503).await;
    let mut browser = Browser::connect(&bridge).await;
    let blob = "x".repeat(32 * 1024);
    let reply = browser
        .publish("A", "new_example", json!({"blob": blob, "n": 1}), "big")
        .await;
    assert_eq!(
        (reply["code"].as_str(), reply["ref"].as_str()),
        (Some("broker_unavailable"), Some("big")),
        "a 32 KiB publish does not fit a 16 KiB buffer, whatever its body: {reply}"
    );
    bridge
        .wait_metric("deskbridge_publish_failures_total{reason=\"buffer_full\"} 1")
        .await;
    browser.assert_quiet().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_never_handed_to_the_broker_are_reported_not_sent_at_shutdown() {
    let mut config = without_broker("notsent");
    config.amqp.publish_ttl_ms = 60_000;
    let bridge = TestBridge::start(config);
    bridge.wait_health(503).await;
    let mut browser = Browser::connect(&bridge).await;
    browser
        .send(json!({"op": "publish", "desk": "A", "event": "new_example", "data": {}, "ref": "p1"}))
        .await;
    bridge
        .wait_metric_at_least("deskbridge_messages_in_total{direction=\"web_to_desktop\"}", 1)
        .await;
    let stopping = tokio::task::spawn_blocking(move || drop(bridge));
    let error = browser.recv().await;
    assert_eq!(
        (error["code"].as_str(), error["ref"].as_str()),
        (Some("broker_unavailable"), Some("p1")),
        "{error}"
    );
    let message = error["message"].as_str().unwrap_or_default();
    assert!(message.contains("was not sent"), "{message}");
    assert_eq!(browser.closed().await.map(|f| f.code), Some(CloseCode::Away));
    stopping.await.expect("the bridge stops");
}

/// A WebSocket client whose socket receive buffer is tiny and who stops reading on demand.
async fn sluggish_browser(bridge: &TestBridge) -> Browser {
    let stream = common::browser::small_receive_buffer(bridge.addr).await;
    Browser::over(stream, &bridge.ws_url()).await
}

/// `count` events for desk A numbered by `seq`, each padded to 8 KiB.
fn padded_events(count: usize) -> Vec<(String, Value)> {
    let padding = "x".repeat(8 * 1024);
    (0..count)
        .map(|seq| (key("A", "new_example"), json!({"seq": seq, "pad": padding})))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_is_closed_with_1013_while_a_fast_reader_gets_everything() {
    let mut config = test_config("slow");
    // Enough slack (256 events of 8 KiB) that a reader that keeps reading is never cut, even
    // on a loaded machine; a reader that stops still exceeds it many times over.
    config.ws.outbound_queue_frames = 512;
    config.ws.outbound_queue_bytes = 2 * 1024 * 1024;
    let bridge = TestBridge::start_healthy(config).await;
    let mut slow = sluggish_browser(&bridge).await;
    slow.subscribe(&["A"]).await;
    let mut fast = Browser::connect(&bridge).await;
    fast.subscribe(&["A"]).await;

    // 1500 × 8 KiB = 12 MiB: far more than the slow socket's kernel buffers (≤ 4 MiB) plus its
    // 2 MiB queue.
    let messages = padded_events(1500);
    let exchange = bridge.config.amqp.inbound_exchange.clone();
    let publisher =
        tokio::task::spawn_blocking(move || Desktop::connect().publish_many(&exchange, &messages));
    for seq in 0..1500 {
        assert_eq!(
            fast.recv().await["data"]["seq"],
            seq,
            "the fast reader keeps its rate and misses nothing"
        );
    }
    publisher.await.expect("desktop published");
    bridge
        .wait_metric("deskbridge_sessions_slow_closed_total 1")
        .await;
    let health = bridge.wait_health(200).await;
    assert_eq!(health["desks"]["A"], 1, "the slow session's subscription is gone");

    let close = slow
        .closed()
        .await
        .expect("a close frame after what was already sent");
    assert_eq!(close.code, CloseCode::Again);
    assert!(close.reason.contains("too slow"), "{}", close.reason);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_whose_socket_stays_full_is_dropped_after_client_timeout() {
    let mut config = test_config("stall");
    config.ws.heartbeat_interval_ms = 500;
    config.ws.client_timeout_ms = 1_000;
    // Queues large enough that the router never cuts it as slow: only the full socket can.
    config.ws.outbound_queue_frames = 10_000;
    config.ws.outbound_queue_bytes = 64 * 1024 * 1024;
    let bridge = TestBridge::start_healthy(config).await;
    let mut stalled = sluggish_browser(&bridge).await;
    stalled.subscribe(&["A"]).await;
    // 1000 × 8 KiB fill its socket; from then on the session cannot write, so the heartbeat's
    // close (or any frame) cannot reach it either: only the stalled write can end it.
    let messages = padded_events(1000);
    let exchange = bridge.config.amqp.inbound_exchange.clone();
    let publisher =
        tokio::task::spawn_blocking(move || Desktop::connect().publish_many(&exchange, &messages));
    let started = Instant::now();
    loop {
        // Sending needs no reading: this keeps the heartbeat fed for as long as the session is
        // still polled, so that on a slow machine the heartbeat cannot end it first. Once the
        // bridge drops the connection, sends fail and are ignored.
        let _ = stalled.try_send(json!({"op": "ping"})).await;
        let health = bridge.wait_health(200).await;
        if health["sessions"] == 0 && health["desks"]["A"] == 0 {
            break;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "a session that cannot write was never dropped: {health}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    publisher.await.expect("desktop published");
    bridge.wait_metric("deskbridge_sessions_stalled_total 1").await;
    bridge
        .wait_metric("deskbridge_sessions_slow_closed_total 0")
        .await;
    let mut fresh = Browser::connect(&bridge).await;
    fresh.assert_quiet().await;
    drop(stalled);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_peer_is_dropped_by_the_heartbeat_and_its_subscriptions_removed() {
    let mut config = test_config("heartbeat");
    config.ws.heartbeat_interval_ms = 100;
    config.ws.client_timeout_ms = 400;
    let bridge = TestBridge::start_healthy(config).await;
    let mut silent = Browser::connect(&bridge).await;
    silent.subscribe(&["A", "B"]).await;
    // From now on nobody reads this socket, so its pings go unanswered.
    let started = Instant::now();
    loop {
        let health = bridge.wait_health(200).await;
        if health["sessions"] == 0 && health["desks"] == json!({"A": 0, "B": 0}) {
            break;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "the silent session was never removed: {health}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let close = silent.closed().await.expect("close frame");
    assert_eq!(close.code, CloseCode::Away);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_answers_pings_outlives_many_client_timeouts() {
    let mut config = test_config("heartbeat-alive");
    // A timeout a busy scheduler cannot eat: at 300 ms, a test thread descheduled for that
    // long on a loaded 2-core machine (load 11) missed it and the session was closed.
    config.ws.heartbeat_interval_ms = 500;
    config.ws.client_timeout_ms = 1_500;
    let bridge = TestBridge::start_healthy(config).await;
    let mut alive = Browser::connect(&bridge).await;
    alive.subscribe(&["A"]).await;
    // Reading is what answers pings (tungstenite queues the pong and sends it on the next
    // read): 12 pings at 500 ms span four client timeouts, with nothing sent but pongs.
    let mut pings = 0;
    while pings < 12 {
        match alive.next_frame().await {
            Some(Message::Ping(_)) => pings += 1,
            other => panic!("only pings come to a quiet session, got {other:?}"),
        }
    }
    let health = bridge.wait_health(200).await;
    assert_eq!(
        (health["sessions"].clone(), health["desks"]["A"].clone()),
        (json!(1), json!(1))
    );
    Desktop::connect().publish_json(
        &bridge.config.amqp.inbound_exchange,
        "A_new_example",
        &json!({"n": 1}),
    );
    assert_eq!(alive.recv().await["data"], json!({"n": 1}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_under_load_loses_no_acked_message() {
    let bridge = TestBridge::start_healthy(test_config("shutdown")).await;
    let listener = Listener::bind(&bridge.config.amqp.outbound_exchange, &["A_new_example"]);
    let mut tasks = Vec::new();
    for client in 0..4 {
        let mut browser = Browser::connect(&bridge).await;
        tasks.push(tokio::spawn(async move {
            let (mut acked, mut failed) = (Vec::new(), 0);
            for i in 0..300 {
                let publish = json!({"op": "publish", "desk": "A", "event": "new_example", "data": {"c": client, "i": i}});
                if browser.try_send(publish).await.is_err() {
                    break;
                }
            }
            // Read until the bridge closes: every answer is an ack or broker_unavailable.
            let close = loop {
                match browser.next_frame().await {
                    Some(Message::Text(text)) => {
                        let frame: Value = serde_json::from_str(&text).expect("JSON");
                        match frame["op"].as_str() {
                            Some("ack") => acked.push(frame["id"].as_str().expect("id").to_string()),
                            Some("error") => {
                                assert_eq!(frame["code"], "broker_unavailable", "{frame}");
                                failed += 1;
                            }
                            _ => panic!("unexpected frame {frame}"),
                        }
                    }
                    Some(Message::Close(frame)) => break frame.map(|f| f.code),
                    Some(_) => continue,
                    None => break None,
                }
            };
            (acked, failed, close)
        }));
    }
    // Let traffic flow, then stop the bridge in the middle of it.
    bridge
        .wait_metric_at_least("deskbridge_messages_out_total{direction=\"web_to_desktop\"}", 50)
        .await;
    let (mut bridge, took) = bridge.shut_down().await;
    assert!(
        took < Duration::from_secs(3 + 1),
        "shutdown is bounded by shutdown_timeout_ms (3 s): took {took:?}"
    );

    let mut all_acked = Vec::new();
    for task in tasks {
        let (acked, _failed, close) = task.await.expect("client task");
        assert_eq!(close, Some(CloseCode::Away), "browsers are told 1001 going away");
        all_acked.extend(acked);
    }
    assert!(!all_acked.is_empty(), "some publishes were acked before shutdown");
    let mut delivered = HashSet::new();
    while delivered.len() < all_acked.len() {
        let delivery = listener.next();
        delivered.insert(delivery.properties.message_id().clone().expect("message_id"));
    }
    for id in &all_acked {
        assert!(delivered.contains(id), "acked message {id} reached the desktop");
    }
    bridge.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_browsers_with_1001_and_exits_zero() {
    let config = test_config("sigterm");
    let mut bridge =
        BridgeProcess::launch(env!("CARGO_BIN_EXE_deskbridge"), &config).expect("start deskbridge");
    bridge.wait_healthy(DEADLINE).await;
    let mut browser = Browser::connect_to(bridge.addr).await;

    bridge.terminate().expect("SIGTERM is delivered");
    let close = browser.closed().await.expect("close frame");
    assert_eq!(close.code, CloseCode::Away);
    let exit = tokio::task::block_in_place(|| bridge.wait_exit(Duration::from_secs(10)))
        .expect("deskbridge exits within 10 s of SIGTERM");
    assert_eq!(exit.code(), Some(0));
    drop(bridge);
    delete_topology(&config);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_broker_messages_never_crash_the_consumer() {
    let bridge = TestBridge::start_healthy(test_config("hostile")).await;
    let mut browser = Browser::connect(&bridge).await;
    browser.subscribe(&["A"]).await;
    let exchange = bridge.config.amqp.inbound_exchange.clone();
    let mut desktop = Desktop::connect();

    // 4 MiB of garbage: rejected.
    desktop.publish_with(
        &exchange,
        "A_new_example",
        &vec![b'{'; 4 << 20],
        AmqpProperties::default(),
    );
    // Odd properties: x-instance of the wrong type, foreign content type, empty message_id.
    let mut headers = FieldTable::new();
    headers.insert("x-instance".into(), AmqpValue::LongLongInt(42));
    let odd = AmqpProperties::default()
        .with_headers(headers)
        .with_content_type("text/plain".into())
        .with_message_id(String::new());
    desktop.publish_with(&exchange, "A_new_example", br#"{"odd":true}"#, odd);
    // 2 MiB of valid JSON: delivered whole.
    let big = json!({"blob": "z".repeat(2 << 20)});
    desktop.publish_json(&exchange, "A_new_example", &big);

    let event = browser.recv().await;
    assert_eq!(event["data"], json!({"odd": true}));
    let event = browser.recv().await;
    assert_eq!(event["data"]["blob"].as_str().map(str::len), Some(2 << 20));
    bridge
        .wait_metric("deskbridge_rejects_total{reason=\"bad_body\"} 1")
        .await;
    browser.assert_quiet().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_frames_are_each_answered_and_never_break_the_session() {
    let bridge = TestBridge::start_healthy(test_config("fuzzws")).await;
    let mut browser = Browser::connect(&bridge).await;
    let seeds = [
        r#"{"op":"ping"}"#,
        r#"{"op":"subscribe","desks":["A"]}"#,
        r#"{"op":"unsubscribe","desks":["B"]}"#,
        r#"{"op":"publish","desk":"A","event":"new_example","data":{"k":[1,{"x":null}]},"ref":"r"}"#,
    ];
    // A fixed-seed xorshift so a failure reproduces.
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let alphabet: Vec<char> =
        r#"{}[]":,0123456789.-eE truefalsnul\opAB_"#.chars().chain(['é', '\u{0}', '💥']).collect();
    for _ in 0..400 {
        let mut text: Vec<char> = seeds[(next() % seeds.len() as u64) as usize].chars().collect();
        for _ in 0..(next() % 4) {
            let at = (next() % (text.len() as u64 + 1)) as usize;
            match next() % 3 {
                0 if at < text.len() => {
                    text.remove(at);
                }
                1 if at < text.len() => text[at] = alphabet[(next() % alphabet.len() as u64) as usize],
                _ => text.insert(at, alphabet[(next() % alphabet.len() as u64) as usize]),
            }
        }
        let text: String = text.into_iter().collect();
        browser.send_text(&text).await;
        let reply = browser.recv().await;
        let op = reply["op"].as_str().unwrap_or_default();
        assert!(
            ["pong", "subscribed", "unsubscribed", "ack", "error"].contains(&op),
            "{text:?} got {reply}"
        );
    }
    browser.assert_quiet().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_urls_are_tried_in_order() {
    let mut config = test_config("urls");
    config.amqp.urls = vec![url("amqp://guest:guest@127.0.0.1:1/%2f"), url(&amqp_url())];
    let bridge = TestBridge::start(config);
    let health = bridge.wait_health(200).await;
    assert_eq!(
        health["amqp"]["consumer"], "up",
        "the second URL took over: {health}"
    );
}
