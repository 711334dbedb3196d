//! `StreamReader`: desktop and web events from the desk streams (`[history]` on). One AMQP
//! connection on its own thread ([`super::worker`]), in place of the queue consumer.
//!
//! It declares each desk's stream and finds its epoch ([`crate::history`]), then reads every
//! stream live, one consumer per desk, each on its own channel so that `multiple` acks (which
//! for a stream only grant credit) stay exact. Deliveries already buffered are handed to the
//! router together ([`FromStream::Batch`]); at most [`MAX_IN_FLIGHT`] batches wait for the
//! router, which bounds what a slow router can make the bridge hold. After a reconnect it
//! reads on from the offset after the last one it handed over, so live delivery has no gap.
//!
//! On the same connection it serves the router's [`ReplayRequest`]s, one at a time: a
//! consumer from the asked offset, up to the asked end, on a channel of its own.
//!
//! Markers are never delivered; messages that are not a configured desk's event or not a
//! JSON object are skipped and counted (a stream cannot dead-letter), and never stop a desk.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use actix::Recipient;
use amiquip::{Channel, Connection, Consumer, Delivery};
use crossbeam_channel::{Receiver, RecvError, Select};

use crate::actors::messages::{
    DeskOpened, FromStream, ReplayRequest, Replayed, ReplayedEvents, StreamEvent, StreamItem,
};
use crate::actors::worker::{track_blocked, LinkWork, StopSignal};
use crate::amqp::{self, AmqpError};
use crate::broker_url::BrokerUrl;
use crate::catalog::Catalog;
use crate::config::Config;
use crate::delivery::{decode, expired, message_id, recipients};
use crate::history::{self, consume_from, Marker, MarkerWriter, RefreshDue, Start, STREAM_PREFETCH};
use crate::link::LinkLife;
use crate::metrics::{Link, Metrics, RejectReason};

/// Batches handed to the router and not yet handled, before the reader stops taking more.
pub const MAX_IN_FLIGHT: usize = 4;

/// Items in one batch at most.
const MAX_BATCH: usize = 1024;

/// A replay that gets nothing for this long has lost its stream (deleted?) and is given up.
const REPLAY_IDLE: Duration = Duration::from_secs(10);

/// Replay deliveries between two acks (credit for the next ones).
const REPLAY_ACK_EVERY: usize = 256;

/// The reader's state; [`super::worker::Worker::spawn`] runs it.
pub struct StreamReader {
    config: Arc<Config>,
    catalog: Arc<Catalog>,
    router: Recipient<FromStream>,
    metrics: Arc<Metrics>,
    replays: Receiver<ReplayRequest>,
    /// Per desk (catalog order): the last offset handed to the router, and its stream life;
    /// where to read on after a reconnect.
    positions: Vec<Option<Position>>,
    /// The replay being read, to answer it if the link drops meanwhile.
    replaying: Option<ReplayRequest>,
}

/// How far a desk's stream was handed to the router.
#[derive(Debug, Clone)]
struct Position {
    epoch: Arc<str>,
    last: u64,
}

/// One desk's live stream on this connection.
struct LiveDesk {
    desk: String,
    stream: String,
    epoch: Arc<str>,
    first_offset: Option<u64>,
    /// Where its consumer attached: the offset after the last one handed over before a
    /// reconnect (same life), else what comes next.
    start: Start,
    continued: bool,
    /// The sync marker this reader wrote after attaching; seeing it means "live from here".
    sync: Option<String>,
    refresh: RefreshDue,
}

/// A replay being read.
struct ActiveReplay<'c> {
    request: ReplayRequest,
    consumer: Consumer<'c>,
    read: ReplayedEvents,
    kept: VecDeque<StreamEvent>,
    unacked: usize,
    last: Option<Delivery>,
}

impl StreamReader {
    /// A reader that hands events to `router` and serves its `replays`.
    pub fn new(
        config: Arc<Config>,
        catalog: Arc<Catalog>,
        router: Recipient<FromStream>,
        metrics: Arc<Metrics>,
        replays: Receiver<ReplayRequest>,
    ) -> Self {
        StreamReader {
            positions: vec![None; catalog.desks().len()],
            config,
            catalog,
            router,
            metrics,
            replays,
            replaying: None,
        }
    }
}

impl LinkWork for StreamReader {
    const LINK: Link = Link::Consumer;

    fn serve(
        &mut self,
        connection: &mut Connection,
        url: &BrokerUrl,
        stop: &StopSignal,
        life: &mut LinkLife,
    ) -> Result<(), AmqpError> {
        let served = self.read(connection, url, stop, life);
        if let Some(request) = self.replaying.take() {
            let result = Err("the link to RabbitMQ was lost during the replay".to_string());
            self.router
                .do_send(FromStream::Replayed(Replayed { request, result }));
        }
        served
    }
}

impl StreamReader {
    fn read(
        &mut self,
        connection: &mut Connection,
        url: &BrokerUrl,
        stop: &StopSignal,
        life: &mut LinkLife,
    ) -> Result<(), AmqpError> {
        let blocked = connection.listen_for_connection_blocked()?;
        let opened =
            history::open_streams(connection, &self.config.amqp, &self.config.history, &self.catalog)?;
        let markers = connection.open_channel(None)?;
        let writer = MarkerWriter::new(&markers)?;
        let mut channels = Vec::with_capacity(opened.len());
        let mut desks = Vec::with_capacity(opened.len());
        for ((desk, stream), position) in self.catalog.desks().iter().zip(opened).zip(&self.positions) {
            let channel = connection.open_channel(None)?;
            channel.qos(0, STREAM_PREFETCH, false)?;
            channels.push(channel);
            let epoch: Arc<str> = stream.epoch.into();
            let start = match position {
                Some(position) if position.epoch == epoch => Start::At(position.last + 1),
                _ => Start::Next,
            };
            desks.push(LiveDesk {
                desk: desk.clone(),
                stream: stream.name,
                epoch,
                first_offset: stream.first_offset,
                start,
                continued: start != Start::Next,
                sync: None,
                refresh: RefreshDue::new(&self.config.history),
            });
        }
        let mut consumers = Vec::with_capacity(desks.len());
        for (channel, live) in channels.iter().zip(&mut desks) {
            consumers.push(channel.basic_consume(live.stream.as_str(), consume_from(live.start))?);
            let sync = uuid::Uuid::new_v4().to_string();
            writer.write(&live.stream, &Marker::Sync(sync.clone()))?;
            live.sync = Some(sync);
        }
        life.up(&format!("({url}, {} desk streams)", desks.len()));

        let (done, handled) = crossbeam_channel::unbounded::<()>();
        let mut in_flight: VecDeque<Vec<(usize, Delivery)>> = VecDeque::new();
        let replays = self.replays.clone();
        // Each replay reads on a channel of its own, closed when it ends. On a channel that read
        // the same stream before, RabbitMQ 3.10 can deliver to a new stream consumer before its
        // consume-ok (a cancelled consumer's pending offset notification is handled first), and
        // amiquip drops the whole connection on a delivery for a consumer tag it does not know.
        loop {
            let replay_channel = connection.open_channel(None)?;
            replay_channel.qos(0, STREAM_PREFETCH, false)?;
            let mut replay: Option<ActiveReplay<'_>> = None;
            loop {
                let wake = {
                    let mut select = Select::new();
                    let reading = in_flight.len() < MAX_IN_FLIGHT;
                    let live_ops: Vec<usize> = if reading {
                        consumers
                            .iter()
                            .map(|consumer| select.recv(consumer.receiver()))
                            .collect()
                    } else {
                        Vec::new()
                    };
                    let handled_op = select.recv(&handled);
                    let blocked_op = select.recv(&blocked);
                    let stop_op = select.recv(stop);
                    let request_op = replay.is_none().then(|| select.recv(&replays));
                    let replay_op = replay
                        .as_ref()
                        .map(|active| select.recv(active.consumer.receiver()));
                    let selected = match &replay {
                        Some(_) => select.select_timeout(REPLAY_IDLE).ok(),
                        None => Some(select.select()),
                    };
                    match selected {
                        None => Wake::ReplayIdle,
                        Some(op) => {
                            let index = op.index();
                            if let Some(desk) = live_ops.iter().position(|&live| live == index) {
                                Wake::Live(desk, op.recv(consumers[desk].receiver()))
                            } else if index == handled_op {
                                // `done` lives in this frame: the channel cannot be disconnected.
                                let _ = op.recv(&handled);
                                Wake::Handled
                            } else if index == blocked_op {
                                Wake::Blocked(op.recv(&blocked))
                            } else if index == stop_op {
                                let _ = op.recv(stop);
                                Wake::Stop
                            } else if Some(index) == request_op {
                                // The router lives as long as the bridge: a closed channel
                                // means shutdown.
                                match op.recv(&replays) {
                                    Ok(request) => Wake::Request(request),
                                    Err(_) => Wake::Stop,
                                }
                            } else {
                                let receiver = replay.as_ref().map(|active| active.consumer.receiver());
                                match (replay_op, receiver) {
                                    (Some(_), Some(receiver)) => Wake::Replay(op.recv(receiver)),
                                    _ => continue,
                                }
                            }
                        }
                    }
                };
                match wake {
                    Wake::Stop => {
                        // Cancelled, not dropped: a stream sends until its cancel is confirmed,
                        // and amiquip logs an internal error for every delivery to a dropped
                        // consumer. A replay cut here is answered by `serve`.
                        let active = replay.take();
                        let mut all: Vec<&Consumer<'_>> = consumers.iter().collect();
                        all.extend(active.as_ref().map(|active| &active.consumer));
                        let _ = history::cancel_all(&all);
                        return Ok(());
                    }
                    Wake::ReplayIdle => {
                        if let Some(active) = replay.take() {
                            self.fail_replay(active, "the stream sent nothing for 10 s (was it deleted?)");
                        }
                        break;
                    }
                    Wake::Live(desk, message) => {
                        let first = amqp::delivered(message)?;
                        let mut batch = Batch::default();
                        self.take_live(desk, first, &mut desks, &writer, &mut batch)?;
                        'drain: while batch.items.len() < MAX_BATCH {
                            let mut any = false;
                            for (desk, consumer) in consumers.iter().enumerate() {
                                if let Ok(message) = consumer.receiver().try_recv() {
                                    let delivery = amqp::delivered(Ok(message))?;
                                    self.take_live(desk, delivery, &mut desks, &writer, &mut batch)?;
                                    any = true;
                                    if batch.items.len() >= MAX_BATCH {
                                        break 'drain;
                                    }
                                }
                            }
                            if !any {
                                break;
                            }
                        }
                        // Only now, with the batch handed over: a failure while it was being
                        // built drops it, and the next connection reads it again.
                        for (index, position) in batch.positions {
                            self.positions[index] = Some(position);
                        }
                        if batch.items.is_empty() {
                            ack_all(&channels, batch.acks)?;
                        } else {
                            self.router.do_send(FromStream::Batch(batch.items, done.clone()));
                            in_flight.push_back(batch.acks);
                        }
                    }
                    Wake::Handled => {
                        if let Some(acks) = in_flight.pop_front() {
                            ack_all(&channels, acks)?;
                        }
                    }
                    Wake::Blocked(notification) => track_blocked(life.state(), notification)?,
                    Wake::Request(request) => {
                        let stream = history::stream_name(&self.config.history, &request.desk);
                        // Noted before the consume: if that fails (a failover closes the
                        // connection with 506 or 541, or amiquip meets a delivery for a tag it
                        // does not know yet), `serve` still answers the request, or its session
                        // would wait for it forever.
                        self.replaying = Some(request.clone());
                        let consumer = replay_channel.basic_consume(stream, consume_from(request.from))?;
                        replay = Some(ActiveReplay {
                            request,
                            consumer,
                            read: ReplayedEvents::default(),
                            kept: VecDeque::new(),
                            unacked: 0,
                            last: None,
                        });
                    }
                    Wake::Replay(message) => {
                        let Some(mut active) = replay.take() else {
                            continue;
                        };
                        let delivery = amqp::delivered(message)?;
                        if self.take_replayed(&mut active, delivery, &replay_channel)? {
                            self.finish_replay(active, &replay_channel)?;
                            break;
                        } else {
                            replay = Some(active);
                        }
                    }
                }
            }
            // Empty at every `break`; its consumer borrows the channel.
            drop(replay);
            replay_channel.close()?;
        }
    }

    /// One live delivery of desk `index`: an event into the batch, a marker noted, anything
    /// else skipped; the delivery is acked with the batch.
    fn take_live(
        &mut self,
        index: usize,
        mut delivery: Delivery,
        desks: &mut [LiveDesk],
        writer: &MarkerWriter<'_>,
        batch: &mut Batch,
    ) -> Result<(), AmqpError> {
        let live = &mut desks[index];
        let headers = delivery.properties.headers().as_ref();
        let Some(offset) = history::offset(headers) else {
            let detail = "the delivery has no x-stream-offset header (is this a stream?)";
            self.metrics
                .history_skipped(RejectReason::BadBody, &live.stream, 0, detail);
            batch.ack(index, delivery);
            return Ok(());
        };
        match Marker::from_headers(headers) {
            Some(Marker::Sync(mark)) if live.sync.as_deref() == Some(mark.as_str()) => {
                live.sync = None;
                batch.items.push(StreamItem::Opened(DeskOpened {
                    desk: live.desk.clone(),
                    epoch: Arc::clone(&live.epoch),
                    base: offset,
                    first_offset: live.first_offset,
                    continued: live.continued,
                }));
                batch.reached(index, Arc::clone(&live.epoch), offset);
            }
            Some(Marker::Genesis(_) | Marker::Refresh(_)) => live.refresh.marked(),
            Some(Marker::Sync(_)) => {}
            None => {
                let bytes = delivery.body.len();
                if let Some(event) = self.stream_event(&delivery, offset, &live.stream) {
                    batch.items.push(StreamItem::Event(event));
                }
                if live.sync.is_none() {
                    batch.reached(index, Arc::clone(&live.epoch), offset);
                    if live.refresh.event(bytes) {
                        writer.write(&live.stream, &Marker::Refresh(live.epoch.to_string()))?;
                        live.refresh.marked();
                    }
                }
            }
        }
        delivery.body = Vec::new();
        batch.ack(index, delivery);
        Ok(())
    }

    /// A stream delivery as an event, or `None` when it is skipped (counted and logged).
    fn stream_event(&self, delivery: &Delivery, offset: u64, stream: &str) -> Option<StreamEvent> {
        if expired(&delivery.properties, amqp::unix_now_ms()) {
            self.metrics.expired(&delivery.routing_key);
            return None;
        }
        let (desk, event, data) = match decode(delivery, &self.catalog) {
            Ok(decoded) => decoded,
            Err((reason, detail)) => {
                self.metrics.history_skipped(reason, stream, offset, &detail);
                return None;
            }
        };
        let headers = delivery.properties.headers().as_ref();
        let from_session = (delivery.exchange == self.config.amqp.outbound_exchange)
            .then(|| amqp::header_str(headers, amqp::HEADER_SESSION))
            .flatten()
            .map(|session| uuid::Uuid::parse_str(session).unwrap_or_else(|_| uuid::Uuid::nil()));
        let id = message_id(&delivery.properties);
        Some(StreamEvent {
            desk,
            event,
            offset,
            to: recipients(&delivery.properties, &id),
            id,
            data,
            from_session,
        })
    }

    /// One replay delivery; true when the replay is complete.
    fn take_replayed(
        &mut self,
        active: &mut ActiveReplay<'_>,
        mut delivery: Delivery,
        channel: &Channel,
    ) -> Result<bool, AmqpError> {
        let headers = delivery.properties.headers().as_ref();
        let offset = history::offset(headers).unwrap_or_default();
        let request = &active.request;
        active.read.first_seen.get_or_insert(offset);
        if offset > request.until {
            active.read.complete = true;
            active.last = Some(delivery);
            return Ok(true);
        }
        active.read.reached = Some(offset);
        if Marker::from_headers(headers).is_none() {
            let stream = history::stream_name(&self.config.history, &request.desk);
            // Targeted messages were for someone at the time, not for a later reader.
            if let Some(event) = self
                .stream_event(&delivery, offset, &stream)
                .filter(|event| event.to.is_none())
            {
                active.kept.push_back(event);
                if let Some(keep) = request.keep_last {
                    while active.kept.len() > keep {
                        active.kept.pop_front();
                    }
                }
            }
        }
        delivery.body = Vec::new();
        active.unacked += 1;
        if active.unacked >= REPLAY_ACK_EVERY {
            delivery.ack_multiple(channel)?;
            active.unacked = 0;
            active.last = None;
        } else {
            active.last = Some(delivery);
        }
        let full = request.keep_last.is_none() && active.kept.len() >= request.max_events;
        if offset >= request.until {
            active.read.complete = true;
        }
        Ok(active.read.complete || full)
    }

    /// Ends a replay and sends the router what it read.
    fn finish_replay(&mut self, mut active: ActiveReplay<'_>, channel: &Channel) -> Result<(), AmqpError> {
        // The broker has sent up to a prefetch (1 000) past this step: keep it for this answer,
        // even past `replay_batch`, rather than read it again in the next step (measured: +43 %
        // replay rate, -37 % broker CPU).
        let mut sent = Vec::new();
        history::cancel_keeping(&active.consumer, |delivery| sent.push(delivery))?;
        for delivery in sent {
            if active.read.complete {
                active.last = Some(delivery);
            } else {
                self.take_replayed(&mut active, delivery, channel)?;
            }
        }
        if let Some(last) = active.last.take() {
            last.ack_multiple(channel)?;
        }
        self.replaying = None;
        let mut read = active.read;
        read.events = active.kept.into();
        self.router.do_send(FromStream::Replayed(Replayed {
            request: active.request,
            result: Ok(read),
        }));
        Ok(())
    }

    fn fail_replay(&mut self, active: ActiveReplay<'_>, why: &str) {
        // A failed cancel means the link is going anyway (and the reader reconnects).
        let _ = history::cancel(&active.consumer);
        self.replaying = None;
        self.router.do_send(FromStream::Replayed(Replayed {
            request: active.request,
            result: Err(why.to_string()),
        }));
    }
}

/// What woke the reader.
enum Wake {
    Stop,
    Live(usize, Result<amiquip::ConsumerMessage, RecvError>),
    Handled,
    Blocked(Result<amiquip::ConnectionBlockedNotification, RecvError>),
    Request(ReplayRequest),
    Replay(Result<amiquip::ConsumerMessage, RecvError>),
    ReplayIdle,
}

/// Live items for the router, and the delivery to ack per desk channel once it has them.
#[derive(Default)]
struct Batch {
    items: Vec<StreamItem>,
    acks: Vec<(usize, Delivery)>,
    /// Per desk, how far its stream is read once the batch is handed over.
    positions: Vec<(usize, Position)>,
}

impl Batch {
    /// Desk `index` is read up to `last` (of stream life `epoch`) with this batch.
    fn reached(&mut self, index: usize, epoch: Arc<str>, last: u64) {
        let position = Position { epoch, last };
        match self.positions.iter_mut().find(|(desk, _)| *desk == index) {
            Some(slot) => slot.1 = position,
            None => self.positions.push((index, position)),
        }
    }

    /// `delivery` is the newest of its desk's channel in this batch.
    fn ack(&mut self, index: usize, delivery: Delivery) {
        match self.acks.iter_mut().find(|(desk, _)| *desk == index) {
            Some(slot) => slot.1 = delivery,
            None => self.acks.push((index, delivery)),
        }
    }
}

/// Acks, per desk channel, everything up to the newest delivery of a batch.
fn ack_all(channels: &[Channel], acks: Vec<(usize, Delivery)>) -> Result<(), AmqpError> {
    for (index, delivery) in acks {
        delivery.ack_multiple(&channels[index])?;
    }
    Ok(())
}
