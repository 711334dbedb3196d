//! `AmqpConsumer`: desktop → web. One AMQP connection on its own thread ([`super::worker`]).
//!
//! It declares the inbound topology, consumes the inbound queue with manual acks and a
//! prefetch, checks each delivery (routing key → configured desk and event, body → JSON
//! object) and sends the router what it has received as one [`DesktopBatch`]. It acks only after the router's
//! [`Verdict`] says every subscriber has the event queued, batching consecutive acks with
//! `multiple`; a bad delivery is rejected without requeue, so the queue's dead-letter exchange
//! keeps it and it never loops. When the link drops, unacked deliveries come back from the
//! broker (at-least-once).

use std::sync::Arc;

use actix::Recipient;
use amiquip::{Channel, Connection, ConsumerOptions, Delivery};
use crossbeam_channel::select;

use crate::actors::messages::{DesktopBatch, DesktopEvent, Rejection, Verdict};
use crate::actors::worker::{track_blocked, LinkWork, StopSignal};
use crate::amqp::{self, AmqpError};
use crate::broker_url::BrokerUrl;
use crate::catalog::Catalog;
use crate::config::Config;
use crate::delivery::{decode, expired, message_id, recipients};
use crate::link::LinkLife;
use crate::metrics::{Link, Metrics};
use crate::tag_queue::{OutOfStep, TagQueue};

/// How often the inbound queue is checked for other consumers: a second instance started
/// after this one is noticed here too, not only by the newcomer.
const SHARED_CHECK: std::time::Duration = std::time::Duration::from_secs(5);

/// Most deliveries in one [`DesktopBatch`] (the prefetch bounds it too).
const MAX_BATCH: usize = 256;

/// The consumer's state; [`super::worker::Worker::spawn`] runs it.
pub struct AmqpConsumer {
    config: Arc<Config>,
    catalog: Arc<Catalog>,
    router: Recipient<DesktopBatch>,
    metrics: Arc<Metrics>,
    /// This bridge process's id: deliveries carrying it in `x-instance` are our own publishes.
    instance: String,
}

impl AmqpConsumer {
    /// A consumer that hands deliveries to `router`.
    pub fn new(
        config: Arc<Config>,
        catalog: Arc<Catalog>,
        router: Recipient<DesktopBatch>,
        metrics: Arc<Metrics>,
        instance: String,
    ) -> Self {
        AmqpConsumer {
            config,
            catalog,
            router,
            metrics,
            instance,
        }
    }
}

impl LinkWork for AmqpConsumer {
    const LINK: Link = Link::Consumer;

    fn serve(
        &mut self,
        connection: &mut Connection,
        url: &BrokerUrl,
        stop: &StopSignal,
        life: &mut LinkLife,
    ) -> Result<(), AmqpError> {
        let amqp = &self.config.amqp;
        let blocked = connection.listen_for_connection_blocked()?;
        let channel = connection.open_channel(None)?;
        amqp::declare_inbound(&channel, amqp, &self.catalog)?;
        channel.qos(0, amqp.prefetch, false)?;
        let queue = amqp.inbound_queue.as_str();
        self.check_shared(&channel, queue, 0, life)?;
        let consumer = channel.basic_consume(queue, ConsumerOptions::default())?;
        life.up(&format!("({url}, queue `{queue}`)"));
        let shared_check = crossbeam_channel::tick(SHARED_CHECK);

        let (reply, verdicts) = crossbeam_channel::unbounded();
        // Deliveries handed to the router, in order, awaiting its verdict (bodies dropped):
        // amiquip acks through the `Delivery` value.
        let mut awaiting = TagQueue::default();
        loop {
            select! {
                recv(consumer.receiver()) -> message => {
                    // Everything already received goes as one batch: the router then frames
                    // and queues a run of one desk's events once per browser, not per event.
                    let mut batch = Vec::new();
                    let first = amqp::delivered(message)?;
                    self.deliver(&channel, first, &mut awaiting, &mut batch)?;
                    while batch.len() < MAX_BATCH {
                        let Ok(message) = consumer.receiver().try_recv() else {
                            break;
                        };
                        let delivery = amqp::delivered(Ok(message))?;
                        self.deliver(&channel, delivery, &mut awaiting, &mut batch)?;
                    }
                    if !batch.is_empty() {
                        // do_send: the prefetch already bounds what is in flight to the router.
                        // If the router has stopped (shutdown), no verdict comes and the broker
                        // keeps the deliveries.
                        self.router.do_send(DesktopBatch {
                            events: batch,
                            reply: reply.clone(),
                        });
                    }
                }
                recv(verdicts) -> verdict => {
                    // `reply` lives in this frame, so the channel cannot be disconnected.
                    if let Ok(verdict) = verdict {
                        let verdicts = std::iter::once(verdict).chain(verdicts.try_iter());
                        let steps = plan(verdicts, &mut awaiting).map_err(|error| {
                            AmqpError::Lost(format!("ack bookkeeping out of step ({error}); the broker redelivers"))
                        })?;
                        self.settle(&channel, steps)?;
                    }
                }
                recv(blocked) -> notification => track_blocked(life.state(), notification)?,
                recv(shared_check) -> _ => self.check_shared(&channel, queue, 1, life)?,
                recv(stop) -> _ => return Ok(()),
            }
        }
    }
}

impl AmqpConsumer {
    /// Looks for other consumers on the inbound queue (`ours` of them are this bridge's).
    fn check_shared(
        &self,
        channel: &Channel,
        queue: &str,
        ours: u32,
        life: &LinkLife,
    ) -> Result<(), AmqpError> {
        let consumers = channel
            .queue_declare_passive(queue)?
            .declared_consumer_count()
            .unwrap_or(0);
        life.state()
            .set_other_consumers(queue, consumers.saturating_sub(ours));
        Ok(())
    }

    /// Checks one delivery and adds it to the `batch` for the router (keeping it in `awaiting`
    /// for the verdict), or settles it at once.
    fn deliver(
        &self,
        channel: &Channel,
        mut delivery: Delivery,
        awaiting: &mut TagQueue<Delivery>,
        batch: &mut Vec<DesktopEvent>,
    ) -> Result<(), amiquip::Error> {
        let origin = amqp::header_str(delivery.properties.headers().as_ref(), amqp::HEADER_INSTANCE);
        if origin == Some(self.instance.as_str()) {
            // Our own publish came back through overlapping bindings: never deliver it twice.
            self.metrics.own_echo();
            return delivery.ack(channel);
        }
        if expired(&delivery.properties, amqp::unix_now_ms()) {
            self.metrics.expired(&delivery.routing_key);
            return delivery.ack(channel);
        }
        match decode(&delivery, &self.catalog) {
            Ok((desk, event, data)) => {
                let id = message_id(&delivery.properties);
                let to = recipients(&delivery.properties, &id);
                batch.push(DesktopEvent {
                    delivery_tag: delivery.delivery_tag(),
                    desk,
                    event,
                    id,
                    data,
                    to,
                });
                delivery.body = Vec::new();
                awaiting.push(delivery.delivery_tag(), delivery);
                Ok(())
            }
            Err((reason, detail)) => {
                self.metrics.rejected(reason, &delivery.routing_key, &detail);
                delivery.reject(channel, false)
            }
        }
    }

    /// Carries out a plan of acks and rejects.
    fn settle(&self, channel: &Channel, steps: Vec<Step<Delivery>>) -> Result<(), amiquip::Error> {
        for step in steps {
            match step {
                Step::AckThrough(delivery) => delivery.ack_multiple(channel)?,
                Step::Reject(delivery, rejection) => {
                    self.metrics
                        .rejected(rejection.reason, &rejection.routing_key, &rejection.detail);
                    delivery.reject(channel, false)?;
                }
            }
        }
        Ok(())
    }
}

/// One broker call that settles deliveries.
#[derive(Debug, PartialEq)]
enum Step<T> {
    /// Ack this delivery and every earlier unsettled one (`multiple`).
    AckThrough(T),
    /// Reject this one delivery without requeue.
    Reject(T, Rejection),
}

/// Turns verdicts (which arrive in delivery order) into the fewest broker calls: a run of
/// accepted deliveries becomes one `multiple` ack, which never covers a delivery the router
/// has not answered. A verdict for any delivery but the oldest awaiting one is [`OutOfStep`].
fn plan<T>(
    verdicts: impl Iterator<Item = Verdict>,
    awaiting: &mut TagQueue<T>,
) -> Result<Vec<Step<T>>, OutOfStep> {
    let mut steps = Vec::new();
    let mut last_accepted = None;
    for verdict in verdicts {
        let delivery = awaiting.pop(verdict.delivery_tag)?;
        match verdict.outcome {
            Ok(()) => last_accepted = Some(delivery),
            Err(rejection) => {
                steps.extend(last_accepted.take().map(Step::AckThrough));
                steps.push(Step::Reject(delivery, rejection));
            }
        }
    }
    steps.extend(last_accepted.map(Step::AckThrough));
    Ok(steps)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::RejectReason;

    fn verdict(tag: u64, accepted: bool) -> Verdict {
        Verdict {
            delivery_tag: tag,
            outcome: if accepted { Ok(()) } else { Err(rejection()) },
        }
    }

    fn rejection() -> Rejection {
        Rejection {
            reason: RejectReason::TransformFailed,
            routing_key: "A_x".into(),
            detail: "no".into(),
        }
    }

    fn awaiting(tags: impl IntoIterator<Item = u64>) -> TagQueue<u64> {
        let mut queue = TagQueue::default();
        for tag in tags {
            queue.push(tag, tag);
        }
        queue
    }

    #[test]
    fn runs_of_accepted_deliveries_become_one_multiple_ack() {
        let mut queue = awaiting(1..=5);
        let verdicts = [(1, true), (2, true), (3, false), (4, true), (5, true)];
        let steps = plan(verdicts.map(|(tag, ok)| verdict(tag, ok)).into_iter(), &mut queue);
        assert_eq!(
            steps,
            Ok(vec![
                Step::AckThrough(2),
                Step::Reject(3, rejection()),
                Step::AckThrough(5)
            ])
        );
        assert!(queue.is_empty());
    }

    #[test]
    fn a_verdict_out_of_order_settles_nothing() {
        let mut queue = awaiting(1..=3);
        let verdicts = [verdict(1, true), verdict(3, true)];
        let steps = plan(verdicts.into_iter(), &mut queue);
        assert_eq!(
            steps,
            Err(OutOfStep {
                expected: Some(2),
                got: 3
            }),
            "an ack through 3 would cover delivery 2, which the router never answered"
        );
    }
}
