//! The broker: connections, the topology a desktop app declares, and clean-up afterwards.

use amiquip::{
    Channel, Connection, Consumer, ConsumerOptions, ExchangeDeclareOptions, ExchangeType, FieldTable, Queue,
    QueueDeclareOptions, QueueDeleteOptions,
};
use deskbridge::config::Config;

/// The broker the tests use.
pub fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// A broker URL from text the test wrote.
pub fn url(text: &str) -> deskbridge::broker_url::BrokerUrl {
    text.parse()
        .unwrap_or_else(|error| panic!("test URL is valid: {error}"))
}

/// Opens an AMQP connection to `url`, or fails saying how to start that broker.
pub fn connect(url: &str, how_to_start: &str) -> Connection {
    Connection::insecure_open(url)
        .unwrap_or_else(|error| panic!("cannot reach RabbitMQ at {url}: {error}\n{how_to_start}"))
}

/// What a test says when the tests' broker is not there: plain `cargo test` on a machine
/// without RabbitMQ running is the usual reason.
pub const NO_BROKER: &str = "These tests need a real RabbitMQ broker at AMQP_URL \
     (default amqp://guest:guest@127.0.0.1:5672/%2f). Run them with `scripts/test`: it installs \
     what is missing and brings a private RabbitMQ node for the run. Or start one yourself \
     (`rabbitmq-server -detached`), or set AMQP_URL to one that runs.";

/// Opens an AMQP connection to the tests' broker, or fails the test saying how to get one.
pub fn broker() -> Connection {
    connect(&amqp_url(), NO_BROKER)
}

/// Fails the test at once, saying how to get a broker, when nothing listens at the tests'
/// broker address: the bridge would only report its links down until the test's deadline.
pub fn require_broker() {
    let url = amqp_url();
    let address = url::Url::parse(&url).ok().and_then(|parsed| {
        let host = parsed.host_str()?.trim_matches(['[', ']']).to_string();
        Some((host, parsed.port().unwrap_or(5672)))
    });
    let Some((host, port)) = address else {
        panic!("AMQP_URL `{url}` is not a URL like amqp://guest:guest@127.0.0.1:5672/%2f");
    };
    let reachable = std::net::ToSocketAddrs::to_socket_addrs(&(host.as_str(), port))
        .map(|mut addrs| {
            addrs.any(|addr| {
                std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(2)).is_ok()
            })
        })
        .unwrap_or(false);
    assert!(reachable, "nothing listens at {host}:{port}. {NO_BROKER}");
}

/// A durable direct exchange, as deskbridge declares its own.
pub fn declare_direct_exchange(channel: &Channel, name: &str) {
    declare_exchange(channel, ExchangeType::Direct, name);
}

/// A durable exchange of `kind` (the presence exchange is a topic one).
pub fn declare_exchange(channel: &Channel, kind: ExchangeType, name: &str) {
    let options = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel
        .exchange_declare(kind, name, options)
        .expect("declare exchange");
}

/// Declares `exchange` (see `declare_direct_exchange`) and the queue `name` (`""`: the broker
/// names it) with `options`, and binds the queue to the exchange with each key.
pub fn declare_bound_queue<'a>(
    channel: &'a Channel,
    exchange: &str,
    name: &str,
    options: QueueDeclareOptions,
    keys: &[&str],
) -> Queue<'a> {
    declare_bound_queue_of(channel, ExchangeType::Direct, exchange, name, options, keys)
}

/// `declare_bound_queue` on an exchange of `kind`.
pub fn declare_bound_queue_of<'a>(
    channel: &'a Channel,
    kind: ExchangeType,
    exchange: &str,
    name: &str,
    options: QueueDeclareOptions,
    keys: &[&str],
) -> Queue<'a> {
    declare_exchange(channel, kind, exchange);
    let queue = channel.queue_declare(name, options).expect("declare queue");
    for key in keys {
        channel
            .queue_bind(queue.name(), exchange, *key, FieldTable::new())
            .expect("bind queue");
    }
    queue
}

/// A desktop app's private queue on `exchange`: broker-named, exclusive, deleted with its
/// connection, bound with each key.
pub fn private_queue<'a>(channel: &'a Channel, exchange: &str, keys: &[&str]) -> Queue<'a> {
    private_queue_of(channel, ExchangeType::Direct, exchange, keys)
}

/// `private_queue` on an exchange of `kind`.
pub fn private_queue_of<'a>(
    channel: &'a Channel,
    kind: ExchangeType,
    exchange: &str,
    keys: &[&str],
) -> Queue<'a> {
    let options = QueueDeclareOptions {
        exclusive: true,
        auto_delete: true,
        ..Default::default()
    };
    declare_bound_queue_of(channel, kind, exchange, "", options, keys)
}

/// A consumer that takes every message off `queue` without acknowledgements.
pub fn consume_unacked<'a>(queue: &Queue<'a>) -> Consumer<'a> {
    queue
        .consume(ConsumerOptions {
            no_ack: true,
            ..Default::default()
        })
        .expect("consume")
}

/// Deletes `queues`, then `exchanges`, on the tests' broker; whatever is missing (or a broker
/// that is away) is ignored, so this also serves in `Drop`.
pub fn delete_quietly(queues: &[&str], exchanges: &[&str]) {
    delete_quietly_at(&amqp_url(), queues, exchanges);
}

/// [`delete_quietly`] on the broker at `url` (the bench's own node, a private one).
pub fn delete_quietly_at(url: &str, queues: &[&str], exchanges: &[&str]) {
    let Ok(mut connection) = Connection::insecure_open(url) else {
        return;
    };
    // A failed delete closes its channel: one channel each.
    for queue in queues {
        if let Ok(channel) = connection.open_channel(None) {
            let _ = channel.queue_delete(*queue, QueueDeleteOptions::default());
        }
    }
    for exchange in exchanges {
        if let Ok(channel) = connection.open_channel(None) {
            let _ = channel.exchange_delete(*exchange, false);
        }
    }
    let _ = connection.close();
}

/// Deletes everything a test bridge declared, leaving the broker clean.
pub fn delete_topology(config: &Config) {
    let amqp = &config.amqp;
    let dead_letters = format!("{}.dead", amqp.inbound_queue);
    let dead_letter_exchange = format!("{}.dlx", amqp.inbound_queue);
    delete_quietly(
        &[&amqp.inbound_queue, &dead_letters],
        &[
            &amqp.inbound_exchange,
            &amqp.outbound_exchange,
            &amqp.presence_exchange,
            &dead_letter_exchange,
        ],
    );
}

/// Deletes the desk streams of `config` (`[history]`), their `.web` exchanges and the
/// bridge's exchanges, on the broker `config` names; every instance using them must be stopped
/// first.
pub fn delete_history(config: &Config) {
    let streams: Vec<String> = config
        .desks
        .iter()
        .map(|desk| format!("{}.{desk}", config.history.stream_prefix))
        .collect();
    let webs: Vec<String> = streams.iter().map(|stream| format!("{stream}.web")).collect();
    let streams: Vec<&str> = streams.iter().map(String::as_str).collect();
    let mut exchanges: Vec<&str> = webs.iter().map(String::as_str).collect();
    exchanges.extend([
        config.amqp.inbound_exchange.as_str(),
        config.amqp.outbound_exchange.as_str(),
        config.amqp.presence_exchange.as_str(),
    ]);
    let url = config
        .amqp
        .urls
        .first()
        .map_or_else(amqp_url, |url| url.reveal().to_string());
    delete_quietly_at(&url, &streams, &exchanges);
}

/// Deletes a test's desk streams and exchanges when dropped: declared first, it goes last, after
/// the bridges stopped, on success and on failure alike.
pub struct HistoryCleanup(pub Config);

/// Deletes what a bridge process launched on `test_config` declared (queue, dead letters,
/// exchanges) when dropped: declared before the process, it goes after it, also on failure.
pub struct TopologyCleanup(pub Config);

impl Drop for TopologyCleanup {
    fn drop(&mut self) {
        delete_topology(&self.0);
    }
}

impl Drop for HistoryCleanup {
    fn drop(&mut self) {
        delete_history(&self.0);
    }
}

/// Messages ready in `queue` (unacked ones count once their consumer's connection closed).
pub fn queue_depth(queue: &str) -> u32 {
    let mut connection = broker();
    let channel = connection.open_channel(None).expect("channel");
    let depth = channel
        .queue_declare_passive(queue)
        .map(|q| q.declared_message_count().unwrap_or(0))
        .unwrap_or_else(|error| panic!("queue {queue} exists: {error}"));
    let _ = connection.close();
    depth
}
