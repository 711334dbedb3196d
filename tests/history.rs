//! History on RabbitMQ streams (`[history]`), against the real broker with real WebSocket
//! clients: many instances, resume, snapshots, epochs, slow readers, garbage in a stream.

mod common;

use deskbridge::config::{Config, DeskPolicy, SlowPolicy};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use common::amqp::delete_history;
use common::bridge::history_config;
use common::browser::{small_receive_buffer, ws_url};
use common::{key, Browser, Desktop, Listener, TestBridge};

/// A bridge that is up and attached to every desk stream (a `since` is served).
async fn ready_bridge(config: Config) -> TestBridge {
    let bridge = TestBridge::start_healthy(config).await;
    bridge.wait_attached(&["A", "B"]).await;
    bridge
}

/// Publishes `count` desktop events `e0..` on desk A with `{"n": i}`.
fn publish_desktop(config: &Config, from: usize, count: usize) {
    let messages: Vec<(String, Value)> = (from..from + count)
        .map(|n| (key("A", "new_example"), json!({"n": n})))
        .collect();
    Desktop::connect().publish_many(&config.amqp.inbound_exchange, &messages);
}

/// The next `count` frames, each an event of desk A; returns (n, offset) pairs.
async fn events(browser: &mut Browser, count: usize) -> Vec<(u64, u64)> {
    let mut got = Vec::with_capacity(count);
    for _ in 0..count {
        let frame = browser.recv().await;
        assert_eq!(frame["op"], "event", "expected an event, got {frame}");
        let n = frame["data"]["n"]
            .as_u64()
            .unwrap_or_else(|| panic!("no data.n in {frame}"));
        let offset = frame["offset"]
            .as_u64()
            .unwrap_or_else(|| panic!("no offset in {frame}"));
        assert!(frame["epoch"].is_string(), "no epoch in {frame}");
        got.push((n, offset));
    }
    got
}

/// Reads events until the one with `data.n == n` (a subscriber that joined mid-burst).
async fn wait_for_n(browser: &mut Browser, n: u64) {
    while browser.recv().await["data"]["n"] != n {}
}

fn numbers(events: &[(u64, u64)]) -> Vec<u64> {
    events.iter().map(|(n, _)| *n).collect()
}

#[actix_web::test]
async fn two_instances_deliver_every_event_once_with_the_same_offsets_and_web_events_cross() {
    let config = history_config("two");
    let first = ready_bridge(config.clone()).await;
    let second = ready_bridge(config.clone()).await;
    let mut one = Browser::connect(&first).await;
    let mut two = Browser::connect(&second).await;
    one.subscribe(&["A"]).await;
    two.subscribe(&["A"]).await;

    publish_desktop(&config, 0, 100);
    let on_one = events(&mut one, 100).await;
    let on_two = events(&mut two, 100).await;
    assert_eq!(
        numbers(&on_one),
        (0..100).collect::<Vec<_>>(),
        "every event, in order, once"
    );
    assert_eq!(
        on_one, on_two,
        "both instances deliver the same events at the same offsets"
    );

    // A web event through instance 1 reaches instance 2's browser once; its publisher gets
    // the ack and not the event.
    let ack = one.publish("A", "update_example", json!({"n": 1000}), "r1").await;
    assert_eq!(ack["op"], "ack", "{ack}");
    let event = two.recv().await;
    assert_eq!(event["origin"], "web", "{event}");
    assert_eq!(event["id"], ack["id"]);
    assert_eq!(event["data"]["n"], 1000);
    one.assert_quiet().await;
    two.assert_quiet().await;

    drop((one, two));
    first.shut_down().await;
    second.shut_down().await;
    delete_history(&config);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_stay_out_of_history_and_desktop_requests_reach_the_other_instance() {
    let config = history_config("requests");
    let first = ready_bridge(config.clone()).await;
    let second = ready_bridge(config.clone()).await;
    let mut watcher = Browser::connect(&first).await;
    watcher.subscribe(&["A"]).await;
    let mut asker = Browser::connect(&second).await;

    // Presence covers both instances with history on, as in queue mode.
    asker.wait_presence("A", &[watcher.session.clone()]).await;

    // The desk stream is bound to the outbound exchange, yet a request nobody listens for is
    // still returned: requests do not go into the history.
    asker
        .send(json!({"op": "request", "desk": "A", "event": "update_example", "data": {}, "ref": "q1"}))
        .await;
    let error = asker.recv().await;
    assert_eq!(
        (error["code"].as_str(), error["ref"].as_str()),
        (Some("no_responder"), Some("q1")),
        "{error}"
    );
    let outbound = config.amqp.outbound_exchange.clone();
    let _pricing =
        common::desktop::Responder::start(&outbound, &["A_update_example"], |request| request.body.clone());
    asker
        .send(
            json!({"op": "request", "desk": "A", "event": "update_example", "data": {"px": 7}, "ref": "q2"}),
        )
        .await;
    let reply = asker.recv().await;
    assert_eq!(
        (reply["op"].as_str(), reply["data"].clone()),
        (Some("reply"), json!({"px": 7})),
        "{reply}"
    );
    watcher.assert_quiet().await; // no request reached the desk's subscribers as an event

    // A desktop request to a session of the second instance, read from the stream by both.
    let answers = Listener::bind(&outbound, &[]);
    let mut headers = amiquip::FieldTable::new();
    headers.insert(
        "x-to-session".into(),
        amiquip::AmqpValue::LongString(asker.session.clone()),
    );
    let ask = amiquip::AmqpProperties::default()
        .with_headers(headers)
        .with_reply_to(answers.queue.clone())
        .with_correlation_id("c-9".into());
    Desktop::connect().publish_with(&config.amqp.inbound_exchange, "A_new_example", br#"{"q":9}"#, ask);
    let event = asker.recv().await;
    let reply_id = event["reply_id"].as_str().expect("reply_id").to_owned();
    asker
        .send(json!({"op": "reply", "reply_id": reply_id, "data": {"yes": true}, "ref": "a9"}))
        .await;
    assert_eq!(asker.recv().await["op"], "ack");
    let answer = answers.next();
    assert_eq!(answer.properties.correlation_id().as_deref(), Some("c-9"));
    assert_eq!(
        serde_json::from_slice::<Value>(&answer.body).ok(),
        Some(json!({"yes": true}))
    );
    watcher.assert_quiet().await;

    drop((watcher, asker, answers));
    first.shut_down().await;
    second.shut_down().await;
    delete_history(&config);
}

#[actix_web::test]
async fn a_browser_resumes_with_since_and_gets_exactly_what_it_missed_then_live() {
    let config = history_config("resume");
    let bridge = ready_bridge(config.clone()).await;
    let mut browser = Browser::connect(&bridge).await;
    browser.subscribe(&["A"]).await;
    publish_desktop(&config, 0, 10);
    let seen = events(&mut browser, 10).await;
    let epoch = {
        publish_desktop(&config, 10, 1);
        let frame = browser.recv().await;
        frame["epoch"].as_str().expect("epoch").to_owned()
    };
    drop(browser);

    publish_desktop(&config, 11, 25);
    let last = seen[9].1;
    let mut back = Browser::connect(&bridge).await;
    assert_eq!(
        back.resume(last, &epoch).await,
        json!({"op": "subscribed", "desks": ["A"], "recovered": {"A": true}})
    );
    let missed = events(&mut back, 26).await;
    assert_eq!(
        numbers(&missed),
        (10..36).collect::<Vec<_>>(),
        "no gap, no duplicate"
    );
    publish_desktop(&config, 36, 1);
    assert_eq!(numbers(&events(&mut back, 1).await), [36], "then live");
    back.assert_quiet().await;

    drop(back);
    bridge.shut_down().await;
    delete_history(&config);
}

#[actix_web::test]
async fn a_resume_older_than_memory_is_read_from_the_stream_on_another_instance() {
    let mut config = history_config("fromstream");
    // Room for a handful of events only: the rest must come from the stream.
    config.history.memory_bytes = 2_000;
    config.history.replay_batch = 7;
    let first = ready_bridge(config.clone()).await;
    let mut browser = Browser::connect(&first).await;
    browser.subscribe(&["A"]).await;
    publish_desktop(&config, 0, 5);
    let seen = events(&mut browser, 5).await;
    let epoch = {
        publish_desktop(&config, 5, 1);
        browser.recv().await["epoch"].as_str().expect("epoch").to_owned()
    };
    drop(browser);
    // Kept (stopped) to the end: dropping it would delete the exchanges.
    let (first, _) = first.shut_down().await;

    publish_desktop(&config, 6, 60);
    let second = ready_bridge(config.clone()).await;
    let mut back = Browser::connect(&second).await;
    let last = seen[4].1;
    assert_eq!(
        back.resume(last, &epoch).await,
        json!({"op": "subscribed", "desks": ["A"], "recovered": {"A": true}})
    );
    let missed = events(&mut back, 61).await;
    assert_eq!(numbers(&missed), (5..66).collect::<Vec<_>>());
    publish_desktop(&config, 66, 1);
    assert_eq!(numbers(&events(&mut back, 1).await), [66]);
    second
        .wait_metric_at_least("deskbridge_history_replayed_total", 1)
        .await;

    drop(back);
    second.shut_down().await;
    drop(first);
    delete_history(&config);
}

#[actix_web::test]
async fn another_epoch_is_not_recovered_and_delivery_starts_at_the_first_retained_event() {
    let config = history_config("epoch");
    let bridge = ready_bridge(config.clone()).await;
    publish_desktop(&config, 0, 4);
    let mut browser = Browser::connect(&bridge).await;
    let reply = browser.resume(2, "another-life").await;
    assert_eq!(reply["recovered"], json!({"A": false}), "{reply}");
    let first = reply["first_offset"]["A"].as_u64().expect("first_offset");
    let all = events(&mut browser, 4).await;
    assert_eq!(numbers(&all), [0, 1, 2, 3], "everything retained, from the start");
    assert!(
        all[0].1 > first,
        "the first retained message is the stream's genesis marker"
    );

    drop(browser);
    bridge.shut_down().await;
    delete_history(&config);
}

#[actix_web::test]
async fn a_snapshot_delivers_the_last_k_events_then_live() {
    let mut config = history_config("snapshot");
    config.history.memory_bytes = 1_500;
    let bridge = ready_bridge(config.clone()).await;
    publish_desktop(&config, 0, 30);
    // Wait until the bridge has read them all: a live subscriber sees the last one.
    let mut watcher = Browser::connect(&bridge).await;
    watcher.subscribe(&["A"]).await;
    publish_desktop(&config, 30, 1);
    wait_for_n(&mut watcher, 30).await;

    for k in [3, 20] {
        let mut browser = Browser::connect(&bridge).await;
        // The ref is echoed whether `subscribed` goes out at once (k = 3, from memory) or
        // after the stream was read (k = 20).
        let reference = format!("k{k}");
        browser
            .send(json!({"op": "subscribe", "desks": ["A"], "since": {"A": {"last": k}}, "ref": reference}))
            .await;
        assert_eq!(
            browser.recv().await,
            json!({"op": "subscribed", "desks": ["A"], "ref": reference})
        );
        let got = events(&mut browser, k).await;
        let expected: Vec<u64> = (31 - k as u64..31).collect();
        assert_eq!(
            numbers(&got),
            expected,
            "the last {k} (memory holds fewer for k = 20)"
        );
        browser.assert_quiet().await;
    }

    drop(watcher);
    bridge.shut_down().await;
    delete_history(&config);
}

/// A browser whose socket takes nothing: its tiny receive buffer fills and the bridge's
/// outbound queue for it with it.
async fn stalled_browser(bridge: &TestBridge) -> Browser {
    let stream = small_receive_buffer(bridge.addr).await;
    Browser::over(stream, &ws_url(bridge.addr)).await
}

#[actix_web::test]
async fn a_catch_up_reader_that_stops_reading_ends_up_with_every_event_and_is_not_closed() {
    let mut config = history_config("catchup");
    config.ws.outbound_queue_bytes = 16 * 1024;
    config.history.memory_bytes = 64 * 1024;
    let bridge = ready_bridge(config.clone()).await;
    let mut slow = stalled_browser(&bridge).await;
    slow.subscribe(&["A"]).await;
    let padding = "x".repeat(200);
    let messages: Vec<(String, Value)> = (0..3000)
        .map(|n| (key("A", "new_example"), json!({"n": n, "pad": padding})))
        .collect();
    Desktop::connect().publish_many(&config.amqp.inbound_exchange, &messages);
    // The bridge has read them all once a fresh live subscriber gets a later one.
    let mut live = Browser::connect(&bridge).await;
    live.subscribe(&["A"]).await;
    publish_desktop(&config, 3000, 1);
    wait_for_n(&mut live, 3000).await;

    let got = events(&mut slow, 3001).await;
    assert_eq!(
        numbers(&got),
        (0..3001).collect::<Vec<_>>(),
        "every event, in order, once"
    );
    slow.assert_quiet().await;
    bridge
        .wait_metric("deskbridge_sessions_slow_closed_total 0")
        .await;

    drop((slow, live));
    bridge.shut_down().await;
    delete_history(&config);
}

#[actix_web::test]
async fn a_latest_reader_gets_the_newest_value_per_key_and_one_gap() {
    let mut config = history_config("latest");
    config.ws.outbound_queue_bytes = 16 * 1024;
    config.desk_policy = vec![DeskPolicy {
        desk: "A".into(),
        slow: SlowPolicy::Latest,
        conflate_key: Some("sym".into()),
    }];
    let bridge = ready_bridge(config.clone()).await;
    let mut slow = stalled_browser(&bridge).await;
    slow.subscribe(&["A"]).await;
    let padding = "x".repeat(200);
    let symbols = ["EUR", "USD", "JPY", "GBP", "CHF"];
    let messages: Vec<(String, Value)> = (0..3000)
        .map(|n| {
            let sym = symbols[n % symbols.len()];
            (
                key("A", "new_example"),
                json!({"n": n, "sym": sym, "pad": padding}),
            )
        })
        .collect();
    Desktop::connect().publish_many(&config.amqp.inbound_exchange, &messages);
    let mut live = Browser::connect(&bridge).await;
    live.subscribe(&["A"]).await;
    let marker = json!({"n": 3000, "sym": "EUR"});
    Desktop::connect().publish_json(&config.amqp.inbound_exchange, &key("A", "new_example"), &marker);
    wait_for_n(&mut live, 3000).await;

    // Read everything now: events in order, and gaps (one each time it caught up) whose
    // counts add up to what it did not get.
    let (mut seen, mut dropped, mut gaps) = (Vec::new(), 0, 0);
    while !(seen.last() == Some(&3000) && seen.len() as u64 + dropped == 3001) {
        let frame = slow.recv().await;
        match frame["op"].as_str() {
            Some("event") => seen.push(frame["data"]["n"].as_u64().expect("n")),
            Some("gap") => {
                assert_eq!(frame["desk"], "A");
                dropped += frame["dropped"].as_u64().expect("dropped");
                gaps += 1;
            }
            _ => panic!("unexpected frame {frame}"),
        }
    }
    assert!(seen.windows(2).all(|pair| pair[0] < pair[1]), "in order");
    assert!(
        gaps > 0 && dropped > 0,
        "the reader fell behind, so values were dropped"
    );
    let newest: Vec<u64> = seen.iter().rev().take(5).copied().collect();
    assert!(
        newest.contains(&3000) && newest.contains(&2999),
        "the newest values arrive: {newest:?}"
    );
    slow.assert_quiet().await;

    drop((slow, live));
    bridge.shut_down().await;
    delete_history(&config);
}

#[actix_web::test]
async fn a_stream_message_that_is_garbage_is_skipped_counted_and_the_desk_goes_on() {
    let config = history_config("garbage");
    let bridge = ready_bridge(config.clone()).await;
    let mut browser = Browser::connect(&bridge).await;
    browser.subscribe(&["A"]).await;
    let mut desktop = Desktop::connect();
    let routing_key = key("A", "new_example");
    desktop.publish_with(
        &config.amqp.inbound_exchange,
        &routing_key,
        b"not json",
        Default::default(),
    );
    publish_desktop(&config, 1, 1);
    assert_eq!(numbers(&events(&mut browser, 1).await), [1]);
    bridge
        .wait_metric("deskbridge_history_skipped_total{reason=\"bad_body\"} 1")
        .await;

    drop(browser);
    bridge.shut_down().await;
    delete_history(&config);
}

#[actix_web::test]
async fn since_without_history_is_a_clear_error() {
    let config = common::bridge::test_config("nohistory");
    let bridge = TestBridge::start_healthy(config.clone()).await;
    let mut browser = Browser::connect(&bridge).await;
    browser
        .send(json!({"op": "subscribe", "desks": ["A"], "since": {"A": {"last": 5}}, "ref": "h1"}))
        .await;
    let reply = browser.recv().await;
    assert_eq!(reply["code"], "bad_request", "{reply}");
    assert_eq!(reply["ref"], "h1", "{reply}");
    assert!(reply["message"]
        .as_str()
        .unwrap_or_default()
        .contains("history.enabled"));
    browser.send_raw(Message::Close(None)).await;
    bridge.shut_down().await;
    common::amqp::delete_topology(&config);
}

#[actix_web::test]
async fn live_runs_keep_each_desks_order_with_targeted_events_and_web_publishes_between() {
    // With history on, the router queues consecutive live events of one desk (and one
    // publisher) as one buffer: a change of desk, a targeted event or another publisher must
    // end the run. Each desk is its own stream, so the order to keep is each desk's.
    let config = history_config("liveruns");
    let bridge = ready_bridge(config.clone()).await;
    let mut reader = Browser::connect(&bridge).await;
    reader.subscribe(&["A", "B"]).await;
    let mut writer = Browser::connect(&bridge).await;
    writer.subscribe(&["A"]).await;
    let mut to_reader = amiquip::FieldTable::new();
    to_reader.insert(
        "x-to-session".into(),
        amiquip::AmqpValue::LongString(reader.session.clone()),
    );
    let desk_of = |seq: u64| if (seq / 7).is_multiple_of(2) { "A" } else { "B" };
    let targeted = |seq: u64| seq % 50 == 25;
    let messages: Vec<(String, Value, amiquip::AmqpProperties)> = (0..600)
        .map(|seq| {
            let properties = if targeted(seq) {
                amiquip::AmqpProperties::default().with_headers(to_reader.clone())
            } else {
                amiquip::AmqpProperties::default()
            };
            (
                key(desk_of(seq), "new_example"),
                json!({ "seq": seq }),
                properties,
            )
        })
        .collect();
    let exchange = config.amqp.inbound_exchange.clone();
    let desktop = std::thread::spawn(move || Desktop::connect().publish_many_with(&exchange, &messages));
    for w in 0..30 {
        let publish = json!({"op": "publish", "desk": "A", "event": "new_example", "data": {"w": w}, "ref": format!("w{w}")});
        writer.send(publish).await;
    }
    desktop.join().expect("desktop published");

    // The reader: every event once, in order per desk and per publisher.
    let mut last: std::collections::HashMap<(String, &str), u64> = Default::default();
    for _ in 0..630 {
        let event = reader.recv().await;
        assert_eq!(event["op"], "event", "{event}");
        let desk = event["desk"].as_str().unwrap_or_default().to_string();
        let (field, value) = match (event["data"]["seq"].as_u64(), event["data"]["w"].as_u64()) {
            (Some(seq), None) => ("seq", seq),
            (None, Some(w)) => ("w", w),
            _ => panic!("unexpected event {event}"),
        };
        let expected = last.get(&(desk.clone(), field)).map_or(0, |last| last + 1);
        let expected = match field {
            // Desktop events of a desk are every seq of that desk, in order.
            "seq" => (expected..600).find(|seq| desk_of(*seq) == desk).unwrap_or(600),
            _ => expected,
        };
        assert_eq!(value, expected, "in order per desk and publisher: {event}");
        last.insert((desk, field), value);
    }
    reader.assert_quiet().await;

    // The writer: one ack per publish, every untargeted desktop event of A, never its own.
    let desktop_a = (0..600)
        .filter(|seq| desk_of(*seq) == "A" && !targeted(*seq))
        .count();
    let (mut acks, mut events) = (0, 0);
    while acks < 30 || events < desktop_a {
        let frame = writer.recv().await;
        match frame["op"].as_str() {
            Some("ack") => acks += 1,
            Some("event") if frame["data"]["seq"].is_u64() => events += 1,
            _ => panic!("the writer gets acks and desktop events only: {frame}"),
        }
    }
    writer.assert_quiet().await;
    drop((reader, writer));
    bridge.shut_down().await;
    delete_history(&config);
}

/// Desktop events `{"n": 0..}` on desk A at a steady rate, from a thread of their own.
struct Traffic {
    published: std::sync::Arc<std::sync::atomic::AtomicU64>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Traffic {
    fn start(config: &Config, per_second: u64) -> Traffic {
        use std::sync::atomic::Ordering;
        let published = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let exchange = config.amqp.inbound_exchange.clone();
        let thread = std::thread::spawn({
            let (published, stop) = (published.clone(), stop.clone());
            move || {
                let mut connection = common::amqp::broker();
                let channel = connection.open_channel(None).expect("channel");
                let began = std::time::Instant::now();
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    // Paced by the clock, one event at a time (no waiting for confirms), so
                    // events arrive all the time, as from a busy desktop app.
                    let due = began + std::time::Duration::from_micros(n * 1_000_000 / per_second);
                    if let Some(wait) = due.checked_duration_since(std::time::Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    let body = serde_json::to_vec(&json!({"n": n})).expect("json");
                    channel
                        .basic_publish(
                            exchange.as_str(),
                            amiquip::Publish::new(&body, key("A", "new_example")),
                        )
                        .expect("publish");
                    n += 1;
                    published.store(n, Ordering::Relaxed);
                }
                let _ = connection.close();
            }
        });
        Traffic {
            published,
            stop,
            thread: Some(thread),
        }
    }

    /// How many events were sent so far.
    fn published(&self) -> u64 {
        self.published.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The value of counter `name` on the bridge's `/metrics`.
async fn counter(bridge: &TestBridge, name: &str) -> u64 {
    let (_, body) = common::http::http_get(bridge.addr, "/metrics").await;
    body.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse::<f64>().ok())
        .unwrap_or(0.0) as u64
}

#[actix_web::test]
async fn a_resume_read_from_the_stream_under_steady_traffic_reaches_live_and_stays_there() {
    let mut config = history_config("tolive");
    // A tail of about 4 000 events (over a second of this traffic); the resume below starts
    // 15 000 events back. At this rate the unfixed bridge chased the tail for ever: a live
    // batch came in during nearly every replay.
    config.history.memory_bytes = 1024 * 1024;
    config.history.replay_batch = 200;
    let _history = common::amqp::HistoryCleanup(config.clone());
    let bridge = ready_bridge(config.clone()).await;
    let mut first = Browser::connect(&bridge).await;
    first.subscribe(&["A"]).await;
    let traffic = Traffic::start(&config, 3_000);
    let frame = first.recv().await;
    let (mut next, after) = (
        frame["data"]["n"].as_u64().expect("n") + 1,
        frame["offset"].as_u64().expect("offset"),
    );
    let epoch = frame["epoch"].as_str().expect("epoch").to_owned();
    drop(first);
    common::poll(common::DEADLINE, std::time::Duration::from_millis(20), || {
        let sent = traffic.published();
        async move {
            if sent >= 15_000 {
                Ok(())
            } else {
                Err(format!("only {sent} sent"))
            }
        }
    })
    .await;

    // The attach probes resumed too.
    let caught_up = counter(&bridge, "deskbridge_history_caught_up_total").await;
    let mut back = Browser::connect(&bridge).await;
    assert_eq!(
        back.resume(after, &epoch).await,
        json!({"op": "subscribed", "desks": ["A"], "recovered": {"A": true}})
    );
    // Every event once and in order, until the session is live: a bound set by the replay's
    // speed, not by how long the traffic lasts (before the fix it chased the tail for ever).
    let live_by = std::time::Instant::now() + std::time::Duration::from_secs(45);
    loop {
        for (n, _) in events(&mut back, 50).await {
            assert_eq!(n, next, "every event once, in order");
            next += 1;
        }
        if counter(&bridge, "deskbridge_history_caught_up_total").await > caught_up {
            break;
        }
        assert!(
            std::time::Instant::now() < live_by,
            "the resumed session never went live (at n = {next}, {} sent)",
            traffic.published()
        );
    }
    // Live, and it stays so: another second of traffic arrives whole and in order with no
    // more reads from the stream.
    let replayed = counter(&bridge, "deskbridge_history_replayed_total").await;
    let fresh = traffic.published() + 3_000;
    while next <= fresh {
        for (n, _) in events(&mut back, 1).await {
            assert_eq!(n, next, "every event once, in order");
            next += 1;
        }
    }
    assert_eq!(
        counter(&bridge, "deskbridge_history_replayed_total").await,
        replayed,
        "a live session reads nothing more from the stream"
    );
    assert_eq!(
        counter(&bridge, "deskbridge_history_caught_up_total").await,
        caught_up + 1,
        "it went live once and never fell behind again"
    );

    drop((back, traffic));
    bridge.shut_down().await;
    delete_history(&config);
}
