//! The router's side of `[history]`: live delivery from the desk streams, resumes
//! (`since`), snapshots, and sessions that fell behind (`catch_up`, `latest`).
//!
//! Each desk keeps a [`DeskLog`] of its newest framed events. A session is either *live* on a
//! desk (in the router's subscriber map: it gets each event as it comes) or *behind* (here,
//! with a cursor: the offset of the last event it has). A session behind is fed from the log
//! when the log holds what follows its cursor, and otherwise from the stream through the
//! reader ([`ReplayRequest`], one at a time per instance); each time its queue is full it waits
//! for [`FromSession::Drained`]. Because the router handles one message at a time, moving a
//! session from the end of the log to the live map leaves no gap and no duplicate.
//!
//! [`FromSession::Drained`]: crate::actors::messages::FromSession::Drained

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use crate::lane::Frame;
use actix_web_actors::ws::CloseCode;
use uuid::Uuid;

use super::{Router, Run};
use crate::actors::messages::{
    DeskOpened, Outbox, QueueError, ReplayHandle, ReplayRequest, Replayed, ReplayedEvents, StreamEvent,
    StreamItem,
};
use crate::config::{Config, SlowPolicy};
use crate::desk_log::{DeskLog, Logged};
use crate::history::Start;
use crate::log_text::Untrusted;
use crate::metrics::RejectReason;
use crate::presence::Reason;
use crate::protocol::{ErrorCode, EventData, Origin, Refusal, ServerFrame, Since};
use crate::transform::Direction;

/// Every desk's history state, and the way to the stream reader.
pub(super) struct History {
    desks: HashMap<String, DeskHistory>,
    replays: ReplayHandle,
    /// Subscribes with `since` waiting for a replay before their `subscribed` can go out.
    pending: HashMap<Uuid, PendingSubscribe>,
}

struct DeskHistory {
    log: DeskLog,
    /// Set once the reader is attached to the desk's stream.
    epoch: Option<Arc<str>>,
    first_offset: Option<u64>,
    policy: SlowPolicy,
    conflate_key: Option<String>,
    behind: HashMap<Uuid, Behind>,
}

/// A session behind on a desk.
struct Behind {
    outbox: Outbox,
    /// The offset of the last event it has; `None`: it starts at the first retained one.
    after: Option<u64>,
    state: State,
    /// For `latest` desks: the newest event per key, waiting.
    latest: Option<Box<Conflated>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Its `subscribed` has not gone out yet.
    Starting,
    /// Waiting for room in its queue.
    Waiting,
    /// A replay for it is being read.
    Replaying,
    /// Its cursor is past what this instance has seen (resumed from an instance further on):
    /// fed as live events come.
    Ahead,
}

/// A `latest` desk's events for a session behind: the newest per key, in offset order.
#[derive(Default)]
struct Conflated {
    by_offset: BTreeMap<u64, (Option<Box<str>>, Frame)>,
    by_key: HashMap<Box<str>, u64>,
    bytes: usize,
    dropped: u64,
}

struct PendingSubscribe {
    desks: Vec<String>,
    recovered: BTreeMap<String, bool>,
    first_offset: BTreeMap<String, u64>,
    waiting: HashSet<String>,
    /// Events the first replay of each desk read, held until `subscribed` goes out.
    held: HashMap<String, ReplayedEvents>,
    /// The subscribe's `ref`, echoed in `subscribed`.
    reference: Option<String>,
}

/// How a resumed desk starts: its cursor, and the stream read it needs first (none: the log
/// holds everything after the cursor).
struct Plan {
    after: Option<u64>,
    replay: Option<ReplayRequest>,
}

impl History {
    /// History state for every desk of `config`.
    pub(super) fn new(config: &Config, desks: &[String], replays: ReplayHandle) -> Self {
        let desks = desks
            .iter()
            .map(|desk| {
                let (policy, key) = config.slow_policy(desk);
                let state = DeskHistory {
                    log: DeskLog::new(config.history.memory_bytes),
                    epoch: None,
                    first_offset: None,
                    policy,
                    conflate_key: key.map(str::to_owned),
                    behind: HashMap::new(),
                };
                (desk.clone(), state)
            })
            .collect();
        History {
            desks,
            replays,
            pending: HashMap::new(),
        }
    }

    /// Sessions behind on `desk`.
    pub(super) fn behind_count(&self, desk: &str) -> usize {
        self.desks.get(desk).map_or(0, |state| state.behind.len())
    }

    /// Forgets `session` on `desk` (a resume still waiting for it is answered when its replay
    /// comes back).
    pub(super) fn leave(&mut self, session: Uuid, desk: &str) {
        if let Some(state) = self.desks.get_mut(desk) {
            state.behind.remove(&session);
        }
    }

    /// Forgets a session that ended.
    pub(super) fn forget(&mut self, session: Uuid) {
        self.pending.remove(&session);
        for state in self.desks.values_mut() {
            state.behind.remove(&session);
        }
    }

    /// Forgets every session (shutdown).
    pub(super) fn clear(&mut self) {
        self.pending.clear();
        for state in self.desks.values_mut() {
            state.behind.clear();
        }
    }
}

impl Router {
    fn history(&mut self) -> &mut History {
        // Only called on paths that history mode reaches.
        self.history.as_mut().expect("history is enabled")
    }

    /// A `subscribe` with `since` (history on): plans each desk, answers at once when the log
    /// holds what is asked, or once the first replays are read.
    pub(super) fn subscribe_since(
        &mut self,
        session: Uuid,
        desks: Vec<String>,
        since: BTreeMap<String, Since>,
        reference: Option<String>,
    ) {
        if let Some(refusal) = self.check_since(session, &desks, &since) {
            return self.refuse(session, Refusal { reference, ..refusal });
        }
        let Some(outbox) = self.sessions.get(&session).map(|entry| entry.outbox.clone()) else {
            return;
        };
        let mut pending = PendingSubscribe {
            desks: desks.clone(),
            recovered: BTreeMap::new(),
            first_offset: BTreeMap::new(),
            waiting: HashSet::new(),
            held: HashMap::new(),
            reference,
        };
        let max_snapshot = self.config.history.max_snapshot;
        let batch = self.config.history.replay_batch;
        for desk in &desks {
            let already = self
                .sessions
                .get(&session)
                .is_some_and(|entry| entry.desks.contains(desk));
            let Some(start) = since.get(desk).filter(|_| !already) else {
                self.join_live(session, desk);
                continue;
            };
            let history = self.history();
            let state = &history.desks[desk];
            let Plan { after, replay } = plan(state, session, desk, start, max_snapshot, batch);
            match replay {
                Some(request) => {
                    pending.waiting.insert(desk.clone());
                    self.ask_replay(request);
                }
                None if matches!(start, Since::After { .. }) => {
                    pending.recovered.insert(desk.clone(), true);
                }
                None => {}
            }
            let behind = Behind {
                outbox: outbox.clone(),
                after,
                state: State::Starting,
                latest: None,
            };
            let history = self.history();
            if let Some(state) = history.desks.get_mut(desk) {
                state.behind.insert(session, behind);
            }
            if let Some(entry) = self.sessions.get_mut(&session) {
                entry.desks.insert(desk.clone());
            }
        }
        if pending.waiting.is_empty() {
            self.answer_subscribe(session, pending);
        } else {
            self.history().pending.insert(session, pending);
        }
    }

    /// Why a `since` cannot be served: history off, a desk not attached yet, or another
    /// resume of this session still in progress.
    fn check_since(
        &self,
        session: Uuid,
        desks: &[String],
        since: &BTreeMap<String, Since>,
    ) -> Option<Refusal> {
        let Some(history) = &self.history else {
            return Some(Refusal::new(
                ErrorCode::BadRequest,
                "`since` needs history.enabled = true on the bridge",
            ));
        };
        if let Some(desk) = since.keys().find(|desk| !desks.contains(desk)) {
            return Some(Refusal::new(
                ErrorCode::BadRequest,
                format!("`since` names desk `{desk}`, which is not in `desks`"),
            ));
        }
        if history.pending.contains_key(&session) {
            return Some(Refusal::new(
                ErrorCode::BadRequest,
                "a subscribe with `since` is still being served: wait for its `subscribed`",
            ));
        }
        let not_ready = since
            .keys()
            .find(|desk| history.desks.get(*desk).is_none_or(|state| state.epoch.is_none()));
        not_ready.map(|desk| {
            Refusal::new(
                ErrorCode::BrokerUnavailable,
                format!("the history of desk `{desk}` is not available yet (the bridge is attaching to its stream): retry shortly"),
            )
        })
    }

    /// Sends `subscribed` with what the resume found, then starts feeding each resumed desk.
    fn answer_subscribe(&mut self, session: Uuid, mut pending: PendingSubscribe) {
        let any_resume = !pending.recovered.is_empty();
        let subscribed = ServerFrame::Subscribed {
            desks: &pending.desks,
            recovered: any_resume.then_some(&pending.recovered),
            first_offset: (!pending.first_offset.is_empty()).then_some(&pending.first_offset),
            reference: pending.reference.as_deref(),
        };
        self.reply(session, subscribed.framed());
        for desk in &pending.desks {
            let Some(behind) = self.behind_mut(session, desk) else {
                continue;
            };
            if behind.state != State::Starting {
                continue;
            }
            behind.state = State::Waiting;
            match pending.held.remove(desk) {
                Some(events) => self.deliver_replayed(session, desk, events),
                None => self.feed(session, desk),
            }
        }
    }

    fn behind_mut(&mut self, session: Uuid, desk: &str) -> Option<&mut Behind> {
        self.history
            .as_mut()?
            .desks
            .get_mut(desk)?
            .behind
            .get_mut(&session)
    }

    fn ask_replay(&mut self, request: ReplayRequest) {
        let session = request.session;
        if self.history().replays.send(request).is_err() {
            // The reader thread is gone only at shutdown.
            self.history_unavailable(session);
        }
    }

    /// The stream cannot be read for this session: it is closed, to resume elsewhere or later
    /// with `since` (nothing it had is lost; what it lacks it will ask for).
    fn history_unavailable(&mut self, session: Uuid) {
        if let Some(entry) = self.sessions.get(&session) {
            entry.outbox.close(
                CloseCode::Again,
                "history unavailable: reconnect and resume with since",
            );
        }
        self.forget(session, Reason::HistoryUnavailable);
    }

    /// A session behind on `desk` may take more: serve it from the log, or ask the stream,
    /// until its queue is full or it is live again.
    pub(super) fn feed(&mut self, session: Uuid, desk: &str) {
        while self.feed_step(session, desk) {}
    }

    /// One round of [`Router::feed`]; true when the session has room again already.
    fn feed_step(&mut self, session: Uuid, desk: &str) -> bool {
        let Some(history) = self.history.as_mut() else {
            return false;
        };
        let Some(state) = history.desks.get_mut(desk) else {
            return false;
        };
        let Some(behind) = state.behind.get_mut(&session) else {
            return false;
        };
        if matches!(behind.state, State::Starting | State::Replaying) {
            return false;
        }
        if let Some(latest) = behind.latest.as_mut() {
            let progress = drain_conflated(&behind.outbox, latest);
            let dropped = latest.dropped;
            if progress != Progress::Done {
                return self.blocked(session, desk, progress);
            }
            self.go_live(session, desk);
            if dropped > 0 {
                self.reply(session, ServerFrame::Gap { desk, dropped }.framed());
            }
            return false;
        }
        let covered = behind.after.is_some_and(|after| state.log.covers(after));
        if !covered {
            // Up to the newest event seen, not to the oldest one held: by the time a read to
            // the log's base returned, the base had moved on, and the session chased it one
            // log behind for as long as traffic flowed. Read to the end, its cursor is where
            // the log ended when it asked, which the log still covers unless more than its
            // whole length came meanwhile.
            let request = ReplayRequest {
                session,
                desk: desk.to_owned(),
                from: behind.after.map_or(Start::First, Start::At),
                until: state.log.last().unwrap_or_default(),
                max_events: self.config.history.replay_batch,
                keep_last: None,
            };
            behind.state = State::Replaying;
            self.ask_replay(request);
            return false;
        }
        let after = behind.after.unwrap_or_default();
        let mut progress = Progress::Done;
        let mut cursor = after;
        for logged in state.log.after(after) {
            if logged.except != Some(session) {
                if let Err(error) = behind.outbox.try_frame(&logged.frame) {
                    progress = Progress::from_error(error, &behind.outbox, logged.frame.len());
                    break;
                }
            }
            cursor = logged.offset;
        }
        behind.after = Some(cursor);
        match progress {
            // Resumed past what this instance has seen yet: live events will reach it.
            Progress::Done if state.log.last().is_some_and(|last| cursor > last) => {
                behind.state = State::Ahead;
                false
            }
            Progress::Done => {
                self.go_live(session, desk);
                false
            }
            blocked => self.blocked(session, desk, blocked),
        }
    }

    /// A session could not take more: wait for room, or close it; true when it has room
    /// again already.
    fn blocked(&mut self, session: Uuid, desk: &str, progress: Progress) -> bool {
        match progress {
            Progress::Done => true,
            Progress::Full => self.wait_for_room(session, desk),
            Progress::TooBig => {
                self.too_big(session, desk);
                false
            }
            Progress::Lost(error) => {
                self.drop_failed(vec![(session, error)], desk);
                false
            }
        }
    }

    /// The session's queue is full: it says `Drained` when there is room; true when there is
    /// already (it drained before it could see the mark).
    fn wait_for_room(&mut self, session: Uuid, desk: &str) -> bool {
        let Some(behind) = self.behind_mut(session, desk) else {
            return false;
        };
        behind.state = State::Waiting;
        behind.outbox.mark_behind()
    }

    /// One event is larger than the session's whole byte budget: it can never take it.
    fn too_big(&mut self, session: Uuid, desk: &str) {
        log::warn!(
            "closing session {session}: an event of desk {} is larger than ws.outbound_queue_bytes",
            Untrusted(desk)
        );
        if let Some(entry) = self.sessions.get(&session) {
            entry.outbox.close(
                CloseCode::Again,
                "an event is larger than ws.outbound_queue_bytes",
            );
        }
        self.forget(session, Reason::Slow);
    }

    /// A session behind is current: it joins the live subscribers.
    fn go_live(&mut self, session: Uuid, desk: &str) {
        let history = self.history();
        let Some(behind) = history
            .desks
            .get_mut(desk)
            .and_then(|state| state.behind.remove(&session))
        else {
            return;
        };
        self.metrics.history_caught_up();
        if let Some(subscribers) = self.desks.get_mut(desk) {
            subscribers.insert(session, behind.outbox);
        }
    }

    /// The answer to a replay: held until `subscribed` for a resume, else delivered.
    pub(super) fn replayed(&mut self, replayed: Replayed) {
        let Replayed { request, result } = replayed;
        let (session, desk) = (request.session, request.desk.as_str());
        let Some(starting) = self
            .behind_mut(session, desk)
            .map(|behind| behind.state == State::Starting)
        else {
            // It left the desk meanwhile; its resume may still wait for this answer.
            return self.resolved(session, desk);
        };
        let events = match result {
            Ok(events) => events,
            Err(error) => {
                let (desk, error) = (Untrusted(desk), Untrusted(error));
                log::warn!("replay of desk {desk} for session {session} failed: {error}");
                return self.history_unavailable(session);
            }
        };
        self.metrics.history_replayed(events.events.len());
        if !starting {
            if let Some(behind) = self.behind_mut(session, desk) {
                behind.state = State::Waiting;
            }
            return self.deliver_replayed(session, desk, events);
        }
        let history = self.history();
        let Some(pending) = history.pending.get_mut(&session) else {
            return;
        };
        if let Start::At(asked) = request.from {
            if request.keep_last.is_none() {
                let recovered = events.first_seen.is_none_or(|first| first <= asked);
                pending.recovered.insert(desk.to_owned(), recovered);
                if !recovered {
                    pending
                        .first_offset
                        .insert(desk.to_owned(), events.first_seen.unwrap_or(asked));
                }
            }
        } else if request.keep_last.is_none() {
            // Another life: everything retained follows.
            pending.recovered.insert(desk.to_owned(), false);
            let first = events
                .first_seen
                .or(history.desks[desk].first_offset)
                .unwrap_or(0);
            pending.first_offset.insert(desk.to_owned(), first);
        }
        pending.held.insert(desk.to_owned(), events);
        self.resolved(session, desk);
    }

    /// The first replay of `desk` for a resume is in: once every desk is, `subscribed` goes out.
    fn resolved(&mut self, session: Uuid, desk: &str) {
        let history = self.history();
        let Some(pending) = history.pending.get_mut(&session) else {
            return;
        };
        pending.waiting.remove(desk);
        if pending.waiting.is_empty() {
            if let Some(pending) = history.pending.remove(&session) {
                self.answer_subscribe(session, pending);
            }
        }
    }

    /// Queues replayed events after the session's cursor, then goes on feeding; a full queue
    /// drops the rest (they are read again from the cursor when there is room).
    fn deliver_replayed(&mut self, session: Uuid, desk: &str, replayed: ReplayedEvents) {
        let epoch = self.history().desks[desk].epoch.clone();
        let mut cursor = self.behind_mut(session, desk).and_then(|behind| behind.after);
        let mut progress = Progress::Done;
        let ReplayedEvents {
            events,
            reached,
            complete,
            ..
        } = replayed;
        for mut event in events {
            if cursor.is_some_and(|after| event.offset <= after) {
                continue;
            }
            if event.from_session != Some(session) {
                let Some(frame) = self.history_frame(&mut event, epoch.as_deref()) else {
                    cursor = Some(event.offset);
                    continue;
                };
                let Some(behind) = self.behind_mut(session, desk) else {
                    return;
                };
                let len = frame.len();
                if let Err(error) = behind.outbox.try_frame(&frame) {
                    progress = Progress::from_error(error, &behind.outbox, len);
                    break;
                }
            }
            cursor = Some(event.offset);
        }
        // A read that ended short of `until` without a single new message cannot move on.
        let stuck = !complete && reached.is_none();
        let Some(behind) = self.behind_mut(session, desk) else {
            return;
        };
        if progress == Progress::Done {
            // What was read is delivered, so the cursor may move to where the read ended
            // (markers and skipped messages included).
            cursor = cursor.max(reached);
        }
        behind.after = cursor;
        match progress {
            Progress::Done if stuck => {
                let desk = Untrusted(desk);
                log::warn!("replay of desk {desk} for session {session} read nothing; closing it");
                self.history_unavailable(session);
            }
            Progress::Done => self.feed(session, desk),
            blocked => {
                if self.blocked(session, desk, blocked) {
                    self.feed(session, desk);
                }
            }
        }
    }

    /// A batch of live stream items. Consecutive events of one desk (and one publisher) are
    /// queued to each live subscriber as one buffer, as desktop batches are without history;
    /// anything else ends the run first, so every browser keeps the stream's order.
    pub(super) fn stream_items(&mut self, items: Vec<StreamItem>) {
        let mut run = Run::new(self.max_run());
        for item in items {
            match item {
                StreamItem::Opened(opened) => {
                    self.flush_live(&mut run);
                    self.opened(opened);
                }
                StreamItem::Event(event) => {
                    let Some((desk, logged)) = self.live_event(event, &mut run) else {
                        continue;
                    };
                    if run.ends_before(&desk, logged.except, logged.frame.len()) {
                        self.flush_live(&mut run);
                        run.start(desk, logged.except);
                    }
                    run.push(logged.frame.len(), logged);
                }
            }
        }
        self.flush_live(&mut run);
    }

    fn opened(&mut self, opened: DeskOpened) {
        let history = self.history();
        let Some(state) = history.desks.get_mut(&opened.desk) else {
            return;
        };
        let same_life = state.epoch.as_deref() == Some(&*opened.epoch);
        state.first_offset = opened.first_offset;
        if opened.continued && same_life {
            return;
        }
        log::info!(
            "desk {}: reading stream life {} live from offset {}",
            opened.desk,
            opened.epoch,
            opened.base + 1
        );
        state.log.reset(opened.base);
        state.epoch = Some(opened.epoch);
        // Cursors of another life mean nothing in this one: those sessions resume again.
        let stale: Vec<Uuid> = state.behind.keys().copied().collect();
        for session in stale {
            self.history_unavailable(session);
        }
    }

    /// The `event` frame of a stream event, its data transformed for the web in place; `None`
    /// when its transform refuses it (counted).
    fn history_frame(&self, event: &mut StreamEvent, epoch: Option<&str>) -> Option<Frame> {
        if let Err(error) = self.transform(&event.desk, &event.event, Direction::ToWeb, &mut event.data) {
            let stream = crate::history::stream_name(&self.config.history, &event.desk);
            self.metrics.history_skipped(
                RejectReason::TransformFailed,
                &stream,
                event.offset,
                &error.to_string(),
            );
            return None;
        }
        let origin = if event.from_session.is_some() {
            Origin::Web
        } else {
            Origin::Desktop
        };
        Some(
            ServerFrame::Event {
                desk: &event.desk,
                event: &event.event,
                id: &event.id,
                origin,
                data: EventData::Object(&event.data),
                offset: Some(event.offset),
                epoch,
                reply_id: event
                    .to
                    .as_ref()
                    .and_then(|to| to.reply.as_ref())
                    .map(|_| event.id.as_str()),
            }
            .framed(),
        )
    }

    /// Logs a live event; returns it (with its desk) for the run to queue to the desk's live
    /// subscribers. A targeted event is delivered at once (after the run so far) instead.
    fn live_event(&mut self, mut event: StreamEvent, run: &mut Run<Logged>) -> Option<(String, Logged)> {
        let state = self
            .history
            .as_ref()
            .and_then(|history| history.desks.get(&event.desk))?;
        let epoch = state.epoch.clone();
        let frame = self.history_frame(&mut event, epoch.as_deref())?;
        let StreamEvent {
            desk,
            event: name,
            id,
            offset,
            data,
            from_session,
            to,
        } = event;
        if let Some(to) = to {
            // Addressed to someone now: not history for everyone.
            self.flush_live(run);
            self.deliver_targeted(&to, (&desk, &name, &id), &frame);
            return None;
        }
        let history = self.history();
        let state = history.desks.get_mut(&desk)?;
        let key = state
            .conflate_key
            .as_deref()
            .and_then(|field| data.get(field))
            .map(key_text);
        let logged = Logged {
            offset,
            frame,
            except: from_session,
            key,
        };
        Some((desk, logged))
    }

    /// Queues the run's events to the desk's live subscribers as one buffer; one too slow to
    /// take it falls behind at the run's first event (or is closed, by the desk's policy).
    /// Then the sessions behind on the desk hear of each event.
    fn flush_live(&mut self, run: &mut Run<Logged>) {
        let except = run.except;
        let (desk, events) = run.take();
        let Some(first) = events.first() else {
            return;
        };
        // In the log first, and only this run: a session that falls behind on it is fed from
        // the log up to its end, and goes live for the next run, which must not be there yet.
        if let Some(state) = self.history().desks.get_mut(&desk) {
            for logged in &events {
                state.log.push(logged.clone());
            }
        }
        let joined = Frame::join(events.iter().map(|logged| &logged.frame));
        let (delivered, failed) = self.offer(&desk, &joined, except);
        let policy = self.history().desks.get(&desk).map(|state| state.policy);
        let mut with_room = Vec::new();
        for (session, error) in failed {
            match (policy, error) {
                (Some(SlowPolicy::CatchUp | SlowPolicy::Latest), QueueError::Full) => {
                    let latest = policy == Some(SlowPolicy::Latest);
                    if self.fall_behind(session, &desk, first, latest) {
                        with_room.push(session);
                    }
                }
                _ => self.drop_failed(vec![(session, error)], &desk),
            }
        }
        for logged in &events {
            if logged.except.is_some() {
                self.metrics.web_event(delivered);
            } else {
                self.metrics.desktop_event(delivered);
            }
            self.feed_behind(&desk, logged);
        }
        // Only once the whole run is behind them: fed now, they could go live again halfway
        // through it and miss the rest.
        for session in with_room {
            self.feed(session, &desk);
        }
    }

    /// A live session could not take `logged`: from now on it is fed from the log (catch_up)
    /// or gets the newest value per key (latest). True when it has room already: the caller
    /// feeds it.
    fn fall_behind(&mut self, session: Uuid, desk: &str, logged: &Logged, latest: bool) -> bool {
        let Some(outbox) = self
            .desks
            .get_mut(desk)
            .and_then(|subscribers| subscribers.remove(&session))
        else {
            return false;
        };
        let max_bytes = self.config.ws.outbound_queue_bytes;
        let mut conflated = None;
        if latest {
            let mut waiting = Box::<Conflated>::default();
            waiting.add(logged, max_bytes, &self.metrics);
            conflated = Some(waiting);
        }
        let behind = Behind {
            outbox,
            after: Some(logged.offset.saturating_sub(1)),
            state: State::Waiting,
            latest: conflated,
        };
        if let Some(state) = self.history().desks.get_mut(desk) {
            state.behind.insert(session, behind);
        }
        self.wait_for_room(session, desk)
    }

    /// A live event for the sessions behind on its desk: `latest` ones keep it as their newest
    /// value of its key (unless they fell behind on it and have it already); those ahead of
    /// this instance are fed, since it may be past their cursor.
    fn feed_behind(&mut self, desk: &str, logged: &Logged) {
        let max_bytes = self.config.ws.outbound_queue_bytes;
        let metrics = Arc::clone(&self.metrics);
        let history = self.history();
        let Some(state) = history.desks.get_mut(desk) else {
            return;
        };
        let mut ahead = Vec::new();
        for (session, behind) in &mut state.behind {
            match behind.latest.as_mut() {
                Some(latest)
                    if Some(*session) != logged.except && !latest.by_offset.contains_key(&logged.offset) =>
                {
                    latest.add(logged, max_bytes, &metrics);
                }
                Some(_) => {}
                None if behind.state == State::Ahead => ahead.push(*session),
                None => {}
            }
        }
        for session in ahead {
            self.feed(session, desk);
        }
    }

    /// A session had room again: feed each desk it is behind on.
    pub(super) fn drained(&mut self, session: Uuid) {
        let Some(entry) = self.sessions.get(&session) else {
            return;
        };
        let desks: Vec<String> = entry.desks.iter().cloned().collect();
        for desk in desks {
            if self
                .behind_mut(session, &desk)
                .is_some_and(|behind| behind.state == State::Waiting)
            {
                self.feed(session, &desk);
            }
        }
    }
}

/// Where a resumed desk starts, from what the log holds and what `since` asks.
fn plan(
    state: &DeskHistory,
    session: Uuid,
    desk: &str,
    since: &Since,
    max_snapshot: usize,
    batch: usize,
) -> Plan {
    let base = state.log.base().unwrap_or_default();
    let from_log = |after| Plan {
        after: Some(after),
        replay: None,
    };
    let replay = |after, from, keep_last| Plan {
        after,
        replay: Some(ReplayRequest {
            session,
            desk: desk.to_owned(),
            from,
            until: base,
            max_events: batch,
            keep_last,
        }),
    };
    match since {
        Since::After { offset, epoch } => {
            if state.epoch.as_deref() != Some(epoch.as_str()) {
                replay(None, Start::First, None)
            } else if state.log.covers(*offset) {
                from_log(*offset)
            } else {
                replay(Some(*offset), Start::At(*offset), None)
            }
        }
        Since::Last { last } => {
            let last = (*last).min(max_snapshot);
            match state.log.last_n(last) {
                Some(after) => from_log(after),
                None => {
                    // Markers and segment starts take offsets too: read a little more than
                    // needed and keep the last ones.
                    let missing = last - state.log.len();
                    let from = base.saturating_sub(missing as u64 + missing as u64 / 8 + 64);
                    replay(None, Start::At(from), Some(missing))
                }
            }
        }
    }
}

/// The text of a conflation key's value: a string as it is, anything else as JSON.
fn key_text(value: &serde_json::Value) -> Box<str> {
    match value {
        serde_json::Value::String(text) => text.as_str().into(),
        other => other.to_string().into(),
    }
}

/// How far feeding a session got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Progress {
    /// Everything available was queued.
    Done,
    /// The queue is full: wait for room.
    Full,
    /// The frame is larger than the whole byte budget: no queue could ever take it.
    TooBig,
    /// The session ended, or hit `ws.outbound_queue_frames`: it is closed as in v1.
    Lost(QueueError),
}

impl Progress {
    /// What a refused frame of `len` bytes means. Decided by its size, not by the queue being
    /// empty now: the session drains on another thread, so "full" a moment ago can read as
    /// "empty" here, which once closed a healthy catch-up reader.
    fn from_error(error: QueueError, outbox: &Outbox, len: usize) -> Progress {
        match error {
            QueueError::Full if !outbox.could_take(len) => Progress::TooBig,
            QueueError::Full => Progress::Full,
            QueueError::FrameLimit | QueueError::Gone => Progress::Lost(error),
        }
    }
}

impl Conflated {
    /// Keeps `logged` as the newest value of its key; an older one of the same key is dropped
    /// (counted), and the oldest go when the waiting values exceed `max_bytes`.
    fn add(&mut self, logged: &Logged, max_bytes: usize, metrics: &crate::metrics::Metrics) {
        if let Some(key) = &logged.key {
            if let Some(old) = self.by_key.insert(key.clone(), logged.offset) {
                if let Some((_, frame)) = self.by_offset.remove(&old) {
                    self.bytes -= frame.len();
                    self.dropped += 1;
                    metrics.history_conflated();
                }
            }
        }
        self.bytes += logged.frame.len();
        self.by_offset
            .insert(logged.offset, (logged.key.clone(), logged.frame.clone()));
        while self.bytes > max_bytes {
            let Some((_, (key, frame))) = self.by_offset.pop_first() else {
                break;
            };
            self.bytes -= frame.len();
            self.dropped += 1;
            if let Some(key) = key {
                self.by_key.remove(&key);
            }
        }
    }
}

/// Queues a `latest` session's waiting values, oldest first.
fn drain_conflated(outbox: &Outbox, latest: &mut Conflated) -> Progress {
    while let Some(entry) = latest.by_offset.first_entry() {
        let (_, frame) = entry.get();
        if let Err(error) = outbox.try_frame(frame) {
            return Progress::from_error(error, outbox, frame.len());
        }
        let (key, frame) = entry.remove();
        latest.bytes -= frame.len();
        if let Some(key) = key {
            latest.by_key.remove(&key);
        }
    }
    Progress::Done
}
