//! Presence: who is subscribed to which desk, on this instance and on the others.
//!
//! This instance's sessions are the router's own (each entry's `desks`): every change to them is
//! published to the presence exchange and told to the local watchers (sessions subscribed with
//! `presence: true`). Other instances' sessions come from their messages ([`PresenceNotice`]): a
//! heartbeat replaces what an instance had (healing a lost message), `instance.stopped` removes
//! it, and one silent for 2.5 of its heartbeats is dropped. Expiry is checked four times a
//! heartbeat, so a crashed instance's sessions leave the view 2.5 to 2.75 heartbeats after its
//! last one: within 3, with room for delivery delays.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use serde::Serialize;
use serde_json::value::to_raw_value;
use uuid::Uuid;

use super::Router;
use crate::actors::messages::{JobKind, PresenceNotice, PublishJob, QueueError};
use crate::amqp::unix_now_ms;
use crate::config::AuthMode;
use crate::log_text::Untrusted;
use crate::presence::{self, Change, Heartbeat, Member, Notice, Reason, SessionChange, Stopped};
use crate::protocol::{Present, Refusal, ServerFrame};

/// Another instance as its messages describe it.
struct Remote {
    /// When it was last heard from.
    seen: Instant,
    /// Its `heartbeat_ms` (this instance's until its first heartbeat says otherwise).
    heartbeat: Duration,
    /// Its admitted sessions.
    sessions: HashMap<Uuid, Member>,
}

/// The presence view besides the router's own sessions.
pub(super) struct Presence {
    instance: Arc<str>,
    heartbeat: Duration,
    /// desk → this instance's sessions that get `join` / `leave` for it.
    watchers: HashMap<String, HashSet<Uuid>>,
    /// Other instances, by id.
    remote: HashMap<String, Remote>,
}

impl Presence {
    /// An empty view for this instance.
    pub(super) fn new(instance: &str, heartbeat: Duration) -> Self {
        Presence {
            instance: instance.into(),
            heartbeat,
            watchers: HashMap::new(),
            remote: HashMap::new(),
        }
    }

    /// A session stops watching `desk`.
    pub(super) fn unwatch(&mut self, session: Uuid, desk: &str) {
        if let Some(watchers) = self.watchers.get_mut(desk) {
            watchers.remove(&session);
        }
    }
}

/// Join or leave.
#[derive(Clone, Copy)]
enum Move {
    Join,
    Leave,
}

impl Router {
    /// Starts the heartbeat (at once, so that the other instances learn about this one now)
    /// and the expiry check.
    pub(super) fn start_presence(&mut self, ctx: &mut Context<Self>) {
        let heartbeat = self.presence.heartbeat;
        self.heartbeat();
        ctx.run_interval(heartbeat, |router, _| router.heartbeat());
        ctx.run_interval(heartbeat / 4, |router, _| router.expire_instances());
    }

    /// True when this session's changes are published: it is admitted (signed in, with auth).
    pub(super) fn admitted(&self, session: Uuid) -> bool {
        self.sessions
            .get(&session)
            .is_some_and(|entry| self.config.auth.mode == AuthMode::None || entry.identity.is_some())
    }

    pub(super) fn user_of(&self, session: Uuid) -> Option<Arc<str>> {
        let entry = self.sessions.get(&session)?;
        entry.identity.as_ref().map(|identity| Arc::clone(&identity.0))
    }

    /// Publishes a change of one of this instance's sessions and tells the local watchers.
    /// `user` is passed for a session already removed.
    pub(super) fn announce(
        &mut self,
        change: Change,
        (session, user): (Uuid, Option<Arc<str>>),
        desks: Vec<String>,
        reason: Option<Reason>,
    ) {
        if self.shutting_down
            || (desks.is_empty() && matches!(change, Change::Subscribed | Change::Unsubscribed))
        {
            return;
        }
        let how = match change {
            Change::Subscribed => Some(Move::Join),
            Change::Unsubscribed | Change::Disconnected => Some(Move::Leave),
            Change::Connected => None,
        };
        if let Some(how) = how {
            for desk in &desks {
                self.tell_watchers(how, desk, session, user.as_deref());
            }
        }
        let body = SessionChange {
            session,
            user: user.map(|user| user.to_string()),
            desks,
            instance: self.presence.instance.to_string(),
            reason,
            at: unix_now_ms(),
        };
        self.publish_presence(change.key(), &body);
    }

    /// Sets whether `session` gets `join` / `leave` for each of `desks` it is subscribed to.
    pub(super) fn watch(&mut self, session: Uuid, desks: &[String], on: bool) {
        let Some(entry) = self.sessions.get(&session) else {
            return;
        };
        for desk in desks.iter().filter(|desk| entry.desks.contains(*desk)) {
            if on {
                self.presence
                    .watchers
                    .entry(desk.clone())
                    .or_default()
                    .insert(session);
            } else {
                self.presence.unwatch(session, desk);
            }
        }
    }

    /// Sends `join` or `leave` for `subject` on `desk` to the desk's watchers but the subject.
    fn tell_watchers(&mut self, how: Move, desk: &str, subject: Uuid, user: Option<&str>) {
        let Some(watchers) = self.presence.watchers.get(desk).filter(|w| !w.is_empty()) else {
            return;
        };
        let frame = match how {
            Move::Join => ServerFrame::Join {
                desk,
                session: subject,
                user,
            },
            Move::Leave => ServerFrame::Leave {
                desk,
                session: subject,
                user,
            },
        }
        .framed();
        let mut failed: Vec<(Uuid, QueueError)> = Vec::new();
        for watcher in watchers.iter().filter(|watcher| **watcher != subject) {
            if let Some(entry) = self.sessions.get(watcher) {
                if let Err(error) = entry.outbox.try_frame(&frame) {
                    failed.push((*watcher, error));
                }
            }
        }
        self.drop_failed(failed, desk);
    }

    /// Answers a `presence` query from this instance's sessions and every other instance's.
    pub(super) fn presence_query(&mut self, session: Uuid, desk: String, reference: Option<String>) {
        if let Some(refusal) = self.check_desks(std::slice::from_ref(&desk)) {
            return self.refuse(session, Refusal { reference, ..refusal });
        }
        let local = self
            .sessions
            .iter()
            .filter(|(id, entry)| entry.desks.contains(&desk) && self.admitted(**id))
            .map(|(id, entry)| Present {
                session: *id,
                user: entry.identity.as_ref().map(|identity| &*identity.0),
            });
        let remote = self.presence.remote.values().flat_map(|remote| {
            remote
                .sessions
                .iter()
                .filter(|(_, member)| member.desks.contains(&desk))
                .map(|(id, member)| Present {
                    session: *id,
                    user: member.user.as_deref(),
                })
        });
        let mut sessions: Vec<Present> = local.chain(remote).collect();
        sessions.sort_unstable();
        let answer = ServerFrame::Presence {
            reference: reference.as_deref(),
            desk: &desk,
            sessions: &sessions,
        }
        .framed();
        self.reply(session, answer);
    }

    /// Publishes this instance's whole view (its admitted sessions).
    fn heartbeat(&mut self) {
        if self.shutting_down {
            return;
        }
        let sessions = self
            .sessions
            .iter()
            .filter(|(id, _)| self.admitted(**id))
            .map(|(id, entry)| Member {
                session: *id,
                user: entry.identity.as_ref().map(|identity| identity.0.to_string()),
                desks: entry.desks.iter().cloned().collect(),
            })
            .collect();
        let heartbeat = Heartbeat {
            instance: self.presence.instance.to_string(),
            at: unix_now_ms(),
            heartbeat_ms: u64::try_from(self.presence.heartbeat.as_millis()).unwrap_or(u64::MAX),
            sessions,
        };
        self.publish_presence(presence::KEY_HEARTBEAT, &heartbeat);
    }

    /// Shutdown: every session ends (`shutdown`), then the instance says it stopped.
    pub(super) fn presence_stopped(&mut self) {
        let sessions: Vec<(Uuid, Option<Arc<str>>, Vec<String>)> = self
            .sessions
            .keys()
            .filter(|id| self.admitted(**id))
            .map(|id| {
                let desks = self.sessions[id].desks.iter().cloned().collect();
                (*id, self.user_of(*id), desks)
            })
            .collect();
        for (session, user, desks) in sessions {
            self.announce(
                Change::Disconnected,
                (session, user),
                desks,
                Some(Reason::Shutdown),
            );
        }
        let stopped = Stopped {
            instance: self.presence.instance.to_string(),
            at: unix_now_ms(),
        };
        self.publish_presence(presence::KEY_STOPPED, &stopped);
    }

    fn publish_presence(&mut self, key: &str, body: &impl Serialize) {
        let body = match to_raw_value(body) {
            Ok(body) => body,
            Err(error) => {
                log::error!("cannot encode presence message `{key}`: {error}");
                return self.metrics.presence("failed");
            }
        };
        let job = PublishJob {
            kind: JobKind::Presence,
            id: Uuid::new_v4().to_string(),
            session: Uuid::nil(),
            user: None,
            ttl: None,
            reference: None,
            desk: String::new(),
            event: String::new(),
            routing_key: key.to_owned(),
            body,
            web_data: None,
            enqueued: Instant::now(),
        };
        if self.publisher.submit(job).is_err() {
            // The outage buffer is full: the next heartbeat carries the state again.
            self.metrics.presence("failed");
        }
    }

    /// Drops the instances silent for 2.5 of their heartbeats; their sessions leave.
    fn expire_instances(&mut self) {
        let silent: Vec<String> = self
            .presence
            .remote
            .iter()
            .filter(|(_, remote)| remote.seen.elapsed() > remote.heartbeat * 5 / 2)
            .map(|(instance, _)| instance.clone())
            .collect();
        for instance in silent {
            if let Some(remote) = self.presence.remote.remove(&instance) {
                let silent_for = remote.seen.elapsed();
                self.metrics
                    .presence_instance_lost(&instance, silent_for, remote.sessions.len());
                self.leave_all(remote.sessions);
            }
        }
        self.metrics.presence_instances(self.presence.remote.len());
    }

    /// Every desk of every one of `sessions` is left.
    fn leave_all(&mut self, sessions: HashMap<Uuid, Member>) {
        for (session, member) in sessions {
            for desk in &member.desks {
                self.tell_watchers(Move::Leave, desk, session, member.user.as_deref());
            }
        }
    }

    /// Applies another instance's message to the view, telling the local watchers.
    fn presence_notice(&mut self, notice: Notice) {
        let instance = notice.instance().to_owned();
        if let Notice::Stopped(_) = notice {
            if let Some(remote) = self.presence.remote.remove(&instance) {
                self.leave_all(remote.sessions);
            }
            return self.metrics.presence_instances(self.presence.remote.len());
        }
        let own_heartbeat = self.presence.heartbeat;
        let known = self.presence.remote.contains_key(&instance);
        let remote = self.presence.remote.entry(instance).or_insert_with(|| Remote {
            seen: Instant::now(),
            heartbeat: own_heartbeat,
            sessions: HashMap::new(),
        });
        remote.seen = Instant::now();
        let moves = match notice {
            Notice::Session(change, body) => apply_change(remote, change, body),
            Notice::Heartbeat(heartbeat) => {
                remote.heartbeat = Duration::from_millis(heartbeat.heartbeat_ms);
                replace_sessions(remote, heartbeat.sessions)
            }
            Notice::Stopped(_) => Vec::new(),
        };
        for (how, desk, session, user) in moves {
            self.tell_watchers(how, &desk, session, user.as_deref());
        }
        if !known {
            // A new instance (or one back after a partition) learns this one's sessions now
            // instead of at the next heartbeat.
            self.metrics.presence_instances(self.presence.remote.len());
            self.heartbeat();
        }
    }
}

/// A join or leave to tell: how, desk, session, user.
type Moved = (Move, String, Uuid, Option<String>);

/// Applies one session change of another instance; returns the joins and leaves it makes.
fn apply_change(remote: &mut Remote, change: Change, body: SessionChange) -> Vec<Moved> {
    let SessionChange {
        session, user, desks, ..
    } = body;
    match change {
        Change::Connected => {
            remote.sessions.entry(session).or_insert_with(|| Member {
                session,
                user,
                desks: Vec::new(),
            });
            Vec::new()
        }
        Change::Subscribed => {
            let member = remote.sessions.entry(session).or_insert_with(|| Member {
                session,
                user: user.clone(),
                desks: Vec::new(),
            });
            let added: Vec<String> = desks
                .into_iter()
                .filter(|desk| !member.desks.contains(desk))
                .collect();
            member.desks.extend(added.iter().cloned());
            moves(Move::Join, added, session, &user)
        }
        Change::Unsubscribed => {
            let Some(member) = remote.sessions.get_mut(&session) else {
                return Vec::new();
            };
            let left: Vec<String> = desks
                .into_iter()
                .filter(|desk| member.desks.contains(desk))
                .collect();
            member.desks.retain(|desk| !left.contains(desk));
            moves(Move::Leave, left, session, &user)
        }
        Change::Disconnected => match remote.sessions.remove(&session) {
            Some(member) => moves(Move::Leave, member.desks, session, &member.user),
            None => Vec::new(),
        },
    }
}

/// Replaces an instance's sessions with its heartbeat's; returns the differences as joins and
/// leaves (none when no message was lost).
fn replace_sessions(remote: &mut Remote, sessions: Vec<Member>) -> Vec<Moved> {
    let mut old = std::mem::take(&mut remote.sessions);
    let mut moved = Vec::new();
    for member in sessions {
        let before = old.remove(&member.session);
        let had = |desk: &String| before.as_ref().is_some_and(|before| before.desks.contains(desk));
        let joined: Vec<String> = member.desks.iter().filter(|desk| !had(desk)).cloned().collect();
        moved.extend(moves(Move::Join, joined, member.session, &member.user));
        if let Some(before) = before {
            let left: Vec<String> = before
                .desks
                .into_iter()
                .filter(|desk| !member.desks.contains(desk))
                .collect();
            moved.extend(moves(Move::Leave, left, member.session, &member.user));
        }
        remote.sessions.insert(member.session, member);
    }
    for (session, member) in old {
        moved.extend(moves(Move::Leave, member.desks, session, &member.user));
    }
    moved
}

fn moves(how: Move, desks: Vec<String>, session: Uuid, user: &Option<String>) -> Vec<Moved> {
    desks
        .into_iter()
        .map(|desk| (how, desk, session, user.clone()))
        .collect()
}

impl Handler<PresenceNotice> for Router {
    type Result = ();

    fn handle(&mut self, msg: PresenceNotice, _: &mut Context<Self>) {
        match msg.0 {
            Ok(notice) => {
                self.metrics.presence("received");
                self.presence_notice(notice);
            }
            Err(error) => {
                self.metrics.presence("garbage");
                let error = Untrusted(error);
                log::warn!("ignored a message on the presence exchange: {error}");
            }
        }
    }
}
