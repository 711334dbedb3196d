//! The WebSocket wire protocol: JSON text frames, one object each, tagged by `op`.
//!
//! [`ClientFrame`] is what a browser sends, [`ServerFrame`] what it receives. A frame is parsed
//! once, here, at the session edge; the router only ever sees typed values. Parsing takes the
//! fast typed path first and diagnoses (to pick the right [`ErrorCode`]) only on failure.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;
use uuid::Uuid;

use crate::lane::Frame;
use crate::transform::Data;

/// A frame from a browser.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ClientFrame {
    /// Start receiving the events of these desks.
    Subscribe {
        /// Desk names.
        desks: Vec<String>,
        /// Where to start, per desk (with history on): after an offset, or the last K events.
        #[serde(default)]
        since: Option<BTreeMap<String, Since>>,
        /// Also get `join` / `leave` when sessions (on any instance) come and go on these desks.
        #[serde(default)]
        presence: bool,
        /// Client's correlation id, echoed in the answer.
        #[serde(rename = "ref", default, deserialize_with = "reference")]
        reference: Option<String>,
    },
    /// Stop receiving the events of these desks.
    Unsubscribe {
        /// Desk names.
        desks: Vec<String>,
        /// Client's correlation id, echoed in the answer.
        #[serde(rename = "ref", default, deserialize_with = "reference")]
        reference: Option<String>,
    },
    /// Publish an event for a desk to the desktop apps (and the desk's other browsers).
    Publish {
        /// Desk name.
        desk: String,
        /// Event name.
        event: String,
        /// Event payload; must be a JSON object.
        data: Data,
        /// Client's correlation id, echoed in the `ack` or `error`.
        #[serde(rename = "ref", default, deserialize_with = "reference")]
        reference: Option<String>,
        /// Milliseconds the message stays worth delivering (AMQP `expiration`).
        #[serde(default, deserialize_with = "ttl_ms")]
        ttl_ms: Option<u64>,
    },
    /// Ask the desktop apps of a desk something; the first answer comes back as `reply`.
    Request {
        /// Desk name.
        desk: String,
        /// Event name; the request goes out with the key `{desk}_{event}`.
        event: String,
        /// Request payload; must be a JSON object.
        data: Data,
        /// Client's correlation id, echoed in the `reply` or `error`.
        #[serde(rename = "ref", default, deserialize_with = "reference")]
        reference: Option<String>,
        /// How long to wait for the answer (default 10 000, at most 60 000).
        #[serde(default)]
        timeout_ms: Option<u64>,
        /// Milliseconds the request stays worth answering (AMQP `expiration`).
        #[serde(default, deserialize_with = "ttl_ms")]
        ttl_ms: Option<u64>,
    },
    /// Answer a desktop app's request (an `event` that carried `reply_id`).
    Reply {
        /// The `reply_id` of that event.
        reply_id: String,
        /// Answer payload; must be a JSON object.
        data: Data,
        /// Client's correlation id, echoed in the `ack` or `error`.
        #[serde(rename = "ref", default, deserialize_with = "reference")]
        reference: Option<String>,
    },
    /// Who is subscribed to a desk, on every instance.
    Presence {
        /// Desk name.
        desk: String,
        /// Client's correlation id, echoed in the `presence` or `error`.
        #[serde(rename = "ref", default, deserialize_with = "reference")]
        reference: Option<String>,
    },
    /// Liveness probe; answered with `pong`.
    Ping {
        /// Client's correlation id, echoed in the answer.
        #[serde(rename = "ref", default, deserialize_with = "reference")]
        reference: Option<String>,
    },
    /// The session's token, when it did not come on `?token=` (`auth.mode = "jwt"`).
    Auth {
        /// The JWT.
        token: Token,
        /// Client's correlation id, echoed in the answer.
        #[serde(rename = "ref", default, deserialize_with = "reference")]
        reference: Option<String>,
    },
    /// A newer token for the same user, before the current one expires.
    Refresh {
        /// The JWT.
        token: Token,
        /// Client's correlation id, echoed in the answer.
        #[serde(rename = "ref", default, deserialize_with = "reference")]
        reference: Option<String>,
    },
}

impl ClientFrame {
    /// The frame's `ref`, for an answer that does not come from handling the op itself (a
    /// refusal before `auth`, a full router intake).
    pub fn into_reference(self) -> Option<String> {
        match self {
            ClientFrame::Subscribe { reference, .. }
            | ClientFrame::Unsubscribe { reference, .. }
            | ClientFrame::Publish { reference, .. }
            | ClientFrame::Request { reference, .. }
            | ClientFrame::Reply { reference, .. }
            | ClientFrame::Presence { reference, .. }
            | ClientFrame::Ping { reference }
            | ClientFrame::Auth { reference, .. }
            | ClientFrame::Refresh { reference, .. } => reference,
        }
    }
}

/// The longest `ref` a client op may carry, in characters (spec v3 E).
pub const MAX_REF_CHARS: usize = 128;

/// Whether `reference` is short enough to be echoed.
fn ref_fits(reference: &str) -> bool {
    // Bytes bound characters from above: most refs are decided without counting.
    reference.len() <= MAX_REF_CHARS || reference.chars().count() <= MAX_REF_CHARS
}

/// `ref`, refused while the frame is parsed when it is not a string of at most
/// [`MAX_REF_CHARS`] characters.
fn reference<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<String>, D::Error> {
    match Option::<String>::deserialize(deserializer)? {
        Some(reference) if !ref_fits(&reference) => Err(serde::de::Error::custom(format!(
            "`ref` must be a string of at most {MAX_REF_CHARS} characters"
        ))),
        reference => Ok(reference),
    }
}

/// Where a resumed subscription starts.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged, deny_unknown_fields)]
pub enum Since {
    /// After the event at `offset` of the stream life `epoch` (the last one the browser got).
    After {
        /// The last offset the browser received.
        offset: u64,
        /// The `epoch` that came with it.
        epoch: String,
    },
    /// The last `last` retained events.
    Last {
        /// How many.
        last: usize,
    },
}

/// A JWT as a browser sent it; `Debug` never shows it, so it cannot reach a log.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Token(pub String);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(***)")
    }
}

/// The `op`s a browser may send, for telling `unknown_op` from `bad_request`.
const CLIENT_OPS: [&str; 9] = [
    "subscribe",
    "unsubscribe",
    "publish",
    "request",
    "reply",
    "presence",
    "ping",
    "auth",
    "refresh",
];

/// A request's timeout when it names none.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(10_000);
/// The longest timeout a request may ask for.
pub const MAX_TIMEOUT: Duration = Duration::from_millis(60_000);

/// Close code for a session whose token is missing, invalid or expired.
pub const CLOSE_UNAUTHORIZED: u16 = 4401;

/// Where an event came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    /// Consumed from RabbitMQ.
    Desktop,
    /// Published by another browser, after the broker confirmed it.
    Web,
}

/// Machine-readable error codes sent in `error` frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The frame is not valid JSON.
    BadJson,
    /// Valid JSON but not a valid request: not an object, a missing or ill-typed field, binary frame.
    BadRequest,
    /// `op` names no known operation.
    UnknownOp,
    /// A desk that is not configured.
    UnknownDesk,
    /// An event that is not configured.
    UnknownEvent,
    /// The broker did not take the message (down, buffer full, waited too long, or nacked).
    BrokerUnavailable,
    /// A transform refused the data.
    TransformFailed,
    /// The session sent more frames per second than allowed.
    RateLimited,
    /// A bug or an unexpected state in the bridge.
    Internal,
    /// A request before the session's `auth` frame.
    Unauthenticated,
    /// A missing, invalid or expired token (then close 4401).
    Unauthorized,
    /// The session's token expired (then close 4401).
    TokenExpired,
    /// The token does not grant this on this desk (or a refresh names another user).
    Forbidden,
    /// No queue is bound for a request's key: nobody could answer it.
    NoResponder,
    /// No answer came within the request's `timeout_ms`.
    Timeout,
    /// A `reply` to a `reply_id` that is unknown, expired or already answered.
    UnknownRequest,
    /// The desktop's answer to a request is not a JSON object.
    BadReply,
}

impl ErrorCode {
    /// Every code, in declaration order (metrics iterate over it).
    pub const ALL: [ErrorCode; 17] = [
        ErrorCode::BadJson,
        ErrorCode::BadRequest,
        ErrorCode::UnknownOp,
        ErrorCode::UnknownDesk,
        ErrorCode::UnknownEvent,
        ErrorCode::BrokerUnavailable,
        ErrorCode::TransformFailed,
        ErrorCode::RateLimited,
        ErrorCode::Internal,
        ErrorCode::Unauthenticated,
        ErrorCode::Unauthorized,
        ErrorCode::TokenExpired,
        ErrorCode::Forbidden,
        ErrorCode::NoResponder,
        ErrorCode::Timeout,
        ErrorCode::UnknownRequest,
        ErrorCode::BadReply,
    ];

    /// The wire name, e.g. `bad_json`.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadJson => "bad_json",
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::UnknownOp => "unknown_op",
            ErrorCode::UnknownDesk => "unknown_desk",
            ErrorCode::UnknownEvent => "unknown_event",
            ErrorCode::BrokerUnavailable => "broker_unavailable",
            ErrorCode::TransformFailed => "transform_failed",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Internal => "internal",
            ErrorCode::Unauthenticated => "unauthenticated",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::TokenExpired => "token_expired",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NoResponder => "no_responder",
            ErrorCode::Timeout => "timeout",
            ErrorCode::UnknownRequest => "unknown_request",
            ErrorCode::BadReply => "bad_reply",
        }
    }
}

/// A request the bridge refuses, with what to send back.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    /// Error code for the `error` frame.
    pub code: ErrorCode,
    /// Human-readable explanation.
    pub message: String,
    /// The request's `ref`, when it had a readable one.
    pub reference: Option<String>,
}

impl Refusal {
    /// A refusal with no `ref`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Refusal {
            code,
            message: message.into(),
            reference: None,
        }
    }

    /// This refusal as an `error` frame, framed for the wire.
    pub fn framed(&self) -> Frame {
        self.error_frame().framed()
    }

    fn error_frame(&self) -> ServerFrame<'_> {
        ServerFrame::Error {
            reference: self.reference.as_deref(),
            code: self.code,
            message: &self.message,
        }
    }
}

/// A frame to a browser; borrowed fields so that building one copies nothing.
#[derive(Debug, Serialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ServerFrame<'a> {
    /// First frame of every session.
    Welcome {
        /// Session id, also sent to desktop apps as `x-session`.
        session: &'a str,
        /// Bridge version.
        version: &'a str,
        /// Desks that can be subscribed.
        desks: &'a [String],
        /// The token's `sub` (with `auth.mode = "jwt"`).
        #[serde(skip_serializing_if = "Option::is_none")]
        user: Option<&'a str>,
        /// The token's `exp`, Unix seconds (with `auth.mode = "jwt"`).
        #[serde(skip_serializing_if = "Option::is_none")]
        expires_at: Option<u64>,
        /// The `auth` op's `ref`, when this welcome answers one.
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<&'a str>,
    },
    /// Reply to `subscribe`: the desks of that request.
    Subscribed {
        /// Desk names.
        desks: &'a [String],
        /// Per desk resumed with `since {offset, epoch}`: whether every event after it follows.
        #[serde(skip_serializing_if = "Option::is_none")]
        recovered: Option<&'a BTreeMap<String, bool>>,
        /// Per desk not recovered: the offset delivery starts at (the gap ends before it).
        #[serde(skip_serializing_if = "Option::is_none")]
        first_offset: Option<&'a BTreeMap<String, u64>>,
        /// The op's `ref`, if it had one.
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<&'a str>,
    },
    /// A `latest` desk's session is current again; `dropped` older values were skipped.
    Gap {
        /// Desk name.
        desk: &'a str,
        /// Events replaced by a newer one of the same key while the session was behind.
        dropped: u64,
    },
    /// Reply to `unsubscribe`: the desks of that request; or, with a `reason`, desks the
    /// bridge left for the session.
    Unsubscribed {
        /// Desk names.
        desks: &'a [String],
        /// Why the bridge left them (`permission`: a refreshed token no longer allows them).
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<&'a str>,
        /// The op's `ref`, if it had one.
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<&'a str>,
    },
    /// The session's token expires within a minute: send `refresh`.
    Expiring {
        /// The token's `exp`, Unix seconds.
        expires_at: u64,
    },
    /// Reply to `refresh`.
    Refreshed {
        /// The new token's `exp`, Unix seconds.
        expires_at: u64,
        /// The op's `ref`, if it had one.
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<&'a str>,
    },
    /// The broker confirmed a publish.
    Ack {
        /// The publish's `ref`, if it had one.
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<&'a str>,
        /// The AMQP message_id, equal to the `id` other browsers see.
        id: &'a str,
        /// False when no queue was bound for the routing key (the broker returned it).
        routed: bool,
    },
    /// A request failed.
    Error {
        /// The request's `ref`, if it had one.
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<&'a str>,
        /// Machine-readable code.
        code: ErrorCode,
        /// Human-readable explanation.
        message: &'a str,
    },
    /// The answer to a browser's `request`.
    Reply {
        /// The request's `ref`, if it had one.
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<&'a str>,
        /// The request's id (its AMQP `message_id` and `correlation_id`).
        id: &'a str,
        /// The desktop's answer.
        data: &'a RawValue,
    },
    /// Reply to `presence`: the desk's sessions on every instance.
    Presence {
        /// The query's `ref`, if it had one.
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<&'a str>,
        /// Desk name.
        desk: &'a str,
        /// Who is subscribed.
        sessions: &'a [Present<'a>],
    },
    /// A session subscribed to a desk the receiver watches (`subscribe` with `presence`).
    Join {
        /// Desk name.
        desk: &'a str,
        /// Its session id.
        session: Uuid,
        /// Its user, with auth.
        #[serde(skip_serializing_if = "Option::is_none")]
        user: Option<&'a str>,
    },
    /// A session left a watched desk, or ended (also when its instance was lost).
    Leave {
        /// Desk name.
        desk: &'a str,
        /// Its session id.
        session: Uuid,
        /// Its user, with auth.
        #[serde(skip_serializing_if = "Option::is_none")]
        user: Option<&'a str>,
    },
    /// Reply to `ping`.
    Pong {
        /// The op's `ref`, if it had one.
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<&'a str>,
    },
    /// An event for a subscribed desk.
    Event {
        /// Desk name.
        desk: &'a str,
        /// Event name.
        event: &'a str,
        /// Message id (AMQP message_id); browsers may drop duplicates by it.
        id: &'a str,
        /// Where it came from.
        origin: Origin,
        /// Event payload.
        data: EventData<'a>,
        /// Position in the desk's stream (with history on).
        #[serde(skip_serializing_if = "Option::is_none")]
        offset: Option<u64>,
        /// The stream life `offset` belongs to (with history on).
        #[serde(skip_serializing_if = "Option::is_none")]
        epoch: Option<&'a str>,
        /// A desktop app asks this browser: answer with `reply` and this id.
        #[serde(skip_serializing_if = "Option::is_none")]
        reply_id: Option<&'a str>,
    },
}

/// One session in a `presence` answer.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Present<'a> {
    /// Session id.
    pub session: Uuid,
    /// Its user, with auth.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<&'a str>,
}

/// An event's `data`: a parsed object, or JSON text already serialized (a browser's publish,
/// kept as text while it waits for the broker).
#[derive(Debug, Clone, Copy, Serialize)]
#[serde(untagged)]
pub enum EventData<'a> {
    /// A parsed object.
    Object(&'a Data),
    /// A serialized JSON object.
    Json(&'a RawValue),
}

/// JSON body of an HTTP error answer (refused upgrades, `/ws` without one).
#[derive(Debug, Serialize)]
pub struct HttpError {
    /// Stable, machine-readable reason.
    pub error: &'static str,
    /// What a person should do about it.
    pub message: String,
}

impl ServerFrame<'_> {
    /// Serializes the frame once, framed for the wire; shared by every session it goes to.
    pub fn framed(&self) -> Frame {
        // Serializing these types cannot fail: every key is a string and no value is a
        // non-finite float (serde_json::Value cannot hold one).
        Frame::json(self).expect("server frames always serialize")
    }
}

/// The largest `ttl_ms` RabbitMQ takes as a message's `expiration` (ten years); the broker
/// refuses a larger one by closing the channel, which must not happen on a browser's word.
pub const MAX_TTL_MS: u64 = 315_360_000_000;

/// `ttl_ms`, refused above [`MAX_TTL_MS`] while the frame is parsed.
fn ttl_ms<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<u64>, D::Error> {
    match Option::<u64>::deserialize(deserializer)? {
        Some(ttl) if ttl > MAX_TTL_MS => Err(serde::de::Error::custom(format!(
            "`ttl_ms` must be at most {MAX_TTL_MS} (RabbitMQ's largest expiration)"
        ))),
        ttl => Ok(ttl),
    }
}

/// Parses one text frame from a browser, or explains precisely what is wrong with it.
pub fn parse_client_frame(text: &str) -> Result<ClientFrame, Refusal> {
    // serde also reads an internally tagged enum from an array whose first element is the tag
    // (`["ping"]`); the protocol allows objects only, so anything else takes the slow path.
    if !text.trim_start().starts_with('{') {
        return Err(diagnose(text, None));
    }
    serde_json::from_str::<ClientFrame>(text).map_err(|typed_error| diagnose(text, Some(typed_error)))
}

/// Slow path: the typed parse failed; find out why, to send the most useful error code.
fn diagnose(text: &str, typed_error: Option<serde_json::Error>) -> Refusal {
    let value: Value = match serde_json::from_str(text) {
        Ok(value) => value,
        Err(e) => return Refusal::new(ErrorCode::BadJson, format!("frame is not valid JSON: {e}")),
    };
    let Value::Object(object) = value else {
        return Refusal::new(ErrorCode::BadRequest, "frame must be a JSON object");
    };
    // A `ref` that is not a string, or too long, is not echoed: the browser could not match it.
    let reference = object
        .get("ref")
        .and_then(Value::as_str)
        .filter(|reference| ref_fits(reference))
        .map(String::from);
    let refusal = match object.get("op") {
        None => Refusal::new(ErrorCode::BadRequest, "frame has no `op` field"),
        Some(Value::String(op)) if !CLIENT_OPS.contains(&op.as_str()) => Refusal::new(
            ErrorCode::UnknownOp,
            format!("unknown op `{op}`; expected one of {}", CLIENT_OPS.join(", ")),
        ),
        Some(Value::String(_)) => Refusal::new(
            ErrorCode::BadRequest,
            typed_error.map_or_else(|| "invalid frame".to_string(), |e| e.to_string()),
        ),
        Some(_) => Refusal::new(ErrorCode::BadRequest, "`op` must be a string"),
    };
    Refusal { reference, ..refusal }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn valid_frames_parse() {
        let cases = [
            (r#"{"op":"ping"}"#, ClientFrame::Ping { reference: None }),
            (
                r#"{"op":"ping","ref":"g1"}"#,
                ClientFrame::Ping {
                    reference: Some("g1".into()),
                },
            ),
            (
                r#"{"op":"ping","ref":null}"#,
                ClientFrame::Ping { reference: None },
            ),
            (
                r#"{"op":"subscribe","desks":["A","B"]}"#,
                ClientFrame::Subscribe {
                    desks: vec!["A".into(), "B".into()],
                    since: None,
                    presence: false,
                    reference: None,
                },
            ),
            (
                r#"{"op":"subscribe","desks":["A"],"presence":true}"#,
                ClientFrame::Subscribe {
                    desks: vec!["A".into()],
                    since: None,
                    presence: true,
                    reference: None,
                },
            ),
            (
                r#"{"op":"presence","desk":"A","ref":"q1"}"#,
                ClientFrame::Presence {
                    desk: "A".into(),
                    reference: Some("q1".into()),
                },
            ),
            (
                r#"{"op":"subscribe","desks":["A","B"],"since":{"A":{"offset":9,"epoch":"e"},"B":{"last":5}}}"#,
                ClientFrame::Subscribe {
                    desks: vec!["A".into(), "B".into()],
                    since: Some(
                        [
                            (
                                "A".to_string(),
                                Since::After {
                                    offset: 9,
                                    epoch: "e".into(),
                                },
                            ),
                            ("B".to_string(), Since::Last { last: 5 }),
                        ]
                        .into(),
                    ),
                    presence: false,
                    reference: None,
                },
            ),
            (
                r#"{"op":"subscribe","desks":["A"],"ref":"s1"}"#,
                ClientFrame::Subscribe {
                    desks: vec!["A".into()],
                    since: None,
                    presence: false,
                    reference: Some("s1".into()),
                },
            ),
            (
                r#"{"op":"unsubscribe","desks":[]}"#,
                ClientFrame::Unsubscribe {
                    desks: vec![],
                    reference: None,
                },
            ),
            (
                r#"{"op":"unsubscribe","desks":["A"],"ref":"u1"}"#,
                ClientFrame::Unsubscribe {
                    desks: vec!["A".into()],
                    reference: Some("u1".into()),
                },
            ),
            (
                r#"{"op":"auth","token":"a.b.c"}"#,
                ClientFrame::Auth {
                    token: Token("a.b.c".into()),
                    reference: None,
                },
            ),
            (
                r#"{"op":"auth","token":"a.b.c","ref":"a1"}"#,
                ClientFrame::Auth {
                    token: Token("a.b.c".into()),
                    reference: Some("a1".into()),
                },
            ),
            (
                r#"{"op":"refresh","token":"x.y.z"}"#,
                ClientFrame::Refresh {
                    token: Token("x.y.z".into()),
                    reference: None,
                },
            ),
            (
                r#"{"op":"refresh","token":"x.y.z","ref":"r1"}"#,
                ClientFrame::Refresh {
                    token: Token("x.y.z".into()),
                    reference: Some("r1".into()),
                },
            ),
            (
                // 128 characters of 2 bytes each: the limit counts characters.
                &format!(r#"{{"op":"ping","ref":"{}"}}"#, "é".repeat(128)),
                ClientFrame::Ping {
                    reference: Some("é".repeat(128)),
                },
            ),
            (
                r#"{"op":"publish","desk":"A","event":"new_example","data":{"x":1},"ref":"c1"}"#,
                ClientFrame::Publish {
                    desk: "A".into(),
                    event: "new_example".into(),
                    data: json!({"x": 1}).as_object().cloned().unwrap_or_default(),
                    reference: Some("c1".into()),
                    ttl_ms: None,
                },
            ),
        ];
        for (text, expected) in cases {
            assert_eq!(parse_client_frame(text), Ok(expected.clone()), "{text}");
            assert_eq!(
                parse_client_frame(text)
                    .ok()
                    .and_then(ClientFrame::into_reference),
                expected.into_reference()
            );
        }
    }

    #[test]
    fn numbers_keep_their_text_and_numeric_fields_parse_in_every_op() {
        let exact =
            r#"{"px":101.50,"id":123456789012345678901234567890,"p":0.1000000000000000055511151231257827}"#;
        let publish = format!(r#"{{"op":"publish","desk":"A","event":"e","data":{exact},"ttl_ms":5000}}"#);
        let Ok(ClientFrame::Publish { data, ttl_ms, .. }) = parse_client_frame(&publish) else {
            panic!("publish parses: {publish}");
        };
        assert_eq!(ttl_ms, Some(5000));
        assert_eq!(
            serde_json::to_string(&data).expect("serializes"),
            exact,
            "data's numbers travel as written"
        );
        let request = format!(
            r#"{{"op":"request","desk":"A","event":"e","data":{exact},"timeout_ms":2000,"ttl_ms":7}}"#
        );
        let Ok(ClientFrame::Request {
            data,
            timeout_ms,
            ttl_ms,
            ..
        }) = parse_client_frame(&request)
        else {
            panic!("request parses: {request}");
        };
        assert_eq!((timeout_ms, ttl_ms), (Some(2000), Some(7)));
        assert_eq!(serde_json::to_string(&data).expect("serializes"), exact);
        let reply = format!(r#"{{"op":"reply","reply_id":"r","data":{exact}}}"#);
        let Ok(ClientFrame::Reply { data, .. }) = parse_client_frame(&reply) else {
            panic!("reply parses: {reply}");
        };
        assert_eq!(serde_json::to_string(&data).expect("serializes"), exact);
        // serde_json's parser writes an exponent's sign out: `1e3` travels as `1e+3`, the same
        // number (only data kept unparsed would keep it as written).
        let exponent = r#"{"op":"reply","reply_id":"r","data":{"n":1e3}}"#;
        let Ok(ClientFrame::Reply { data, .. }) = parse_client_frame(exponent) else {
            panic!("reply parses: {exponent}");
        };
        assert_eq!(serde_json::to_string(&data).expect("serializes"), r#"{"n":1e+3}"#);
        let since =
            r#"{"op":"subscribe","desks":["A","B"],"since":{"A":{"offset":9,"epoch":"e"},"B":{"last":5}}}"#;
        assert!(
            matches!(
                parse_client_frame(since),
                Ok(ClientFrame::Subscribe { since: Some(_), .. })
            ),
            "{since}"
        );
        for wrong in [
            r#"{"op":"publish","desk":"A","event":"e","data":{},"ttl_ms":-1}"#,
            r#"{"op":"publish","desk":"A","event":"e","data":{},"ttl_ms":1.5}"#,
            r#"{"op":"request","desk":"A","event":"e","data":{},"timeout_ms":"7"}"#,
            r#"{"op":"subscribe","desks":["A"],"since":{"A":{"offset":-3,"epoch":"e"}}}"#,
        ] {
            let refusal = parse_client_frame(wrong).expect_err(wrong);
            assert_eq!(
                refusal.code,
                ErrorCode::BadRequest,
                "{wrong}: {}",
                refusal.message
            );
        }
    }

    #[test]
    fn each_mistake_gets_its_code() {
        let too_long = "x".repeat(MAX_REF_CHARS + 1);
        let too_long_ping = format!(r#"{{"op":"ping","ref":"{too_long}"}}"#);
        let too_long_publish =
            format!(r#"{{"op":"publish","desk":"A","event":"e","data":{{}},"ref":"{too_long}"}}"#);
        let cases = [
            ("{nope", ErrorCode::BadJson, None),
            ("", ErrorCode::BadJson, None),
            ("[1,2]", ErrorCode::BadRequest, None),
            (r#"["ping"]"#, ErrorCode::BadRequest, None),
            (r#"  ["subscribe", ["A"]]"#, ErrorCode::BadRequest, None),
            ("\"ping\"", ErrorCode::BadRequest, None),
            (r#"{"desks":["A"]}"#, ErrorCode::BadRequest, None),
            (r#"{"op":7}"#, ErrorCode::BadRequest, None),
            (r#"{"op":"launch","ref":"r9"}"#, ErrorCode::UnknownOp, Some("r9")),
            (r#"{"op":"subscribe"}"#, ErrorCode::BadRequest, None),
            (r#"{"op":"auth"}"#, ErrorCode::BadRequest, None),
            (r#"{"op":"auth","token":7}"#, ErrorCode::BadRequest, None),
            (r#"{"op":"subscribe","desks":"A"}"#, ErrorCode::BadRequest, None),
            (
                r#"{"op":"subscribe","desks":["A"],"since":{"A":{"offset":-1,"epoch":"e"}}}"#,
                ErrorCode::BadRequest,
                None,
            ),
            (
                r#"{"op":"subscribe","desks":["A"],"since":{"A":{"offset":1}}}"#,
                ErrorCode::BadRequest,
                None,
            ),
            (
                r#"{"op":"publish","desk":"A","event":"e","ref":"c2"}"#,
                ErrorCode::BadRequest,
                Some("c2"),
            ),
            (
                r#"{"op":"publish","desk":"A","event":"e","data":[1],"ref":"c3"}"#,
                ErrorCode::BadRequest,
                Some("c3"),
            ),
            (
                r#"{"op":"publish","desk":"A","event":"e","data":"x"}"#,
                ErrorCode::BadRequest,
                None,
            ),
            (
                r#"{"op":"publish","desk":1,"event":"e","data":{}}"#,
                ErrorCode::BadRequest,
                None,
            ),
            (
                r#"{"op":"publish","desk":"A","event":"e","data":{},"ttl_ms":315360000001,"ref":"t1"}"#,
                ErrorCode::BadRequest,
                Some("t1"),
            ),
            (
                r#"{"op":"request","desk":"A","event":"e","data":{},"ttl_ms":1000000000000000}"#,
                ErrorCode::BadRequest,
                None,
            ),
            (r#"{"op":"ping","ref":7}"#, ErrorCode::BadRequest, None),
            (
                r#"{"op":"subscribe","desks":["A"],"ref":["s1"]}"#,
                ErrorCode::BadRequest,
                None,
            ),
            (
                r#"{"op":"auth","token":"a.b.c","ref":{}}"#,
                ErrorCode::BadRequest,
                None,
            ),
            (&too_long_ping, ErrorCode::BadRequest, None),
            (&too_long_publish, ErrorCode::BadRequest, None),
            (
                r#"{"op":"subscribe","ref":"s2"}"#,
                ErrorCode::BadRequest,
                Some("s2"),
            ),
            (
                r#"{"op":"unsubscribe","desks":"A","ref":"u2"}"#,
                ErrorCode::BadRequest,
                Some("u2"),
            ),
            (
                r#"{"op":"refresh","ref":"r2"}"#,
                ErrorCode::BadRequest,
                Some("r2"),
            ),
        ];
        for (text, code, reference) in cases {
            let refusal = parse_client_frame(text).expect_err(text);
            assert_eq!(refusal.code, code, "{text}: {}", refusal.message);
            assert_eq!(refusal.reference.as_deref(), reference, "{text}");
            assert!(!refusal.message.is_empty());
            assert!(
                !refusal.message.contains(&too_long),
                "{text}: the message holds no unreadable ref"
            );
        }
    }

    #[test]
    fn server_frames_have_the_documented_shape() {
        let data = json!({"px": 1.5}).as_object().cloned().unwrap_or_default();
        let desks = ["A".to_string()];
        let cases = [
            (ServerFrame::Pong { reference: None }, json!({"op": "pong"})),
            (
                ServerFrame::Pong {
                    reference: Some("g1"),
                },
                json!({"op": "pong", "ref": "g1"}),
            ),
            (
                ServerFrame::Subscribed {
                    desks: &desks,
                    recovered: None,
                    first_offset: None,
                    reference: None,
                },
                json!({"op": "subscribed", "desks": ["A"]}),
            ),
            (
                ServerFrame::Subscribed {
                    desks: &desks,
                    recovered: None,
                    first_offset: None,
                    reference: Some("s1"),
                },
                json!({"op": "subscribed", "desks": ["A"], "ref": "s1"}),
            ),
            (
                ServerFrame::Unsubscribed {
                    desks: &desks,
                    reason: None,
                    reference: Some("u1"),
                },
                json!({"op": "unsubscribed", "desks": ["A"], "ref": "u1"}),
            ),
            (
                ServerFrame::Unsubscribed {
                    desks: &desks,
                    reason: Some("permission"),
                    reference: None,
                },
                json!({"op": "unsubscribed", "desks": ["A"], "reason": "permission"}),
            ),
            (
                ServerFrame::Welcome {
                    session: "s",
                    version: "1",
                    desks: &desks,
                    user: Some("alice"),
                    expires_at: Some(7),
                    reference: Some("a1"),
                },
                json!({"op": "welcome", "session": "s", "version": "1", "desks": ["A"], "user": "alice", "expires_at": 7, "ref": "a1"}),
            ),
            (
                ServerFrame::Welcome {
                    session: "s",
                    version: "1",
                    desks: &desks,
                    user: None,
                    expires_at: None,
                    reference: None,
                },
                json!({"op": "welcome", "session": "s", "version": "1", "desks": ["A"]}),
            ),
            (
                ServerFrame::Expiring { expires_at: 9 },
                json!({"op": "expiring", "expires_at": 9}),
            ),
            (
                ServerFrame::Refreshed {
                    expires_at: 9,
                    reference: None,
                },
                json!({"op": "refreshed", "expires_at": 9}),
            ),
            (
                ServerFrame::Refreshed {
                    expires_at: 9,
                    reference: Some("r1"),
                },
                json!({"op": "refreshed", "expires_at": 9, "ref": "r1"}),
            ),
            (
                ServerFrame::Ack {
                    reference: Some("c1"),
                    id: "m1",
                    routed: true,
                },
                json!({"op": "ack", "ref": "c1", "id": "m1", "routed": true}),
            ),
            (
                ServerFrame::Ack {
                    reference: None,
                    id: "m1",
                    routed: false,
                },
                json!({"op": "ack", "id": "m1", "routed": false}),
            ),
            (
                ServerFrame::Error {
                    reference: None,
                    code: ErrorCode::UnknownDesk,
                    message: "no",
                },
                json!({"op": "error", "code": "unknown_desk", "message": "no"}),
            ),
            (
                ServerFrame::Event {
                    desk: "A",
                    event: "new_example",
                    id: "m2",
                    origin: Origin::Desktop,
                    data: EventData::Object(&data),
                    offset: None,
                    epoch: None,
                    reply_id: None,
                },
                json!({"op": "event", "desk": "A", "event": "new_example", "id": "m2", "origin": "desktop", "data": {"px": 1.5}}),
            ),
            (
                ServerFrame::Event {
                    desk: "A",
                    event: "new_example",
                    id: "m3",
                    origin: Origin::Web,
                    data: EventData::Object(&data),
                    offset: Some(42),
                    epoch: Some("e1"),
                    reply_id: None,
                },
                json!({"op": "event", "desk": "A", "event": "new_example", "id": "m3", "origin": "web", "data": {"px": 1.5}, "offset": 42, "epoch": "e1"}),
            ),
            (
                ServerFrame::Subscribed {
                    desks: &desks,
                    recovered: Some(&[("A".to_string(), false)].into()),
                    first_offset: Some(&[("A".to_string(), 7)].into()),
                    reference: None,
                },
                json!({"op": "subscribed", "desks": ["A"], "recovered": {"A": false}, "first_offset": {"A": 7}}),
            ),
            (
                ServerFrame::Gap {
                    desk: "A",
                    dropped: 3,
                },
                json!({"op": "gap", "desk": "A", "dropped": 3}),
            ),
        ];
        for (frame, expected) in cases {
            let got = serde_json::to_value(&frame).expect("server frames serialize");
            assert_eq!(got, expected);
        }
    }

    #[test]
    fn error_codes_serialize_as_their_names() {
        for code in ErrorCode::ALL {
            assert_eq!(
                serde_json::to_value(code).ok(),
                Some(Value::String(code.as_str().into()))
            );
        }
    }

    mod fuzz {
        use super::super::*;
        use proptest::prelude::*;
        use serde_json::{Map, Value};

        /// Any JSON value, biased towards frames: objects often carry a real `op`.
        fn json() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::Bool),
                any::<i64>().prop_map(Value::from),
                any::<f64>().prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
                "[a-zA-Z_]{0,12}".prop_map(Value::String),
                prop::sample::select(vec![
                    "ping",
                    "subscribe",
                    "unsubscribe",
                    "publish",
                    "auth",
                    "refresh",
                    "A",
                    "B"
                ])
                .prop_map(|s| Value::String(s.into())),
            ];
            leaf.prop_recursive(4, 48, 6, |inner| {
                let key =
                    prop::sample::select(vec!["op", "desks", "desk", "event", "data", "ref", "token", "x"]);
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                    prop::collection::vec((key, inner), 0..6).prop_map(|pairs| Value::Object(
                        pairs
                            .into_iter()
                            .map(|(k, v)| (k.to_string(), v))
                            .collect::<Map<_, _>>()
                    )),
                ]
            })
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]

            #[test]
            fn any_text_is_parsed_or_refused_with_a_reason(text in "\\PC{0,80}") {
                if let Err(refusal) = parse_client_frame(&text) {
                    prop_assert!(!refusal.message.is_empty());
                }
            }

            #[test]
            fn auth_frames_carry_any_token_verbatim_and_refusals_never_echo_it(token in "\\PC{1,300}") {
                for op in ["auth", "refresh"] {
                    let text = serde_json::json!({"op": op, "token": token}).to_string();
                    let frame = parse_client_frame(&text).map_err(|r| TestCaseError::fail(r.message))?;
                    let got = match frame {
                        ClientFrame::Auth { token, .. } | ClientFrame::Refresh { token, .. } => token.0,
                        other => return Err(TestCaseError::fail(format!("{other:?}"))),
                    };
                    prop_assert_eq!(&got, &token);
                    let debug = format!("{:?}", ClientFrame::Auth { token: Token(got), reference: None });
                    prop_assert_eq!(debug.as_str(), "Auth { token: Token(***), reference: None }", "Debug hides the token");
                    let wrong = serde_json::json!({"op": op, "tokn": token}).to_string();
                    let refusal = parse_client_frame(&wrong).expect_err("no token field");
                    prop_assert_eq!(refusal.code, ErrorCode::BadRequest);
                    prop_assert!(token.len() < 4 || !refusal.message.contains(&token));
                }
            }

            #[test]
            fn any_json_is_parsed_or_refused_with_a_reason(value in json()) {
                let text = value.to_string();
                match parse_client_frame(&text) {
                    Ok(_) => prop_assert!(value.is_object()),
                    Err(refusal) => {
                        prop_assert_ne!(refusal.code, ErrorCode::BadJson, "valid JSON is never bad_json");
                        prop_assert!(!refusal.message.is_empty());
                        let _ = refusal.framed();
                    }
                }
            }
        }
    }
}
