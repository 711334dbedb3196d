//! What both AMQP workers share: connecting through the URL list, declaring the topology,
//! the headers the bridge sets, and the errors of a link.

use std::time::Duration;

use amiquip::{
    AmqpValue, Auth, Channel, Connection, ConnectionOptions, ExchangeDeclareOptions, ExchangeType,
    FieldTable, QueueDeclareOptions,
};

use crate::broker_url::BrokerUrl;
use crate::catalog::{routing_key, Catalog};
use crate::config::{AmqpConfig, TlsConfig};
use crate::tls::{handshake_hint, Stage, TlsFileError};

/// Header naming the bridge process that published a message (loop prevention).
pub const HEADER_INSTANCE: &str = "x-instance";
/// Header naming the browser session that published a message.
pub const HEADER_SESSION: &str = "x-session";
/// Header naming the user (the token's `sub`) whose browser published a message.
pub const HEADER_USER: &str = "x-user";
/// Header of a desktop message meant for one browser session (its `welcome` session id).
pub const HEADER_TO_SESSION: &str = "x-to-session";
/// Header of a desktop message meant for one user's sessions (a token's `sub`).
pub const HEADER_TO_USER: &str = "x-to-user";
/// Header saying where a message came from.
pub const HEADER_ORIGIN: &str = "x-origin";
/// `x-origin` of a browser's publish or reply.
pub const ORIGIN_WEB: &str = "web";
/// `x-origin` of a browser's request (kept out of the desk streams).
pub const ORIGIN_REQUEST: &str = "request";
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
    /// An `amqp.tls` file that loaded at start-up no longer does (moved, replaced badly).
    #[error("{0}")]
    TlsFile(#[from] TlsFileError),
    /// The TLS handshake failed: the broker's certificate is not trusted or does not name the
    /// host, the broker refused the client certificate, or the port does not speak TLS.
    #[error("TLS handshake with {url} failed: {reason}{hint}")]
    Tls {
        /// The URL, without its password.
        url: String,
        /// What OpenSSL said.
        reason: String,
        /// What to check, as ` (...)`, or empty.
        hint: String,
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

/// An open connection, the URL it answered on, and a handle on its socket.
pub struct Connected<'u> {
    /// The AMQP connection.
    pub connection: Connection,
    /// Which URL answered.
    pub url: &'u BrokerUrl,
    /// The connection's TCP socket, to cut it when amiquip would wait forever (closing a
    /// connection the broker has blocked: it stops reading, so no close-ok ever comes).
    pub socket: std::net::TcpStream,
}

/// Opens a connection to the first URL in `urls` that answers; `amqps://` URLs use `tls`.
pub fn connect_any<'u>(
    urls: &'u [BrokerUrl],
    tls: &TlsConfig,
    name: &str,
) -> Result<Connected<'u>, AmqpError> {
    let mut last = None;
    // Built at the first amqps:// URL of this attempt, from the files as they are now.
    let mut connector = None;
    for url in urls {
        let opened = if url.tls {
            open_tls(url, tls, &mut connector)
        } else {
            open(url, None)
        };
        match opened {
            Ok((connection, socket)) => {
                return Ok(Connected {
                    connection,
                    url,
                    socket,
                })
            }
            Err(error) => {
                log::debug!("amqp {name}: {error}");
                last = Some(error);
            }
        }
    }
    Err(last.unwrap_or_else(|| AmqpError::Unreachable {
        url: "(no URL)".into(),
        reason: "amqp.urls is empty".into(),
    }))
}

/// Opens an `amqps://` URL, building `connector` from `tls` first if this is the attempt's
/// first TLS URL.
fn open_tls(
    url: &BrokerUrl,
    tls: &TlsConfig,
    connector: &mut Option<native_tls::TlsConnector>,
) -> Result<(Connection, std::net::TcpStream), AmqpError> {
    let built = match connector {
        Some(built) => built,
        None => connector.insert(tls.connector()?),
    };
    open(url, Some((built, tls)))
}

/// Opens an AMQP connection with `TCP_NODELAY` set: publishes, acks and confirms are small
/// frames that must leave at once, and amiquip's own connect leaves Nagle's algorithm on, which
/// holds a small frame back until the previous one is acknowledged (up to 40 ms on Linux).
/// With `tls`, the connection is wrapped in TLS, verifying the broker's certificate against
/// the URL's host.
fn open(
    broker: &BrokerUrl,
    tls: Option<(&native_tls::TlsConnector, &TlsConfig)>,
) -> Result<(Connection, std::net::TcpStream), AmqpError> {
    let unreachable = |reason: String| AmqpError::Unreachable {
        url: broker.to_string(),
        reason,
    };
    let addrs = broker
        .socket_addrs()
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
        let socket = stream
            .try_clone()
            .map_err(|e| unreachable(format!("{addr}: {e}")))?;
        let stream = stream
            .set_nodelay(true)
            .and_then(|()| stream.set_nonblocking(true))
            .and_then(|()| mio::net::TcpStream::from_stream(stream))
            .map_err(|e| unreachable(format!("{addr}: {e}")))?;
        let options = connection_options(broker);
        let opened = match tls {
            Some((connector, files)) => Connection::open_tls_stream(
                connector.clone(),
                &broker.host,
                stream,
                options,
                Default::default(),
            )
            .map_err(|source| tls_failure(broker, files, source)),
            None => Connection::insecure_open_stream(stream, options, Default::default())
                .map_err(|source| handshake_failure(broker, source)),
        };
        return opened.map(|connection| (connection, socket));
    }
    Err(last)
}

/// Virtual host, credentials, heartbeat and limits from the URL.
fn connection_options(broker: &BrokerUrl) -> ConnectionOptions<Auth> {
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
    options
}

fn handshake_failure(broker: &BrokerUrl, source: amiquip::Error) -> AmqpError {
    AmqpError::Connect {
        url: broker.to_string(),
        source: Box::new(source),
    }
}

/// A failed `amqps://` connect, as a TLS error when TLS is what failed: in the handshake, or
/// at the first AMQP bytes, where TLS 1.3 delivers the broker's verdict on the client's
/// certificate (see [`Stage::FirstBytes`]).
fn tls_failure(broker: &BrokerUrl, files: &TlsConfig, source: amiquip::Error) -> AmqpError {
    let (reason, stage) = match &source {
        amiquip::Error::TlsHandshake { source } => (source.to_string(), Stage::Handshake),
        amiquip::Error::IoErrorReadingSocket { .. }
        | amiquip::Error::IoErrorWritingSocket { .. }
        | amiquip::Error::UnexpectedSocketClose => (source.to_string(), Stage::FirstBytes),
        _ => return handshake_failure(broker, source),
    };
    let hint = handshake_hint(
        &reason,
        stage,
        broker.port,
        files.ca_file.is_some(),
        files.cert_file.is_some(),
    );
    AmqpError::Tls {
        url: broker.to_string(),
        reason,
        hint,
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
pub fn declare_inbound(channel: &Channel, config: &AmqpConfig, catalog: &Catalog) -> Result<(), AmqpError> {
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
    for desk in catalog.desks() {
        for event in catalog.events() {
            let key = routing_key(desk, event);
            topology(
                format!("binding `{queue}` → `{exchange}` with key `{key}`"),
                channel.queue_bind(queue, exchange, key, FieldTable::new()),
            )?;
        }
    }
    Ok(())
}

/// Declares both exchanges and nothing else (history mode: the desk streams take the place of
/// the inbound queue, which must not exist there to fill up unread).
pub fn declare_exchanges(channel: &Channel, config: &AmqpConfig) -> Result<(), AmqpError> {
    let exchange = &config.inbound_exchange;
    topology(
        format!("exchange `{exchange}`"),
        channel.exchange_declare(ExchangeType::Direct, exchange, durable()),
    )?;
    declare_outbound(channel, config)
}

/// How long an instance's reply queue outlives its last consumer: long enough for a reconnect
/// (replies wait in it), short enough that a crashed instance's queue goes away by itself.
pub const REPLY_QUEUE_EXPIRES_MS: i32 = 120_000;

/// The queue this instance's request replies come to (`reply_to` of its requests).
pub fn reply_queue_name(instance: &str) -> String {
    format!("deskbridge.reply.{instance}")
}

/// Declares this instance's reply queue (not durable, expiring once unused).
pub fn declare_reply_queue(channel: &Channel, name: &str) -> Result<(), AmqpError> {
    let mut arguments = FieldTable::new();
    arguments.insert("x-expires".into(), AmqpValue::LongInt(REPLY_QUEUE_EXPIRES_MS));
    topology(
        format!("reply queue `{name}`"),
        channel.queue_declare(
            name,
            QueueDeclareOptions {
                arguments,
                ..QueueDeclareOptions::default()
            },
        ),
    )?;
    Ok(())
}

/// The queue this instance reads other instances' presence messages from.
pub fn presence_queue_name(instance: &str) -> String {
    format!("deskbridge.presence.{instance}")
}

/// Declares the presence exchange (topic, durable) and this instance's queue on it: exclusive,
/// so that it goes with the connection (a heartbeat rebuilds what a reconnect missed).
pub fn declare_presence(channel: &Channel, config: &AmqpConfig, queue: &str) -> Result<(), AmqpError> {
    let exchange = &config.presence_exchange;
    topology(
        format!("exchange `{exchange}`"),
        channel.exchange_declare(ExchangeType::Topic, exchange, durable()),
    )?;
    let options = QueueDeclareOptions {
        exclusive: true,
        auto_delete: true,
        ..QueueDeclareOptions::default()
    };
    topology(
        format!("presence queue `{queue}`"),
        channel.queue_declare(queue, options),
    )?;
    for key in [crate::presence::SESSION_KEYS, crate::presence::INSTANCE_KEYS] {
        topology(
            format!("binding `{queue}` to `{exchange}` with `{key}`"),
            channel.queue_bind(queue, exchange, key, FieldTable::new()),
        )?;
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

/// The delivery in a consumer message, or why the link is gone. Every variant is named: only
/// `Delivery` is data.
pub fn delivered(
    message: Result<amiquip::ConsumerMessage, crossbeam_channel::RecvError>,
) -> Result<amiquip::Delivery, AmqpError> {
    let lost = |why: String| Err(AmqpError::Lost(why));
    match message {
        Ok(amiquip::ConsumerMessage::Delivery(delivery)) => Ok(delivery),
        Ok(amiquip::ConsumerMessage::ServerCancelled) => {
            lost("the broker cancelled the consumer (was its queue or stream deleted?)".into())
        }
        Ok(amiquip::ConsumerMessage::ServerClosedChannel(error)) => {
            lost(format!("the broker closed the channel: {error}"))
        }
        Ok(amiquip::ConsumerMessage::ServerClosedConnection(error)) => {
            lost(format!("the broker closed the connection: {error}"))
        }
        Ok(amiquip::ConsumerMessage::ClientCancelled)
        | Ok(amiquip::ConsumerMessage::ClientClosedChannel)
        | Ok(amiquip::ConsumerMessage::ClientClosedConnection) => {
            lost("the consumer was closed locally".into())
        }
        Err(_) => lost("the connection's I/O thread ended".into()),
    }
}

/// Seconds since the Unix epoch, for the AMQP `timestamp` property.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs()
}

/// Milliseconds since the Unix epoch.
pub fn unix_now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A string header's value, if present and a string.
pub fn header_str<'a>(headers: Option<&'a FieldTable>, name: &str) -> Option<&'a str> {
    match headers?.get(name)? {
        AmqpValue::LongString(value) => Some(value),
        _ => None,
    }
}
