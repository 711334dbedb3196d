//! What a delivery from RabbitMQ says, read the same way by the queue consumer and the
//! stream reader: desk and event from the routing key, data from the body, its id, whom it is
//! for, and whether it expired.

use amiquip::{AmqpProperties, Delivery, FieldTable};

use crate::amqp;
use crate::catalog::{Catalog, NameError};
use crate::metrics::RejectReason;
use crate::transform::Data;

/// The browsers a targeted desktop message is for: a session, a user's sessions, or both.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Recipients {
    /// `x-to-session`: a session id from a `welcome`.
    pub session: Option<String>,
    /// `x-to-user`: a token's `sub`.
    pub user: Option<String>,
    /// The message's `reply_to`: a desktop app asks these browsers and waits for the answer.
    pub reply: Option<ReplyTo>,
}

/// Where the answer to a desktop app's request goes.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplyTo {
    /// The queue in `reply_to`.
    pub queue: String,
    /// The request's `correlation_id`, or its `message_id` when it has none.
    pub correlation_id: String,
}

/// The delivery's AMQP `message_id`, or a new one.
pub fn message_id(properties: &AmqpProperties) -> String {
    properties
        .message_id()
        .clone()
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string())
}

/// The browsers a targeted message names (`x-to-session`, `x-to-user`), if any, and where
/// their answer goes when it is a request (`reply_to`); `id` is the message's id.
pub fn recipients(properties: &AmqpProperties, id: &str) -> Option<Box<Recipients>> {
    let headers: Option<&FieldTable> = properties.headers().as_ref();
    let session = amqp::header_str(headers, amqp::HEADER_TO_SESSION);
    let user = amqp::header_str(headers, amqp::HEADER_TO_USER);
    (session.is_some() || user.is_some()).then(|| {
        let reply = properties.reply_to().as_ref().map(|queue| ReplyTo {
            queue: queue.clone(),
            correlation_id: properties
                .correlation_id()
                .clone()
                .unwrap_or_else(|| id.to_owned()),
        });
        Box::new(Recipients {
            session: session.map(str::to_owned),
            user: user.map(str::to_owned),
            reply,
        })
    })
}

/// True when the message's `timestamp` (seconds) + `expiration` (milliseconds) lies before
/// `now_ms`: the desktop app said it is worthless by now. Without either, it never expires here.
pub fn expired(properties: &amiquip::AmqpProperties, now_ms: u64) -> bool {
    let Some(published) = properties.timestamp() else {
        return false;
    };
    let Some(ttl) = properties
        .expiration()
        .as_deref()
        .and_then(|ms| ms.parse::<u64>().ok())
    else {
        return false;
    };
    published.saturating_mul(1000).saturating_add(ttl) < now_ms
}

/// Routing key → (desk, event) and body → JSON object, or why not.
pub fn decode(
    delivery: &Delivery,
    catalog: &Catalog,
) -> Result<(String, String, Data), (RejectReason, String)> {
    let (desk, event) = catalog
        .parse_routing_key(&delivery.routing_key)
        .map_err(|error| {
            let reason = match error {
                NameError::UnknownEvent { .. } => RejectReason::UnknownEvent,
                NameError::UnknownDesk { .. } | NameError::NoSeparator(_) => RejectReason::UnknownDesk,
            };
            (reason, error.to_string())
        })?;
    let data: Data = serde_json::from_slice(&delivery.body).map_err(|error| {
        (
            RejectReason::BadBody,
            format!("body is not a JSON object: {error}"),
        )
    })?;
    Ok((desk.to_owned(), event.to_owned(), data))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_expires_at_its_timestamp_plus_expiration() {
        let at = |timestamp: Option<u64>, expiration: Option<&str>| {
            let mut properties = amiquip::AmqpProperties::default();
            if let Some(timestamp) = timestamp {
                properties = properties.with_timestamp(timestamp);
            }
            if let Some(expiration) = expiration {
                properties = properties.with_expiration(expiration.into());
            }
            properties
        };
        let now_ms = 100_000;
        let cases = [
            (at(Some(90), Some("5000")), true),
            (at(Some(90), Some("20000")), false),
            (at(Some(90), None), false),
            (at(None, Some("1")), false),
            (at(Some(90), Some("soon")), false),
        ];
        for (properties, expired_now) in cases {
            assert_eq!(expired(&properties, now_ms), expired_now, "{properties:?}");
        }
    }
}
