//! Notices when a broker that was unreachable starts accepting TCP connections again.
//!
//! Reconnect backoff grows to `reconnect_max_ms` (10 s by default), but once a broker is back
//! the bridge should be too, within a second. While a worker waits out a delay, it probes the
//! brokers' TCP ports every [`PROBE_EVERY`]; when a port that was closed when the wait began
//! starts accepting, the wait ends early. A port that was already open (the failure was AMQP
//! level: credentials, a precondition) never shortcuts the backoff, so nothing is hammered.

use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crate::broker_url::BrokerUrl;

/// How often closed ports are probed during a wait.
pub const PROBE_EVERY: Duration = Duration::from_millis(250);
const CONNECT_TIMEOUT: Duration = Duration::from_millis(200);

/// The broker ports that were closed when a wait began.
pub struct PortWatch {
    closed: Vec<SocketAddr>,
    next_probe: Instant,
}

impl PortWatch {
    /// Probes every URL's port once and remembers the closed ones.
    pub fn start(urls: &[BrokerUrl]) -> PortWatch {
        let closed = urls
            .iter()
            .filter_map(|url| url.socket_addrs().ok()?.next())
            .filter(|addr| !accepts(addr))
            .collect();
        PortWatch {
            closed,
            next_probe: Instant::now() + PROBE_EVERY,
        }
    }

    /// When the next probe is due; wait no longer than this between checks.
    pub fn next_probe(&self) -> Instant {
        self.next_probe
    }

    /// True when a port that was closed accepts connections now (probes only when due).
    pub fn reopened(&mut self) -> bool {
        if self.closed.is_empty() || Instant::now() < self.next_probe {
            return false;
        }
        self.next_probe = Instant::now() + PROBE_EVERY;
        self.closed.iter().any(accepts)
    }
}

fn accepts(addr: &SocketAddr) -> bool {
    TcpStream::connect_timeout(addr, CONNECT_TIMEOUT).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(port: u16) -> BrokerUrl {
        BrokerUrl::parse(&format!("amqp://127.0.0.1:{port}/%2f")).expect("valid URL")
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .map(|addr| addr.port())
            .expect("a free port")
    }

    #[test]
    fn a_port_that_starts_listening_ends_the_wait() {
        let port = free_port();
        let mut watch = PortWatch::start(&[url(port)]);
        assert!(!watch.reopened(), "nothing listens yet");
        let _listener = std::net::TcpListener::bind(("127.0.0.1", port)).expect("listen");
        let deadline = Instant::now() + Duration::from_secs(5);
        while !watch.reopened() {
            assert!(Instant::now() < deadline, "the reopened port was never noticed");
            std::thread::sleep(watch.next_probe().saturating_duration_since(Instant::now()));
        }
    }

    #[test]
    fn a_port_open_from_the_start_never_shortcuts_the_backoff() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("listen");
        let port = listener.local_addr().expect("addr").port();
        let mut watch = PortWatch::start(&[url(port)]);
        // Not a wait for luck: a probe runs only once due, so let one fall due, then check
        // that an open-from-the-start port never ends the wait.
        std::thread::sleep(PROBE_EVERY);
        assert!(!watch.reopened());
    }
}
