//! `AmqpConsumer`: desktop → web. One AMQP connection on its own thread.
//!
//! It declares the inbound topology, consumes the inbound queue with manual acks and a
//! prefetch, checks each delivery (routing key → known desk and event, body → JSON object) and
//! sends the router an [`Inbound`]. It acks only after the router's [`Verdict`] says every
//! subscriber has the event queued, batching consecutive acks with `multiple`; a bad delivery is
//! rejected without requeue, so the queue's dead-letter exchange keeps it and it never loops.
//! When the link drops it reconnects with [`Backoff`]; unacked deliveries come back from the
//! broker (at-least-once).

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;

use actix::Recipient;
use amiquip::{Channel, ConnectionBlockedNotification, ConsumerMessage, ConsumerOptions, Delivery};
use crossbeam_channel::{select, Receiver, RecvTimeoutError, Sender};

use crate::actors::router::Inbound;
use crate::actors::StopSignal;
use crate::amqp::{self, AmqpError};
use crate::config::Config;
use crate::link::{LinkLife, LinkState};
use crate::metrics::{Metrics, RejectReason};
use crate::port_watch::PortWatch;
use crate::transform::Data;

/// The router's answer for one delivery.
#[derive(Debug)]
pub struct Verdict {
    /// Delivery tag of the `Inbound` it answers.
    pub delivery_tag: u64,
    /// `Ok` to ack; otherwise reject without requeue: (reason, routing key, detail).
    pub outcome: Result<(), (RejectReason, String, String)>,
}

/// The consumer worker's state; run it with [`AmqpConsumer::run`] on its own thread.
pub struct AmqpConsumer {
    /// Shared configuration.
    pub config: Arc<Config>,
    /// Where decoded deliveries go.
    pub router: Recipient<Inbound>,
    /// This link's state, read by `/health`.
    pub link: Arc<LinkState>,
    /// Shared counters.
    pub metrics: Arc<Metrics>,
    /// This bridge process's id: deliveries carrying it in `x-instance` are our own publishes.
    pub instance: String,
}

impl AmqpConsumer {
    /// Connects, consumes and reconnects until `stop` fires.
    pub fn run(self, stop: StopSignal) {
        let mut life = LinkLife::new(
            Arc::clone(&self.link),
            Arc::clone(&self.metrics),
            &self.config.amqp,
        );
        loop {
            match self.session(&stop, &mut life) {
                Ok(()) => break,
                Err(error) => life.down(&error),
            }
            if !wait_to_retry(&stop, life.next_delay(), &self.config.amqp.urls) {
                break;
            }
        }
        log::info!(
            "{} stopped",
            std::thread::current().name().unwrap_or("amqp worker")
        );
    }

    /// One connection's life: `Ok` when asked to stop, `Err` when the link was lost.
    fn session(&self, stop: &StopSignal, life: &mut LinkLife) -> Result<(), AmqpError> {
        let (mut connection, url) = amqp::connect_any(&self.config.amqp.urls, "consumer")?;
        let end = self.consume(&mut connection, &url, stop, life);
        if end.is_ok() {
            // Unacked deliveries go back to the queue when the connection closes.
            if let Err(error) = connection.close() {
                log::debug!("amqp consumer: close: {error}");
            }
        }
        end
    }

    fn consume(
        &self,
        connection: &mut amiquip::Connection,
        url: &str,
        stop: &StopSignal,
        life: &mut LinkLife,
    ) -> Result<(), AmqpError> {
        let amqp = &self.config.amqp;
        let blocked = connection.listen_for_connection_blocked()?;
        let channel = connection.open_channel(None)?;
        amqp::declare_inbound(&channel, amqp, &self.config.desks, &self.config.events)?;
        channel.qos(0, amqp.prefetch, false)?;
        let consumer = channel.basic_consume(amqp.inbound_queue.as_str(), ConsumerOptions::default())?;

        life.up(&format!("({url}, queue `{}`)", amqp.inbound_queue));
        let desks: HashSet<&str> = self.config.desks.iter().map(String::as_str).collect();
        let events: HashSet<&str> = self.config.events.iter().map(String::as_str).collect();
        let (reply, verdicts) = crossbeam_channel::unbounded();
        // Deliveries handed to the router, in order, awaiting its verdict (bodies dropped):
        // amiquip acks through the `Delivery` value.
        let mut awaiting = VecDeque::with_capacity(amqp.prefetch as usize);
        loop {
            select! {
                recv(consumer.receiver()) -> message => match message {
                    Ok(ConsumerMessage::Delivery(delivery)) => {
                        if let Some(delivery) = self.deliver(&channel, delivery, &desks, &events, &reply)? {
                            awaiting.push_back(delivery);
                        }
                    }
                    Ok(ConsumerMessage::ServerCancelled) => {
                        return Err(AmqpError::Lost("the broker cancelled the consumer (was the queue deleted?)".into()));
                    }
                    Ok(ConsumerMessage::ServerClosedChannel(error)) => {
                        return Err(AmqpError::Lost(format!("the broker closed the channel: {error}")));
                    }
                    Ok(ConsumerMessage::ServerClosedConnection(error)) => {
                        return Err(AmqpError::Lost(format!("the broker closed the connection: {error}")));
                    }
                    Ok(ConsumerMessage::ClientCancelled)
                    | Ok(ConsumerMessage::ClientClosedChannel)
                    | Ok(ConsumerMessage::ClientClosedConnection) => {
                        return Err(AmqpError::Lost("the consumer was closed locally".into()));
                    }
                    Err(_) => return Err(AmqpError::Lost("the connection's I/O thread ended".into())),
                },
                recv(verdicts) -> verdict => {
                    // `reply` lives in this frame, so the channel cannot be disconnected.
                    if let Ok(verdict) = verdict {
                        self.settle(&channel, verdict, &verdicts, &mut awaiting)?;
                    }
                }
                recv(blocked) -> notification => match notification {
                    Ok(ConnectionBlockedNotification::Blocked(reason)) => life.state().set_blocked(true, &reason),
                    Ok(ConnectionBlockedNotification::Unblocked) => life.state().set_blocked(false, ""),
                    Err(_) => return Err(AmqpError::Lost("the connection's I/O thread ended".into())),
                },
                recv(stop) -> _ => return Ok(()),
            }
        }
    }

    /// Checks one delivery and hands it to the router (returning it, to settle on the verdict),
    /// or settles it at once.
    fn deliver(
        &self,
        channel: &Channel,
        mut delivery: Delivery,
        desks: &HashSet<&str>,
        events: &HashSet<&str>,
        reply: &Sender<Verdict>,
    ) -> Result<Option<Delivery>, amiquip::Error> {
        let origin = amqp::header_str(delivery.properties.headers().as_ref(), amqp::HEADER_INSTANCE);
        if origin == Some(self.instance.as_str()) {
            // Our own publish came back through overlapping bindings: never deliver it twice.
            self.metrics.own_echo();
            return delivery.ack(channel).map(|()| None);
        }
        match decode(&delivery, desks, events) {
            Ok((desk, event, data)) => {
                let id = delivery
                    .properties
                    .message_id()
                    .clone()
                    .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
                // do_send: the prefetch already bounds what is in flight to the router. If the
                // router has stopped (shutdown), no verdict comes and the broker keeps the delivery.
                self.router.do_send(Inbound {
                    delivery_tag: delivery.delivery_tag(),
                    desk,
                    event,
                    id,
                    data,
                    reply: reply.clone(),
                });
                delivery.body = Vec::new();
                Ok(Some(delivery))
            }
            Err((reason, detail)) => {
                self.metrics.rejected(reason, &delivery.routing_key, &detail);
                delivery.reject(channel, false).map(|()| None)
            }
        }
    }

    /// Acks or rejects `first` and every verdict already waiting. Consecutive acks become one
    /// `multiple` ack; verdicts arrive in delivery order, so a multiple ack never covers a
    /// delivery the router has not answered.
    fn settle(
        &self,
        channel: &Channel,
        first: Verdict,
        more: &Receiver<Verdict>,
        awaiting: &mut VecDeque<Delivery>,
    ) -> Result<(), amiquip::Error> {
        let mut last_accepted: Option<Delivery> = None;
        for verdict in std::iter::once(first).chain(more.try_iter()) {
            let Some(delivery) = awaiting.pop_front() else {
                log::error!(
                    "amqp consumer: verdict for tag {} with no delivery awaiting",
                    verdict.delivery_tag
                );
                continue;
            };
            debug_assert_eq!(delivery.delivery_tag(), verdict.delivery_tag);
            match verdict.outcome {
                Ok(()) => last_accepted = Some(delivery),
                Err((reason, routing_key, detail)) => {
                    if let Some(accepted) = last_accepted.take() {
                        accepted.ack_multiple(channel)?;
                    }
                    self.metrics.rejected(reason, &routing_key, &detail);
                    delivery.reject(channel, false)?;
                }
            }
        }
        if let Some(accepted) = last_accepted {
            accepted.ack_multiple(channel)?;
        }
        Ok(())
    }
}

/// Routing key → (desk, event) and body → JSON object, or why not.
fn decode(
    delivery: &Delivery,
    desks: &HashSet<&str>,
    events: &HashSet<&str>,
) -> Result<(String, String, Data), (RejectReason, String)> {
    let Some((desk, event)) = amqp::split_routing_key(&delivery.routing_key) else {
        return Err((
            RejectReason::UnknownDesk,
            "routing key has no `_` between desk and event".into(),
        ));
    };
    if !desks.contains(desk) {
        return Err((RejectReason::UnknownDesk, format!("unknown desk `{desk}`")));
    }
    if !events.contains(event) {
        return Err((RejectReason::UnknownEvent, format!("unknown event `{event}`")));
    }
    let data: Data = serde_json::from_slice(&delivery.body).map_err(|error| {
        (
            RejectReason::BadBody,
            format!("body is not a JSON object: {error}"),
        )
    })?;
    Ok((desk.to_owned(), event.to_owned(), data))
}

/// Waits `delay` before reconnecting, or less if a broker port reopens; false when asked to stop.
fn wait_to_retry(stop: &StopSignal, delay: std::time::Duration, urls: &[String]) -> bool {
    let deadline = std::time::Instant::now() + delay;
    let mut watch = PortWatch::start(urls);
    loop {
        match stop.recv_deadline(deadline.min(watch.next_probe())) {
            Err(RecvTimeoutError::Timeout) if std::time::Instant::now() >= deadline || watch.reopened() => {
                return true
            }
            Err(RecvTimeoutError::Timeout) => {}
            Ok(_) | Err(RecvTimeoutError::Disconnected) => return false,
        }
    }
}
