//! Every typed message and handle the four actors exchange. Actor files name each other only
//! through this module, so each can be read, tested and changed alone.
//!
//! ```text
//!  session ──FromSession──▶ router ──PublishJob (PublisherHandle)──▶ publisher
//!  session ◀──frames and close (Outbox: Lane)── router ◀──PublishOutcomes── publisher
//!  consumer ──DesktopBatch──▶ router ──Verdict──▶ consumer
//!  publisher ──DesktopReply, PresenceNotice──▶ router
//!  lib / http ──GetStats, BeginShutdown, CloseAll──▶ router
//! ```

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use actix_web_actors::ws::CloseCode;
use crossbeam_channel::{Receiver, Sender};
use serde_json::value::RawValue;
use uuid::Uuid;

use crate::auth::Rights;
use crate::config::AmqpConfig;
pub use crate::delivery::Recipients;
use crate::history::Start;
use crate::lane::Lane;
pub use crate::lane::{Frame, QueueError};
use crate::metrics::{PublishFailure, RejectReason};
use crate::presence::{Notice, PresenceError};
use crate::protocol::Since;
use crate::transform::Data;

// ---------------------------------------------------------------------------------------------
// session → router

/// Everything a session asks of the router, in one message type so that a session holds one
/// handle (its idle memory counts) and the router's intake has one bound.
#[derive(Message)]
#[rtype(result = "()")]
pub enum FromSession {
    /// The session started; `outbox` is how to reach it.
    Connect(Uuid, Outbox),
    /// The session ended; safe to receive twice.
    Disconnect(Uuid),
    /// A browser's `subscribe`.
    Subscribe {
        /// Session id.
        session: Uuid,
        /// Desk names.
        desks: Vec<String>,
        /// Where to start per desk (history on).
        since: Option<Box<BTreeMap<String, Since>>>,
        /// Also send `join` / `leave` for these desks.
        presence: bool,
        /// The op's `ref`, echoed in `subscribed` or `error`.
        reference: Option<String>,
    },
    /// A session that fell behind has room again (see [`Outbox::mark_behind`]); said by its
    /// connection's pump.
    Drained(Uuid),
    /// A browser's `unsubscribe`, with its `ref`.
    Unsubscribe(Uuid, Vec<String>, Option<String>),
    /// A browser's `publish`.
    Publish(Publish),
    /// A browser's `request`, answered within the timeout or refused.
    Request(Publish, Duration),
    /// A browser's `reply` to a desktop request.
    Reply(ReplyFromWeb),
    /// A browser's `presence` query for a desk, with its `ref`.
    Presence(Uuid, String, Option<String>),
    /// The session's user and rights (its token, at sign-in and at every refresh): leave the
    /// desks they no longer allow; targeted messages find the session by this user.
    Identify(Uuid, Arc<str>, Rights),
}

impl FromSession {
    /// The `ref` of the browser op this message carries (for a refusal when the router's
    /// intake is full).
    pub fn into_reference(self) -> Option<String> {
        match self {
            FromSession::Subscribe { reference, .. }
            | FromSession::Unsubscribe(_, _, reference)
            | FromSession::Presence(_, _, reference) => reference,
            FromSession::Publish(publish) | FromSession::Request(publish, _) => publish.reference,
            FromSession::Reply(reply) => reply.reference,
            FromSession::Connect(..)
            | FromSession::Disconnect(_)
            | FromSession::Drained(_)
            | FromSession::Identify(..) => None,
        }
    }
}

/// Every session's way to the router: one sender shared by all of them. Sharing it costs a
/// session no allocation, and makes the router's mailbox bound global: once a `try_send`
/// overfills it, every session is refused until the router catches up.
pub type RouterIntake = Arc<Recipient<FromSession>>;

/// A browser's `publish`, not yet validated.
pub struct Publish {
    /// Session id.
    pub session: Uuid,
    /// The token's `sub`, with `auth.mode = "jwt"`: sent as `x-user`.
    pub user: Option<Arc<str>>,
    /// How long the message stays worth delivering (`ttl_ms`).
    pub ttl: Option<Duration>,
    /// Desk name.
    pub desk: String,
    /// Event name.
    pub event: String,
    /// Payload in the web's field names.
    pub data: Data,
    /// Client's correlation id.
    pub reference: Option<String>,
}

/// A browser's answer to a desktop app's request.
#[derive(Debug)]
pub struct ReplyFromWeb {
    /// Session id.
    pub session: Uuid,
    /// The token's `sub`, sent as `x-user`.
    pub user: Option<Arc<str>>,
    /// The `reply_id` the browser answers.
    pub reply_id: String,
    /// The answer.
    pub data: Data,
    /// Client's correlation id.
    pub reference: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// router → session

/// A session's link to the router: its lane, for frames and for closing it (a close frame is
/// the lane's last; the connection's pump stops the session once it is written). One
/// allocation shared by the session, its pump and every desk the session reads.
#[derive(Clone)]
pub struct Outbox(Arc<Lane>);

impl Outbox {
    /// A link around `lane`.
    pub fn new(lane: Lane) -> Self {
        Outbox(Arc::new(lane))
    }

    /// The session's lane.
    pub fn lane(&self) -> &Lane {
        &self.0
    }

    /// Queues a fan-out frame without waiting; `Full` means the session is too slow.
    pub fn try_frame(&self, frame: &Frame) -> Result<(), QueueError> {
        self.0.try_push(frame)
    }

    /// Queues a reply (ack, error, subscribed...) within the byte budget, whatever the frame
    /// limit; `Full` means the session left its answers unread and is being closed (1013).
    pub fn reply(&self, frame: &Frame) -> Result<(), QueueError> {
        self.0.push(frame)
    }

    /// Asks for [`FromSession::Drained`] (said by the connection's pump) once half the
    /// session's byte budget is free.
    /// True when that is already so: then nothing will be said, and the caller goes on now.
    pub fn mark_behind(&self) -> bool {
        self.0.mark_behind()
    }

    /// True when a frame of `len` bytes fits the byte budget at all (into an empty queue).
    pub fn could_take(&self, len: usize) -> bool {
        self.0.could_take(len)
    }

    /// Closes the session with `code` and `reason`, after what was queued before.
    pub fn close(&self, code: CloseCode, reason: &'static str) {
        self.0.finish(&Frame::close(code.into(), reason));
    }
}

// ---------------------------------------------------------------------------------------------
// consumer ⇄ router

/// The deliveries the consumer had received, in order, as one message: the router frames a run
/// of events of one desk into one buffer and queues it once per subscriber.
#[derive(Message)]
#[rtype(result = "()")]
pub struct DesktopBatch {
    /// The deliveries, in the order the broker sent them.
    pub events: Vec<DesktopEvent>,
    /// Where the verdicts go, one per event, once the whole batch is queued.
    pub reply: Sender<Verdict>,
}

/// A delivery from RabbitMQ, decoded and checked by the consumer (configured desk and event,
/// JSON object body). The router answers on its batch's `reply` once every subscriber has it
/// queued.
pub struct DesktopEvent {
    /// AMQP delivery tag, echoed in the verdict.
    pub delivery_tag: u64,
    /// Desk name.
    pub desk: String,
    /// Event name.
    pub event: String,
    /// AMQP message_id, or one the bridge made.
    pub id: String,
    /// Payload in the desktop's field names.
    pub data: Data,
    /// Only for these browsers (`x-to-session` / `x-to-user`), not the desk's subscribers.
    pub to: Option<Box<Recipients>>,
}

/// The router's answer for one delivery.
#[derive(Debug)]
pub struct Verdict {
    /// Delivery tag of the [`DesktopEvent`] it answers.
    pub delivery_tag: u64,
    /// `Ok` to ack; otherwise reject without requeue.
    pub outcome: Result<(), Rejection>,
}

/// Why a delivery is rejected to the dead-letter queue.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejection {
    /// Counted reason.
    pub reason: RejectReason,
    /// The delivery's routing key, for the log.
    pub routing_key: String,
    /// What exactly was wrong.
    pub detail: String,
}

/// A message from the presence exchange, read (and parsed) by the publisher's connection;
/// this instance's own messages are left out.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct PresenceNotice(pub Result<Notice, PresenceError>);

/// An answer to a browser's request, read from this instance's reply queue.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct DesktopReply {
    /// Its `correlation_id`: the request's id.
    pub correlation_id: Option<String>,
    /// The answer, as the desktop app sent it.
    pub body: Vec<u8>,
}

// ---------------------------------------------------------------------------------------------
// stream reader ⇄ router (history on)

/// What the stream reader tells the router.
#[derive(Message)]
#[rtype(result = "()")]
pub enum FromStream {
    /// Live stream items, in stream order per desk; the router answers on `done` once they
    /// are handled, which is what lets the reader take more (a bounded number in flight).
    Batch(Vec<StreamItem>, Sender<()>),
    /// What a [`ReplayRequest`] read.
    Replayed(Replayed),
}

/// One live item of a desk's stream.
pub enum StreamItem {
    /// An event to deliver.
    Event(StreamEvent),
    /// The reader is attached to a desk's stream and everything after `base` comes live.
    Opened(DeskOpened),
}

/// A desk's stream is read live from after `base`.
#[derive(Debug, Clone)]
pub struct DeskOpened {
    /// Desk name.
    pub desk: String,
    /// The stream's life.
    pub epoch: Arc<str>,
    /// Every event after this offset comes live; those up to it are in the stream.
    pub base: u64,
    /// The first retained offset when the stream was opened.
    pub first_offset: Option<u64>,
    /// The same life as before a reconnect, read on from the last offset: nothing was missed,
    /// and what the router holds stays valid.
    pub continued: bool,
}

/// An event read from a desk's stream.
#[derive(Debug)]
pub struct StreamEvent {
    /// Desk name.
    pub desk: String,
    /// Event name.
    pub event: String,
    /// Position in the stream.
    pub offset: u64,
    /// AMQP message_id, or one the bridge made.
    pub id: String,
    /// Payload in the desktop's field names.
    pub data: Data,
    /// The browser session that published it (a web event), which must not get it back.
    pub from_session: Option<Uuid>,
    /// Only for these browsers (`x-to-session` / `x-to-user`).
    pub to: Option<Box<Recipients>>,
}

/// Read part of a desk's stream for one session (a resume, a snapshot, or a slow reader).
#[derive(Debug, Clone)]
pub struct ReplayRequest {
    /// For whom.
    pub session: Uuid,
    /// Desk name.
    pub desk: String,
    /// Where to start reading.
    pub from: Start,
    /// The last offset to read (one known to exist).
    pub until: u64,
    /// Stop after this many events (the rest is asked for again); with `keep_last`, read the
    /// whole range and keep only the last ones.
    pub max_events: usize,
    /// Keep only the last this many events (a snapshot).
    pub keep_last: Option<usize>,
}

/// The answer to a [`ReplayRequest`].
#[derive(Debug)]
pub struct Replayed {
    /// The request.
    pub request: ReplayRequest,
    /// What was read, or why nothing could be.
    pub result: Result<ReplayedEvents, String>,
}

/// Events a replay read.
#[derive(Debug, Default)]
pub struct ReplayedEvents {
    /// Events in stream order (markers, garbage and targeted messages left out).
    pub events: Vec<StreamEvent>,
    /// The offset of the first message read: the start offset if it is still retained.
    pub first_seen: Option<u64>,
    /// The last offset read.
    pub reached: Option<u64>,
    /// True when `until` was reached.
    pub complete: bool,
}

/// How the router asks the stream reader for replays.
pub type ReplayHandle = Sender<ReplayRequest>;

// ---------------------------------------------------------------------------------------------
// router ⇄ publisher

/// What a [`PublishJob`] carries, which decides where it goes and what its confirm means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobKind {
    /// A `publish`: an event for the desk's desktop apps, and its other browsers once confirmed.
    Event,
    /// A `request`: goes out with this instance's reply queue as `reply_to` and its id as
    /// `correlation_id`; unrouted means nobody can answer.
    Request,
    /// A `reply` to a desktop request: to the queue `routing_key` names (default exchange).
    Reply {
        /// The desktop request's `correlation_id` (or `message_id`).
        correlation_id: String,
    },
    /// A presence message: to `amqp.presence_exchange` with `routing_key`; no browser waits.
    Presence,
}

/// One message on its way to RabbitMQ: a browser's publish, request or reply, or presence.
#[derive(Debug)]
pub struct PublishJob {
    /// A publish, a request or a reply.
    pub kind: JobKind,
    /// AMQP message_id; also the `id` of the browser's ack and of the web event.
    pub id: String,
    /// Publishing session.
    pub session: Uuid,
    /// The publishing user, sent as `x-user`.
    pub user: Option<Arc<str>>,
    /// The browser's `ttl_ms`: sent as AMQP `expiration` (what is left of it), and the job
    /// expires in the outage buffer when it passes.
    pub ttl: Option<Duration>,
    /// The browser's `ref`.
    pub reference: Option<String>,
    /// Desk, for the web fan-out after the confirm.
    pub desk: String,
    /// Event name, for the web fan-out.
    pub event: String,
    /// `{desk}_{event}`.
    pub routing_key: String,
    /// JSON body after `to_desktop` transforms.
    pub body: Box<RawValue>,
    /// The data in the web's field names when transforms changed it for the desktop; `None`
    /// when `body` is the same JSON (the common case: one copy held, not two).
    pub web_data: Option<Box<RawValue>>,
    /// When the router accepted it, for the TTL.
    pub enqueued: Instant,
}

impl PublishJob {
    /// The data as other browsers see it.
    pub fn web_data(&self) -> &RawValue {
        self.web_data.as_deref().unwrap_or(&self.body)
    }

    /// When it stops being worth sending: after `buffer_ttl` (`amqp.publish_ttl_ms`) or its
    /// own `ttl`, whichever is shorter.
    pub fn deadline(&self, buffer_ttl: Duration) -> Instant {
        self.enqueued + self.ttl.map_or(buffer_ttl, |own| own.min(buffer_ttl))
    }

    /// True once [`PublishJob::deadline`] has passed.
    pub fn expired(&self, buffer_ttl: Duration) -> bool {
        Instant::now() >= self.deadline(buffer_ttl)
    }

    /// Memory this job holds, for the publish buffer's byte budget.
    pub fn held_bytes(&self) -> usize {
        std::mem::size_of::<PublishJob>()
            + self.id.capacity()
            + self.reference.as_ref().map_or(0, String::capacity)
            + self.user.as_ref().map_or(0, |user| user.len())
            + self.desk.capacity()
            + self.event.capacity()
            + self.routing_key.capacity()
            + self.body.get().len()
            + self.web_data.as_ref().map_or(0, |data| data.get().len())
    }
}

/// Counts what the publisher holds, so that an outage cannot grow memory without bound.
#[derive(Debug)]
struct Budget {
    messages: AtomicUsize,
    bytes: AtomicUsize,
    max_messages: usize,
    max_bytes: usize,
}

impl Budget {
    fn reserve(&self, bytes: usize) -> bool {
        let messages = self.messages.fetch_add(1, Ordering::AcqRel) + 1;
        let total = self.bytes.fetch_add(bytes, Ordering::AcqRel) + bytes;
        if messages > self.max_messages || total > self.max_bytes {
            self.release(bytes);
            return false;
        }
        true
    }

    fn release(&self, bytes: usize) {
        self.messages.fetch_sub(1, Ordering::AcqRel);
        self.bytes.fetch_sub(bytes, Ordering::AcqRel);
    }
}

/// Presence messages held at once (buffered or unconfirmed), apart from browsers' publishes
/// so that they never take a browser's place; past it they are dropped (the next heartbeat
/// carries the state again).
const PRESENCE_BUFFER_MESSAGES: usize = 4_096;
/// Bytes of presence messages held at once (a heartbeat of 10 000 sessions is about 1 MB).
const PRESENCE_BUFFER_BYTES: usize = 16 * 1024 * 1024;

/// The router's end of the publisher: submit jobs within the budget
/// (`amqp.publish_buffer_messages`, `amqp.publish_buffer_bytes`; presence has its own).
#[derive(Clone)]
pub struct PublisherHandle {
    jobs: Sender<PublishJob>,
    budget: Arc<Budget>,
    presence_budget: Arc<Budget>,
}

impl PublisherHandle {
    /// A handle and the publisher's receiving end.
    pub fn new(config: &AmqpConfig) -> (PublisherHandle, Receiver<PublishJob>) {
        let (jobs, receiver) = crossbeam_channel::unbounded();
        let budget = |max_messages, max_bytes| {
            Arc::new(Budget {
                messages: AtomicUsize::new(0),
                bytes: AtomicUsize::new(0),
                max_messages,
                max_bytes,
            })
        };
        let handle = PublisherHandle {
            jobs,
            budget: budget(config.publish_buffer_messages, config.publish_buffer_bytes),
            presence_budget: budget(PRESENCE_BUFFER_MESSAGES, PRESENCE_BUFFER_BYTES),
        };
        (handle, receiver)
    }

    fn budget_of(&self, job: &PublishJob) -> &Budget {
        match job.kind {
            JobKind::Presence => &self.presence_budget,
            JobKind::Event | JobKind::Request | JobKind::Reply { .. } => &self.budget,
        }
    }

    /// Hands a job to the publisher; gives it back when the buffer is full or the publisher
    /// has stopped.
    pub fn submit(&self, job: PublishJob) -> Result<(), Box<PublishJob>> {
        let bytes = job.held_bytes();
        let budget = self.budget_of(&job);
        if !budget.reserve(bytes) {
            return Err(Box::new(job));
        }
        self.jobs.send(job).map_err(|returned| {
            budget.release(bytes);
            Box::new(returned.0)
        })
    }

    /// The publisher let go of `job`: its place in the budget is free again.
    pub fn release(&self, job: &PublishJob) {
        self.budget_of(job).release(job.held_bytes());
    }
}

/// How browsers' publishes ended at the broker: everything one broker confirm settled, so
/// that a burst of confirms costs the router one wake-up, not one per message.
#[derive(Message)]
#[rtype(result = "()")]
pub struct PublishOutcomes(pub Vec<PublishOutcome>);

/// How one browser publish ended at the broker.
pub struct PublishOutcome {
    /// The publish, handed back.
    pub job: PublishJob,
    /// Confirmed, or why not.
    pub result: Result<Confirmed, PublishFailure>,
}

/// The broker confirmed a publish.
#[derive(Debug, Clone, Copy)]
pub struct Confirmed {
    /// False when the broker returned it (no queue bound for its routing key).
    pub routed: bool,
    /// Publish → confirm.
    pub latency: Duration,
}

// ---------------------------------------------------------------------------------------------
// the outside → router

/// Sessions and subscriptions, for `/health`.
#[derive(Debug, Clone, Default)]
pub struct RouterStats {
    /// Registered sessions.
    pub sessions: usize,
    /// Subscribed sessions per desk.
    pub desks: BTreeMap<String, usize>,
}

/// Asks for [`RouterStats`].
#[derive(Message)]
#[rtype(result = "RouterStats")]
pub struct GetStats;

/// Shutdown has begun: refuse new publishes from now on.
#[derive(Message)]
#[rtype(result = "()")]
pub struct BeginShutdown;

/// Close every session (1001 going away) and forget them.
#[derive(Message)]
#[rtype(result = "()")]
pub struct CloseAll;
