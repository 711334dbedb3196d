//! Shared test harness: a real bridge on port 0 with unique AMQP names, real browsers
//! (tokio-tungstenite) and a real desktop app (amiquip) against the RabbitMQ on `AMQP_URL`
//! (default `amqp://guest:guest@127.0.0.1:5672/%2f`).
#![allow(dead_code)]

use std::net::SocketAddr;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use amiquip::{
    AmqpProperties, Connection, ConsumerMessage, ConsumerOptions, Delivery, ExchangeDeclareOptions,
    ExchangeType, FieldTable, Publish, QueueDeclareOptions, QueueDeleteOptions,
};
use deskbridge::config::Config;
use deskbridge::Transforms;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long any single condition may take before a test fails.
pub const DEADLINE: Duration = Duration::from_secs(15);

/// The broker the tests use.
pub fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// A broker URL from text the test wrote.
pub fn url(text: &str) -> deskbridge::broker_url::BrokerUrl {
    text.parse()
        .unwrap_or_else(|error| panic!("test URL is valid: {error}"))
}

/// Opens an AMQP connection, or fails the test saying how to start RabbitMQ.
pub fn broker() -> Connection {
    let url = amqp_url();
    Connection::insecure_open(&url).unwrap_or_else(|error| {
        panic!(
            "cannot reach RabbitMQ at {url}: {error}\n\
             These tests need a real broker. Start one with `rabbitmq-server -detached` \
             (or set AMQP_URL to one that runs)."
        )
    })
}

/// A name no other test (or run) uses.
pub fn unique(prefix: &str) -> String {
    format!(
        "dbt.{prefix}.{}",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    )
}

/// A config for one test: port 0, unique exchanges and queue, short timeouts.
pub fn test_config(test: &str) -> Config {
    let mut config = Config {
        bind: "127.0.0.1:0".into(),
        workers: 1,
        shutdown_timeout_ms: 3_000,
        ..Config::default()
    };
    config.amqp.urls = vec![url(&amqp_url())];
    config.amqp.inbound_exchange = unique(&format!("{test}.in"));
    config.amqp.inbound_queue = unique(&format!("{test}.q"));
    config.amqp.outbound_exchange = unique(&format!("{test}.out"));
    config.amqp.reconnect_initial_ms = 50;
    config.amqp.reconnect_max_ms = 500;
    config
}

/// A bridge running on its own thread and actix system, as in production.
pub struct TestBridge {
    pub addr: SocketAddr,
    pub config: Config,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl TestBridge {
    /// Starts a bridge with the config's own transform rules.
    pub fn start(config: Config) -> TestBridge {
        let transforms = Transforms::from_rules(&config.transforms);
        TestBridge::start_with(config, transforms)
    }

    /// Starts a bridge with explicit transforms.
    pub fn start_with(config: Config, transforms: Transforms) -> TestBridge {
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread_config = config.clone();
        let thread = std::thread::spawn(move || {
            actix_web::rt::System::new().block_on(async move {
                let bridge = deskbridge::start(thread_config, transforms)
                    .await
                    .expect("bridge starts");
                addr_tx.send(bridge.local_addr()).expect("test is waiting");
                let _ = stop_rx.await;
                bridge.shutdown().await;
            });
        });
        let addr = addr_rx
            .recv_timeout(DEADLINE)
            .expect("bridge reports its address");
        TestBridge {
            addr,
            config,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// Starts a bridge and waits until both AMQP links are up.
    pub async fn start_healthy(config: Config) -> TestBridge {
        let bridge = TestBridge::start(config);
        bridge.wait_health(200).await;
        bridge
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    /// Waits until `/health` answers `status`; returns its body.
    pub async fn wait_health(&self, status: u16) -> Value {
        let started = Instant::now();
        loop {
            let (code, body) = http_get(self.addr, "/health").await;
            if code == status {
                return serde_json::from_str(&body).expect("health is JSON");
            }
            assert!(
                started.elapsed() < DEADLINE,
                "/health stayed {code} (wanted {status}): {body}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until `/metrics` has `line` (e.g. `deskbridge_own_echo_total 1`).
    pub async fn wait_metric(&self, line: &str) {
        let started = Instant::now();
        loop {
            let (_, body) = http_get(self.addr, "/metrics").await;
            if body.lines().any(|l| l == line) {
                return;
            }
            assert!(
                started.elapsed() < DEADLINE,
                "metric `{line}` never appeared:\n{body}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until the counter `name` (exact series, labels included) reaches `at_least`.
    pub async fn wait_metric_at_least(&self, name: &str, at_least: u64) {
        let started = Instant::now();
        loop {
            let (_, body) = http_get(self.addr, "/metrics").await;
            let value = body
                .lines()
                .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse::<f64>().ok())
                .unwrap_or(0.0);
            if value >= at_least as f64 {
                return;
            }
            assert!(
                started.elapsed() < DEADLINE,
                "{name} stayed at {value} (wanted ≥ {at_least})"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stops the bridge gracefully and waits for its thread.
    pub fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for TestBridge {
    fn drop(&mut self) {
        self.stop();
        delete_topology(&self.config);
    }
}

/// Deletes everything a test bridge declared, leaving the broker clean.
pub fn delete_topology(config: &Config) {
    let Ok(mut connection) = Connection::insecure_open(&amqp_url()) else {
        return;
    };
    let amqp = &config.amqp;
    for queue in [amqp.inbound_queue.clone(), format!("{}.dead", amqp.inbound_queue)] {
        if let Ok(channel) = connection.open_channel(None) {
            let _ = channel.queue_delete(queue, QueueDeleteOptions::default());
        }
    }
    for exchange in [
        amqp.inbound_exchange.clone(),
        amqp.outbound_exchange.clone(),
        format!("{}.dlx", amqp.inbound_queue),
    ] {
        if let Ok(channel) = connection.open_channel(None) {
            let _ = channel.exchange_delete(exchange, false);
        }
    }
    let _ = connection.close();
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

/// A minimal HTTP/1.0 GET: (status, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    http_request(addr, &format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")).await
}

/// Sends `request` as is and reads the answer until the server closes: (status, body).
pub async fn http_request(addr: SocketAddr, request: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.expect("connect to bridge");
    stream.write_all(request.as_bytes()).await.expect("send request");
    let mut response = String::new();
    stream.read_to_string(&mut response).await.expect("read response");
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {head}"));
    (status, body.to_string())
}

/// A desktop app: publishes with amiquip.
pub struct Desktop {
    connection: Connection,
}

impl Desktop {
    pub fn connect() -> Desktop {
        Desktop { connection: broker() }
    }

    /// Publishes `body` to `exchange` with `key` and the given properties, and waits for the
    /// broker's confirm so the test knows it is in the queue.
    pub fn publish_with(&mut self, exchange: &str, key: &str, body: &[u8], properties: AmqpProperties) {
        let channel = self.connection.open_channel(None).expect("channel");
        let confirms = channel.listen_for_publisher_confirms().expect("confirms");
        channel.enable_publisher_confirms().expect("confirm mode");
        channel
            .basic_publish(exchange, Publish::with_properties(body, key, properties))
            .expect("publish");
        confirms
            .recv_timeout(DEADLINE)
            .expect("broker confirms the desktop publish");
        let _ = channel.close();
    }

    /// Publishes many JSON bodies on one channel, then waits for all confirms.
    pub fn publish_many(&mut self, exchange: &str, messages: &[(String, Value)]) {
        let channel = self.connection.open_channel(None).expect("channel");
        let confirms = channel.listen_for_publisher_confirms().expect("confirms");
        channel.enable_publisher_confirms().expect("confirm mode");
        for (key, body) in messages {
            let body = serde_json::to_vec(body).expect("json");
            channel
                .basic_publish(exchange, Publish::new(&body, key.as_str()))
                .expect("publish");
        }
        let mut smoother = amiquip::ConfirmSmoother::new();
        let mut confirmed = 0;
        while confirmed < messages.len() {
            let confirm = confirms.recv_timeout(DEADLINE).expect("broker confirms");
            confirmed += smoother.process(confirm).count();
        }
        let _ = channel.close();
    }

    pub fn publish_json(&mut self, exchange: &str, key: &str, body: &Value) {
        let bytes = serde_json::to_vec(body).expect("json");
        self.publish_with(exchange, key, &bytes, AmqpProperties::default());
    }

    /// Binds an extra key to a queue (to let bad routing keys reach the bridge).
    pub fn bind(&mut self, queue: &str, exchange: &str, key: &str) {
        let channel = self.connection.open_channel(None).expect("channel");
        channel
            .queue_bind(queue, exchange, key, FieldTable::new())
            .expect("bind");
        let _ = channel.close();
    }
}

/// A desktop app listening on an exchange: an exclusive queue consumed on its own thread.
pub struct Listener {
    deliveries: crossbeam_channel::Receiver<Delivery>,
    stop: Option<crossbeam_channel::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Listener {
    /// Declares `exchange` (direct, durable, as the bridge does), binds an exclusive queue with
    /// each key, and returns once consuming.
    pub fn bind(exchange: &str, keys: &[&str]) -> Listener {
        Listener::queue(exchange, None, keys)
    }

    /// Consumes an existing queue (e.g. a dead-letter queue).
    pub fn existing(queue: &str) -> Listener {
        Listener::queue("", Some(queue.to_string()), &[])
    }

    fn queue(exchange: &str, existing: Option<String>, keys: &[&str]) -> Listener {
        let (ready_tx, ready_rx) = crossbeam_channel::bounded(1);
        let (tx, deliveries) = crossbeam_channel::unbounded();
        let (stop, stop_rx) = crossbeam_channel::bounded::<()>(1);
        let exchange = exchange.to_string();
        let keys: Vec<String> = keys.iter().map(|k| k.to_string()).collect();
        let thread = std::thread::spawn(move || {
            let mut connection = broker();
            let channel = connection.open_channel(None).expect("channel");
            let queue = match existing {
                Some(name) => channel.queue_declare_passive(name).expect("queue exists"),
                None => {
                    let options = ExchangeDeclareOptions {
                        durable: true,
                        ..Default::default()
                    };
                    channel
                        .exchange_declare(ExchangeType::Direct, exchange.as_str(), options)
                        .expect("exchange");
                    let options = QueueDeclareOptions {
                        exclusive: true,
                        auto_delete: true,
                        ..Default::default()
                    };
                    let queue = channel.queue_declare("", options).expect("queue");
                    for key in &keys {
                        channel
                            .queue_bind(queue.name(), exchange.as_str(), key.as_str(), FieldTable::new())
                            .expect("bind");
                    }
                    queue
                }
            };
            let consumer = queue
                .consume(ConsumerOptions {
                    no_ack: true,
                    ..Default::default()
                })
                .expect("consume");
            ready_tx.send(()).expect("test waits");
            loop {
                crossbeam_channel::select! {
                    recv(consumer.receiver()) -> message => match message {
                        Ok(ConsumerMessage::Delivery(delivery)) => { let _ = tx.send(delivery); }
                        _ => break,
                    },
                    recv(stop_rx) -> _ => break,
                }
            }
            let _ = connection.close();
        });
        ready_rx
            .recv_timeout(DEADLINE)
            .expect("listener starts consuming");
        Listener {
            deliveries,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// The next delivery, or fails the test.
    pub fn next(&self) -> Delivery {
        tokio::task::block_in_place(|| self.deliveries.recv_timeout(DEADLINE))
            .expect("a delivery arrives before the deadline")
    }

    /// How many deliveries are already waiting.
    pub fn waiting(&self) -> usize {
        self.deliveries.len()
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A browser connected to `/ws`.
pub struct Browser {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    /// The session id from `welcome`.
    pub session: String,
    /// The whole `welcome` frame.
    pub welcome: Value,
}

impl Browser {
    /// Connects and reads the `welcome`.
    pub async fn connect(bridge: &TestBridge) -> Browser {
        let (ws, _) = tokio_tungstenite::connect_async(bridge.ws_url())
            .await
            .expect("websocket upgrade");
        Browser::from_stream(ws).await
    }

    /// Upgrades an already connected TCP stream (e.g. one with tuned socket buffers).
    pub async fn over(stream: TcpStream, url: &str) -> Browser {
        let (ws, _) = tokio_tungstenite::client_async(url, MaybeTlsStream::Plain(stream))
            .await
            .expect("websocket upgrade");
        Browser::from_stream(ws).await
    }

    /// Wraps an upgraded socket and reads the `welcome`.
    pub async fn from_stream(ws: WebSocketStream<MaybeTlsStream<TcpStream>>) -> Browser {
        let mut browser = Browser {
            ws,
            session: String::new(),
            welcome: Value::Null,
        };
        let welcome = browser.recv().await;
        assert_eq!(welcome["op"], "welcome", "first frame is welcome: {welcome}");
        browser.session = welcome["session"].as_str().expect("session id").to_string();
        browser.welcome = welcome;
        browser
    }

    pub async fn send(&mut self, frame: Value) {
        self.send_text(&frame.to_string()).await;
    }

    pub async fn send_text(&mut self, text: &str) {
        self.ws
            .send(Message::Text(text.into()))
            .await
            .expect("send frame");
    }

    /// Sends a frame; `Err` once the connection is closed.
    pub async fn try_send(&mut self, frame: Value) -> Result<(), tokio_tungstenite::tungstenite::Error> {
        self.ws.send(Message::Text(frame.to_string())).await
    }

    /// The next message of any kind, `None` when the stream ended (deadline applies).
    pub async fn next_frame(&mut self) -> Option<Message> {
        tokio::time::timeout(DEADLINE, self.ws.next())
            .await
            .expect("a frame arrives before the deadline")
            .and_then(Result::ok)
    }

    pub async fn send_raw(&mut self, message: Message) {
        self.ws.send(message).await.expect("send frame");
    }

    /// The next JSON text frame (pings are answered by tungstenite and skipped; the deadline
    /// covers the whole wait, so heartbeats cannot stretch it).
    pub async fn recv(&mut self) -> Value {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let message = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .expect("a frame arrives before the deadline")
                .expect("socket still open")
                .expect("valid websocket frame");
            match message {
                Message::Text(text) => return serde_json::from_str(&text).expect("server sends JSON"),
                Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("expected a text frame, got {other:?}"),
            }
        }
    }

    /// Reads until the server closes; returns the close frame.
    pub async fn closed(&mut self) -> Option<CloseFrame<'static>> {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let next = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .expect("the server closes before the deadline");
            match next {
                Some(Ok(Message::Close(frame))) => return frame,
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return None,
            }
        }
    }

    pub async fn subscribe(&mut self, desks: &[&str]) {
        self.send(json!({"op": "subscribe", "desks": desks})).await;
        let reply = self.recv().await;
        assert_eq!(reply, json!({"op": "subscribed", "desks": desks}));
    }

    /// Sends ping and expects pong as the very next frame: proves the session is usable and
    /// that nothing else was queued for it before.
    pub async fn assert_quiet(&mut self) {
        self.send(json!({"op": "ping"})).await;
        assert_eq!(self.recv().await, json!({"op": "pong"}));
    }

    /// Publishes and returns the `ack` or `error` reply.
    pub async fn publish(&mut self, desk: &str, event: &str, data: Value, reference: &str) -> Value {
        self.send(json!({"op": "publish", "desk": desk, "event": event, "data": data, "ref": reference}))
            .await;
        self.recv().await
    }
}

/// A routing key from desk and event.
pub fn key(desk: &str, event: &str) -> String {
    format!("{desk}_{event}")
}

/// Waits for `condition` to hold, polling every 10 ms, failing with `what` after the deadline.
pub async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let started = Instant::now();
    while !condition() {
        assert!(started.elapsed() < DEADLINE, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
