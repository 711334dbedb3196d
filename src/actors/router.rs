//! `Router`: the one place that knows who is subscribed to what.
//!
//! It owns the session registry and desk subscriptions, validates desks and events, applies
//! transforms, and fans events out. Sessions send it `Connect`, `Disconnect`, `Subscribe`,
//! `Unsubscribe` and `Publish`; the AMQP consumer sends `Inbound` and gets a [`Verdict`] back;
//! the AMQP publisher sends `PublishOutcomes`. Every frame it sends is serialized once and the
//! bytes are shared; a session whose queue is full is closed (1013), never waited for.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use actix_web_actors::ws::CloseCode;
use bytestring::ByteString;
use crossbeam_channel::Sender;
use uuid::Uuid;

use crate::actors::amqp_consumer::Verdict;
use crate::actors::amqp_publisher::{PublishJob, PublisherHandle};
use crate::actors::session::{Outbox, QueueError};
use crate::config::Config;
use crate::metrics::{Metrics, PublishFailure, RejectReason};
use crate::protocol::{ErrorCode, Origin, Refusal, ServerFrame};
use crate::transform::{Data, Direction, Transforms};

/// A session started; `outbox` is how to reach it.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Connect {
    /// Session id.
    pub session: Uuid,
    /// The session's mailbox.
    pub outbox: Outbox,
}

/// A session ended; safe to receive twice.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Disconnect {
    /// Session id.
    pub session: Uuid,
}

/// A browser's `subscribe`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Subscribe {
    /// Session id.
    pub session: Uuid,
    /// Requested desks.
    pub desks: Vec<String>,
}

/// A browser's `unsubscribe`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Unsubscribe {
    /// Session id.
    pub session: Uuid,
    /// Desks to leave.
    pub desks: Vec<String>,
}

/// A browser's `publish`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Publish {
    /// Session id.
    pub session: Uuid,
    /// Desk name, not yet validated.
    pub desk: String,
    /// Event name, not yet validated.
    pub event: String,
    /// Payload in the web's field names.
    pub data: Data,
    /// Client's correlation id.
    pub reference: Option<String>,
}

/// A delivery from RabbitMQ, decoded and checked by the consumer (known desk and event, JSON
/// object body). The router answers on `reply` once every subscriber has it queued.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Inbound {
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
    /// Where the verdict goes.
    pub reply: Sender<Verdict>,
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

struct SessionEntry {
    outbox: Outbox,
    desks: HashSet<String>,
}

/// The central actor; see the module docs.
pub struct Router {
    config: Arc<Config>,
    sessions: HashMap<Uuid, SessionEntry>,
    /// desk → its subscribers' outboxes, so fan-out walks one map and looks nothing up.
    desks: HashMap<String, HashMap<Uuid, Outbox>>,
    events: HashSet<String>,
    transforms: Transforms,
    publisher: PublisherHandle,
    metrics: Arc<Metrics>,
    shutting_down: bool,
}

impl Router {
    /// A router for the configured desks and events.
    pub fn new(
        config: Arc<Config>,
        transforms: Transforms,
        publisher: PublisherHandle,
        metrics: Arc<Metrics>,
    ) -> Self {
        Router {
            desks: config
                .desks
                .iter()
                .map(|desk| (desk.clone(), HashMap::new()))
                .collect(),
            events: config.events.iter().cloned().collect(),
            config,
            sessions: HashMap::new(),
            transforms,
            publisher,
            metrics,
            shutting_down: false,
        }
    }

    fn reply(&self, session: Uuid, frame: ByteString) {
        if let Some(entry) = self.sessions.get(&session) {
            entry.outbox.reply(frame);
        }
    }

    fn refuse(&self, session: Uuid, refusal: Refusal) {
        self.metrics.ws_error(refusal.code);
        self.reply(session, refusal.to_frame());
    }

    /// Why `desks` cannot be used: empty (`bad_request`) or naming an unconfigured desk
    /// (`unknown_desk`, the first one); `None` when all are known.
    fn check_desks(&self, desks: &[String]) -> Option<Refusal> {
        if desks.is_empty() {
            return Some(Refusal::new(
                ErrorCode::BadRequest,
                "`desks` must name at least one desk",
            ));
        }
        desks
            .iter()
            .find(|desk| !self.desks.contains_key(*desk))
            .map(|desk| {
                Refusal::new(
                    ErrorCode::UnknownDesk,
                    format!(
                        "unknown desk `{desk}`; known desks: {}",
                        self.config.desks.join(", ")
                    ),
                )
            })
    }

    /// Queues `frame` to every subscriber of `desk` but `except`; closes the ones too slow to
    /// take it. Returns how many got it.
    fn fan_out(&mut self, desk: &str, frame: &ByteString, except: Option<Uuid>) -> usize {
        let Some(subscribers) = self.desks.get(desk) else {
            return 0;
        };
        let mut delivered = 0;
        let mut dropped: Vec<(Uuid, QueueError)> = Vec::new();
        for (id, outbox) in subscribers {
            if Some(*id) == except {
                continue;
            }
            match outbox.try_frame(frame.clone()) {
                Ok(()) => delivered += 1,
                Err(error) => dropped.push((*id, error)),
            }
        }
        for (id, error) in dropped {
            if error == QueueError::Full {
                self.metrics.session_slow(&id, desk);
                if let Some(entry) = self.sessions.get(&id) {
                    entry
                        .outbox
                        .close(CloseCode::Again, "too slow: outbound queue full");
                }
            }
            self.forget(id);
        }
        delivered
    }

    /// Removes a session and all its subscriptions; a no-op for an unknown id.
    fn forget(&mut self, session: Uuid) {
        if let Some(entry) = self.sessions.remove(&session) {
            for desk in entry.desks {
                if let Some(subscribers) = self.desks.get_mut(&desk) {
                    subscribers.remove(&session);
                }
            }
        }
    }

    /// Validates a publish and turns it into a job for the AMQP publisher.
    fn prepare(&self, msg: Publish) -> Result<PublishJob, Refusal> {
        if self.shutting_down {
            return Err(Refusal::new(
                ErrorCode::BrokerUnavailable,
                "the bridge is shutting down; the message was not sent",
            ));
        }
        if let Some(refusal) = self.check_desks(std::slice::from_ref(&msg.desk)) {
            return Err(refusal);
        }
        if !self.events.contains(&msg.event) {
            let known = self.config.events.join(", ");
            let message = format!("unknown event `{}`; known events: {known}", msg.event);
            return Err(Refusal::new(ErrorCode::UnknownEvent, message));
        }
        let body = if self
            .transforms
            .applies(&msg.desk, &msg.event, Direction::ToDesktop)
        {
            let mut data = msg.data.clone();
            self.transforms
                .apply(&msg.desk, &msg.event, Direction::ToDesktop, &mut data)
                .map_err(|e| Refusal::new(ErrorCode::TransformFailed, e.to_string()))?;
            serde_json::to_vec(&data)
        } else {
            serde_json::to_vec(&msg.data)
        }
        // A map of JSON values always serializes.
        .expect("JSON objects always serialize");
        Ok(PublishJob {
            routing_key: crate::amqp::routing_key(&msg.desk, &msg.event),
            id: Uuid::new_v4().to_string(),
            session: msg.session,
            reference: msg.reference,
            desk: msg.desk,
            event: msg.event,
            data: msg.data,
            body,
            enqueued: Instant::now(),
        })
    }
}

impl Actor for Router {
    type Context = Context<Self>;
}

impl Handler<Connect> for Router {
    type Result = ();

    fn handle(&mut self, msg: Connect, _: &mut Context<Self>) {
        let entry = SessionEntry {
            outbox: msg.outbox,
            desks: HashSet::new(),
        };
        self.sessions.insert(msg.session, entry);
    }
}

impl Handler<Disconnect> for Router {
    type Result = ();

    fn handle(&mut self, msg: Disconnect, _: &mut Context<Self>) {
        self.forget(msg.session);
    }
}

impl Handler<Subscribe> for Router {
    type Result = ();

    fn handle(&mut self, msg: Subscribe, _: &mut Context<Self>) {
        if let Some(refusal) = self.check_desks(&msg.desks) {
            return self.refuse(msg.session, refusal);
        }
        let Some(entry) = self.sessions.get_mut(&msg.session) else {
            return;
        };
        for desk in &msg.desks {
            if entry.desks.insert(desk.clone()) {
                if let Some(subscribers) = self.desks.get_mut(desk) {
                    subscribers.insert(msg.session, entry.outbox.clone());
                }
            }
        }
        self.reply(
            msg.session,
            ServerFrame::Subscribed { desks: &msg.desks }.to_text(),
        );
    }
}

impl Handler<Unsubscribe> for Router {
    type Result = ();

    fn handle(&mut self, msg: Unsubscribe, _: &mut Context<Self>) {
        if let Some(refusal) = self.check_desks(&msg.desks) {
            return self.refuse(msg.session, refusal);
        }
        let Some(entry) = self.sessions.get_mut(&msg.session) else {
            return;
        };
        for desk in &msg.desks {
            if entry.desks.remove(desk) {
                if let Some(subscribers) = self.desks.get_mut(desk) {
                    subscribers.remove(&msg.session);
                }
            }
        }
        self.reply(
            msg.session,
            ServerFrame::Unsubscribed { desks: &msg.desks }.to_text(),
        );
    }
}

impl Handler<Publish> for Router {
    type Result = ();

    fn handle(&mut self, msg: Publish, _: &mut Context<Self>) {
        self.metrics.web_publish();
        let (session, reference) = (msg.session, msg.reference.clone());
        let job = match self.prepare(msg) {
            Ok(job) => job,
            Err(refusal) => return self.refuse(session, Refusal { reference, ..refusal }),
        };
        if let Err(job) = self.publisher.submit(job) {
            self.metrics.publish_failed(PublishFailure::BufferFull);
            let refusal = Refusal::new(ErrorCode::BrokerUnavailable, PublishFailure::BufferFull.message());
            self.refuse(
                job.session,
                Refusal {
                    reference: job.reference,
                    ..refusal
                },
            );
        }
    }
}

impl Handler<Inbound> for Router {
    type Result = ();

    fn handle(&mut self, mut msg: Inbound, _: &mut Context<Self>) {
        let transformed = self
            .transforms
            .apply(&msg.desk, &msg.event, Direction::ToWeb, &mut msg.data);
        let outcome = match transformed {
            Ok(()) => {
                let frame = ServerFrame::Event {
                    desk: &msg.desk,
                    event: &msg.event,
                    id: &msg.id,
                    origin: Origin::Desktop,
                    data: &msg.data,
                }
                .to_text();
                let receivers = self.fan_out(&msg.desk, &frame, None);
                self.metrics.desktop_event(receivers);
                Ok(())
            }
            Err(error) => Err((
                RejectReason::TransformFailed,
                crate::amqp::routing_key(&msg.desk, &msg.event),
                error.to_string(),
            )),
        };
        // The consumer is gone only when its connection dropped; the broker redelivers then.
        let _ = msg.reply.send(Verdict {
            delivery_tag: msg.delivery_tag,
            outcome,
        });
    }
}

impl Handler<PublishOutcomes> for Router {
    type Result = ();

    fn handle(&mut self, msg: PublishOutcomes, _: &mut Context<Self>) {
        for outcome in msg.0 {
            self.settle(outcome);
        }
    }
}

impl Router {
    /// Tells the publisher its outcome; on success, fans the event out to the desk's other
    /// browsers (serialized only if there is one).
    fn settle(&mut self, outcome: PublishOutcome) {
        let job = outcome.job;
        match outcome.result {
            Ok(confirmed) => {
                let ack = ServerFrame::Ack {
                    reference: job.reference.as_deref(),
                    id: &job.id,
                    routed: confirmed.routed,
                };
                self.reply(job.session, ack.to_text());
                let others = self.desks.get(&job.desk).map_or(0, |subscribers| {
                    subscribers.len() - usize::from(subscribers.contains_key(&job.session))
                });
                let receivers = if others == 0 {
                    0
                } else {
                    let frame = ServerFrame::Event {
                        desk: &job.desk,
                        event: &job.event,
                        id: &job.id,
                        origin: Origin::Web,
                        data: &job.data,
                    }
                    .to_text();
                    self.fan_out(&job.desk, &frame, Some(job.session))
                };
                self.metrics
                    .web_confirmed(confirmed.latency, confirmed.routed, receivers);
            }
            Err(failure) => {
                self.metrics.publish_failed(failure);
                let refusal = Refusal {
                    reference: job.reference,
                    ..Refusal::new(ErrorCode::BrokerUnavailable, failure.message())
                };
                self.refuse(job.session, refusal);
            }
        }
    }
}

impl Handler<GetStats> for Router {
    type Result = MessageResult<GetStats>;

    fn handle(&mut self, _: GetStats, _: &mut Context<Self>) -> Self::Result {
        MessageResult(RouterStats {
            sessions: self.sessions.len(),
            desks: self
                .desks
                .iter()
                .map(|(desk, subscribers)| (desk.clone(), subscribers.len()))
                .collect(),
        })
    }
}

impl Handler<BeginShutdown> for Router {
    type Result = ();

    fn handle(&mut self, _: BeginShutdown, _: &mut Context<Self>) {
        self.shutting_down = true;
    }
}

impl Handler<CloseAll> for Router {
    type Result = ();

    fn handle(&mut self, _: CloseAll, _: &mut Context<Self>) {
        for entry in self.sessions.values() {
            entry.outbox.close(CloseCode::Away, "server shutting down");
        }
        self.sessions.clear();
        for subscribers in self.desks.values_mut() {
            subscribers.clear();
        }
    }
}
