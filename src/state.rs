//! [`AppState`]: what every HTTP handler and the `/ws` upgrade can reach.

use std::sync::Arc;
use std::time::Instant;

use actix::Addr;
use tokio_util::task::TaskTracker;

use crate::actors::router::Router;
use crate::actors::session::SessionEnv;
use crate::admission::Admission;
use crate::config::Config;
use crate::link::LinkState;
use crate::metrics::Metrics;

/// Shared by the routes of every HTTP worker.
pub struct AppState {
    /// Shared configuration.
    pub config: Arc<Config>,
    /// The router, for stats.
    pub router: Addr<Router>,
    /// What every session shares (the router's intake, the token verifier...).
    pub sessions: Arc<SessionEnv>,
    /// The session limits.
    pub admission: Arc<Admission>,
    /// Shared counters.
    pub metrics: Arc<Metrics>,
    /// Consumer link state.
    pub consumer: Arc<LinkState>,
    /// Publisher link state.
    pub publisher: Arc<LinkState>,
    /// Process start, for `uptime_seconds`.
    pub started: Instant,
    /// The WebSocket sessions' tasks (outside the HTTP server's count of connections), so that
    /// shutdown can wait for their close frames.
    pub session_tasks: TaskTracker,
}
