//! History with many instances, against the real broker with real WebSocket clients: three
//! instances agreeing on one log, an instance SIGKILLed under load whose browsers resume on
//! another, and a resume from before what retention kept.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use amiquip::ConsumerMessage;
use deskbridge::config::Config;
use deskbridge::history::{consume_from, Marker, Start};
use serde_json::{json, Value};

use common::amqp::{delete_quietly, HistoryCleanup};
use common::bridge::{history_config, wait_attached_at};
use common::history::{
    events, events_through, events_until_closed, publish_desktop, resume_elsewhere_with_every_event_once,
    Publisher,
};
use common::process::BridgeProcess;
use common::{Browser, Listener, TestBridge, DEADLINE};

/// Deletes a queue when dropped (a SIGKILLed bridge leaves its reply queue behind for 120 s).
struct QueueCleanup(Option<String>);

impl Drop for QueueCleanup {
    fn drop(&mut self) {
        if let Some(queue) = &self.0 {
            delete_quietly(&[queue], &[]);
        }
    }
}

/// An in-process bridge on `config`, attached to its desk streams.
async fn ready_bridge(config: Config) -> TestBridge {
    let bridge = TestBridge::start_healthy(config).await;
    wait_attached_at(bridge.addr, &["A", "B"]).await;
    bridge
}

/// An event as a browser saw it, desktop or web, labelled by what the test put in it.
#[derive(Debug, Clone, PartialEq)]
struct Labelled {
    /// `d<n>` for desktop events, the web event's `data.w` for web events.
    label: String,
    /// A web event's id (its publisher's `ack.id`). Not kept for desktop events: the test's
    /// desktop app sets no `message_id`, so each instance makes its own.
    id: Option<String>,
    offset: u64,
    epoch: String,
}

/// Reads frames until `events` events and `acks` acks of desk A came; fails on anything else.
async fn events_and_acks(browser: &mut Browser, events: usize, acks: usize) -> (Vec<Labelled>, Vec<Value>) {
    let (mut got, mut acked) = (Vec::new(), Vec::new());
    while got.len() < events || acked.len() < acks {
        let frame = browser.recv().await;
        match frame["op"].as_str() {
            Some("ack") => acked.push(frame.clone()),
            Some("event") => {
                let id = frame["id"].as_str().expect("event id").to_owned();
                let (label, id) = match frame["origin"].as_str() {
                    Some("desktop") => (format!("d{}", frame["data"]["n"]), None),
                    Some("web") => (
                        frame["data"]["w"].as_str().unwrap_or_default().to_owned(),
                        Some(id),
                    ),
                    _ => panic!("an event without a known origin: {frame}"),
                };
                got.push(Labelled {
                    label,
                    id,
                    offset: frame["offset"].as_u64().expect("event offset"),
                    epoch: frame["epoch"].as_str().expect("event epoch").to_owned(),
                });
            }
            _ => panic!("expected events and acks only, got {frame}"),
        }
        assert!(
            got.len() <= events && acked.len() <= acks,
            "more than {events} events or {acks} acks: the last frame was {frame}"
        );
    }
    (got, acked)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_deliver_desktop_and_web_events_once_in_one_order_with_the_same_offsets() {
    const DESKTOP: u64 = 150;
    const WEB: usize = 20;
    let config = history_config("three");
    let _history = HistoryCleanup(config.clone());
    let mut bridges = Vec::new();
    for _ in 0..3 {
        bridges.push(ready_bridge(config.clone()).await);
    }
    let mut browsers = Vec::new();
    for bridge in &bridges {
        let mut browser = Browser::connect(bridge).await;
        browser.subscribe(&["A"]).await;
        browsers.push(browser);
    }

    // The desktop app publishes on its own thread while browsers 0 and 1 publish web events,
    // so that the two kinds interleave in the log.
    let desktop_config = config.clone();
    let desktop = std::thread::spawn(move || {
        for from in (0..DESKTOP).step_by(10) {
            publish_desktop(&desktop_config, from, 10, 0);
        }
    });
    let label = |publisher: usize, i: usize| format!("w{publisher}-{i}");
    for i in 0..WEB {
        for (publisher, browser) in browsers.iter_mut().enumerate().take(2) {
            browser
                .send(json!({"op": "publish", "desk": "A", "event": "update_example",
                             "data": {"w": label(publisher, i)}, "ref": label(publisher, i)}))
                .await;
        }
    }
    desktop.join().expect("the desktop app published everything");

    let desktop_events = DESKTOP as usize;
    let mut seen = Vec::new();
    let mut acks = Vec::new();
    for (index, browser) in browsers.iter_mut().enumerate() {
        let (events, acked) = match index {
            // A publisher gets the other publisher's web events, never its own.
            0 | 1 => events_and_acks(browser, desktop_events + WEB, WEB).await,
            _ => events_and_acks(browser, desktop_events + 2 * WEB, 0).await,
        };
        seen.push(events);
        acks.push(acked);
    }
    for browser in &mut browsers {
        browser.assert_quiet().await;
    }

    // Browser 2 published nothing: it has the whole log, each event once, in offset order.
    let everything = &seen[2];
    let labels: Vec<&str> = everything.iter().map(|event| event.label.as_str()).collect();
    let unique: HashSet<&str> = labels.iter().copied().collect();
    assert_eq!(unique.len(), labels.len(), "no event twice: {labels:?}");
    let mut expected: HashSet<String> = (0..DESKTOP).map(|n| format!("d{n}")).collect();
    expected.extend((0..2).flat_map(|publisher| (0..WEB).map(move |i| label(publisher, i))));
    assert_eq!(
        unique,
        expected.iter().map(String::as_str).collect::<HashSet<_>>(),
        "every desktop and web event reaches the browser of the third instance"
    );
    let desktop_order: Vec<&str> = labels.iter().copied().filter(|l| l.starts_with('d')).collect();
    let published_order: Vec<String> = (0..DESKTOP).map(|n| format!("d{n}")).collect();
    assert_eq!(
        desktop_order, published_order,
        "desktop events in the order the desktop app published them"
    );
    assert!(
        everything.windows(2).all(|pair| pair[0].offset < pair[1].offset),
        "offsets grow along the log"
    );
    assert!(
        everything.iter().all(|event| event.epoch == everything[0].epoch),
        "one epoch"
    );

    // Each publisher sees the same log, at the same offsets, minus its own web events; each of
    // its publishes was acked with the id the others see.
    let ids: HashMap<&str, &str> = everything
        .iter()
        .filter_map(|event| Some((event.label.as_str(), event.id.as_deref()?)))
        .collect();
    for publisher in 0..2 {
        let own = format!("w{publisher}-");
        let expected: Vec<Labelled> = everything
            .iter()
            .filter(|event| !event.label.starts_with(&own))
            .cloned()
            .collect();
        assert!(
            seen[publisher].iter().all(|event| !event.label.starts_with(&own)),
            "browser {publisher} got one of its own web events back"
        );
        assert_eq!(
            seen[publisher], expected,
            "browser {publisher} (instance {publisher}) sees the log of instance 2, in the same order, \
             at the same offsets, without its own events"
        );
        let acked: BTreeMap<String, Value> = acks[publisher]
            .iter()
            .map(|ack| (ack["ref"].as_str().expect("ack ref").to_owned(), ack.clone()))
            .collect();
        assert_eq!(acked.len(), WEB, "one ack per publish of browser {publisher}");
        for i in 0..WEB {
            let reference = label(publisher, i);
            let ack = acked
                .get(&reference)
                .unwrap_or_else(|| panic!("no ack for publish {reference}: {acked:?}"));
            assert_eq!(ack["routed"], true, "{ack}");
            assert_eq!(
                ack["id"].as_str(),
                ids.get(reference.as_str()).copied(),
                "the ack's id is the id the other browsers see: {ack}"
            );
        }
    }

    drop(browsers);
    for bridge in bridges {
        bridge.shut_down().await;
    }
}

/// The instance `session` is connected to, from its `session.subscribed` presence message.
fn instance_of(presence: &Listener, session: &str) -> String {
    loop {
        let delivery = presence.next();
        let body: Value = serde_json::from_slice(&delivery.body).expect("presence bodies are JSON");
        if body["session"] == session {
            return body["instance"]
                .as_str()
                .expect("a presence message names its instance")
                .to_owned();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browsers_of_a_killed_instance_resume_on_another_with_every_event_once() {
    const BROWSERS: usize = 3;
    let mut config = history_config("kill");
    // Room for about a hundred events: the resumes below must read the stream first, then the
    // memory, then go live.
    config.history.memory_bytes = 16 * 1024;
    let _history = HistoryCleanup(config.clone());
    let mut reply_queue = QueueCleanup(None);
    let survivor = ready_bridge(config.clone()).await;
    let presence = Listener::bind_topic(&config.amqp.presence_exchange, &["session.subscribed"]);
    let mut doomed =
        BridgeProcess::launch(env!("CARGO_BIN_EXE_deskbridge"), &config).expect("start deskbridge");
    doomed.wait_healthy(DEADLINE).await;
    wait_attached_at(doomed.addr, &["A", "B"]).await;
    let mut browsers = Vec::new();
    for _ in 0..BROWSERS {
        let mut browser = Browser::connect_to(doomed.addr).await;
        browser.subscribe(&["A"]).await;
        browsers.push(browser);
    }
    let instance = instance_of(&presence, &browsers[0].session);
    reply_queue.0 = Some(deskbridge::amqp::reply_queue_name(&instance));
    // Live on the survivor throughout: what the other instance's offsets are compared with.
    let mut watcher = Browser::connect(&survivor).await;
    watcher.subscribe(&["A"]).await;

    let publisher = Publisher::start(&config);
    let mut before = Vec::new();
    for browser in &mut browsers {
        before.push(events(browser, 200).await);
    }
    let at_kill = publisher.published();
    tokio::task::block_in_place(|| doomed.kill());
    for (browser, seen) in browsers.iter_mut().zip(&mut before) {
        seen.extend(events_until_closed(browser).await.0);
    }
    // Well past what the survivor keeps in memory, so the resumes start in the stream.
    common::wait_until("500 more events published after the kill", || {
        publisher.published() >= at_kill + 500
    })
    .await;

    resume_elsewhere_with_every_event_once(survivor.addr, &before, publisher, &mut watcher, "killed").await;
    survivor
        .wait_metric_at_least("deskbridge_history_replayed_total", 1)
        .await;

    drop((browsers, watcher, presence, doomed));
    survivor.shut_down().await;
}

/// The head of `stream` as a fresh reader from `first` sees it: each message's offset and the
/// `n` of its body (`None` for the bridge's markers), up to and including the first event.
fn stream_head(stream: &str) -> Vec<(u64, Option<u64>)> {
    let mut connection = common::broker();
    let channel = connection.open_channel(None).expect("channel");
    // A stream consumer needs a prefetch.
    channel.qos(0, 100, false).expect("qos");
    let consumer = channel
        .basic_consume(stream, consume_from(Start::First))
        .expect("consume the stream");
    let mut head = Vec::new();
    loop {
        let delivery = match consumer.receiver().recv_timeout(DEADLINE) {
            Ok(ConsumerMessage::Delivery(delivery)) => delivery,
            other => panic!("reading the head of {stream}: {other:?}"),
        };
        let headers = delivery.properties.headers().as_ref();
        let offset = deskbridge::history::offset(headers).expect("stream deliveries have an offset");
        if Marker::from_headers(headers).is_some() {
            head.push((offset, None));
            continue;
        }
        let body: Value = serde_json::from_slice(&delivery.body).expect("the test's events are JSON");
        head.push((offset, Some(body["n"].as_u64().expect("data.n"))));
        break;
    }
    deskbridge::history::cancel(&consumer).expect("cancel the head reader");
    let _ = connection.close();
    head
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_from_before_retention_is_not_recovered_and_starts_at_the_first_retained_event() {
    // 2 MiB of retention in segments of 1 MiB (the smallest the bridge declares): retention
    // drops the first segment once a third one is started.
    const MAX_BYTES: u64 = 2 * 1024 * 1024;
    const PAD: usize = 1024;
    const BATCH: u64 = 128;
    let mut config = history_config("retention");
    config.history.max_bytes = MAX_BYTES;
    // A few dozen events: the resume has to read the stream.
    config.history.memory_bytes = 32 * 1024;
    let _history = HistoryCleanup(config.clone());
    let stream = deskbridge::history::stream_name(&config.history, "A");
    let bridge = ready_bridge(config.clone()).await;
    let mut browser = Browser::connect(&bridge).await;
    browser.subscribe(&["A"]).await;
    publish_desktop(&config, 0, 5, PAD);
    let seen = events(&mut browser, 5).await;
    let last = seen[4].clone();
    drop(browser);

    // Publish until RabbitMQ truncated past what the browser saw (it does so after a segment
    // rolls over, asynchronously), watching the first retained offset move.
    let initial_head = stream_head(&stream);
    let mut next = 5;
    let started = Instant::now();
    let head = loop {
        let head = tokio::task::block_in_place(|| stream_head(&stream));
        if head[0].0 > last.offset {
            break head;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "RabbitMQ still retains offset {} after {next} events of ~{PAD} B with max_bytes {MAX_BYTES}: \
             head {head:?}",
            last.offset
        );
        // About 4 × the retention, then only wait for the (asynchronous) truncation.
        if next * (PAD as u64) < 4 * MAX_BYTES {
            tokio::task::block_in_place(|| publish_desktop(&config, next, BATCH, PAD));
            next += BATCH;
        } else {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    // The bridge has read everything once a live subscriber gets the last event.
    let mut watcher = Browser::connect(&bridge).await;
    watcher.subscribe(&["A"]).await;
    publish_desktop(&config, next, 1, 0);
    let final_n = next;
    events_through(&mut watcher, final_n).await;
    let head = {
        let again = tokio::task::block_in_place(|| stream_head(&stream));
        assert_eq!(head[0], again[0], "retention settled before the resume");
        again
    };
    let (first_retained, first_event) = (head[0].0, *head.last().expect("an event is retained"));
    let first_event_n = first_event.1.expect("the head ends with an event");
    println!(
        "retention: {next} events of ~{PAD} B into {MAX_BYTES} B; head was {initial_head:?}, \
         now {head:?}; the browser had offset {}",
        last.offset
    );

    let mut back = Browser::connect(&bridge).await;
    let reply = back.resume(last.offset, &last.epoch).await;
    assert_eq!(
        reply,
        json!({"op": "subscribed", "desks": ["A"], "recovered": {"A": false},
               "first_offset": {"A": first_retained}}),
        "offset {} was truncated: not recovered, delivery starts at the first retained offset {first_retained}",
        last.offset
    );
    let resumed = events_through(&mut back, final_n).await;
    assert_eq!(
        (resumed[0].offset, resumed[0].n),
        (first_event.0, first_event_n),
        "the first event delivered is the first retained one (M = {first_retained}; \
         markers before it, never delivered: {head:?})"
    );
    assert!(
        first_event_n > last.n + 1,
        "retention really dropped events after n = {}",
        last.n
    );
    let numbers: Vec<u64> = resumed.iter().map(|event| event.n).collect();
    assert_eq!(
        numbers,
        (first_event_n..=final_n).collect::<Vec<_>>(),
        "every retained event from M on, in order, once"
    );
    assert!(
        resumed.windows(2).all(|pair| pair[0].offset < pair[1].offset),
        "offsets grow"
    );
    assert!(
        resumed.iter().all(|event| event.epoch == last.epoch),
        "the same epoch as before the truncation (refresh markers kept it)"
    );
    // Then live.
    publish_desktop(&config, final_n + 1, 1, 0);
    assert_eq!(
        events(&mut back, 1).await[0].n,
        final_n + 1,
        "live delivery follows the replay"
    );
    back.assert_quiet().await;
    bridge
        .wait_metric_at_least("deskbridge_history_replayed_total", 1)
        .await;

    drop((back, watcher));
    bridge.shut_down().await;
}
