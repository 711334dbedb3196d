//! The container image's bridge as `scripts/image-test` runs it: a browser subscribed through
//! it receives a desktop event. Ignored by `cargo test`: it needs the container that script
//! starts, named by `DESKBRIDGE_IMAGE_ADDR` (its HTTP address), `DESKBRIDGE_IMAGE_JWT_SECRET`
//! (the HS256 secret it was given) and `AMQP_URL` (its broker). The script runs it with
//! `cargo test --test image -- --ignored`, so the browser and the desktop app are the suite's
//! own clients (tests/common), not a second client to keep in step with the protocol.

mod common;

use std::net::SocketAddr;

use deskbridge::config::Config;
use serde_json::json;

use common::bridge::{hs256_token, unix_now};
use common::browser::{handshake, ws_url};
use common::{key, unique, Browser, Desktop};

/// A variable the script sets; fails naming it and the script when it is missing.
fn from_script(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: this test runs against the container scripts/image-test starts")
    })
}

#[tokio::test]
#[ignore = "needs the container scripts/image-test starts"]
async fn a_browser_subscribed_through_the_image_receives_a_desktop_event() {
    let addr: SocketAddr = from_script("DESKBRIDGE_IMAGE_ADDR")
        .parse()
        .expect("DESKBRIDGE_IMAGE_ADDR is an IP:port");
    let secret = from_script("DESKBRIDGE_IMAGE_JWT_SECRET");
    from_script("AMQP_URL");
    let token = hs256_token(
        &secret,
        &json!({"sub": "image-test", "exp": unix_now() + 600, "desks": {"A": ["subscribe"]}}),
    );
    let ws = handshake(format!("{}?token={token}", ws_url(addr)))
        .await
        .unwrap_or_else(|(status, body)| panic!("the image's bridge refused the token: {status} {body}"));
    let mut browser = Browser::from_stream(ws).await;
    browser.subscribe(&["A"]).await;

    // The image runs on the default exchange names, on a broker of the script's own.
    let defaults = Config::default();
    let data = json!({"probe": unique("image")});
    Desktop::connect().publish_json(&defaults.amqp.inbound_exchange, &key("A", "new_example"), &data);
    let event = browser.recv().await;
    assert_eq!(
        (&event["op"], &event["desk"], &event["event"], &event["data"]),
        (&json!("event"), &json!("A"), &json!("new_example"), &data),
        "the desktop event, through the image's bridge: {event}"
    );
    browser.assert_quiet().await;
}
