//! Who may open a session: the origin check and the session limits (all together, per
//! address). A [`SessionSlot`] is a place under both limits, held for the life of a session.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex, PoisonError};

use crate::metrics::Metrics;

/// Why a handshake was refused before any token was looked at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// `ws.max_sessions` are open.
    Full,
    /// `ws.max_sessions_per_ip` are open from this address.
    PerIp,
}

/// The session counts, shared by every HTTP worker.
#[derive(Debug)]
pub struct Admission {
    metrics: Arc<Metrics>,
    max_sessions: usize,
    max_per_ip: usize,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
}

impl Admission {
    /// Limits of `max_sessions` in all and `max_per_ip` per address.
    pub fn new(metrics: Arc<Metrics>, max_sessions: usize, max_per_ip: usize) -> Self {
        Admission {
            metrics,
            max_sessions,
            max_per_ip,
            per_ip: Mutex::new(HashMap::new()),
        }
    }

    /// Takes a place for a session from `ip` (counted by [`address_key`]), or says which limit
    /// is reached.
    pub fn admit(self: &Arc<Self>, ip: Option<IpAddr>) -> Result<SessionSlot, Refused> {
        let ip = ip.map(address_key);
        if let Some(ip) = ip {
            // The map holds plain counts: a panic elsewhere cannot leave it inconsistent.
            let mut per_ip = self.per_ip.lock().unwrap_or_else(PoisonError::into_inner);
            let count = per_ip.entry(ip).or_default();
            if *count >= self.max_per_ip {
                return Err(Refused::PerIp);
            }
            *count += 1;
        }
        if !self.metrics.try_open_session(self.max_sessions) {
            self.release(ip);
            return Err(Refused::Full);
        }
        Ok(SessionSlot {
            admission: Arc::clone(self),
            ip,
        })
    }

    fn release(&self, ip: Option<IpAddr>) {
        let Some(ip) = ip else { return };
        let mut per_ip = self.per_ip.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = per_ip.get_mut(&ip) {
            *count -= 1;
            if *count == 0 {
                per_ip.remove(&ip);
            }
        }
    }
}

/// A place under the session limits, given back on drop, even when the upgrade fails before
/// the session starts.
#[derive(Debug)]
pub struct SessionSlot {
    admission: Arc<Admission>,
    ip: Option<IpAddr>,
}

impl Drop for SessionSlot {
    fn drop(&mut self) {
        self.admission.metrics.session_closed();
        self.admission.release(self.ip);
    }
}

/// The address `ws.max_sessions_per_ip` counts `ip` under: an IPv4 address alone, an IPv6
/// address by its /64. One subscriber gets at least a /64 from its provider, so counting each
/// IPv6 address alone would give one attacker 2^64 shares. An IPv4-mapped IPv6 address (a
/// dual-stack socket's IPv4 peer) counts as its IPv4 address.
pub fn address_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from_bits(v6.to_bits() & !u128::from(u64::MAX))),
        },
    }
}

/// Whether a page from `origin` may open a session on a bridge reached as `host`:
/// `allowed = []` only the bridge's own origin (same host and port), `["*"]` any, otherwise
/// one of the listed origins exactly. `origin = None` is not a browser, and is allowed.
pub fn origin_allowed(origin: Option<&str>, host: Option<&str>, allowed: &[String]) -> bool {
    let Some(origin) = origin else { return true };
    match allowed {
        [only] if only == "*" => true,
        [] => host.is_some_and(|host| same_host(origin, host)),
        list => list.iter().any(|allowed| {
            allowed
                .trim_end_matches('/')
                .eq_ignore_ascii_case(origin.trim_end_matches('/'))
        }),
    }
}

/// True when `origin` (scheme://host[:port]) names the same host and port as a `Host` header.
fn same_host(origin: &str, host: &str) -> bool {
    let Ok(origin) = url::Url::parse(origin) else {
        return false;
    };
    let (Some(origin_host), Some(origin_port)) = (origin.host_str(), origin.port_or_known_default()) else {
        return false;
    };
    // The Host header has no scheme: "h" or "h:port", "[::1]:port" for IPv6.
    let Ok(host) = url::Url::parse(&format!("{}://{host}", origin.scheme())) else {
        return false;
    };
    host.host_str()
        .is_some_and(|h| h.eq_ignore_ascii_case(origin_host))
        && host.port_or_known_default() == Some(origin_port)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_are_checked_against_the_host_or_the_list() {
        let none: &[String] = &[];
        let star = ["*".to_string()];
        let listed = ["https://desk.example.com".to_string()];
        // (Origin, Host, ws.allowed_origins, allowed?)
        type Case<'a> = (Option<&'a str>, Option<&'a str>, &'a [String], bool);
        let cases: [Case; 11] = [
            (None, Some("h:8080"), none, true),
            (Some("http://127.0.0.1:8080"), Some("127.0.0.1:8080"), none, true),
            (Some("http://127.0.0.1:9090"), Some("127.0.0.1:8080"), none, false),
            (Some("https://evil.example"), Some("127.0.0.1:8080"), none, false),
            (
                Some("https://desk.example.com"),
                Some("desk.example.com"),
                none,
                true,
            ),
            (Some("http://[::1]:8080"), Some("[::1]:8080"), none, true),
            (Some("null"), Some("h:8080"), none, false),
            (Some("https://evil.example"), Some("h"), &star, true),
            (
                Some("https://desk.example.com"),
                Some("bridge:8080"),
                &listed,
                true,
            ),
            (
                Some("https://DESK.example.com/"),
                Some("bridge:8080"),
                &listed,
                true,
            ),
            (Some("https://evil.example"), Some("bridge:8080"), &listed, false),
        ];
        for (origin, host, allowed, expected) in cases {
            assert_eq!(
                origin_allowed(origin, host, allowed),
                expected,
                "{origin:?} via {host:?} with {allowed:?}"
            );
        }
    }

    #[test]
    fn ipv6_addresses_count_by_their_64_and_ipv4_alone() {
        let key = |text: &str| address_key(text.parse().expect("an address")).to_string();
        let cases = [
            ("10.0.0.1", "10.0.0.1"),
            ("10.0.0.2", "10.0.0.2"),
            ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::"),
            ("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::"),
            ("2001:db8:1:3::1", "2001:db8:1:3::"),
            ("::1", "::"),
            ("::ffff:192.0.2.7", "192.0.2.7"),
        ];
        for (ip, expected) in cases {
            assert_eq!(key(ip), expected, "{ip}");
        }
        let admission = Arc::new(Admission::new(Arc::new(Metrics::new()), 10, 2));
        let ip = |text: &str| Some(text.parse::<IpAddr>().expect("an address"));
        let _a = admission.admit(ip("2001:db8::1")).expect("1st of the /64");
        let _b = admission.admit(ip("2001:db8::2")).expect("2nd of the /64");
        assert_eq!(
            admission.admit(ip("2001:db8::ffff:3")).err(),
            Some(Refused::PerIp),
            "a third address of the same /64"
        );
        admission.admit(ip("2001:db8:0:1::1")).expect("another /64");
    }

    #[test]
    fn limits_count_per_address_and_in_all() {
        let admission = Arc::new(Admission::new(Arc::new(Metrics::new()), 3, 2));
        let a: IpAddr = [10, 0, 0, 1].into();
        let b: IpAddr = [10, 0, 0, 2].into();
        let first = admission.admit(Some(a)).expect("1st from a");
        let _second = admission.admit(Some(a)).expect("2nd from a");
        assert_eq!(admission.admit(Some(a)).err(), Some(Refused::PerIp));
        let _third = admission.admit(Some(b)).expect("1st from b");
        assert_eq!(admission.admit(Some(b)).err(), Some(Refused::Full));
        drop(first);
        admission.admit(Some(a)).expect("a place from a is free again");
    }
}
