//! `AmqpPublisher`: web → desktop. One AMQP connection with publisher confirms, on its own
//! thread ([`super::worker`]).
//!
//! The router hands it [`PublishJob`]s through a [`PublisherHandle`]. It publishes each with
//! the mandatory flag without waiting for the previous confirm (pipelined), and reports every
//! job exactly once in [`PublishOutcomes`]: confirmed (routed or returned), nacked, expired, or
//! failed at shutdown. While the broker is away, jobs wait in order in a buffer bounded by the
//! handle's budget (count and bytes) and by a TTL. Messages published but not confirmed when a
//! connection dies — or when the confirms stop matching what was published — are published
//! again first after reconnect, with the same `message_id` (at-least-once: a desktop app may
//! see one twice and can drop it by id).
//!
//! A message the broker refuses (it closes the channel over it: 406 for a message above its
//! `max_message_size` or with an invalid property, 404 for a missing exchange) fails alone:
//! its browser is told, the channel is reopened on the same connection, and the others go on.
//! With one message in flight the refused one is known; with several it is not (the broker
//! confirms asynchronously, so earlier ones may be unconfirmed too), so those are published
//! again one at a time, and the one that closes the channel alone is the one refused. The
//! connection, the link state and every other user's messages are left alone.
//!
//! Nothing may be published behind a message the broker might refuse: amiquip sends a publish
//! as several frames, and when the broker's channel.close arrives between them it drops the
//! rest and answers close-ok, so the broker sees a publish cut short — which RabbitMQ before
//! 3.13 answers by closing the whole connection (505 UNEXPECTED_FRAME). A message larger than
//! any the broker has confirmed on this connection is such a message (RabbitMQ refuses by
//! size): it goes out with nothing behind it until it is confirmed or refused. Messages up to
//! [`NEVER_REFUSED_BY_SIZE`] never wait so: a probe drains the whole confirm window first, and
//! probing every new largest small message halved the browser-publish rate in the ingest
//! benchmark (29 k → 16–23 k acked/s).

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Bodies no broker is assumed to refuse by size: RabbitMQ's `max_message_size` defaults to
/// 128 MiB, and a limit below 4 KiB would refuse ordinary events. Only larger bodies are probed.
const NEVER_REFUSED_BY_SIZE: usize = 4096;

use actix::Recipient;
use amiquip::{
    AmqpProperties, AmqpValue, Channel, Confirm, ConfirmSmoother, Connection, ConnectionBlockedNotification,
    ConsumerMessage, ConsumerOptions, FieldTable, Publish, QueueDeleteOptions, Return,
};
use crossbeam_channel::{select, Receiver};

use crate::actors::messages::{
    Confirmed, DesktopReply, JobKind, PresenceNotice, PublishJob, PublishOutcome, PublishOutcomes,
    PublisherHandle,
};
use crate::actors::worker::{track_blocked, LinkWork, StopSignal};
use crate::amqp::{self, AmqpError};
use crate::broker_url::BrokerUrl;
use crate::config::Config;
use crate::link::LinkLife;
use crate::log_text::Untrusted;
use crate::metrics::{Link, PublishFailure};
use crate::presence;
use crate::tag_queue::{OutOfStep, TagQueue};

/// The publisher's state; [`super::worker::Worker::spawn`] runs it.
pub struct AmqpPublisher {
    config: Arc<Config>,
    jobs: Receiver<PublishJob>,
    /// The handle the jobs came through, for its budget.
    handle: PublisherHandle,
    outcomes: Recipient<PublishOutcomes>,
    /// Where answers from the reply queue go.
    replies: Recipient<DesktopReply>,
    /// Where other instances' presence messages go.
    presence: Recipient<PresenceNotice>,
    /// This bridge process's id, sent as `x-instance`.
    instance: String,
    /// This instance's reply queue: `reply_to` of its requests.
    reply_queue: String,
    /// This instance's queue on the presence exchange.
    presence_queue: String,
    /// Jobs waiting for a connection, oldest first. Kept here, not per connection, so that a
    /// lost link or a panic loses none of them.
    buffer: VecDeque<PublishJob>,
    /// Jobs published on the current channel and awaiting their confirm.
    pipeline: Pipeline,
    /// How many jobs at the front of `buffer` are suspected of a refusal and go out one at a
    /// time, each after the previous one's confirm.
    suspects: usize,
    /// The largest body the broker has confirmed on this connection: no larger message can
    /// be refused by size (see the module docs).
    accepted_size: usize,
}

impl AmqpPublisher {
    /// A publisher for the jobs submitted through `handle`.
    pub fn new(
        config: Arc<Config>,
        handle: PublisherHandle,
        jobs: Receiver<PublishJob>,
        (outcomes, replies, presence): (
            Recipient<PublishOutcomes>,
            Recipient<DesktopReply>,
            Recipient<PresenceNotice>,
        ),
        instance: String,
    ) -> Self {
        AmqpPublisher {
            config,
            jobs,
            handle,
            outcomes,
            replies,
            presence,
            reply_queue: amqp::reply_queue_name(&instance),
            presence_queue: amqp::presence_queue_name(&instance),
            instance,
            buffer: VecDeque::new(),
            pipeline: Pipeline::default(),
            suspects: 0,
            accepted_size: NEVER_REFUSED_BY_SIZE,
        }
    }
}

/// Answers taken from the reply queue before the first is acked: enough to keep up with a
/// responder, bounded so that a flood waits in the broker, not here.
const REPLY_PREFETCH: u16 = 256;

/// A job published on the current channel and not yet confirmed.
#[derive(Debug)]
struct InFlight {
    job: PublishJob,
    sent: Instant,
}

/// Per-channel confirm bookkeeping.
struct Pipeline {
    next_tag: u64,
    in_flight: TagQueue<InFlight>,
    smoother: ConfirmSmoother,
    /// message_ids the broker returned as unroutable, awaiting their confirm.
    returned: HashSet<String>,
    /// The tag of a message larger than the broker has accepted, while it is in flight: it is
    /// the newest, and nothing goes out behind it.
    probe: Option<u64>,
}

impl Default for Pipeline {
    fn default() -> Self {
        Pipeline {
            // Confirm tags count from 1 on each channel.
            next_tag: 1,
            in_flight: TagQueue::default(),
            smoother: ConfirmSmoother::default(),
            returned: HashSet::new(),
            probe: None,
        }
    }
}

/// How a job ended, before it is handed back to the router.
type Settled = (PublishJob, Result<Confirmed, PublishFailure>);

impl Pipeline {
    /// Tracks `job`, published on this channel; a `probe` holds back everything behind it.
    fn sent_probe(&mut self, job: PublishJob, probe: bool) {
        if probe {
            self.probe = Some(self.next_tag);
        }
        self.sent(job);
    }

    fn sent(&mut self, job: PublishJob) {
        self.in_flight.push(
            self.next_tag,
            InFlight {
                job,
                sent: Instant::now(),
            },
        );
        self.next_tag += 1;
    }

    /// Resolves what a confirm from the broker settles, in tag order, into `settled`. A
    /// confirm for any tag but the oldest in flight is [`OutOfStep`]: the jobs stay in flight,
    /// to be published again on a new channel, rather than ack one browser for another's message.
    fn confirm(
        &mut self,
        received: Confirm,
        returns: &Receiver<Return>,
        settled: &mut Vec<Settled>,
    ) -> Result<(), OutOfStep> {
        for confirm in self.smoother.process(received) {
            // The broker sends basic.return before the basic.ack of the same message, so any
            // return for this message is already waiting.
            for message in returns.try_iter() {
                note_return(message, &mut self.returned);
            }
            let (tag, acked) = match confirm {
                Confirm::Ack(payload) => (payload.delivery_tag, true),
                Confirm::Nack(payload) => (payload.delivery_tag, false),
            };
            let done = self.in_flight.pop(tag)?;
            if self.probe == Some(tag) {
                self.probe = None;
            }
            let was_returned = self.returned.remove(&done.job.id);
            let result = if acked {
                Ok(Confirmed {
                    routed: !was_returned,
                    latency: done.sent.elapsed(),
                })
            } else {
                Err(PublishFailure::Nacked)
            };
            settled.push((done.job, result));
        }
        Ok(())
    }
}

fn note_return(message: Return, returned: &mut HashSet<String>) {
    match message.properties.message_id() {
        Some(id) => {
            returned.insert(id.clone());
        }
        None => log::warn!("amqp publisher: the broker returned a message without message_id"),
    }
}

fn lost(what: impl Into<String>) -> AmqpError {
    AmqpError::Lost(what.into())
}

/// The channel messages are published on, and what it reports.
struct Outbound {
    channel: Channel,
    confirms: Receiver<Confirm>,
    returns: Receiver<Return>,
}

/// What the connection delivers besides confirms; it outlives the publish channels.
struct Inbound<'a> {
    reply_channel: &'a Channel,
    replies: &'a Receiver<ConsumerMessage>,
    presence: &'a Receiver<ConsumerMessage>,
    blocked: &'a Receiver<ConnectionBlockedNotification>,
}

/// How serving one publish channel ended.
enum ChannelEnd {
    /// Asked to stop; everything is settled.
    Stopped,
    /// The channel closed: with the error a call on it returned, if one did.
    Closed(Option<amiquip::Error>),
}

/// A channel closed by the broker over something published on it (`code`, `message`), or
/// else the connection's loss.
fn refusal(error: amiquip::Error) -> Result<(u16, String), AmqpError> {
    match error {
        amiquip::Error::ServerClosedChannel { code, message, .. } => Ok((code, message)),
        other => Err(other.into()),
    }
}

impl LinkWork for AmqpPublisher {
    const LINK: Link = Link::Publisher;

    fn serve(
        &mut self,
        connection: &mut Connection,
        url: &BrokerUrl,
        stop: &StopSignal,
        life: &mut LinkLife,
    ) -> Result<(), AmqpError> {
        // Whatever an earlier channel left unconfirmed (also after a panic) goes first.
        self.requeue_in_flight();
        let end = self.publish_all(connection, url, stop, life);
        if end.is_err() {
            // Unconfirmed messages may or may not have reached the broker: publish them
            // again, first and in order (at-least-once).
            self.requeue_in_flight();
        }
        end
    }

    /// Buffers new jobs and expires old ones while the broker is away.
    fn pause(&mut self, until: Instant, stop: &StopSignal) -> bool {
        let ttl = self.ttl();
        loop {
            while self.buffer.front().is_some_and(|job| job.expired(ttl)) {
                if let Some(job) = self.buffer.pop_front() {
                    self.suspects = self.suspects.saturating_sub(1);
                    self.finish_one(job, Err(PublishFailure::Expired));
                }
            }
            let now = Instant::now();
            if now >= until {
                return true;
            }
            let wake = self
                .buffer
                .front()
                .map_or(until, |job| job.deadline(ttl).min(until));
            select! {
                recv(self.jobs) -> job => match job {
                    Ok(job) => self.buffer.push_back(job),
                    Err(_) => return false,
                },
                recv(stop) -> _ => return false,
                default(wake.saturating_duration_since(now)) => {}
            }
        }
    }

    /// Jobs never handed to the broker end as "not sent".
    fn finish(&mut self) {
        self.requeue_in_flight();
        let unsent: Vec<PublishJob> = self.buffer.drain(..).chain(self.jobs.try_iter()).collect();
        for job in unsent {
            self.finish_one(job, Err(PublishFailure::NotSent));
        }
    }
}

impl AmqpPublisher {
    fn ttl(&self) -> Duration {
        Duration::from_millis(self.config.amqp.publish_ttl_ms)
    }

    fn requeue_in_flight(&mut self) {
        for in_flight in self.pipeline.in_flight.drain().rev() {
            self.buffer.push_front(in_flight.job);
        }
        self.pipeline = Pipeline::default();
    }

    /// Serves one connection: buffered jobs first, then new ones as they come. A publish
    /// channel the broker closes over one message is replaced (see the module docs).
    fn publish_all(
        &mut self,
        connection: &mut Connection,
        url: &BrokerUrl,
        stop: &StopSignal,
        life: &mut LinkLife,
    ) -> Result<(), AmqpError> {
        // Another connection may reach another node, with another size limit.
        self.accepted_size = NEVER_REFUSED_BY_SIZE;
        let blocked = connection.listen_for_connection_blocked()?;
        let mut outbound = self.open_outbound(connection)?;
        // Answers to this instance's requests: on a channel of their own, acked once handed on.
        let reply_channel = connection.open_channel(None)?;
        amqp::declare_reply_queue(&reply_channel, &self.reply_queue)?;
        reply_channel.qos(0, REPLY_PREFETCH, false)?;
        let replies = reply_channel.basic_consume(self.reply_queue.as_str(), ConsumerOptions::default())?;
        // Other instances' presence, on the same channel: small, and read as it comes.
        amqp::declare_presence(&reply_channel, &self.config.amqp, &self.presence_queue)?;
        let presence =
            reply_channel.basic_consume(self.presence_queue.as_str(), ConsumerOptions::default())?;
        let exchange = &self.config.amqp.outbound_exchange;
        life.up(&format!("({url}, exchange `{exchange}`)"));

        let inbound = Inbound {
            reply_channel: &reply_channel,
            replies: replies.receiver(),
            presence: presence.receiver(),
            blocked: &blocked,
        };
        loop {
            let error = match self.serve_channel(&outbound, &inbound, stop, life)? {
                ChannelEnd::Stopped => return Ok(()),
                ChannelEnd::Closed(error) => error,
            };
            // Confirms that came before the close still settle their messages, so that only
            // what the broker never confirmed is suspected.
            if let Some(first) = outbound.confirms.try_iter().next() {
                self.confirm(first, &outbound.confirms, &outbound.returns)?;
            }
            // A server-closed channel has already gone from the connection, so this sends
            // nothing: it only hands back the broker's reason, if a call has not taken it.
            let closed = outbound.channel.close();
            let error = error.or(closed.err()).unwrap_or(amiquip::Error::EventLoopDropped);
            let (code, message) = refusal(error)?;
            self.refused(code, &message)?;
            outbound = self.open_outbound(connection)?;
        }
    }

    /// A publish channel with confirms, and the outbound exchange declared on it.
    fn open_outbound(&self, connection: &mut Connection) -> Result<Outbound, AmqpError> {
        let channel = connection.open_channel(None)?;
        // Listen before enabling, so that no confirm or return can be missed.
        let confirms = channel.listen_for_publisher_confirms()?;
        let returns = channel.listen_for_returns()?;
        channel.enable_publisher_confirms()?;
        amqp::declare_outbound(&channel, &self.config.amqp)?;
        Ok(Outbound {
            channel,
            confirms,
            returns,
        })
    }

    /// The broker closed the publish channel with `code`: fails the one message it refused,
    /// or marks the suspects when several were in flight. Nothing in flight means nothing to
    /// blame: then the link starts over, with its backoff.
    fn refused(&mut self, code: u16, message: &str) -> Result<(), AmqpError> {
        let reason = Untrusted(message);
        match self.pipeline.in_flight.len() {
            0 => Err(lost(format!(
                "the broker closed the publish channel with nothing in flight ({code}: {reason})"
            ))),
            1 => {
                let refused: Vec<PublishJob> = self.pipeline.in_flight.drain().map(|f| f.job).collect();
                self.pipeline = Pipeline::default();
                for job in refused {
                    log::warn!(
                        "amqp publisher: the broker refused message {} for `{}` ({code}: {reason}); \
                         it fails alone and the channel is reopened",
                        job.id,
                        Untrusted(&job.routing_key)
                    );
                    self.suspects = self.suspects.saturating_sub(1);
                    self.finish_one(job, Err(PublishFailure::Refused));
                }
                Ok(())
            }
            suspects => {
                log::info!(
                    "amqp publisher: the broker closed the channel over one of {suspects} messages \
                     ({code}: {reason}); publishing them one at a time to find it"
                );
                self.requeue_in_flight();
                self.suspects = suspects;
                Ok(())
            }
        }
    }

    /// Publishes on `outbound` until asked to stop or until the channel closes.
    fn serve_channel(
        &mut self,
        outbound: &Outbound,
        inbound: &Inbound<'_>,
        stop: &StopSignal,
        life: &mut LinkLife,
    ) -> Result<ChannelEnd, AmqpError> {
        let Outbound {
            channel,
            confirms,
            returns,
        } = outbound;
        let reply_channel = inbound.reply_channel;
        if let Err(error) = self.send_buffered(channel) {
            return Ok(ChannelEnd::Closed(Some(error)));
        }
        loop {
            select! {
                recv(self.jobs) -> job => match job {
                    Ok(job) => {
                        self.buffer.push_back(job);
                        if let Err(error) = self.send_buffered(channel) {
                            return Ok(ChannelEnd::Closed(Some(error)));
                        }
                    }
                    // The router is gone: nothing more will come.
                    Err(_) => {
                        self.stop(channel, reply_channel, (confirms, returns), Instant::now())?;
                        return Ok(ChannelEnd::Stopped);
                    }
                },
                recv(inbound.replies) -> message => {
                    let mut delivery = amqp::delivered(message)?;
                    self.replies.do_send(DesktopReply {
                        correlation_id: delivery.properties.correlation_id().clone(),
                        body: std::mem::take(&mut delivery.body),
                    });
                    delivery.ack(reply_channel)?;
                }
                recv(inbound.presence) -> message => {
                    let delivery = amqp::delivered(message)?;
                    let notice = presence::parse(&delivery.routing_key, &delivery.body);
                    // Our own messages: the router applied them when it sent them.
                    if !notice.as_ref().is_ok_and(|notice| notice.instance() == self.instance) {
                        self.presence.do_send(PresenceNotice(notice));
                    }
                    delivery.ack(reply_channel)?;
                }
                recv(confirms) -> confirm => match confirm {
                    Ok(confirm) => {
                        self.confirm(confirm, confirms, returns)?;
                        // Suspects go out one at a time, each once the one before is confirmed;
                        // the jobs behind them wait meanwhile.
                        if !self.buffer.is_empty() {
                            if let Err(error) = self.send_buffered(channel) {
                                return Ok(ChannelEnd::Closed(Some(error)));
                            }
                        }
                    }
                    Err(_) => return Ok(ChannelEnd::Closed(None)),
                },
                recv(returns) -> returned => match returned {
                    Ok(returned) => note_return(returned, &mut self.pipeline.returned),
                    Err(_) => return Ok(ChannelEnd::Closed(None)),
                },
                recv(inbound.blocked) -> notification => track_blocked(life.state(), notification)?,
                recv(stop) -> deadline => {
                    let deadline = deadline.unwrap_or_else(|_| Instant::now());
                    // What the router accepted before it stopped taking publishes (the last
                    // presence messages among them) still goes out.
                    self.buffer.extend(self.jobs.try_iter());
                    self.send_buffered(channel)?;
                    self.stop(channel, reply_channel, (confirms, returns), deadline)?;
                    return Ok(ChannelEnd::Stopped);
                }
            }
        }
    }

    /// Shutdown: settles what is in flight, then deletes the reply queue (a stopped instance
    /// gets no more answers; a crashed one's queue expires by itself).
    fn stop(
        &mut self,
        channel: &Channel,
        reply_channel: &Channel,
        (confirms, returns): (&Receiver<Confirm>, &Receiver<Return>),
        deadline: Instant,
    ) -> Result<(), AmqpError> {
        let drained = self.drain(channel, confirms, returns, deadline);
        if let Err(error) =
            reply_channel.queue_delete(self.reply_queue.as_str(), QueueDeleteOptions::default())
        {
            log::warn!(
                "amqp publisher: could not delete reply queue `{}`: {}",
                self.reply_queue,
                crate::log_text::Untrusted(&error)
            );
        }
        drained
    }

    /// Publishes the buffered jobs in order, each tracked until its confirm; expired ones end
    /// as such. A job leaves the buffer only once published, so neither a failing channel nor
    /// a panic can lose it.
    fn send_buffered(&mut self, channel: &Channel) -> Result<(), amiquip::Error> {
        let ttl = self.ttl();
        while let Some(job) = self.buffer.front() {
            if self.pipeline.probe.is_some() || (self.suspects > 0 && !self.pipeline.in_flight.is_empty()) {
                break;
            }
            let expired = job.expired(ttl);
            let probe = job.body.get().len() > self.accepted_size;
            if !expired {
                self.publish(channel, job)?;
            }
            let Some(job) = self.buffer.pop_front() else { break };
            if expired {
                self.suspects = self.suspects.saturating_sub(1);
                self.finish_one(job, Err(PublishFailure::Expired));
            } else {
                self.pipeline.sent_probe(job, probe);
            }
        }
        Ok(())
    }

    fn publish(&self, channel: &Channel, job: &PublishJob) -> Result<(), amiquip::Error> {
        let mut headers = FieldTable::new();
        headers.insert(
            amqp::HEADER_INSTANCE.into(),
            AmqpValue::LongString(self.instance.clone()),
        );
        // Requests say so: a desk stream (history) keeps browser events, not questions.
        let origin = match job.kind {
            JobKind::Request => Some(amqp::ORIGIN_REQUEST),
            JobKind::Event | JobKind::Reply { .. } => Some(amqp::ORIGIN_WEB),
            JobKind::Presence => None,
        };
        if let Some(origin) = origin {
            headers.insert(amqp::HEADER_ORIGIN.into(), AmqpValue::LongString(origin.into()));
            headers.insert(
                amqp::HEADER_SESSION.into(),
                AmqpValue::LongString(job.session.to_string()),
            );
        }
        if let Some(user) = &job.user {
            headers.insert(amqp::HEADER_USER.into(), AmqpValue::LongString(user.to_string()));
        }
        let mut properties = AmqpProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_message_id(job.id.clone())
            .with_timestamp(amqp::unix_now())
            .with_app_id(amqp::APP_ID.into())
            .with_headers(headers);
        let exchange = match &job.kind {
            JobKind::Event => self.config.amqp.outbound_exchange.as_str(),
            JobKind::Request => {
                properties = properties
                    .with_reply_to(self.reply_queue.clone())
                    .with_correlation_id(job.id.clone());
                self.config.amqp.outbound_exchange.as_str()
            }
            // `routing_key` is the asker's reply queue, reached through the default exchange.
            JobKind::Reply { correlation_id } => {
                properties = properties.with_correlation_id(correlation_id.clone());
                ""
            }
            JobKind::Presence => self.config.amqp.presence_exchange.as_str(),
        };
        if let Some(ttl) = job.ttl {
            // What is left of it: time spent in the outage buffer counts.
            let left = ttl.saturating_sub(job.enqueued.elapsed());
            properties = properties.with_expiration(left.as_millis().to_string());
        }
        let publish = Publish {
            body: job.body.get().as_bytes(),
            routing_key: job.routing_key.clone(),
            mandatory: true,
            immediate: false,
            properties,
        };
        channel.basic_publish(exchange, publish)
    }

    /// Settles what `first` and any confirms already waiting cover, and reports them to the
    /// router in one message; a confirm out of step with what was published loses the link.
    fn confirm(
        &mut self,
        first: Confirm,
        confirms: &Receiver<Confirm>,
        returns: &Receiver<Return>,
    ) -> Result<(), AmqpError> {
        let mut settled = Vec::new();
        let mut result = Ok(());
        for received in std::iter::once(first).chain(confirms.try_iter()) {
            if let Err(error) = self.pipeline.confirm(received, returns, &mut settled) {
                result = Err(lost(format!(
                    "publisher confirms out of step ({error}); unconfirmed messages are published again"
                )));
                break;
            }
        }
        // Suspects go out one at a time: whatever settled here was one.
        self.suspects = self.suspects.saturating_sub(settled.len());
        for (job, result) in &settled {
            if result.is_ok() {
                self.accepted_size = self.accepted_size.max(job.body.get().len());
            }
        }
        self.report(settled);
        result
    }

    /// Shutdown: waits for outstanding confirms until `deadline`, publishing what waited
    /// behind a probe or suspect meanwhile, then fails what is left.
    fn drain(
        &mut self,
        channel: &Channel,
        confirms: &Receiver<Confirm>,
        returns: &Receiver<Return>,
        deadline: Instant,
    ) -> Result<(), AmqpError> {
        while !self.pipeline.in_flight.is_empty() {
            match confirms.recv_deadline(deadline) {
                Ok(confirm) => {
                    self.confirm(confirm, confirms, returns)?;
                    self.send_buffered(channel)?;
                }
                Err(_) => break,
            }
        }
        let unconfirmed: Vec<PublishJob> = self.pipeline.in_flight.drain().map(|f| f.job).collect();
        for job in unconfirmed {
            self.finish_one(job, Err(PublishFailure::Shutdown));
        }
        Ok(())
    }

    /// Settles one job on its own (cold paths: expiry, shutdown).
    fn finish_one(&self, job: PublishJob, result: Result<Confirmed, PublishFailure>) {
        self.report(vec![(job, result)]);
    }

    fn report(&self, settled: Vec<Settled>) {
        if settled.is_empty() {
            return;
        }
        let outcomes = settled
            .into_iter()
            .map(|(job, result)| {
                self.handle.release(&job);
                PublishOutcome { job, result }
            })
            .collect();
        self.outcomes.do_send(PublishOutcomes(outcomes));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use amiquip::ConfirmPayload;
    use serde_json::value::RawValue;

    fn job(id: &str) -> PublishJob {
        PublishJob {
            kind: JobKind::Event,
            id: id.into(),
            session: uuid::Uuid::nil(),
            user: None,
            ttl: None,
            reference: None,
            desk: "A".into(),
            event: "new_example".into(),
            routing_key: "A_new_example".into(),
            body: RawValue::from_string("{}".into()).expect("valid JSON"),
            web_data: None,
            enqueued: Instant::now(),
        }
    }

    fn ack(tag: u64, multiple: bool) -> Confirm {
        Confirm::Ack(ConfirmPayload {
            delivery_tag: tag,
            multiple,
        })
    }

    #[test]
    fn confirms_settle_jobs_in_tag_order() {
        let mut pipeline = Pipeline::default();
        for id in ["a", "b", "c"] {
            pipeline.sent(job(id));
        }
        let mut settled = Vec::new();
        let returns = crossbeam_channel::never();
        pipeline
            .confirm(ack(2, true), &returns, &mut settled)
            .expect("in step");
        let ids: Vec<&str> = settled.iter().map(|(job, _)| job.id.as_str()).collect();
        assert_eq!(ids, ["a", "b"]);
        assert!(settled.iter().all(|(_, result)| result.is_ok()));
    }

    #[test]
    fn a_confirm_that_matches_no_published_job_settles_nothing() {
        // The bookkeeping has drifted: the broker's tag 1 is not the job we think is 1.
        let mut pipeline = Pipeline {
            next_tag: 2,
            ..Pipeline::default()
        };
        pipeline.sent(job("alice"));
        pipeline.sent(job("bob"));
        let mut settled = Vec::new();
        let returns = crossbeam_channel::never();
        let result = pipeline.confirm(ack(1, false), &returns, &mut settled);
        assert_eq!(
            result,
            Err(OutOfStep {
                expected: Some(2),
                got: 1
            })
        );
        assert!(settled.is_empty(), "nobody is told their message arrived");
        let left: Vec<String> = pipeline.in_flight.drain().map(|f| f.job.id).collect();
        assert_eq!(left, ["alice", "bob"], "both are kept, to be published again");
    }

    #[test]
    fn a_probe_holds_the_pipeline_until_its_own_confirm() {
        let mut pipeline = Pipeline::default();
        pipeline.sent_probe(job("small"), false);
        pipeline.sent_probe(job("large"), true);
        assert_eq!(pipeline.probe, Some(2), "the larger message is the probe");
        let mut settled = Vec::new();
        let returns = crossbeam_channel::never();
        pipeline
            .confirm(ack(1, false), &returns, &mut settled)
            .expect("in step");
        assert_eq!(
            pipeline.probe,
            Some(2),
            "a confirm of an earlier message does not release it"
        );
        pipeline
            .confirm(ack(2, false), &returns, &mut settled)
            .expect("in step");
        assert_eq!(pipeline.probe, None, "its confirm releases what waits behind it");
    }
}
