//! The console page in a real browser (headless Chromium over WebDriver): it connects,
//! subscribes from `?desks=A`, and shows desktop events as they arrive — what a newcomer sees
//! after the README — signs in with a token (taken out of the address bar at once), and asks
//! for one, without retrying, when the bridge wants one. Its latest-value table is in
//! tests/client.rs.

mod common;

use common::*;
use serde_json::json;

/// The text of the console's frames log.
const LOG: &str = "document.getElementById('log').textContent";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_shows_desktop_events_live() {
    let bridge = TestBridge::start_healthy(test_config("browser")).await;
    let chrome = Chrome::start().await;
    chrome.open(&format!("http://{}/?desks=A", bridge.addr)).await;
    chrome
        .wait_for(
            "the console to subscribe to A",
            &format!(r#"{LOG}.includes('{{"op":"subscribed","desks":["A"]}}')"#),
        )
        .await;
    let mut desktop = Desktop::connect();
    desktop.publish_json(
        &bridge.config.amqp.inbound_exchange,
        "A_new_example",
        &json!({"bond": "XS0001", "seq": 1}),
    );
    chrome
        .wait_for(
            "the desktop event in the frames log",
            &format!(r#"{LOG}.includes('"event":"new_example"') && {LOG}.includes('"bond":"XS0001"')"#),
        )
        .await;
    let log = chrome.run(&format!("return {LOG};")).await;
    let log = log.as_str().unwrap_or_default();
    assert!(
        log.contains(r#"{"op":"welcome","session":"#),
        "the page connected:\n{log}"
    );
    assert!(log.contains(r#""origin":"desktop""#), "{log}");
    let status = chrome
        .run("return document.getElementById('status').textContent;")
        .await;
    assert_eq!(status, "open");
    chrome.quit().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_signs_in_with_a_token() {
    let config = common::bridge::jwt_test_config("browser-jwt", "console-secret");
    let bridge = TestBridge::start_healthy(config).await;
    let exp = common::bridge::unix_now() + 600;
    let claims = json!({"sub": "alice", "exp": exp, "desks": {"A": ["subscribe"]}});
    let token = common::bridge::hs256_token("console-secret", &claims);
    let chrome = Chrome::start().await;
    chrome
        .open(&format!("http://{}/?desks=A&token={token}", bridge.addr))
        .await;
    chrome
        .wait_for(
            "the page signed in as alice",
            "document.getElementById('user').textContent === 'as alice'",
        )
        .await;
    chrome
        .wait_for(
            "and subscribed with the token's rights",
            &format!(r#"{LOG}.includes('{{"op":"subscribed","desks":["A"]}}')"#),
        )
        .await;
    let log = chrome.run(&format!("return {LOG};")).await;
    let log = log.as_str().unwrap_or_default();
    assert!(
        log.contains(r#"→ {"op":"auth","token":"***"}"#) && !log.contains(&token),
        "the token went in an auth frame and is never shown:\n{log}"
    );
    // Out of the address bar (and so of the browser's history) as soon as the page read it.
    let address = chrome.run("return location.href;").await;
    let address = address.as_str().unwrap_or_default();
    assert!(
        address.ends_with("/?desks=A") && !address.contains("token"),
        "{address}"
    );
    chrome.quit().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_token_the_console_asks_for_one_and_stops_retrying() {
    let mut config = common::bridge::jwt_test_config("browser-notoken", "console-secret");
    // Turned away quickly: the page used to reconnect within its first backoff (0.25-0.5 s)
    // and be turned away again, for ever.
    config.auth.timeout_ms = 300;
    let bridge = TestBridge::start_healthy(config).await;
    let chrome = Chrome::start().await;
    chrome.open(&format!("http://{}/?desks=A", bridge.addr)).await;
    chrome
        .wait_for(
            "the page to say it needs a token",
            "document.getElementById('status').textContent === 'token needed'",
        )
        .await;
    let why = chrome
        .run("const why = document.getElementById('why'); return why.hidden ? '' : why.textContent;")
        .await;
    assert!(
        why.as_str()
            .is_some_and(|why| why.starts_with("unauthorized: no auth frame within auth.timeout_ms")),
        "the page shows the bridge's reason: {why}"
    );
    let focused = chrome.run("return document.activeElement.id;").await;
    assert_eq!(focused, "token", "the token field waits for the token");
    // `closed` is the client's state with no reconnect scheduled (only connect() opens again).
    let state = chrome.run("return window.deskbridge.state;").await;
    assert_eq!(state, "closed");
    bridge
        .wait_metric(r#"deskbridge_auth_failures_total{reason="timeout"} 1"#)
        .await;

    let exp = common::bridge::unix_now() + 600;
    let claims = json!({"sub": "alice", "exp": exp, "desks": {"A": ["subscribe"]}});
    let token = common::bridge::hs256_token("console-secret", &claims);
    chrome
        .run(&format!(
            "document.getElementById('token').value = '{token}'; \
             document.getElementById('connect').click(); return null;"
        ))
        .await;
    chrome
        .wait_for(
            "the page signed in with the token given",
            "document.getElementById('user').textContent === 'as alice' \
             && document.getElementById('why').hidden",
        )
        .await;
    // Two sessions in all, one turned away: nothing tried again while the page waited.
    bridge.wait_metric("deskbridge_sessions_opened_total 2").await;
    bridge
        .wait_metric(r#"deskbridge_auth_failures_total{reason="timeout"} 1"#)
        .await;
    chrome.quit().await;
}
