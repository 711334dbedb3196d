//! HTTP routes: the console page, the WebSocket upgrade, health and metrics.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use actix::Addr;
use actix_web::{http::header, web, HttpRequest, HttpResponse};
use actix_web_actors::ws;
use serde::Serialize;

use crate::actors::router::{GetStats, Router};
use crate::actors::session::{SessionSlot, WsSession};
use crate::config::Config;
use crate::link::{LinkState, LinkStatus};
use crate::metrics::Metrics;

/// What every handler can reach.
pub struct AppState {
    /// Shared configuration.
    pub config: Arc<Config>,
    /// The router, for new sessions and stats.
    pub router: Addr<Router>,
    /// Shared counters.
    pub metrics: Arc<Metrics>,
    /// Consumer link state.
    pub consumer: Arc<LinkState>,
    /// Publisher link state.
    pub publisher: Arc<LinkState>,
    /// Process start, for `uptime_seconds`.
    pub started: Instant,
}

/// Mounts every route; tests mount the same app.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/", web::get().to(console))
        .route("/ws", web::get().to(websocket))
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

async fn websocket(
    req: HttpRequest,
    stream: web::Payload,
    state: web::Data<AppState>,
) -> actix_web::Result<HttpResponse> {
    let max = state.config.ws.max_sessions;
    let Some(slot) = SessionSlot::acquire(&state.metrics, max) else {
        return Ok(HttpResponse::ServiceUnavailable()
            .insert_header((header::RETRY_AFTER, "5"))
            .json(serde_json::json!({
                "error": "too_many_sessions",
                "message": format!("this bridge already serves {max} sessions (ws.max_sessions); retry later"),
            })));
    };
    let session = WsSession::new(
        state.router.clone(),
        Arc::clone(&state.config),
        Arc::clone(&state.metrics),
        slot,
    );
    ws::WsResponseBuilder::new(session, &req, stream)
        .frame_size(state.config.ws.max_frame_bytes)
        .start()
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
}

#[derive(Serialize)]
struct AmqpHealth {
    consumer: LinkStatus,
    publisher: LinkStatus,
    /// True while the broker applies flow control (connection.blocked) to either link.
    blocked: bool,
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
    };
    let ok = amqp.consumer == LinkStatus::Up && amqp.publisher == LinkStatus::Up;
    let body = Health {
        status: if ok { "ok" } else { "degraded" },
        version: crate::VERSION,
        uptime_seconds: state.started.elapsed().as_secs(),
        amqp,
        sessions: stats.sessions,
        desks: stats.desks,
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
        .content_type("text/plain; version=0.0.4")
        .body(state.metrics.render(&state.consumer, &state.publisher))
}
