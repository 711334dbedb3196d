//! A rolling upgrade with history on, as docs/deploy.md describes it, against the real broker
//! with real WebSocket clients and two deskbridge processes: the new instance is up before the
//! old one gets SIGTERM; the old one's browsers are closed with 1001 ("going away"), resume on
//! the new one with `since`, and end up with every event published throughout, once, in order.

mod common;

use std::time::{Duration, Instant};

use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use common::amqp::HistoryCleanup;
use common::bridge::{history_config, wait_attached_at};
use common::history::{events, events_until_closed, resume_elsewhere_with_every_event_once, Publisher};
use common::process::BridgeProcess;
use common::{Browser, DEADLINE};

/// A deskbridge process on `config`, healthy and attached to its desk streams.
async fn ready_instance(config: &deskbridge::config::Config) -> BridgeProcess {
    let bridge = BridgeProcess::launch(env!("CARGO_BIN_EXE_deskbridge"), config).expect("start deskbridge");
    bridge.wait_healthy(DEADLINE).await;
    wait_attached_at(bridge.addr, &["A", "B"]).await;
    bridge
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browsers_of_an_instance_stopped_by_sigterm_resume_on_the_next_with_every_event_once_in_order() {
    const BROWSERS: usize = 3;
    let config = history_config("rolling");
    let _history = HistoryCleanup(config.clone());
    let mut old = ready_instance(&config).await;
    // Surge first, as a Deployment with maxUnavailable 0 does: the new instance is ready
    // before the old one is told to stop.
    let new = ready_instance(&config).await;
    let mut browsers = Vec::new();
    for _ in 0..BROWSERS {
        let mut browser = Browser::connect_to(old.addr).await;
        browser.subscribe(&["A"]).await;
        browsers.push(browser);
    }
    // Live on the new instance throughout: the reference for the offsets.
    let mut watcher = Browser::connect_to(new.addr).await;
    watcher.subscribe(&["A"]).await;

    let publisher = Publisher::start(&config);
    let mut before = Vec::new();
    for browser in &mut browsers {
        before.push(events(browser, 200).await);
    }

    // The upgrade stops the old instance while the desktop app keeps publishing.
    let stopping = Instant::now();
    old.terminate().expect("SIGTERM the old instance");
    for (index, (browser, seen)) in browsers.iter_mut().zip(&mut before).enumerate() {
        let (more, close) = events_until_closed(browser).await;
        seen.extend(more);
        let close =
            close.unwrap_or_else(|| panic!("browser {index}: the socket ended without a close frame"));
        assert_eq!(
            close.code,
            CloseCode::Away,
            "browser {index}: a stopping instance says 1001 going away: {close:?}"
        );
    }
    let exit = tokio::task::block_in_place(|| old.wait_exit(DEADLINE))
        .expect("the old instance exits after SIGTERM");
    let stopped_in = stopping.elapsed();
    assert!(exit.success(), "a graceful stop exits 0: {exit:?}");
    assert!(
        stopped_in < Duration::from_millis(config.shutdown_timeout_ms) + Duration::from_secs(5),
        "stopped in {stopped_in:?}, within shutdown_timeout_ms ({} ms) and room to exit",
        config.shutdown_timeout_ms
    );

    // Each browser reconnects (through the load balancer, to the instance left) and resumes
    // after the last event it saw.
    resume_elsewhere_with_every_event_once(new.addr, &before, publisher, &mut watcher, "old").await;

    drop((browsers, watcher));
    new.stop();
}
