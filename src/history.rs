//! Desk streams on RabbitMQ (`[history]`): naming, declaring, binding, and the epoch that names
//! one stream's life.
//!
//! Nothing in AMQP 0-9-1 tells one life of a stream from the next (a deleted and re-made stream
//! starts again at offset 0 with the same name), so the bridge writes its own marker messages
//! into each stream (docs/streams-findings.md §5 measured the alternatives):
//! - `genesis`: written by whoever creates the stream, before it is bound, so that it is at
//!   offset 0 (a losing candidate of a concurrent creation lands later and is ignored);
//! - `refresh`: the same epoch again, written by live readers every `max_bytes / 8` or
//!   `max_age / 4`, so that one survives at the head of the log after retention truncated the
//!   genesis;
//! - `sync`: a unique mark a reader writes and then reads up to, to know where the log ends.
//!
//! The epoch is the value of the first valid marker in the retained log (a genesis at offset
//! 0, or any refresh). Every instance reading the same log finds the same one. Markers are
//! published through the default exchange, so readers tell them apart from events by header
//! and never deliver them.

use std::time::{Duration, Instant};

use amiquip::{
    AmqpProperties, AmqpValue, Channel, Confirm, Connection, Consumer, ConsumerMessage, ConsumerOptions,
    Delivery, ExchangeDeclareOptions, ExchangeType, FieldTable, Publish, QueueDeclareOptions,
};
use crossbeam_channel::Receiver;

use crate::amqp::{self, AmqpError};
use crate::catalog::{routing_key, Catalog};
use crate::config::{AmqpConfig, HistoryConfig};

/// Header of a marker message; its value is `genesis`, `refresh` or `sync`.
pub const HEADER_MARKER: &str = "x-deskbridge-marker";
/// Header with a marker's epoch (or a sync marker's unique id).
pub const HEADER_EPOCH: &str = "x-deskbridge-epoch";
/// Header the broker puts on every stream delivery: its offset.
pub const HEADER_OFFSET: &str = "x-stream-offset";

/// Stream deliveries a reader may hold unacknowledged (streams need a prefetch; the broker
/// counts it per chunk, so a little more may arrive).
pub const STREAM_PREFETCH: u16 = 1000;

/// How long a reader waits for the next delivery while reading up to a known point before it
/// gives the link up.
const READ_TIMEOUT: Duration = Duration::from_secs(15);

/// RabbitMQ 3.10.8 crashes the channel (541, closing the connection) when a stream is used
/// within ~20 ms of its creation by another client (streams-findings §0); waiting this long
/// after creating one avoided it in 40 of 40 tries.
const NEW_STREAM_SETTLE: Duration = Duration::from_millis(100);

/// The stream of `desk`.
pub fn stream_name(config: &HistoryConfig, desk: &str) -> String {
    format!("{}.{desk}", config.stream_prefix)
}

/// The headers exchange between the outbound exchange and a desk's stream: it lets browser
/// events (`x-origin: web`) into the history and keeps requests out, so that a request with
/// no desktop app bound is still returned as unroutable.
pub fn web_exchange_name(config: &HistoryConfig, desk: &str) -> String {
    format!("{}.web", stream_name(config, desk))
}

/// A marker message the bridge writes into streams.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Marker {
    /// The first epoch of a new stream.
    Genesis(String),
    /// The current epoch, repeated.
    Refresh(String),
    /// A reader's unique mark of "the log's end when I looked".
    Sync(String),
}

impl Marker {
    fn parts(&self) -> (&'static str, &str) {
        match self {
            Marker::Genesis(value) => ("genesis", value),
            Marker::Refresh(value) => ("refresh", value),
            Marker::Sync(value) => ("sync", value),
        }
    }

    /// The marker a delivery's headers carry, if it is one.
    pub fn from_headers(headers: Option<&FieldTable>) -> Option<Marker> {
        let kind = amqp::header_str(headers, HEADER_MARKER)?;
        let value = amqp::header_str(headers, HEADER_EPOCH)
            .unwrap_or_default()
            .to_owned();
        match kind {
            "genesis" => Some(Marker::Genesis(value)),
            "refresh" => Some(Marker::Refresh(value)),
            _ => Some(Marker::Sync(value)),
        }
    }

    /// The epoch this marker establishes when found first in the log at `offset`.
    fn epoch_at(&self, offset: u64) -> Option<&str> {
        match self {
            Marker::Genesis(epoch) if offset == 0 => Some(epoch),
            Marker::Refresh(epoch) => Some(epoch),
            _ => None,
        }
    }
}

/// A delivery's stream offset.
pub fn offset(headers: Option<&FieldTable>) -> Option<u64> {
    match headers?.get(HEADER_OFFSET)? {
        AmqpValue::LongLongInt(offset) => u64::try_from(*offset).ok(),
        AmqpValue::LongUInt(offset) => Some(u64::from(*offset)),
        AmqpValue::LongInt(offset) => u64::try_from(*offset).ok(),
        _ => None,
    }
}

/// Where a stream consumer starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// The first retained message.
    First,
    /// What is written after the consumer attaches.
    Next,
    /// This offset (or the first retained one, if it was truncated).
    At(u64),
}

/// Consumer arguments for a stream consumer starting at `start`.
pub fn consume_from(start: Start) -> ConsumerOptions {
    let mut arguments = FieldTable::new();
    let value = match start {
        Start::First => AmqpValue::LongString("first".into()),
        Start::Next => AmqpValue::LongString("next".into()),
        // Offsets stay far below i64::MAX.
        Start::At(offset) => AmqpValue::LongLongInt(offset.min(i64::MAX as u64) as i64),
    };
    arguments.insert("x-stream-offset".into(), value);
    ConsumerOptions {
        arguments,
        ..ConsumerOptions::default()
    }
}

/// Cancels a stream consumer and waits until the broker confirmed it. amiquip treats a
/// delivery for a consumer already dropped as a broken connection, and a stream keeps sending
/// until the cancel is processed, so a consumer must not be dropped before this returns.
pub fn cancel(consumer: &Consumer<'_>) -> Result<(), AmqpError> {
    // Unacked deliveries are covered by the channel's next `multiple` ack.
    cancel_keeping(consumer, |_| {})
}

/// [`cancel`], handing `keep` every delivery that arrives before the broker's confirmation
/// (a replay keeps what was already sent instead of reading it again).
pub fn cancel_keeping(consumer: &Consumer<'_>, keep: impl FnMut(Delivery)) -> Result<(), AmqpError> {
    consumer.cancel()?;
    await_cancelled(consumer, keep)
}

/// [`cancel`] for several consumers: every cancel is sent before the first wait, so that the
/// waits overlap (a stop with many desks is bounded by one timeout, not one per desk).
pub fn cancel_all(consumers: &[&Consumer<'_>]) -> Result<(), AmqpError> {
    for consumer in consumers {
        consumer.cancel()?;
    }
    for consumer in consumers {
        await_cancelled(consumer, |_| {})?;
    }
    Ok(())
}

/// Waits for the broker's confirmation of a cancel already sent, handing `keep` what arrives
/// before it.
fn await_cancelled(consumer: &Consumer<'_>, mut keep: impl FnMut(Delivery)) -> Result<(), AmqpError> {
    loop {
        match consumer.receiver().recv_timeout(READ_TIMEOUT) {
            Ok(ConsumerMessage::Delivery(delivery)) => keep(delivery),
            Ok(ConsumerMessage::ClientCancelled | ConsumerMessage::ServerCancelled) => return Ok(()),
            Ok(other) => {
                return Err(AmqpError::Lost(format!(
                    "cancelling a stream consumer: {other:?}"
                )))
            }
            Err(_) => {
                return Err(AmqpError::Lost(format!(
                    "the broker did not confirm a consumer cancel in {READ_TIMEOUT:?}"
                )))
            }
        }
    }
}

/// A desk's stream, declared, bound and with its epoch known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenedStream {
    /// Queue name.
    pub name: String,
    /// The life of the stream.
    pub epoch: String,
    /// The first retained offset when it was opened.
    pub first_offset: Option<u64>,
}

/// A channel in confirm mode for writing markers.
pub struct MarkerWriter<'c> {
    channel: &'c Channel,
    confirms: Receiver<Confirm>,
}

impl<'c> MarkerWriter<'c> {
    /// Puts `channel` in confirm mode for markers.
    pub fn new(channel: &'c Channel) -> Result<Self, AmqpError> {
        let confirms = channel.listen_for_publisher_confirms()?;
        channel.enable_publisher_confirms()?;
        Ok(MarkerWriter { channel, confirms })
    }

    /// Writes `marker` into `stream` and waits for the broker to have it.
    pub fn write(&self, stream: &str, marker: &Marker) -> Result<(), AmqpError> {
        let (kind, value) = marker.parts();
        let mut headers = FieldTable::new();
        headers.insert(HEADER_MARKER.into(), AmqpValue::LongString(kind.into()));
        headers.insert(HEADER_EPOCH.into(), AmqpValue::LongString(value.into()));
        let properties = AmqpProperties::default()
            .with_app_id(amqp::APP_ID.into())
            .with_headers(headers);
        self.channel
            .basic_publish("", Publish::with_properties(b"", stream, properties))?;
        match self.confirms.recv_timeout(READ_TIMEOUT) {
            Ok(Confirm::Ack(_)) => Ok(()),
            Ok(Confirm::Nack(_)) => Err(AmqpError::Lost(format!(
                "the broker refused a history marker for `{stream}`"
            ))),
            Err(_) => Err(AmqpError::Lost(format!(
                "no confirm for a history marker on `{stream}` in {READ_TIMEOUT:?}"
            ))),
        }
    }
}

/// Declares the exchanges, and for each desk its stream, bound to both exchanges with every
/// `{desk}_{event}` key; finds each stream's epoch. Uses channels of its own, closed after.
pub fn open_streams(
    connection: &mut Connection,
    amqp_config: &AmqpConfig,
    history: &HistoryConfig,
    catalog: &Catalog,
) -> Result<Vec<OpenedStream>, AmqpError> {
    let channel = connection.open_channel(None)?;
    amqp::declare_exchanges(&channel, amqp_config)?;
    channel.qos(0, STREAM_PREFETCH, false)?;
    let writer = MarkerWriter::new(&channel)?;
    let mut opened = Vec::with_capacity(catalog.desks().len());
    for desk in catalog.desks() {
        let name = stream_name(history, desk);
        let created = declare_stream(connection, &channel, &name, history)?;
        if created {
            std::thread::sleep(NEW_STREAM_SETTLE);
            // Before any binding: only markers can come first, so offset 0 is a genesis.
            writer.write(&name, &Marker::Genesis(uuid::Uuid::new_v4().to_string()))?;
        }
        bind_stream(
            &channel,
            amqp_config,
            &web_exchange_name(history, desk),
            &name,
            desk,
            catalog,
        )?;
        let (epoch, first_offset) = resolve_epoch(&channel, &writer, &name)?;
        opened.push(OpenedStream {
            name,
            epoch,
            first_offset,
        });
    }
    // Closing is tidiness only: the connection goes on either way.
    let _ = channel.close();
    Ok(opened)
}

/// Binds a desk's stream: to the inbound exchange with every `{desk}_{event}` key, and to the
/// outbound one through the desk's `web` headers exchange, for browser events only.
fn bind_stream(
    channel: &Channel,
    amqp_config: &AmqpConfig,
    web: &str,
    stream: &str,
    desk: &str,
    catalog: &Catalog,
) -> Result<(), AmqpError> {
    let topology = |what: String| {
        move |source| AmqpError::Topology {
            what,
            source: Box::new(source),
        }
    };
    let (inbound, outbound) = (&amqp_config.inbound_exchange, &amqp_config.outbound_exchange);
    let options = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    channel
        .exchange_declare(ExchangeType::Headers, web, options)
        .map_err(topology(format!("exchange `{web}`")))?;
    for event in catalog.events() {
        let key = routing_key(desk, event);
        channel
            .queue_bind(stream, inbound.as_str(), key.as_str(), FieldTable::new())
            .map_err(topology(format!("binding `{stream}` → `{inbound}`")))?;
        channel
            .exchange_bind(web, outbound.as_str(), key, FieldTable::new())
            .map_err(topology(format!("binding `{web}` → `{outbound}`")))?;
    }
    let mut web_only = FieldTable::new();
    // `all` ignores `x-` headers; `all-with-x` (RabbitMQ 3.10+) compares them too.
    web_only.insert("x-match".into(), AmqpValue::LongString("all-with-x".into()));
    web_only.insert(
        amqp::HEADER_ORIGIN.into(),
        AmqpValue::LongString(amqp::ORIGIN_WEB.into()),
    );
    channel
        .queue_bind(stream, web, "", web_only)
        .map_err(topology(format!("binding `{stream}` → `{web}`")))?;
    Ok(())
}

/// Declares `name` as a stream with the configured retention; true when it did not exist.
/// An existing stream with other retention settings is used as it is (with a warning): its
/// retention can only change by a policy or by deleting it.
fn declare_stream(
    connection: &mut Connection,
    channel: &Channel,
    name: &str,
    history: &HistoryConfig,
) -> Result<bool, AmqpError> {
    // A passive declare of a missing queue closes its channel (404): probe on a spare one.
    let probe = connection.open_channel(None)?;
    let existed = match probe.queue_declare_passive(name) {
        Ok(_) => true,
        Err(amiquip::Error::ServerClosedChannel { code: 404, .. }) => false,
        Err(error) => return Err(error.into()),
    };
    if existed {
        let _ = probe.close();
        return Ok(false);
    }
    let mut arguments = FieldTable::new();
    arguments.insert("x-queue-type".into(), AmqpValue::LongString("stream".into()));
    arguments.insert("x-max-age".into(), AmqpValue::LongString(history.max_age.clone()));
    // Validated to fit: config sizes are far below i64::MAX.
    let max_bytes = history.max_bytes.min(i64::MAX as u64) as i64;
    arguments.insert("x-max-length-bytes".into(), AmqpValue::LongLongInt(max_bytes));
    // Retention drops whole segments: smaller ones make it follow max_bytes more closely.
    let segment = (max_bytes / 8).clamp(1024 * 1024, 500 * 1024 * 1024);
    arguments.insert(
        "x-stream-max-segment-size-bytes".into(),
        AmqpValue::LongLongInt(segment),
    );
    if let Some(size) = history.initial_cluster_size {
        arguments.insert(
            "x-initial-cluster-size".into(),
            AmqpValue::LongLongInt(size.into()),
        );
    }
    let options = QueueDeclareOptions {
        durable: true,
        arguments,
        ..QueueDeclareOptions::default()
    };
    match channel.queue_declare(name, options) {
        Ok(_) => Ok(true),
        Err(source) => Err(AmqpError::Topology {
            what: format!("stream `{name}`"),
            source: Box::new(source),
        }),
    }
}

/// Finds the epoch of `stream`: writes a sync marker, reads from the first retained message up
/// to the first valid marker (or the sync marker: then there is none, and a refresh with a new
/// epoch is written and the search repeats; the first one in the log wins for every reader).
/// Returns the epoch and the first retained offset.
fn resolve_epoch(
    channel: &Channel,
    writer: &MarkerWriter<'_>,
    stream: &str,
) -> Result<(String, Option<u64>), AmqpError> {
    for _ in 0..3 {
        let sync = uuid::Uuid::new_v4().to_string();
        writer.write(stream, &Marker::Sync(sync.clone()))?;
        let consumer = channel.basic_consume(stream, consume_from(Start::First))?;
        let mut first_offset = None;
        let found = loop {
            let delivery = match consumer.receiver().recv_timeout(READ_TIMEOUT) {
                Ok(ConsumerMessage::Delivery(delivery)) => delivery,
                Ok(other) => return Err(AmqpError::Lost(format!("reading `{stream}`: {other:?}"))),
                Err(_) => {
                    return Err(AmqpError::Lost(format!(
                        "reading `{stream}` for its epoch: nothing for {READ_TIMEOUT:?}"
                    )))
                }
            };
            let headers = delivery.properties.headers().as_ref();
            let at = offset(headers).unwrap_or_default();
            first_offset.get_or_insert(at);
            let marker = Marker::from_headers(headers);
            consumer.ack(delivery)?;
            match marker {
                Some(Marker::Sync(mark)) if mark == sync => break None,
                Some(marker) => {
                    if let Some(epoch) = marker.epoch_at(at) {
                        break Some(epoch.to_owned());
                    }
                }
                None => {}
            }
        };
        cancel(&consumer)?;
        match found {
            Some(epoch) => return Ok((epoch, first_offset)),
            None => writer.write(stream, &Marker::Refresh(uuid::Uuid::new_v4().to_string()))?,
        }
    }
    Err(AmqpError::Lost(format!(
        "`{stream}`: no epoch marker found after writing one three times"
    )))
}

/// When a live reader writes the next `refresh` marker: after `max_bytes / 8` of events or
/// `max_age / 4` with events, whichever comes first, since the last marker it saw.
#[derive(Debug)]
pub struct RefreshDue {
    bytes: u64,
    since: Instant,
    max_bytes: u64,
    max_age: Duration,
}

impl RefreshDue {
    /// Counting from now.
    pub fn new(history: &HistoryConfig) -> Self {
        RefreshDue {
            bytes: 0,
            since: Instant::now(),
            max_bytes: (history.max_bytes / 8).max(1),
            max_age: parse_age(&history.max_age) / 4,
        }
    }

    /// An event of `bytes` went by; true when a refresh marker is due.
    pub fn event(&mut self, bytes: usize) -> bool {
        self.bytes += bytes as u64;
        self.bytes >= self.max_bytes || self.since.elapsed() >= self.max_age
    }

    /// A marker went by (anyone's): start counting again.
    pub fn marked(&mut self) {
        self.bytes = 0;
        self.since = Instant::now();
    }
}

/// A RabbitMQ age (`"1h"`, `"7D"`; validated by config) as a duration; months are 30 days.
pub fn parse_age(age: &str) -> Duration {
    let Some(unit) = age.chars().last() else {
        return Duration::from_secs(3600);
    };
    let amount: u64 = age[..age.len() - unit.len_utf8()].parse().unwrap_or(1);
    let seconds = match unit {
        'Y' => 365 * 86_400,
        'M' => 30 * 86_400,
        'D' => 86_400,
        'h' => 3600,
        'm' => 60,
        _ => 1,
    };
    Duration::from_secs(amount.saturating_mul(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_genesis_at_offset_zero_or_a_refresh_names_the_epoch() {
        let cases = [
            (Marker::Genesis("g".into()), 0, Some("g")),
            (Marker::Genesis("late".into()), 3, None),
            (Marker::Refresh("r".into()), 900, Some("r")),
            (Marker::Sync("s".into()), 0, None),
        ];
        for (marker, at, epoch) in cases {
            assert_eq!(marker.epoch_at(at), epoch, "{marker:?} at {at}");
        }
    }

    #[test]
    fn ages_read_as_rabbitmq_does() {
        assert_eq!(parse_age("1h"), Duration::from_secs(3600));
        assert_eq!(parse_age("7D"), Duration::from_secs(7 * 86_400));
        assert_eq!(parse_age("90s"), Duration::from_secs(90));
    }

    #[test]
    fn markers_round_trip_through_headers() {
        for marker in [
            Marker::Genesis("a".into()),
            Marker::Refresh("b".into()),
            Marker::Sync("c".into()),
        ] {
            let (kind, value) = marker.parts();
            let mut headers = FieldTable::new();
            headers.insert(HEADER_MARKER.into(), AmqpValue::LongString(kind.into()));
            headers.insert(HEADER_EPOCH.into(), AmqpValue::LongString(value.into()));
            assert_eq!(Marker::from_headers(Some(&headers)), Some(marker));
        }
        assert_eq!(Marker::from_headers(None), None);
    }
}
