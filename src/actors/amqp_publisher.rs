//! `AmqpPublisher`: web → desktop. One AMQP connection with publisher confirms, on its own thread.
//!
//! The router hands it [`PublishJob`]s through a [`PublisherHandle`]. It publishes each with the
//! mandatory flag without waiting for the previous confirm (pipelined), and reports every job
//! exactly once as a `PublishOutcome`: confirmed (routed or returned), nacked, expired, or
//! refused at shutdown. While the broker is away, jobs wait in order in a buffer bounded by the
//! handle's budget (count and bytes) and by a TTL; messages published but not confirmed when a
//! connection dies are published again first after reconnect, with the same `message_id`
//! (at-least-once: a desktop app may see one twice and can drop it by id).

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::Recipient;
use amiquip::{
    AmqpProperties, AmqpValue, Channel, Confirm, ConfirmSmoother, ConnectionBlockedNotification, FieldTable,
    Publish, Return,
};
use crossbeam_channel::{select, Receiver, Sender};
use uuid::Uuid;

use crate::actors::router::{Confirmed, PublishOutcome, PublishOutcomes};
use crate::actors::StopSignal;
use crate::amqp::{self, AmqpError};
use crate::config::{AmqpConfig, Config};
use crate::link::{LinkLife, LinkState};
use crate::metrics::{Metrics, PublishFailure};
use crate::port_watch::PortWatch;
use crate::transform::Data;

/// One browser publish on its way to RabbitMQ.
#[derive(Debug)]
pub struct PublishJob {
    /// AMQP message_id; also the `id` of the browser's ack and of the web event.
    pub id: String,
    /// Publishing session.
    pub session: Uuid,
    /// The browser's `ref`.
    pub reference: Option<String>,
    /// Desk, for the web fan-out after the confirm.
    pub desk: String,
    /// Event name, for the web fan-out.
    pub event: String,
    /// The data as the browser sent it (web field names), for the web fan-out.
    pub data: Data,
    /// `{desk}_{event}`.
    pub routing_key: String,
    /// JSON body after `to_desktop` transforms.
    pub body: Vec<u8>,
    /// When the router accepted it, for the TTL.
    pub enqueued: Instant,
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

/// The router's end of the publisher: submit jobs within the budget.
#[derive(Clone)]
pub struct PublisherHandle {
    jobs: Sender<PublishJob>,
    budget: Arc<Budget>,
}

impl PublisherHandle {
    /// A handle and the receiving end for [`AmqpPublisher::jobs`].
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
        if !self.budget.reserve(job.body.len()) {
            return Err(Box::new(job));
        }
        self.jobs.send(job).map_err(|returned| {
            self.budget.release(returned.0.body.len());
            Box::new(returned.0)
        })
    }
}

/// The publisher worker's state; run it with [`AmqpPublisher::run`] on its own thread.
pub struct AmqpPublisher {
    /// Shared configuration.
    pub config: Arc<Config>,
    /// Jobs from the router.
    pub jobs: Receiver<PublishJob>,
    /// The handle the jobs came through, for its budget.
    pub handle: PublisherHandle,
    /// Where outcomes go.
    pub outcomes: Recipient<PublishOutcomes>,
    /// This link's state, read by `/health`.
    pub link: Arc<LinkState>,
    /// Shared counters.
    pub metrics: Arc<Metrics>,
    /// This bridge process's id, sent as `x-instance`.
    pub instance: String,
}

/// A job published on the current channel and not yet confirmed.
struct InFlight {
    tag: u64,
    job: PublishJob,
    sent: Instant,
}

/// Per-connection confirm bookkeeping.
#[derive(Default)]
struct Pipeline {
    next_tag: u64,
    in_flight: VecDeque<InFlight>,
    smoother: ConfirmSmoother,
    /// message_ids the broker returned as unroutable, awaiting their confirm.
    returned: HashSet<String>,
}

fn lost(what: &str) -> AmqpError {
    AmqpError::Lost(what.into())
}

impl AmqpPublisher {
    /// Connects, publishes and reconnects until `stop` fires; then settles every job it holds.
    pub fn run(self, stop: StopSignal) {
        let mut life = LinkLife::new(
            Arc::clone(&self.link),
            Arc::clone(&self.metrics),
            &self.config.amqp,
        );
        let mut buffer = VecDeque::new();
        loop {
            match self.session(&stop, &mut buffer, &mut life) {
                Ok(()) => break,
                Err(error) => life.down(&error),
            }
            if !self.wait(&stop, life.next_delay(), &mut buffer) {
                break;
            }
        }
        for job in buffer.into_iter().chain(self.jobs.try_iter()) {
            self.finish(job, Err(PublishFailure::Shutdown));
        }
        log::info!(
            "{} stopped",
            std::thread::current().name().unwrap_or("amqp worker")
        );
    }

    /// Waits out a reconnect delay (less if a broker port reopens) while buffering new jobs and
    /// expiring old ones; false on stop.
    fn wait(&self, stop: &StopSignal, delay: Duration, buffer: &mut VecDeque<PublishJob>) -> bool {
        let deadline = Instant::now() + delay;
        let ttl = Duration::from_millis(self.config.amqp.publish_ttl_ms);
        let mut watch = PortWatch::start(&self.config.amqp.urls);
        loop {
            while buffer.front().is_some_and(|job| job.enqueued.elapsed() >= ttl) {
                if let Some(job) = buffer.pop_front() {
                    self.finish(job, Err(PublishFailure::Expired));
                }
            }
            let now = Instant::now();
            if now >= deadline || watch.reopened() {
                return true;
            }
            let wake = buffer
                .front()
                .map_or(deadline, |job| (job.enqueued + ttl).min(deadline))
                .min(watch.next_probe());
            select! {
                recv(self.jobs) -> job => match job {
                    Ok(job) => buffer.push_back(job),
                    Err(_) => return false,
                },
                recv(stop) -> _ => return false,
                default(wake.saturating_duration_since(now)) => {}
            }
        }
    }

    fn session(
        &self,
        stop: &StopSignal,
        buffer: &mut VecDeque<PublishJob>,
        life: &mut LinkLife,
    ) -> Result<(), AmqpError> {
        let (mut connection, url) = amqp::connect_any(&self.config.amqp.urls, "publisher")?;
        let mut pipeline = Pipeline {
            next_tag: 1,
            ..Pipeline::default()
        };
        let end = self.publish_all(&mut connection, &url, stop, buffer, &mut pipeline, life);
        match end {
            Ok(()) => {
                if let Err(error) = connection.close() {
                    log::debug!("amqp publisher: close: {error}");
                }
            }
            Err(_) => {
                // Unconfirmed messages may or may not have reached the broker: publish them
                // again, first and in order (at-least-once).
                for in_flight in pipeline.in_flight.into_iter().rev() {
                    buffer.push_front(in_flight.job);
                }
            }
        }
        end
    }

    fn publish_all(
        &self,
        connection: &mut amiquip::Connection,
        url: &str,
        stop: &StopSignal,
        buffer: &mut VecDeque<PublishJob>,
        pipeline: &mut Pipeline,
        life: &mut LinkLife,
    ) -> Result<(), AmqpError> {
        let blocked = connection.listen_for_connection_blocked()?;
        let channel = connection.open_channel(None)?;
        // Listen before enabling, so that no confirm or return can be missed.
        let confirms = channel.listen_for_publisher_confirms()?;
        let returns = channel.listen_for_returns()?;
        channel.enable_publisher_confirms()?;
        amqp::declare_outbound(&channel, &self.config.amqp)?;

        let exchange = &self.config.amqp.outbound_exchange;
        life.up(&format!("({url}, exchange `{exchange}`)"));
        let ttl = Duration::from_millis(self.config.amqp.publish_ttl_ms);
        while let Some(job) = buffer.pop_front() {
            if job.enqueued.elapsed() >= ttl {
                self.finish(job, Err(PublishFailure::Expired));
            } else {
                self.send_or_requeue(&channel, job, pipeline, buffer)?;
            }
        }
        loop {
            select! {
                recv(self.jobs) -> job => match job {
                    Ok(job) => self.send_or_requeue(&channel, job, pipeline, buffer)?,
                    // The router is gone: nothing more will come.
                    Err(_) => {
                        self.drain(&confirms, &returns, pipeline, Instant::now());
                        return Ok(());
                    }
                },
                recv(confirms) -> confirm => match confirm {
                    Ok(confirm) => self.confirm(confirm, &confirms, &returns, pipeline),
                    Err(_) => return Err(lost("the channel closed (confirm stream ended)")),
                },
                recv(returns) -> returned => match returned {
                    Ok(returned) => note_return(returned, pipeline),
                    Err(_) => return Err(lost("the channel closed (return stream ended)")),
                },
                recv(blocked) -> notification => match notification {
                    Ok(ConnectionBlockedNotification::Blocked(reason)) => life.state().set_blocked(true, &reason),
                    Ok(ConnectionBlockedNotification::Unblocked) => life.state().set_blocked(false, ""),
                    Err(_) => return Err(lost("the connection's I/O thread ended")),
                },
                recv(stop) -> deadline => {
                    let deadline = deadline.unwrap_or_else(|_| Instant::now());
                    self.drain(&confirms, &returns, pipeline, deadline);
                    return Ok(());
                }
            }
        }
    }

    /// Publishes `job` and tracks it until its confirm; if the channel fails, puts it back at
    /// the front of `buffer` for the next connection.
    fn send_or_requeue(
        &self,
        channel: &Channel,
        job: PublishJob,
        pipeline: &mut Pipeline,
        buffer: &mut VecDeque<PublishJob>,
    ) -> Result<(), AmqpError> {
        match self.publish(channel, &job) {
            Ok(()) => {
                pipeline.in_flight.push_back(InFlight {
                    tag: pipeline.next_tag,
                    job,
                    sent: Instant::now(),
                });
                pipeline.next_tag += 1;
                Ok(())
            }
            Err(error) => {
                buffer.push_front(job);
                Err(error.into())
            }
        }
    }

    fn publish(&self, channel: &Channel, job: &PublishJob) -> Result<(), amiquip::Error> {
        let mut headers = FieldTable::new();
        headers.insert(amqp::HEADER_ORIGIN.into(), AmqpValue::LongString("web".into()));
        headers.insert(
            amqp::HEADER_SESSION.into(),
            AmqpValue::LongString(job.session.to_string()),
        );
        headers.insert(
            amqp::HEADER_INSTANCE.into(),
            AmqpValue::LongString(self.instance.clone()),
        );
        let properties = AmqpProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_message_id(job.id.clone())
            .with_timestamp(amqp::unix_now())
            .with_app_id(amqp::APP_ID.into())
            .with_headers(headers);
        let publish = Publish {
            body: &job.body,
            routing_key: job.routing_key.clone(),
            mandatory: true,
            immediate: false,
            properties,
        };
        channel.basic_publish(self.config.amqp.outbound_exchange.as_str(), publish)
    }

    /// Resolves the jobs that `first` and any confirms already waiting cover, in tag order,
    /// and reports them to the router in one message.
    fn confirm(
        &self,
        first: Confirm,
        confirms: &Receiver<Confirm>,
        returns: &Receiver<Return>,
        pipeline: &mut Pipeline,
    ) {
        let Pipeline {
            in_flight,
            smoother,
            returned,
            ..
        } = pipeline;
        let mut settled = Vec::new();
        for received in std::iter::once(first).chain(confirms.try_iter()) {
            for confirm in smoother.process(received) {
                // The broker sends basic.return before the basic.ack of the same message, so
                // any return for this message is already waiting.
                for message in returns.try_iter() {
                    note_return_into(message, returned);
                }
                let (tag, acked) = match confirm {
                    Confirm::Ack(payload) => (payload.delivery_tag, true),
                    Confirm::Nack(payload) => (payload.delivery_tag, false),
                };
                let Some(done) = in_flight.pop_front() else {
                    log::error!("amqp publisher: confirm for tag {tag} with nothing in flight");
                    continue;
                };
                if done.tag != tag {
                    log::error!(
                        "amqp publisher: confirm for tag {tag} but the oldest in flight is {}",
                        done.tag
                    );
                }
                let result = if acked {
                    Ok(Confirmed {
                        routed: !returned.remove(&done.job.id),
                        latency: done.sent.elapsed(),
                    })
                } else {
                    returned.remove(&done.job.id);
                    Err(PublishFailure::Nacked)
                };
                settled.push(self.settled(done.job, result));
            }
        }
        self.send(settled);
    }

    /// Shutdown: waits for outstanding confirms until `deadline`, then fails what is left.
    fn drain(
        &self,
        confirms: &Receiver<Confirm>,
        returns: &Receiver<Return>,
        pipeline: &mut Pipeline,
        deadline: Instant,
    ) {
        while !pipeline.in_flight.is_empty() {
            match confirms.recv_deadline(deadline) {
                Ok(confirm) => self.confirm(confirm, confirms, returns, pipeline),
                Err(_) => break,
            }
        }
        for in_flight in pipeline.in_flight.drain(..) {
            self.finish(in_flight.job, Err(PublishFailure::Shutdown));
        }
    }

    /// Settles one job on its own (cold paths: expiry, shutdown).
    fn finish(&self, job: PublishJob, result: Result<Confirmed, PublishFailure>) {
        self.send(vec![self.settled(job, result)]);
    }

    fn settled(&self, job: PublishJob, result: Result<Confirmed, PublishFailure>) -> PublishOutcome {
        self.handle.budget.release(job.body.len());
        PublishOutcome { job, result }
    }

    fn send(&self, outcomes: Vec<PublishOutcome>) {
        if !outcomes.is_empty() {
            self.outcomes.do_send(PublishOutcomes(outcomes));
        }
    }
}

fn note_return(message: Return, pipeline: &mut Pipeline) {
    note_return_into(message, &mut pipeline.returned);
}

fn note_return_into(message: Return, returned: &mut HashSet<String>) {
    match message.properties.message_id() {
        Some(id) => {
            returned.insert(id.clone());
        }
        None => log::warn!("amqp publisher: the broker returned a message without message_id"),
    }
}
