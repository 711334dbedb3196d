//! Messages end to end: desktop (amiquip) ⇄ bridge ⇄ browsers (tungstenite), real broker.

mod common;

use amiquip::{AmqpProperties, AmqpValue};
use common::*;
use deskbridge::transform::{Data, Direction, Transform, TransformError, TransformRule};
use deskbridge::Transforms;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn desktop_events_reach_only_the_desks_subscribers() {
    let bridge = TestBridge::start_healthy(test_config("d2w")).await;
    let mut on_a = Browser::connect(&bridge).await;
    let mut on_b = Browser::connect(&bridge).await;
    let mut on_both = Browser::connect(&bridge).await;
    on_a.subscribe(&["A"]).await;
    on_b.subscribe(&["B"]).await;
    on_both.subscribe(&["A", "B"]).await;

    let mut desktop = Desktop::connect();
    let exchange = bridge.config.amqp.inbound_exchange.clone();
    let props = AmqpProperties::default().with_message_id("desk-msg-1".into());
    desktop.publish_with(&exchange, "A_new_example", br#"{"price":101.5,"qty":3}"#, props);
    desktop.publish_json(&exchange, "B_update_example", &json!({"qty": 4}));

    let event = on_a.recv().await;
    assert_eq!(
        event,
        json!({"op": "event", "desk": "A", "event": "new_example", "id": "desk-msg-1",
               "origin": "desktop", "data": {"price": 101.5, "qty": 3}})
    );
    let event = on_b.recv().await;
    assert_eq!(
        (event["desk"].as_str(), event["event"].as_str()),
        (Some("B"), Some("update_example"))
    );
    let generated_id = event["id"].as_str().expect("an id even without message_id");
    assert!(
        uuid::Uuid::parse_str(generated_id).is_ok(),
        "bridge-made id: {generated_id}"
    );
    assert_eq!(on_both.recv().await["desk"], "A");
    assert_eq!(on_both.recv().await["desk"], "B");
    on_a.assert_quiet().await;
    on_b.assert_quiet().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_publish_reaches_the_desktop_with_every_property() {
    let bridge = TestBridge::start_healthy(test_config("w2d")).await;
    let exchange = bridge.config.amqp.outbound_exchange.clone();
    let listener = Listener::bind(&exchange, &["A_new_example"]);
    let mut browser = Browser::connect(&bridge).await;

    let data = json!({"bond": "XS123", "px": 99.5});
    let ack = browser.publish("A", "new_example", data.clone(), "c1").await;
    assert_eq!(
        (ack["op"].as_str(), ack["ref"].as_str(), ack["routed"].as_bool()),
        (Some("ack"), Some("c1"), Some(true)),
        "{ack}"
    );
    let delivery = listener.next();
    let props = &delivery.properties;
    assert_eq!(
        props.message_id().as_deref(),
        ack["id"].as_str(),
        "ack id is the AMQP message_id"
    );
    assert_eq!(props.content_type().as_deref(), Some("application/json"));
    assert_eq!(*props.delivery_mode(), Some(2));
    assert_eq!(props.app_id().as_deref(), Some("deskbridge"));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let stamp = props.timestamp().expect("timestamp set");
    assert!(stamp.abs_diff(now) < 60, "timestamp {stamp} is now ({now})");
    let headers = props.headers().clone().expect("headers set");
    let header = |name: &str| match headers.get(name) {
        Some(AmqpValue::LongString(value)) => value.clone(),
        other => panic!("header {name}: {other:?}"),
    };
    assert_eq!(header("x-origin"), "web");
    assert_eq!(header("x-session"), browser.session);
    assert!(uuid::Uuid::parse_str(&header("x-instance")).is_ok());
    assert_eq!(delivery.routing_key, "A_new_example");
    let body: Value = serde_json::from_slice(&delivery.body).expect("JSON body");
    assert_eq!(body, data, "the body is the data and nothing else");

    // No queue bound for B_delete_example: the broker returns it and the browser is told.
    let ack = browser
        .publish("B", "delete_example", json!({"id": 7}), "c2")
        .await;
    assert_eq!(
        (ack["op"].as_str(), ack["routed"].as_bool()),
        (Some("ack"), Some(false)),
        "{ack}"
    );
    bridge.wait_metric("deskbridge_publish_unroutable_total 1").await;
    assert_eq!(listener.waiting(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_publish_reaches_other_browsers_on_the_desk_but_not_the_sender() {
    let bridge = TestBridge::start_healthy(test_config("w2w")).await;
    let mut sender = Browser::connect(&bridge).await;
    let mut peer = Browser::connect(&bridge).await;
    let mut other_desk = Browser::connect(&bridge).await;
    sender.subscribe(&["A"]).await;
    peer.subscribe(&["A"]).await;
    other_desk.subscribe(&["B"]).await;

    let ack = sender.publish("A", "update_example", json!({"v": 1}), "x").await;
    assert_eq!(ack["op"], "ack");
    let event = peer.recv().await;
    assert_eq!(
        event,
        json!({"op": "event", "desk": "A", "event": "update_example", "id": ack["id"], "origin": "web", "data": {"v": 1}})
    );
    sender.assert_quiet().await;
    other_desk.assert_quiet().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transforms_apply_in_both_directions() {
    let mut config = test_config("transforms");
    let rules = r#"
        [[transforms]]
        desk = "A"
        direction = "to_web"
        rename = { Qty = "quantity" }
        drop = ["Internal"]
        set = { source = "desk-a" }
        require = ["quantity"]

        [[transforms]]
        desk = "A"
        direction = "to_desktop"
        rename = { quantity = "Qty" }
        require = ["Qty"]
    "#;
    #[derive(serde::Deserialize)]
    struct Rules {
        transforms: Vec<TransformRule>,
    }
    config.transforms = toml::from_str::<Rules>(rules).expect("rules parse").transforms;
    let bridge = TestBridge::start_healthy(config).await;
    let mut browser = Browser::connect(&bridge).await;
    browser.subscribe(&["A"]).await;
    let listener = Listener::bind(&bridge.config.amqp.outbound_exchange, &["A_new_example"]);
    let dead = Listener::existing(&format!("{}.dead", bridge.config.amqp.inbound_queue));
    let mut desktop = Desktop::connect();
    let inbound = bridge.config.amqp.inbound_exchange.clone();

    desktop.publish_json(
        &inbound,
        "A_new_example",
        &json!({"Qty": 5, "Internal": true, "px": 1}),
    );
    let event = browser.recv().await;
    assert_eq!(event["data"], json!({"quantity": 5, "px": 1, "source": "desk-a"}));

    let ack = browser
        .publish("A", "new_example", json!({"quantity": 7}), "t1")
        .await;
    assert_eq!(ack["op"], "ack");
    let body: Value = serde_json::from_slice(&listener.next().body).expect("JSON");
    assert_eq!(body, json!({"Qty": 7}));

    // Failing transforms: the browser gets transform_failed; the desktop message is
    // dead-lettered, and the consumer goes on delivering.
    let error = browser.publish("A", "new_example", json!({"px": 1}), "t2").await;
    assert_eq!(
        (error["code"].as_str(), error["ref"].as_str()),
        (Some("transform_failed"), Some("t2")),
        "{error}"
    );
    desktop.publish_json(&inbound, "A_new_example", &json!({"px": 2}));
    let rejected = dead.next();
    assert_eq!(
        serde_json::from_slice::<Value>(&rejected.body).ok(),
        Some(json!({"px": 2}))
    );
    desktop.publish_json(&inbound, "A_new_example", &json!({"Qty": 9}));
    assert_eq!(browser.recv().await["data"]["quantity"], 9);
    bridge
        .wait_metric("deskbridge_rejects_total{reason=\"transform_failed\"} 1")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn code_registered_transforms_run() {
    struct Stamp;
    impl Transform for Stamp {
        fn apply(&self, data: &mut Data) -> Result<(), TransformError> {
            if data.contains_key("forbidden") {
                return Err(TransformError::Rejected(
                    "`forbidden` may not leave the web".into(),
                ));
            }
            data.insert("stamped".into(), true.into());
            Ok(())
        }
    }
    let config = test_config("codetx");
    let mut transforms = Transforms::from_rules(&[]);
    transforms.register("*", "*", Direction::ToDesktop, Stamp);
    let bridge = TestBridge::start_with(config, transforms);
    bridge.wait_health(200).await;
    let listener = Listener::bind(&bridge.config.amqp.outbound_exchange, &["B_new_example"]);
    let mut browser = Browser::connect(&bridge).await;
    assert_eq!(
        browser.publish("B", "new_example", json!({"a": 1}), "k1").await["op"],
        "ack"
    );
    let body: Value = serde_json::from_slice(&listener.next().body).expect("JSON");
    assert_eq!(body, json!({"a": 1, "stamped": true}));
    let error = browser
        .publish("B", "new_example", json!({"forbidden": 1}), "k2")
        .await;
    assert_eq!(error["code"], "transform_failed");
    assert!(
        error["message"]
            .as_str()
            .is_some_and(|m| m.contains("may not leave")),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_transform_refuses_its_message_and_the_bridge_goes_on() {
    /// User code with a bug: panics on some data, in both directions.
    struct Fragile;
    impl Transform for Fragile {
        fn apply(&self, data: &mut Data) -> Result<(), TransformError> {
            assert!(!data.contains_key("explode"), "a bug in user code");
            Ok(())
        }
    }
    let config = test_config("panictx");
    let mut transforms = Transforms::from_rules(&[]);
    transforms.register("A", "*", Direction::ToWeb, Fragile);
    transforms.register("A", "*", Direction::ToDesktop, Fragile);
    let bridge = TestBridge::start_with(config, transforms);
    bridge.wait_health(200).await;
    let (queue, exchange) = (
        bridge.config.amqp.inbound_queue.clone(),
        bridge.config.amqp.inbound_exchange.clone(),
    );
    let dead = Listener::existing(&format!("{queue}.dead"));
    let mut browser = Browser::connect(&bridge).await;
    browser.subscribe(&["A"]).await;

    let mut desktop = Desktop::connect();
    desktop.publish_json(&exchange, "A_new_example", &json!({"explode": 1}));
    desktop.publish_json(&exchange, "A_new_example", &json!({"ok": 1}));
    assert_eq!(browser.recv().await["data"], json!({"ok": 1}));
    let dead_letter: Value = serde_json::from_slice(&dead.next().body).expect("JSON");
    assert_eq!(dead_letter, json!({"explode": 1}));

    let error = browser
        .publish("A", "new_example", json!({"explode": 1}), "p1")
        .await;
    assert_eq!(
        (error["code"].as_str(), error["ref"].as_str()),
        (Some("transform_failed"), Some("p1"))
    );
    let ack = browser
        .publish("A", "new_example", json!({"fine": 1}), "p2")
        .await;
    assert_eq!(ack["op"], "ack", "{ack}");
    bridge.wait_metric("deskbridge_transform_panics_total 2").await;
    bridge.wait_health(200).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_broker_messages_are_dead_lettered_and_the_consumer_keeps_delivering() {
    let bridge = TestBridge::start_healthy(test_config("badbody")).await;
    let mut browser = Browser::connect(&bridge).await;
    browser.subscribe(&["A"]).await;
    let queue = bridge.config.amqp.inbound_queue.clone();
    let exchange = bridge.config.amqp.inbound_exchange.clone();
    let dead = Listener::existing(&format!("{queue}.dead"));
    let mut desktop = Desktop::connect();
    // Let routing keys the bridge does not know reach its queue, as a misconfigured
    // desktop app's bindings would.
    desktop.bind(&queue, &exchange, "Z_new_example");
    desktop.bind(&queue, &exchange, "A_launch_rockets");
    desktop.bind(&queue, &exchange, "nounderscore");

    let bad: [(&str, &[u8]); 7] = [
        ("A_new_example", b"not json at all"),
        ("A_new_example", b"[1,2,3]"),
        ("A_new_example", b"\xff\xfe\x00binary"),
        ("A_new_example", b""),
        ("Z_new_example", b"{}"),
        ("A_launch_rockets", b"{}"),
        ("nounderscore", b"{}"),
    ];
    for (key, body) in bad {
        desktop.publish_with(&exchange, key, body, AmqpProperties::default());
    }
    desktop.publish_json(&exchange, "A_new_example", &json!({"ok": true}));

    let event = browser.recv().await;
    assert_eq!(
        event["data"],
        json!({"ok": true}),
        "the good message after the bad ones arrives"
    );
    for (key, body) in bad {
        let dead_letter = dead.next();
        assert_eq!(
            (dead_letter.routing_key.as_str(), dead_letter.body.as_slice()),
            (key, body)
        );
    }
    for line in [
        "deskbridge_rejects_total{reason=\"bad_body\"} 4",
        "deskbridge_rejects_total{reason=\"unknown_desk\"} 2",
        "deskbridge_rejects_total{reason=\"unknown_event\"} 1",
    ] {
        bridge.wait_metric(line).await;
    }
    browser.assert_quiet().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_publishes_coming_back_are_not_delivered_again() {
    // Outbound and inbound share one exchange: every browser publish lands in the bridge's
    // own queue too. It must be acked and dropped, not delivered as a desktop event.
    let mut config = test_config("loop");
    config.amqp.outbound_exchange = config.amqp.inbound_exchange.clone();
    let bridge = TestBridge::start_healthy(config).await;
    let mut sender = Browser::connect(&bridge).await;
    let mut peer = Browser::connect(&bridge).await;
    peer.subscribe(&["A"]).await;
    let ack = sender.publish("A", "new_example", json!({"n": 1}), "loop").await;
    assert_eq!(
        ack["routed"], true,
        "the shared exchange routes it to the bridge's queue"
    );
    let event = peer.recv().await;
    assert_eq!(
        (event["origin"].as_str(), event["id"].as_str()),
        (Some("web"), ack["id"].as_str())
    );
    bridge.wait_metric("deskbridge_own_echo_total 1").await;
    peer.assert_quiet().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_desktop_messages_arrive_in_order_once_each_and_are_acked() {
    let mut bridge = TestBridge::start_healthy(test_config("order")).await;
    let mut browser = Browser::connect(&bridge).await;
    browser.subscribe(&["A"]).await;
    let messages: Vec<(String, Value)> = (0..1000)
        .map(|seq| (key("A", "new_example"), json!({"seq": seq})))
        .collect();
    Desktop::connect().publish_many(&bridge.config.amqp.inbound_exchange, &messages);
    for seq in 0..1000 {
        let event = browser.recv().await;
        assert_eq!(event["data"]["seq"], seq, "in order, none lost or doubled");
    }
    browser.assert_quiet().await;
    // Once the bridge's connection is closed, an unacked delivery would be ready again.
    bridge.stop();
    let queue = bridge.config.amqp.inbound_queue.clone();
    assert_eq!(queue_depth(&queue), 0, "every delivery was acked");
    assert_eq!(queue_depth(&format!("{queue}.dead")), 0, "none was rejected");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_subscribers_each_get_all_two_hundred_messages() {
    let bridge = TestBridge::start_healthy(test_config("fanout")).await;
    let mut browsers = Vec::new();
    for _ in 0..50 {
        let mut browser = Browser::connect(&bridge).await;
        browser.subscribe(&["A"]).await;
        browsers.push(browser);
    }
    let messages: Vec<(String, Value)> = (0..200)
        .map(|seq| (key("A", "new_example"), json!({"seq": seq})))
        .collect();
    Desktop::connect().publish_many(&bridge.config.amqp.inbound_exchange, &messages);
    let readers: Vec<_> = browsers
        .into_iter()
        .map(|mut browser| {
            tokio::spawn(async move {
                for seq in 0..200 {
                    assert_eq!(browser.recv().await["data"]["seq"], seq);
                }
                browser.assert_quiet().await;
            })
        })
        .collect();
    for reader in readers {
        reader.await.expect("every subscriber got all 200 in order");
    }
    bridge
        .wait_metric("deskbridge_messages_out_total{direction=\"desktop_to_web\"} 10000")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_does_not_close_browsers_that_read_it() {
    // Default limits: the byte budget, not a frame count, decides who is too slow.
    let c = test_config("burst");
    let bridge = TestBridge::start_healthy(c).await;
    let (browsers, events) = (20, 5_000);
    let mut subscribed = Vec::new();
    for _ in 0..browsers {
        let mut browser = Browser::connect(&bridge).await;
        browser.subscribe(&["A"]).await;
        subscribed.push(browser);
    }
    let messages: Vec<(String, Value)> = (0..events)
        .map(|seq| (key("A", "new_example"), json!({"seq": seq, "px": 101.25})))
        .collect();
    // The whole burst reaches the broker before anybody reads.
    let exchange = bridge.config.amqp.inbound_exchange.clone();
    tokio::task::spawn_blocking(move || Desktop::connect().publish_many(&exchange, &messages))
        .await
        .expect("desktop publisher");
    // All read at once (collected: a lazy iterator would start each reader only after the
    // one before it finished, leaving the last sockets unread for the whole run).
    let readers: Vec<_> = subscribed
        .into_iter()
        .map(|mut browser| {
            tokio::spawn(async move {
                for seq in 0..events {
                    assert_eq!(browser.recv().await["data"]["seq"], seq);
                }
            })
        })
        .collect();
    for reader in readers {
        reader.await.expect("every browser got the whole burst, in order");
    }
    bridge
        .wait_metric("deskbridge_sessions_slow_closed_total 0")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_carry_their_ttl_and_expired_ones_are_not_delivered() {
    let bridge = TestBridge::start_healthy(test_config("ttl")).await;
    let listener = Listener::bind(&bridge.config.amqp.outbound_exchange, &["A_new_example"]);
    let mut browser = Browser::connect(&bridge).await;
    browser
        .send(json!({"op": "publish", "desk": "A", "event": "new_example", "data": {"q": 1}, "ref": "t1", "ttl_ms": 60000}))
        .await;
    assert_eq!(browser.recv().await["op"], "ack");
    let expiration = listener
        .next()
        .properties
        .expiration()
        .clone()
        .expect("expiration set");
    let ms: u64 = expiration.parse().expect("milliseconds");
    assert!((50_000..=60_000).contains(&ms), "what is left of ttl_ms: {ms}");

    browser.subscribe(&["A"]).await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let exchange = bridge.config.amqp.inbound_exchange.clone();
    let mut desktop = Desktop::connect();
    let stale = AmqpProperties::default()
        .with_timestamp(now - 120)
        .with_expiration("1000".into());
    desktop.publish_with(&exchange, "A_new_example", br#"{"quote":"stale"}"#, stale);
    let fresh = AmqpProperties::default()
        .with_timestamp(now)
        .with_expiration("60000".into());
    desktop.publish_with(&exchange, "A_new_example", br#"{"quote":"fresh"}"#, fresh);
    assert_eq!(browser.recv().await["data"], json!({"quote": "fresh"}));
    bridge.wait_metric("deskbridge_expired_total 1").await;
    browser.assert_quiet().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_of_two_desks_and_targeted_ones_arrive_in_the_order_they_were_published() {
    // The bridge queues a run of one desk's events as one buffer: a change of desk or a
    // targeted message must end the run, or a browser reading both would see them reordered.
    let mut bridge = TestBridge::start_healthy(test_config("runs")).await;
    let mut browser = Browser::connect(&bridge).await;
    browser.subscribe(&["A", "B"]).await;
    let mut to_browser = amiquip::FieldTable::new();
    to_browser.insert(
        "x-to-session".into(),
        AmqpValue::LongString(browser.session.clone()),
    );
    let messages: Vec<(String, Value, AmqpProperties)> = (0..600)
        .map(|seq| {
            let desk = if (seq / 7) % 2 == 0 { "A" } else { "B" };
            let properties = if seq % 50 == 25 {
                AmqpProperties::default().with_headers(to_browser.clone())
            } else {
                AmqpProperties::default()
            };
            (key(desk, "new_example"), json!({ "seq": seq }), properties)
        })
        .collect();
    Desktop::connect().publish_many_with(&bridge.config.amqp.inbound_exchange, &messages);
    for seq in 0..600 {
        let event = browser.recv().await;
        let desk = if (seq / 7) % 2 == 0 { "A" } else { "B" };
        assert_eq!(
            (event["data"]["seq"].as_u64(), event["desk"].as_str()),
            (Some(seq), Some(desk)),
            "in publish order across desks and targeted messages: {event}"
        );
    }
    browser.assert_quiet().await;
    bridge.stop();
    assert_eq!(
        queue_depth(&bridge.config.amqp.inbound_queue),
        0,
        "every delivery was acked"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_desktop_message_for_one_session_reaches_only_that_session() {
    let bridge = TestBridge::start_healthy(test_config("tosession")).await;
    let exchange = bridge.config.amqp.inbound_exchange.clone();
    let mut subscribed = Browser::connect(&bridge).await;
    subscribed.subscribe(&["A"]).await;
    let mut target = Browser::connect(&bridge).await; // not subscribed to A
    let addressed = |to: &str| {
        let mut headers = amiquip::FieldTable::new();
        headers.insert("x-to-session".into(), AmqpValue::LongString(to.into()));
        AmqpProperties::default().with_headers(headers)
    };
    let mut desktop = Desktop::connect();
    desktop.publish_with(
        &exchange,
        "A_new_example",
        br#"{"cmd":"quote"}"#,
        addressed(&target.session),
    );
    let event = target.recv().await;
    assert_eq!(
        (event["desk"].as_str(), event["data"].clone()),
        (Some("A"), json!({"cmd": "quote"}))
    );
    for unknown in [uuid::Uuid::new_v4().to_string(), "not-a-session".to_string()] {
        desktop.publish_with(
            &exchange,
            "A_new_example",
            br#"{"cmd":"lost"}"#,
            addressed(&unknown),
        );
    }
    bridge.wait_metric("deskbridge_undeliverable_total 2").await;
    subscribed.assert_quiet().await; // the desk's subscribers did not get any of them
    target.assert_quiet().await;
}

/// Numbers as a price feed or an identifier scheme writes them: none survives a round trip
/// through an `f64` as written.
const EXACT: [&str; 3] = [
    "101.50",
    "123456789012345678901234567890",
    "0.1000000000000000055511151231257827",
];

/// `data` with each of [`EXACT`] as written.
fn exact_data() -> String {
    format!(r#"{{"px":{},"id":{},"p":{}}}"#, EXACT[0], EXACT[1], EXACT[2])
}

fn assert_exact(text: &str, way: &str) {
    for number in EXACT {
        assert!(
            text.contains(&format!(":{number}")),
            "{way}: `{number}` arrives as written: {text}"
        );
    }
}

/// Every way `data` travels: desktop → web, web → desktop, web → web, a reply to a desktop
/// request.
async fn numbers_travel_exactly(config: deskbridge::Config, way: &str) {
    let bridge = TestBridge::start_healthy(config).await;
    let inbound = bridge.config.amqp.inbound_exchange.clone();
    let outbound = bridge.config.amqp.outbound_exchange.clone();
    let listener = Listener::bind(&outbound, &["A_new_example"]);
    let answers = Listener::bind(&outbound, &[]);
    let mut sender = Browser::connect(&bridge).await;
    let mut peer = Browser::connect(&bridge).await;
    sender.subscribe(&["A"]).await;
    peer.subscribe(&["A"]).await;
    let data = exact_data();

    let mut desktop = Desktop::connect();
    desktop.publish_with(
        &inbound,
        "A_new_example",
        data.as_bytes(),
        AmqpProperties::default(),
    );
    assert_exact(&peer.recv_text().await, &format!("{way}, desktop → web"));
    assert_exact(&sender.recv_text().await, &format!("{way}, desktop → web"));

    sender
        .send_text(&format!(
            r#"{{"op":"publish","desk":"A","event":"new_example","data":{data},"ref":"p1","ttl_ms":60000}}"#
        ))
        .await;
    assert_eq!(sender.recv().await["op"], "ack");
    let body = listener.next().body;
    assert_exact(&String::from_utf8_lossy(&body), &format!("{way}, web → desktop"));
    assert_exact(&peer.recv_text().await, &format!("{way}, web → web"));

    let mut headers = amiquip::FieldTable::new();
    headers.insert("x-to-session".into(), AmqpValue::LongString(peer.session.clone()));
    let ask = AmqpProperties::default()
        .with_headers(headers)
        .with_message_id("ask-n".into())
        .with_reply_to(answers.queue.clone())
        .with_correlation_id("n".into());
    desktop.publish_with(&inbound, "A_new_example", data.as_bytes(), ask);
    let event = peer.recv_text().await;
    assert_exact(&event, &format!("{way}, desktop request"));
    peer.send_text(&format!(
        r#"{{"op":"reply","reply_id":"ask-n","data":{data},"ref":"r1"}}"#
    ))
    .await;
    assert_eq!(peer.recv().await["op"], "ack");
    assert_exact(
        &String::from_utf8_lossy(&answers.next().body),
        &format!("{way}, reply"),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn numbers_travel_exactly_as_written_in_every_direction() {
    numbers_travel_exactly(test_config("exact"), "no transform").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn numbers_travel_exactly_as_written_through_transforms() {
    let mut config = test_config("exacttr");
    #[derive(serde::Deserialize)]
    struct Rules {
        transforms: Vec<TransformRule>,
    }
    let rules = r#"
        [[transforms]]
        direction = "to_web"
        set = { via = "t" }

        [[transforms]]
        direction = "to_desktop"
        set = { via = "t" }
    "#;
    config.transforms = toml::from_str::<Rules>(rules).expect("rules parse").transforms;
    numbers_travel_exactly(config, "with transforms").await;
}
