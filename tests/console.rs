//! The console page in a real browser (headless Chromium over WebDriver): it connects,
//! subscribes from `?desks=A`, and shows desktop events as they arrive — what a newcomer sees
//! after the README — and signs in with a token. Its latest-value table is in tests/client.rs.

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
    chrome.quit().await;
}
