//! deskbridge joins browsers (WebSocket) and desktop applications (RabbitMQ, AMQP 0-9-1).
//!
//! # Layout
//! Each layer uses only the ones below it.
//! - wiring: [`start`] and [`Bridge`] (here), `main.rs`.
//! - the edge: [`http`] (server, `/`, `/health`, `/metrics`), [`websocket`] (`/ws` handshake
//!   and the pump between a socket and its session), [`state`] (what both reach).
//! - [`actors`]: `Router`, `WsSession`, `AmqpConsumer`, `AmqpPublisher`, the shared AMQP
//!   [`actors::worker`] loop, and [`actors::messages`], every message between them.
//! - what the actors talk through and report to: [`amqp`] (connect, topology), [`link`]
//!   (link state for `/health`), [`metrics`], [`port_watch`], [`backoff`], [`tag_queue`].
//! - pure types and rules, no I/O: [`protocol`] (wire types), [`config`], [`catalog`] (desks,
//!   events, routing keys), [`transform`], [`broker_url`], [`panics`], [`fd_limit`], [`heap`]
//!   (freed memory back to the OS), [`frame_limit`] (`ws.max_frame_bytes` on frame headers),
//!   [`host`] (the loopback `Host` check), [`log_text`] (untrusted text made safe for a log line).
//! - beside them, for the binary only: [`probe`] (`deskbridge health`, the image's health check).
//!
//! [`start`] wires them together and returns a [`Bridge`]; `main.rs` only parses the
//! configuration, calls it and waits for a signal.

pub mod actors;
pub mod admission;
pub mod amqp;
pub mod auth;
pub mod backoff;
pub mod broker_url;
pub mod catalog;
pub mod config;
pub mod delivery;
pub mod desk_log;
pub mod fd_limit;
pub mod frame_limit;
pub mod heap;
pub mod history;
pub mod host;
pub mod http;
pub mod lane;
pub mod link;
pub mod log_text;
pub mod metrics;
pub mod panics;
pub mod port_watch;
pub mod presence;
pub mod probe;
pub mod protocol;
pub mod state;
pub mod tag_queue;
pub mod tls;
pub mod transform;
pub mod websocket;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::{Actor, Addr};
use actix_web::{dev::ServerHandle, web};
use tokio_util::task::TaskTracker;

use crate::actors::amqp_consumer::AmqpConsumer;
use crate::actors::amqp_publisher::AmqpPublisher;
use crate::actors::messages::{BeginShutdown, CloseAll, PublishJob, PublisherHandle, ReplayRequest};
use crate::actors::router::Router;
use crate::actors::session::SessionEnv;
use crate::actors::stream_reader::StreamReader;
use crate::actors::worker::{Worker, WorkerContext};
use crate::admission::Admission;
use crate::auth::{KeyError, Verifier};
use crate::catalog::Catalog;
pub use crate::config::Config;
use crate::link::{LinkErrors, LinkState};
use crate::metrics::{Link, Metrics};
use crate::state::AppState;
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
    /// The configured token keys cannot be used.
    #[error("{0}")]
    Keys(KeyError),
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
    session_tasks: TaskTracker,
}

/// Starts everything; must run inside an actix system (`#[actix_web::main]`). Returns once the
/// HTTP listener is bound: the AMQP links connect in the background and `/health` tells when
/// they are up.
pub async fn start(config: Config, mut transforms: Transforms) -> Result<Bridge, StartError> {
    let verifier = Verifier::from_config(&config.auth).map_err(StartError::Keys)?;
    // The port first: an actor started before a failed bind would run its `started` after the
    // runtime is gone, and panic there instead of leaving only the bind error.
    let (addr, listeners) = bind_http(&config)?;
    let config = Arc::new(config);
    let catalog = Arc::new(Catalog::new(&config.desks, &config.events));
    transforms.resolve(catalog.desks(), catalog.events());
    let metrics = Arc::new(Metrics::new());
    let errors = Arc::new(LinkErrors::default());
    let consumer_link = Arc::new(LinkState::new(Link::Consumer, &metrics, Arc::clone(&errors)));
    let publisher_link = Arc::new(LinkState::new(Link::Publisher, &metrics, errors));
    let (handle, jobs) = PublisherHandle::new(&config.amqp);
    let (replays, replay_requests) = crossbeam_channel::unbounded();
    // This process among the instances: in `x-instance`, its reply and presence queues.
    let instance = uuid::Uuid::new_v4().to_string();
    let router = Router::new(
        &instance,
        Arc::clone(&config),
        Arc::clone(&catalog),
        transforms,
        handle.clone(),
        Arc::clone(&metrics),
        config.history.enabled.then_some(replays),
    )
    .start();
    let state = web::Data::new(AppState {
        config: Arc::clone(&config),
        router: router.clone(),
        sessions: Arc::new(SessionEnv {
            config: Arc::clone(&config),
            metrics: Arc::clone(&metrics),
            router: Arc::new(router.clone().recipient()),
            verifier,
        }),
        admission: Arc::new(Admission::new(
            Arc::clone(&metrics),
            config.ws.max_sessions,
            config.ws.max_sessions_per_ip,
        )),
        metrics: Arc::clone(&metrics),
        consumer: Arc::clone(&consumer_link),
        publisher: Arc::clone(&publisher_link),
        started: Instant::now(),
        session_tasks: TaskTracker::new(),
    });
    let session_tasks = state.session_tasks.clone();
    let server = serve_http(&config, state, listeners, addr)?;

    // The AMQP workers start only once the port is ours: a failed start leaves nothing running.
    let (publisher, consumer) = spawn_workers(
        &config,
        catalog,
        (&router, instance),
        (handle, jobs),
        replay_requests,
        &metrics,
        [&consumer_link, &publisher_link],
    )?;
    let handle = server.handle();
    actix_web::rt::spawn(server);
    Ok(Bridge {
        addr,
        server: handle,
        router,
        consumer,
        publisher,
        config,
        session_tasks,
    })
}

/// Starts the publisher and the consumer threads (the stream reader in place of the queue
/// consumer with history on); returns (publisher, consumer).
fn spawn_workers(
    config: &Arc<Config>,
    catalog: Arc<Catalog>,
    (router, instance): (&Addr<Router>, String),
    (handle, jobs): (PublisherHandle, crossbeam_channel::Receiver<PublishJob>),
    replays: crossbeam_channel::Receiver<ReplayRequest>,
    metrics: &Arc<Metrics>,
    [consumer_link, publisher_link]: [&Arc<LinkState>; 2],
) -> Result<(Worker, Worker), StartError> {
    let context = |link: &Arc<LinkState>| WorkerContext {
        config: Arc::clone(config),
        link: Arc::clone(link),
        metrics: Arc::clone(metrics),
    };
    let publisher = AmqpPublisher::new(
        Arc::clone(config),
        handle,
        jobs,
        (
            router.clone().recipient(),
            router.clone().recipient(),
            router.clone().recipient(),
        ),
        instance.clone(),
    );
    let publisher = Worker::spawn(publisher, context(publisher_link)).map_err(StartError::Thread)?;
    let consumer = if config.history.enabled {
        let reader = StreamReader::new(
            Arc::clone(config),
            catalog,
            router.clone().recipient(),
            Arc::clone(metrics),
            replays,
        );
        Worker::spawn(reader, context(consumer_link))
    } else {
        let consumer = AmqpConsumer::new(
            Arc::clone(config),
            catalog,
            router.clone().recipient(),
            Arc::clone(metrics),
            instance,
        );
        Worker::spawn(consumer, context(consumer_link))
    };
    let consumer = consumer.map_err(StartError::Thread)?;
    Ok((publisher, consumer))
}

/// Binds the configured address: the listeners and the address they serve on.
fn bind_http(config: &Config) -> Result<(SocketAddr, Vec<std::net::TcpListener>), StartError> {
    let bind_error = |source| StartError::Bind {
        addr: config.bind.clone(),
        source,
    };
    let listeners = http::bind(&config.bind).map_err(bind_error)?;
    // `bind` returns at least one listener, and a bound listener has an address.
    let addr = listeners[0].local_addr().map_err(bind_error)?;
    Ok((addr, listeners))
}

/// Builds the HTTP server on the bound `listeners` (not yet running).
fn serve_http(
    config: &Config,
    state: web::Data<AppState>,
    listeners: Vec<std::net::TcpListener>,
    addr: SocketAddr,
) -> Result<actix_web::dev::Server, StartError> {
    let workers = match config.workers {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    http::server(state, listeners, workers, config.shutdown_timeout()).map_err(|source| StartError::Bind {
        addr: addr.to_string(),
        source,
    })
}

impl Bridge {
    /// The address the HTTP server listens on (the real port when `bind` used port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Graceful shutdown, all of it within `shutdown_timeout_ms`: stop accepting connections,
    /// refuse new publishes, let in-flight publishes end in `ack` or `error`, close browsers
    /// with 1001, leave unacked deliveries to the broker, close both AMQP connections. The
    /// last part of the budget is kept for the browsers' close handshakes.
    pub async fn shutdown(self) {
        let started = Instant::now();
        let timeout = self.config.shutdown_timeout();
        let deadline = started + timeout;
        let publishes_deadline = deadline - (timeout / 4).min(Duration::from_secs(1));
        self.server.pause().await;
        // A failed send means the router already stopped; nothing is left to tell it.
        let _ = self.router.send(BeginShutdown).await;
        let (mut publisher, mut consumer) = (self.publisher, self.consumer);
        publisher.signal(publishes_deadline);
        consumer.signal(deadline);
        let consumer = actix_web::rt::task::spawn_blocking(move || consumer.join(deadline));
        join_worker(publisher, publishes_deadline).await;
        let _ = self.router.send(CloseAll).await;
        if consumer.await.is_err() {
            log::error!("the AMQP consumer did not stop cleanly");
        }
        // Sessions run in tasks of their own, which the server's stop does not wait for.
        self.session_tasks.close();
        let remaining = deadline.saturating_duration_since(Instant::now());
        let closed = async {
            self.session_tasks.wait().await;
            self.server.stop(true).await;
        };
        if tokio::time::timeout(remaining, closed).await.is_err() {
            log::warn!(
                "shutdown_timeout_ms ({timeout:?}) reached with connections still closing; leaving them"
            );
            // The server must stop all the same; its workers drop what still runs.
            self.server.stop(false).await;
        }
        log::info!("deskbridge stopped in {:?}", started.elapsed());
    }
}

async fn join_worker(worker: Worker, deadline: Instant) {
    if actix_web::rt::task::spawn_blocking(move || worker.join(deadline))
        .await
        .is_err()
    {
        log::error!("an AMQP worker did not stop cleanly");
    }
}
