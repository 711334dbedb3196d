//! `deskbridge health`: the binary probes its own HTTP endpoint, so that a container image
//! without curl can still carry a `HEALTHCHECK` (and an exec probe) that asks the running
//! bridge rather than merely checking that a process exists.
//!
//! The probe connects over loopback to the port of the configured `bind` (an unspecified
//! address such as `0.0.0.0` is reached at `127.0.0.1`, `[::]` at `[::1]`), sends one
//! HTTP/1.0 `GET` and succeeds only on status 200.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::time::Duration;

/// Why the probe failed; each says what was tried.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// `bind` is not an address (config validation normally catches this first).
    #[error("bind `{0}` is not an IP:port address")]
    Address(String),
    /// Nothing accepted the connection: the bridge is not listening (yet).
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// Where the probe connected.
        addr: SocketAddr,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The connection broke or timed out mid-request.
    #[error("GET {path} on {addr}: {source}")]
    Io {
        /// Where the probe connected.
        addr: SocketAddr,
        /// The probed path.
        path: String,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The bridge answered, but not 200.
    #[error("GET {path} on {addr} answered `{status}`")]
    Status {
        /// Where the probe connected.
        addr: SocketAddr,
        /// The probed path.
        path: String,
        /// The response's status line.
        status: String,
    },
}

/// Where a probe of a bridge bound to `bind` connects: the same port, over loopback when the
/// bind address is unspecified.
pub fn target(bind: &str) -> Result<SocketAddr, ProbeError> {
    let mut addr: SocketAddr = bind.parse().map_err(|_| ProbeError::Address(bind.to_owned()))?;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr.ip() {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
        });
    }
    Ok(addr)
}

/// `GET path` on `addr`; `Ok` only for status 200. `timeout` bounds the connect and each read
/// and write, so a hung bridge fails the probe instead of hanging it.
pub fn get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<(), ProbeError> {
    let mut stream =
        TcpStream::connect_timeout(&addr, timeout).map_err(|source| ProbeError::Connect { addr, source })?;
    let io = |source| ProbeError::Io {
        addr,
        path: path.to_owned(),
        source,
    };
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").map_err(io)?;
    // The status line is all the probe needs; the body (a small JSON) is read and dropped.
    let mut response = Vec::new();
    stream.read_to_end(&mut response).map_err(io)?;
    let text = String::from_utf8_lossy(&response);
    let status = text.lines().next().unwrap_or_default();
    match status.split_whitespace().nth(1) {
        Some("200") => Ok(()),
        _ => Err(ProbeError::Status {
            addr,
            path: path.to_owned(),
            status: status.to_owned(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_probe_reaches_an_unspecified_bind_over_loopback_and_keeps_a_specific_one() {
        for (bind, expected) in [
            ("0.0.0.0:8080", "127.0.0.1:8080"),
            ("[::]:9000", "[::1]:9000"),
            ("127.0.0.1:8080", "127.0.0.1:8080"),
            ("10.1.2.3:80", "10.1.2.3:80"),
        ] {
            assert_eq!(target(bind).expect("an address").to_string(), expected, "{bind}");
        }
        assert!(matches!(target("localhost:8080"), Err(ProbeError::Address(_))));
    }
}
