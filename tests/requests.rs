//! Request/reply both ways, against the real broker with real WebSocket clients and desktop
//! apps written with amiquip: browser → desktop (`request` / `reply`, `no_responder`,
//! `timeout`, late and bad answers) and desktop → browser (`reply_id`, `unknown_request`).

mod common;

use std::collections::HashSet;

use amiquip::{AmqpProperties, AmqpValue, FieldTable};
use serde_json::{json, Value};

use common::desktop::Responder;
use common::{test_config, Browser, Desktop, Listener, TestBridge};

/// The request's data and what the responder saw of it, as its answer.
fn echo(request: &amiquip::Delivery) -> Vec<u8> {
    let data: Value = serde_json::from_slice(&request.body).unwrap_or(Value::Null);
    let headers = request.properties.headers().as_ref();
    let header = |name: &str| match headers.and_then(|h| h.get(name)) {
        Some(AmqpValue::LongString(text)) => Some(text.clone()),
        _ => None,
    };
    serde_json::to_vec(&json!({
        "echo": data,
        "message_id": request.properties.message_id(),
        "correlation_id": request.properties.correlation_id(),
        "reply_to": request.properties.reply_to(),
        "origin": header("x-origin"),
        "session": header("x-session"),
    }))
    .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_is_answered_by_the_desktop_app_that_listens_for_it() {
    let bridge = TestBridge::start_healthy(test_config("request")).await;
    let _pricing = Responder::start(&bridge.config.amqp.outbound_exchange, &["A_new_example"], echo);
    let mut browser = Browser::connect(&bridge).await;
    browser
        .send(json!({"op": "request", "desk": "A", "event": "new_example", "data": {"isin": "XS1"}, "ref": "r1", "timeout_ms": 5000}))
        .await;
    let reply = browser.recv().await;
    assert_eq!(
        (reply["op"].as_str(), reply["ref"].as_str()),
        (Some("reply"), Some("r1")),
        "{reply}"
    );
    let id = reply["id"].as_str().expect("reply carries the request id");
    let seen = &reply["data"];
    assert_eq!(seen["echo"], json!({"isin": "XS1"}));
    assert_eq!(seen["correlation_id"], id, "correlation_id = the request id");
    assert_eq!(seen["message_id"], id, "message_id = the request id");
    assert_eq!(seen["origin"], "request");
    assert_eq!(seen["session"], browser.session.as_str());
    let reply_to = seen["reply_to"].as_str().expect("reply_to set");
    assert!(reply_to.starts_with("deskbridge.reply."), "{reply_to}");
    bridge
        .wait_metric("deskbridge_requests_total{outcome=\"answered\"} 1")
        .await;
    browser.assert_quiet().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_requests_from_fifty_browsers_each_reach_their_own_session() {
    let bridge = TestBridge::start_healthy(test_config("request1000")).await;
    let _pricing = Responder::start(&bridge.config.amqp.outbound_exchange, &["A_new_example"], echo);
    let mut browsers = Vec::new();
    for _ in 0..50 {
        browsers.push(Browser::connect(&bridge).await);
    }
    // Every browser has all its 20 requests in flight before any answer is read.
    for (who, browser) in browsers.iter_mut().enumerate() {
        for n in 0..20 {
            browser
                .send(json!({"op": "request", "desk": "A", "event": "new_example", "data": {"who": who, "n": n}, "ref": format!("{who}-{n}")}))
                .await;
        }
    }
    let readers: Vec<_> = browsers
        .into_iter()
        .enumerate()
        .map(|(who, mut browser)| {
            tokio::spawn(async move {
                let mut answered = HashSet::new();
                for _ in 0..20 {
                    let reply = browser.recv().await;
                    assert_eq!(reply["op"], "reply", "{reply}");
                    let echo = &reply["data"]["echo"];
                    assert_eq!(echo["who"], who, "an answer reached the wrong session: {reply}");
                    assert_eq!(reply["ref"], format!("{who}-{}", echo["n"]), "{reply}");
                    assert!(
                        answered.insert(reply["ref"].to_string()),
                        "answered twice: {reply}"
                    );
                }
                browser.assert_quiet().await;
            })
        })
        .collect();
    for reader in readers {
        reader.await.expect("every browser got its 20 answers");
    }
    bridge
        .wait_metric("deskbridge_requests_total{outcome=\"answered\"} 1000")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_nobody_listens_for_is_no_responder() {
    let bridge = TestBridge::start_healthy(test_config("noresponder")).await;
    let mut browser = Browser::connect(&bridge).await;
    browser
        .send(json!({"op": "request", "desk": "A", "event": "update_example", "data": {}, "ref": "r2"}))
        .await;
    let error = browser.recv().await;
    assert_eq!(
        (
            error["op"].as_str(),
            error["code"].as_str(),
            error["ref"].as_str()
        ),
        (Some("error"), Some("no_responder"), Some("r2")),
        "{error}"
    );
    bridge
        .wait_metric("deskbridge_requests_total{outcome=\"no_responder\"} 1")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unanswered_request_times_out_and_its_late_answer_is_dropped_and_counted() {
    let bridge = TestBridge::start_healthy(test_config("timeout")).await;
    // A desktop app that takes the request but answers only when the test says so.
    let slow = Listener::bind(&bridge.config.amqp.outbound_exchange, &["A_new_example"]);
    let mut browser = Browser::connect(&bridge).await;
    browser
        .send(json!({"op": "request", "desk": "A", "event": "new_example", "data": {}, "ref": "r3", "timeout_ms": 300}))
        .await;
    let request = slow.next();
    let error = browser.recv().await;
    assert_eq!(
        (error["code"].as_str(), error["ref"].as_str()),
        (Some("timeout"), Some("r3")),
        "{error}"
    );
    let answer = AmqpProperties::default().with_correlation_id(
        request
            .properties
            .correlation_id()
            .clone()
            .expect("correlation_id"),
    );
    let reply_to = request.properties.reply_to().clone().expect("reply_to");
    Desktop::connect().publish_with("", &reply_to, br#"{"px": 1}"#, answer);
    bridge.wait_metric("deskbridge_late_replies_total 1").await;
    browser.assert_quiet().await;

    for timeout_ms in [0, 60_001] {
        browser
            .send(json!({"op": "request", "desk": "A", "event": "new_example", "data": {}, "ref": "r4", "timeout_ms": timeout_ms}))
            .await;
        let error = browser.recv().await;
        assert_eq!(error["code"], "bad_request", "timeout_ms {timeout_ms}: {error}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_that_is_not_json_is_a_bad_reply() {
    let bridge = TestBridge::start_healthy(test_config("badreply")).await;
    let _broken = Responder::start(&bridge.config.amqp.outbound_exchange, &["A_new_example"], |_| {
        b"<quote/>".to_vec()
    });
    let mut browser = Browser::connect(&bridge).await;
    browser
        .send(json!({"op": "request", "desk": "A", "event": "new_example", "data": {}, "ref": "r5"}))
        .await;
    let error = browser.recv().await;
    assert_eq!(
        (error["code"].as_str(), error["ref"].as_str()),
        (Some("bad_reply"), Some("r5")),
        "{error}"
    );
    browser.assert_quiet().await;
}

/// A targeted desktop request: `x-to-session`, `reply_to` and `correlation_id`.
fn ask(session: &str, reply_to: &str, correlation_id: &str) -> AmqpProperties {
    let mut headers = FieldTable::new();
    headers.insert("x-to-session".into(), AmqpValue::LongString(session.into()));
    AmqpProperties::default()
        .with_headers(headers)
        .with_message_id(format!("ask-{correlation_id}"))
        .with_reply_to(reply_to.into())
        .with_correlation_id(correlation_id.into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_desktop_request_to_a_browser_is_answered_once_by_that_browser() {
    let bridge = TestBridge::start_healthy(test_config("ask")).await;
    let inbound = bridge.config.amqp.inbound_exchange.clone();
    let answers = Listener::bind(&bridge.config.amqp.outbound_exchange, &[]);
    let mut target = Browser::connect(&bridge).await;
    let mut other = Browser::connect(&bridge).await;
    Desktop::connect().publish_with(
        &inbound,
        "A_new_example",
        br#"{"question":"confirm trade 7?"}"#,
        ask(&target.session, &answers.queue, "c-7"),
    );
    let event = target.recv().await;
    assert_eq!(event["data"], json!({"question": "confirm trade 7?"}), "{event}");
    let reply_id = event["reply_id"]
        .as_str()
        .expect("a request carries reply_id")
        .to_owned();
    assert_eq!(reply_id, "ask-c-7", "reply_id is the message id");

    // Only a session it reached may answer.
    other
        .send(json!({"op": "reply", "reply_id": reply_id, "data": {"ok": false}, "ref": "o1"}))
        .await;
    let refused = other.recv().await;
    assert_eq!(
        (refused["code"].as_str(), refused["ref"].as_str()),
        (Some("unknown_request"), Some("o1"))
    );

    target
        .send(json!({"op": "reply", "reply_id": reply_id, "data": {"ok": true}, "ref": "a1"}))
        .await;
    let ack = target.recv().await;
    assert_eq!(
        (ack["op"].as_str(), ack["ref"].as_str(), ack["routed"].as_bool()),
        (Some("ack"), Some("a1"), Some(true)),
        "{ack}"
    );
    let answer = answers.next();
    assert_eq!(answer.properties.correlation_id().as_deref(), Some("c-7"));
    let session = answer
        .properties
        .headers()
        .as_ref()
        .and_then(|headers| headers.get("x-session"))
        .cloned();
    assert_eq!(session, Some(AmqpValue::LongString(target.session.clone())));
    let body: Value = serde_json::from_slice(&answer.body).expect("JSON answer");
    assert_eq!(body, json!({"ok": true}));

    // Answered already, or never asked: unknown_request.
    for reply_id in [reply_id.as_str(), "never-asked"] {
        target
            .send(json!({"op": "reply", "reply_id": reply_id, "data": {"ok": true}, "ref": "a2"}))
            .await;
        let refused = target.recv().await;
        assert_eq!(
            (refused["code"].as_str(), refused["ref"].as_str()),
            (Some("unknown_request"), Some("a2")),
            "{refused}"
        );
    }
    bridge
        .wait_metric("deskbridge_desktop_requests_total{outcome=\"answered\"} 1")
        .await;
    assert_eq!(answers.waiting(), 0, "the desktop app got exactly one answer");
}
