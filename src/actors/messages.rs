//! Every typed message and handle the four actors exchange. Actor files name each other only
//! through this module, so each can be read, tested and changed alone.
//!
//! ```text
//!  session ──FromSession──▶ router ──PublishJob (PublisherHandle)──▶ publisher
//!  session ◀──ToSession (Outbox)── router ◀──PublishOutcomes── publisher
//!  consumer ──DesktopEvent──▶ router ──Verdict──▶ consumer
//!  lib / http ──GetStats, BeginShutdown, CloseAll──▶ router
//! ```

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use actix_web_actors::ws::CloseCode;
use bytestring::ByteString;
use crossbeam_channel::{Receiver, Sender};
use serde_json::value::RawValue;
use uuid::Uuid;

use crate::auth::Rights;
use crate::config::AmqpConfig;
use crate::metrics::{PublishFailure, RejectReason};
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
    Subscribe(Uuid, Vec<String>),
    /// A browser's `unsubscribe`.
    Unsubscribe(Uuid, Vec<String>),
    /// A browser's `publish`.
    Publish(Publish),
    /// The session's user and rights (its token, at sign-in and at every refresh): leave the
    /// desks they no longer allow; targeted messages find the session by this user.
    Identify(Uuid, Arc<str>, Rights),
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

// ---------------------------------------------------------------------------------------------
// router → session

/// Something the router sends to a session.
#[derive(Message)]
#[rtype(result = "()")]
pub enum ToSession {
    /// A serialized frame to write (shared bytes: one serialization for every receiver).
    Frame(ByteString),
    /// Close the socket with this code and reason.
    Close(CloseCode, &'static str),
}

/// Why a frame could not be queued for a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueError {
    /// Its outbound queue (frames or bytes) is full: the browser reads too slowly.
    Full,
    /// The session has ended.
    Gone,
}

/// What one queued frame costs beyond its text (the mailbox's envelope and node), so that the
/// byte budget bounds memory even for a flood of tiny frames.
pub const FRAME_OVERHEAD: usize = 96;

/// The router's handle to a session: its mailbox plus the byte count queued in it.
#[derive(Clone)]
pub struct Outbox {
    recipient: Recipient<ToSession>,
    queued_bytes: Arc<AtomicUsize>,
    max_bytes: usize,
}

impl Outbox {
    /// A handle to a session's mailbox that refuses frames past `max_bytes` queued.
    pub fn new(recipient: Recipient<ToSession>, queued_bytes: Arc<AtomicUsize>, max_bytes: usize) -> Self {
        Outbox {
            recipient,
            queued_bytes,
            max_bytes,
        }
    }

    /// Queues a fan-out frame without waiting; `Full` means the session is too slow.
    pub fn try_frame(&self, frame: ByteString) -> Result<(), QueueError> {
        let len = frame.len() + FRAME_OVERHEAD;
        if self.queued_bytes.fetch_add(len, Ordering::Relaxed) + len > self.max_bytes {
            self.queued_bytes.fetch_sub(len, Ordering::Relaxed);
            return Err(QueueError::Full);
        }
        self.recipient.try_send(ToSession::Frame(frame)).map_err(|error| {
            self.queued_bytes.fetch_sub(len, Ordering::Relaxed);
            match error {
                SendError::Full(_) => QueueError::Full,
                SendError::Closed(_) => QueueError::Gone,
            }
        })
    }

    /// Queues a reply (ack, error, subscribed...) whatever the queue's length: replies are
    /// bounded by the session's own requests, and dropping one would leave a request unanswered.
    pub fn reply(&self, frame: ByteString) {
        self.queued_bytes
            .fetch_add(frame.len() + FRAME_OVERHEAD, Ordering::Relaxed);
        // A closed mailbox means the session is ending; its Disconnect is on its way.
        self.recipient.do_send(ToSession::Frame(frame));
    }

    /// Asks the session to close.
    pub fn close(&self, code: CloseCode, reason: &'static str) {
        self.recipient.do_send(ToSession::Close(code, reason));
    }
}

// ---------------------------------------------------------------------------------------------
// consumer ⇄ router

/// A delivery from RabbitMQ, decoded and checked by the consumer (configured desk and event,
/// JSON object body). The router answers on `reply` once every subscriber has it queued.
#[derive(Message)]
#[rtype(result = "()")]
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
    /// Where the verdict goes.
    pub reply: Sender<Verdict>,
}

/// The browsers a targeted desktop message is for: a session, a user's sessions, or both.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Recipients {
    /// `x-to-session`: a session id from a `welcome`.
    pub session: Option<String>,
    /// `x-to-user`: a token's `sub`.
    pub user: Option<String>,
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

// ---------------------------------------------------------------------------------------------
// router ⇄ publisher

/// One browser publish on its way to RabbitMQ.
#[derive(Debug)]
pub struct PublishJob {
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

/// The router's end of the publisher: submit jobs within the budget
/// (`amqp.publish_buffer_messages`, `amqp.publish_buffer_bytes`).
#[derive(Clone)]
pub struct PublisherHandle {
    jobs: Sender<PublishJob>,
    budget: Arc<Budget>,
}

impl PublisherHandle {
    /// A handle and the publisher's receiving end.
    pub fn new(config: &AmqpConfig) -> (PublisherHandle, Receiver<PublishJob>) {
        let (jobs, receiver) = crossbeam_channel::unbounded();
        let budget = Arc::new(Budget {
            messages: AtomicUsize::new(0),
            bytes: AtomicUsize::new(0),
            max_messages: config.publish_buffer_messages,
            max_bytes: config.publish_buffer_bytes,
        });
        (PublisherHandle { jobs, budget }, receiver)
    }

    /// Hands a job to the publisher; gives it back when the buffer is full or the publisher
    /// has stopped.
    pub fn submit(&self, job: PublishJob) -> Result<(), Box<PublishJob>> {
        let bytes = job.held_bytes();
        if !self.budget.reserve(bytes) {
            return Err(Box::new(job));
        }
        self.jobs.send(job).map_err(|returned| {
            self.budget.release(bytes);
            Box::new(returned.0)
        })
    }

    /// The publisher let go of `job`: its place in the budget is free again.
    pub fn release(&self, job: &PublishJob) {
        self.budget.release(job.held_bytes());
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
