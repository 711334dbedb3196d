//! Every WebSocket op and error code, against a running bridge and the real broker.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn welcome_ping_subscribe_unsubscribe() {
    let bridge = TestBridge::start_healthy(test_config("ops")).await;
    let mut browser = Browser::connect(&bridge).await;
    assert_eq!(browser.welcome["version"], deskbridge::VERSION);
    assert_eq!(browser.welcome["desks"], json!(["A", "B"]));
    assert!(
        uuid::Uuid::parse_str(&browser.session).is_ok(),
        "session id is a uuid"
    );

    browser.assert_quiet().await;
    browser.subscribe(&["A", "B"]).await;
    browser.send(json!({"op": "unsubscribe", "desks": ["B"]})).await;
    assert_eq!(
        browser.recv().await,
        json!({"op": "unsubscribed", "desks": ["B"]})
    );
    let health = bridge.wait_health(200).await;
    assert_eq!(health["desks"], json!({"A": 1, "B": 0}));
    assert_eq!(health["sessions"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ops_sent_together_are_each_answered_with_their_ref() {
    let bridge = TestBridge::start_healthy(test_config("refs")).await;
    let mut browser = Browser::connect(&bridge).await;
    let ops = [
        json!({"op": "subscribe", "desks": ["A"], "ref": "s1"}),
        json!({"op": "presence", "desk": "A", "ref": "p1"}),
        json!({"op": "ping", "ref": "g1"}),
        json!({"op": "unsubscribe", "desks": ["A"], "ref": "u1"}),
        json!({"op": "subscribe", "desks": ["Z"], "ref": "s2"}),
        json!({"op": "publish", "desk": "A", "event": "new_example", "data": {"n": 1}, "ref": "c1"}),
    ];
    // All outstanding at once: the answers come in whatever order the bridge produces them.
    for op in ops {
        browser.send(op).await;
    }
    let mut answers = std::collections::BTreeMap::new();
    while answers.len() < 6 {
        let answer = browser.recv().await;
        let reference = answer["ref"]
            .as_str()
            .unwrap_or_else(|| panic!("every answer carries its op's ref: {answer}"))
            .to_string();
        assert!(
            answers.insert(reference, answer.clone()).is_none(),
            "one answer per op: {answer}"
        );
    }
    assert_eq!(
        answers["s1"],
        json!({"op": "subscribed", "desks": ["A"], "ref": "s1"})
    );
    let presence = &answers["p1"];
    assert_eq!(
        (presence["op"].as_str(), presence["desk"].as_str()),
        (Some("presence"), Some("A")),
        "{presence}"
    );
    assert_eq!(answers["g1"], json!({"op": "pong", "ref": "g1"}));
    assert_eq!(
        answers["u1"],
        json!({"op": "unsubscribed", "desks": ["A"], "ref": "u1"})
    );
    let refused = &answers["s2"];
    assert_eq!(
        (refused["op"].as_str(), refused["code"].as_str()),
        (Some("error"), Some("unknown_desk")),
        "{refused}"
    );
    let ack = &answers["c1"];
    assert_eq!(ack["op"], "ack", "{ack}");
    browser.assert_quiet().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ref_that_is_too_long_or_not_a_string_is_refused_and_not_echoed() {
    let bridge = TestBridge::start_healthy(test_config("badref")).await;
    let mut browser = Browser::connect(&bridge).await;
    let longest = "r".repeat(128);
    let too_long = "r".repeat(129);
    let cases = [
        json!({"op": "subscribe", "desks": ["A"], "ref": too_long}),
        json!({"op": "ping", "ref": too_long}),
        json!({"op": "publish", "desk": "A", "event": "new_example", "data": {}, "ref": too_long}),
        json!({"op": "unsubscribe", "desks": ["A"], "ref": 7}),
        json!({"op": "ping", "ref": ["g"]}),
    ];
    for frame in cases {
        browser.send(frame.clone()).await;
        let reply = browser.recv().await;
        assert_eq!(
            (reply["op"].as_str(), reply["code"].as_str()),
            (Some("error"), Some("bad_request")),
            "{frame} → {reply}"
        );
        assert_eq!(reply.get("ref"), None, "{frame} → {reply}");
        assert!(
            !reply["message"].as_str().unwrap_or_default().contains(&too_long),
            "{reply}"
        );
        browser.assert_quiet().await;
    }
    browser.send(json!({"op": "ping", "ref": longest})).await;
    assert_eq!(browser.recv().await, json!({"op": "pong", "ref": longest}));
    browser
        .send(json!({"op": "auth", "token": "a.b.c", "ref": "a1"}))
        .await;
    let refused = browser.recv().await;
    assert_eq!(
        (refused["code"].as_str(), refused["ref"].as_str()),
        (Some("bad_request"), Some("a1")),
        "auth.mode = none refuses auth, with its ref: {refused}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_bad_frame_gets_its_error_code_and_the_session_stays_usable() {
    let bridge = TestBridge::start_healthy(test_config("errors")).await;
    let mut browser = Browser::connect(&bridge).await;
    let cases = [
        ("{not json", "bad_json", None),
        ("[1,2,3]", "bad_request", None),
        (r#"{"desks":["A"]}"#, "bad_request", None),
        (r#"{"op":"subscribe","desks":"A"}"#, "bad_request", None),
        (r#"{"op":"subscribe","desks":[]}"#, "bad_request", None),
        (
            r#"{"op":"publish","desk":"A","event":"new_example","ref":"r1"}"#,
            "bad_request",
            Some("r1"),
        ),
        (
            r#"{"op":"publish","desk":"A","event":"new_example","data":[1],"ref":"r2"}"#,
            "bad_request",
            Some("r2"),
        ),
        (r#"{"op":"teleport","ref":"r3"}"#, "unknown_op", Some("r3")),
        (r#"{"op":"subscribe","desks":["Z"]}"#, "unknown_desk", None),
        (r#"{"op":"unsubscribe","desks":["Z"]}"#, "unknown_desk", None),
        (
            r#"{"op":"publish","desk":"Z","event":"new_example","data":{},"ref":"r4"}"#,
            "unknown_desk",
            Some("r4"),
        ),
        (
            r#"{"op":"publish","desk":"A","event":"explode","data":{},"ref":"r5"}"#,
            "unknown_event",
            Some("r5"),
        ),
    ];
    for (frame, code, reference) in cases {
        browser.send_text(frame).await;
        let reply = browser.recv().await;
        assert_eq!(reply["op"], "error", "{frame} → {reply}");
        assert_eq!(reply["code"], code, "{frame} → {reply}");
        assert_eq!(
            reply.get("ref").and_then(|r| r.as_str()),
            reference,
            "{frame} → {reply}"
        );
        assert!(
            reply["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{reply}"
        );
        browser.assert_quiet().await;
    }
    browser.send_raw(Message::Binary(vec![1, 2, 3])).await;
    let reply = browser.recv().await;
    assert_eq!(
        (reply["op"].as_str(), reply["code"].as_str()),
        (Some("error"), Some("bad_request"))
    );
    browser.assert_quiet().await;
    bridge
        .wait_metric("deskbridge_ws_errors_total{code=\"unknown_desk\"} 3")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_with_an_unknown_desk_changes_nothing() {
    let bridge = TestBridge::start_healthy(test_config("atomic")).await;
    let mut browser = Browser::connect(&bridge).await;
    browser
        .send(json!({"op": "subscribe", "desks": ["A", "Z"]}))
        .await;
    assert_eq!(browser.recv().await["code"], "unknown_desk");
    let health = bridge.wait_health(200).await;
    assert_eq!(health["desks"], json!({"A": 0, "B": 0}), "A was not subscribed");

    // Proof by traffic: an A event published now never reaches this browser; the B event does.
    browser.subscribe(&["B"]).await;
    let mut desktop = Desktop::connect();
    let exchange = bridge.config.amqp.inbound_exchange.clone();
    desktop.publish_json(&exchange, "A_new_example", &json!({"n": 1}));
    desktop.publish_json(&exchange, "B_new_example", &json!({"n": 2}));
    let event = browser.recv().await;
    assert_eq!(
        (event["desk"].as_str(), event["data"]["n"].as_i64()),
        (Some("B"), Some(2))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_frame_closes_with_1009_and_the_bridge_keeps_serving() {
    let mut config = test_config("oversize");
    config.ws.max_frame_bytes = 1024;
    let bridge = TestBridge::start_healthy(config).await;
    let mut browser = Browser::connect(&bridge).await;
    let big = format!(
        r#"{{"op":"publish","desk":"A","event":"new_example","data":{{"x":"{}"}}}}"#,
        "y".repeat(2000)
    );
    browser.send_text(&big).await;
    let close = browser.closed().await.expect("a close frame");
    assert_eq!(close.code, CloseCode::Size);

    let mut next = Browser::connect(&bridge).await;
    next.assert_quiet().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fragmented_messages_are_reassembled() {
    let bridge = TestBridge::start_healthy(test_config("fragments")).await;
    let mut browser = Browser::connect(&bridge).await;
    use tokio_tungstenite::tungstenite::protocol::frame::{
        coding::{Data, OpCode},
        Frame,
    };
    let text = br#"{"op":"subscribe","desks":["A"]}"#;
    let (first, rest) = text.split_at(10);
    let mut frame = Frame::message(first.to_vec(), OpCode::Data(Data::Text), false);
    browser.send_raw(Message::Frame(frame)).await;
    frame = Frame::message(rest.to_vec(), OpCode::Data(Data::Continue), true);
    browser.send_raw(Message::Frame(frame)).await;
    assert_eq!(browser.recv().await, json!({"op": "subscribed", "desks": ["A"]}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_that_is_not_utf8_closes_with_1007_whole_or_fragmented() {
    use tokio_tungstenite::tungstenite::protocol::frame::{
        coding::{Data, OpCode},
        Frame,
    };
    let bridge = TestBridge::start_healthy(test_config("utf8")).await;
    let invalid = b"{\"op\":\"ping\",\"x\":\"\xff\xfe\"}".to_vec();
    let whole = vec![Frame::message(invalid.clone(), OpCode::Data(Data::Text), true)];
    let (first, rest) = invalid.split_at(5);
    let fragmented = vec![
        Frame::message(first.to_vec(), OpCode::Data(Data::Text), false),
        Frame::message(rest.to_vec(), OpCode::Data(Data::Continue), true),
    ];
    for (shape, frames) in [("whole", whole), ("fragmented", fragmented)] {
        let mut browser = Browser::connect(&bridge).await;
        for frame in frames {
            browser.send_raw(Message::Frame(frame)).await;
        }
        let close = browser.closed().await.expect("a close frame");
        assert_eq!(close.code, CloseCode::Invalid, "{shape}: {close:?}");
    }
    Browser::connect(&bridge).await.assert_quiet().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_on_rate_desks_per_request_and_sessions() {
    let mut config = test_config("limits");
    config.ws.max_frames_per_second = 5;
    config.ws.max_desks_per_subscribe = 1;
    config.ws.max_sessions = 2;
    let bridge = TestBridge::start_healthy(config).await;

    let mut browser = Browser::connect(&bridge).await;
    browser
        .send(json!({"op": "subscribe", "desks": ["A", "B"]}))
        .await;
    let reply = browser.recv().await;
    assert_eq!(reply["code"], "bad_request");
    assert!(
        reply["message"]
            .as_str()
            .is_some_and(|m| m.contains("max_desks_per_subscribe")),
        "{reply}"
    );

    // 20 pings in one burst: those within the second's budget get pong; the first one over it
    // gets one rate_limited error and the rest are dropped without a word, so a flood costs
    // one answer per window, not one per frame.
    for _ in 0..20 {
        browser.send(json!({"op": "ping"})).await;
    }
    let (mut pongs, mut limited) = (0, 0);
    let started = std::time::Instant::now();
    // Read until a pong follows the error: the window has rolled, the burst is over. While
    // nothing comes, probe with a ping (dropped until the window rolls).
    loop {
        assert!(started.elapsed() < DEADLINE, "no pong after the window rolled");
        match tokio::time::timeout(Duration::from_millis(300), browser.recv()).await {
            Ok(reply) if reply["op"] == "pong" => {
                pongs += 1;
                if limited > 0 {
                    break;
                }
            }
            Ok(reply) => {
                assert_eq!(reply["code"], "rate_limited", "{reply}");
                limited += 1;
            }
            Err(_) => browser.send(json!({"op": "ping"})).await,
        }
    }
    assert_eq!(
        limited, 1,
        "one rate_limited per window, however many frames were dropped"
    );
    assert!(
        pongs <= 6,
        "at most 5 frames a second pass (+1 after the window rolled): {pongs}"
    );
    bridge
        .wait_metric_at_least("deskbridge_ws_frames_dropped_total{reason=\"rate_limited\"}", 10)
        .await;

    let _second = Browser::connect(&bridge).await;
    let refused = tokio_tungstenite::connect_async(bridge.ws_url()).await;
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => assert_eq!(response.status(), 503),
        other => panic!("a third session must be refused with 503, got {other:?}"),
    }
    let (status, body) = http_get(bridge.addr, "/health").await;
    assert_eq!(status, 200, "a refused upgrade leaves the bridge healthy: {body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_sent_together_with_the_handshake_are_not_lost() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let bridge = TestBridge::start_healthy(test_config("early")).await;
    // Handshake and a first (masked) frame in one write: the bridge reads both at once, while
    // the connection is still HTTP.
    let mut bytes = format!(
        "GET /ws HTTP/1.1\r\nHost: {}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        bridge.addr
    )
    .into_bytes();
    let payload = br#"{"op":"ping"}"#;
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    bytes.extend([0x81, 0x80 | payload.len() as u8]);
    bytes.extend(mask);
    bytes.extend(payload.iter().zip(mask.iter().cycle()).map(|(b, m)| b ^ m));
    let mut stream = tokio::net::TcpStream::connect(bridge.addr)
        .await
        .expect("connect");
    stream.write_all(&bytes).await.expect("send");
    // Read the 101's head byte by byte so that no WebSocket byte is taken with it.
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(stream.read_u8().await.expect("response head"));
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
        tokio_tungstenite::MaybeTlsStream::Plain(stream),
        tokio_tungstenite::tungstenite::protocol::Role::Client,
        None,
    )
    .await;
    let mut browser = Browser::from_stream(ws).await;
    assert_eq!(browser.recv().await, json!({"op": "pong"}));
    browser.assert_quiet().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_that_cannot_keep_up_bounds_its_intake_and_says_so_once() {
    use deskbridge::transform::{Data, Direction, Transform, TransformError, Transforms};
    /// Holds the router on a publish marked `hold` until the test lets it go.
    struct Gate {
        entered: crossbeam_channel::Sender<()>,
        release: crossbeam_channel::Receiver<()>,
    }
    impl Transform for Gate {
        fn apply(&self, data: &mut Data) -> Result<(), TransformError> {
            if data.contains_key("hold") {
                let _ = self.entered.send(());
                let _ = self.release.recv();
            }
            Ok(())
        }
    }
    let (entered, router_held) = crossbeam_channel::unbounded();
    let (release, released) = crossbeam_channel::unbounded();
    let mut config = test_config("intake");
    config.ws.max_queued_requests = 4;
    let mut transforms = Transforms::from_rules(&[]);
    transforms.register(
        "*",
        "*",
        Direction::ToDesktop,
        Gate {
            entered,
            release: released,
        },
    );
    let bridge = TestBridge::start_with(config, transforms);
    bridge.wait_health(200).await;
    let mut browser = Browser::connect(&bridge).await;
    browser
        .send(
            json!({"op": "publish", "desk": "A", "event": "new_example", "data": {"hold": 1}, "ref": "hold"}),
        )
        .await;
    tokio::task::block_in_place(|| router_held.recv_timeout(DEADLINE))
        .expect("the router takes the held publish");

    let flood = 200;
    for i in 0..flood {
        browser
            .send(json!({"op": "publish", "desk": "A", "event": "new_example", "data": {"i": i}, "ref": format!("f{i}")}))
            .await;
    }
    // Answered by the session itself while the router is still held: the intake is full.
    let busy = browser.recv().await;
    assert_eq!(busy["code"], "rate_limited", "{busy}");
    assert!(
        busy["message"].as_str().is_some_and(|m| m.contains("overloaded")),
        "{busy}"
    );
    // Still held: what the router did not admit was dropped and counted, never queued. The
    // intake admits `max_queued_requests` plus some slack (a sender is parked only after
    // overfilling it), far from the 200 sent.
    bridge
        .wait_metric_at_least(
            "deskbridge_ws_frames_dropped_total{reason=\"router_busy\"}",
            flood - 16,
        )
        .await;
    release.send(()).expect("the gate listens");
    // Checked once the router runs again, so that a failure does not leave it held.
    assert!(
        busy["ref"].as_str().is_some_and(|r| r.starts_with('f')),
        "the frame was read: its ref is echoed: {busy}"
    );
    // What the router admitted is acked.
    for _ in 0..2 {
        let reply = browser.recv().await;
        assert_eq!(reply["op"], "ack", "only acks follow the one busy error: {reply}");
    }
}
