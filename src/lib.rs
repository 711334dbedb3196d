//! deskbridge joins browsers (WebSocket) and desktop applications (RabbitMQ, AMQP 0-9-1).
//!
//! # Layout
//! - [`config`]: defaults, TOML file, env overrides, validation.
//! - [`protocol`]: the WebSocket wire types, parsed once at the session edge.
//! - [`transform`]: per-desk data transforms (config rules and a trait for code).
//! - [`actors`]: `Router`, `WsSession`, `AmqpConsumer`, `AmqpPublisher` and their messages.
//! - [`amqp`]: connection through the URL list, topology, routing-key convention.
//! - [`fd_limit`]: raises the open-files limit at start-up.
//! - [`http`]: the server and its routes (`/`, `/health`, `/health/live`, `/metrics`).
//! - [`websocket`]: `/ws`, the handshake and the pump between a socket and its session.
//! - [`link`], [`backoff`], [`port_watch`], [`metrics`]: link state, reconnect delays, early
//!   retry when a broker comes back, counters.
//!
//! [`start`] wires them together and returns a [`Bridge`]; `main.rs` only parses the
//! configuration, calls it and waits for a signal.

pub mod actors;
pub mod amqp;
pub mod backoff;
pub mod config;
pub mod fd_limit;
pub mod http;
pub mod link;
pub mod metrics;
pub mod port_watch;
pub mod protocol;
pub mod transform;
pub mod websocket;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use actix::{Actor, Addr};
use actix_web::{dev::ServerHandle, web};

use crate::actors::amqp_consumer::AmqpConsumer;
use crate::actors::amqp_publisher::{AmqpPublisher, PublisherHandle};
use crate::actors::router::{BeginShutdown, CloseAll, Router};
use crate::actors::Worker;
pub use crate::config::Config;
use crate::http::AppState;
use crate::link::LinkState;
use crate::metrics::Metrics;
pub use crate::transform::Transforms;

/// Start of the log line that tells where the bridge listens (`… listening on http://ADDR`);
/// launchers that start the binary on port 0 (tests, the benchmark) read the address from it.
pub const LISTENING_ON: &str = "listening on http://";

/// This crate's version, sent in `welcome` and `/health`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Why the bridge could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The HTTP address is taken or not ours.
    #[error("cannot listen on {addr}: {source} (pick another with --bind or DESKBRIDGE_BIND)")]
    Bind {
        /// Configured `bind`.
        addr: String,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The OS refused a thread.
    #[error("cannot start an AMQP worker thread: {0}")]
    Thread(std::io::Error),
}

/// A running bridge: HTTP server, router and both AMQP workers.
pub struct Bridge {
    addr: SocketAddr,
    server: ServerHandle,
    router: Addr<Router>,
    consumer: Worker,
    publisher: Worker,
    config: Arc<Config>,
}

/// Starts everything; must run inside an actix system (`#[actix_web::main]`). Returns once the
/// HTTP listener is bound: the AMQP links connect in the background and `/health` tells when
/// they are up.
pub async fn start(config: Config, mut transforms: Transforms) -> Result<Bridge, StartError> {
    let config = Arc::new(config);
    transforms.resolve(&config.desks, &config.events);
    let metrics = Arc::new(Metrics::default());
    let consumer_link = Arc::new(LinkState::new("consumer"));
    let publisher_link = Arc::new(LinkState::new("publisher"));
    let instance = uuid::Uuid::new_v4().to_string();

    let (handle, jobs) = PublisherHandle::new(&config.amqp);
    let router = Router::new(
        Arc::clone(&config),
        transforms,
        handle.clone(),
        Arc::clone(&metrics),
    )
    .start();
    let state = web::Data::new(AppState {
        config: Arc::clone(&config),
        router: router.clone(),
        metrics: Arc::clone(&metrics),
        consumer: Arc::clone(&consumer_link),
        publisher: Arc::clone(&publisher_link),
        started: Instant::now(),
    });
    let workers = match config.workers {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let bind_error = |source| StartError::Bind {
        addr: config.bind.clone(),
        source,
    };
    let listeners = http::bind(&config.bind).map_err(bind_error)?;
    // `bind` returns at least one listener, and a bound listener has an address.
    let addr = listeners[0].local_addr().map_err(bind_error)?;
    let server = http::server(state, listeners, workers, config.shutdown_timeout()).map_err(bind_error)?;

    // The AMQP workers start only once the port is ours: a failed start leaves nothing running.
    let publisher = AmqpPublisher {
        config: Arc::clone(&config),
        jobs,
        handle,
        outcomes: router.clone().recipient(),
        link: Arc::clone(&publisher_link),
        metrics: Arc::clone(&metrics),
        instance: instance.clone(),
    };
    let publisher =
        Worker::spawn("amqp-publisher", move |stop| publisher.run(stop)).map_err(StartError::Thread)?;
    let consumer = AmqpConsumer {
        config: Arc::clone(&config),
        router: router.clone().recipient(),
        link: Arc::clone(&consumer_link),
        metrics: Arc::clone(&metrics),
        instance,
    };
    let consumer =
        Worker::spawn("amqp-consumer", move |stop| consumer.run(stop)).map_err(StartError::Thread)?;
    let handle = server.handle();
    actix_web::rt::spawn(server);
    Ok(Bridge {
        addr,
        server: handle,
        router,
        consumer,
        publisher,
        config,
    })
}

impl Bridge {
    /// The address the HTTP server listens on (the real port when `bind` used port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Graceful shutdown, bounded by `shutdown_timeout_ms`: stop accepting connections,
    /// refuse new publishes, let in-flight publishes end in `ack` or `error`, close browsers
    /// with 1001, leave unacked deliveries to the broker, close both AMQP connections.
    pub async fn shutdown(self) {
        let deadline = Instant::now() + self.config.shutdown_timeout();
        self.server.pause().await;
        // A failed send means the router already stopped; nothing is left to tell it.
        let _ = self.router.send(BeginShutdown).await;
        join_worker(self.publisher, deadline).await;
        let _ = self.router.send(CloseAll).await;
        join_worker(self.consumer, deadline).await;
        self.server.stop(true).await;
        log::info!("deskbridge stopped");
    }
}

async fn join_worker(worker: Worker, deadline: Instant) {
    if actix_web::rt::task::spawn_blocking(move || worker.stop_and_join(deadline))
        .await
        .is_err()
    {
        log::error!("an AMQP worker did not stop cleanly");
    }
}
