//! deskbridge load benchmark: the same workloads against deskbridge and RabbitMQ Web-STOMP, on
//! the same broker, in one run. See `docs/PERFORMANCE.md` for how to run it and what it found.
//!
//! Scenarios (each prints one JSON line and a readable row):
//! - `fanout`: N browsers subscribed to desk A; one AMQP publisher sends M messages
//!   (`A_new_example`, ~150-byte JSON carrying a send timestamp), unpaced.
//! - `paced`: the same at a fixed rate (default 100 msg/s).
//! - `ingest`: N browsers each publish K messages with up to W unacknowledged; an AMQP consumer
//!   counts arrivals.
//! - `idle`: N idle subscribed sessions; the server's RSS per session.
//! - `request` (not in the default list): N browsers each keep up to W requests in flight to a
//!   desktop responder (amiquip) that answers to `reply_to` with the request's `correlation_id`;
//!   round trips per second and round-trip latency. Web-STOMP sends with
//!   `reply-to:/temp-queue/r`: RabbitMQ (3.10) gives the AMQP consumer the temp queue's own
//!   name as `reply_to` (`amq.gen-…`); the responder (`common::desktop::Responder`, the one the
//!   tests use) publishes to it on the default exchange.
//! - `slow`: (deskbridge only) fast readers plus one browser that never reads, under a stream of
//!   large events: the bridge's RSS stays bounded and the slow one is closed with 1013.
//! - `history`, `recovery`, `storm`, `instances`, `burst` (not in the default list): history on
//!   RabbitMQ streams (#10), in [`history`].
//!
//! Target `deskbridge-history` runs any scenario against a bridge with `[history]` on (its own
//! exchanges and a stream prefix of its own, deleted when it stops).
//!
//! Every loop is bounded (counts and deadlines) and every address must be on loopback.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use amiquip::{AmqpProperties, Connection, ConsumerMessage, Publish};
use clap::{Parser, ValueEnum};
use deskbridge::config::Config;
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::MaybeTlsStream;

#[path = "../../tests/common/mod.rs"]
mod common;
mod history;

use common::amqp::{consume_unacked, declare_direct_exchange, private_queue};
use common::browser::{small_receive_buffer, ws_url, Ws};
use common::http::try_http_get;
use common::process::BridgeProcess;

/// Longest silence before a receiver gives up and counts the rest as lost.
const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Interval of STOMP client heart-beats (Web-STOMP drops clients silent for too long).
const STOMP_HEARTBEAT: Duration = Duration::from_secs(10);

#[derive(Parser, Debug, Clone)]
#[command(about = "Load benchmark: deskbridge vs RabbitMQ Web-STOMP")]
struct Args {
    /// Scenarios to run.
    #[arg(long, value_delimiter = ',', default_value = "fanout,paced,ingest,idle")]
    scenario: Vec<Scenario>,
    /// Systems to drive.
    #[arg(long, value_delimiter = ',', default_value = "deskbridge,stomp")]
    target: Vec<Target>,
    /// Broker for both systems (the private bench node: scripts/bench-broker.sh).
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5673/%2f")]
    amqp_url: String,
    /// Web-STOMP endpoint of the same broker.
    #[arg(long, default_value = "ws://127.0.0.1:15684/ws")]
    stomp_url: String,
    /// deskbridge binary to start for each scenario.
    #[arg(long, default_value = "target/release/deskbridge")]
    bridge_bin: String,
    /// deskbridge's `workers` (HTTP/WebSocket threads); 0 = one per core.
    #[arg(long, default_value_t = 0)]
    bridge_workers: usize,
    /// OS pid of the broker, for its CPU seconds and RSS.
    #[arg(long)]
    broker_pid: Option<u32>,
    /// Subscriber counts for `fanout`.
    #[arg(long, value_delimiter = ',', default_value = "200,1000")]
    subscribers: Vec<usize>,
    /// Messages per `fanout` run.
    #[arg(long, default_value_t = 500)]
    messages: usize,
    /// Subscribers for `paced`.
    #[arg(long, default_value_t = 200)]
    paced_subscribers: usize,
    /// Messages per second for `paced`.
    #[arg(long, default_value_t = 100)]
    rate: u64,
    /// Seconds of `paced` traffic.
    #[arg(long, default_value_t = 10)]
    paced_seconds: u64,
    /// Publishing clients for `ingest`.
    #[arg(long, default_value_t = 50)]
    ingest_clients: usize,
    /// Messages per client for `ingest`.
    #[arg(long, default_value_t = 400)]
    per_client: usize,
    /// Unacknowledged publishes per client for `ingest`.
    #[arg(long, default_value_t = 64)]
    window: usize,
    /// Sessions for `idle`.
    #[arg(long, default_value_t = 5000)]
    idle_sessions: usize,
    /// Messages of `slow`.
    #[arg(long, default_value_t = 4000)]
    slow_messages: usize,
    /// Size of each `slow` event, KiB.
    #[arg(long, default_value_t = 16)]
    slow_event_kib: usize,
    /// Messages per second of `slow` (the fast readers must keep up).
    #[arg(long, default_value_t = 400)]
    slow_rate: u64,
    /// Requesting clients for `request`.
    #[arg(long, default_value_t = 50)]
    request_clients: usize,
    /// Requests per client for `request`.
    #[arg(long, default_value_t = 400)]
    requests_per_client: usize,
    /// Requests in flight per client for `request`.
    #[arg(long, default_value_t = 8)]
    request_window: usize,
    /// WebSocket handshakes per auth mode for `handshake`.
    #[arg(long, default_value_t = 4000)]
    handshakes: usize,
    /// Concurrent clients for `handshake`.
    #[arg(long, default_value_t = 20)]
    handshake_clients: usize,
    /// Subscribers of the `history` fan-out (history off, on, and Web-STOMP).
    #[arg(long, default_value_t = 200)]
    history_subscribers: usize,
    /// Missed events one browser resumes in `recovery`.
    #[arg(long, default_value_t = 10_000)]
    recovery_events: usize,
    /// Browsers that resume at once in `storm`.
    #[arg(long, default_value_t = 1000)]
    storm_browsers: usize,
    /// Missed events each `storm` browser resumes.
    #[arg(long, default_value_t = 1000)]
    storm_events: usize,
    /// Browsers on each of the two bridges of `instances` (they get `--messages` events).
    #[arg(long, default_value_t = 500)]
    instance_browsers: usize,
    /// Subscribers of `burst`.
    #[arg(long, default_value_t = 200)]
    burst_subscribers: usize,
    /// Events of the `burst`, published before anybody reads.
    #[arg(long, default_value_t = 5000)]
    burst_events: usize,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, ValueEnum)]
enum Scenario {
    Fanout,
    Paced,
    Ingest,
    Idle,
    Slow,
    Handshake,
    Request,
    History,
    Recovery,
    Storm,
    Instances,
    Burst,
}

#[derive(Debug, Clone, Copy, PartialEq, ValueEnum)]
enum Target {
    Deskbridge,
    /// deskbridge with `[history]` on.
    DeskbridgeHistory,
    Stomp,
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::Deskbridge => "deskbridge",
            Target::DeskbridgeHistory => "deskbridge+history",
            Target::Stomp => "web-stomp",
        }
    }

    fn names(self) -> &'static Names {
        match self {
            Target::Deskbridge => &BRIDGE_NAMES,
            Target::DeskbridgeHistory => &history::NAMES,
            Target::Stomp => &STOMP_NAMES,
        }
    }
}

/// Exchange names per target, so the two never see each other's traffic.
struct Names {
    inbound: &'static str,
    outbound: &'static str,
}

const BRIDGE_NAMES: Names = Names {
    inbound: "bench.bridge.in",
    outbound: "bench.bridge.out",
};
const STOMP_NAMES: Names = Names {
    inbound: "bench.stomp.in",
    outbound: "bench.stomp.out",
};

// ---------------------------------------------------------------------------------------------
// Process accounting

/// CPU seconds (user + system) of a process.
fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return f64::NAN;
    };
    // Fields after the command (which may contain spaces) start after the last ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    (ticks(11) + ticks(12)) / 100.0 // utime, stime; USER_HZ is 100 on Linux
}

/// Resident set size in KiB.
fn rss_kib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).map(String::from))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        .unwrap_or(f64::NAN)
}

/// CPU microseconds per item (two decimals): what `seconds` of CPU cost each of `count`;
/// NaN (JSON `null`) for a process not measured or nothing counted.
fn micros_each(seconds: f64, count: usize) -> f64 {
    if count == 0 {
        return f64::NAN;
    }
    (seconds * 1e6 / count as f64 * 100.0).round() / 100.0
}

struct CpuMeter {
    bridge: Option<u32>,
    broker: Option<u32>,
    start: (f64, f64),
}

impl CpuMeter {
    fn start(bridge: Option<u32>, broker: Option<u32>) -> CpuMeter {
        let read = |pid: Option<u32>| pid.map_or(f64::NAN, cpu_seconds);
        CpuMeter {
            bridge,
            broker,
            start: (read(bridge), read(broker)),
        }
    }

    fn stop(&self) -> (f64, f64) {
        let read = |pid: Option<u32>| pid.map_or(f64::NAN, cpu_seconds);
        (read(self.bridge) - self.start.0, read(self.broker) - self.start.1)
    }
}

// ---------------------------------------------------------------------------------------------
// deskbridge process

/// deskbridge as the bench runs it: on the bench broker, with `BRIDGE_NAMES`.
fn bridge_config(args: &Args) -> Config {
    let mut config = Config {
        bind: "127.0.0.1:0".into(),
        workers: args.bridge_workers,
        ..Config::default()
    };
    config.amqp.urls = vec![common::url(&args.amqp_url)];
    config.amqp.inbound_exchange = BRIDGE_NAMES.inbound.into();
    config.amqp.inbound_queue = "bench.bridge.listener".into();
    config.amqp.outbound_exchange = BRIDGE_NAMES.outbound.into();
    // Every bench client comes from loopback: one address may hold all of them.
    config.ws.max_sessions_per_ip = config.ws.max_sessions;
    config
}

/// A deskbridge the bench started. Stopping it (or dropping it, when a run fails) stops the
/// process, then, once no other bridge of the bench shares them, deletes its desk streams.
struct Bridge {
    process: Option<BridgeProcess>,
    /// The desk streams of a bridge with `[history]` on, shared with other instances.
    streams: Option<Arc<history::Streams>>,
}

impl Bridge {
    /// SIGTERM, up to 15 s for the graceful exit, then the clean-up (see `Drop`).
    fn stop(self) {
        drop(self);
    }
}

impl std::ops::Deref for Bridge {
    type Target = BridgeProcess;

    fn deref(&self) -> &BridgeProcess {
        // `process` is taken only in `drop`.
        self.process.as_ref().expect("the bridge runs until dropped")
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        if let Some(process) = self.process.take() {
            process.stop();
        }
        self.streams.take(); // the last bridge of a stream prefix deletes its streams
    }
}

/// Starts `args.bridge_bin` on `config` and waits until both its AMQP links are up.
async fn launch_bridge(args: &Args, config: &Config) -> BridgeProcess {
    let bridge = BridgeProcess::launch(&args.bridge_bin, config).unwrap_or_else(|e| {
        panic!(
            "cannot start {} ({e}); build it with `cargo build --release`",
            args.bridge_bin
        )
    });
    bridge.wait_healthy(Duration::from_secs(30)).await;
    bridge
}

/// A fresh deskbridge with `bridge_config`.
async fn start_bridge(args: &Args) -> Bridge {
    Bridge {
        process: Some(launch_bridge(args, &bridge_config(args)).await),
        streams: None,
    }
}

/// What a scenario runs against: a fresh deskbridge for a deskbridge run; for a Web-STOMP run
/// none, and with `subscribers` the exchange their subscriptions bind to is declared first.
async fn start_target(target: Target, args: &Args, subscribers: bool) -> Option<Bridge> {
    match target {
        Target::Deskbridge => Some(start_bridge(args).await),
        Target::DeskbridgeHistory => Some(history::start_bridge(args, &history::Streams::new(args)).await),
        Target::Stomp => {
            if subscribers {
                declare_exchange(&args.amqp_url, STOMP_NAMES.inbound);
            }
            None
        }
    }
}

/// Waits (30 s at most, then measures anyway) until the bridge's `/health` counts `sessions`.
async fn settle_sessions(addr: SocketAddr, sessions: usize) {
    let wanted = format!("\"sessions\":{sessions}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let health = try_http_get(addr, "/health").await.unwrap_or_default().1;
        if health.contains(&wanted) || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Clients: the same operations over deskbridge's protocol and over STOMP.

enum Client {
    Bridge(Ws),
    Stomp {
        ws: Ws,
        heartbeat: tokio::time::Interval,
    },
}

/// What a client received.
enum Inbound {
    /// An event/MESSAGE body.
    Event(String),
    /// An ack/RECEIPT for this reference.
    Ack(u64),
    /// The answer to the request with this reference (deskbridge `reply`, or a STOMP MESSAGE
    /// carrying `correlation-id`).
    Reply(u64),
    /// An error for this reference (deskbridge `error`; a STOMP ERROR has none: `u64::MAX`).
    Error(u64),
    Other,
}

impl Client {
    async fn connect(target: Target, args: &Args, bridge: Option<&BridgeProcess>) -> Client {
        match target {
            Target::Deskbridge | Target::DeskbridgeHistory => {
                let url = ws_url(bridge.expect("bridge running").addr);
                let (mut ws, _) = tokio_tungstenite::connect_async(url).await.expect("ws connect");
                let welcome = next_text(&mut ws).await.expect("welcome");
                assert!(welcome.contains("\"welcome\""), "{welcome}");
                Client::Bridge(ws)
            }
            Target::Stomp => {
                let (mut ws, _) = tokio_tungstenite::connect_async(args.stomp_url.as_str())
                    .await
                    .expect("stomp connect");
                let beat = STOMP_HEARTBEAT.as_millis();
                let connect = format!(
                    "CONNECT\naccept-version:1.2\nhost:/\nlogin:guest\npasscode:guest\nheart-beat:{beat},0\n\n\0"
                );
                ws.send(Message::Text(connect)).await.expect("send CONNECT");
                let reply = next_text(&mut ws).await.expect("CONNECTED");
                assert!(reply.starts_with("CONNECTED"), "{reply}");
                let mut heartbeat = tokio::time::interval(STOMP_HEARTBEAT);
                heartbeat.tick().await;
                Client::Stomp { ws, heartbeat }
            }
        }
    }

    async fn subscribe(&mut self) {
        match self {
            Client::Bridge(ws) => {
                ws.send(Message::Text(r#"{"op":"subscribe","desks":["A"]}"#.into()))
                    .await
                    .expect("send");
                let reply = next_text(ws).await.expect("subscribed");
                assert!(reply.contains("subscribed"), "{reply}");
            }
            Client::Stomp { ws, .. } => {
                let frame = format!(
                    "SUBSCRIBE\nid:0\ndestination:/exchange/{}/A_new_example\nack:auto\nreceipt:sub\n\n\0",
                    STOMP_NAMES.inbound
                );
                ws.send(Message::Text(frame)).await.expect("send SUBSCRIBE");
                let reply = next_text(ws).await.expect("RECEIPT");
                assert!(reply.starts_with("RECEIPT"), "{reply}");
            }
        }
    }

    /// Queues a publish (not flushed; call `flush`).
    async fn feed_publish(&mut self, reference: u64, body: &str) {
        match self {
            Client::Bridge(ws) => {
                let frame = format!(
                    r#"{{"op":"publish","desk":"A","event":"new_example","data":{body},"ref":"{reference}"}}"#
                );
                ws.feed(Message::Text(frame)).await.expect("feed");
            }
            Client::Stomp { ws, .. } => {
                let frame = format!(
                    "SEND\ndestination:/exchange/{}/A_new_example\ncontent-type:application/json\npersistent:true\nreceipt:{reference}\n\n{body}\0",
                    STOMP_NAMES.outbound
                );
                ws.feed(Message::Text(frame)).await.expect("feed");
            }
        }
    }

    /// Queues a request whose answer comes back as `Inbound::Reply(reference)` (not flushed).
    async fn feed_request(&mut self, reference: u64, body: &str) {
        match self {
            Client::Bridge(ws) => {
                let frame = format!(
                    r#"{{"op":"request","desk":"A","event":"new_example","data":{body},"ref":"{reference}","timeout_ms":10000}}"#
                );
                ws.feed(Message::Text(frame)).await.expect("feed");
            }
            Client::Stomp { ws, .. } => {
                let frame = format!(
                    "SEND\ndestination:/exchange/{}/A_new_example\ncontent-type:application/json\nreply-to:/temp-queue/r\ncorrelation-id:{reference}\n\n{body}\0",
                    STOMP_NAMES.outbound
                );
                ws.feed(Message::Text(frame)).await.expect("feed");
            }
        }
    }

    async fn flush(&mut self) {
        match self {
            Client::Bridge(ws) | Client::Stomp { ws, .. } => ws.flush().await.expect("flush"),
        }
    }

    /// The next frame, or `None` after `IDLE_TIMEOUT` of silence or when the socket closed.
    async fn next(&mut self) -> Option<Inbound> {
        loop {
            match self {
                Client::Bridge(ws) => {
                    let text = tokio::time::timeout(IDLE_TIMEOUT, next_text(ws)).await.ok()??;
                    return Some(if text.starts_with(r#"{"op":"event""#) {
                        Inbound::Event(text)
                    } else if text.starts_with(r#"{"op":"ack""#) {
                        Inbound::Ack(field_u64(&text, "\"ref\":\"").unwrap_or(u64::MAX))
                    } else if text.starts_with(r#"{"op":"reply""#) {
                        Inbound::Reply(field_u64(&text, "\"ref\":\"").unwrap_or(u64::MAX))
                    } else if text.starts_with(r#"{"op":"error""#) {
                        Inbound::Error(field_u64(&text, "\"ref\":\"").unwrap_or(u64::MAX))
                    } else {
                        Inbound::Other
                    });
                }
                Client::Stomp { ws, heartbeat } => {
                    let text = tokio::select! {
                        text = tokio::time::timeout(IDLE_TIMEOUT, next_text(ws)) => text.ok()??,
                        _ = heartbeat.tick() => {
                            ws.send(Message::Text("\n".into())).await.ok()?;
                            continue;
                        }
                    };
                    return Some(if text.starts_with("MESSAGE") {
                        let headers = text.split_once("\n\n").map_or(text.as_str(), |(h, _)| h);
                        match field_u64(headers, "\ncorrelation-id:") {
                            Some(reference) => Inbound::Reply(reference),
                            None => Inbound::Event(text),
                        }
                    } else if text.starts_with("RECEIPT") {
                        Inbound::Ack(field_u64(&text, "receipt-id:").unwrap_or(u64::MAX))
                    } else if text.starts_with("ERROR") {
                        Inbound::Error(u64::MAX)
                    } else {
                        Inbound::Other
                    });
                }
            }
        }
    }
}

/// The next text frame; `None` when the socket closed.
async fn next_text(ws: &mut Ws) -> Option<String> {
    loop {
        match ws.next().await? {
            Ok(Message::Text(text)) => {
                if text.trim().is_empty() {
                    continue; // a STOMP heart-beat
                }
                return Some(text);
            }
            Ok(Message::Close(_)) | Err(_) => return None,
            Ok(_) => continue,
        }
    }
}

/// The unsigned number right after `marker` in `text` (no full JSON parse on the hot path,
/// so both targets pay the same small client cost).
fn field_u64(text: &str, marker: &str) -> Option<u64> {
    let start = text.find(marker)? + marker.len();
    let digits: &str = &text[start..];
    let end = digits.find(|c: char| !c.is_ascii_digit()).unwrap_or(digits.len());
    digits[..end].parse().ok()
}

/// A ~150-byte JSON body carrying its sequence number and send time (µs since `epoch`).
fn body(seq: u64, epoch: Instant) -> String {
    let t = epoch.elapsed().as_micros();
    format!(
        r#"{{"seq":{seq},"t":{t},"bond":"XS0123456789","side":"bid","px":101.255,"qty":5000000,"trader":"desk-a-07","venue":"BBG"}}"#
    )
}

// ---------------------------------------------------------------------------------------------
// The desktop side (amiquip, blocking, on its own threads)

/// A connection to the bench broker, or a failure saying how to start it.
fn bench_broker(url: &str) -> Connection {
    common::amqp::connect(url, "Start the bench broker with scripts/bench-broker.sh start.")
}

fn declare_exchange(url: &str, name: &str) {
    let mut connection = bench_broker(url);
    let channel = connection.open_channel(None).expect("channel");
    declare_direct_exchange(&channel, name);
    let _ = connection.close();
}

/// Sleeps until message `seq` is due at `rate` per second from `first` (0 = unpaced: no wait).
fn wait_until_due(first: Instant, seq: u64, rate: u64) {
    if let Some(offset) = (seq * 1_000_000).checked_div(rate) {
        let due = first + Duration::from_micros(offset);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
}

/// Publishes `count` bodies to `exchange` at `rate` per second (0 = unpaced). Returns the
/// instant of the first publish.
fn desktop_publish(url: &str, exchange: &str, count: usize, rate: u64, epoch: Instant) -> Instant {
    let mut connection = bench_broker(url);
    let channel = connection.open_channel(None).expect("channel");
    let first = Instant::now();
    for seq in 0..count as u64 {
        wait_until_due(first, seq, rate);
        let payload = body(seq, epoch);
        let props = AmqpProperties::default().with_content_type("application/json".into());
        channel
            .basic_publish(
                exchange,
                Publish::with_properties(payload.as_bytes(), "A_new_example", props),
            )
            .expect("publish");
    }
    let _ = connection.close();
    first
}

/// Counts messages arriving on `exchange` with `A_new_example` until `expected` or 10 s of silence.
fn desktop_counter(
    url: &str,
    exchange: &str,
) -> (
    std::sync::mpsc::Receiver<()>,
    std::thread::JoinHandle<usize>,
    Arc<AtomicUsize>,
) {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let expected = Arc::new(AtomicUsize::new(usize::MAX));
    let want = Arc::clone(&expected);
    let url = url.to_string();
    let exchange = exchange.to_string();
    let thread = std::thread::spawn(move || {
        let mut connection = bench_broker(&url);
        let channel = connection.open_channel(None).expect("channel");
        let queue = private_queue(&channel, &exchange, &["A_new_example"]);
        let consumer = consume_unacked(&queue);
        let _ = ready_tx.send(());
        let mut count = 0;
        while count < want.load(Ordering::Acquire) {
            match consumer.receiver().recv_timeout(IDLE_TIMEOUT) {
                Ok(ConsumerMessage::Delivery(_)) => count += 1,
                _ => break,
            }
        }
        let _ = connection.close();
        count
    });
    (ready_rx, thread, expected)
}

// ---------------------------------------------------------------------------------------------
// Scenarios

#[derive(Default)]
struct Receipt {
    received: usize,
    duplicated: usize,
    last: Option<Instant>,
    latencies: Option<Histogram<u64>>,
    /// (latency µs, seq) of the slowest delivery, to tell warm-up from steady-state tails.
    slowest: (u64, u64),
}

impl Receipt {
    fn new() -> Receipt {
        Receipt {
            latencies: Some(histogram()),
            ..Default::default()
        }
    }

    /// Counts one delivery of `seq`, sent at `sent` and received at `now` (µs since the epoch).
    fn record(&mut self, seen: &mut [bool], seq: u64, sent: u64, now: u64) {
        match seen.get_mut(seq as usize) {
            Some(flag) if *flag => self.duplicated += 1,
            Some(flag) => {
                *flag = true;
                self.received += 1;
            }
            None => {}
        }
        let latency = now.saturating_sub(sent).max(1);
        if let Some(h) = self.latencies.as_mut() {
            let _ = h.record(latency);
        }
        self.slowest = self.slowest.max((latency, seq));
        self.last = Some(Instant::now());
    }

    /// Adds one subscriber's receipt to the total.
    fn add(&mut self, one: Receipt) {
        self.received += one.received;
        self.duplicated += one.duplicated;
        self.last = self.last.max(one.last);
        self.slowest = self.slowest.max(one.slowest);
        if let (Some(all), Some(one)) = (self.latencies.as_mut(), one.latencies.as_ref()) {
            let _ = all.add(one);
        }
    }
}

fn histogram() -> Histogram<u64> {
    // 1 µs .. 120 s, 3 significant digits.
    Histogram::new_with_bounds(1, 120_000_000, 3).expect("valid histogram bounds")
}

/// p50, p99, p999 and max of `h` (µs) in milliseconds, as the JSON rows report them.
fn latency_ms(h: &Histogram<u64>) -> serde_json::Value {
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    json!({"p50": ms(0.5), "p99": ms(0.99), "p999": ms(0.999), "max": h.max() as f64 / 1000.0})
}

async fn connect_many(
    target: Target,
    args: &Args,
    bridge: Option<&BridgeProcess>,
    count: usize,
    subscribe: bool,
) -> Vec<Client> {
    let mut clients = Vec::with_capacity(count);
    let mut pending = futures_util::stream::iter(0..count)
        .map(|_| async move {
            let mut client = Client::connect(target, args, bridge).await;
            if subscribe {
                client.subscribe().await;
            }
            client
        })
        .buffer_unordered(64);
    while let Some(client) = pending.next().await {
        clients.push(client);
    }
    clients
}

/// One subscriber of a fan-out: reads until it has all `messages` or the stream goes quiet.
async fn receive_fanout(mut client: Client, messages: usize, epoch: Instant) -> Receipt {
    let mut receipt = Receipt::new();
    let mut seen = vec![false; messages];
    while receipt.received < messages {
        let Some(Inbound::Event(text)) = client.next().await else {
            break;
        };
        let now = epoch.elapsed().as_micros() as u64;
        let (Some(seq), Some(sent)) = (field_u64(&text, "\"seq\":"), field_u64(&text, "\"t\":")) else {
            continue;
        };
        receipt.record(&mut seen, seq, sent, now);
    }
    drop(client);
    receipt
}

/// Runs one fan-out: `subscribers` clients, `messages` messages at `rate` (0 = unpaced).
async fn fanout(
    target: Target,
    args: &Args,
    subscribers: usize,
    messages: usize,
    rate: u64,
) -> serde_json::Value {
    let bridge = start_target(target, args, true).await;
    let clients = connect_many(target, args, bridge.as_deref(), subscribers, true).await;
    let epoch = Instant::now();
    let meter = CpuMeter::start(bridge.as_deref().map(BridgeProcess::pid), args.broker_pid);
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|client| tokio::spawn(receive_fanout(client, messages, epoch)))
        .collect();
    let url = args.amqp_url.clone();
    let exchange = target.names().inbound.to_string();
    let first = tokio::task::spawn_blocking(move || desktop_publish(&url, &exchange, messages, rate, epoch))
        .await
        .expect("publisher");
    let mut total = Receipt::new();
    for task in tasks {
        total.add(task.await.expect("receiver"));
    }
    let (bridge_cpu, broker_cpu) = meter.stop();
    if let Some(bridge) = bridge {
        bridge.stop();
    }
    let expected = subscribers * messages;
    let seconds = total
        .last
        .map_or(f64::NAN, |last| last.duration_since(first).as_secs_f64());
    let h = total.latencies.unwrap_or_else(histogram);
    json!({
        "scenario": if rate > 0 { "paced" } else { "fanout" },
        "target": target.name(),
        "subscribers": subscribers,
        "messages": messages,
        "rate_per_s": rate,
        "deliveries": total.received,
        "deliveries_per_s": (total.received as f64 / seconds).round(),
        "latency_ms": latency_ms(&h),
        "lost": expected - total.received,
        "duplicated": total.duplicated,
        "slowest_seq": total.slowest.1,
        "seconds": seconds,
        "cpu_seconds": {"bridge": bridge_cpu, "broker": broker_cpu},
        "bridge_cpu_us_per_delivery": micros_each(bridge_cpu, total.received),
        "broker_cpu_us_per_delivery": micros_each(broker_cpu, total.received),
    })
}

/// One `ingest` client: publishes `per_client` messages with up to `window` unacknowledged.
/// Returns (acked, when the last ack came, ack latencies).
async fn publish_windowed(
    mut client: Client,
    per_client: usize,
    window: usize,
    epoch: Instant,
) -> (usize, Option<Instant>, Histogram<u64>) {
    let mut h = histogram();
    let mut in_flight: VecDeque<(u64, Instant)> = VecDeque::new();
    let (mut sent, mut acked, mut last) = (0usize, 0usize, None);
    while acked < per_client {
        while sent < per_client && in_flight.len() < window {
            client.feed_publish(sent as u64, &body(sent as u64, epoch)).await;
            in_flight.push_back((sent as u64, Instant::now()));
            sent += 1;
        }
        client.flush().await;
        match client.next().await {
            Some(Inbound::Ack(reference)) => {
                // Acks come in publish order for both systems; tolerate otherwise.
                if let Some(pos) = in_flight.iter().position(|(r, _)| *r == reference) {
                    if let Some((_, at)) = in_flight.remove(pos) {
                        let _ = h.record((at.elapsed().as_micros() as u64).max(1));
                    }
                }
                acked += 1;
                last = Some(Instant::now());
            }
            Some(_) => {}
            None => break,
        }
    }
    (acked, last, h)
}

async fn ingest(target: Target, args: &Args) -> serde_json::Value {
    let bridge = start_target(target, args, false).await;
    let (ready, counter, expected) = desktop_counter(&args.amqp_url, target.names().outbound);
    ready
        .recv_timeout(Duration::from_secs(20))
        .expect("counter ready");
    let clients = connect_many(target, args, bridge.as_deref(), args.ingest_clients, false).await;
    let (per_client, window) = (args.per_client, args.window);
    let epoch = Instant::now();
    let meter = CpuMeter::start(bridge.as_deref().map(BridgeProcess::pid), args.broker_pid);
    let first = Instant::now();
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|client| tokio::spawn(publish_windowed(client, per_client, window, epoch)))
        .collect();
    let mut h = histogram();
    let (mut acked, mut last) = (0, None);
    for task in tasks {
        let (a, l, one) = task.await.expect("publisher task");
        acked += a;
        last = last.max(l);
        let _ = h.add(&one);
    }
    let total = args.ingest_clients * per_client;
    expected.store(total, Ordering::Release);
    let arrived = tokio::task::spawn_blocking(move || counter.join().expect("counter"))
        .await
        .expect("join");
    let (bridge_cpu, broker_cpu) = meter.stop();
    if let Some(bridge) = bridge {
        bridge.stop();
    }
    let seconds = last.map_or(f64::NAN, |l: Instant| l.duration_since(first).as_secs_f64());
    json!({
        "scenario": "ingest",
        "target": target.name(),
        "clients": args.ingest_clients,
        "per_client": per_client,
        "window": window,
        "acked": acked,
        "acked_per_s": (acked as f64 / seconds).round(),
        "ack_latency_ms": latency_ms(&h),
        "arrived": arrived,
        "lost": acked.saturating_sub(arrived),
        "unacked": total - acked,
        "seconds": seconds,
        "cpu_seconds": {"bridge": bridge_cpu, "broker": broker_cpu},
        "bridge_cpu_us_per_ack": micros_each(bridge_cpu, acked),
        "broker_cpu_us_per_ack": micros_each(broker_cpu, acked),
    })
}

/// One `request` client: sends `count` requests with up to `window` unanswered.
/// Returns (answered, errors, when the last answer came, round-trip latencies).
async fn request_windowed(
    mut client: Client,
    count: usize,
    window: usize,
    epoch: Instant,
) -> (usize, usize, Option<Instant>, Histogram<u64>) {
    let mut h = histogram();
    let mut in_flight: VecDeque<(u64, Instant)> = VecDeque::new();
    let (mut sent, mut answered, mut errors, mut last) = (0usize, 0usize, 0usize, None);
    while answered + errors < count {
        while sent < count && in_flight.len() < window {
            client.feed_request(sent as u64, &body(sent as u64, epoch)).await;
            in_flight.push_back((sent as u64, Instant::now()));
            sent += 1;
        }
        client.flush().await;
        let (reference, ok) = match client.next().await {
            Some(Inbound::Reply(reference)) => (reference, true),
            Some(Inbound::Error(reference)) => (reference, false),
            Some(_) => continue,
            None => break,
        };
        // Answers may overtake each other; match them by reference.
        let Some(pos) = in_flight.iter().position(|(r, _)| *r == reference) else {
            if !ok {
                errors += 1; // an error without a reference (STOMP ERROR): the session is over
                break;
            }
            continue;
        };
        if let Some((_, at)) = in_flight.remove(pos) {
            if ok {
                let _ = h.record((at.elapsed().as_micros() as u64).max(1));
                answered += 1;
                last = Some(Instant::now());
            } else {
                errors += 1;
            }
        }
    }
    (answered, errors, last, h)
}

async fn request(target: Target, args: &Args) -> serde_json::Value {
    let bridge = start_target(target, args, false).await;
    // A desktop service echoing each request's body; it counts what it answered and keeps the
    // first `reply_to` (Web-STOMP's temp queue reaches it as a plain `amq.gen-…` name).
    let answered_by_responder = Arc::new(AtomicUsize::new(0));
    let first_reply_to = Arc::new(std::sync::Mutex::new(None::<String>));
    let (count_it, note_it) = (Arc::clone(&answered_by_responder), Arc::clone(&first_reply_to));
    let url = args.amqp_url.clone();
    let exchange = target.names().outbound;
    let responder = tokio::task::spawn_blocking(move || {
        common::desktop::Responder::start_at(&url, exchange, &["A_new_example"], move |request| {
            count_it.fetch_add(1, Ordering::Relaxed);
            if let Ok(mut first) = note_it.lock() {
                first.get_or_insert_with(|| request.properties.reply_to().clone().unwrap_or_default());
            }
            request.body.clone()
        })
    })
    .await
    .expect("responder");
    let clients = connect_many(target, args, bridge.as_deref(), args.request_clients, false).await;
    let (count, window) = (args.requests_per_client, args.request_window.max(1));
    let epoch = Instant::now();
    let meter = CpuMeter::start(bridge.as_deref().map(BridgeProcess::pid), args.broker_pid);
    let first = Instant::now();
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|client| tokio::spawn(request_windowed(client, count, window, epoch)))
        .collect();
    let mut h = histogram();
    let (mut answered, mut errors, mut last) = (0, 0, None);
    for task in tasks {
        let (a, e, l, one) = task.await.expect("request task");
        answered += a;
        errors += e;
        last = last.max(l);
        let _ = h.add(&one);
    }
    let (bridge_cpu, broker_cpu) = meter.stop();
    tokio::task::spawn_blocking(move || drop(responder))
        .await
        .expect("join");
    let responded = answered_by_responder.load(Ordering::Relaxed);
    let reply_to = first_reply_to.lock().ok().and_then(|first| first.clone());
    if let Some(bridge) = bridge {
        bridge.stop();
    }
    let total = args.request_clients * count;
    let seconds = last.map_or(f64::NAN, |l: Instant| l.duration_since(first).as_secs_f64());
    json!({
        "scenario": "request",
        "target": target.name(),
        "clients": args.request_clients,
        "window": window,
        "requests": total,
        "answered": answered,
        "errors": errors,
        "unanswered": total - answered - errors,
        "responder_answered": responded,
        "responder_reply_to": reply_to,
        "round_trips_per_s": (answered as f64 / seconds).round(),
        "latency_ms": latency_ms(&h),
        "seconds": seconds,
        "cpu_seconds": {"bridge": bridge_cpu, "broker": broker_cpu},
    })
}

async fn idle(target: Target, args: &Args) -> serde_json::Value {
    let bridge = start_target(target, args, true).await;
    let server_pid = match target {
        Target::Deskbridge | Target::DeskbridgeHistory => bridge.as_deref().map(BridgeProcess::pid),
        Target::Stomp => args.broker_pid,
    };
    // Warm up allocator and runtime with a few sessions, then measure from there.
    let warm = connect_many(target, args, bridge.as_deref(), 10, true).await;
    let before = server_pid.map_or(f64::NAN, rss_kib);
    let clients = connect_many(target, args, bridge.as_deref(), args.idle_sessions, true).await;
    if let Some(bridge) = &bridge {
        settle_sessions(bridge.addr, args.idle_sessions + 10).await;
    }
    let after = server_pid.map_or(f64::NAN, rss_kib);
    let per_session = (after - before) / args.idle_sessions as f64;
    drop(clients);
    drop(warm);
    if let Some(bridge) = bridge {
        bridge.stop();
    }
    json!({
        "scenario": "idle",
        "target": target.name(),
        "sessions": args.idle_sessions,
        "rss_kib_before": before,
        "rss_kib_after": after,
        "rss_kib_per_session": (per_session * 100.0).round() / 100.0,
    })
}

// ---------------------------------------------------------------------------------------------
// handshake: the cost of verifying tokens

/// How the bridge identifies browsers in a `handshake` run.
#[derive(Debug, Clone, Copy)]
enum Auth {
    None,
    Hs256,
    Rs256,
}

/// Throwaway keys shared with the tests.
const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");
const BENCH_SECRET: &str = "deskbridge-bench-secret";

/// The bridge's config and the `?token=` to connect with, for `auth`.
fn auth_setup(args: &Args, auth: Auth) -> (Config, String, Option<common::process::ConfigFile>) {
    use jsonwebtoken::{Algorithm, EncodingKey, Header};
    let mut config = bridge_config(args);
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
        + 3600;
    let claims = json!({"sub": "bench", "exp": exp, "desks": {"*": ["subscribe", "publish"]}});
    let sign = |algorithm, key: &EncodingKey| {
        let token = jsonwebtoken::encode(&Header::new(algorithm), &claims, key).expect("sign bench token");
        format!("?token={token}")
    };
    match auth {
        Auth::None => (config, String::new(), None),
        Auth::Hs256 => {
            let secret = common::process::ConfigFile::write(BENCH_SECRET);
            config.auth.mode = deskbridge::config::AuthMode::Jwt;
            config.auth.jwt.hs256_secret_file = Some(secret.path().to_path_buf());
            let token = sign(
                Algorithm::HS256,
                &EncodingKey::from_secret(BENCH_SECRET.as_bytes()),
            );
            (config, token, Some(secret))
        }
        Auth::Rs256 => {
            config.auth.mode = deskbridge::config::AuthMode::Jwt;
            config.auth.jwt.public_key_file = Some(format!("{FIXTURES}/rsa_public.pem").into());
            let private = std::fs::read(format!("{FIXTURES}/rsa_private.pem")).expect("bench private key");
            let key = EncodingKey::from_rsa_pem(&private).expect("RSA private key");
            (config, sign(Algorithm::RS256, &key), None)
        }
    }
}

/// `count` handshakes one after another: connect, read the welcome, close.
async fn handshakes(url: String, count: usize) {
    for _ in 0..count {
        let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str())
            .await
            .expect("handshake accepted");
        let welcome = next_text(&mut ws).await.expect("welcome");
        assert!(welcome.contains("\"welcome\""), "{welcome}");
        let _ = ws.close(None).await;
    }
}

/// Handshakes per second and bridge CPU per handshake with `auth`.
async fn handshake(args: &Args, auth: Auth) -> serde_json::Value {
    let (config, token, _secret) = auth_setup(args, auth);
    let bridge = BridgeProcess::launch(&args.bridge_bin, &config).expect("start deskbridge");
    bridge.wait_healthy(Duration::from_secs(30)).await;
    let url = format!("{}{token}", ws_url(bridge.addr));
    handshakes(url.clone(), 50).await; // warm-up
    let clients = args.handshake_clients.max(1);
    let per_client = args.handshakes / clients;
    let cpu = CpuMeter::start(Some(bridge.pid()), None);
    let started = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|_| tokio::spawn(handshakes(url.clone(), per_client)))
        .collect();
    for task in tasks {
        task.await.expect("handshake client");
    }
    let seconds = started.elapsed().as_secs_f64();
    let (bridge_cpu, _) = cpu.stop();
    bridge.stop();
    let total = per_client * clients;
    json!({
        "scenario": "handshake",
        "target": "deskbridge",
        "auth": format!("{auth:?}").to_lowercase(),
        "handshakes": total,
        "seconds": seconds,
        "handshakes_per_s": (total as f64 / seconds).round(),
        "cpu_seconds": {"bridge": bridge_cpu},
        "bridge_cpu_us_per_handshake": (bridge_cpu * 1e6 / total as f64).round(),
    })
}

/// A browser on a tiny receive buffer, subscribed to desk A, that the caller never reads.
async fn sluggish_subscriber(addr: SocketAddr) -> Ws {
    let stream = small_receive_buffer(addr).await;
    let (mut sluggish, _) = tokio_tungstenite::client_async(ws_url(addr), MaybeTlsStream::Plain(stream))
        .await
        .expect("ws");
    let _welcome = next_text(&mut sluggish).await;
    sluggish
        .send(Message::Text(r#"{"op":"subscribe","desks":["A"]}"#.into()))
        .await
        .expect("send");
    let _subscribed = next_text(&mut sluggish).await;
    sluggish
}

/// Events `client` reads, up to `messages` (or until the stream goes quiet).
async fn count_events(mut client: Client, messages: usize) -> usize {
    let mut received = 0;
    while received < messages {
        match client.next().await {
            Some(Inbound::Event(_)) => received += 1,
            Some(_) => {}
            None => break,
        }
    }
    received
}

/// Samples the RSS of `pid` every 20 ms (for `within` at most) until the flag is cleared;
/// the task returns the peak.
fn sample_peak_rss(pid: u32, within: Duration) -> (Arc<AtomicBool>, tokio::task::JoinHandle<f64>) {
    let sampling = Arc::new(AtomicBool::new(true));
    let still = Arc::clone(&sampling);
    let sampler = tokio::spawn(async move {
        let mut peak = 0f64;
        let deadline = Instant::now() + within;
        while still.load(Ordering::Acquire) && Instant::now() < deadline {
            peak = peak.max(rss_kib(pid));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        peak
    });
    (sampling, sampler)
}

/// Publishes `messages` events of `kib` KiB for desk A at `rate` per second (blocking).
fn publish_padded(url: &str, messages: usize, kib: usize, rate: u64) {
    let mut connection = bench_broker(url);
    let channel = connection.open_channel(None).expect("channel");
    let pad = "p".repeat(kib * 1024);
    let first = Instant::now();
    for seq in 0..messages {
        wait_until_due(first, seq as u64, rate);
        let payload = format!(r#"{{"seq":{seq},"pad":"{pad}"}}"#);
        channel
            .basic_publish(
                BRIDGE_NAMES.inbound,
                Publish::new(payload.as_bytes(), "A_new_example"),
            )
            .expect("publish");
    }
    let _ = connection.close();
}

/// How the sluggish browser's session ended: it reads the events already in its socket, then
/// the close frame's (code, reason); `None` without one.
async fn close_of(mut sluggish: Ws) -> Option<(u16, String)> {
    // One deadline for the whole wait: the bridge's pings would reset a per-frame timeout.
    let deadline = tokio::time::Instant::now() + 6 * IDLE_TIMEOUT;
    while let Ok(Some(frame)) = tokio::time::timeout_at(deadline, sluggish.next()).await {
        if let Ok(Message::Close(frame)) = frame {
            return frame.map(|f| (u16::from(f.code), f.reason.to_string()));
        }
    }
    None
}

/// Fast readers and one browser that never reads, under `slow_messages` paced large events:
/// reports the bridge's RSS before, at its peak, and after, and how the slow one ended.
async fn slow(args: &Args) -> serde_json::Value {
    let bridge = start_bridge(args).await;
    let pid = bridge.pid();
    let sluggish = sluggish_subscriber(bridge.addr).await;
    let fast = connect_many(Target::Deskbridge, args, Some(&bridge), 4, true).await;
    let messages = args.slow_messages;
    let before = rss_kib(pid);
    let readers: Vec<_> = fast
        .into_iter()
        .map(|client| tokio::spawn(count_events(client, messages)))
        .collect();
    let (sampling, sampler) = sample_peak_rss(pid, Duration::from_secs(120));
    let url = args.amqp_url.clone();
    let (kib, rate) = (args.slow_event_kib, args.slow_rate);
    tokio::task::spawn_blocking(move || publish_padded(&url, messages, kib, rate))
        .await
        .expect("publisher");
    let mut delivered = Vec::new();
    for reader in readers {
        delivered.push(reader.await.expect("reader"));
    }
    sampling.store(false, Ordering::Release);
    let peak = sampler.await.expect("sampler").max(before);
    let close = close_of(sluggish).await;
    let after = rss_kib(pid);
    bridge.stop();
    json!({
        "scenario": "slow",
        "target": "deskbridge",
        "messages": messages,
        "event_kib": kib,
        "rate_per_s": rate,
        "published_mib": (messages * kib) as f64 / 1024.0,
        "fast_readers_received": delivered,
        "rss_kib_before": before,
        "rss_kib_peak": peak,
        "rss_kib_after": after,
        "slow_close": close,
    })
}

fn loopback_only(args: &Args) {
    for url in [&args.amqp_url, &args.stomp_url] {
        let host = url
            .split("://")
            .nth(1)
            .unwrap_or("")
            .rsplit('@')
            .next()
            .unwrap_or("");
        let host = host.split(['/', ':', '?']).next().unwrap_or("");
        assert!(
            host == "localhost" || host.starts_with("127.") || host == "[::1]",
            "the benchmark only targets loopback; {url} is not"
        );
    }
}

fn print_row(result: &serde_json::Value) {
    println!("{result}");
    let f = |path: &[&str]| {
        let mut v = result;
        for key in path {
            v = &v[*key];
        }
        v.as_f64().map_or_else(|| v.to_string(), |x| format!("{x:.2}"))
    };
    match result["scenario"].as_str() {
        Some("fanout") | Some("paced") => eprintln!(
            "  {:<10} {:<6} subs={:<5} msgs={:<5} deliveries/s={:<10} p50={}ms p99={}ms p999={}ms max={}ms (seq {}) lost={} dup={} cpu bridge={}s broker={}s per delivery bridge={}µs broker={}µs",
            result["target"].as_str().unwrap_or(""), result["scenario"].as_str().unwrap_or(""),
            result["subscribers"], result["messages"], f(&["deliveries_per_s"]), f(&["latency_ms", "p50"]),
            f(&["latency_ms", "p99"]), f(&["latency_ms", "p999"]), f(&["latency_ms", "max"]), result["slowest_seq"], result["lost"],
            result["duplicated"], f(&["cpu_seconds", "bridge"]), f(&["cpu_seconds", "broker"]),
            f(&["bridge_cpu_us_per_delivery"]), f(&["broker_cpu_us_per_delivery"])
        ),
        Some("ingest") => eprintln!(
            "  {:<10} ingest clients={} window={} acked/s={} p50={}ms p99={}ms max={}ms arrived={} unacked={} cpu bridge={}s broker={}s per ack bridge={}µs broker={}µs",
            result["target"].as_str().unwrap_or(""), result["clients"], result["window"], f(&["acked_per_s"]),
            f(&["ack_latency_ms", "p50"]), f(&["ack_latency_ms", "p99"]), f(&["ack_latency_ms", "max"]),
            result["arrived"], result["unacked"], f(&["cpu_seconds", "bridge"]), f(&["cpu_seconds", "broker"]),
            f(&["bridge_cpu_us_per_ack"]), f(&["broker_cpu_us_per_ack"])
        ),
        Some("request") => eprintln!(
            "  {:<10} request clients={} window={} requests={} answered={} errors={} round trips/s={} p50={}ms p99={}ms max={}ms cpu bridge={}s broker={}s reply_to={}",
            result["target"].as_str().unwrap_or(""), result["clients"], result["window"], result["requests"],
            result["answered"], result["errors"], f(&["round_trips_per_s"]), f(&["latency_ms", "p50"]),
            f(&["latency_ms", "p99"]), f(&["latency_ms", "max"]), f(&["cpu_seconds", "bridge"]),
            f(&["cpu_seconds", "broker"]), result["responder_reply_to"]
        ),
        Some("handshake") => eprintln!(
            "  deskbridge handshake auth={:<5} handshakes={} per_s={} bridge cpu={}s ({} µs each)",
            result["auth"].as_str().unwrap_or(""), result["handshakes"], f(&["handshakes_per_s"]),
            f(&["cpu_seconds", "bridge"]), f(&["bridge_cpu_us_per_handshake"])
        ),
        Some(scenario) if history::describes(scenario) => eprintln!("  {}", history::row(result)),
        Some("slow") => eprintln!(
            "  deskbridge slow   messages={} fast readers got {} rss before={} KiB peak={} KiB after={} KiB slow close={}",
            result["messages"], result["fast_readers_received"], f(&["rss_kib_before"]), f(&["rss_kib_peak"]),
            f(&["rss_kib_after"]), result["slow_close"]
        ),
        _ => eprintln!(
            "  {:<10} idle sessions={} rss before={} KiB after={} KiB per session={} KiB",
            result["target"].as_str().unwrap_or(""), result["sessions"], f(&["rss_kib_before"]),
            f(&["rss_kib_after"]), f(&["rss_kib_per_session"])
        ),
    }
}

/// Runs `scenario` against `target` and prints its rows (`slow` runs against deskbridge only).
async fn run(scenario: Scenario, target: Target, args: &Args) {
    match scenario {
        Scenario::Fanout => {
            for &subscribers in &args.subscribers {
                print_row(&fanout(target, args, subscribers, args.messages, 0).await);
            }
        }
        Scenario::Paced => {
            let messages = (args.rate * args.paced_seconds) as usize;
            print_row(&fanout(target, args, args.paced_subscribers, messages, args.rate).await);
        }
        Scenario::Ingest => print_row(&ingest(target, args).await),
        Scenario::Idle => print_row(&idle(target, args).await),
        Scenario::Request => print_row(&request(target, args).await),
        Scenario::Slow if target == Target::Deskbridge => print_row(&slow(args).await),
        Scenario::Handshake if target == Target::Deskbridge => {
            for auth in [Auth::None, Auth::Hs256, Auth::Rs256] {
                print_row(&handshake(args, auth).await);
            }
        }
        Scenario::Slow | Scenario::Handshake => {}
        Scenario::History | Scenario::Recovery | Scenario::Storm | Scenario::Instances | Scenario::Burst => {
            history::run(scenario, target, args).await
        }
    }
}

fn main() {
    let args = Args::parse();
    loopback_only(&args);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(async {
        for scenario in args.scenario.clone() {
            for target in args.target.clone() {
                run(scenario, target, &args).await;
            }
        }
    });
}
