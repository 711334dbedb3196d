//! The WebSocket heartbeat, for every session at once: every `ws.heartbeat_interval_ms` the
//! router queues one ping (framed once, shared by every lane) to each session, and closes
//! (1001) those whose browser has sent nothing, pongs included, for `ws.client_timeout_ms`.
//!
//! Why here and not in each session: a timer per session is a boxed future and a timer entry
//! in every idle browser's memory, and a wake per browser per interval; one sweep costs one
//! timer in all and a look at each lane's last-seen stamp.

use std::time::Duration;

use actix::prelude::*;
use actix_web_actors::ws::CloseCode;

use super::Router;
use crate::lane::{Frame, QueueError};

impl Router {
    /// Starts the sweep.
    pub(super) fn start_heartbeat(&self, ctx: &mut Context<Self>) {
        let interval = Duration::from_millis(self.config.ws.heartbeat_interval_ms);
        ctx.run_interval(interval, |router, _| router.sweep());
    }

    /// Pings every session that showed life in time and closes the others.
    fn sweep(&mut self) {
        // With nobody left, what the sessions held is free (their lanes went with them by
        // the next tick): give it back, once per time the bridge emptied, not per session.
        if self.sessions.is_empty() && self.ended_since_trim {
            self.ended_since_trim = false;
            crate::heap::release_free_memory();
        }
        let timeout = Duration::from_millis(self.config.ws.client_timeout_ms);
        let ping = Frame::ping();
        for (id, entry) in &self.sessions {
            let lane = entry.outbox.lane();
            if !lane.is_open() {
                // Closing already; its pump ends it.
                continue;
            }
            if lane.silent_for() > timeout {
                log::info!("session {id}: no frame for {timeout:?}, closing");
                entry.outbox.close(CloseCode::Away, "heartbeat timeout");
            } else if lane.push(&ping) == Err(QueueError::Full) {
                self.metrics.answers_unread(id);
            }
        }
    }
}
