//! The four actors and the typed messages between them.
//!
//! ```text
//!  browser ⇄ WsSession ──Subscribe/Publish──▶ Router ──PublishJob──▶ AmqpPublisher ⇄ RabbitMQ (bwic)
//!             ▲                                │ ▲                         │
//!             └──────ToSession (frames)────────┘ └──────PublishOutcome─────┘
//!                                                ▲
//!                            Inbound / Verdict   │
//!  RabbitMQ (example → listener) ⇄ AmqpConsumer ─┘
//! ```
//!
//! `Router` and `WsSession` are actix actors. The two AMQP actors are threads with a crossbeam
//! mailbox: amiquip is blocking and a `Channel` must stay on the thread that opened it, so they
//! live off the async runtime and speak to the router through `Recipient`s.

pub mod amqp_consumer;
pub mod amqp_publisher;
pub mod router;
pub mod session;

use std::thread::JoinHandle;
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender};

/// Owner's end of an AMQP worker thread: how to ask it to stop, and how to wait for it.
pub struct Worker {
    stop: Sender<Instant>,
    thread: JoinHandle<()>,
}

/// The worker's end of the stop signal: a deadline for finishing in-flight work.
pub type StopSignal = Receiver<Instant>;

impl Worker {
    /// Spawns `body` on a named thread, handing it the stop signal.
    pub fn spawn(name: &str, body: impl FnOnce(StopSignal) + Send + 'static) -> std::io::Result<Worker> {
        let (stop, stop_rx) = crossbeam_channel::bounded(1);
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || body(stop_rx))?;
        Ok(Worker { stop, thread })
    }

    /// Asks the worker to finish by `deadline` and blocks until its thread has ended.
    pub fn stop_and_join(self, deadline: Instant) {
        // The worker may already have ended; then there is nobody to tell.
        let _ = self.stop.send(deadline);
        if self.thread.join().is_err() {
            log::error!("an AMQP worker thread panicked while stopping");
        }
    }
}
