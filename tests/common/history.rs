//! Desk A's desktop events as history tests follow them across instances: a paced desktop
//! publisher numbering its events `{"n": 0}`, `{"n": 1}`, …, the events a browser saw (number,
//! offset, epoch), and the check that a browser got each event once, in order.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use deskbridge::config::Config;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

use super::browser::Browser;
use super::desktop::Desktop;
use super::key;

/// Publishes desktop events `{"n": from}` … on desk A, each padded with `pad` bytes, and waits
/// for the broker's confirms.
pub fn publish_desktop(config: &Config, from: u64, count: u64, pad: usize) {
    let padding = "x".repeat(pad);
    let messages: Vec<(String, Value)> = (from..from + count)
        .map(|n| (key("A", "new_example"), json!({"n": n, "pad": padding})))
        .collect();
    Desktop::connect().publish_many(&config.amqp.inbound_exchange, &messages);
}

/// A desktop event as a browser saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct Seen {
    /// The event's `data.n`: its place in what the desktop app published.
    pub n: u64,
    /// Its stream offset.
    pub offset: u64,
    /// The stream life the offset belongs to.
    pub epoch: String,
}

/// `frame` as a desktop event of desk A, or a failure naming it.
pub fn desktop_event(frame: &Value) -> Seen {
    assert_eq!(
        (frame["op"].as_str(), frame["desk"].as_str()),
        (Some("event"), Some("A")),
        "expected an event of desk A, got {frame}"
    );
    Seen {
        n: frame["data"]["n"]
            .as_u64()
            .unwrap_or_else(|| panic!("no data.n in {frame}")),
        offset: frame["offset"]
            .as_u64()
            .unwrap_or_else(|| panic!("no offset in {frame}")),
        epoch: frame["epoch"]
            .as_str()
            .unwrap_or_else(|| panic!("no epoch in {frame}"))
            .to_owned(),
    }
}

/// The next `count` frames, each a desktop event of desk A.
pub async fn events(browser: &mut Browser, count: usize) -> Vec<Seen> {
    let mut got = Vec::with_capacity(count);
    for _ in 0..count {
        got.push(desktop_event(&browser.recv().await));
    }
    got
}

/// Desktop events of desk A until the one with `data.n >= n` (included).
pub async fn events_through(browser: &mut Browser, n: u64) -> Vec<Seen> {
    let mut got = Vec::new();
    loop {
        let event = desktop_event(&browser.recv().await);
        let done = event.n >= n;
        got.push(event);
        if done {
            return got;
        }
    }
}

/// Desktop events of desk A until the bridge's socket ends, and the close frame it ended with
/// (`None` when the connection just broke: a killed process sends none).
pub async fn events_until_closed(browser: &mut Browser) -> (Vec<Seen>, Option<CloseFrame<'static>>) {
    let mut got = Vec::new();
    loop {
        match browser.next_frame().await {
            Some(Message::Text(text)) => {
                let frame: Value = serde_json::from_str(&text).expect("server sends JSON");
                got.push(desktop_event(&frame));
            }
            Some(Message::Ping(_) | Message::Pong(_)) => {}
            Some(Message::Close(frame)) => return (got, frame),
            None => return (got, None),
            Some(other) => panic!("unexpected frame from a bridge going away: {other:?}"),
        }
    }
}

/// Fails unless `events` are `{"n": 0}` … `{"n": count - 1}`, each once, in order, at strictly
/// growing offsets of one epoch.
pub fn assert_every_event_once(who: &str, events: &[Seen], count: u64) {
    let numbers: Vec<u64> = events.iter().map(|event| event.n).collect();
    if numbers != (0..count).collect::<Vec<_>>() {
        let mut seen = HashSet::new();
        let duplicates: Vec<u64> = numbers.iter().copied().filter(|n| !seen.insert(*n)).collect();
        let missing: Vec<u64> = (0..count).filter(|n| !seen.contains(n)).collect();
        let disorder = numbers.windows(2).find(|pair| pair[0] >= pair[1]);
        panic!(
            "{who}: not every event 0..{count} once in order: {} events, duplicates {duplicates:?}, \
             missing {missing:?}, first out of order {disorder:?}",
            numbers.len()
        );
    }
    let backwards = events.windows(2).find(|pair| pair[0].offset >= pair[1].offset);
    assert!(backwards.is_none(), "{who}: offsets must grow: {backwards:?}");
    let epochs: HashSet<&str> = events.iter().map(|event| event.epoch.as_str()).collect();
    assert_eq!(epochs.len(), 1, "{who}: one epoch throughout: {epochs:?}");
}

/// A desktop app publishing `{"n": 0}`, `{"n": 1}`, … on desk A on its own thread, batch after
/// confirmed batch, until stopped.
pub struct Publisher {
    stop: Arc<AtomicBool>,
    /// Events confirmed by the broker so far.
    published: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl Publisher {
    const BATCH: u64 = 10;

    /// Starts publishing to the inbound exchange of `config`.
    pub fn start(config: &Config) -> Publisher {
        let stop = Arc::new(AtomicBool::new(false));
        let published = Arc::new(AtomicU64::new(0));
        let (thread_stop, thread_published) = (Arc::clone(&stop), Arc::clone(&published));
        let config = config.clone();
        let thread = std::thread::spawn(move || {
            while !thread_stop.load(Ordering::Relaxed) {
                let from = thread_published.load(Ordering::Relaxed);
                publish_desktop(&config, from, Publisher::BATCH, 0);
                thread_published.store(from + Publisher::BATCH, Ordering::Relaxed);
                // Pacing, not waiting: about 2000 events/s keeps the stream flowing through the
                // whole test without burying three browsers on a shared 2-core machine.
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        Publisher {
            stop,
            published,
            thread: Some(thread),
        }
    }

    /// Events the broker confirmed so far.
    pub fn published(&self) -> u64 {
        self.published.load(Ordering::Relaxed)
    }

    /// Stops after the batch in progress; how many events were published in all.
    pub fn stop(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            thread.join().expect("the publisher thread ran without failing");
        }
        self.published()
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The browsers that saw `before` on an instance that went away resume on the one at `addr`
/// (`since` the last event each saw: it must be recovered) while `publisher` goes on; then the
/// publisher stops, and each must have had every event once, in order, at the offsets that
/// `watcher` (live on `addr` throughout) saw. `gone` names the old instance in messages.
pub async fn resume_elsewhere_with_every_event_once(
    addr: std::net::SocketAddr,
    before: &[Vec<Seen>],
    publisher: Publisher,
    watcher: &mut Browser,
    gone: &str,
) {
    let mut resumed = Vec::new();
    for seen in before {
        let last = seen
            .last()
            .expect("each browser saw events before its instance went");
        let mut browser = Browser::connect_to(addr).await;
        assert_eq!(
            browser.resume(last.offset, &last.epoch).await,
            json!({"op": "subscribed", "desks": ["A"], "recovered": {"A": true}}),
            "a resume from offset {} (n = {}) after the {gone} instance went",
            last.offset,
            last.n
        );
        resumed.push(browser);
    }
    // Still publishing: each resumed browser crosses from the replay into live delivery.
    let live_from = publisher.published() + 200;
    let mut after = Vec::new();
    for browser in &mut resumed {
        after.push(events_through(browser, live_from).await);
    }
    let total = publisher.stop();
    for (browser, seen) in resumed.iter_mut().zip(&mut after) {
        if seen.last().is_some_and(|event| event.n < total - 1) {
            seen.extend(events_through(browser, total - 1).await);
        }
        browser.assert_quiet().await;
    }
    let live = events_through(watcher, total - 1).await;
    assert_every_event_once("the live browser on the instance left", &live, total);
    for (index, (before, after)) in before.iter().zip(&after).enumerate() {
        let all: Vec<Seen> = before.iter().chain(after).cloned().collect();
        let who = format!(
            "browser {index} ({} events from the {gone} instance, {} after resuming)",
            before.len(),
            after.len()
        );
        assert_every_event_once(&who, &all, total);
        assert_eq!(
            before.as_slice(),
            &live[..before.len()],
            "{who}: the {gone} instance delivered each event at the offset the other did"
        );
    }
    watcher.assert_quiet().await;
}
