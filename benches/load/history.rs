//! History on RabbitMQ streams (#10): the benchmarks issue #10 asks for.
//!
//! - `history`: the unpaced fan-out (`--history-subscribers` × `--messages`) against deskbridge
//!   with history off, then on, back to back; Web-STOMP's plain fan-out is the counterpart.
//! - `recovery`: one browser resumes `--recovery-events` missed events with `since`, first from
//!   the bridge's memory tail (the bridge that was running while they were published), then
//!   from the stream (a second instance started after them, whose memory holds none of them).
//!   Web-STOMP's counterpart: one STOMP client reading the same number from a stream of its own
//!   (`/amq/queue/<stream>` with `x-stream-offset`).
//! - `storm`: `--storm-browsers` browsers resume `--storm-events` each, all at once: against
//!   the bridge that was running (memory), then against a freshly restarted one (stream).
//!   Web-STOMP: as many STOMP clients, each its own stream consumer.
//! - `instances`: two bridges on the same streams, `--instance-browsers` browsers on each,
//!   `--messages` desktop events: every browser gets every event once.
//! - `burst`: `--burst-subscribers` browsers; `--burst-events` desktop events published before
//!   anybody reads, with the default limits, history off and on (and Web-STOMP for the rate).
//!
//! Every bridge with history on runs on exchanges of its own (`NAMES`) and a stream prefix of
//! its own ([`Streams`]); its streams are deleted once the last bridge using them stopped.

use std::sync::Arc;
use std::time::{Duration, Instant};

use amiquip::{AmqpValue, FieldTable, QueueDeclareOptions};
use deskbridge::config::Config;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use super::common::amqp::{delete_history, delete_quietly_at};
use super::common::browser::{ws_url, Ws};
use super::common::desktop::Desktop;
use super::common::http::try_http_get;
use super::common::process::BridgeProcess;
use super::{
    bench_broker, body, bridge_config, connect_many, desktop_publish, fanout, field_u64, histogram,
    latency_ms, launch_bridge, micros_each, next_text, print_row, receive_fanout, rss_kib, sample_peak_rss,
    start_target, Args, Bridge, Client, CpuMeter, Names, Receipt, Scenario, Target,
};

/// Exchanges of the bridges with history on: no v1 `listener` queue is ever bound to them.
pub(super) const NAMES: Names = Names {
    inbound: "bench.history.in",
    outbound: "bench.history.out",
};

/// The longest a resume, a storm or a burst may take before the rest counts as lost.
const DEADLINE: Duration = Duration::from_secs(180);

/// Stream deliveries a Web-STOMP client may hold unacknowledged (the bridge's own reader uses
/// the same prefetch), and how often it acknowledges (cumulatively, `ack:client`).
const STOMP_PREFETCH: usize = 1000;
const STOMP_ACK_EVERY: usize = 250;

/// The desk streams of one stream prefix, for every bridge that shares them. Dropped with the
/// last of those bridges: then the streams, their `.web` exchanges and `NAMES` are deleted.
pub(super) struct Streams {
    config: Config,
}

impl Streams {
    /// A stream prefix no other run uses, with `[history]`'s defaults otherwise.
    pub(super) fn new(args: &Args) -> Arc<Streams> {
        let mut config = bridge_config(args);
        config.amqp.inbound_exchange = NAMES.inbound.into();
        config.amqp.outbound_exchange = NAMES.outbound.into();
        config.history.enabled = true;
        config.history.stream_prefix = format!(
            "bench.history.{}",
            &uuid::Uuid::new_v4().simple().to_string()[..10]
        );
        Arc::new(Streams { config })
    }
}

impl Drop for Streams {
    fn drop(&mut self) {
        delete_history(&self.config);
    }
}

/// A bridge on `streams`, started and attached to its desk streams (a `since` is served).
pub(super) async fn start_bridge(args: &Args, streams: &Arc<Streams>) -> Bridge {
    let process = launch_bridge(args, &streams.config).await;
    super::common::bridge::wait_attached_at(process.addr, &["A", "B"]).await;
    Bridge {
        process: Some(process),
        streams: Some(Arc::clone(streams)),
    }
}

/// Runs one of this module's scenarios against `target`, printing each row as it comes.
pub(super) async fn run(scenario: Scenario, target: Target, args: &Args) {
    let bridge = matches!(target, Target::Deskbridge | Target::DeskbridgeHistory);
    match scenario {
        Scenario::History => {
            let (subscribers, messages) = (args.history_subscribers, args.messages);
            if target == Target::Deskbridge {
                print_row(&fanout(Target::Deskbridge, args, subscribers, messages, 0).await);
                print_row(&fanout(Target::DeskbridgeHistory, args, subscribers, messages, 0).await);
            } else {
                print_row(&fanout(target, args, subscribers, messages, 0).await);
            }
        }
        Scenario::Recovery if bridge => recovery(args).await,
        Scenario::Recovery => print_row(&stomp_recovery(args).await),
        Scenario::Storm if bridge => storm(args).await,
        Scenario::Storm => print_row(&stomp_storm(args).await),
        Scenario::Instances if bridge => print_row(&instances(args).await),
        Scenario::Burst if target == Target::Deskbridge => {
            print_row(&burst(Target::Deskbridge, args).await);
            print_row(&burst(Target::DeskbridgeHistory, args).await);
        }
        Scenario::Burst => print_row(&burst(target, args).await),
        // Two instances of Web-STOMP are one broker: no counterpart.
        _ => {}
    }
}

// ---------------------------------------------------------------------------------------------
// Browsers that resume

/// What one browser got of the events `from_seq .. from_seq + count`.
#[derive(Default)]
struct Resumed {
    /// `recovered` of its `subscribed` for desk A (`None`: not in the answer, or no answer).
    recovered: Option<bool>,
    /// When the `subscribe` (or STOMP `SUBSCRIBE`) was sent.
    asked: Option<Instant>,
    /// Distinct events of the range received.
    received: usize,
    duplicated: usize,
    /// Events that did not follow the one before (seq + 1, a larger offset).
    out_of_order: usize,
    /// The number of the event before.
    seq: Option<u64>,
    last: Option<Instant>,
    /// Offset and epoch of the last event.
    offset: Option<u64>,
    epoch: Option<String>,
    /// How it ended before it had every event: a close frame, an error frame, a deadline.
    ended: Option<String>,
}

impl Resumed {
    fn failed(why: impl Into<String>) -> Resumed {
        Resumed {
            ended: Some(why.into()),
            ..Resumed::default()
        }
    }

    /// Counts the event `seq` (at `offset`, if the bridge sent one).
    fn event(&mut self, seen: &mut [bool], from_seq: u64, seq: u64, offset: Option<u64>) {
        let next = self.seq.map_or(from_seq, |before| before + 1);
        let later = match (self.offset, offset) {
            (Some(before), Some(at)) => at > before,
            _ => true,
        };
        if seq != next || !later {
            self.out_of_order += 1;
        }
        match seq.checked_sub(from_seq).and_then(|i| seen.get_mut(i as usize)) {
            Some(flag) if *flag => self.duplicated += 1,
            Some(flag) => {
                *flag = true;
                self.received += 1;
            }
            None => {}
        }
        self.seq = Some(seq);
        self.offset = offset.or(self.offset);
        self.last = Some(Instant::now());
    }
}

/// The text after `marker` up to the next `"`.
fn field_str<'t>(text: &'t str, marker: &str) -> Option<&'t str> {
    let start = text.find(marker)? + marker.len();
    let rest = &text[start..];
    Some(&rest[..rest.find('"')?])
}

/// Reads the events `from_seq .. from_seq + count` of desk A from a bridge session (after its
/// `subscribe` went out), until it has them all, it is closed, or `deadline`.
async fn read_events(ws: &mut Ws, from_seq: u64, count: usize, deadline: tokio::time::Instant) -> Resumed {
    let mut got = Resumed::default();
    let mut seen = vec![false; count];
    while got.received < count {
        let frame = match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => {
                got.ended = Some("deadline".into());
                break;
            }
            Ok(None) | Ok(Some(Err(_))) => {
                got.ended = Some("connection lost".into());
                break;
            }
            Ok(Some(Ok(frame))) => frame,
        };
        let text = match frame {
            Message::Text(text) => text,
            Message::Close(close) => {
                got.ended =
                    Some(close.map_or("closed".into(), |f| format!("{} {}", u16::from(f.code), f.reason)));
                break;
            }
            _ => continue,
        };
        if text.starts_with(r#"{"op":"event""#) {
            let Some(seq) = field_u64(&text, "\"seq\":") else {
                continue;
            };
            got.event(&mut seen, from_seq, seq, field_u64(&text, "\"offset\":"));
            if got.epoch.is_none() {
                got.epoch = field_str(&text, "\"epoch\":\"").map(String::from);
            }
        } else if text.starts_with(r#"{"op":"subscribed""#) {
            got.recovered = text
                .contains("\"recovered\"")
                .then(|| text.contains(r#""recovered":{"A":true}"#));
        } else if text.starts_with(r#"{"op":"error""#) {
            got.ended = Some(text);
            break;
        }
    }
    got
}

/// A browser connects to `bridge`, resumes desk A after `offset` of `epoch`, and reads the
/// `count` events from `from_seq` on.
async fn resume(
    addr: std::net::SocketAddr,
    (offset, epoch): (u64, &str),
    (from_seq, count): (u64, usize),
    deadline: tokio::time::Instant,
) -> Resumed {
    let connected = tokio::time::timeout_at(deadline, tokio_tungstenite::connect_async(ws_url(addr))).await;
    let Ok(Ok((mut ws, _))) = connected else {
        return Resumed::failed(
            format!("connect: {connected:?}")
                .chars()
                .take(120)
                .collect::<String>(),
        );
    };
    let Ok(Some(_welcome)) = tokio::time::timeout_at(deadline, next_text(&mut ws)).await else {
        return Resumed::failed("no welcome");
    };
    let since = format!(
        r#"{{"op":"subscribe","desks":["A"],"since":{{"A":{{"offset":{offset},"epoch":"{epoch}"}}}}}}"#
    );
    let asked = Instant::now();
    if ws.send(Message::Text(since)).await.is_err() {
        return Resumed::failed("send subscribe");
    }
    let mut got = read_events(&mut ws, from_seq, count, deadline).await;
    got.asked = Some(asked);
    got
}

/// Desktop events `from .. from + count` for desk A (the bench's usual ~150-byte bodies), for
/// `key` (a routing key, or a stream's name on the default exchange).
fn events(key: &str, from: u64, count: usize) -> Vec<(String, Value)> {
    let epoch = Instant::now();
    (from..from + count as u64)
        .map(|seq| {
            let data = serde_json::from_str(&body(seq, epoch)).expect("the bench body is JSON");
            (key.to_string(), data)
        })
        .collect()
}

/// Publishes `messages` to `exchange` and waits for the broker's confirms (blocking).
async fn publish_confirmed(args: &Args, exchange: &'static str, messages: Vec<(String, Value)>) {
    let url = args.amqp_url.clone();
    tokio::task::spawn_blocking(move || Desktop::connect_to(&url).publish_many(exchange, &messages))
        .await
        .expect("desktop publisher");
}

/// A counter of `bridge`'s `/metrics` (exact series), if it answers.
async fn metric(bridge: &BridgeProcess, series: &str) -> Option<f64> {
    let (_, body) = try_http_get(bridge.addr, "/metrics").await?;
    body.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Where the events a browser missed were published and what it last had: a bridge on fresh
/// streams, a browser that saw event 0 live (its offset and epoch), then `count` more events
/// (1 ..= count), confirmed, which that browser also read live so that the bridge's memory
/// tail holds them.
struct Missed {
    streams: Arc<Streams>,
    bridge: Bridge,
    offset: u64,
    epoch: String,
}

async fn missed(args: &Args, count: usize) -> Missed {
    let streams = Streams::new(args);
    let bridge = start_bridge(args, &streams).await;
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let (mut seed, _) = tokio_tungstenite::connect_async(ws_url(bridge.addr))
        .await
        .expect("seed connects");
    let _welcome = next_text(&mut seed).await;
    seed.send(Message::Text(r#"{"op":"subscribe","desks":["A"]}"#.into()))
        .await
        .expect("send");
    publish_confirmed(args, NAMES.inbound, events("A_new_example", 0, 1)).await;
    let first = read_events(&mut seed, 0, 1, deadline).await;
    let (Some(offset), Some(epoch)) = (first.offset, first.epoch) else {
        panic!("the seed browser got no event 0: {:?}", first.ended);
    };
    publish_confirmed(args, NAMES.inbound, events("A_new_example", 1, count)).await;
    let rest = read_events(&mut seed, 1, count, deadline).await;
    assert_eq!(rest.received, count, "the seed browser got every event live");
    Missed {
        streams,
        bridge,
        offset,
        epoch,
    }
}

// ---------------------------------------------------------------------------------------------
// recovery: one browser resumes many events

async fn recovery(args: &Args) {
    let count = args.recovery_events;
    let Missed {
        streams,
        bridge,
        offset,
        epoch,
    } = missed(args, count).await;
    print_row(&recovery_row(args, &bridge, (offset, &epoch), count, "memory").await);
    // Another instance, started after the events: its memory tail begins after them.
    bridge.stop();
    let other = start_bridge(args, &streams).await;
    print_row(&recovery_row(args, &other, (offset, &epoch), count, "stream").await);
    other.stop();
    print_row(&to_live(args, &streams, (offset, &epoch), count).await);
    drop(streams);
}

/// Desktop events of desk A from `seq` on at `per_second`, paced by the clock, on a thread of
/// their own until the returned flag is set; the counter says how many were sent.
fn live_traffic(
    args: &Args,
    seq: u64,
    per_second: u64,
) -> (
    Arc<std::sync::atomic::AtomicBool>,
    Arc<std::sync::atomic::AtomicU64>,
    std::thread::JoinHandle<()>,
) {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let url = args.amqp_url.clone();
    let thread = std::thread::spawn({
        let (stop, sent) = (Arc::clone(&stop), Arc::clone(&sent));
        move || {
            let mut connection = bench_broker(&url);
            let channel = connection.open_channel(None).expect("channel");
            let (began, epoch) = (Instant::now(), Instant::now());
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let due = began + Duration::from_micros(n * 1_000_000 / per_second);
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                let text = body(seq + n, epoch);
                channel
                    .basic_publish(
                        NAMES.inbound,
                        amiquip::Publish::new(text.as_bytes(), "A_new_example"),
                    )
                    .expect("publish");
                n += 1;
                sent.store(n, Ordering::Relaxed);
            }
            let _ = connection.close();
        }
    });
    (stop, sent, thread)
}

/// Live desktop traffic while a browser resumes `count` events from the stream (issue #21):
/// how long until it is live (`deskbridge_history_caught_up_total` moves), and how far behind
/// the newest event it is then.
async fn to_live(args: &Args, streams: &Arc<Streams>, (offset, epoch): (u64, &str), count: usize) -> Value {
    const RATE: u64 = 1_000;
    let mut config = streams.config.clone();
    // The tail the soak of #21 ran with: its memory holds about a quarter second of this traffic.
    config.history.memory_bytes = 256 * 1024;
    let process = launch_bridge(args, &config).await;
    super::common::bridge::wait_attached_at(process.addr, &["A", "B"]).await;
    let bridge = Bridge {
        process: Some(process),
        streams: Some(Arc::clone(streams)),
    };
    let (stop, sent, traffic) = live_traffic(args, count as u64 + 1, RATE);
    // Until the memory tail is full and moving.
    while sent.load(std::sync::atomic::Ordering::Relaxed) < 2 * RATE {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let series = "deskbridge_history_caught_up_total";
    let before = metric(&bridge, series).await.unwrap_or(0.0);
    let replayed_before = metric(&bridge, "deskbridge_history_replayed_total")
        .await
        .unwrap_or(0.0);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let (mut ws, _) = tokio_tungstenite::connect_async(ws_url(bridge.addr))
        .await
        .expect("the browser connects");
    let _welcome = next_text(&mut ws).await;
    let since = format!(
        r#"{{"op":"subscribe","desks":["A"],"since":{{"A":{{"offset":{offset},"epoch":"{epoch}"}}}}}}"#
    );
    let asked = Instant::now();
    ws.send(Message::Text(since)).await.expect("send subscribe");
    let (mut next, mut out_of_order, mut live_after, mut lag) = (1u64, 0u64, None, None);
    let mut checked = Instant::now();
    loop {
        let frame = match tokio::time::timeout_at(deadline, ws.next()).await {
            Ok(Some(Ok(Message::Text(text)))) => text,
            Ok(Some(Ok(_))) => continue,
            _ => break,
        };
        if let Some(seq) = field_u64(&frame, "\"seq\":").filter(|_| frame.starts_with(r#"{"op":"event""#)) {
            if seq != next {
                out_of_order += 1;
            }
            next = seq + 1;
        }
        if checked.elapsed() >= Duration::from_millis(50) {
            checked = Instant::now();
            if metric(&bridge, series).await.unwrap_or(0.0) > before {
                live_after = Some(asked.elapsed().as_secs_f64());
                let newest = count as u64 + sent.load(std::sync::atomic::Ordering::Relaxed);
                lag = Some(newest.saturating_sub(next - 1));
                break;
            }
        }
    }
    let replayed = metric(&bridge, "deskbridge_history_replayed_total")
        .await
        .unwrap_or(0.0)
        - replayed_before;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = traffic.join();
    bridge.stop();
    json!({
        "scenario": "recovery",
        "target": Target::DeskbridgeHistory.name(),
        "source": "stream+live",
        "events": count,
        "live_rate": RATE,
        "memory_bytes": config.history.memory_bytes,
        "seconds_to_live": live_after,
        "lag_events_when_live": lag,
        "out_of_order": out_of_order,
        "replayed_from_stream": replayed,
    })
}

async fn recovery_row(
    args: &Args,
    bridge: &BridgeProcess,
    since: (u64, &str),
    count: usize,
    source: &str,
) -> Value {
    let meter = CpuMeter::start(Some(bridge.pid()), args.broker_pid);
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let got = resume(bridge.addr, since, (1, count), deadline).await;
    let (bridge_cpu, broker_cpu) = meter.stop();
    let replayed = metric(bridge, "deskbridge_history_replayed_total").await;
    recovery_json(
        Target::DeskbridgeHistory,
        source,
        count,
        &got,
        (bridge_cpu, broker_cpu),
        replayed,
    )
}

fn recovery_json(
    target: Target,
    source: &str,
    count: usize,
    got: &Resumed,
    (bridge_cpu, broker_cpu): (f64, f64),
    replayed: Option<f64>,
) -> Value {
    let seconds = match (got.asked, got.last) {
        (Some(asked), Some(last)) => last.duration_since(asked).as_secs_f64(),
        _ => f64::NAN,
    };
    json!({
        "scenario": "recovery",
        "target": target.name(),
        "source": source,
        "events": count,
        "received": got.received,
        "lost": count - got.received,
        "duplicated": got.duplicated,
        "out_of_order": got.out_of_order,
        "recovered": got.recovered,
        "seconds": seconds,
        "events_per_s": (got.received as f64 / seconds).round(),
        "replayed_from_stream": replayed,
        "ended": got.ended,
        "cpu_seconds": {"bridge": bridge_cpu, "broker": broker_cpu},
        "bridge_cpu_us_per_event": micros_each(bridge_cpu, got.received),
        "broker_cpu_us_per_event": micros_each(broker_cpu, got.received),
    })
}

// ---------------------------------------------------------------------------------------------
// Web-STOMP on a stream of its own

/// A stream for the Web-STOMP runs, declared with the bridge's default retention; deleted on
/// drop.
struct StompStream {
    url: String,
    name: String,
}

impl StompStream {
    /// Declares a new stream and publishes events 0 ..= `count` into it (confirmed).
    async fn with_events(args: &Args, count: usize) -> StompStream {
        let name = format!(
            "bench.stomp.history.{}",
            &uuid::Uuid::new_v4().simple().to_string()[..10]
        );
        let (url, declared) = (args.amqp_url.clone(), name.clone());
        tokio::task::spawn_blocking(move || {
            let mut connection = bench_broker(&url);
            let channel = connection.open_channel(None).expect("channel");
            let mut arguments = FieldTable::new();
            arguments.insert("x-queue-type".into(), AmqpValue::LongString("stream".into()));
            arguments.insert("x-max-age".into(), AmqpValue::LongString("1h".into()));
            arguments.insert("x-max-length-bytes".into(), AmqpValue::LongLongInt(1 << 30));
            let options = QueueDeclareOptions {
                durable: true,
                arguments,
                ..QueueDeclareOptions::default()
            };
            channel.queue_declare(&declared, options).expect("declare stream");
            let _ = connection.close();
            // RabbitMQ 3.10 crashes a channel that uses a stream within ~20 ms of its creation
            // by another connection (docs/streams-findings.md §0).
            std::thread::sleep(Duration::from_millis(100));
        })
        .await
        .expect("declare");
        publish_confirmed(args, "", events(&name, 0, count + 1)).await;
        StompStream {
            url: args.amqp_url.clone(),
            name,
        }
    }
}

impl Drop for StompStream {
    fn drop(&mut self) {
        delete_quietly_at(&self.url, &[&self.name], &[]);
    }
}

/// A Web-STOMP client reads `count` events of `stream` from offset 1 (event 1; the stream is
/// new, so offsets are the events' numbers), acknowledging every `STOMP_ACK_EVERY`. Silence
/// does not end it (in a storm, the broker may serve it late), only `deadline`.
async fn stomp_resume(args: &Args, stream: &str, count: usize, deadline: tokio::time::Instant) -> Resumed {
    let connect = tokio::time::timeout_at(deadline, Client::connect(Target::Stomp, args, None));
    let Ok(Client::Stomp {
        mut ws,
        mut heartbeat,
    }) = connect.await
    else {
        return Resumed::failed("connect: deadline");
    };
    let subscribe = format!(
        "SUBSCRIBE\nid:0\ndestination:/amq/queue/{stream}\nack:client\nprefetch-count:{STOMP_PREFETCH}\nx-stream-offset:offset=1\n\n\0"
    );
    let mut got = Resumed {
        asked: Some(Instant::now()),
        ..Resumed::default()
    };
    if ws.send(Message::Text(subscribe)).await.is_err() {
        return Resumed::failed("send SUBSCRIBE");
    }
    let mut seen = vec![false; count];
    let mut unacked = 0;
    while got.received < count {
        let text = tokio::select! {
            text = tokio::time::timeout_at(deadline, next_text(&mut ws)) => text,
            _ = heartbeat.tick() => {
                let _ = ws.send(Message::Text("\n".into())).await;
                continue;
            }
        };
        let text = match text {
            Err(_) => {
                got.ended = Some("deadline".into());
                break;
            }
            Ok(None) => {
                got.ended = Some("closed".into());
                break;
            }
            Ok(Some(text)) if text.starts_with("MESSAGE") => text,
            Ok(Some(text)) if text.starts_with("ERROR") => {
                got.ended = Some(text.lines().take(3).collect::<Vec<_>>().join(" "));
                break;
            }
            Ok(Some(_)) => continue,
        };
        let (headers, payload) = text.split_once("\n\n").unwrap_or((&text, ""));
        let Some(seq) = field_u64(payload, "\"seq\":") else {
            continue;
        };
        got.event(&mut seen, 1, seq, None);
        unacked += 1;
        if unacked >= STOMP_ACK_EVERY || got.received == count {
            let ack = headers
                .lines()
                .find_map(|line| line.strip_prefix("ack:"))
                .unwrap_or_default();
            let _ = ws.send(Message::Text(format!("ACK\nid:{ack}\n\n\0"))).await;
            unacked = 0;
        }
    }
    got
}

async fn stomp_recovery(args: &Args) -> Value {
    let count = args.recovery_events;
    let stream = StompStream::with_events(args, count).await;
    let meter = CpuMeter::start(None, args.broker_pid);
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let got = stomp_resume(args, &stream.name, count, deadline).await;
    let cpu = meter.stop();
    recovery_json(Target::Stomp, "stream", count, &got, cpu, None)
}

// ---------------------------------------------------------------------------------------------
// storm: many browsers resume at once

/// What a storm's browsers got, with the server's RSS and CPU around it.
struct StormOutcome {
    started: Instant,
    browsers: Vec<Resumed>,
    rss_kib: (f64, f64, f64),
    cpu: (f64, f64),
}

/// Runs `resume_one` for `browsers` browsers at once, sampling `server`'s RSS meanwhile.
async fn storm_of<F, Fut>(
    args: &Args,
    server: Option<u32>,
    bridge: Option<u32>,
    browsers: usize,
    resume_one: F,
) -> StormOutcome
where
    F: Fn(tokio::time::Instant) -> Fut,
    Fut: std::future::Future<Output = Resumed> + Send + 'static,
{
    let before = server.map_or(f64::NAN, rss_kib);
    let sampler = server.map(|pid| sample_peak_rss(pid, DEADLINE));
    let meter = CpuMeter::start(bridge, args.broker_pid);
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let tasks: Vec<_> = (0..browsers)
        .map(|_| tokio::spawn(resume_one(deadline)))
        .collect();
    let mut got = Vec::with_capacity(browsers);
    for task in tasks {
        got.push(
            task.await
                .unwrap_or_else(|error| Resumed::failed(format!("task: {error}"))),
        );
    }
    let cpu = meter.stop();
    let peak = match sampler {
        Some((sampling, sampler)) => {
            sampling.store(false, std::sync::atomic::Ordering::Release);
            sampler.await.expect("sampler").max(before)
        }
        None => f64::NAN,
    };
    let after = server.map_or(f64::NAN, rss_kib);
    StormOutcome {
        started,
        browsers: got,
        rss_kib: (before, peak, after),
        cpu,
    }
}

async fn storm(args: &Args) {
    let Missed {
        streams,
        bridge,
        offset,
        epoch,
    } = missed(args, args.storm_events).await;
    let epoch: Arc<str> = epoch.into();
    // The browsers come back to the bridge that kept running: its memory tail has the events.
    print_row(&storm_against(args, &bridge, (offset, &epoch), "memory").await);
    // After a restart, to a fresh bridge that reads them from the stream.
    bridge.stop();
    let restarted = start_bridge(args, &streams).await;
    print_row(&storm_against(args, &restarted, (offset, &epoch), "stream").await);
    restarted.stop();
    drop(streams);
}

/// `--storm-browsers` browsers resume after `offset` of `epoch` on `bridge`, all at once.
async fn storm_against(
    args: &Args,
    bridge: &BridgeProcess,
    (offset, epoch): (u64, &Arc<str>),
    source: &str,
) -> Value {
    let (addr, pid, count) = (bridge.addr, bridge.pid(), args.storm_events);
    let outcome = storm_of(args, Some(pid), Some(pid), args.storm_browsers, |deadline| {
        let epoch = Arc::clone(epoch);
        async move { resume(addr, (offset, &epoch), (1, count), deadline).await }
    })
    .await;
    let replayed = metric(bridge, "deskbridge_history_replayed_total").await;
    storm_json(Target::DeskbridgeHistory, source, count, &outcome, replayed)
}

async fn stomp_storm(args: &Args) -> Value {
    let (browsers, count) = (args.storm_browsers, args.storm_events);
    let stream = Arc::new(StompStream::with_events(args, count).await);
    let shared = Arc::new(args.clone());
    let outcome = storm_of(args, args.broker_pid, None, browsers, |deadline| {
        let (args, stream) = (Arc::clone(&shared), Arc::clone(&stream));
        async move { stomp_resume(&args, &stream.name, count, deadline).await }
    })
    .await;
    storm_json(Target::Stomp, "stream", count, &outcome, None)
}

fn storm_json(
    target: Target,
    source: &str,
    count: usize,
    outcome: &StormOutcome,
    replayed: Option<f64>,
) -> Value {
    let browsers = &outcome.browsers;
    let received: usize = browsers.iter().map(|b| b.received).sum();
    let sum = |f: fn(&Resumed) -> usize| browsers.iter().map(f).sum::<usize>();
    let mut done: Vec<f64> = browsers
        .iter()
        .filter(|b| b.received == count)
        .filter_map(|b| {
            b.last
                .map(|last| last.duration_since(outcome.started).as_secs_f64())
        })
        .collect();
    done.sort_by(f64::total_cmp);
    let seconds = done.last().copied().unwrap_or(f64::NAN);
    let median = done.get(done.len() / 2).copied().unwrap_or(f64::NAN);
    let mut endings: Vec<&str> = browsers.iter().filter_map(|b| b.ended.as_deref()).collect();
    endings.sort_unstable();
    endings.dedup();
    let (before, peak, after) = outcome.rss_kib;
    let (bridge_cpu, broker_cpu) = outcome.cpu;
    json!({
        "scenario": "storm",
        "target": target.name(),
        "source": source,
        "browsers": browsers.len(),
        "events_each": count,
        "deliveries": received,
        "lost": browsers.len() * count - received,
        "duplicated": sum(|b| b.duplicated),
        "out_of_order": sum(|b| b.out_of_order),
        "recovered": browsers.iter().filter(|b| b.recovered == Some(true)).count(),
        "complete": done.len(),
        "ended_early": browsers.iter().filter(|b| b.ended.is_some()).count(),
        "endings": endings.iter().take(5).collect::<Vec<_>>(),
        "seconds": seconds,
        "browser_done_s": {"p50": median, "max": seconds},
        "deliveries_per_s": (received as f64 / seconds).round(),
        "replayed_from_stream": replayed,
        "rss_kib": {"before": before, "peak": peak, "after": after},
        "cpu_seconds": {"bridge": bridge_cpu, "broker": broker_cpu},
        "bridge_cpu_us_per_delivery": micros_each(bridge_cpu, received),
        "broker_cpu_us_per_delivery": micros_each(broker_cpu, received),
    })
}

// ---------------------------------------------------------------------------------------------
// instances: two bridges, one log

async fn instances(args: &Args) -> Value {
    let (per_instance, messages) = (args.instance_browsers, args.messages);
    let streams = Streams::new(args);
    let one = start_bridge(args, &streams).await;
    let two = start_bridge(args, &streams).await;
    let target = Target::DeskbridgeHistory;
    let mut clients = connect_many(target, args, Some(&one), per_instance, true).await;
    clients.extend(connect_many(target, args, Some(&two), per_instance, true).await);
    let epoch = Instant::now();
    let meters = [
        CpuMeter::start(Some(one.pid()), args.broker_pid),
        CpuMeter::start(Some(two.pid()), None),
    ];
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|client| tokio::spawn(receive_fanout(client, messages, epoch)))
        .collect();
    let url = args.amqp_url.clone();
    let first = tokio::task::spawn_blocking(move || desktop_publish(&url, NAMES.inbound, messages, 0, epoch))
        .await
        .expect("publisher");
    let mut total = Receipt::new();
    for task in tasks {
        total.add(task.await.expect("receiver"));
    }
    let [(cpu_one, broker_cpu), (cpu_two, _)] = meters.map(|meter| meter.stop());
    one.stop();
    two.stop();
    drop(streams);
    let expected = 2 * per_instance * messages;
    let seconds = total
        .last
        .map_or(f64::NAN, |last| last.duration_since(first).as_secs_f64());
    let h = total.latencies.unwrap_or_else(histogram);
    json!({
        "scenario": "instances",
        "target": target.name(),
        "instances": 2,
        "browsers_each": per_instance,
        "messages": messages,
        "deliveries": total.received,
        "deliveries_per_s": (total.received as f64 / seconds).round(),
        "latency_ms": latency_ms(&h),
        "lost": expected - total.received,
        "duplicated": total.duplicated,
        "seconds": seconds,
        "cpu_seconds": {"bridge": cpu_one + cpu_two, "bridges": [cpu_one, cpu_two], "broker": broker_cpu},
        "bridge_cpu_us_per_delivery": micros_each(cpu_one + cpu_two, total.received),
    })
}

// ---------------------------------------------------------------------------------------------
// burst: everything published before anybody reads

async fn burst(target: Target, args: &Args) -> Value {
    let (subscribers, messages) = (args.burst_subscribers, args.burst_events);
    let bridge = start_target(target, args, true).await;
    let clients = connect_many(target, args, bridge.as_deref(), subscribers, true).await;
    let bridge_pid = bridge.as_deref().map(BridgeProcess::pid);
    let server = bridge_pid.or(args.broker_pid);
    // The attach probe's resumes count as caught up too.
    let caught_up_before = match bridge.as_deref() {
        Some(bridge) => metric(bridge, "deskbridge_history_caught_up_total").await,
        None => None,
    };
    let before = server.map_or(f64::NAN, rss_kib);
    let sampler = server.map(|pid| sample_peak_rss(pid, DEADLINE));
    let meter = CpuMeter::start(bridge_pid, args.broker_pid);
    let epoch = Instant::now();
    let (url, exchange) = (args.amqp_url.clone(), target.names().inbound);
    let first = tokio::task::spawn_blocking(move || desktop_publish(&url, exchange, messages, 0, epoch))
        .await
        .expect("publisher");
    // Only now does anybody read.
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|client| tokio::spawn(receive_fanout(client, messages, epoch)))
        .collect();
    let (mut total, mut short) = (Receipt::new(), 0);
    for task in tasks {
        let one = task.await.expect("receiver");
        short += usize::from(one.received < messages);
        total.add(one);
    }
    let (bridge_cpu, broker_cpu) = meter.stop();
    let peak = match sampler {
        Some((sampling, sampler)) => {
            sampling.store(false, std::sync::atomic::Ordering::Release);
            sampler.await.expect("sampler").max(before)
        }
        None => f64::NAN,
    };
    let (slow_closed, caught_up) = match bridge.as_deref() {
        Some(bridge) => (
            metric(bridge, "deskbridge_sessions_slow_closed_total").await,
            metric(bridge, "deskbridge_history_caught_up_total")
                .await
                .map(|after| after - caught_up_before.unwrap_or(0.0)),
        ),
        None => (None, None),
    };
    drop(bridge);
    let seconds = total
        .last
        .map_or(f64::NAN, |last| last.duration_since(first).as_secs_f64());
    json!({
        "scenario": "burst",
        "target": target.name(),
        "subscribers": subscribers,
        "messages": messages,
        "deliveries": total.received,
        "deliveries_per_s": (total.received as f64 / seconds).round(),
        "lost": subscribers * messages - total.received,
        "duplicated": total.duplicated,
        "short_sessions": short,
        "slow_closed": slow_closed,
        "caught_up": caught_up,
        "seconds": seconds,
        "rss_kib": {"before": before, "peak": peak},
        "cpu_seconds": {"bridge": bridge_cpu, "broker": broker_cpu},
        "bridge_cpu_us_per_delivery": micros_each(bridge_cpu, total.received),
        "broker_cpu_us_per_delivery": micros_each(broker_cpu, total.received),
    })
}

// ---------------------------------------------------------------------------------------------
// Rows

/// True for the scenarios whose rows [`row`] writes (`history` writes `fanout` rows).
pub(super) fn describes(scenario: &str) -> bool {
    matches!(scenario, "recovery" | "storm" | "instances" | "burst")
}

/// The readable row of a result of this module.
pub(super) fn row(result: &Value) -> String {
    let f = |path: &[&str]| {
        let mut v = result;
        for key in path {
            v = &v[*key];
        }
        v.as_f64().map_or_else(|| v.to_string(), |x| format!("{x:.2}"))
    };
    let target = result["target"].as_str().unwrap_or("");
    match result["scenario"].as_str().unwrap_or("") {
        "recovery" if result["source"] == "stream+live" => format!(
            "{target:<18} recovery from stream under {} msg/s live (memory_bytes {}) events={} live after={}s lag then={} events out_of_order={} replayed={}",
            result["live_rate"], result["memory_bytes"], result["events"], f(&["seconds_to_live"]),
            result["lag_events_when_live"], result["out_of_order"], result["replayed_from_stream"]
        ),
        "recovery" => format!(
            "{target:<18} recovery from {:<6} events={} received={} lost={} out_of_order={} recovered={} events/s={} seconds={} cpu bridge={}s ({}µs/event) broker={}s replayed={} ended={}",
            result["source"].as_str().unwrap_or(""), result["events"], result["received"], result["lost"], result["out_of_order"],
            result["recovered"], f(&["events_per_s"]), f(&["seconds"]), f(&["cpu_seconds", "bridge"]),
            f(&["bridge_cpu_us_per_event"]), f(&["cpu_seconds", "broker"]), result["replayed_from_stream"], result["ended"]
        ),
        "storm" => format!(
            "{target:<18} storm from {:<6} browsers={}×{} deliveries={} lost={} dup={} out_of_order={} recovered={} ended_early={} {} seconds={} (browser done p50 {}s) deliveries/s={} rss before={} peak={} after={} KiB cpu bridge={}s ({}µs/delivery) broker={}s replayed={}",
            result["source"].as_str().unwrap_or(""), result["browsers"], result["events_each"], result["deliveries"], result["lost"],
            result["duplicated"], result["out_of_order"], result["recovered"], result["ended_early"], result["endings"],
            f(&["seconds"]), f(&["browser_done_s", "p50"]), f(&["deliveries_per_s"]), f(&["rss_kib", "before"]),
            f(&["rss_kib", "peak"]), f(&["rss_kib", "after"]), f(&["cpu_seconds", "bridge"]),
            f(&["bridge_cpu_us_per_delivery"]), f(&["cpu_seconds", "broker"]), result["replayed_from_stream"]
        ),
        "instances" => format!(
            "{target:<18} instances 2×{} browsers msgs={} deliveries/s={} p50={}ms p99={}ms lost={} dup={} cpu bridges={}s {} broker={}s ({}µs/delivery)",
            result["browsers_each"], result["messages"], f(&["deliveries_per_s"]), f(&["latency_ms", "p50"]),
            f(&["latency_ms", "p99"]), result["lost"], result["duplicated"], f(&["cpu_seconds", "bridge"]),
            result["cpu_seconds"]["bridges"], f(&["cpu_seconds", "broker"]), f(&["bridge_cpu_us_per_delivery"])
        ),
        _ => format!(
            "{target:<18} burst subs={} events={} deliveries/s={} lost={} dup={} short={} slow_closed={} caught_up={} seconds={} rss before={} peak={} KiB cpu bridge={}s broker={}s per delivery bridge={}µs broker={}µs",
            result["subscribers"], result["messages"], f(&["deliveries_per_s"]), result["lost"], result["duplicated"],
            result["short_sessions"], result["slow_closed"], result["caught_up"], f(&["seconds"]),
            f(&["rss_kib", "before"]), f(&["rss_kib", "peak"]), f(&["cpu_seconds", "bridge"]),
            f(&["cpu_seconds", "broker"]), f(&["bridge_cpu_us_per_delivery"]), f(&["broker_cpu_us_per_delivery"])
        ),
    }
}
