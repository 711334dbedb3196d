//! [`AppState`]: what every HTTP handler and the `/ws` upgrade can reach.

use std::sync::Arc;
use std::time::Instant;

use actix::Addr;

use crate::actors::messages::RouterIntake;
use crate::actors::router::Router;
use crate::config::Config;
use crate::link::LinkState;
use crate::metrics::Metrics;

/// Shared by the routes of every HTTP worker.
pub struct AppState {
    /// Shared configuration.
    pub config: Arc<Config>,
    /// The router, for stats.
    pub router: Addr<Router>,
    /// The router's intake, shared by every session.
    pub intake: RouterIntake,
    /// Shared counters.
    pub metrics: Arc<Metrics>,
    /// Consumer link state.
    pub consumer: Arc<LinkState>,
    /// Publisher link state.
    pub publisher: Arc<LinkState>,
    /// Process start, for `uptime_seconds`.
    pub started: Instant,
}
