//! The `Host` a handshake names, on a bridge bound to a loopback address: a page served from a
//! domain that an attacker's DNS now resolves to 127.0.0.1 (DNS rebinding) reaches the bridge
//! with its own origin, which passes the origin check; only its `Host` gives it away.

use std::net::{Ipv4Addr, Ipv6Addr};

/// Whether a bridge bound to a loopback address may be reached as `host` (a `Host` header,
/// `name[:port]`): a loopback name or address (`localhost`, 127.0.0.0/8, `[::1]`, any port), or
/// a name listed in `ws.allowed_hosts`. Anything else is a page whose domain now resolves to
/// 127.0.0.1 (DNS rebinding): its own origin would pass the origin check.
pub fn host_allowed(host: &str, allowed: &[String]) -> bool {
    let Some((name, port)) = split_host(host) else {
        return false;
    };
    is_loopback_name(name)
        || allowed.iter().any(|entry| {
            split_host(entry).is_some_and(|(listed, listed_port)| {
                listed.eq_ignore_ascii_case(name) && (listed_port.is_none() || listed_port == port)
            })
        })
}

/// True for `localhost` and loopback addresses (IPv6 without its brackets).
fn is_loopback_name(name: &str) -> bool {
    if name.eq_ignore_ascii_case("localhost") {
        return true;
    }
    if let Ok(v4) = name.parse::<Ipv4Addr>() {
        return v4.is_loopback();
    }
    name.parse::<Ipv6Addr>()
        .is_ok_and(|v6| v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()))
}

/// `name[:port]` or `[v6][:port]` split into the name (brackets dropped) and the port; `None`
/// when it is neither (an empty name, a port that is not a number, user info, a path...).
pub fn split_host(host: &str) -> Option<(&str, Option<u16>)> {
    let (name, port) = match host.strip_prefix('[') {
        Some(rest) => {
            let (v6, after) = rest.split_once(']')?;
            v6.parse::<Ipv6Addr>().ok()?;
            match after {
                "" => (v6, None),
                _ => (v6, Some(after.strip_prefix(':')?)),
            }
        }
        None => match host.split_once(':') {
            Some((name, port)) => (name, Some(port)),
            None => (host, None),
        },
    };
    let port = match port {
        Some(port) if port.bytes().all(|b| b.is_ascii_digit()) => Some(port.parse().ok()?),
        Some(_) => return None,
        None => None,
    };
    let name_ok = host.starts_with('[')
        || (!name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_'));
    name_ok.then_some((name, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts_and_listed_ones_are_allowed() {
        let none: &[String] = &[];
        let listed = ["desk.internal".to_string(), "bridge.internal:8443".to_string()];
        let cases: [(&str, &[String], bool); 20] = [
            ("localhost", none, true),
            ("localhost:8080", none, true),
            ("LOCALHOST:8080", none, true),
            ("127.0.0.1:8080", none, true),
            ("127.9.8.7", none, true),
            ("[::1]:8080", none, true),
            ("[::1]", none, true),
            ("[::ffff:127.0.0.1]:80", none, true),
            ("evil.example:8080", none, false),
            ("localhost.evil.example", none, false),
            ("localhost@evil.example", none, false),
            ("10.0.0.1:8080", none, false),
            ("[2001:db8::1]:8080", none, false),
            ("localhost:http", none, false),
            ("", none, false),
            ("desk.internal:9000", &listed, true),
            ("Desk.Internal", &listed, true),
            ("bridge.internal:8443", &listed, true),
            ("bridge.internal:8080", &listed, false),
            ("bridge.internal", &listed, false),
        ];
        for (host, allowed, expected) in cases {
            assert_eq!(host_allowed(host, allowed), expected, "{host} with {allowed:?}");
        }
    }
}
