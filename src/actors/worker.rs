//! The shape both AMQP actors share: a thread of its own (amiquip is blocking and a `Channel`
//! must stay on the thread that opened it), one connection at a time, reconnects with backoff,
//! and a link state that tells the truth even when the work panics.
//!
//! An actor implements [`LinkWork`] (what to do with a connection, and while waiting for the
//! next one); [`Worker::spawn`] runs it through [`run`]:
//!
//! ```text
//! loop: connect to the first URL that answers → serve until stop (done) or link lost
//!       → link down → wait out the backoff (less if a closed broker port reopens) → again
//! ```
//!
//! A panic while serving is caught: the link is reported down at once, counted, and the
//! connection started over, so `/health` never says `up` while nothing flows. A panic anywhere
//! else ends the thread, and the link is reported down as it unwinds.
//!
//! Stopping is bounded: a worker still busy at its deadline has its socket cut. amiquip waits
//! without limit for the broker's answer to a close, and a broker under a resource alarm
//! stops reading from publishing connections, so that answer may never come.

use std::net::{Shutdown, TcpStream};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use amiquip::{Connection, ConnectionBlockedNotification};
use crossbeam_channel::{Receiver, RecvError, RecvTimeoutError, Sender};

use crate::amqp::{self, AmqpError};
use crate::broker_url::BrokerUrl;
use crate::config::Config;
use crate::link::{LinkLife, LinkState, LinkStatus};
use crate::metrics::{Link, Metrics};
use crate::port_watch::PortWatch;

/// The worker's end of the stop signal: a deadline for finishing in-flight work.
pub type StopSignal = Receiver<Instant>;

/// What an AMQP actor does with each connection.
pub trait LinkWork: Send + 'static {
    /// Which link this is.
    const LINK: Link;

    /// Serves one connection: `Ok` when asked to stop, `Err` when the link was lost.
    fn serve(
        &mut self,
        connection: &mut Connection,
        url: &BrokerUrl,
        stop: &StopSignal,
        life: &mut LinkLife,
    ) -> Result<(), AmqpError>;

    /// Between connections: waits until `until`, doing whatever the actor must meanwhile;
    /// false when asked to stop.
    fn pause(&mut self, until: Instant, stop: &StopSignal) -> bool {
        matches!(stop.recv_deadline(until), Err(RecvTimeoutError::Timeout))
    }

    /// After the last connection: settle whatever is still held.
    fn finish(&mut self) {}
}

/// What every worker needs besides its own work.
pub struct WorkerContext {
    /// Shared configuration.
    pub config: Arc<Config>,
    /// The link's state, read by `/health`.
    pub link: Arc<LinkState>,
    /// Shared counters.
    pub metrics: Arc<Metrics>,
}

/// The socket of a worker's current connection, if it has one.
type CurrentSocket = Arc<Mutex<Option<TcpStream>>>;

/// How long before the deadline a worker still busy has its socket cut: the time it gets to
/// notice before it is left behind.
const AFTER_CUT: Duration = Duration::from_millis(300);

/// Owner's end of an AMQP worker thread: how to ask it to stop, and how to wait for it.
pub struct Worker {
    name: String,
    /// Taken (and so closed) by `signal`.
    stop: Option<Sender<Instant>>,
    /// Disconnected when the thread ends.
    ended: Receiver<()>,
    socket: CurrentSocket,
    thread: JoinHandle<()>,
}

impl Worker {
    /// Starts `work` on a thread named after its link.
    pub fn spawn<W: LinkWork>(work: W, context: WorkerContext) -> std::io::Result<Worker> {
        let name = format!("amqp-{}", W::LINK.as_str());
        let (stop, stop_rx) = crossbeam_channel::bounded(1);
        let (alive, ended) = crossbeam_channel::bounded::<()>(0);
        let socket = CurrentSocket::default();
        let current = Arc::clone(&socket);
        let thread = std::thread::Builder::new().name(name.clone()).spawn(move || {
            let _alive = alive;
            run(work, context, stop_rx, &current);
        })?;
        Ok(Worker {
            name,
            stop: Some(stop),
            ended,
            socket,
            thread,
        })
    }

    /// Asks the worker to finish by `deadline`. The stop channel is closed right after, so a
    /// worker that consumed the signal and then lost its link still sees "stop" everywhere.
    pub fn signal(&mut self, deadline: Instant) {
        if let Some(stop) = self.stop.take() {
            // The worker may already have ended; then there is nobody to tell.
            let _ = stop.send(deadline);
        }
    }

    /// Waits for a signalled worker, all within `deadline`: shortly before it, a worker still
    /// busy has its connection cut, and one that still does not end is left behind.
    pub fn join(self, deadline: Instant) {
        let cut_at = deadline.checked_sub(AFTER_CUT).unwrap_or(deadline);
        if self.ended.recv_deadline(cut_at) == Err(RecvTimeoutError::Timeout) {
            log::warn!(
                "{} did not finish by the shutdown deadline: cutting its connection",
                self.name
            );
            if let Some(socket) = lock(&self.socket).as_ref() {
                let _ = socket.shutdown(Shutdown::Both);
            }
            if self.ended.recv_deadline(deadline) == Err(RecvTimeoutError::Timeout) {
                log::error!("{} is stuck; leaving it behind", self.name);
                return;
            }
        }
        if self.thread.join().is_err() {
            log::error!("{} ended by a panic", self.name);
        }
    }
}

/// The slot's contents even if a panicking thread held the lock (an `Option` is always valid).
fn lock(socket: &CurrentSocket) -> std::sync::MutexGuard<'_, Option<TcpStream>> {
    socket.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Reports the link down if the thread unwinds past [`run`]'s own guard.
struct DownOnUnwind(Arc<LinkState>);

impl Drop for DownOnUnwind {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.set(LinkStatus::Down, "the worker thread ended by a panic");
        }
    }
}

/// Connects, serves and reconnects until `stop` fires; then lets the work settle what it holds.
fn run<W: LinkWork>(mut work: W, context: WorkerContext, stop: StopSignal, socket: &CurrentSocket) {
    let _guard = DownOnUnwind(Arc::clone(&context.link));
    let urls = &context.config.amqp.urls;
    let mut life = LinkLife::new(
        Arc::clone(&context.link),
        Arc::clone(&context.metrics),
        &context.config.amqp,
    );
    loop {
        let served = catch_unwind(AssertUnwindSafe(|| {
            let mut connected = amqp::connect_any(urls, &context.config.amqp.tls, W::LINK.as_str())?;
            *lock(socket) = Some(connected.socket);
            let end = work.serve(&mut connected.connection, connected.url, &stop, &mut life);
            if end.is_ok() {
                // Unacked deliveries go back to the queue when the connection closes.
                if let Err(error) = connected.connection.close() {
                    log::debug!("amqp {}: close: {error}", W::LINK.as_str());
                }
            }
            end
        }));
        lock(socket).take();
        match served {
            Ok(Ok(())) => break,
            Ok(Err(error)) => life.down(&error),
            Err(panic) => {
                let message = crate::panics::message(panic.as_ref());
                context.metrics.worker_panicked(W::LINK, &message);
                life.down(&format_args!("the worker panicked: {message}"));
            }
        }
        if !wait_to_retry(&mut work, &stop, life.next_delay(), urls) {
            break;
        }
    }
    work.finish();
    log::info!("amqp {} worker stopped", W::LINK.as_str());
}

/// Waits `delay` before reconnecting, or less if a broker port that was closed reopens;
/// false when asked to stop.
fn wait_to_retry<W: LinkWork>(work: &mut W, stop: &StopSignal, delay: Duration, urls: &[BrokerUrl]) -> bool {
    let deadline = Instant::now() + delay;
    let mut watch = PortWatch::start(urls);
    loop {
        if !work.pause(deadline.min(watch.next_probe()), stop) {
            return false;
        }
        if Instant::now() >= deadline || watch.reopened() {
            return true;
        }
    }
}

/// Records connection.blocked / unblocked; `Err` when the notification stream ended, which
/// means the connection is gone.
pub fn track_blocked(
    link: &LinkState,
    notification: Result<ConnectionBlockedNotification, RecvError>,
) -> Result<(), AmqpError> {
    match notification {
        Ok(ConnectionBlockedNotification::Blocked(reason)) => link.set_blocked(true, &reason),
        Ok(ConnectionBlockedNotification::Unblocked) => link.set_blocked(false, ""),
        Err(_) => return Err(AmqpError::Lost("the connection's I/O thread ended".into())),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;

    /// Panics while serving its first connection, then serves normally until stopped; tells
    /// the test the link's status as each connection begins.
    struct PanicsOnce {
        statuses: Sender<LinkStatus>,
        link: Arc<LinkState>,
        panicked: bool,
    }

    impl LinkWork for PanicsOnce {
        const LINK: Link = Link::Consumer;

        fn serve(
            &mut self,
            _: &mut Connection,
            _: &BrokerUrl,
            stop: &StopSignal,
            life: &mut LinkLife,
        ) -> Result<(), AmqpError> {
            let _ = self.statuses.send(self.link.status());
            life.up("(test)");
            if !std::mem::replace(&mut self.panicked, true) {
                panic!("boom");
            }
            let _ = stop.recv();
            Ok(())
        }
    }

    #[test]
    fn a_panicking_worker_reports_its_link_down_and_starts_over() {
        let url =
            std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
        let mut config = Config::default();
        config.amqp.urls = vec![url.parse().expect("AMQP_URL is a valid URL")];
        config.amqp.reconnect_initial_ms = 10;
        config.amqp.reconnect_max_ms = 20;
        let metrics = Arc::new(Metrics::new());
        let link = Arc::new(LinkState::new(Link::Consumer, &metrics, Default::default()));
        let (sender, statuses) = crossbeam_channel::unbounded();
        let work = PanicsOnce {
            statuses: sender,
            link: Arc::clone(&link),
            panicked: false,
        };
        let context = WorkerContext {
            config: Arc::new(config),
            link: Arc::clone(&link),
            metrics: Arc::clone(&metrics),
        };
        let worker = Worker::spawn(work, context).expect("thread");
        let wait = Duration::from_secs(15);
        let first = statuses.recv_timeout(wait).unwrap_or_else(|_| {
            panic!("the worker never connected: is RabbitMQ running? `rabbitmq-server -detached` starts it")
        });
        assert_eq!(first, LinkStatus::Connecting);
        let second = statuses
            .recv_timeout(wait)
            .expect("the worker starts over after its panic");
        assert_eq!(second, LinkStatus::Down, "the panic was reported as a lost link");
        let text = metrics.render();
        let line = "deskbridge_amqp_worker_panics_total{link=\"consumer\"} 1";
        assert!(text.lines().any(|l| l == line), "no `{line}` in\n{text}");
        let mut worker = worker;
        worker.signal(Instant::now() + wait);
        worker.join(Instant::now() + wait);
    }
}
