//! `Router`: the one place that knows who is subscribed to what.
//!
//! It owns the session registry and desk subscriptions, validates browser requests against the
//! [`Catalog`], applies transforms, and fans events out. Sessions send it [`FromSession`]
//! (connect, disconnect, subscribe, unsubscribe, publish) with `try_send`, so its mailbox,
//! `ws.max_queued_requests` deep, bounds what browsers can pile up; the AMQP consumer sends
//! [`DesktopEvent`]s and gets a [`Verdict`] for each; the AMQP publisher sends
//! [`PublishOutcomes`]. Every frame it sends is serialized once and the bytes are shared; a
//! session whose queue is full is closed (1013), never waited for.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use actix::prelude::*;
use actix_web_actors::ws::CloseCode;
use bytestring::ByteString;
use serde_json::value::to_raw_value;
use uuid::Uuid;

use crate::actors::messages::{
    BeginShutdown, CloseAll, DesktopEvent, FromSession, GetStats, Outbox, Publish, PublishJob,
    PublishOutcome, PublishOutcomes, PublisherHandle, QueueError, Recipients, Rejection, RouterStats,
    Verdict,
};
use crate::auth::{Right, Rights};
use crate::catalog::{routing_key, Catalog};
use crate::config::Config;
use crate::metrics::{Metrics, PublishFailure, RejectReason};
use crate::protocol::{ErrorCode, EventData, Origin, Refusal, ServerFrame};
use crate::transform::{Direction, TransformError, Transforms};

struct SessionEntry {
    outbox: Outbox,
    desks: HashSet<String>,
    /// The token's user and rights (`auth.mode = "jwt"`), once the session is signed in.
    identity: Option<Box<(Arc<str>, Rights)>>,
}

/// The central actor; see the module docs.
pub struct Router {
    config: Arc<Config>,
    catalog: Arc<Catalog>,
    sessions: HashMap<Uuid, SessionEntry>,
    /// desk → its subscribers' outboxes, so fan-out walks one map and looks nothing up.
    desks: HashMap<String, HashMap<Uuid, Outbox>>,
    /// user → their signed-in sessions, for `x-to-user`.
    users: HashMap<Arc<str>, HashSet<Uuid>>,
    transforms: Transforms,
    publisher: PublisherHandle,
    metrics: Arc<Metrics>,
    shutting_down: bool,
}

impl Router {
    /// A router for the configured desks and events.
    pub fn new(
        config: Arc<Config>,
        catalog: Arc<Catalog>,
        transforms: Transforms,
        publisher: PublisherHandle,
        metrics: Arc<Metrics>,
    ) -> Self {
        Router {
            desks: catalog
                .desks()
                .iter()
                .map(|desk| (desk.clone(), HashMap::new()))
                .collect(),
            catalog,
            config,
            users: HashMap::new(),
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
            .find_map(|desk| self.catalog.check_desk(desk).err())
            .map(|error| Refusal::new(ErrorCode::UnknownDesk, error.to_string()))
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
        self.drop_failed(dropped, desk);
        delivered
    }

    /// Queues `frame` to the sessions a targeted message names (`x-to-session`, and every
    /// session of `x-to-user`), subscribed to `desk` or not; with auth, only those whose token
    /// may read `desk`. Returns how many got it.
    fn deliver_to(&mut self, to: &Recipients, desk: &str, frame: &ByteString) -> usize {
        let by_session = to.session.as_deref().and_then(|id| Uuid::parse_str(id).ok());
        let by_user = to
            .user
            .as_deref()
            .and_then(|user| self.users.get(user))
            .into_iter()
            .flatten()
            .copied();
        let chosen: HashSet<Uuid> = by_session.into_iter().chain(by_user).collect();
        let mut delivered = 0;
        let mut dropped = Vec::new();
        for id in chosen {
            let Some(entry) = self.sessions.get(&id) else {
                continue;
            };
            let may_read = entry
                .identity
                .as_ref()
                .is_none_or(|identity| identity.1.allows(desk, Right::Subscribe));
            if !may_read {
                continue;
            }
            match entry.outbox.try_frame(frame.clone()) {
                Ok(()) => delivered += 1,
                Err(error) => dropped.push((id, error)),
            }
        }
        self.drop_failed(dropped, desk);
        delivered
    }

    /// Forgets sessions a frame could not reach; those too slow to take it are closed (1013).
    fn drop_failed(&mut self, dropped: Vec<(Uuid, QueueError)>, desk: &str) {
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
    }

    /// Removes a session and all its subscriptions; a no-op for an unknown id.
    fn forget(&mut self, session: Uuid) {
        if let Some(entry) = self.sessions.remove(&session) {
            for desk in entry.desks {
                if let Some(subscribers) = self.desks.get_mut(&desk) {
                    subscribers.remove(&session);
                }
            }
            if let Some(identity) = entry.identity {
                if let Some(sessions) = self.users.get_mut(&identity.0) {
                    sessions.remove(&session);
                    if sessions.is_empty() {
                        self.users.remove(&identity.0);
                    }
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
        if let Err(error) = self.catalog.check_event(&msg.event) {
            return Err(Refusal::new(ErrorCode::UnknownEvent, error.to_string()));
        }
        // The web copy of the data is kept only when transforms make the desktop's differ.
        let (body, web_data) = if self
            .transforms
            .applies(&msg.desk, &msg.event, Direction::ToDesktop)
        {
            let mut data = msg.data.clone();
            self.transform(&msg.desk, &msg.event, Direction::ToDesktop, &mut data)
                .map_err(|e| Refusal::new(ErrorCode::TransformFailed, e.to_string()))?;
            (to_raw_value(&data), Some(to_raw_value(&msg.data)))
        } else {
            (to_raw_value(&msg.data), None)
        };
        let internal =
            |e: serde_json::Error| Refusal::new(ErrorCode::Internal, format!("cannot encode data: {e}"));
        Ok(PublishJob {
            routing_key: routing_key(&msg.desk, &msg.event),
            id: Uuid::new_v4().to_string(),
            session: msg.session,
            user: msg.user,
            ttl: msg.ttl,
            reference: msg.reference,
            desk: msg.desk,
            event: msg.event,
            body: body.map_err(internal)?,
            web_data: web_data.transpose().map_err(internal)?,
            enqueued: Instant::now(),
        })
    }

    /// Runs the transforms for a message; a panicking one is counted and logged here.
    fn transform(
        &self,
        desk: &str,
        event: &str,
        direction: Direction,
        data: &mut crate::transform::Data,
    ) -> Result<(), TransformError> {
        let result = self.transforms.apply(desk, event, direction, data);
        if let Err(TransformError::Panicked(message)) = &result {
            self.metrics.transform_panicked(desk, event, message);
        }
        result
    }
}

impl Actor for Router {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(self.config.ws.max_queued_requests);
    }
}

impl Handler<FromSession> for Router {
    type Result = ();

    fn handle(&mut self, msg: FromSession, _: &mut Context<Self>) {
        match msg {
            FromSession::Connect(session, outbox) => {
                let entry = SessionEntry {
                    outbox,
                    desks: HashSet::new(),
                    identity: None,
                };
                self.sessions.insert(session, entry);
            }
            FromSession::Disconnect(session) => self.forget(session),
            FromSession::Subscribe(session, desks) => self.subscribe(session, desks),
            FromSession::Unsubscribe(session, desks) => self.unsubscribe(session, desks),
            FromSession::Publish(publish) => self.publish(publish),
            FromSession::Identify(session, user, rights) => self.identify(session, user, rights),
        }
    }
}

impl Router {
    fn subscribe(&mut self, session: Uuid, desks: Vec<String>) {
        if let Some(refusal) = self.check_desks(&desks) {
            return self.refuse(session, refusal);
        }
        let Some(entry) = self.sessions.get_mut(&session) else {
            return;
        };
        for desk in &desks {
            if entry.desks.insert(desk.clone()) {
                if let Some(subscribers) = self.desks.get_mut(desk) {
                    subscribers.insert(session, entry.outbox.clone());
                }
            }
        }
        self.reply(session, ServerFrame::Subscribed { desks: &desks }.to_text());
    }

    fn unsubscribe(&mut self, session: Uuid, desks: Vec<String>) {
        if let Some(refusal) = self.check_desks(&desks) {
            return self.refuse(session, refusal);
        }
        let Some(entry) = self.sessions.get_mut(&session) else {
            return;
        };
        for desk in &desks {
            if entry.desks.remove(desk) {
                if let Some(subscribers) = self.desks.get_mut(desk) {
                    subscribers.remove(&session);
                }
            }
        }
        let unsubscribed = ServerFrame::Unsubscribed {
            desks: &desks,
            reason: None,
        };
        self.reply(session, unsubscribed.to_text());
    }

    /// A session signed in or refreshed: index its user, keep its rights, and leave the desks
    /// they no longer allow.
    fn identify(&mut self, session: Uuid, user: Arc<str>, rights: Rights) {
        let Some(entry) = self.sessions.get_mut(&session) else {
            return;
        };
        // A refresh keeps the user (the session checks it), so the index needs no removal.
        self.users.entry(Arc::clone(&user)).or_default().insert(session);
        let identity = entry.identity.insert(Box::new((user, rights)));
        let rights = &identity.1;
        let mut left: Vec<String> = entry
            .desks
            .iter()
            .filter(|desk| !rights.allows(desk, Right::Subscribe))
            .cloned()
            .collect();
        if left.is_empty() {
            return;
        }
        left.sort();
        for desk in &left {
            entry.desks.remove(desk);
            if let Some(subscribers) = self.desks.get_mut(desk) {
                subscribers.remove(&session);
            }
        }
        let unsubscribed = ServerFrame::Unsubscribed {
            desks: &left,
            reason: Some("permission"),
        };
        self.reply(session, unsubscribed.to_text());
    }

    fn publish(&mut self, msg: Publish) {
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

impl Handler<DesktopEvent> for Router {
    type Result = ();

    fn handle(&mut self, mut msg: DesktopEvent, _: &mut Context<Self>) {
        let transformed = self.transform(&msg.desk, &msg.event, Direction::ToWeb, &mut msg.data);
        let outcome = match transformed {
            Ok(()) => {
                let frame = ServerFrame::Event {
                    desk: &msg.desk,
                    event: &msg.event,
                    id: &msg.id,
                    origin: Origin::Desktop,
                    data: EventData::Object(&msg.data),
                }
                .to_text();
                let receivers = match msg.to.as_deref() {
                    None => self.fan_out(&msg.desk, &frame, None),
                    Some(to) => {
                        let receivers = self.deliver_to(to, &msg.desk, &frame);
                        if receivers == 0 {
                            let (session, user) = (to.session.as_deref(), to.user.as_deref());
                            self.metrics.undeliverable(&msg.desk, session, user);
                        }
                        receivers
                    }
                };
                self.metrics.desktop_event(receivers);
                Ok(())
            }
            Err(error) => Err(Rejection {
                reason: RejectReason::TransformFailed,
                routing_key: routing_key(&msg.desk, &msg.event),
                detail: error.to_string(),
            }),
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
                        data: EventData::Json(job.web_data()),
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
