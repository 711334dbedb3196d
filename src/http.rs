//! The HTTP server and its routes: the console page, the browser client, health and metrics;
//! WebSocket upgrades go to [`crate::websocket`].

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::time::Duration;

use actix_codec::Framed;
use actix_http::{h1, HttpService, Request};
use actix_service::map_config;
use actix_web::dev::{fn_service, AppConfig, Server};
use actix_web::{web, App, HttpResponse};
use serde::Serialize;
use tokio::net::{TcpSocket, TcpStream};

use crate::actors::messages::GetStats;
use crate::link::LinkStatus;
use crate::metrics;
use crate::protocol::HttpError;
use crate::state::AppState;
use crate::websocket;

/// Pending connections the kernel holds per listener: thousands of browsers reconnect at once
/// after a restart, and the OS default (128) would drop their SYNs.
const BACKLOG: u32 = 2048;

/// Binds every address `bind` resolves to (`localhost` may give IPv4 and IPv6).
pub fn bind(bind: &str) -> std::io::Result<Vec<TcpListener>> {
    let mut listeners = Vec::new();
    let mut last_error = None;
    for addr in bind.to_socket_addrs()? {
        match listen(addr) {
            Ok(listener) => listeners.push(listener),
            Err(error) => last_error = Some(error),
        }
    }
    match (listeners.is_empty(), last_error) {
        (true, Some(error)) => Err(error),
        (true, None) => Err(std::io::Error::other("the address resolved to nothing")),
        (false, _) => Ok(listeners),
    }
}

fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    // A restarted bridge must get its port back while old connections sit in TIME_WAIT.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)?.into_std()
}

/// The HTTP server on `listeners`, not yet running. Built from actix-http's service rather than
/// `HttpServer` for one reason: `HttpServer` has no upgrade hook, and WebSocket connections
/// must leave the HTTP/1 dispatcher once upgraded (see [`crate::websocket`]).
pub fn server(
    state: web::Data<AppState>,
    listeners: Vec<TcpListener>,
    workers: usize,
    shutdown_timeout: Duration,
) -> std::io::Result<Server> {
    let mut builder = Server::build()
        .workers(workers)
        .disable_signals()
        .shutdown_timeout(shutdown_timeout.as_secs().max(1));
    for listener in listeners {
        let addr = listener.local_addr()?;
        let state = state.clone();
        builder = builder.listen("deskbridge-http", listener, move || {
            let app = App::new().app_data(state.clone()).configure(configure);
            let state = state.clone();
            HttpService::build()
                .local_addr(addr)
                // Events are small frames that must leave at once: without this, Nagle's
                // algorithm can hold one back up to a delayed-ACK timeout (40 ms on Linux).
                .tcp_nodelay(true)
                .upgrade(fn_service(
                    move |(req, framed): (Request, Framed<TcpStream, h1::Codec>)| {
                        // Boxed: the connection's task is sized for its largest state, and
                        // unboxed the handshake would make every HTTP connection's task larger.
                        // The session itself runs in a task of its own.
                        Box::pin(websocket::upgrade(req, framed, state.clone()))
                    },
                ))
                .finish(map_config(app, |_| AppConfig::default()))
                .tcp()
        })?;
    }
    Ok(builder.run())
}

/// Mounts every route; tests mount the same app.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/", web::get().to(console))
        .route("/deskbridge.js", web::get().to(client))
        .route("/deskbridge.d.ts", web::get().to(client_types))
        .route(websocket::PATH, web::get().to(not_upgraded))
        .route("/health", web::get().to(health))
        .route("/health/live", web::get().to(live))
        .route("/metrics", web::get().to(metrics));
}

/// The live console, compiled into the binary so the image needs no files beside it.
const CONSOLE: &str = include_str!("../static/index.html");

async fn console() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .body(CONSOLE)
}

/// The browser client (an ES module) and its TypeScript types, served by the bridge so a page
/// imports the client of the protocol version it talks to.
const CLIENT: &str = include_str!("../static/deskbridge.js");
const CLIENT_TYPES: &str = include_str!("../static/deskbridge.d.ts");

async fn client() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/javascript; charset=utf-8")
        .body(CLIENT)
}

async fn client_types() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/typescript; charset=utf-8")
        .body(CLIENT_TYPES)
}

/// `/ws` without the upgrade headers: the upgrade hook sees every real handshake first.
async fn not_upgraded() -> HttpResponse {
    HttpResponse::BadRequest().json(HttpError {
        error: "websocket_upgrade_required",
        message: format!(
            "{} speaks WebSocket only: send Connection: Upgrade and Upgrade: websocket",
            websocket::PATH
        ),
    })
}

/// `/health` body.
#[derive(Serialize)]
struct Health {
    status: &'static str,
    version: &'static str,
    uptime_seconds: u64,
    amqp: AmqpHealth,
    sessions: usize,
    desks: BTreeMap<String, usize>,
    /// Problems that do not stop the bridge but lose events: `shared_queue`.
    warnings: Vec<&'static str>,
}

#[derive(Serialize)]
struct AmqpHealth {
    consumer: LinkStatus,
    publisher: LinkStatus,
    /// True while the broker applies flow control (connection.blocked) to either link.
    blocked: bool,
    /// Why a link is down (what was tried and what failed), while one is.
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

async fn health(state: web::Data<AppState>) -> HttpResponse {
    let stats = match state.router.send(GetStats).await {
        Ok(stats) => stats,
        Err(error) => {
            log::error!("health: the router did not answer: {error}");
            return HttpResponse::InternalServerError()
                .json(serde_json::json!({"status": "error", "message": "router unavailable"}));
        }
    };
    let amqp = AmqpHealth {
        consumer: state.consumer.status(),
        publisher: state.publisher.status(),
        blocked: state.consumer.blocked() || state.publisher.blocked(),
        error: state.consumer.error().or_else(|| state.publisher.error()),
    };
    let ok = amqp.consumer == LinkStatus::Up && amqp.publisher == LinkStatus::Up;
    let body = Health {
        status: if ok { "ok" } else { "degraded" },
        version: crate::VERSION,
        uptime_seconds: state.started.elapsed().as_secs(),
        amqp,
        sessions: stats.sessions,
        desks: stats.desks,
        warnings: state
            .consumer
            .shared_queue()
            .then_some("shared_queue")
            .into_iter()
            .collect(),
    };
    if ok {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    }
}

async fn live() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({"status": "ok"}))
}

async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type(metrics::CONTENT_TYPE)
        .body(state.metrics.render())
}
