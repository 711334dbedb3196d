//! Counters behind `/metrics` (Prometheus text format), shared by every actor.
//!
//! Plain atomics: the hot path pays one relaxed add per event. Every notable event that is
//! also logged goes through one method here, so logs and metrics cannot drift apart.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::AcqRel, Ordering::Relaxed};
use std::time::Duration;

use crate::link::{LinkState, LinkStatus};
use crate::protocol::ErrorCode;

/// Why a delivery from RabbitMQ was rejected (no requeue; it goes to the dead-letter queue).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectReason {
    /// The body is not a JSON object.
    BadBody,
    /// The routing key names no configured desk (or has no `_`).
    UnknownDesk,
    /// The routing key names no configured event.
    UnknownEvent,
    /// A `to_web` transform refused the data.
    TransformFailed,
}

impl RejectReason {
    const ALL: [RejectReason; 4] = [
        RejectReason::BadBody,
        RejectReason::UnknownDesk,
        RejectReason::UnknownEvent,
        RejectReason::TransformFailed,
    ];

    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::BadBody => "bad_body",
            RejectReason::UnknownDesk => "unknown_desk",
            RejectReason::UnknownEvent => "unknown_event",
            RejectReason::TransformFailed => "transform_failed",
        }
    }
}

/// Why a browser's publish did not end in an `ack`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublishFailure {
    /// The outage buffer (count or bytes) was full.
    BufferFull,
    /// The broker stayed away longer than the publish TTL.
    Expired,
    /// The broker answered basic.nack.
    Nacked,
    /// The bridge shut down before the broker confirmed.
    Shutdown,
}

impl PublishFailure {
    const ALL: [PublishFailure; 4] = [
        PublishFailure::BufferFull,
        PublishFailure::Expired,
        PublishFailure::Nacked,
        PublishFailure::Shutdown,
    ];

    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            PublishFailure::BufferFull => "buffer_full",
            PublishFailure::Expired => "expired",
            PublishFailure::Nacked => "nacked",
            PublishFailure::Shutdown => "shutdown",
        }
    }

    /// What the browser is told.
    pub fn message(self) -> &'static str {
        match self {
            PublishFailure::BufferFull => {
                "the broker is unavailable and the publish buffer is full; retry later"
            }
            PublishFailure::Expired => {
                "the broker stayed unavailable longer than the publish TTL; the message was not sent"
            }
            PublishFailure::Nacked => "the broker refused the message (basic.nack); it was not stored",
            PublishFailure::Shutdown => {
                "the bridge shut down before the broker confirmed the message; it may or may not have arrived"
            }
        }
    }
}

/// Upper bounds (seconds) of the confirm-latency histogram buckets.
const LATENCY_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

/// All counters of one bridge process.
#[derive(Debug, Default)]
pub struct Metrics {
    sessions: AtomicI64,
    sessions_opened: AtomicU64,
    sessions_refused: AtomicU64,
    sessions_slow: AtomicU64,
    sessions_stalled: AtomicU64,
    desktop_in: AtomicU64,
    desktop_out: AtomicU64,
    web_in: AtomicU64,
    web_confirmed: AtomicU64,
    web_to_web_out: AtomicU64,
    unroutable: AtomicU64,
    own_echo: AtomicU64,
    rejects: [AtomicU64; 4],
    publish_failures: [AtomicU64; 4],
    ws_errors: [AtomicU64; 9],
    confirm_buckets: [AtomicU64; 12],
    confirm_count: AtomicU64,
    confirm_sum_micros: AtomicU64,
    reconnects_consumer: AtomicU64,
    reconnects_publisher: AtomicU64,
}

impl Metrics {
    /// Counts a new session unless `max` are open; false (logged, counted) when refused.
    pub fn try_open_session(&self, max: usize) -> bool {
        if self.sessions.fetch_add(1, AcqRel) >= max as i64 {
            self.sessions.fetch_sub(1, AcqRel);
            self.sessions_refused.fetch_add(1, Relaxed);
            log::warn!("refused a WebSocket session: {max} sessions already open (ws.max_sessions)");
            return false;
        }
        self.sessions_opened.fetch_add(1, Relaxed);
        true
    }

    /// A session ended.
    pub fn session_closed(&self) {
        self.sessions.fetch_sub(1, AcqRel);
    }

    /// Open WebSocket sessions.
    pub fn open_sessions(&self) -> i64 {
        self.sessions.load(Relaxed)
    }

    /// A session fell behind and was closed with 1013.
    pub fn session_slow(&self, session: &uuid::Uuid, desk: &str) {
        self.sessions_slow.fetch_add(1, Relaxed);
        log::warn!("closing session {session}: its outbound queue is full (slow reader on desk {desk})");
    }

    /// A browser took no bytes for `ws.client_timeout_ms` and its connection was dropped.
    pub fn session_stalled(&self, peer: Option<std::net::SocketAddr>, stall: std::time::Duration) {
        self.sessions_stalled.fetch_add(1, Relaxed);
        log::warn!(
            "dropping the connection of {peer:?}: it took no bytes for {stall:?} (ws.client_timeout_ms)"
        );
    }

    /// A delivery from RabbitMQ was accepted and fanned out to `receivers` sessions.
    pub fn desktop_event(&self, receivers: usize) {
        self.desktop_in.fetch_add(1, Relaxed);
        self.desktop_out.fetch_add(receivers as u64, Relaxed);
    }

    /// A delivery from RabbitMQ was rejected.
    pub fn rejected(&self, reason: RejectReason, routing_key: &str, detail: &str) {
        self.rejects[reason as usize].fetch_add(1, Relaxed);
        log::warn!(
            "rejected delivery with routing key `{routing_key}` ({}): {detail}",
            reason.as_str()
        );
    }

    /// A delivery carried this instance's `x-instance`: it was acked and not delivered again.
    pub fn own_echo(&self) {
        self.own_echo.fetch_add(1, Relaxed);
    }

    /// A browser asked to publish.
    pub fn web_publish(&self) {
        self.web_in.fetch_add(1, Relaxed);
    }

    /// The broker confirmed a browser's publish after `latency`; `web_receivers` other browsers got it.
    pub fn web_confirmed(&self, latency: Duration, routed: bool, web_receivers: usize) {
        self.web_confirmed.fetch_add(1, Relaxed);
        self.web_to_web_out.fetch_add(web_receivers as u64, Relaxed);
        if !routed {
            self.unroutable.fetch_add(1, Relaxed);
        }
        let seconds = latency.as_secs_f64();
        if let Some(i) = LATENCY_BUCKETS.iter().position(|bound| seconds <= *bound) {
            self.confirm_buckets[i].fetch_add(1, Relaxed);
        }
        self.confirm_count.fetch_add(1, Relaxed);
        self.confirm_sum_micros
            .fetch_add(latency.as_micros() as u64, Relaxed);
    }

    /// A browser's publish ended in `broker_unavailable`.
    pub fn publish_failed(&self, failure: PublishFailure) {
        self.publish_failures[failure as usize].fetch_add(1, Relaxed);
        log::warn!("publish failed ({}): {}", failure.as_str(), failure.message());
    }

    /// An `error` frame was sent to a browser.
    pub fn ws_error(&self, code: ErrorCode) {
        self.ws_errors[code as usize].fetch_add(1, Relaxed);
    }

    /// A link (`consumer` or `publisher`) reconnected after having been up before.
    pub fn reconnected(&self, link: &str) {
        match link {
            "consumer" => &self.reconnects_consumer,
            _ => &self.reconnects_publisher,
        }
        .fetch_add(1, Relaxed);
    }

    /// Renders every metric in Prometheus text exposition format (not a hot path).
    pub fn render(&self, consumer: &LinkState, publisher: &LinkState) -> String {
        let mut out = String::with_capacity(4096);
        let mut metric = |name: &str, kind: &str, help: &str, samples: &[(String, f64)]| {
            // Writing to a String cannot fail.
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, value) in samples {
                let _ = writeln!(out, "{name}{labels} {value}");
            }
        };
        let get = |counter: &AtomicU64| counter.load(Relaxed) as f64;
        let one = |value: f64| vec![(String::new(), value)];
        // Counter arrays are declared in the order of their enum's `ALL`.
        let labelled = |key: &str, names: &[&str], counters: &[AtomicU64]| -> Vec<(String, f64)> {
            names
                .iter()
                .zip(counters)
                .map(|(name, counter)| (format!("{{{key}=\"{name}\"}}"), get(counter)))
                .collect()
        };
        let per_link = |consumer: f64, publisher: f64| {
            vec![
                ("{link=\"consumer\"}".to_string(), consumer),
                ("{link=\"publisher\"}".to_string(), publisher),
            ]
        };
        let direction = |pairs: &[(&str, &AtomicU64)]| -> Vec<(String, f64)> {
            pairs
                .iter()
                .map(|(name, counter)| (format!("{{direction=\"{name}\"}}"), get(counter)))
                .collect()
        };
        let flag = |on: bool| if on { 1.0 } else { 0.0 };

        metric(
            "deskbridge_sessions",
            "gauge",
            "Open WebSocket sessions.",
            &one(self.sessions.load(Relaxed) as f64),
        );
        metric(
            "deskbridge_sessions_opened_total",
            "counter",
            "WebSocket sessions accepted.",
            &one(get(&self.sessions_opened)),
        );
        metric(
            "deskbridge_sessions_refused_total",
            "counter",
            "WebSocket upgrades refused at ws.max_sessions.",
            &one(get(&self.sessions_refused)),
        );
        metric(
            "deskbridge_sessions_slow_closed_total",
            "counter",
            "Sessions closed with 1013 because their outbound queue was full.",
            &one(get(&self.sessions_slow)),
        );
        metric(
            "deskbridge_sessions_stalled_total",
            "counter",
            "Connections dropped because the browser took no bytes for ws.client_timeout_ms.",
            &one(get(&self.sessions_stalled)),
        );
        metric(
            "deskbridge_messages_in_total",
            "counter",
            "Messages received, by direction.",
            &direction(&[
                ("desktop_to_web", &self.desktop_in),
                ("web_to_desktop", &self.web_in),
            ]),
        );
        metric(
            "deskbridge_messages_out_total",
            "counter",
            "Messages delivered: event frames queued to browsers, or publishes confirmed by the broker.",
            &direction(&[
                ("desktop_to_web", &self.desktop_out),
                ("web_to_desktop", &self.web_confirmed),
                ("web_to_web", &self.web_to_web_out),
            ]),
        );
        metric(
            "deskbridge_publish_unroutable_total",
            "counter",
            "Confirmed publishes the broker returned: no queue bound for the routing key.",
            &one(get(&self.unroutable)),
        );
        metric(
            "deskbridge_own_echo_total",
            "counter",
            "Deliveries of this instance's own publishes, acked and not delivered again.",
            &one(get(&self.own_echo)),
        );
        metric(
            "deskbridge_rejects_total",
            "counter",
            "Deliveries rejected to the dead-letter queue, by reason.",
            &labelled(
                "reason",
                &RejectReason::ALL.map(RejectReason::as_str),
                &self.rejects,
            ),
        );
        metric(
            "deskbridge_publish_failures_total",
            "counter",
            "Browser publishes answered with broker_unavailable, by reason.",
            &labelled(
                "reason",
                &PublishFailure::ALL.map(PublishFailure::as_str),
                &self.publish_failures,
            ),
        );
        metric(
            "deskbridge_ws_errors_total",
            "counter",
            "Error frames sent to browsers, by code.",
            &labelled("code", &ErrorCode::ALL.map(ErrorCode::as_str), &self.ws_errors),
        );
        let up = |link: &LinkState| flag(link.status() == LinkStatus::Up);
        metric(
            "deskbridge_amqp_link_up",
            "gauge",
            "1 when the AMQP link is connected.",
            &per_link(up(consumer), up(publisher)),
        );
        metric(
            "deskbridge_amqp_blocked",
            "gauge",
            "1 while the broker blocks the connection (flow control).",
            &per_link(flag(consumer.blocked()), flag(publisher.blocked())),
        );
        metric(
            "deskbridge_amqp_reconnects_total",
            "counter",
            "Reconnections after a lost AMQP connection.",
            &per_link(get(&self.reconnects_consumer), get(&self.reconnects_publisher)),
        );

        let _ = writeln!(
            out,
            "# HELP deskbridge_publish_confirm_seconds Browser publish to broker confirm.\n\
             # TYPE deskbridge_publish_confirm_seconds histogram"
        );
        let mut cumulative = 0;
        for (bound, bucket) in LATENCY_BUCKETS.iter().zip(&self.confirm_buckets) {
            cumulative += bucket.load(Relaxed);
            let _ = writeln!(
                out,
                "deskbridge_publish_confirm_seconds_bucket{{le=\"{bound}\"}} {cumulative}"
            );
        }
        let count = self.confirm_count.load(Relaxed);
        let _ = writeln!(
            out,
            "deskbridge_publish_confirm_seconds_bucket{{le=\"+Inf\"}} {count}"
        );
        let sum = self.confirm_sum_micros.load(Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "deskbridge_publish_confirm_seconds_sum {sum}");
        let _ = writeln!(out, "deskbridge_publish_confirm_seconds_count {count}");
        out
    }
}
