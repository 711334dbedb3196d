//! The browser client (`/deskbridge.js`) and the console built on it, in real Chromium over
//! WebDriver: promises that settle on `ack`, on `error` and when the socket goes, reconnecting
//! and resubscribing after a restart, duplicates dropped, a token provider and its refresh, and
//! the console's latest-value table (with screenshots in `target/screenshots/` for review).

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use amiquip::AmqpProperties;
use common::http::http_get_with_head;
use common::webdriver::free_port;
use common::*;
use serde_json::{json, Value};

/// Fast reconnects, so a test does not wait out a production backoff.
const FAST: &str = r#"{ backoff: { initialMs: 100, maxMs: 400, factor: 2 } }"#;

/// Loads the client into a page of the bridge's origin as `window.t`: the `DeskBridge` (`t.b`),
/// what it reported, and `t.outcome(promise)`, a promise's outcome as JSON. Subscribes to
/// `desks` before connecting (as an application does) and returns once they are confirmed.
async fn open_client(chrome: &Chrome, addr: SocketAddr, options: &str, desks: &[&str]) -> Value {
    // Any page of the bridge's origin will do: the module is imported from it, and the
    // WebSocket's Origin then matches its Host.
    chrome.open(&format!("http://{addr}/health/live")).await;
    let desks = json!(desks);
    chrome
        .run(&format!(
            r#"return (async () => {{
  const {{ DeskBridge }} = await import("/deskbridge.js");
  const b = new DeskBridge({options});
  const t = window.t = {{ b, events: [], duplicates: [], states: [], errors: [], out: [] }};
  b.on("event", (e) => t.events.push(e));
  b.on("duplicate", (e) => t.duplicates.push(e.id));
  b.on("state", (s) => t.states.push(s.state));
  b.on("error", (e) => t.errors.push(e));
  b.on("frame", (f) => f.direction === "out" && t.out.push(f.frame));
  t.outcome = (p) => p.then((ok) => ({{ ok }}), (e) => ({{ error: {{ code: e.code, sent: e.sent, ref: e.ref ?? null, message: e.message }} }}));
  const subscribed = b.subscribe({desks});
  b.connect();
  await subscribed;
  return b.session;
}})();"#
        ))
        .await
}

/// Starts publishes of `count` events to desk A that the bridge will not answer soon (no
/// broker: they wait in its outage buffer); their outcomes land in `t.settled`.
async fn publish_into_the_void(chrome: &Chrome, count: usize) {
    chrome
        .run(&format!(
            r#"const pending = Array.from({{ length: {count} }}, (_, i) => t.outcome(t.b.publish("A", "new_example", {{ i }})));
Promise.all(pending).then((all) => {{ t.settled = all; }});
return true;"#
        ))
        .await;
}

/// Waits until the bridge at `addr` has taken `count` browser publishes.
async fn wait_published(addr: SocketAddr, count: u64) {
    let series = "deskbridge_messages_in_total{direction=\"web_to_desktop\"}";
    poll(DEADLINE, Duration::from_millis(20), || async move {
        let (_, body) = http_get(addr, "/metrics").await;
        let taken = body
            .lines()
            .find_map(|line| line.strip_prefix(series)?.trim().parse::<f64>().ok())
            .unwrap_or(0.0);
        if taken >= count as f64 {
            Ok(())
        } else {
            Err(format!("the bridge took {taken} publishes, not {count}"))
        }
    })
    .await
}

fn without_broker(test: &str) -> deskbridge::Config {
    let mut config = test_config(test);
    // Port 1 on loopback: nothing listens, so publishes wait in the outage buffer.
    config.amqp.urls = vec![url("amqp://guest:guest@127.0.0.1:1/%2f")];
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_module_and_its_types_are_served() {
    let bridge = TestBridge::start(without_broker("client-files"));
    let (status, head, body) = http_get_with_head(bridge.addr, "/deskbridge.js").await;
    assert_eq!(status, 200);
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/javascript; charset=utf-8"),
        "{head}"
    );
    assert!(body.contains("export class DeskBridge"), "{body}");
    let (status, head, body) = http_get_with_head(bridge.addr, "/deskbridge.d.ts").await;
    assert_eq!(status, 200);
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/typescript"),
        "{head}"
    );
    assert!(
        body.contains("export class DeskBridge extends EventTarget"),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_resolves_on_ack_and_rejects_with_the_bridge_error() {
    let bridge = TestBridge::start_healthy(test_config("client-publish")).await;
    let desktop = Listener::bind(&bridge.config.amqp.outbound_exchange, &["A_new_example"]);
    let chrome = Chrome::start().await;
    open_client(&chrome, bridge.addr, FAST, &["A"]).await;

    let acked = chrome
        .run(r#"return t.outcome(t.b.publish("A", "new_example", { bond: "XS1", px: 101.5 }, { ttlMs: 60000 }));"#)
        .await;
    let id = acked["ok"]["id"]
        .as_str()
        .unwrap_or_else(|| panic!("acked: {acked}"));
    assert_eq!(acked["ok"]["routed"], true, "{acked}");
    let delivery = desktop.next();
    assert_eq!(delivery.properties.message_id().as_deref(), Some(id));
    let ttl: u64 = delivery
        .properties
        .expiration()
        .as_deref()
        .and_then(|ms| ms.parse().ok())
        .expect("ttlMs became the AMQP expiration");
    assert!((50_000..=60_000).contains(&ttl), "what is left of ttlMs: {ttl}");

    let refused = chrome
        .run(r#"return t.outcome(t.b.publish("nope", "new_example", {}));"#)
        .await;
    assert_eq!(refused["error"]["code"], "unknown_desk", "{refused}");
    assert_eq!(refused["error"]["sent"], true, "{refused}");
    assert!(
        refused["error"]["ref"].is_string(),
        "the error carries the ref: {refused}"
    );

    // request() resolves with the desktop's answer, and rejects with no_responder when
    // nobody listens for its key.
    let _pricing = common::desktop::Responder::start(
        &bridge.config.amqp.outbound_exchange,
        &["A_new_example"],
        |request| {
            let asked: Value = serde_json::from_slice(&request.body).unwrap_or(Value::Null);
            serde_json::to_vec(&json!({"px": 101.5, "asked": asked})).unwrap_or_default()
        },
    );
    let answered = chrome
        .run(r#"return t.outcome(t.b.request("A", "new_example", { bond: "XS1" }, { timeoutMs: 5000 }));"#)
        .await;
    assert_eq!(
        answered["ok"]["data"],
        json!({"px": 101.5, "asked": {"bond": "XS1"}}),
        "{answered}"
    );
    let request = chrome
        .run(r#"return t.outcome(t.b.request("A", "update_example", { bond: "XS1" }, { timeoutMs: 1000 }));"#)
        .await;
    assert_eq!(request["error"]["code"], "no_responder", "{request}");
    // presence() resolves with the desk's sessions; with `presence: true` the client emits
    // `presence` events as another browser joins and leaves.
    let present = chrome.run(r#"return t.outcome(t.b.presence("A"));"#).await;
    let me = chrome.run("return t.b.session;").await;
    assert_eq!(present["ok"], json!([{"session": me}]), "{present}");
    chrome
        .run(r#"t.presence = []; t.b.on("presence", (p) => t.presence.push(p)); return t.outcome(t.b.subscribe("A", { presence: true }));"#)
        .await;
    let mut other = Browser::connect(&bridge).await;
    other.subscribe(&["A"]).await;
    other.send(json!({"op": "unsubscribe", "desks": ["A"]})).await;
    assert_eq!(other.recv().await["op"], "unsubscribed");
    let moves = chrome
        .wait_for("a join and a leave", "t.presence.length >= 2 && t.presence")
        .await;
    assert_eq!(
        moves,
        json!([
            {"op": "join", "desk": "A", "session": other.session},
            {"op": "leave", "desk": "A", "session": other.session}
        ])
    );
    let errors = chrome.run("return t.errors;").await;
    assert_eq!(errors, json!([]), "nothing went unanswered: {errors}");
    chrome.quit().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_publishes_reject_as_disconnected_when_the_bridge_dies() {
    let config = without_broker("client-dies");
    let bridge = BridgeProcess::launch(env!("CARGO_BIN_EXE_deskbridge"), &config)
        .expect("the deskbridge binary starts");
    let chrome = Chrome::start().await;
    open_client(&chrome, bridge.addr, FAST, &["A"]).await;
    publish_into_the_void(&chrome, 3).await;
    wait_published(bridge.addr, 3).await;

    // SIGKILL: the socket closes with nothing answered (a graceful stop answers everything first).
    drop(bridge);
    let settled = chrome
        .wait_for("the pending publishes to settle", "t.settled")
        .await;
    let settled = settled.as_array().expect("outcomes");
    assert_eq!(settled.len(), 3);
    for outcome in settled {
        assert_eq!(outcome["error"]["code"], "disconnected", "{outcome}");
        // Sent, answer unknown: the application must not assume it was not published.
        assert_eq!(outcome["error"]["sent"], true, "{outcome}");
    }
    chrome
        .wait_for("the client to retry", "t.states.includes('reconnecting')")
        .await;
    let offline = chrome
        .run(r#"return t.outcome(t.b.publish("A", "new_example", {}));"#)
        .await;
    assert_eq!(offline["error"]["code"], "disconnected", "{offline}");
    assert_eq!(offline["error"]["sent"], false, "never left the page: {offline}");
    chrome.quit().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_pending_publish_settles_when_the_bridge_stops() {
    let bridge = TestBridge::start(without_broker("client-stops"));
    bridge.wait_health(503).await;
    let chrome = Chrome::start().await;
    open_client(&chrome, bridge.addr, FAST, &["A"]).await;
    publish_into_the_void(&chrome, 3).await;
    wait_published(bridge.addr, 3).await;

    let (_stopped, _) = bridge.shut_down().await;
    let settled = chrome
        .wait_for("the pending publishes to settle", "t.settled")
        .await;
    for outcome in settled.as_array().expect("outcomes") {
        // A graceful stop answers before it closes: the bridge's own verdict reaches the page.
        assert_eq!(outcome["error"]["code"], "broker_unavailable", "{outcome}");
        let message = outcome["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains("not sent"), "{outcome}");
    }
    chrome
        .wait_for("the client to retry", "t.states.includes('reconnecting')")
        .await;
    chrome.quit().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_reconnects_after_a_restart_and_resubscribes() {
    let mut config = test_config("client-restart");
    // A fixed free port, so that the restarted bridge is where the page left the first one.
    config.bind = format!("127.0.0.1:{}", free_port());
    let first = TestBridge::start_healthy(config.clone()).await;
    let addr = first.addr;
    let exchange = config.amqp.inbound_exchange.clone();
    let mut desktop = Desktop::connect();
    let chrome = Chrome::start().await;
    let first_session = open_client(&chrome, addr, FAST, &["A"]).await;
    desktop.publish_json(&exchange, "A_new_example", &json!({"seq": "before"}));
    chrome
        .wait_for(
            "the event before the restart",
            "t.events.some((e) => e.data.seq === 'before')",
        )
        .await;

    // Stopped, not dropped: its topology (the same names) stays for the second bridge.
    let (stopped, _) = first.shut_down().await;
    chrome
        .wait_for("the client to notice", "t.states.includes('reconnecting')")
        .await;
    let second = TestBridge::start_healthy(config.clone()).await;
    assert_eq!(second.addr, addr);
    let session = chrome
        .wait_for(
            "a new session with desk A subscribed again",
            &format!(
                "t.b.state === 'open' && t.b.session !== {first_session} \
                 && t.b.subscriptions.length === 1 && t.b.subscriptions[0].confirmed && t.b.session"
            ),
        )
        .await;
    assert_ne!(session, first_session);
    desktop.publish_json(&exchange, "A_new_example", &json!({"seq": "after"}));
    chrome
        .wait_for(
            "the event after the restart",
            "t.events.some((e) => e.data.seq === 'after')",
        )
        .await;
    let resubscribes = chrome
        .run("return t.out.filter((f) => f.op === 'subscribe').map((f) => f.desks);")
        .await;
    assert_eq!(resubscribes, json!([["A"], ["A"]]), "subscribed once per session");
    chrome.quit().await;
    drop(second);
    drop(stopped);
}

/// A history-mode bridge on a fixed free port (a restarted one is where the page left it) and
/// the client subscribed to desk A, with its `gap` events in `t.gaps`.
async fn history_client(
    test: &str,
) -> (
    common::amqp::HistoryCleanup,
    deskbridge::Config,
    TestBridge,
    Chrome,
) {
    let mut config = common::bridge::history_config(test);
    config.bind = format!("127.0.0.1:{}", free_port());
    let cleanup = common::amqp::HistoryCleanup(config.clone());
    let bridge = TestBridge::start_healthy(config.clone()).await;
    let chrome = Chrome::start().await;
    open_client(&chrome, bridge.addr, FAST, &["A"]).await;
    chrome
        .run("t.gaps = []; t.b.on('gap', (g) => t.gaps.push(g)); return true;")
        .await;
    (cleanup, config, bridge, chrome)
}

/// A desktop app publishes `{"n": n}` on desk A for each of `numbers`.
fn publish_numbers(config: &deskbridge::Config, numbers: std::ops::Range<u64>) {
    let messages: Vec<(String, Value)> = numbers
        .map(|n| (key("A", "new_example"), json!({ "n": n })))
        .collect();
    Desktop::connect().publish_many(&config.amqp.inbound_exchange, &messages);
}

/// Stops `bridge` (its names stay for the next one), runs `meanwhile`, then starts a bridge
/// on the same port and waits until the client has desk A confirmed again.
async fn restart_under_client(
    bridge: TestBridge,
    chrome: &Chrome,
    meanwhile: impl FnOnce(),
) -> (TestBridge, TestBridge) {
    let config = bridge.config.clone();
    let (stopped, _) = bridge.shut_down().await;
    chrome
        .wait_for("the client to notice", "t.states.includes('reconnecting')")
        .await;
    meanwhile();
    let second = TestBridge::start_healthy(config).await;
    assert_eq!(second.addr, stopped.addr);
    chrome
        .wait_for(
            "desk A subscribed again",
            "t.b.state === 'open' && t.b.subscriptions.length === 1 && t.b.subscriptions[0].confirmed",
        )
        .await;
    (stopped, second)
}

/// The offset and epoch of the last event the client got.
async fn last_position(chrome: &Chrome) -> Value {
    chrome
        .run("const e = t.events[t.events.length - 1]; return { offset: e.offset, epoch: e.epoch };")
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_history_the_client_resumes_after_a_restart_without_gaps_or_duplicates() {
    let (_cleanup, config, first, chrome) = history_client("client-resume").await;
    publish_numbers(&config, 0..50);
    chrome
        .wait_for("the first 50 events", "t.events.length >= 50")
        .await;
    let before = last_position(&chrome).await;

    // While no bridge runs, the desk's stream keeps what desktop apps publish.
    let (stopped, second) = restart_under_client(first, &chrome, || publish_numbers(&config, 50..150)).await;
    publish_numbers(&config, 150..200);
    chrome.wait_for("all 200 events", "t.events.length >= 200").await;

    let seen = chrome
        .run(
            "return { numbers: t.events.map((e) => e.data.n), duplicates: t.duplicates.length, \
             gaps: t.gaps, subscribes: t.out.filter((f) => f.op === 'subscribe') };",
        )
        .await;
    let expected: Vec<u64> = (0..200).collect();
    assert_eq!(seen["numbers"], json!(expected), "every event once, in order");
    assert_eq!(seen["duplicates"], 0, "the bridge resent nothing: {seen}");
    assert_eq!(seen["gaps"], json!([]), "nothing was reported lost: {seen}");
    let resubscribe = seen["subscribes"]
        .as_array()
        .and_then(|frames| frames.last())
        .cloned()
        .unwrap_or_default();
    assert_eq!(
        resubscribe["since"]["A"], before,
        "the resubscribe asks for what followed the last event seen: {seen}"
    );
    chrome.quit().await;
    drop(second);
    drop(stopped);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_into_a_new_history_surfaces_a_gap_with_what_was_missed() {
    let (_cleanup, config, first, chrome) = history_client("client-epoch").await;
    publish_numbers(&config, 0..10);
    chrome
        .wait_for("the first 10 events", "t.events.length >= 10")
        .await;
    let before = last_position(&chrome).await;

    // The desk's stream is deleted while no bridge runs: the next one starts a new epoch.
    let stream = format!("{}.A", config.history.stream_prefix);
    let (stopped, second) = restart_under_client(first, &chrome, || {
        common::amqp::delete_quietly(&[&stream], &[]);
    })
    .await;
    publish_numbers(&config, 10..15);
    chrome
        .wait_for("the events of the new history", "t.events.length >= 15")
        .await;

    let seen = chrome
        .run("return { numbers: t.events.map((e) => e.data.n), epochs: t.events.map((e) => e.epoch), gaps: t.gaps };")
        .await;
    let expected: Vec<u64> = (0..15).collect();
    assert_eq!(seen["numbers"], json!(expected), "{seen}");
    let gaps = seen["gaps"].as_array().cloned().unwrap_or_default();
    assert_eq!(gaps.len(), 1, "one gap for the lost history: {seen}");
    let gap = &gaps[0];
    assert_eq!(gap["desk"], "A");
    assert_eq!(gap["reason"], "not_recovered");
    assert_eq!(gap["epoch"], before["epoch"], "the gap names the old history");
    assert_eq!(
        gap["from"].as_u64(),
        before["offset"].as_u64().map(|offset| offset + 1),
        "the gap starts after the last event seen: {seen}"
    );
    let new_epoch = &seen["epochs"][10];
    assert!(
        new_epoch.is_string() && *new_epoch != before["epoch"],
        "events after the gap carry the new epoch: {seen}"
    );
    chrome.quit().await;
    drop(second);
    drop(stopped);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_event_ids_are_dropped() {
    let bridge = TestBridge::start_healthy(test_config("client-dupes")).await;
    let exchange = bridge.config.amqp.inbound_exchange.clone();
    let chrome = Chrome::start().await;
    open_client(&chrome, bridge.addr, FAST, &["A"]).await;
    let mut desktop = Desktop::connect();
    // A desktop app that republishes after a lost confirm sends the same message_id twice.
    for (id, n) in [("dup-1", 1), ("dup-1", 2), ("dup-2", 3)] {
        let body = serde_json::to_vec(&json!({ "n": n })).expect("json");
        let properties = AmqpProperties::default().with_message_id(id.into());
        desktop.publish_with(&exchange, "A_new_example", &body, properties);
    }
    // Events of a desk arrive in order: once dup-2 is in, the second dup-1 was seen.
    chrome
        .wait_for("the last event", "t.events.some((e) => e.id === 'dup-2')")
        .await;
    let seen = chrome
        .run("return [t.events.map((e) => [e.id, e.data.n]), t.duplicates];")
        .await;
    assert_eq!(seen, json!([[["dup-1", 1], ["dup-2", 3]], ["dup-1"]]));
    chrome.quit().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_provider_signs_in_with_the_auth_frame_and_refreshes_before_expiry() {
    let secret = "client-secret";
    let config = common::bridge::jwt_test_config("client-jwt", secret);
    let bridge = TestBridge::start_healthy(config).await;
    let now = common::bridge::unix_now();
    let token = |exp: u64| {
        let claims = json!({"sub": "alice", "exp": exp, "desks": {"A": ["subscribe", "publish"]}});
        common::bridge::hs256_token(secret, &claims)
    };
    // The first token has 30 s left: less than the refresh margin, so the client refreshes at once.
    let (short, long) = (token(now + 30), token(now + 600));
    let chrome = Chrome::start().await;
    let options = format!(
        "{{ token: ((tokens) => async () => tokens.shift() ?? null)({}), backoff: {{ initialMs: 100, maxMs: 400 }} }}",
        json!([short, long])
    );
    open_client(&chrome, bridge.addr, &options, &["A"]).await;
    let user = chrome.run("return t.b.user;").await;
    assert_eq!(user, "alice");
    chrome
        .wait_for("the refresh", &format!("t.b.expiresAt === {}", now + 600))
        .await;
    let sent = chrome
        .run("return t.out.filter((f) => f.token).map((f) => [f.op, f.token]);")
        .await;
    assert_eq!(
        sent,
        json!([["auth", "***"], ["refresh", "***"]]),
        "the token went in an auth frame, then one refresh (never shown)"
    );
    let acked = chrome
        .run(r#"return t.outcome(t.b.publish("A", "new_example", { after: "refresh" }));"#)
        .await;
    assert!(
        acked["ok"]["id"].is_string(),
        "the refreshed session publishes: {acked}"
    );
    chrome.quit().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_shows_the_latest_value_per_key_live() {
    let bridge = TestBridge::start_healthy(test_config("client-console")).await;
    let exchange = bridge.config.amqp.inbound_exchange.clone();
    let chrome = Chrome::start().await;
    chrome.open(&format!("http://{}/?desks=A", bridge.addr)).await;
    chrome
        .wait_for(
            "the console to subscribe to A",
            "document.getElementById('status').textContent === 'open' \
             && window.deskbridge.subscriptions.some((s) => s.desk === 'A' && s.confirmed)",
        )
        .await;
    chrome
        .wait_for(
            "/health shown",
            "document.getElementById('broker').textContent === 'broker up'",
        )
        .await;
    let mut desktop = Desktop::connect();
    let bonds = [
        ("XS0001", 101.25, "B"),
        ("XS0002", 99.5, "S"),
        ("XS0003", 100.75, "B"),
        ("XS0001", 101.5, "B"),
    ];
    let messages: Vec<(String, Value)> = bonds
        .iter()
        .map(|(bond, px, side)| {
            let body = json!({"bond": bond, "px": px, "size": 5_000_000, "side": side});
            ("A_new_example".to_string(), body)
        })
        .collect();
    desktop.publish_many(&exchange, &messages);
    let rows = chrome
        .wait_for(
            "one row per bond, XS0001 at its latest price",
            "(() => { const rows = [...document.querySelectorAll('#latest-A tbody tr')]; \
               const text = rows.map((r) => [...r.cells].map((c) => c.textContent)); \
               return rows.length === 3 && text.find((r) => r[0] === 'XS0001')?.includes('101.5') && text; })()",
        )
        .await;
    let header = chrome
        .run("return [...document.querySelectorAll('#latest-A thead th')].map((th) => th.textContent);")
        .await;
    assert_eq!(
        header,
        json!(["key", "event", "px", "size", "side", "more", "origin", "updated", "n"])
    );
    let first = &rows[0];
    let cells = first.as_array().expect("cells");
    assert_eq!(
        json!(&cells[0..3]),
        json!(["XS0001", "new_example", "101.5"]),
        "{rows}"
    );
    assert_eq!(first[6], "desktop", "{rows}");
    assert_eq!(first[8], "2", "two updates of XS0001: {rows}");

    // A change flashes its cell (green: the price went up).
    desktop.publish_json(
        &exchange,
        "A_new_example",
        &json!({"bond": "XS0001", "px": 102.0}),
    );
    chrome
        .wait_for(
            "XS0001's price to change and flash",
            "(() => { const cell = document.querySelector('#latest-A tbody tr').cells[2]; \
               return cell.textContent === '102' && cell.getAnimations().length > 0; })()",
        )
        .await;
    chrome
        .wait_for(
            "a rate for desk A",
            "document.querySelector('[data-rate=\"A\"]').textContent !== '0.0/s'",
        )
        .await;
    let logged = chrome
        .run("return document.getElementById('log').textContent;")
        .await;
    let logged = logged.as_str().unwrap_or_default();
    assert!(
        logged.contains(r#"← {"op":"subscribed","desks":["A"]}"#),
        "the frames tab logs what came in: {logged}"
    );

    // Something to look at: a desk with a few dozen bonds moving.
    let mut more = Vec::new();
    for round in 0..3 {
        for i in 0..24 {
            let px = 95.0 + f64::from(i) * 0.375 + f64::from(round) * 0.125;
            let body = json!({"bond": format!("XS{:04}", 10 + i), "px": px, "size": (i + 1) * 1_000_000,
                              "side": if i % 3 == 0 { "S" } else { "B" }, "trader": "jdoe"});
            more.push(("A_new_example".to_string(), body));
        }
    }
    desktop.publish_many(&exchange, &more);
    chrome
        .wait_for(
            "every bond in the table",
            "document.querySelectorAll('#latest-A tbody tr').length === 27",
        )
        .await;
    let wide = chrome.screenshot("console-1280x800", 1280, 800).await;
    let narrow = chrome.screenshot("console-400x800", 400, 800).await;
    let width = chrome.run("return document.documentElement.scrollWidth;").await;
    assert!(
        width.as_u64().is_some_and(|w| w <= 400),
        "nothing sticks out of a narrow window: {width}"
    );
    chrome
        .run("document.getElementById('tab-log').click(); return true;")
        .await;
    let frames = chrome.screenshot("console-frames-1280x800", 1280, 800).await;
    eprintln!(
        "screenshots: {} {} {}",
        wide.display(),
        narrow.display(),
        frames.display()
    );
    chrome.quit().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_says_clearly_when_the_broker_is_down() {
    let bridge = TestBridge::start(without_broker("client-down"));
    let chrome = Chrome::start().await;
    chrome.open(&format!("http://{}/?desks=A", bridge.addr)).await;
    chrome
        .wait_for(
            "the broker shown down",
            "document.getElementById('broker').textContent === 'broker down' \
             && !document.getElementById('banner').hidden \
             && document.getElementById('banner').textContent.startsWith('Broker down')",
        )
        .await;
    chrome
        .wait_for(
            "the page still connected",
            "document.getElementById('status').textContent === 'open'",
        )
        .await;
    chrome.screenshot("console-broker-down-1280x800", 1280, 800).await;
    chrome.quit().await;
}
