//! [`BrokerUrl`]: an `amqp://` or `amqps://` URL parsed once, the one type every part of the
//! bridge uses for a broker's address (connecting, probing its port, logging it without the
//! password).

use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;

/// How long a TCP connect may take when the URL does not say (`connection_timeout`): an
/// unreachable (blackholed) host must not stall a reconnect for the OS's ~2 minutes.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Heartbeat when the URL does not say: a broker that vanishes without closing TCP is noticed
/// within ~20 s instead of amiquip's 60 s.
pub const HEARTBEAT_SECS: u16 = 10;

/// An `amqp://user:pass@host:port/vhost?heartbeat=N&connection_timeout=MS&channel_max=N` URL,
/// read the way amiquip reads it (percent-decoded vhost and credentials, port 5672 by default),
/// or the same with `amqps://` (TLS, port 5671 by default).
/// `Display` shows it with the password masked, so it is safe in logs and `/health`.
#[derive(Clone, PartialEq, Deserialize)]
#[serde(try_from = "String")]
pub struct BrokerUrl {
    /// Host name or address, without IPv6 brackets.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// `amqps://`: TLS, with the broker's certificate verified against `host`.
    pub tls: bool,
    /// Virtual host; `None` means the broker's default (`/`).
    pub vhost: Option<String>,
    /// (user, password); `None` means guest/guest.
    pub credentials: Option<(String, String)>,
    /// AMQP heartbeat in seconds.
    pub heartbeat: u16,
    /// Limit for the TCP connect and the AMQP handshake.
    pub connection_timeout: Duration,
    /// Channel limit to negotiate, if the URL sets one.
    pub channel_max: Option<u16>,
    /// The URL as written with its password masked.
    redacted: String,
    /// The URL as written.
    text: String,
}

/// Why a text is not a usable broker URL.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("`{url}` {reason}")]
pub struct BadBrokerUrl {
    /// The URL, password masked.
    pub url: String,
    /// What is wrong with it.
    pub reason: String,
}

impl BrokerUrl {
    /// Parses a URL, or says what is wrong with it.
    pub fn parse(text: &str) -> Result<BrokerUrl, BadBrokerUrl> {
        parse(text).map_err(|reason| BadBrokerUrl {
            url: redact(text),
            reason,
        })
    }

    /// The URL as written, password included: for writing configuration, never for a log.
    pub fn reveal(&self) -> &str {
        &self.text
    }

    /// The addresses `host:port` resolves to.
    pub fn socket_addrs(&self) -> std::io::Result<impl Iterator<Item = SocketAddr>> {
        (self.host.as_str(), self.port).to_socket_addrs()
    }
}

fn parse(text: &str) -> Result<BrokerUrl, String> {
    let url = url::Url::parse(text).map_err(|e| format!("is not a URL: {e}"))?;
    let tls = match url.scheme() {
        "amqp" => false,
        "amqps" => true,
        _ => return Err("must start with amqp:// or amqps://".into()),
    };
    let host = url.host_str().filter(|h| !h.is_empty()).ok_or("has no host")?;
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8_lossy()
            .into_owned()
    };
    let mut segments: Vec<&str> = url.path_segments().map(|s| s.collect()).unwrap_or_default();
    segments.retain(|s| !s.is_empty());
    if segments.len() > 1 {
        return Err("has more than one path segment (the vhost); encode `/` as %2f".into());
    }
    let credentials = (!url.username().is_empty() || url.password().is_some()).then(|| {
        let user = match url.username() {
            "" => "guest",
            user => user,
        };
        (decode(user), decode(url.password().unwrap_or("guest")))
    });
    let mut parsed = BrokerUrl {
        host: host.trim_matches(['[', ']']).to_owned(),
        port: url.port().unwrap_or(if tls { 5671 } else { 5672 }),
        tls,
        vhost: segments.first().map(|v| decode(v)),
        credentials,
        heartbeat: HEARTBEAT_SECS,
        connection_timeout: CONNECT_TIMEOUT,
        channel_max: None,
        redacted: redact(text),
        text: text.to_owned(),
    };
    for (key, value) in url.query_pairs() {
        let number = || {
            value
                .parse::<u64>()
                .map_err(|_| format!("has a non-numeric {key} `{value}`"))
        };
        let small = |n: u64| u16::try_from(n).map_err(|_| format!("has {key} above 65535"));
        match key.as_ref() {
            "heartbeat" => parsed.heartbeat = small(number()?)?,
            "channel_max" => parsed.channel_max = Some(small(number()?)?),
            "connection_timeout" => parsed.connection_timeout = Duration::from_millis(number()?),
            other => return Err(format!("has an unsupported parameter `{other}`")),
        }
    }
    Ok(parsed)
}

/// The URL with the password replaced by `***`; works on any text, parsable or not, so that
/// even a refused URL can be shown.
fn redact(url: &str) -> String {
    mask_passwords(url)
}

/// `text` with the password of every `scheme://user:password@host` in it replaced by `***`
/// (a user alone is shown as `user:***` too, so nobody can tell whether a password was set).
pub fn mask_passwords(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(scheme_end) = rest.find("://") {
        let (head, tail) = rest.split_at(scheme_end + 3);
        out.push_str(head);
        let authority_end = tail
            .find(|c: char| "/?#\"',".contains(c) || c.is_whitespace())
            .unwrap_or(tail.len());
        let authority = &tail[..authority_end];
        match authority.rfind('@') {
            Some(at) => {
                let user = authority[..at].split(':').next().unwrap_or_default();
                out.push_str(user);
                out.push_str(":***");
                out.push_str(&authority[at..]);
            }
            None => out.push_str(authority),
        }
        rest = &tail[authority_end..];
    }
    out.push_str(rest);
    out
}

/// Like `Display`: a `{:?}` of a config must not print a password either.
impl fmt::Debug for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BrokerUrl({})", self.redacted)
    }
}

impl fmt::Display for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted)
    }
}

impl FromStr for BrokerUrl {
    type Err = BadBrokerUrl;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        BrokerUrl::parse(text)
    }
}

impl TryFrom<String> for BrokerUrl {
    type Error = BadBrokerUrl;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        BrokerUrl::parse(&text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_reach_logs() {
        let cases = [
            (
                "amqp://guest:secret@host:5672/%2f",
                "amqp://guest:***@host:5672/%2f",
            ),
            ("amqp://host:5672", "amqp://host:5672"),
            ("amqp://u@host", "amqp://u:***@host"),
        ];
        for (url, expected) in cases {
            let parsed = BrokerUrl::parse(url).expect("valid");
            assert_eq!(parsed.to_string(), expected);
        }
        let refused = BrokerUrl::parse("http://u:secret@host").expect_err("wrong scheme");
        assert!(!refused.to_string().contains("secret"), "{refused}");
        assert_eq!(
            mask_passwords(r#"urls = ["amqp://a:p1@h/%2f", "amqp://b:p2@k"] # amqp://h"#),
            r#"urls = ["amqp://a:***@h/%2f", "amqp://b:***@k"] # amqp://h"#
        );
    }

    #[test]
    fn amqps_means_tls_on_5671_unless_the_url_says_otherwise() {
        let cases = [
            ("amqps://rabbit", true, 5671),
            ("amqps://u:secret@rabbit:6000/%2f", true, 6000),
            ("amqp://rabbit", false, 5672),
            ("amqp://rabbit:5671", false, 5671),
        ];
        for (text, tls, port) in cases {
            let url = BrokerUrl::parse(text).expect(text);
            assert_eq!((url.tls, url.port), (tls, port), "{text}");
            assert!(!url.to_string().contains("secret"), "{url}");
        }
        let refused = BrokerUrl::parse("amqpx://u:secret@h").expect_err("unknown scheme");
        assert!(refused.to_string().contains("amqps://"), "{refused}");
        assert!(!refused.to_string().contains("secret"), "{refused}");
    }

    #[test]
    fn broker_urls_parse_like_amiquip() {
        let url: BrokerUrl = "amqp://us%40er:p%3Ass@rabbit:5673/%2f?heartbeat=3&connection_timeout=250"
            .parse()
            .expect("valid");
        assert_eq!((url.host.as_str(), url.port), ("rabbit", 5673));
        assert_eq!(url.vhost.as_deref(), Some("/"));
        assert_eq!(url.credentials, Some(("us@er".into(), "p:ss".into())));
        assert_eq!(
            (url.heartbeat, url.connection_timeout),
            (3, Duration::from_millis(250))
        );
        let defaults = BrokerUrl::parse("amqp://127.0.0.1").expect("valid");
        assert_eq!(
            (defaults.port, defaults.vhost, defaults.credentials),
            (5672, None, None)
        );
        assert_eq!(
            (defaults.heartbeat, defaults.connection_timeout),
            (HEARTBEAT_SECS, CONNECT_TIMEOUT)
        );
        let ipv6 = BrokerUrl::parse("amqp://[::1]:5673").expect("valid");
        assert!(!ipv6.tls);
        assert_eq!((ipv6.host.as_str(), ipv6.port), ("::1", 5673));
        for bad in [
            "http://h",
            "amqp://",
            "amqp://h/a/b",
            "amqp://h?heartbeat=x",
            "amqp://h?heartbeat=70000",
            "amqp://h?frame_max=1",
        ] {
            assert!(BrokerUrl::parse(bad).is_err(), "{bad}");
        }
    }
}
