//! The console page in a real browser (headless Chromium): it connects, subscribes from
//! `?desks=A`, and shows desktop events as they arrive — what a newcomer sees after the README.

mod common;

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use common::*;
use serde_json::json;

/// Headless Chromium's rendering of `url` after the page's scripts ran.
fn rendered_dom(url: &str) -> String {
    let browser = std::env::var("CHROMIUM").unwrap_or_else(|_| "chromium".into());
    let profile = std::env::temp_dir().join(unique("chromium-profile"));
    let output = Command::new(&browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--virtual-time-budget=3000",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(url)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run `{browser}` ({e}): install it with `apt-get install chromium` or set CHROMIUM")
        });
    std::fs::remove_dir_all(&profile).ok();
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_shows_desktop_events_live() {
    let bridge = TestBridge::start_healthy(test_config("browser")).await;
    // A desktop app publishing A_new_example until the page has shown one (each publish waits
    // for the broker's confirm, which paces the loop).
    let done = Arc::new(AtomicBool::new(false));
    let publishing = Arc::clone(&done);
    let exchange = bridge.config.amqp.inbound_exchange.clone();
    let desktop = std::thread::spawn(move || {
        let mut desktop = Desktop::connect();
        let mut seq = 0;
        while !publishing.load(Ordering::Acquire) {
            desktop.publish_json(&exchange, "A_new_example", &json!({"bond": "XS0001", "seq": seq}));
            seq += 1;
        }
    });
    let url = format!("http://{}/?desks=A", bridge.addr);
    let started = Instant::now();
    let dom = loop {
        let page = url.clone();
        let dom = tokio::task::spawn_blocking(move || rendered_dom(&page))
            .await
            .expect("chromium ran");
        if dom.contains("new_example (desktop, id") || started.elapsed() > DEADLINE {
            break dom;
        }
    };
    done.store(true, Ordering::Release);
    desktop.join().expect("desktop publisher");
    assert!(dom.contains("welcome: session"), "the page connected:\n{dom}");
    assert!(
        dom.contains(r#"{"op":"subscribed","desks":["A"]}"#),
        "the page subscribed to A:\n{dom}"
    );
    assert!(
        dom.contains("new_example (desktop, id") && dom.contains(r#""bond":"XS0001""#),
        "a desktop event was rendered live:\n{dom}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_signs_in_with_a_token() {
    let mut config = test_config("browser-jwt");
    config.auth.mode = deskbridge::config::AuthMode::Jwt;
    config.auth.jwt.hs256_secret = Some(deskbridge::config::Secret::new("console-secret".into()));
    let bridge = TestBridge::start_healthy(config).await;
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
        + 600;
    let claims = json!({"sub": "alice", "exp": exp, "desks": {"A": ["subscribe"]}});
    let key = jsonwebtoken::EncodingKey::from_secret(b"console-secret");
    let token = jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &key).expect("sign");
    let url = format!("http://{}/?desks=A&token={token}", bridge.addr);
    let dom = tokio::task::spawn_blocking(move || rendered_dom(&url))
        .await
        .expect("chromium ran");
    assert!(dom.contains("as alice"), "the page signed in as alice:\n{dom}");
    assert!(
        dom.contains(r#"{"op":"subscribed","desks":["A"]}"#),
        "and subscribed with the token's rights:\n{dom}"
    );
}
