//! The counters behind `/metrics`, on the `prometheus-client` crate (OpenMetrics text).
//!
//! Every label comes from an enum, and every label value is created at start-up, so a series
//! is there (at 0) before its first event and alerts can rate it from the first scrape. Hot-path
//! counters are kept as handles into their family: counting an event is one relaxed atomic add.
//! Every notable event that is also logged goes through one method here, so logs and metrics
//! cannot drift apart.

use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::log_text::Untrusted;
use crate::protocol::ErrorCode;

/// Content type of [`Metrics::render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Why a delivery from RabbitMQ was rejected (no requeue; it goes to the dead-letter queue).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RejectReason {
    /// The body is not a JSON object.
    BadBody,
    /// The routing key names no configured desk (or has no `_`).
    UnknownDesk,
    /// The routing key names no configured event.
    UnknownEvent,
    /// A `to_web` transform refused the data (or panicked).
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PublishFailure {
    /// The outage buffer (count or bytes) was full.
    BufferFull,
    /// The broker stayed away longer than the publish TTL.
    Expired,
    /// The broker answered basic.nack.
    Nacked,
    /// The bridge shut down after publishing and before the broker confirmed.
    Shutdown,
    /// The bridge shut down before the message was ever handed to the broker.
    NotSent,
    /// The broker refused this one message by closing the channel over it (406 above its
    /// `max_message_size` or for an invalid property, 404 for a missing exchange).
    Refused,
}

impl PublishFailure {
    const ALL: [PublishFailure; 6] = [
        PublishFailure::BufferFull,
        PublishFailure::Expired,
        PublishFailure::Nacked,
        PublishFailure::Shutdown,
        PublishFailure::NotSent,
        PublishFailure::Refused,
    ];

    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            PublishFailure::BufferFull => "buffer_full",
            PublishFailure::Expired => "expired",
            PublishFailure::Nacked => "nacked",
            PublishFailure::Shutdown => "shutdown",
            PublishFailure::NotSent => "not_sent",
            PublishFailure::Refused => "refused",
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
            PublishFailure::NotSent => {
                "the bridge shut down before the message reached the broker; it was not sent"
            }
            PublishFailure::Refused => {
                "the broker refused this message (too large for its max_message_size, or a property it does not accept); it was not sent and retrying will not help"
            }
        }
    }
}

/// One of the two AMQP links.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Link {
    /// Desktop → web: consumes the inbound queue.
    Consumer,
    /// Web → desktop: publishes with confirms.
    Publisher,
}

impl Link {
    const ALL: [Link; 2] = [Link::Consumer, Link::Publisher];

    /// Label value, also the link's name in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Link::Consumer => "consumer",
            Link::Publisher => "publisher",
        }
    }
}

/// Which way messages travel, for the in/out counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Flow {
    DesktopToWeb,
    WebToDesktop,
    WebToWeb,
}

impl Flow {
    fn as_str(self) -> &'static str {
        match self {
            Flow::DesktopToWeb => "desktop_to_web",
            Flow::WebToDesktop => "web_to_desktop",
            Flow::WebToWeb => "web_to_web",
        }
    }
}

/// Why a browser frame was dropped without being handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dropped {
    /// Over `ws.max_frames_per_second`.
    RateLimited,
    /// The router's intake (`ws.max_queued_requests`) was full.
    RouterBusy,
}

impl Dropped {
    const ALL: [Dropped; 2] = [Dropped::RateLimited, Dropped::RouterBusy];

    fn as_str(self) -> &'static str {
        match self {
            Dropped::RateLimited => "rate_limited",
            Dropped::RouterBusy => "router_busy",
        }
    }
}

/// Implements `EncodeLabelValue` through each enum's `as_str`.
macro_rules! label_values {
    ($($kind:ty),*) => {$(
        impl EncodeLabelValue for $kind {
            fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
                EncodeLabelValue::encode(&self.as_str(), encoder)
            }
        }
    )*};
}
label_values!(RejectReason, PublishFailure, Link, Flow, Dropped, ErrorCode);

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RejectLabels {
    reason: RejectReason,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailureLabels {
    reason: PublishFailure,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DroppedLabels {
    reason: Dropped,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

/// How a browser's `request` ended (`deskbridge_requests_total{outcome}`).
pub const REQUEST_OUTCOMES: [&str; 6] = [
    "answered",
    "timeout",
    "no_responder",
    "bad_reply",
    "failed",
    "rate_limited",
];

/// How a desktop app's request to browsers ended (`deskbridge_desktop_requests_total{outcome}`).
pub const DESKTOP_REQUEST_OUTCOMES: [&str; 4] = ["answered", "expired", "unknown", "forbidden"];

/// What became of presence messages (`deskbridge_presence_messages_total{outcome}`).
pub const PRESENCE_OUTCOMES: [&str; 4] = ["published", "failed", "received", "garbage"];

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabels {
    code: ErrorCode,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LinkLabels {
    link: Link,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FlowLabels {
    direction: Flow,
}

/// Why a WebSocket handshake can be refused before a session exists (label values).
pub const HANDSHAKE_REFUSALS: [&str; 3] = ["origin", "too_many_per_ip", "host"];

/// Upper bounds (seconds) of the confirm-latency histogram buckets.
const LATENCY_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

/// A link's gauges, handed to its [`crate::link::LinkState`].
#[derive(Debug, Clone, Default)]
pub struct LinkGauges {
    /// 1 while connected.
    pub up: Gauge,
    /// 1 while the broker applies flow control.
    pub blocked: Gauge,
}

/// All counters of one bridge process.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    sessions: Gauge,
    sessions_opened: Counter,
    sessions_refused: Counter,
    sessions_slow: Counter,
    sessions_stalled: Counter,
    desktop_in: Counter,
    web_in: Counter,
    desktop_out: Counter,
    web_confirmed: Counter,
    web_to_web_out: Counter,
    unroutable: Counter,
    own_echo: Counter,
    expired: Counter,
    undeliverable: Counter,
    requests: Resolved<&'static str, OutcomeLabels>,
    desktop_requests: Resolved<&'static str, OutcomeLabels>,
    late_replies: Counter,
    presence_messages: Resolved<&'static str, OutcomeLabels>,
    presence_instances: Gauge,
    presence_instances_lost: Counter,
    transform_panics: Counter,
    history_skipped: Resolved<RejectReason, RejectLabels>,
    history_replayed: Counter,
    history_caught_up: Counter,
    history_gaps: Counter,
    rejects: Resolved<RejectReason, RejectLabels>,
    publish_failures: Resolved<PublishFailure, FailureLabels>,
    frames_dropped: Resolved<Dropped, DroppedLabels>,
    ws_errors: Resolved<ErrorCode, CodeLabels>,
    auth_failures: Resolved<&'static str, ReasonLabels>,
    handshakes_refused: Resolved<&'static str, ReasonLabels>,
    link_up: Family<LinkLabels, Gauge>,
    link_blocked: Family<LinkLabels, Gauge>,
    reconnects: Family<LinkLabels, Counter>,
    worker_panics: Family<LinkLabels, Counter>,
    confirm_seconds: Histogram,
}

/// A family with every label set in `labels` created, so each series exists from the start.
fn family<L, M>(labels: impl IntoIterator<Item = L>) -> Family<L, M>
where
    L: Clone + std::hash::Hash + Eq,
    M: Default,
{
    let family = Family::default();
    for label in labels {
        drop(family.get_or_create(&label));
    }
    family
}

/// A labelled counter family whose series are looked up once, at start-up, so that counting
/// takes no lock: a key not among them (none today) falls back to the family.
#[derive(Debug)]
struct Resolved<K, L: Clone + std::hash::Hash + Eq> {
    family: Family<L, Counter>,
    counters: Vec<(K, Counter)>,
    label: fn(K) -> L,
}

impl<K: Copy + PartialEq, L: Clone + std::hash::Hash + Eq> Resolved<K, L> {
    fn new(keys: impl IntoIterator<Item = K>, label: fn(K) -> L) -> Self {
        let family = Family::<L, Counter>::default();
        let counters = keys
            .into_iter()
            .map(|key| (key, family.get_or_create(&label(key)).clone()))
            .collect();
        Resolved {
            family,
            counters,
            label,
        }
    }

    fn inc(&self, key: K) {
        match self.counters.iter().find(|(known, _)| *known == key) {
            Some((_, counter)) => {
                counter.inc();
            }
            None => {
                self.family.get_or_create(&(self.label)(key)).inc();
            }
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// Registers every metric under its public name (`_total` is added to counters by the
    /// exposition format).
    pub fn new() -> Self {
        let flows = family::<FlowLabels, Counter>([]);
        let flow = |direction| flows.get_or_create(&FlowLabels { direction }).clone();
        let messages_out = family::<FlowLabels, Counter>([]);
        let out = |direction| messages_out.get_or_create(&FlowLabels { direction }).clone();
        let links = || Link::ALL.map(|link| LinkLabels { link });
        let mut metrics = Metrics {
            registry: Registry::default(),
            sessions: Gauge::default(),
            sessions_opened: Counter::default(),
            sessions_refused: Counter::default(),
            sessions_slow: Counter::default(),
            sessions_stalled: Counter::default(),
            desktop_in: flow(Flow::DesktopToWeb),
            web_in: flow(Flow::WebToDesktop),
            desktop_out: out(Flow::DesktopToWeb),
            web_confirmed: out(Flow::WebToDesktop),
            web_to_web_out: out(Flow::WebToWeb),
            unroutable: Counter::default(),
            own_echo: Counter::default(),
            expired: Counter::default(),
            undeliverable: Counter::default(),
            requests: Resolved::new(REQUEST_OUTCOMES, |outcome| OutcomeLabels { outcome }),
            desktop_requests: Resolved::new(DESKTOP_REQUEST_OUTCOMES, |outcome| OutcomeLabels { outcome }),
            late_replies: Counter::default(),
            presence_messages: Resolved::new(PRESENCE_OUTCOMES, |outcome| OutcomeLabels { outcome }),
            presence_instances: Gauge::default(),
            presence_instances_lost: Counter::default(),
            transform_panics: Counter::default(),
            history_skipped: Resolved::new(RejectReason::ALL, |reason| RejectLabels { reason }),
            history_replayed: Counter::default(),
            history_caught_up: Counter::default(),
            history_gaps: Counter::default(),
            rejects: Resolved::new(RejectReason::ALL, |reason| RejectLabels { reason }),
            publish_failures: Resolved::new(PublishFailure::ALL, |reason| FailureLabels { reason }),
            frames_dropped: Resolved::new(Dropped::ALL, |reason| DroppedLabels { reason }),
            ws_errors: Resolved::new(ErrorCode::ALL, |code| CodeLabels { code }),
            auth_failures: Resolved::new(crate::auth::AuthError::REASONS, |reason| ReasonLabels { reason }),
            handshakes_refused: Resolved::new(HANDSHAKE_REFUSALS, |reason| ReasonLabels { reason }),
            link_up: family(links()),
            link_blocked: family(links()),
            reconnects: family(links()),
            worker_panics: family(links()),
            confirm_seconds: Histogram::new(LATENCY_BUCKETS),
        };
        metrics.register_sessions_and_frames();
        metrics.register_messages(flows, messages_out);
        metrics.register_links();
        metrics
    }

    /// Sessions and what browsers send.
    fn register_sessions_and_frames(&mut self) {
        let r = &mut self.registry;
        r.register(
            "deskbridge_sessions",
            "Open WebSocket sessions",
            self.sessions.clone(),
        );
        r.register(
            "deskbridge_sessions_opened",
            "WebSocket sessions accepted",
            self.sessions_opened.clone(),
        );
        r.register(
            "deskbridge_sessions_refused",
            "WebSocket upgrades refused at ws.max_sessions",
            self.sessions_refused.clone(),
        );
        r.register(
            "deskbridge_sessions_slow_closed",
            "Sessions closed with 1013 because their outbound queue was full",
            self.sessions_slow.clone(),
        );
        r.register(
            "deskbridge_sessions_stalled",
            "Connections dropped because the browser took no bytes for ws.client_timeout_ms",
            self.sessions_stalled.clone(),
        );
        r.register(
            "deskbridge_ws_frames_dropped",
            "Browser frames dropped unhandled (one error frame per window tells the browser), by reason",
            self.frames_dropped.family.clone(),
        );
        r.register(
            "deskbridge_auth_failures",
            "Tokens refused (handshake, auth frame, refresh), by reason",
            self.auth_failures.family.clone(),
        );
        r.register(
            "deskbridge_handshakes_refused",
            "WebSocket handshakes refused before a session existed, by reason",
            self.handshakes_refused.family.clone(),
        );
        r.register(
            "deskbridge_ws_errors",
            "Error frames sent to browsers, by code",
            self.ws_errors.family.clone(),
        );
    }

    /// Messages through the bridge, their failures and latency.
    fn register_messages(
        &mut self,
        flows: Family<FlowLabels, Counter>,
        messages_out: Family<FlowLabels, Counter>,
    ) {
        let r = &mut self.registry;
        r.register("deskbridge_messages_in", "Messages received, by direction", flows);
        r.register(
            "deskbridge_messages_out",
            "Messages delivered: event frames queued to browsers, or publishes confirmed by the broker",
            messages_out,
        );
        r.register(
            "deskbridge_publish_unroutable",
            "Confirmed publishes the broker returned: no queue bound for the routing key",
            self.unroutable.clone(),
        );
        r.register(
            "deskbridge_undeliverable",
            "Targeted desktop messages (x-to-session / x-to-user) no connected session could take",
            self.undeliverable.clone(),
        );
        r.register(
            "deskbridge_requests",
            "Browser requests to desktop apps, by how they ended",
            self.requests.family.clone(),
        );
        r.register(
            "deskbridge_desktop_requests",
            "Desktop requests to browsers (targeted messages with reply_to), by how they ended",
            self.desktop_requests.family.clone(),
        );
        r.register(
            "deskbridge_late_replies",
            "Replies on the reply queue that matched no waiting request (timed out or answered already); dropped",
            self.late_replies.clone(),
        );
        r.register(
            "deskbridge_presence_messages",
            "Presence messages: published by this instance, failed to publish, received from other instances, or not understood",
            self.presence_messages.family.clone(),
        );
        r.register(
            "deskbridge_presence_instances",
            "Other instances whose heartbeats this instance receives",
            self.presence_instances.clone(),
        );
        r.register(
            "deskbridge_presence_instances_lost",
            "Other instances dropped from the presence view after 2.5 heartbeats of silence",
            self.presence_instances_lost.clone(),
        );
        r.register(
            "deskbridge_expired",
            "Desktop messages not delivered because their timestamp + expiration had passed",
            self.expired.clone(),
        );
        r.register(
            "deskbridge_transform_panics",
            "Code-registered transforms that panicked; the message was refused as transform_failed",
            self.transform_panics.clone(),
        );
        r.register(
            "deskbridge_own_echo",
            "Deliveries of this instance's own publishes, acked and not delivered again",
            self.own_echo.clone(),
        );
        r.register(
            "deskbridge_rejects",
            "Deliveries rejected to the dead-letter queue, by reason",
            self.rejects.family.clone(),
        );
        r.register(
            "deskbridge_history_skipped",
            "Stream messages skipped (streams cannot dead-letter): not a configured desk or event, or not a JSON object",
            self.history_skipped.family.clone(),
        );
        r.register(
            "deskbridge_history_replayed",
            "Events read back from desk streams for resumes, snapshots and slow readers",
            self.history_replayed.clone(),
        );
        r.register(
            "deskbridge_history_caught_up",
            "Times a session that fell behind (or resumed) reached live delivery again",
            self.history_caught_up.clone(),
        );
        r.register(
            "deskbridge_history_conflated",
            "Events a `latest` desk replaced by a newer value of the same key for a session behind",
            self.history_gaps.clone(),
        );
        r.register(
            "deskbridge_publish_failures",
            "Browser publishes answered with broker_unavailable, by reason",
            self.publish_failures.family.clone(),
        );
        r.register(
            "deskbridge_publish_confirm_seconds",
            "Browser publish to broker confirm",
            self.confirm_seconds.clone(),
        );
    }

    /// The AMQP links.
    fn register_links(&mut self) {
        let r = &mut self.registry;
        r.register(
            "deskbridge_amqp_link_up",
            "1 when the AMQP link is connected",
            self.link_up.clone(),
        );
        r.register(
            "deskbridge_amqp_blocked",
            "1 while the broker blocks the connection (flow control)",
            self.link_blocked.clone(),
        );
        r.register(
            "deskbridge_amqp_worker_panics",
            "AMQP worker panics; the link was reported down and restarted",
            self.worker_panics.clone(),
        );
        r.register(
            "deskbridge_amqp_reconnects",
            "Reconnections after a lost AMQP connection",
            self.reconnects.clone(),
        );
    }

    /// The gauges a link reports its state through.
    pub fn link_gauges(&self, link: Link) -> LinkGauges {
        let labels = LinkLabels { link };
        LinkGauges {
            up: self.link_up.get_or_create(&labels).clone(),
            blocked: self.link_blocked.get_or_create(&labels).clone(),
        }
    }

    /// Counts a new session unless `max` are open; false (logged, counted) when refused.
    pub fn try_open_session(&self, max: usize) -> bool {
        if self.sessions.inc() >= max as i64 {
            self.sessions.dec();
            self.sessions_refused.inc();
            log::warn!("refused a WebSocket session: {max} sessions already open (ws.max_sessions)");
            return false;
        }
        self.sessions_opened.inc();
        true
    }

    /// A session ended.
    pub fn session_closed(&self) {
        self.sessions.dec();
    }

    /// A session fell behind and was closed with 1013.
    pub fn session_slow(&self, session: &uuid::Uuid, desk: &str) {
        self.sessions_slow.inc();
        let desk = Untrusted(desk);
        log::warn!("closing session {session}: its outbound queue is full (slow reader on desk {desk})");
    }

    /// A session left so many answers (pongs, errors, replies, `presence`...) unread that
    /// they filled its byte budget; it is closed with 1013, counted as a slow reader.
    pub fn answers_unread(&self, session: &uuid::Uuid) {
        self.sessions_slow.inc();
        log::warn!("closing session {session}: its outbound queue is full of answers it does not read");
    }

    /// A browser took no bytes for `ws.client_timeout_ms` and its connection was dropped.
    pub fn session_stalled(&self, peer: Option<std::net::SocketAddr>, stall: Duration) {
        self.sessions_stalled.inc();
        log::warn!(
            "dropping the connection of {peer:?}: it took no bytes for {stall:?} (ws.client_timeout_ms)"
        );
    }

    /// A delivery from RabbitMQ was accepted and fanned out to `receivers` sessions.
    pub fn desktop_event(&self, receivers: usize) {
        self.desktop_in.inc();
        self.desktop_out.inc_by(receivers as u64);
    }

    /// A browser's publish read back from its desk's stream was queued to `receivers` other
    /// browsers (history on: web events reach every instance through the stream).
    pub fn web_event(&self, receivers: usize) {
        self.web_to_web_out.inc_by(receivers as u64);
    }

    /// A delivery from RabbitMQ was rejected.
    pub fn rejected(&self, reason: RejectReason, routing_key: &str, detail: &str) {
        self.rejects.inc(reason);
        let (routing_key, detail) = (Untrusted(routing_key), Untrusted(detail));
        log::warn!(
            "rejected delivery with routing key `{routing_key}` ({}): {detail}",
            reason.as_str()
        );
    }

    /// A delivery carried this instance's `x-instance`: it was acked and not delivered again.
    pub fn own_echo(&self) {
        self.own_echo.inc();
    }

    /// A targeted desktop message found none of its sessions; acked, not delivered.
    pub fn undeliverable(&self, desk: &str, session: Option<&str>, user: Option<&str>) {
        self.undeliverable.inc();
        let desk = Untrusted(desk);
        let session = Untrusted(format_args!("{session:?}"));
        let user = Untrusted(format_args!("{user:?}"));
        log::info!(
            "dropped a message for desk {desk}: no connected session matches x-to-session {session} / x-to-user {user}"
        );
    }

    /// A browser's request ended (`outcome` from [`REQUEST_OUTCOMES`]).
    pub fn request(&self, outcome: &'static str) {
        self.requests.inc(outcome);
    }

    /// A desktop app's request to browsers ended (`outcome` from [`DESKTOP_REQUEST_OUTCOMES`]).
    pub fn desktop_request(&self, outcome: &'static str) {
        self.desktop_requests.inc(outcome);
    }

    /// A reply matched no waiting request; dropped.
    pub fn late_reply(&self, correlation_id: Option<&str>) {
        self.late_replies.inc();
        let correlation_id = Untrusted(format_args!("{correlation_id:?}"));
        log::info!(
            "dropped a reply for no waiting request (late or repeated): correlation_id {correlation_id}"
        );
    }

    /// A presence message was published, failed, received or not understood (`outcome` from
    /// [`PRESENCE_OUTCOMES`]).
    pub fn presence(&self, outcome: &'static str) {
        self.presence_messages.inc(outcome);
    }

    /// How many other instances are alive in the presence view.
    pub fn presence_instances(&self, count: usize) {
        self.presence_instances
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    /// Another instance went silent and was dropped from the presence view.
    pub fn presence_instance_lost(&self, instance: &str, silent: Duration, sessions: usize) {
        self.presence_instances_lost.inc();
        let instance = Untrusted(instance);
        log::warn!(
            "instance {instance} sent no presence heartbeat for {silent:?}: its {sessions} session(s) left the presence view"
        );
    }

    /// A desktop message arrived after its expiration; acked, not delivered.
    pub fn expired(&self, routing_key: &str) {
        self.expired.inc();
        let routing_key = Untrusted(routing_key);
        log::debug!("dropped an expired message with routing key `{routing_key}`");
    }

    /// A stream message could not be delivered; it is skipped (a stream keeps it, unread).
    pub fn history_skipped(&self, reason: RejectReason, stream: &str, offset: u64, detail: &str) {
        self.history_skipped.inc(reason);
        let (stream, detail) = (Untrusted(stream), Untrusted(detail));
        log::warn!(
            "skipped message at offset {offset} of stream `{stream}` ({}): {detail}",
            reason.as_str()
        );
    }

    /// `events` were read back from a stream for a session.
    pub fn history_replayed(&self, events: usize) {
        self.history_replayed.inc_by(events as u64);
    }

    /// A session behind on a desk is live again.
    pub fn history_caught_up(&self) {
        self.history_caught_up.inc();
    }

    /// A `latest` desk dropped an older value for a session behind.
    pub fn history_conflated(&self) {
        self.history_gaps.inc();
    }

    /// A code-registered transform panicked.
    pub fn transform_panicked(&self, desk: &str, event: &str, message: &str) {
        self.transform_panics.inc();
        let (desk, event, message) = (Untrusted(desk), Untrusted(event), Untrusted(message));
        log::error!("a transform for {desk}/{event} panicked ({message}); the message is refused");
    }

    /// A browser asked to publish.
    pub fn web_publish(&self) {
        self.web_in.inc();
    }

    /// The broker confirmed a browser's publish after `latency`; `web_receivers` other browsers got it.
    pub fn web_confirmed(&self, latency: Duration, routed: bool, web_receivers: usize) {
        self.web_confirmed.inc();
        self.web_to_web_out.inc_by(web_receivers as u64);
        if !routed {
            self.unroutable.inc();
        }
        self.confirm_seconds.observe(latency.as_secs_f64());
    }

    /// A browser's publish ended in `broker_unavailable`.
    pub fn publish_failed(&self, failure: PublishFailure) {
        self.publish_failures.inc(failure);
        log::warn!("publish failed ({}): {}", failure.as_str(), failure.message());
    }

    /// A browser frame was dropped unhandled.
    pub fn frame_dropped(&self, reason: Dropped) {
        self.frames_dropped.inc(reason);
    }

    /// A token was refused; logged once here, never with the token.
    pub fn auth_failed(&self, peer: &dyn std::fmt::Display, error: &crate::auth::AuthError) {
        self.auth_failures.inc(error.reason());
        let error = Untrusted(error);
        log::warn!("refused the token of {peer}: {error}");
    }

    /// A handshake was refused (`reason` from [`HANDSHAKE_REFUSALS`]).
    pub fn handshake_refused(&self, peer: &dyn std::fmt::Display, reason: &'static str, detail: &str) {
        self.handshakes_refused.inc(reason);
        let detail = Untrusted(detail);
        log::warn!("refused a WebSocket handshake from {peer} ({reason}): {detail}");
    }

    /// An `error` frame was sent to a browser.
    pub fn ws_error(&self, code: ErrorCode) {
        self.ws_errors.inc(code);
    }

    /// A link reconnected after having been up before.
    pub fn reconnected(&self, link: Link) {
        self.reconnects.get_or_create(&LinkLabels { link }).inc();
    }

    /// An AMQP worker panicked.
    pub fn worker_panicked(&self, link: Link, message: &str) {
        self.worker_panics.get_or_create(&LinkLabels { link }).inc();
        log::error!(
            "the amqp {} worker panicked ({message}); its link is down and restarts",
            link.as_str()
        );
    }

    /// Every metric in OpenMetrics text format ([`CONTENT_TYPE`]); not a hot path.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(8192);
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_labelled_series_exists_before_its_first_event() {
        let text = Metrics::new().render();
        for line in [
            "deskbridge_sessions 0",
            "deskbridge_own_echo_total 0",
            "deskbridge_rejects_total{reason=\"bad_body\"} 0",
            "deskbridge_publish_failures_total{reason=\"not_sent\"} 0",
            "deskbridge_ws_errors_total{code=\"rate_limited\"} 0",
            "deskbridge_ws_frames_dropped_total{reason=\"router_busy\"} 0",
            "deskbridge_messages_in_total{direction=\"desktop_to_web\"} 0",
            "deskbridge_messages_out_total{direction=\"web_to_web\"} 0",
            "deskbridge_amqp_link_up{link=\"publisher\"} 0",
            "deskbridge_amqp_reconnects_total{link=\"consumer\"} 0",
            "deskbridge_amqp_worker_panics_total{link=\"publisher\"} 0",
            "deskbridge_transform_panics_total 0",
            "deskbridge_publish_confirm_seconds_count 0",
            "deskbridge_handshakes_refused_total{reason=\"host\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "missing `{line}` in:\n{text}");
        }
    }

    #[test]
    fn events_move_their_series() {
        let metrics = Metrics::new();
        metrics.desktop_event(3);
        metrics.web_confirmed(Duration::from_millis(3), false, 2);
        metrics.link_gauges(Link::Consumer).up.set(1);
        let text = metrics.render();
        for line in [
            "deskbridge_messages_in_total{direction=\"desktop_to_web\"} 1",
            "deskbridge_messages_out_total{direction=\"desktop_to_web\"} 3",
            "deskbridge_messages_out_total{direction=\"web_to_web\"} 2",
            "deskbridge_publish_unroutable_total 1",
            "deskbridge_amqp_link_up{link=\"consumer\"} 1",
            "deskbridge_publish_confirm_seconds_bucket{le=\"0.005\"} 1",
            "deskbridge_publish_confirm_seconds_count 1",
        ] {
            assert!(text.lines().any(|l| l == line), "missing `{line}` in:\n{text}");
        }
    }
}
