//! `Router`: the one place that knows who is subscribed to what.
//!
//! It owns the session registry and desk subscriptions, validates browser requests against the
//! [`Catalog`], applies transforms, and fans events out. Sessions send it [`FromSession`]
//! (connect, disconnect, subscribe, unsubscribe, publish) with `try_send`, so its mailbox,
//! `ws.max_queued_requests` deep, bounds what browsers can pile up; the AMQP consumer sends
//! [`DesktopBatch`]es and gets a [`Verdict`] for each event; the AMQP publisher sends
//! [`PublishOutcomes`]. Every frame it sends is serialized once and the bytes are shared; a
//! session whose queue is full is closed (1013), never waited for. It also runs the WebSocket
//! heartbeat for every session at once (`heartbeat.rs`).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use crate::lane::Frame;
use actix::prelude::*;
use actix_web_actors::ws::CloseCode;
use serde_json::value::to_raw_value;
use uuid::Uuid;

mod heartbeat;
mod history;
mod presence;
mod requests;

use crate::actors::messages::{
    BeginShutdown, CloseAll, DesktopBatch, DesktopReply, FromSession, FromStream, GetStats, JobKind, Outbox,
    Publish, PublishJob, PublishOutcome, PublishOutcomes, PublisherHandle, QueueError, Recipients, Rejection,
    ReplayHandle, RouterStats, Verdict,
};
use crate::auth::{Right, Rights};
use crate::catalog::{routing_key, Catalog};
use crate::config::{AuthMode, Config};
use crate::metrics::{Metrics, PublishFailure, RejectReason};
use crate::presence::{Change, Reason};
use crate::protocol::{ErrorCode, EventData, Origin, Refusal, ServerFrame, Since};
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
    /// `[history]` on: desk logs and sessions behind.
    history: Option<history::History>,
    /// Requests waiting for their answer, both ways.
    requests: requests::Requests,
    /// Who watches which desk, and the other instances' sessions.
    presence: presence::Presence,
    /// A session ended since the heap was last trimmed (see `heartbeat`).
    ended_since_trim: bool,
}

impl Router {
    /// A router for the configured desks and events; `instance` names this process among the
    /// instances (presence).
    pub fn new(
        instance: &str,
        config: Arc<Config>,
        catalog: Arc<Catalog>,
        transforms: Transforms,
        publisher: PublisherHandle,
        metrics: Arc<Metrics>,
        replays: Option<ReplayHandle>,
    ) -> Self {
        Router {
            history: replays.map(|replays| history::History::new(&config, catalog.desks(), replays)),
            requests: requests::Requests::default(),
            presence: presence::Presence::new(
                instance,
                std::time::Duration::from_millis(config.presence.heartbeat_ms),
            ),
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
            ended_since_trim: false,
        }
    }

    fn reply(&self, session: Uuid, frame: Frame) {
        if let Some(entry) = self.sessions.get(&session) {
            if entry.outbox.reply(&frame) == Err(QueueError::Full) {
                self.metrics.answers_unread(&session);
            }
        }
    }

    fn refuse(&self, session: Uuid, refusal: Refusal) {
        self.metrics.ws_error(refusal.code);
        self.reply(session, refusal.framed());
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
    fn fan_out(&mut self, desk: &str, frame: &Frame, except: Option<Uuid>) -> usize {
        let (delivered, failed) = self.offer(desk, frame, except);
        self.drop_failed(failed, desk);
        delivered
    }

    /// Queues `frame` to every live subscriber of `desk` but `except`, never waiting: how many
    /// took it, and the ones that could not (for the caller's slow-reader policy).
    fn offer(&self, desk: &str, frame: &Frame, except: Option<Uuid>) -> (usize, Vec<(Uuid, QueueError)>) {
        let Some(subscribers) = self.desks.get(desk) else {
            return (0, Vec::new());
        };
        let mut delivered = 0;
        let mut failed = Vec::new();
        for (id, outbox) in subscribers {
            if Some(*id) == except {
                continue;
            }
            match outbox.try_frame(frame) {
                Ok(()) => delivered += 1,
                Err(error) => failed.push((*id, error)),
            }
        }
        (delivered, failed)
    }

    /// Queues `frame` to the sessions a targeted message names (`x-to-session`, and every
    /// session of `x-to-user`), subscribed to `desk` or not; with auth, only those whose token
    /// may read `desk`. Returns how many got it.
    fn deliver_to(&mut self, to: &Recipients, desk: &str, frame: &Frame) -> Vec<Uuid> {
        let by_session = to.session.as_deref().and_then(|id| Uuid::parse_str(id).ok());
        let by_user = to
            .user
            .as_deref()
            .and_then(|user| self.users.get(user))
            .into_iter()
            .flatten()
            .copied();
        let chosen: HashSet<Uuid> = by_session.into_iter().chain(by_user).collect();
        let mut delivered = Vec::new();
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
            match entry.outbox.try_frame(frame) {
                Ok(()) => delivered.push(id),
                Err(error) => dropped.push((id, error)),
            }
        }
        self.drop_failed(dropped, desk);
        delivered
    }

    /// Delivers a targeted message (`desk`, `event`, `id`) to the sessions it names; when it
    /// is a request, they may answer it. Returns how many got it; none is counted.
    fn deliver_targeted(
        &mut self,
        to: &Recipients,
        (desk, event, id): (&str, &str, &str),
        frame: &Frame,
    ) -> usize {
        let reached = self.deliver_to(to, desk, frame);
        if reached.is_empty() {
            self.metrics
                .undeliverable(desk, to.session.as_deref(), to.user.as_deref());
            return 0;
        }
        let count = reached.len();
        if let Some(reply_to) = &to.reply {
            self.asked(id, desk, event, reply_to, reached);
        }
        count
    }

    /// Forgets sessions a frame could not reach; those too slow to take it are closed (1013).
    fn drop_failed(&mut self, dropped: Vec<(Uuid, QueueError)>, desk: &str) {
        for (id, error) in dropped {
            let reason = if matches!(error, QueueError::Full | QueueError::FrameLimit) {
                self.metrics.session_slow(&id, desk);
                if let Some(entry) = self.sessions.get(&id) {
                    entry
                        .outbox
                        .close(CloseCode::Again, "too slow: outbound queue full");
                }
                Reason::Slow
            } else {
                Reason::Closed
            };
            self.forget(id, reason);
        }
    }

    /// Removes a session and all its subscriptions, and says so (presence); a no-op for an
    /// unknown id.
    fn forget(&mut self, session: Uuid, reason: Reason) {
        if let Some(history) = self.history.as_mut() {
            history.forget(session);
        }
        let admitted = self.admitted(session);
        let Some(entry) = self.sessions.remove(&session) else {
            return;
        };
        self.ended_since_trim = true;
        for desk in &entry.desks {
            if let Some(subscribers) = self.desks.get_mut(desk) {
                subscribers.remove(&session);
            }
            self.presence.unwatch(session, desk);
        }
        let user = entry.identity.map(|identity| identity.0);
        if let Some(user) = &user {
            if let Some(sessions) = self.users.get_mut(user) {
                sessions.remove(&session);
                if sessions.is_empty() {
                    self.users.remove(user);
                }
            }
        }
        if admitted {
            let desks = entry.desks.into_iter().collect();
            self.announce(Change::Disconnected, (session, user), desks, Some(reason));
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
            kind: JobKind::Event,
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
        self.start_presence(ctx);
        self.start_heartbeat(ctx);
    }
}

impl Handler<FromSession> for Router {
    type Result = ();

    fn handle(&mut self, msg: FromSession, ctx: &mut Context<Self>) {
        match msg {
            FromSession::Connect(session, outbox) => {
                if self.shutting_down {
                    // Its handshake ended after the server stopped accepting: nothing would
                    // ever close it, and shutdown would wait for it.
                    outbox.close(CloseCode::Away, "server shutting down");
                    return;
                }
                let entry = SessionEntry {
                    outbox,
                    desks: HashSet::new(),
                    identity: None,
                };
                self.sessions.insert(session, entry);
                // With auth, a session is announced once its token is known.
                if self.config.auth.mode == AuthMode::None {
                    self.announce(Change::Connected, (session, None), Vec::new(), None);
                }
            }
            FromSession::Disconnect(session) => self.forget(session, Reason::Closed),
            FromSession::Subscribe {
                session,
                desks,
                since,
                presence,
                reference,
            } => {
                let since = since.map(|since| *since);
                self.subscribe_request(session, desks, since, presence, reference)
            }
            FromSession::Presence(session, desk, reference) => self.presence_query(session, desk, reference),
            FromSession::Drained(session) => self.drained(session),
            FromSession::Unsubscribe(session, desks, reference) => {
                self.unsubscribe(session, desks, reference)
            }
            FromSession::Publish(publish) => self.publish(publish),
            FromSession::Request(request, timeout) => self.request(request, timeout, ctx),
            FromSession::Reply(reply) => self.web_reply(reply),
            FromSession::Identify(session, user, rights) => self.identify(session, user, rights),
        }
    }
}

impl Router {
    /// A `subscribe`, live or resumed; the desks it added are announced (presence). Its
    /// answer (`subscribed` or `error`) echoes `reference`.
    fn subscribe_request(
        &mut self,
        session: Uuid,
        desks: Vec<String>,
        since: Option<BTreeMap<String, Since>>,
        presence: bool,
        reference: Option<String>,
    ) {
        let had = |router: &Router, desk: &String| {
            router
                .sessions
                .get(&session)
                .is_some_and(|entry| entry.desks.contains(desk))
        };
        let fresh: Vec<String> = desks.iter().filter(|desk| !had(self, desk)).cloned().collect();
        match since {
            None => self.subscribe(session, desks.clone(), reference),
            Some(since) => match self.check_desks(&desks) {
                Some(refusal) => self.refuse(session, Refusal { reference, ..refusal }),
                None => self.subscribe_since(session, desks.clone(), since, reference),
            },
        }
        let added: Vec<String> = fresh.into_iter().filter(|desk| had(self, desk)).collect();
        self.watch(session, &desks, presence);
        let user = self.user_of(session);
        self.announce(Change::Subscribed, (session, user), added, None);
    }

    fn subscribe(&mut self, session: Uuid, desks: Vec<String>, reference: Option<String>) {
        if let Some(refusal) = self.check_desks(&desks) {
            return self.refuse(session, Refusal { reference, ..refusal });
        }
        for desk in &desks {
            self.join_live(session, desk);
        }
        let subscribed = ServerFrame::Subscribed {
            desks: &desks,
            recovered: None,
            first_offset: None,
            reference: reference.as_deref(),
        };
        self.reply(session, subscribed.framed());
    }

    /// Adds `session` to the live subscribers of `desk` unless it is subscribed already.
    fn join_live(&mut self, session: Uuid, desk: &str) {
        let Some(entry) = self.sessions.get_mut(&session) else {
            return;
        };
        if entry.desks.insert(desk.to_owned()) {
            if let Some(subscribers) = self.desks.get_mut(desk) {
                subscribers.insert(session, entry.outbox.clone());
            }
        }
    }

    /// Removes `session` from `desk`, live or behind.
    fn leave(&mut self, session: Uuid, desk: &str) {
        if let Some(subscribers) = self.desks.get_mut(desk) {
            subscribers.remove(&session);
        }
        self.presence.unwatch(session, desk);
        if let Some(history) = self.history.as_mut() {
            history.leave(session, desk);
        }
    }

    fn unsubscribe(&mut self, session: Uuid, desks: Vec<String>, reference: Option<String>) {
        if let Some(refusal) = self.check_desks(&desks) {
            return self.refuse(session, Refusal { reference, ..refusal });
        }
        let Some(entry) = self.sessions.get_mut(&session) else {
            return;
        };
        let left: Vec<String> = desks
            .iter()
            .filter(|desk| entry.desks.remove(*desk))
            .cloned()
            .collect();
        for desk in &left {
            self.leave(session, desk);
        }
        let unsubscribed = ServerFrame::Unsubscribed {
            desks: &desks,
            reason: None,
            reference: reference.as_deref(),
        };
        self.reply(session, unsubscribed.framed());
        let user = self.user_of(session);
        self.announce(Change::Unsubscribed, (session, user), left, None);
    }

    /// A session signed in or refreshed: index its user, keep its rights, and leave the desks
    /// they no longer allow.
    fn identify(&mut self, session: Uuid, user: Arc<str>, rights: Rights) {
        let Some(entry) = self.sessions.get_mut(&session) else {
            return;
        };
        // A refresh keeps the user (the session checks it), so the index needs no removal.
        self.users.entry(Arc::clone(&user)).or_default().insert(session);
        let signed_in = entry.identity.is_none();
        let identity = entry.identity.insert(Box::new((Arc::clone(&user), rights)));
        let rights = &identity.1;
        let mut left: Vec<String> = entry
            .desks
            .iter()
            .filter(|desk| !rights.allows(desk, Right::Subscribe))
            .cloned()
            .collect();
        if signed_in {
            self.announce(
                Change::Connected,
                (session, Some(Arc::clone(&user))),
                Vec::new(),
                None,
            );
        }
        if left.is_empty() {
            return;
        }
        left.sort();
        if let Some(entry) = self.sessions.get_mut(&session) {
            for desk in &left {
                entry.desks.remove(desk);
            }
        }
        for desk in &left {
            self.leave(session, desk);
        }
        let unsubscribed = ServerFrame::Unsubscribed {
            desks: &left,
            reason: Some("permission"),
            reference: None,
        };
        self.reply(session, unsubscribed.framed());
        let reason = Some(Reason::Permission);
        self.announce(Change::Unsubscribed, (session, Some(user)), left, reason);
    }

    fn publish(&mut self, msg: Publish) {
        self.metrics.web_publish();
        let (session, reference) = (msg.session, msg.reference.clone());
        match self.prepare(msg) {
            Ok(job) => self.submit(job),
            Err(refusal) => self.refuse(session, Refusal { reference, ..refusal }),
        }
    }

    /// Hands a job to the publisher; a full outage buffer refuses it at once.
    fn submit(&mut self, job: PublishJob) {
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

impl Handler<DesktopBatch> for Router {
    type Result = ();

    fn handle(&mut self, batch: DesktopBatch, _: &mut Context<Self>) {
        // A run of events for one desk is queued to each subscriber as one buffer; a change of
        // desk or a targeted event ends the run, so every browser keeps the delivery order.
        let mut run = Run::new(self.max_run());
        let mut verdicts = Vec::with_capacity(batch.events.len());
        for mut msg in batch.events {
            let transformed = self.transform(&msg.desk, &msg.event, Direction::ToWeb, &mut msg.data);
            let outcome = match transformed {
                Ok(()) => {
                    let frame = ServerFrame::Event {
                        desk: &msg.desk,
                        event: &msg.event,
                        id: &msg.id,
                        origin: Origin::Desktop,
                        data: EventData::Object(&msg.data),
                        offset: None,
                        epoch: None,
                        reply_id: msg
                            .to
                            .as_ref()
                            .and_then(|to| to.reply.as_ref())
                            .map(|_| msg.id.as_str()),
                    }
                    .framed();
                    match msg.to.as_deref() {
                        None => {
                            if run.ends_before(&msg.desk, None, frame.len()) {
                                self.flush_run(&mut run);
                                run.start(std::mem::take(&mut msg.desk), None);
                            }
                            run.push(frame.len(), frame);
                        }
                        Some(to) => {
                            self.flush_run(&mut run);
                            let receivers =
                                self.deliver_targeted(to, (&msg.desk, &msg.event, &msg.id), &frame);
                            self.metrics.desktop_event(receivers);
                        }
                    }
                    Ok(())
                }
                Err(error) => Err(Rejection {
                    reason: RejectReason::TransformFailed,
                    routing_key: routing_key(&msg.desk, &msg.event),
                    detail: error.to_string(),
                }),
            };
            verdicts.push(Verdict {
                delivery_tag: msg.delivery_tag,
                outcome,
            });
        }
        self.flush_run(&mut run);
        // Only now is every event queued to every subscriber. The consumer is gone only when
        // its connection dropped; the broker redelivers then.
        for verdict in verdicts {
            let _ = batch.reply.send(verdict);
        }
    }
}

/// Consecutive events of one desk from one publisher (`None`: desktop events), framed, not yet
/// queued: they go to each subscriber as one buffer.
struct Run<T> {
    desk: String,
    except: Option<Uuid>,
    events: Vec<T>,
    bytes: usize,
    max_bytes: usize,
}

impl<T> Run<T> {
    /// An empty run of at most `max_bytes` (see [`Router::max_run`]).
    fn new(max_bytes: usize) -> Self {
        Run {
            desk: String::new(),
            except: None,
            events: Vec::new(),
            bytes: 0,
            max_bytes,
        }
    }

    /// True when an event of `desk` from `except`, `len` bytes framed, cannot join this run.
    fn ends_before(&self, desk: &str, except: Option<Uuid>, len: usize) -> bool {
        self.desk != desk || self.except != except || self.bytes + len > self.max_bytes
    }

    /// Begins the next run (the last one was flushed).
    fn start(&mut self, desk: String, except: Option<Uuid>) {
        self.desk = desk;
        self.except = except;
    }

    fn push(&mut self, len: usize, event: T) {
        self.bytes += len;
        self.events.push(event);
    }

    /// The desk and events, leaving the run empty.
    fn take(&mut self) -> (String, Vec<T>) {
        self.bytes = 0;
        (std::mem::take(&mut self.desk), std::mem::take(&mut self.events))
    }
}

/// Largest run queued as one buffer (also at most a quarter of `ws.outbound_queue_bytes`).
const MAX_RUN_BYTES: usize = 64 * 1024;

impl Router {
    /// The most bytes of events queued to a browser as one buffer: a quarter of the byte budget
    /// at most, so that a run never refuses a reader that would have taken its events one by
    /// one.
    fn max_run(&self) -> usize {
        MAX_RUN_BYTES.min(self.config.ws.outbound_queue_bytes / 4)
    }

    /// Queues the run's frames to the desk's subscribers as one buffer.
    fn flush_run(&mut self, run: &mut Run<Frame>) {
        if run.events.is_empty() {
            return;
        }
        let (desk, frames) = run.take();
        let receivers = self.fan_out(&desk, &Frame::join(&frames), None);
        for _ in &frames {
            self.metrics.desktop_event(receivers);
        }
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
        match (&job.kind, outcome.result) {
            (JobKind::Request, Ok(confirmed)) => {
                self.metrics.web_confirmed(confirmed.latency, confirmed.routed, 0);
                self.request_confirmed(&job, confirmed.routed);
            }
            (JobKind::Request, Err(failure)) => self.request_failed(&job, failure),
            (JobKind::Presence, result) => {
                self.metrics
                    .presence(if result.is_ok() { "published" } else { "failed" });
            }
            (JobKind::Reply { .. }, Ok(confirmed)) => {
                self.metrics.web_confirmed(confirmed.latency, confirmed.routed, 0);
                let ack = ServerFrame::Ack {
                    reference: job.reference.as_deref(),
                    id: &job.id,
                    routed: confirmed.routed,
                };
                self.reply(job.session, ack.framed());
            }
            (JobKind::Event, Ok(confirmed)) => {
                let ack = ServerFrame::Ack {
                    reference: job.reference.as_deref(),
                    id: &job.id,
                    routed: confirmed.routed,
                };
                self.reply(job.session, ack.framed());
                // With history, web events reach every instance's browsers through the stream.
                let others = self
                    .desks
                    .get(&job.desk)
                    .filter(|_| self.history.is_none())
                    .map_or(0, |subscribers| {
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
                        offset: None,
                        epoch: None,
                        reply_id: None,
                    }
                    .framed();
                    self.fan_out(&job.desk, &frame, Some(job.session))
                };
                self.metrics
                    .web_confirmed(confirmed.latency, confirmed.routed, receivers);
            }
            (JobKind::Event | JobKind::Reply { .. }, Err(failure)) => {
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
                .map(|(desk, subscribers)| {
                    let behind = self
                        .history
                        .as_ref()
                        .map_or(0, |history| history.behind_count(desk));
                    (desk.clone(), subscribers.len() + behind)
                })
                .collect(),
        })
    }
}

impl Handler<BeginShutdown> for Router {
    type Result = ();

    fn handle(&mut self, _: BeginShutdown, _: &mut Context<Self>) {
        self.presence_stopped();
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
        if let Some(history) = self.history.as_mut() {
            history.clear();
        }
    }
}

impl Handler<DesktopReply> for Router {
    type Result = ();

    fn handle(&mut self, msg: DesktopReply, _: &mut Context<Self>) {
        self.desktop_reply(msg);
    }
}

impl Handler<FromStream> for Router {
    type Result = ();

    fn handle(&mut self, msg: FromStream, _: &mut Context<Self>) {
        match msg {
            FromStream::Batch(items, done) => {
                if self.history.is_some() {
                    self.stream_items(items);
                }
                // The reader is gone only when its connection dropped; it reads on from its
                // last offset then.
                let _ = done.send(());
            }
            FromStream::Replayed(replayed) => {
                if self.history.is_some() {
                    self.replayed(replayed);
                }
            }
        }
    }
}
