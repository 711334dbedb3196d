//! [`AppState`]: what every HTTP handler and the `/ws` upgrade can reach.

use std::sync::Arc;
use std::time::Instant;

use actix::Addr;

use crate::actors::router::Router;
use crate::config::Config;
use crate::link::LinkState;
use crate::metrics::Metrics;

/// Shared by the routes of every HTTP worker.
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
