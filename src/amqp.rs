//! What both AMQP workers share: connecting through the URL list, declaring the topology,
//! the routing-key convention, and the errors of a link.

use std::time::Duration;

use std::net::ToSocketAddrs;

use amiquip::{
    AmqpValue, Auth, Channel, Connection, ConnectionOptions, ExchangeDeclareOptions, ExchangeType,
    FieldTable, QueueDeclareOptions,
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
    /// No broker listens at the URL, or the URL is unusable.
    #[error("cannot reach {url}: {reason} (is RabbitMQ running? `rabbitmq-server -detached` starts it)")]
    Unreachable {
        /// The URL, without its password.
        url: String,
        /// What failed.
        reason: String,
    },
    /// The TCP connection opened but the AMQP handshake failed (credentials, vhost, limits).
    #[error("AMQP handshake with {url} failed: {source}")]
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
        match open(url) {
            Ok(connection) => return Ok((connection, redact(url))),
            Err(error) => {
                log::debug!("amqp {name}: {error}");
                last = Some(error);
            }
        }
    }
    // `urls` is validated non-empty at start-up, so `last` is set.
    Err(last.expect("config validation guarantees at least one AMQP URL"))
}

/// How long a TCP connect may take when the URL does not say (`connection_timeout`): an
/// unreachable (blackholed) host must not stall a reconnect for the OS's ~2 minutes.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Heartbeat when the URL does not say: a broker that vanishes without closing TCP is noticed
/// within ~20 s instead of amiquip's 60 s.
const HEARTBEAT_SECS: u16 = 10;

/// An `amqp://` URL taken apart.
#[derive(Debug, Clone, PartialEq)]
pub struct BrokerUrl {
    host: String,
    port: u16,
    vhost: Option<String>,
    credentials: Option<(String, String)>,
    heartbeat: u16,
    connection_timeout: Duration,
    channel_max: Option<u16>,
}

impl BrokerUrl {
    /// Parses `amqp://user:pass@host:port/vhost?heartbeat=N&connection_timeout=MS&channel_max=N`
    /// the way amiquip does (percent-decoded vhost and credentials, port 5672 by default).
    pub fn parse(text: &str) -> Result<BrokerUrl, String> {
        let url = url::Url::parse(text).map_err(|e| format!("is not a URL: {e}"))?;
        if url.scheme() != "amqp" {
            return Err("must start with amqp:// (TLS is not built in)".into());
        }
        let host = url.host_str().filter(|h| !h.is_empty()).ok_or("has no host")?;
        let decode = |s: &str| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8_lossy()
                .into_owned()
        };
        let mut segments: Vec<&str> = url.path_segments().map(|s| s.collect()).unwrap_or_default();
        segments.retain(|s| !s.is_empty());
        if segments.len() > 1 {
            return Err("has more than one path segment (the vhost); encode `/` as %2f".into());
        }
        let credentials = (!url.username().is_empty() || url.password().is_some()).then(|| {
            let user = if url.username().is_empty() {
                "guest"
            } else {
                url.username()
            };
            (decode(user), decode(url.password().unwrap_or("guest")))
        });
        let mut parsed = BrokerUrl {
            host: host.trim_matches(['[', ']']).to_owned(),
            port: url.port().unwrap_or(5672),
            vhost: segments.first().map(|v| decode(v)),
            credentials,
            heartbeat: HEARTBEAT_SECS,
            connection_timeout: CONNECT_TIMEOUT,
            channel_max: None,
        };
        for (key, value) in url.query_pairs() {
            let number = || {
                value
                    .parse::<u64>()
                    .map_err(|_| format!("has a non-numeric {key} `{value}`"))
            };
            let small = |n: u64| u16::try_from(n).map_err(|_| format!("has {key} above 65535"));
            match key.as_ref() {
                "heartbeat" => parsed.heartbeat = small(number()?)?,
                "channel_max" => parsed.channel_max = Some(small(number()?)?),
                "connection_timeout" => parsed.connection_timeout = Duration::from_millis(number()?),
                other => return Err(format!("has an unsupported parameter `{other}`")),
            }
        }
        Ok(parsed)
    }
}

/// Opens an AMQP connection with `TCP_NODELAY` set: publishes, acks and confirms are small
/// frames that must leave at once, and amiquip's own connect leaves Nagle's algorithm on
/// (measured: a steady ~40 ms p999 on paced fan-out).
fn open(url: &str) -> Result<Connection, AmqpError> {
    let unreachable = |reason: String| AmqpError::Unreachable {
        url: redact(url),
        reason,
    };
    let broker = BrokerUrl::parse(url).map_err(unreachable)?;
    let addrs = (broker.host.as_str(), broker.port)
        .to_socket_addrs()
        .map_err(|e| unreachable(format!("cannot resolve {}: {e}", broker.host)))?;
    let mut last = unreachable(format!("{} resolves to no address", broker.host));
    for addr in addrs {
        let stream = match std::net::TcpStream::connect_timeout(&addr, broker.connection_timeout) {
            Ok(stream) => stream,
            Err(e) => {
                last = unreachable(format!("{addr}: {e}"));
                continue;
            }
        };
        let stream = stream
            .set_nodelay(true)
            .and_then(|()| stream.set_nonblocking(true))
            .and_then(|()| mio::net::TcpStream::from_stream(stream))
            .map_err(|e| unreachable(format!("{addr}: {e}")))?;
        let mut options = ConnectionOptions::<Auth>::default()
            .heartbeat(broker.heartbeat)
            .connection_timeout(Some(broker.connection_timeout));
        if let Some(vhost) = &broker.vhost {
            options = options.virtual_host(vhost.as_str());
        }
        if let Some((username, password)) = &broker.credentials {
            options = options.auth(Auth::Plain {
                username: username.clone(),
                password: password.clone(),
            });
        }
        if let Some(channel_max) = broker.channel_max {
            options = options.channel_max(channel_max);
        }
        return Connection::insecure_open_stream(stream, options, Default::default()).map_err(|source| {
            AmqpError::Connect {
                url: redact(url),
                source: Box::new(source),
            }
        });
    }
    Err(last)
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
    }

    #[test]
    fn broker_urls_parse_like_amiquip() {
        let url =
            BrokerUrl::parse("amqp://us%40er:p%3Ass@rabbit:5673/%2f?heartbeat=3&connection_timeout=250")
                .expect("valid");
        assert_eq!((url.host.as_str(), url.port), ("rabbit", 5673));
        assert_eq!(url.vhost.as_deref(), Some("/"));
        assert_eq!(url.credentials, Some(("us@er".into(), "p:ss".into())));
        assert_eq!(
            (url.heartbeat, url.connection_timeout),
            (3, Duration::from_millis(250))
        );
        let defaults = BrokerUrl::parse("amqp://127.0.0.1").expect("valid");
        assert_eq!(
            (defaults.port, defaults.vhost, defaults.credentials),
            (5672, None, None)
        );
        assert_eq!(
            (defaults.heartbeat, defaults.connection_timeout),
            (HEARTBEAT_SECS, CONNECT_TIMEOUT)
        );
        for bad in [
            "http://h",
            "amqp://",
            "amqp://h/a/b",
            "amqp://h?heartbeat=x",
            "amqp://h?frame_max=1",
        ] {
            assert!(BrokerUrl::parse(bad).is_err(), "{bad}");
        }
    }
}
