//! Request/reply through the router, both ways.
//!
//! Browser → desktop: a `request` becomes a [`JobKind::Request`] publish (this instance's
//! reply queue as `reply_to`, the request id as `correlation_id`); the request waits here
//! until the first reply with that id ([`DesktopReply`]), the broker returns it
//! (`no_responder`), or its timeout fires (`timeout`). What comes after is late: dropped and
//! counted.
//!
//! Desktop → browser: a targeted message with `reply_to` reaches its browsers with a
//! `reply_id` (its message id); the first `reply` from one of them is published to that
//! `reply_to` with the request's correlation id. An ask is remembered for [`ASK_TTL`].

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use actix::{AsyncContext, Context};
use serde_json::value::{to_raw_value, RawValue};
use uuid::Uuid;

use super::Router;
use crate::actors::messages::{DesktopReply, JobKind, Publish, PublishJob, ReplyFromWeb};
use crate::auth::Right;
use crate::delivery::ReplyTo;
use crate::metrics::PublishFailure;
use crate::protocol::{ErrorCode, Refusal, ServerFrame, MAX_TIMEOUT};

/// How long a desktop app's request can be answered: as long as the longest browser request
/// may wait, so that both directions behave alike.
pub const ASK_TTL: Duration = MAX_TIMEOUT;

/// Requests waiting for an answer, both ways.
#[derive(Default)]
pub(super) struct Requests {
    /// Browser requests by id (= correlation id).
    waiting: HashMap<String, Waiting>,
    /// How many of `waiting` each session has, for `ws.max_pending_requests`.
    per_session: HashMap<Uuid, usize>,
    /// Desktop requests delivered to browsers, by `reply_id`.
    asks: HashMap<String, Ask>,
    /// `reply_id`s in the order they were asked (all live [`ASK_TTL`]), for expiry.
    ask_order: VecDeque<(Instant, String)>,
}

struct Waiting {
    session: Uuid,
    reference: Option<String>,
}

struct Ask {
    reply_to: ReplyTo,
    desk: String,
    event: String,
    /// The sessions it reached; only they may answer.
    sessions: Vec<Uuid>,
}

impl Requests {
    /// How many browser requests `session` has waiting.
    fn pending(&self, session: Uuid) -> usize {
        self.per_session.get(&session).copied().unwrap_or(0)
    }

    fn wait(&mut self, id: String, waiting: Waiting) {
        *self.per_session.entry(waiting.session).or_default() += 1;
        self.waiting.insert(id, waiting);
    }

    /// Takes the browser request `id` off the waiting list.
    fn take(&mut self, id: &str) -> Option<(String, Waiting)> {
        let (id, waiting) = self.waiting.remove_entry(id)?;
        if let Some(count) = self.per_session.get_mut(&waiting.session) {
            *count -= 1;
            if *count == 0 {
                self.per_session.remove(&waiting.session);
            }
        }
        Some((id, waiting))
    }

    /// Drops asks older than [`ASK_TTL`].
    fn expire_asks(&mut self, now: Instant, metrics: &crate::metrics::Metrics) {
        while let Some((asked, _)) = self.ask_order.front() {
            if now.duration_since(*asked) < ASK_TTL {
                break;
            }
            if let Some((_, id)) = self.ask_order.pop_front() {
                if self.asks.remove(&id).is_some() {
                    metrics.desktop_request("expired");
                }
            }
        }
    }
}

impl Router {
    /// A browser's `request`: published like an event, then waited for.
    pub(super) fn request(&mut self, msg: Publish, timeout: Duration, ctx: &mut Context<Self>) {
        let (session, reference) = (msg.session, msg.reference.clone());
        let max = self.config.ws.max_pending_requests;
        if self.requests.pending(session) >= max {
            self.metrics.request("rate_limited");
            let message = format!(
                "{max} requests of this session are still waiting for their answer (ws.max_pending_requests); wait for some"
            );
            let refusal = Refusal::new(ErrorCode::RateLimited, message);
            return self.refuse(session, Refusal { reference, ..refusal });
        }
        self.metrics.web_publish();
        let mut job = match self.prepare(msg) {
            Ok(job) => job,
            Err(refusal) => return self.refuse(session, Refusal { reference, ..refusal }),
        };
        job.kind = JobKind::Request;
        let id = job.id.clone();
        self.requests.wait(
            id.clone(),
            Waiting {
                session,
                reference: reference.clone(),
            },
        );
        ctx.run_later(timeout, move |router, _| router.timed_out(&id, timeout));
        if let Err(job) = self.publisher.submit(job) {
            self.request_failed(&job, PublishFailure::BufferFull);
        }
    }

    fn timed_out(&mut self, id: &str, timeout: Duration) {
        if let Some((_, waiting)) = self.requests.take(id) {
            self.metrics.request("timeout");
            let message = format!("no answer within {} ms", timeout.as_millis());
            self.answer_with_error(waiting, ErrorCode::Timeout, message);
        }
    }

    fn answer_with_error(&self, waiting: Waiting, code: ErrorCode, message: String) {
        let refusal = Refusal {
            reference: waiting.reference,
            ..Refusal::new(code, message)
        };
        self.refuse(waiting.session, refusal);
    }

    /// The broker took a request: unrouted means nobody listens for its key.
    pub(super) fn request_confirmed(&mut self, job: &PublishJob, routed: bool) {
        if routed {
            return;
        }
        if let Some((_, waiting)) = self.requests.take(&job.id) {
            self.metrics.request("no_responder");
            let message = format!(
                "no desktop app listens for `{}` on exchange `{}`",
                job.routing_key, self.config.amqp.outbound_exchange
            );
            self.answer_with_error(waiting, ErrorCode::NoResponder, message);
        }
    }

    /// A request could not be published.
    pub(super) fn request_failed(&mut self, job: &PublishJob, failure: PublishFailure) {
        self.metrics.publish_failed(failure);
        if let Some((_, waiting)) = self.requests.take(&job.id) {
            self.metrics.request("failed");
            self.answer_with_error(
                waiting,
                ErrorCode::BrokerUnavailable,
                failure.message().to_owned(),
            );
        }
    }

    /// An answer from the reply queue: to the request's session, once.
    pub(super) fn desktop_reply(&mut self, reply: DesktopReply) {
        let waiting = reply
            .correlation_id
            .as_deref()
            .and_then(|id| self.requests.take(id));
        let Some((id, waiting)) = waiting else {
            return self.metrics.late_reply(reply.correlation_id.as_deref());
        };
        match serde_json::from_slice::<Box<RawValue>>(&reply.body) {
            Ok(data) if data.get().starts_with('{') => {
                self.metrics.request("answered");
                let frame = ServerFrame::Reply {
                    reference: waiting.reference.as_deref(),
                    id: &id,
                    data: &data,
                };
                self.reply(waiting.session, frame.framed());
            }
            _ => {
                self.metrics.request("bad_reply");
                let message = format!(
                    "the desktop app's answer is not a JSON object ({} bytes); ask its owner",
                    reply.body.len()
                );
                self.answer_with_error(waiting, ErrorCode::BadReply, message);
            }
        }
    }

    /// A targeted desktop request reached `sessions`: they may answer it as `id`.
    pub(super) fn asked(
        &mut self,
        id: &str,
        desk: &str,
        event: &str,
        reply_to: &ReplyTo,
        sessions: Vec<Uuid>,
    ) {
        let now = Instant::now();
        self.requests.expire_asks(now, &self.metrics);
        let ask = Ask {
            reply_to: reply_to.clone(),
            desk: desk.to_owned(),
            event: event.to_owned(),
            sessions,
        };
        self.requests.asks.insert(id.to_owned(), ask);
        self.requests.ask_order.push_back((now, id.to_owned()));
    }

    /// A browser's `reply`: published to the asker's `reply_to`, for the first answer only.
    pub(super) fn web_reply(&mut self, msg: ReplyFromWeb) {
        self.requests.expire_asks(Instant::now(), &self.metrics);
        // Rights as they are now: a `refresh` since the ask may have taken the desk away.
        let reached_but_forbidden = self.requests.asks.get(&msg.reply_id).and_then(|ask| {
            let may_read = self.sessions.get(&msg.session).is_some_and(|entry| {
                entry
                    .identity
                    .as_ref()
                    .is_none_or(|identity| identity.1.allows(&ask.desk, Right::Subscribe))
            });
            (ask.sessions.contains(&msg.session) && !may_read).then(|| ask.desk.clone())
        });
        if let Some(desk) = reached_but_forbidden {
            self.metrics.desktop_request("forbidden");
            let message = format!(
                "your token no longer allows `subscribe` on desk `{desk}`, so you cannot answer its requests"
            );
            let refusal = Refusal {
                reference: msg.reference,
                ..Refusal::new(ErrorCode::Forbidden, message)
            };
            return self.refuse(msg.session, refusal);
        }
        let asks = &mut self.requests.asks;
        let may_answer = asks
            .get(&msg.reply_id)
            .is_some_and(|ask| ask.sessions.contains(&msg.session));
        // Only a session it reached takes it off the list; anyone else leaves it open.
        let answered = if may_answer {
            asks.remove(&msg.reply_id)
        } else {
            None
        };
        let Some(ask) = answered else {
            self.metrics.desktop_request("unknown");
            let message = format!(
                "no open request `{}` for this session: it was answered already, expired after {} s, or never asked",
                msg.reply_id,
                ASK_TTL.as_secs()
            );
            let refusal = Refusal {
                reference: msg.reference,
                ..Refusal::new(ErrorCode::UnknownRequest, message)
            };
            return self.refuse(msg.session, refusal);
        };
        let body = match to_raw_value(&msg.data) {
            Ok(body) => body,
            Err(error) => {
                let refusal = Refusal {
                    reference: msg.reference,
                    ..Refusal::new(ErrorCode::Internal, format!("cannot encode data: {error}"))
                };
                return self.refuse(msg.session, refusal);
            }
        };
        self.metrics.desktop_request("answered");
        let job = PublishJob {
            kind: JobKind::Reply {
                correlation_id: ask.reply_to.correlation_id,
            },
            id: Uuid::new_v4().to_string(),
            session: msg.session,
            user: msg.user,
            ttl: None,
            reference: msg.reference,
            desk: ask.desk,
            event: ask.event,
            routing_key: ask.reply_to.queue,
            body,
            web_data: None,
            enqueued: Instant::now(),
        };
        self.submit(job);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn waiting(session: Uuid) -> Waiting {
        Waiting {
            session,
            reference: None,
        }
    }

    #[test]
    fn pending_requests_are_counted_per_session() {
        let (alice, bob) = (Uuid::new_v4(), Uuid::new_v4());
        let mut requests = Requests::default();
        requests.wait("a1".into(), waiting(alice));
        requests.wait("a2".into(), waiting(alice));
        requests.wait("b1".into(), waiting(bob));
        assert_eq!((requests.pending(alice), requests.pending(bob)), (2, 1));
        assert!(requests.take("a1").is_some());
        assert!(requests.take("a1").is_none(), "taken once");
        assert!(requests.take("b1").is_some());
        assert_eq!((requests.pending(alice), requests.pending(bob)), (1, 0));
        assert!(requests.take("a2").is_some());
        assert!(requests.per_session.is_empty(), "no entry is left behind");
    }
}
