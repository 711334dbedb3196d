//! [`Catalog`]: the configured desks and events, and the routing-key convention that joins
//! them (`{desk}_{event}`). Browser requests (router) and broker deliveries (consumer) are
//! checked by this one type, so both sides refuse the same names with the same words.

use std::collections::HashSet;

/// Why a desk, an event or a routing key is not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// A desk that is not configured.
    #[error("unknown desk `{name}`; known desks: {known}")]
    UnknownDesk {
        /// The name given.
        name: String,
        /// The configured desks, comma-separated.
        known: String,
    },
    /// An event that is not configured.
    #[error("unknown event `{name}`; known events: {known}")]
    UnknownEvent {
        /// The name given.
        name: String,
        /// The configured events, comma-separated.
        known: String,
    },
    /// A routing key without the `_` between desk and event.
    #[error("routing key `{0}` has no `_` between desk and event")]
    NoSeparator(String),
}

/// The configured desks and events.
#[derive(Debug, Clone)]
pub struct Catalog {
    desks: Vec<String>,
    desk_set: HashSet<String>,
    events: Vec<String>,
    event_set: HashSet<String>,
}

impl Catalog {
    /// A catalog of these names (validated by the config).
    pub fn new(desks: &[String], events: &[String]) -> Self {
        Catalog {
            desks: desks.to_vec(),
            desk_set: desks.iter().cloned().collect(),
            events: events.to_vec(),
            event_set: events.iter().cloned().collect(),
        }
    }

    /// The desks, in configured order.
    pub fn desks(&self) -> &[String] {
        &self.desks
    }

    /// The events, in configured order.
    pub fn events(&self) -> &[String] {
        &self.events
    }

    /// `Ok` for a configured desk.
    pub fn check_desk(&self, name: &str) -> Result<(), NameError> {
        if self.desk_set.contains(name) {
            return Ok(());
        }
        Err(NameError::UnknownDesk {
            name: name.into(),
            known: self.desks.join(", "),
        })
    }

    /// `Ok` for a configured event.
    pub fn check_event(&self, name: &str) -> Result<(), NameError> {
        if self.event_set.contains(name) {
            return Ok(());
        }
        Err(NameError::UnknownEvent {
            name: name.into(),
            known: self.events.join(", "),
        })
    }

    /// Splits a routing key into a configured (desk, event).
    pub fn parse_routing_key<'k>(&self, key: &'k str) -> Result<(&'k str, &'k str), NameError> {
        let (desk, event) = split_routing_key(key).ok_or_else(|| NameError::NoSeparator(key.into()))?;
        self.check_desk(desk)?;
        self.check_event(event)?;
        Ok((desk, event))
    }
}

/// `{desk}_{event}`.
pub fn routing_key(desk: &str, event: &str) -> String {
    format!("{desk}_{event}")
}

/// Splits a routing key at its first `_` into (desk, event); `None` without a `_`. Desks may
/// not contain `_` (the config refuses it), so the first one is the separator.
pub fn split_routing_key(key: &str) -> Option<(&str, &str)> {
    key.split_once('_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing_keys_split_at_the_first_underscore() {
        let cases = [
            ("A_new_example", Some(("A", "new_example"))),
            ("B_update_example", Some(("B", "update_example"))),
            ("A_", Some(("A", ""))),
            ("_x", Some(("", "x"))),
            ("Anew", None),
            ("", None),
        ];
        for (key, expected) in cases {
            assert_eq!(split_routing_key(key), expected, "{key}");
        }
        assert_eq!(routing_key("A", "new_example"), "A_new_example");
    }

    #[test]
    fn names_are_checked_against_the_configuration() {
        let catalog = Catalog::new(&["A".into(), "B".into()], &["new_example".into()]);
        assert_eq!(
            catalog.parse_routing_key("A_new_example"),
            Ok(("A", "new_example"))
        );
        let cases = [
            ("C_new_example", "unknown desk `C`; known desks: A, B"),
            ("A_nope", "unknown event `nope`; known events: new_example"),
            ("Anew", "routing key `Anew` has no `_` between desk and event"),
        ];
        for (key, message) in cases {
            let error = catalog.parse_routing_key(key).expect_err(key);
            assert_eq!(error.to_string(), message);
        }
    }
}
