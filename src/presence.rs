//! Presence on the broker: the messages every instance publishes to `amqp.presence_exchange`
//! (a topic exchange) and reads back from the others.
//!
//! `session.connected`, `session.subscribed`, `session.unsubscribed` and `session.disconnected`
//! carry a [`SessionChange`]; `desks` is what the change is about (the desks just subscribed or
//! left; all of them on disconnect). `instance.heartbeat` carries an instance's whole view
//! ([`Heartbeat`]) every `presence.heartbeat_ms`, so that a reader can rebuild it after a lost
//! message and drop an instance that went silent; `instance.stopped` says one shut down.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Binding key for every session change.
pub const SESSION_KEYS: &str = "session.*";
/// Binding key for every instance message.
pub const INSTANCE_KEYS: &str = "instance.*";
/// Routing key of an instance's heartbeat.
pub const KEY_HEARTBEAT: &str = "instance.heartbeat";
/// Routing key of an instance's last word.
pub const KEY_STOPPED: &str = "instance.stopped";

/// What happened to a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// It was admitted (signed in, with auth).
    Connected,
    /// It subscribed to `desks`.
    Subscribed,
    /// It left `desks`.
    Unsubscribed,
    /// It ended; `desks` are the ones it had.
    Disconnected,
}

impl Change {
    /// The routing key it is published with.
    pub fn key(self) -> &'static str {
        match self {
            Change::Connected => "session.connected",
            Change::Subscribed => "session.subscribed",
            Change::Unsubscribed => "session.unsubscribed",
            Change::Disconnected => "session.disconnected",
        }
    }

    fn from_key(key: &str) -> Option<Change> {
        [
            Change::Connected,
            Change::Subscribed,
            Change::Unsubscribed,
            Change::Disconnected,
        ]
        .into_iter()
        .find(|change| change.key() == key)
    }
}

/// Why a session left desks or ended (`reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// The browser closed or lost its socket.
    Closed,
    /// The bridge closed it for reading too slowly (1013).
    Slow,
    /// A refreshed token no longer allows the desks.
    Permission,
    /// The desk's history could not be read for it; it reconnects to resume.
    HistoryUnavailable,
    /// Its instance shut down.
    Shutdown,
}

/// Body of a `session.*` message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionChange {
    /// Session id (the browser's `welcome.session`, the desktop's `x-session`).
    pub session: Uuid,
    /// The token's `sub`, with auth.
    pub user: Option<String>,
    /// The desks the change is about.
    pub desks: Vec<String>,
    /// The instance the session is connected to.
    pub instance: String,
    /// Why it left or ended; none for a browser's own `subscribe` and `unsubscribe`.
    pub reason: Option<Reason>,
    /// When, in Unix milliseconds.
    pub at: u64,
}

/// One session in a [`Heartbeat`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Member {
    /// Session id.
    pub session: Uuid,
    /// The token's `sub`, with auth.
    pub user: Option<String>,
    /// Its desks.
    pub desks: Vec<String>,
}

/// Body of `instance.heartbeat`: everything the instance has, so it replaces what a reader knew.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// The instance.
    pub instance: String,
    /// When, in Unix milliseconds.
    pub at: u64,
    /// Its `presence.heartbeat_ms`: silent for 3 × this, it is gone.
    pub heartbeat_ms: u64,
    /// Its admitted sessions.
    pub sessions: Vec<Member>,
}

/// Body of `instance.stopped`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stopped {
    /// The instance.
    pub instance: String,
    /// When, in Unix milliseconds.
    pub at: u64,
}

/// A presence message read from the exchange.
#[derive(Debug, Clone, PartialEq)]
pub enum Notice {
    /// A session changed.
    Session(Change, SessionChange),
    /// An instance is alive, with all its sessions.
    Heartbeat(Heartbeat),
    /// An instance shut down.
    Stopped(Stopped),
}

impl Notice {
    /// The instance it comes from.
    pub fn instance(&self) -> &str {
        match self {
            Notice::Session(_, change) => &change.instance,
            Notice::Heartbeat(heartbeat) => &heartbeat.instance,
            Notice::Stopped(stopped) => &stopped.instance,
        }
    }
}

/// Why a message on the presence exchange was not understood.
#[derive(Debug, thiserror::Error)]
pub enum PresenceError {
    /// Published with a key this version does not know.
    #[error("unknown presence routing key `{0}`")]
    UnknownKey(String),
    /// The body does not match its key.
    #[error("presence message `{key}` has a bad body: {source}")]
    BadBody {
        /// Its routing key.
        key: String,
        /// What serde found.
        source: serde_json::Error,
    },
}

/// Reads a message from the presence exchange.
pub fn parse(key: &str, body: &[u8]) -> Result<Notice, PresenceError> {
    let bad = |source| PresenceError::BadBody {
        key: key.to_owned(),
        source,
    };
    match key {
        KEY_HEARTBEAT => serde_json::from_slice(body).map(Notice::Heartbeat).map_err(bad),
        KEY_STOPPED => serde_json::from_slice(body).map(Notice::Stopped).map_err(bad),
        _ => match Change::from_key(key) {
            Some(change) => serde_json::from_slice(body)
                .map(|body| Notice::Session(change, body))
                .map_err(bad),
            None => Err(PresenceError::UnknownKey(key.to_owned())),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_change_reads_back_as_published() {
        let change = SessionChange {
            session: Uuid::new_v4(),
            user: Some("alice".into()),
            desks: vec!["A".into()],
            instance: "i1".into(),
            reason: Some(Reason::Slow),
            at: 1,
        };
        let body = serde_json::to_vec(&change).expect("serializes");
        let text = String::from_utf8(body.clone()).expect("JSON is UTF-8");
        assert!(text.contains(r#""reason":"slow""#), "{text}");
        let notice = parse(Change::Disconnected.key(), &body).expect("parses");
        assert_eq!(notice, Notice::Session(Change::Disconnected, change));
    }

    #[test]
    fn unknown_keys_and_bad_bodies_are_errors() {
        assert!(matches!(
            parse("session.teleported", b"{}"),
            Err(PresenceError::UnknownKey(_))
        ));
        let error = parse(KEY_HEARTBEAT, b"not json").expect_err("garbage");
        assert!(error.to_string().contains("instance.heartbeat"), "{error}");
        assert!(parse("session.connected", br#"{"session":"x"}"#).is_err());
    }
}
