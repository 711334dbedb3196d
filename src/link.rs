//! The state of one AMQP link (consumer or publisher), shared with `/health`.
//!
//! Workers write it, HTTP handlers read it; an atomic keeps both sides lock-free. A change is
//! logged once, when it happens, so a broker that stays down for an hour is one log line, not
//! one per retry.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde::Serialize;

use crate::backoff::Backoff;
use crate::config::AmqpConfig;
use crate::log_text::Untrusted;
use crate::metrics::{Link, LinkGauges, Metrics};

/// Where a link stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LinkStatus {
    /// Connected, topology declared, working.
    Up,
    /// Not connected yet since start-up.
    Connecting,
    /// Was lost or never got through; retrying with backoff until it is up again.
    Down,
}

/// Why the AMQP links went down, shared by both: when the broker is simply not there, both
/// links fail for the same reason, and a person should read it once, not twice per outage.
#[derive(Debug, Default)]
pub struct LinkErrors {
    last: Mutex<Option<String>>,
}

impl LinkErrors {
    /// Records a link's failure; true when it says something the other link has not.
    fn record(&self, detail: &str) -> bool {
        let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        if last.as_deref() == Some(detail) {
            return false;
        }
        *last = Some(detail.to_owned());
        true
    }

    /// A link is up again: the next failure is news.
    fn forget(&self) {
        *self.last.lock().unwrap_or_else(PoisonError::into_inner) = None;
    }

    /// The last reason a link went down (for `/health`).
    pub fn last(&self) -> Option<String> {
        self.last.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }
}

/// A link's status plus the broker's flow-control flag, mirrored in its metrics gauges.
#[derive(Debug)]
pub struct LinkState {
    /// Which link this is.
    pub link: Link,
    /// `consumer` or `publisher`: names the link in logs.
    pub name: &'static str,
    status: AtomicU8,
    blocked: AtomicBool,
    /// Another consumer shares the inbound queue (consumer link only).
    shared_queue: AtomicBool,
    gauges: LinkGauges,
    errors: Arc<LinkErrors>,
}

impl LinkState {
    /// A new link, `connecting`.
    pub fn new(link: Link, metrics: &Metrics, errors: Arc<LinkErrors>) -> Self {
        LinkState {
            link,
            name: link.as_str(),
            status: AtomicU8::new(LinkStatus::Connecting as u8),
            blocked: AtomicBool::new(false),
            shared_queue: AtomicBool::new(false),
            gauges: metrics.link_gauges(link),
            errors,
        }
    }

    /// Current status.
    pub fn status(&self) -> LinkStatus {
        match self.status.load(Ordering::Acquire) {
            0 => LinkStatus::Up,
            1 => LinkStatus::Connecting,
            _ => LinkStatus::Down,
        }
    }

    /// Records a new status; logs only when it differs from the previous one, so a retry
    /// loop against a broker that stays down logs once (the retries log at debug level).
    /// `detail` is the bridge's own diagnosis, written whole: the broker's part in it is an
    /// AMQP short string (at most 255 bytes), and its hints must not be cut.
    pub fn set(&self, status: LinkStatus, detail: &str) {
        let previous = self.status.swap(status as u8, Ordering::AcqRel);
        self.gauges.up.set(i64::from(status == LinkStatus::Up));
        if previous == status as u8 {
            log::debug!("amqp {} link still {status:?}: {detail}", self.name);
            return;
        }
        match status {
            LinkStatus::Up => {
                self.errors.forget();
                log::info!("amqp {} link up {detail}", self.name);
            }
            LinkStatus::Connecting => log::info!("amqp {} link connecting {detail}", self.name),
            LinkStatus::Down if self.errors.record(detail) => {
                log::warn!("amqp {} link down: {detail}", self.name)
            }
            LinkStatus::Down => log::debug!("amqp {} link down for the same reason: {detail}", self.name),
        }
        if status != LinkStatus::Up {
            self.set_blocked(false, "");
        }
    }

    /// True while the broker has blocked this connection (connection.blocked: resource alarm).
    pub fn blocked(&self) -> bool {
        self.blocked.load(Ordering::Acquire)
    }

    /// Why a link last went down, while this one is not up.
    pub fn error(&self) -> Option<String> {
        (self.status() != LinkStatus::Up)
            .then(|| self.errors.last())
            .flatten()
    }

    /// True while another consumer reads the same inbound queue.
    pub fn shared_queue(&self) -> bool {
        self.shared_queue.load(Ordering::Acquire)
    }

    /// Records how many consumers the inbound queue has besides this bridge; logs an error
    /// when another one appears (the broker then splits events between them), once.
    pub fn set_other_consumers(&self, queue: &str, others: u32) {
        let shared = others > 0;
        if self.shared_queue.swap(shared, Ordering::AcqRel) == shared {
            return;
        }
        if shared {
            log::error!(
                "queue `{queue}` has {others} other consumer(s), probably another deskbridge instance: \
                 RabbitMQ hands each event to one of them, so every browser misses some. Run one \
                 instance per inbound queue, or set history.enabled = true for many instances"
            );
        } else {
            log::info!("queue `{queue}` is no longer shared with another consumer");
        }
    }

    /// Records connection.blocked / connection.unblocked.
    pub fn set_blocked(&self, blocked: bool, reason: &str) {
        self.gauges.blocked.set(i64::from(blocked));
        if self.blocked.swap(blocked, Ordering::AcqRel) != blocked {
            if blocked {
                log::warn!(
                    "amqp {} link blocked by the broker: {}",
                    self.name,
                    Untrusted(reason)
                );
            } else {
                log::info!("amqp {} link unblocked", self.name);
            }
        }
    }
}

/// A worker's link across reconnects: the shared state `/health` reads, the reconnect backoff,
/// and whether it was ever up (so that only re-connections are counted).
pub struct LinkLife {
    state: Arc<LinkState>,
    backoff: Backoff,
    metrics: Arc<Metrics>,
    was_up: bool,
}

impl LinkLife {
    /// Starts `connecting`, with the configured backoff.
    pub fn new(state: Arc<LinkState>, metrics: Arc<Metrics>, config: &AmqpConfig) -> Self {
        LinkLife {
            state,
            backoff: Backoff::new(
                Duration::from_millis(config.reconnect_initial_ms),
                Duration::from_millis(config.reconnect_max_ms),
            ),
            metrics,
            was_up: false,
        }
    }

    /// Connected and ready: report it, reset the backoff, count a reconnection.
    pub fn up(&mut self, detail: &str) {
        self.state.set(LinkStatus::Up, detail);
        self.backoff.reset();
        if std::mem::replace(&mut self.was_up, true) {
            self.metrics.reconnected(self.state.link);
        }
    }

    /// Lost or refused: report it (once per outage).
    pub fn down(&self, error: &dyn std::fmt::Display) {
        self.state.set(LinkStatus::Down, &error.to_string());
    }

    /// How long to wait before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        self.backoff.next_delay()
    }

    /// The shared state, for flow-control notifications.
    pub fn state(&self) -> &LinkState {
        &self.state
    }
}
