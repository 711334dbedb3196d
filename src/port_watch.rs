//! Notices when a broker that was unreachable starts accepting TCP connections again.
//!
//! Reconnect backoff grows to `reconnect_max_ms` (10 s by default), but once a broker is back
//! the bridge should be too, within a second. While a worker waits out a delay, it probes the
//! brokers' TCP ports every [`PROBE_EVERY`]; when a port that was closed when the wait began
//! starts accepting, the wait ends early. A port that was already open (the failure was AMQP
//! level: credentials, a precondition) never shortcuts the backoff, so nothing is hammered.

use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

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
    pub fn start(urls: &[String]) -> PortWatch {
        let closed = urls
            .iter()
            .filter_map(|url| broker_addr(url))
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

/// `host:port` of an `amqp://user:pass@host:port/vhost?query` URL (port 5672 when absent).
fn broker_addr(url: &str) -> Option<SocketAddr> {
    let rest = url.strip_prefix("amqp://")?;
    let authority = rest.split(['/', '?']).next()?;
    let host_port = authority.rsplit('@').next()?;
    let with_port = if host_port
        .rsplit_once(':')
        .is_some_and(|(_, port)| port.parse::<u16>().is_ok())
    {
        host_port.to_owned()
    } else {
        format!("{host_port}:5672")
    };
    with_port.to_socket_addrs().ok()?.next()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_addresses_come_from_urls() {
        let cases = [
            ("amqp://guest:guest@127.0.0.1:5672/%2f", Some("127.0.0.1:5672")),
            ("amqp://127.0.0.1/%2f?heartbeat=5", Some("127.0.0.1:5672")),
            ("amqp://u:p@127.0.0.1:1", Some("127.0.0.1:1")),
            ("http://127.0.0.1", None),
        ];
        for (url, expected) in cases {
            assert_eq!(
                broker_addr(url).map(|a| a.to_string()).as_deref(),
                expected,
                "{url}"
            );
        }
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
        let mut watch = PortWatch::start(&[format!("amqp://127.0.0.1:{port}/%2f")]);
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
        let mut watch = PortWatch::start(&[format!("amqp://127.0.0.1:{port}/%2f")]);
        // Not a wait for luck: a probe runs only once due, so let one fall due, then check
        // that an open-from-the-start port never ends the wait.
        std::thread::sleep(PROBE_EVERY);
        assert!(!watch.reopened());
    }
}
