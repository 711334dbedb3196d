//! Failover on a three-node RabbitMQ cluster (issue #10): browsers subscribed to a desk with
//! `[history]` on lose nothing and get nothing twice while RabbitMQ nodes go away under the
//! bridge. The desk's stream has three replicas (`initial_cluster_size = 3`) and is led by
//! node 1, the node of the bridge's first URL, so stopping node 1 drops the bridge's
//! connections *and* moves the stream's leader. Then node 1 comes back and the node the bridge
//! moved to (node 2, its next URL) is killed, as in a crash.
//!
//! The cluster is the test's own (`scripts/cluster.sh` with its own names, ports and directory;
//! tests/common/cluster.rs), so `AMQP_URL` is not used, nothing here touches another broker,
//! and the file runs beside the rest of the suite. The test takes about a minute, most of it
//! starting the cluster (18–44 s) and node 1 again (~12 s). Without RabbitMQ installed it fails
//! saying how to install it.

mod common;

use std::collections::BTreeSet;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use amiquip::{
    AmqpProperties, Auth, Channel, Confirm, ConfirmPayload, Connection, ConnectionOptions, ConnectionTuning,
    Publish, Return,
};
use crossbeam_channel::{Receiver, Sender, TryRecvError};
use serde_json::{json, Value};
use tokio::task::block_in_place;
use tokio_tungstenite::tungstenite::Message;

use common::bridge::history_config;
use common::cluster::Cluster;
use common::http::{http_get, try_http_get};
use common::{key, poll, url, Browser, TestBridge};

/// Browsers that stay subscribed through both outages.
const LIVE_BROWSERS: usize = 3;

/// The desktop app publishes at most one event per this (100/s), each after the previous one
/// was confirmed.
const PACE: Duration = Duration::from_millis(10);

/// A publish with no confirm after this is sent again (RabbitMQ 3.10.8 sometimes never
/// confirms a publish made while a stream's leader stops: docs/cluster.md).
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(2);

/// Bound on an outage, from the script call until the bridge's links are up again: the drop
/// is seen 1–3 s after a graceful stop begins, and re-attaching may fail once or twice.
const OUTAGE_DEADLINE: Duration = Duration::from_secs(45);

/// Bound on the browsers' progress while events flow.
const PROGRESS_DEADLINE: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn browsers_lose_nothing_when_the_node_leading_their_stream_stops_then_their_node_crashes() {
    let _ = env_logger::builder()
        .is_test(true)
        .parse_filters("deskbridge=info")
        .try_init();
    let began = Instant::now();
    // First in, last out: dropped after the bridge, also when the test fails.
    let cluster = block_in_place(Cluster::start);
    let cluster_up = began.elapsed();
    let step = |what: &str| eprintln!("failover [{:5.1} s] {what}", began.elapsed().as_secs_f64());

    let mut config = history_config("failover");
    config.desks = vec!["A".into()];
    config.amqp.urls = cluster.urls.iter().map(|node| url(node)).collect();
    config.history.initial_cluster_size = Some(3);
    // A few events only: the resume after the failover is read back from the stream, on the
    // reader's connection to another node.
    config.history.memory_bytes = 4096;
    let stream = deskbridge::history::stream_name(&config.history, "A");
    let bridge = TestBridge::start_isolated(config.clone());
    bridge.wait_health(200).await;
    bridge.wait_attached(&["A"]).await;
    step("bridge attached to the desk stream");
    assert_eq!(
        block_in_place(|| cluster.leader(&stream)),
        1,
        "a new stream is led by the node of the connection that declared it: node 1, the bridge's first URL"
    );

    let progress: Vec<Arc<AtomicU64>> = (0..LIVE_BROWSERS).map(|_| Arc::default()).collect();
    let mut readers = Vec::new();
    for (index, seen_up_to) in progress.iter().enumerate() {
        let mut browser = Browser::connect(&bridge).await;
        browser.subscribe(&["A"]).await;
        let name = format!("browser {index}");
        readers.push(tokio::spawn(read_to_last(
            browser,
            name,
            Vec::new(),
            Arc::clone(seen_up_to),
        )));
    }
    // This one leaves before the first outage and resumes with `since` after it.
    let mut resumer = Browser::connect(&bridge).await;
    resumer.subscribe(&["A"]).await;

    let ports: Vec<u16> = (1..=3).map(|node| cluster.amqp_port(node)).collect();
    let publisher = Publisher::start(ports, config.amqp.inbound_exchange.clone());
    let before = read_until(&mut resumer, 50).await;
    drop(resumer);
    wait_progress(&progress, 100, "events flowed before the outage").await;

    step("events flow; stopping node 1");
    // Outage 1: a graceful stop of node 1, the stream's leader and the bridge's node.
    let stopped = outage(&cluster, &bridge, How::Stop, 1).await;
    wait_progress(
        &progress,
        publisher.confirmed() + 100,
        "live delivery went on after the bridge moved off node 1",
    )
    .await;
    step("live delivery went on after the stop");
    let leader_after_stop = block_in_place(|| cluster.leader(&stream));
    assert_ne!(
        leader_after_stop, 1,
        "a surviving node leads the stream after node 1 stopped"
    );

    // The resumer is back: everything after its last offset, from the stream (its memory
    // holds a few events only), read through the reader's connection to the new node.
    let resumed = tokio::spawn(resume_to_last(bridge.addr, before));

    // Node 1 back (as a replica), then a crash of node 2, where the bridge reconnected (the
    // first URL that answered); the bridge goes back to node 1.
    step("resumer back; starting node 1 again");
    let restart_began = Instant::now();
    let restarted = block_in_place(|| cluster.run(&["start-node", "1"]));
    assert!(
        restarted.status.success(),
        "start-node 1: {}",
        String::from_utf8_lossy(&restarted.stderr)
    );
    let restart_took = restart_began.elapsed();
    let leader_before_kill = block_in_place(|| cluster.leader(&stream));
    step("killing node 2");
    let killed = outage(&cluster, &bridge, How::Kill, 2).await;
    wait_progress(
        &progress,
        publisher.confirmed() + 100,
        "live delivery went on after node 2 crashed",
    )
    .await;

    step("live delivery went on after the kill; finishing");
    let published = block_in_place(|| publisher.finish());
    step("the desktop's last event is confirmed");
    let mut results = Vec::new();
    for (index, reader) in readers.into_iter().enumerate() {
        results.push((format!("browser {index}"), joined(reader).await));
    }
    let (resumer_events, resumer_closed) = joined(resumed).await;
    results.push(("resumer".to_string(), resumer_events));
    step("every browser got the last event");
    let mut checked = Vec::new();
    for (name, seen) in &results {
        checked.push(check(name, seen, &published));
    }
    let reference: Vec<(u64, u64)> = results[0].1.iter().map(|seen| (seen.offset, seen.n)).collect();
    for (name, seen) in &results[1..] {
        let got: Vec<(u64, u64)> = seen.iter().map(|seen| (seen.offset, seen.n)).collect();
        assert!(
            got == reference,
            "{name} got other events (offset, n) than browser 0: {} vs {} events",
            got.len(),
            reference.len()
        );
    }
    let (_, metrics) = http_get(bridge.addr, "/metrics").await;
    let reconnects = counter(&metrics, "deskbridge_amqp_reconnects_total{link=\"consumer\"}");
    assert!(
        reconnects >= 2.0,
        "the stream reader reconnected once per outage: {reconnects}"
    );

    let (bridge, _) = bridge.shut_down().await;
    drop(bridge);
    let stop_began = Instant::now();
    drop(cluster);
    let first = &checked[0];
    eprintln!(
        "failover: cluster up in {:.1} s; {} events 0..={} published ({} publishes, {} resent: {:?}; \
         {} confirm timeouts, {} nacks, {} returns; desktop reconnected to nodes {:?}; slowest confirm {:.2} s)",
        cluster_up.as_secs_f64(),
        published.last + 1,
        published.last,
        published.publishes,
        published.resent.len(),
        published.resent,
        published.timeouts,
        published.nacks,
        published.returns,
        published.reconnected_to,
        published.slowest_confirm.as_secs_f64(),
    );
    for (name, outage) in [("stop-node 1", &stopped), ("kill-node 2", &killed)] {
        eprintln!(
            "failover: {name}: script returned in {:.2} s; bridge link down {:.2} s after the call, \
             both links up {:.2} s after it ({:.2} s down); errors seen: {:?}",
            outage.script_took.as_secs_f64(),
            outage.down_after.as_secs_f64(),
            outage.up_after.as_secs_f64(),
            (outage.up_after - outage.down_after).as_secs_f64(),
            outage.errors,
        );
    }
    eprintln!(
        "failover: leader 1 → {leader_after_stop} after the stop; start-node 1 took {:.1} s; \
         leader when node 2 was killed: {leader_before_kill}; consumer reconnects {reconnects}",
        restart_took.as_secs_f64()
    );
    for ((name, _), checked) in results.iter().zip(&checked) {
        // The resumer's longest gap is the time it was away: not worth printing.
        let gap = if name == "resumer" {
            format!("closed (1013) and resumed {resumer_closed} times")
        } else {
            format!("longest gap {:.2} s", checked.longest_gap.as_secs_f64())
        };
        eprintln!(
            "failover: {name}: {} events, {} distinct, {} duplicates dropped, {gap}",
            checked.events, checked.distinct, checked.duplicates,
        );
    }
    eprintln!(
        "failover: every browser got all {} events once, in order; cluster stopped in {:.1} s; test took {:.1} s",
        first.distinct,
        stop_began.elapsed().as_secs_f64(),
        began.elapsed().as_secs_f64()
    );
}

/// The value of the counter `series` in a `/metrics` text (0 when absent).
fn counter(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

/// A browser task's result (each event it waits for has a deadline), or its panic carried on
/// into the test.
async fn joined<T>(task: tokio::task::JoinHandle<T>) -> T {
    match task.await {
        Ok(value) => value,
        Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
        Err(error) => panic!("a browser task was cancelled: {error}"),
    }
}

/// How a node goes away.
#[derive(Debug, Clone, Copy)]
enum How {
    /// `stop-node`: a graceful stop of the node's Erlang VM (its clients get 320 or a reset).
    Stop,
    /// `kill-node`: SIGKILL, a crash (its clients get a reset).
    Kill,
}

impl How {
    fn command(self) -> &'static str {
        match self {
            How::Stop => "stop-node",
            How::Kill => "kill-node",
        }
    }
}

/// What one outage looked like from the bridge.
struct Outage {
    /// From the script call to its return.
    script_took: Duration,
    /// From the call until `/health` first showed the consumer link not up.
    down_after: Duration,
    /// From the call until both links were up again.
    up_after: Duration,
    /// The link errors `/health` showed meanwhile.
    errors: BTreeSet<String>,
}

/// Takes node `node` away and waits, watching `/health` every 10 ms (not for the script, which
/// takes ~4 s to stop a node gracefully), until the bridge's consumer link went down and both
/// links are up again.
async fn outage(cluster: &Cluster, bridge: &TestBridge, how: How, node: u16) -> Outage {
    let mut command = cluster.command(&[how.command(), &node.to_string()]);
    let called = Instant::now();
    let script = tokio::task::spawn_blocking(move || {
        let output = command.output();
        (output, called.elapsed())
    });
    let mut down_after = None;
    let mut errors = BTreeSet::new();
    let mut last = Value::Null;
    let up_after = loop {
        assert!(
            called.elapsed() < OUTAGE_DEADLINE,
            "after {} {node}, the bridge's consumer link {} within {OUTAGE_DEADLINE:?}; last /health: {last}",
            how.command(),
            if down_after.is_none() {
                "never went down (was the bridge not on that node?)"
            } else {
                "did not come back"
            }
        );
        if let Some((_, body)) = try_http_get(bridge.addr, "/health").await {
            let health: Value = serde_json::from_str(&body).expect("/health is JSON");
            if let Some(error) = health["amqp"]["error"].as_str() {
                errors.insert(error.to_owned());
            }
            let consumer_up = health["amqp"]["consumer"] == "up";
            if down_after.is_none() && !consumer_up {
                down_after = Some(called.elapsed());
            }
            if down_after.is_some() && consumer_up && health["amqp"]["publisher"] == "up" {
                break called.elapsed();
            }
            last = health;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let (output, script_took) = script.await.expect("the script's thread ends");
    let output = output.unwrap_or_else(|error| panic!("cannot run scripts/cluster.sh: {error}"));
    assert!(
        output.status.success(),
        "{} {node}: {}",
        how.command(),
        String::from_utf8_lossy(&output.stderr)
    );
    Outage {
        script_took,
        // Set before the loop could end.
        down_after: down_after.expect("the link went down"),
        up_after,
        errors,
    }
}

/// Waits until every live browser has seen an event numbered at least `at_least - 1`.
async fn wait_progress(progress: &[Arc<AtomicU64>], at_least: u64, what: &str) {
    poll(PROGRESS_DEADLINE, Duration::from_millis(10), || {
        let seen: Vec<u64> = progress.iter().map(|next| next.load(Ordering::Relaxed)).collect();
        std::future::ready(if seen.iter().all(|next| *next >= at_least) {
            Ok(())
        } else {
            Err(format!(
                "{what}: live browsers are at {seen:?} (next n), wanted ≥ {at_least}"
            ))
        })
    })
    .await
}

/// One event as a browser got it.
#[derive(Debug, Clone)]
struct Seen {
    n: u64,
    offset: u64,
    epoch: String,
    id: String,
    last: bool,
    at: Instant,
}

impl Seen {
    fn from_frame(frame: &Value) -> Option<Seen> {
        (frame["op"] == "event" && frame["desk"] == "A").then_some(())?;
        Some(Seen {
            n: frame["data"]["n"].as_u64()?,
            offset: frame["offset"].as_u64()?,
            epoch: frame["epoch"].as_str()?.to_owned(),
            id: frame["id"].as_str()?.to_owned(),
            last: frame["data"]["last"] == true,
            at: Instant::now(),
        })
    }
}

/// What a browser read next.
enum Next {
    Event(Seen),
    /// The bridge closed the socket, with this code.
    Closed(Option<u16>),
}

/// The next event, or the bridge's close; fails the test on any other frame, or when nothing
/// comes for [`common::DEADLINE`] (the bridge's heartbeat pings do not count: a session that
/// gets pings and no events is stuck).
async fn next_event(browser: &mut Browser, name: &str, seen: &[Seen]) -> Next {
    let after = seen.last().map(|seen| seen.n);
    let deadline = tokio::time::Instant::now() + common::DEADLINE;
    loop {
        let frame = tokio::time::timeout_at(deadline, browser.next_frame())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "{name}: no event for {:?} after {} events (last n {after:?})",
                    common::DEADLINE,
                    seen.len()
                )
            });
        match frame {
            Some(Message::Text(text)) => {
                let frame: Value = serde_json::from_str(&text).expect("the bridge sends JSON");
                return Next::Event(
                    Seen::from_frame(&frame)
                        .unwrap_or_else(|| panic!("{name}: only events of desk A expected, got {frame}")),
                );
            }
            Some(Message::Close(close)) => return Next::Closed(close.map(|close| u16::from(close.code))),
            Some(_) => continue,
            None => panic!(
                "{name}: the socket ended without a close after {} events (last n {after:?})",
                seen.len()
            ),
        }
    }
}

/// The next event of a browser the bridge must not close.
async fn next_live_event(browser: &mut Browser, name: &str, seen: &[Seen]) -> Seen {
    match next_event(browser, name, seen).await {
        Next::Event(event) => event,
        Next::Closed(code) => panic!(
            "{name}: the bridge closed the socket (code {code:?}) after {} events (last n {:?}): \
             a failover must not close a live browser",
            seen.len(),
            seen.last().map(|seen| seen.n)
        ),
    }
}

/// Reads events until one numbered `n` or more; returns them all.
async fn read_until(browser: &mut Browser, n: u64) -> Vec<Seen> {
    let mut seen = Vec::new();
    loop {
        let event = next_live_event(browser, "resumer", &seen).await;
        let done = event.n >= n;
        seen.push(event);
        if done {
            return seen;
        }
    }
}

/// Reads events after `seen` until the desktop's last one; `progress` holds the highest `n`
/// seen plus one, for the test to follow.
async fn read_to_last(
    mut browser: Browser,
    name: String,
    mut seen: Vec<Seen>,
    progress: Arc<AtomicU64>,
) -> Vec<Seen> {
    loop {
        let event = next_live_event(&mut browser, &name, &seen).await;
        progress.fetch_max(event.n + 1, Ordering::Relaxed);
        let last = event.last;
        seen.push(event);
        if last {
            return seen;
        }
    }
}

/// Subscribes with `since` the last event in `seen` and expects it recovered.
async fn resume(bridge: SocketAddr, seen: &[Seen]) -> Browser {
    let last = seen.last().expect("a resume follows events");
    let mut browser = Browser::connect_to(bridge).await;
    assert_eq!(
        browser.resume(last.offset, &last.epoch).await,
        json!({"op": "subscribed", "desks": ["A"], "recovered": {"A": true}}),
        "a resume across a failover is recovered: the stream kept its epoch and every offset"
    );
    browser
}

/// The resumer: resumes after `seen` and reads until the desktop's last event. The bridge may
/// close it with 1013 when the stream read serving its resume is cut by a failover (docs/history.md:
/// "a replay that cannot be read closes the session with 1013"); it then resumes again from
/// its last event. Returns its events and how often it was closed.
async fn resume_to_last(bridge: SocketAddr, mut seen: Vec<Seen>) -> (Vec<Seen>, usize) {
    let mut closed = 0;
    'session: loop {
        let mut browser = resume(bridge, &seen).await;
        loop {
            match next_event(&mut browser, "resumer", &seen).await {
                Next::Event(event) => {
                    let last = event.last;
                    seen.push(event);
                    if last {
                        return (seen, closed);
                    }
                }
                Next::Closed(code) => {
                    assert_eq!(
                        code,
                        Some(1013),
                        "the resumer is closed only with 1013 (history unavailable: resume with since)"
                    );
                    closed += 1;
                    assert!(closed <= 10, "the resumer was closed {closed} times");
                    continue 'session;
                }
            }
        }
    }
}

/// What one browser's events came to.
struct Checked {
    events: usize,
    distinct: usize,
    duplicates: usize,
    longest_gap: Duration,
}

/// Checks one browser's events: each stream message once and in stream order (offsets only
/// grow), one stream life, and — dropping the copies of messages the desktop sent twice — every
/// number from 0 to the last one in order: nothing confirmed is missing.
fn check(name: &str, seen: &[Seen], published: &PublishReport) -> Checked {
    let epoch = &seen[0].epoch;
    let mut next = 0;
    let mut duplicates = 0;
    let mut longest_gap = Duration::ZERO;
    for (index, event) in seen.iter().enumerate() {
        assert_eq!(
            event.id,
            format!("n-{}", event.n),
            "{name}: the event's id is its message_id"
        );
        assert_eq!(
            &event.epoch, epoch,
            "{name}: the epoch changed at n {} (offset {}): a failover must not start a new stream life",
            event.n, event.offset
        );
        if let Some(previous) = index.checked_sub(1).map(|i| &seen[i]) {
            assert!(
                event.offset > previous.offset,
                "{name}: offset {} (n {}) came after offset {} (n {}): a stream message delivered \
                 twice or out of order",
                event.offset,
                event.n,
                previous.offset,
                previous.n
            );
            longest_gap = longest_gap.max(event.at - previous.at);
        }
        if event.n == next {
            next += 1;
        } else if event.n < next {
            assert!(
                published.resent.contains(&event.n),
                "{name}: n {} came again at offset {} though the desktop sent it once",
                event.n,
                event.offset
            );
            duplicates += 1;
        } else {
            panic!(
                "{name}: n {} (offset {}) came after n {:?}: confirmed events {next}..{} are missing",
                event.n,
                event.offset,
                next.checked_sub(1),
                event.n - 1
            );
        }
    }
    assert_eq!(
        next,
        published.last + 1,
        "{name}: events 0..={} were confirmed; the last one came after n {:?}",
        published.last,
        next.checked_sub(1)
    );
    Checked {
        events: seen.len(),
        distinct: next as usize,
        duplicates,
        longest_gap,
    }
}

/// What the desktop app did.
#[derive(Debug, Default)]
struct PublishReport {
    /// The number of the last event (`"last": true`); 0..=last were all confirmed.
    last: u64,
    /// Publishes, resends included.
    publishes: u64,
    /// Numbers sent more than once (the first send got no ack); each may be in the stream twice.
    resent: BTreeSet<u64>,
    timeouts: u32,
    nacks: u32,
    returns: u32,
    /// The node of each new connection after a lost one.
    reconnected_to: Vec<u16>,
    slowest_confirm: Duration,
}

/// A desktop app publishing `{"n": 0}`, `{"n": 1}`, … to desk A with publisher confirms, one at
/// a time, each with `message_id` `n-<n>`, through the cluster's nodes in order (as the bridge
/// does). A publish that is nacked, returned, or not confirmed within [`CONFIRM_TIMEOUT`] is
/// sent again; one whose connection is lost is sent again on the next node that answers.
struct Publisher {
    /// Sending asks for the last event; dropping it (the test failed) stops at once.
    finish: Option<Sender<()>>,
    /// The thread's report, sent before it closes its connection (a close waits for the
    /// broker's answer without limit).
    report: Receiver<PublishReport>,
    /// Every number below this is confirmed.
    confirmed: Arc<AtomicU64>,
}

/// Why a publish is sent again.
enum Unsettled {
    /// On the same channel.
    Again,
    /// On a new connection.
    Lost,
}

impl Publisher {
    fn start(ports: Vec<u16>, exchange: String) -> Publisher {
        let (finish, finish_rx) = crossbeam_channel::bounded(1);
        let (report_tx, report) = crossbeam_channel::bounded(1);
        let confirmed = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&confirmed);
        // Detached: a thread stuck closing a connection to a dead node must not hold the test.
        std::thread::spawn(move || publish(&ports, &exchange, &finish_rx, &counter, &report_tx));
        Publisher {
            finish: Some(finish),
            report,
            confirmed,
        }
    }

    /// How many events (0..this) are confirmed.
    fn confirmed(&self) -> u64 {
        self.confirmed.load(Ordering::Relaxed)
    }

    /// Publishes the last event, waits for its confirm, and reports.
    fn finish(self) -> PublishReport {
        // The thread holds the receiver until it reports.
        let _ = self.finish.as_ref().map(|finish| finish.send(()));
        match self.report.recv_timeout(OUTAGE_DEADLINE) {
            Ok(report) => report,
            Err(_) => panic!(
                "the desktop app did not get its last event confirmed within {OUTAGE_DEADLINE:?} \
                 (confirmed so far: 0..{})",
                self.confirmed()
            ),
        }
    }
}

/// The desktop app's thread; sends its report on `done` when finished (or not at all when the
/// test dropped `finish`, i.e. failed).
fn publish(
    ports: &[u16],
    exchange: &str,
    finish: &Receiver<()>,
    confirmed: &AtomicU64,
    done: &Sender<PublishReport>,
) {
    let mut report = PublishReport::default();
    let pace = crossbeam_channel::tick(PACE);
    let mut n = 0;
    let mut finishing = false;
    let mut first = true;
    loop {
        let Some((connection, node)) = connect(ports, finish, &mut finishing) else {
            return;
        };
        if !std::mem::replace(&mut first, false) {
            report.reconnected_to.push(node);
        }
        let mut connection = connection;
        let session = connection.open_channel(None).and_then(|channel| {
            let returns = channel.listen_for_returns()?;
            // Listen before enabling, as amiquip's example does, so that no confirm is missed.
            let confirms = channel.listen_for_publisher_confirms()?;
            channel.enable_publisher_confirms()?;
            Ok((channel, returns, confirms))
        });
        let Ok((channel, returns, confirms)) = session else {
            continue;
        };
        let mut tag = 0;
        loop {
            match finish.try_recv() {
                Ok(()) => finishing = true,
                Err(TryRecvError::Disconnected) if !finishing => return,
                Err(_) => {}
            }
            tag += 1;
            report.publishes += 1;
            let sent = Instant::now();
            let unsettled = match send(&channel, exchange, n, finishing) {
                Err(_) => Some(Unsettled::Lost),
                Ok(()) => settle(&confirms, &returns, tag, n, &mut report),
            };
            match unsettled {
                None => {
                    report.slowest_confirm = report.slowest_confirm.max(sent.elapsed());
                    confirmed.store(n + 1, Ordering::Relaxed);
                    if finishing {
                        report.last = n;
                        let _ = done.send(report);
                        let _ = connection.close();
                        return;
                    }
                    n += 1;
                    // Pacing, not waiting for a condition: at most one event per tick.
                    let _ = pace.recv();
                }
                Some(Unsettled::Again) => {
                    report.resent.insert(n);
                }
                Some(Unsettled::Lost) => {
                    report.resent.insert(n);
                    break;
                }
            }
        }
    }
}

fn send(channel: &Channel, exchange: &str, n: u64, last: bool) -> amiquip::Result<()> {
    let body = serde_json::to_vec(&json!({"n": n, "last": last})).expect("JSON");
    let properties = AmqpProperties::default().with_message_id(format!("n-{n}"));
    channel.basic_publish(
        exchange,
        Publish {
            body: &body,
            routing_key: key("A", "new_example"),
            // Unroutable is not stored: have it returned rather than silently confirmed.
            mandatory: true,
            immediate: false,
            properties,
        },
    )
}

/// Waits for the broker to settle publish `tag` (`n`): `None` when it is stored.
fn settle(
    confirms: &Receiver<Confirm>,
    returns: &Receiver<Return>,
    tag: u64,
    n: u64,
    report: &mut PublishReport,
) -> Option<Unsettled> {
    let covers = |payload: &ConfirmPayload| {
        payload.delivery_tag == tag || (payload.multiple && payload.delivery_tag > tag)
    };
    let id = format!("n-{n}");
    let deadline = Instant::now() + CONFIRM_TIMEOUT;
    let mut returned = false;
    loop {
        crossbeam_channel::select! {
            recv(returns) -> message => match message {
                Ok(message) => {
                    // A late return of an earlier send of another number is not ours.
                    if message.properties.message_id().as_deref() == Some(id.as_str()) {
                        returned = true;
                        report.returns += 1;
                    }
                }
                Err(_) => return Some(Unsettled::Lost),
            },
            recv(confirms) -> confirm => match confirm {
                Ok(Confirm::Ack(payload)) if covers(&payload) => {
                    return returned.then_some(Unsettled::Again);
                }
                Ok(Confirm::Nack(payload)) if covers(&payload) => {
                    report.nacks += 1;
                    return Some(Unsettled::Again);
                }
                // A late confirm of an earlier send.
                Ok(_) => {}
                Err(_) => return Some(Unsettled::Lost),
            },
            default(deadline.saturating_duration_since(Instant::now())) => {
                report.timeouts += 1;
                return Some(Unsettled::Again);
            }
        }
    }
}

/// A connection to the first node that answers, in order, with `TCP_NODELAY` (as the bridge's
/// own connections: without it each publish waits out the ack of the previous one). Retries
/// for [`OUTAGE_DEADLINE`]; `None` when told to stop meanwhile (a request to finish is noted in
/// `finishing`).
fn connect(ports: &[u16], finish: &Receiver<()>, finishing: &mut bool) -> Option<(Connection, u16)> {
    let started = Instant::now();
    loop {
        let mut errors = Vec::new();
        for (node, port) in (1..).zip(ports) {
            let addr = SocketAddr::from(([127, 0, 0, 1], *port));
            let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).and_then(|stream| {
                stream.set_nodelay(true)?;
                stream.set_nonblocking(true)?;
                mio::net::TcpStream::from_stream(stream)
            });
            let opened = match stream {
                Ok(stream) => {
                    let options =
                        ConnectionOptions::<Auth>::default().connection_timeout(Some(Duration::from_secs(5)));
                    Connection::insecure_open_stream(stream, options, ConnectionTuning::default())
                        .map_err(|error| error.to_string())
                }
                Err(error) => Err(error.to_string()),
            };
            match opened {
                Ok(connection) => return Some((connection, node)),
                Err(error) => errors.push(format!("node {node}: {error}")),
            }
        }
        assert!(
            started.elapsed() < OUTAGE_DEADLINE,
            "the desktop app reached no node for {OUTAGE_DEADLINE:?}: {errors:?}"
        );
        // A short pause between rounds, cut short when the test ends.
        match finish.recv_timeout(Duration::from_millis(100)) {
            Ok(()) => *finishing = true,
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) if !*finishing => return None,
            Err(_) => {}
        }
    }
}
