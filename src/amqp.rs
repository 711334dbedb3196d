//! What both AMQP workers share: connecting through the URL list, declaring the topology,
//! the routing-key convention, and the errors of a link.

use std::time::Duration;

use amiquip::{
    AmqpValue, Channel, Connection, ExchangeDeclareOptions, ExchangeType, FieldTable, QueueDeclareOptions,
};

use crate::config::AmqpConfig;

/// Header naming the bridge process that published a message (loop prevention).
pub const HEADER_INSTANCE: &str = "x-instance";
/// Header naming the browser session that published a message.
pub const HEADER_SESSION: &str = "x-session";
/// Header saying where a message came from.
pub const HEADER_ORIGIN: &str = "x-origin";
/// `app_id` of every message the bridge publishes.
pub const APP_ID: &str = "deskbridge";

/// Why an AMQP link is not working; the worker reports it and reconnects.
#[derive(Debug, thiserror::Error)]
pub enum AmqpError {
    /// No URL in the list accepted a connection.
    #[error(
        "cannot connect to {url}: {source} (is RabbitMQ running? `rabbitmq-server -detached` starts it)"
    )]
    Connect {
        /// The last URL tried, without its password.
        url: String,
        /// What amiquip said.
        source: Box<amiquip::Error>,
    },
    /// Declaring an exchange, queue or binding failed.
    #[error("cannot declare {what}: {source} (an existing one with other settings? delete it or rename it in the config)")]
    Topology {
        /// The object that failed.
        what: String,
        /// What amiquip said.
        source: Box<amiquip::Error>,
    },
    /// A channel operation failed once connected.
    #[error("channel error: {0}")]
    Channel(Box<amiquip::Error>),
    /// The broker or the network ended the connection or cancelled the consumer.
    #[error("connection lost: {0}")]
    Lost(String),
}

impl From<amiquip::Error> for AmqpError {
    fn from(error: amiquip::Error) -> Self {
        AmqpError::Channel(Box::new(error))
    }
}

/// Opens a connection to the first URL in `urls` that answers.
pub fn connect_any(urls: &[String], name: &str) -> Result<(Connection, String), AmqpError> {
    let mut last = None;
    for url in urls {
        match Connection::insecure_open(&with_link_defaults(url)) {
            Ok(connection) => return Ok((connection, redact(url))),
            Err(source) => {
                log::debug!("amqp {name}: {} refused: {source}", redact(url));
                last = Some(AmqpError::Connect {
                    url: redact(url),
                    source: Box::new(source),
                });
            }
        }
    }
    // `urls` is validated non-empty at start-up, so `last` is set.
    Err(last.expect("config validation guarantees at least one AMQP URL"))
}

/// Adds link-safety defaults the URL does not set itself: a 10 s heartbeat, so a broker that
/// vanishes without closing TCP is noticed within ~20 s instead of 60 s, and a 5 s connection
/// timeout, so an unreachable (blackholed) host does not stall a reconnect for the OS's ~2 min.
fn with_link_defaults(url: &str) -> String {
    let mut url = url.to_owned();
    for (key, value) in [("heartbeat", "10"), ("connection_timeout", "5000")] {
        if !url.contains(&format!("{key}=")) {
            let separator = if url.contains('?') { '&' } else { '?' };
            url = format!("{url}{separator}{key}={value}");
        }
    }
    url
}

/// The URL without its password, for logs and health.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or_default();
            format!("{}{user}:***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_owned(),
    }
}

/// Name of the dead-letter exchange of the inbound queue.
pub fn dead_letter_exchange(config: &AmqpConfig) -> String {
    format!("{}.dlx", config.inbound_queue)
}

/// Name of the queue that keeps rejected deliveries.
pub fn dead_letter_queue(config: &AmqpConfig) -> String {
    format!("{}.dead", config.inbound_queue)
}

fn durable() -> ExchangeDeclareOptions {
    ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    }
}

fn topology<T>(what: impl Into<String>, result: amiquip::Result<T>) -> Result<T, AmqpError> {
    result.map_err(|source| AmqpError::Topology {
        what: what.into(),
        source: Box::new(source),
    })
}

/// Declares the desktop → web side: the inbound exchange, its queue with a dead-letter
/// exchange and queue, and a binding for every desk × event.
pub fn declare_inbound(
    channel: &Channel,
    config: &AmqpConfig,
    desks: &[String],
    events: &[String],
) -> Result<(), AmqpError> {
    let exchange = &config.inbound_exchange;
    topology(
        format!("exchange `{exchange}`"),
        channel.exchange_declare(ExchangeType::Direct, exchange, durable()),
    )?;
    let dlx = dead_letter_exchange(config);
    let dlq = dead_letter_queue(config);
    topology(
        format!("exchange `{dlx}`"),
        channel.exchange_declare(ExchangeType::Fanout, &dlx, durable()),
    )?;
    let durable_queue = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    topology(
        format!("queue `{dlq}`"),
        channel.queue_declare(&dlq, durable_queue.clone()),
    )?;
    topology(
        format!("binding `{dlq}` → `{dlx}`"),
        channel.queue_bind(&dlq, &dlx, "", FieldTable::new()),
    )?;
    let mut arguments = FieldTable::new();
    arguments.insert("x-dead-letter-exchange".into(), AmqpValue::LongString(dlx));
    let queue = &config.inbound_queue;
    topology(
        format!("queue `{queue}`"),
        channel.queue_declare(
            queue,
            QueueDeclareOptions {
                arguments,
                ..durable_queue
            },
        ),
    )?;
    for desk in desks {
        for event in events {
            let key = routing_key(desk, event);
            topology(
                format!("binding `{queue}` → `{exchange}` with key `{key}`"),
                channel.queue_bind(queue, exchange, key, FieldTable::new()),
            )?;
        }
    }
    Ok(())
}

/// Declares the web → desktop exchange.
pub fn declare_outbound(channel: &Channel, config: &AmqpConfig) -> Result<(), AmqpError> {
    let exchange = &config.outbound_exchange;
    topology(
        format!("exchange `{exchange}`"),
        channel.exchange_declare(ExchangeType::Direct, exchange, durable()),
    )?;
    Ok(())
}

/// `{desk}_{event}`.
pub fn routing_key(desk: &str, event: &str) -> String {
    format!("{desk}_{event}")
}

/// Splits a routing key at its first `_` into (desk, event); `None` without a `_`.
pub fn split_routing_key(key: &str) -> Option<(&str, &str)> {
    key.split_once('_')
}

/// Seconds since the Unix epoch, for the AMQP `timestamp` property.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs()
}

/// A string header's value, if present and a string.
pub fn header_str<'a>(headers: Option<&'a FieldTable>, name: &str) -> Option<&'a str> {
    match headers?.get(name)? {
        AmqpValue::LongString(value) => Some(value),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing_keys_split_at_the_first_underscore() {
        let cases = [
            ("A_new_example", Some(("A", "new_example"))),
            ("B_update_example", Some(("B", "update_example"))),
            ("A_", Some(("A", ""))),
            ("_x", Some(("", "x"))),
            ("Anew", None),
            ("", None),
        ];
        for (key, expected) in cases {
            assert_eq!(split_routing_key(key), expected, "{key}");
        }
        assert_eq!(routing_key("A", "new_example"), "A_new_example");
    }

    #[test]
    fn passwords_never_reach_logs() {
        let cases = [
            (
                "amqp://guest:secret@host:5672/%2f",
                "amqp://guest:***@host:5672/%2f",
            ),
            ("amqp://host:5672", "amqp://host:5672"),
            ("amqp://u@host", "amqp://u:***@host"),
        ];
        for (url, expected) in cases {
            assert_eq!(redact(url), expected);
        }
        let cases = [
            (
                "amqp://h/%2f",
                "amqp://h/%2f?heartbeat=10&connection_timeout=5000",
            ),
            (
                "amqp://h/%2f?heartbeat=3",
                "amqp://h/%2f?heartbeat=3&connection_timeout=5000",
            ),
            (
                "amqp://h?connection_timeout=1",
                "amqp://h?connection_timeout=1&heartbeat=10",
            ),
        ];
        for (url, expected) in cases {
            assert_eq!(with_link_defaults(url), expected);
        }
    }
}
