//! Per-desk data transforms: desktop apps and the web app name fields differently.
//!
//! Rules come from the config (`rename`, `drop`, `set`, `require`, applied in that order within a
//! rule, rules in file order) or from code through the [`Transform`] trait. Which transforms run
//! for a (desk, event, direction) is resolved once at start-up, so the hot path is one hash
//! lookup and, with nothing configured, no work at all.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde::Deserialize;
use serde_json::{Map, Value};

/// A JSON object: the `data` of an event.
pub type Data = Map<String, Value>;

/// Which way a message travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// Desktop (RabbitMQ) → browsers.
    ToWeb = 0,
    /// Browser → desktop (RabbitMQ).
    ToDesktop = 1,
}

/// Why a transform refused a message.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TransformError {
    /// A `require`d field is absent after the other steps ran.
    #[error("required field `{0}` is missing")]
    MissingField(String),
    /// A code-registered transform refused the data.
    #[error("{0}")]
    Rejected(String),
    /// A code-registered transform panicked; the message is refused, the bridge goes on.
    #[error("a transform failed unexpectedly: {0}")]
    Panicked(String),
}

/// A step that rewrites an event's data in place; register one in code with
/// [`Transforms::register`].
pub trait Transform: Send + Sync {
    /// Rewrites `data`, or says why it cannot.
    fn apply(&self, data: &mut Data) -> Result<(), TransformError>;
}

/// One `[[transforms]]` entry of the config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransformRule {
    /// Desk name or `*`.
    #[serde(default = "wildcard")]
    pub desk: String,
    /// Event name or `*`.
    #[serde(default = "wildcard")]
    pub event: String,
    /// Direction the rule applies to.
    pub direction: Direction,
    /// Field renames, old name → new name.
    #[serde(default)]
    pub rename: BTreeMap<String, String>,
    /// Fields removed.
    #[serde(default)]
    pub drop: Vec<String>,
    /// Fields set to constant values (added or overwritten).
    #[serde(default)]
    pub set: Data,
    /// Fields that must exist once the steps above ran.
    #[serde(default)]
    pub require: Vec<String>,
}

fn wildcard() -> String {
    "*".into()
}

impl Transform for TransformRule {
    fn apply(&self, data: &mut Data) -> Result<(), TransformError> {
        // `shift_remove`: the other fields keep their order (a renamed one moves to the end).
        for (old, new) in &self.rename {
            if let Some(value) = data.shift_remove(old) {
                data.insert(new.clone(), value);
            }
        }
        for field in &self.drop {
            data.shift_remove(field);
        }
        for (field, value) in &self.set {
            data.insert(field.clone(), value.clone());
        }
        match self.require.iter().find(|field| !data.contains_key(*field)) {
            Some(missing) => Err(TransformError::MissingField(missing.clone())),
            None => Ok(()),
        }
    }
}

type Chain = Vec<Arc<dyn Transform>>;

/// Transform chains per (desk, event, direction), resolved for the configured names.
#[derive(Clone, Default)]
pub struct Transforms {
    selectors: Vec<(String, String, Direction, Arc<dyn Transform>)>,
    /// desk → event → chain per direction (indexed by `Direction as usize`); only non-empty
    /// entries, so lookups borrow `&str` and allocate nothing.
    chains: HashMap<String, HashMap<String, [Chain; 2]>>,
}

impl Transforms {
    /// Starts from the config's rules; call [`register`](Self::register) for code transforms.
    pub fn from_rules(rules: &[TransformRule]) -> Self {
        let mut transforms = Transforms::default();
        for rule in rules {
            let (desk, event, direction) = (rule.desk.clone(), rule.event.clone(), rule.direction);
            transforms.register(&desk, &event, direction, rule.clone());
        }
        transforms
    }

    /// Adds a transform for a desk (or `*`), an event (or `*`) and a direction, after those
    /// already added.
    pub fn register(
        &mut self,
        desk: &str,
        event: &str,
        direction: Direction,
        transform: impl Transform + 'static,
    ) {
        self.selectors
            .push((desk.into(), event.into(), direction, Arc::new(transform)));
        self.chains.clear();
    }

    /// Resolves the chain of every desk × event × direction; call once before use.
    pub fn resolve(&mut self, desks: &[String], events: &[String]) {
        self.chains.clear();
        for desk in desks {
            for event in events {
                let chain_for = |direction: Direction| -> Chain {
                    self.selectors
                        .iter()
                        .filter(|(d, e, dir, _)| {
                            *dir == direction && (d == "*" || d == desk) && (e == "*" || e == event)
                        })
                        .map(|(_, _, _, t)| Arc::clone(t))
                        .collect()
                };
                let chains = [chain_for(Direction::ToWeb), chain_for(Direction::ToDesktop)];
                if chains.iter().any(|chain| !chain.is_empty()) {
                    self.chains
                        .entry(desk.clone())
                        .or_default()
                        .insert(event.clone(), chains);
                }
            }
        }
    }

    fn chain(&self, desk: &str, event: &str, direction: Direction) -> &[Arc<dyn Transform>] {
        self.chains
            .get(desk)
            .and_then(|events| events.get(event))
            .map_or(&[], |chains| &chains[direction as usize])
    }

    /// True when some transform would touch this desk/event/direction.
    pub fn applies(&self, desk: &str, event: &str, direction: Direction) -> bool {
        !self.chain(desk, event, direction).is_empty()
    }

    /// Runs the chain for this desk/event/direction over `data`. A transform that panics is
    /// turned into [`TransformError::Panicked`]: code registered by a user must not take the
    /// router, and with it every session, down. `data` is then half-done and must be dropped.
    pub fn apply(
        &self,
        desk: &str,
        event: &str,
        direction: Direction,
        data: &mut Data,
    ) -> Result<(), TransformError> {
        for transform in self.chain(desk, event, direction) {
            // `data` is discarded by every caller when this fails, so a half-applied
            // transform is never observed.
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| transform.apply(data)))
                .map_err(|panic| TransformError::Panicked(crate::panics::message(panic.as_ref())))??;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(value: Value) -> Data {
        match value {
            Value::Object(map) => map,
            _ => unreachable!("test literals are objects"),
        }
    }

    fn rules(toml_text: &str) -> Transforms {
        #[derive(Deserialize)]
        struct File {
            transforms: Vec<TransformRule>,
        }
        let file: File = toml::from_str(toml_text).expect("test rules parse");
        let mut t = Transforms::from_rules(&file.transforms);
        t.resolve(
            &["A".into(), "B".into()],
            &["new_example".into(), "update_example".into()],
        );
        t
    }

    #[test]
    fn rule_steps_apply_in_order() {
        let t = rules(
            r#"
            [[transforms]]
            desk = "A"
            direction = "to_web"
            rename = { Qty = "quantity", Px = "price" }
            drop = ["Internal"]
            set = { source = "desk-a", version = 2 }
            require = ["quantity"]
            "#,
        );
        let cases = [
            // (desk, event, direction, input, expected)
            (
                "A",
                "new_example",
                Direction::ToWeb,
                json!({"Qty": 5, "Px": 1.5, "Internal": true}),
                Ok(json!({"quantity": 5, "price": 1.5, "source": "desk-a", "version": 2})),
            ),
            (
                "A",
                "new_example",
                Direction::ToWeb,
                json!({"Px": 1.5}),
                Err(TransformError::MissingField("quantity".into())),
            ),
            (
                "B",
                "new_example",
                Direction::ToWeb,
                json!({"Qty": 5}),
                Ok(json!({"Qty": 5})),
            ),
            (
                "A",
                "new_example",
                Direction::ToDesktop,
                json!({"Qty": 5}),
                Ok(json!({"Qty": 5})),
            ),
        ];
        for (desk, event, direction, input, expected) in cases {
            let mut data = obj(input.clone());
            let got = t
                .apply(desk, event, direction, &mut data)
                .map(|()| Value::Object(data));
            assert_eq!(got, expected, "{desk} {event} {direction:?} {input}");
        }
    }

    #[test]
    fn wildcards_and_rule_order_compose() {
        let t = rules(
            r#"
            [[transforms]]
            direction = "to_desktop"
            rename = { a = "b" }
            [[transforms]]
            event = "update_example"
            direction = "to_desktop"
            rename = { b = "c" }
            "#,
        );
        let mut data = obj(json!({"a": 1}));
        t.apply("B", "update_example", Direction::ToDesktop, &mut data)
            .expect("ok");
        assert_eq!(Value::Object(data), json!({"c": 1}));
        let mut data = obj(json!({"a": 1}));
        t.apply("B", "new_example", Direction::ToDesktop, &mut data)
            .expect("ok");
        assert_eq!(Value::Object(data), json!({"b": 1}));
        assert!(t.applies("A", "new_example", Direction::ToDesktop));
        assert!(!t.applies("A", "new_example", Direction::ToWeb));
    }

    #[test]
    fn code_transforms_run_after_config_rules() {
        struct Upper;
        impl Transform for Upper {
            fn apply(&self, data: &mut Data) -> Result<(), TransformError> {
                match data.get("name").and_then(Value::as_str) {
                    Some(name) => {
                        let upper = name.to_uppercase();
                        data.insert("name".into(), upper.into());
                        Ok(())
                    }
                    None => Err(TransformError::Rejected("name must be a string".into())),
                }
            }
        }
        let mut t = Transforms::from_rules(&[]);
        t.register("*", "*", Direction::ToWeb, Upper);
        t.resolve(&["A".into()], &["new_example".into()]);
        let mut data = obj(json!({"name": "abc"}));
        t.apply("A", "new_example", Direction::ToWeb, &mut data)
            .expect("ok");
        assert_eq!(data["name"], "ABC");
        let mut data = obj(json!({"name": 1}));
        let err = t
            .apply("A", "new_example", Direction::ToWeb, &mut data)
            .expect_err("rejects");
        assert_eq!(err.to_string(), "name must be a string");
    }

    mod fuzz {
        use super::super::*;
        use proptest::prelude::*;

        fn key() -> impl Strategy<Value = String> {
            prop::sample::select(vec!["a", "b", "c", "d", "e"]).prop_map(String::from)
        }

        fn rule() -> impl Strategy<Value = TransformRule> {
            (
                prop::collection::btree_map(key(), key(), 0..4),
                prop::collection::vec(key(), 0..3),
                prop::collection::btree_map(key(), any::<i32>(), 0..3),
                prop::collection::vec(key(), 0..3),
            )
                .prop_map(|(rename, drop, set, require)| TransformRule {
                    desk: "*".into(),
                    event: "*".into(),
                    direction: Direction::ToWeb,
                    rename,
                    drop,
                    set: set.into_iter().map(|(k, v)| (k, Value::from(v))).collect(),
                    require,
                })
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]

            #[test]
            fn rules_never_panic_and_keep_their_promises(
                rules in prop::collection::vec(rule(), 0..4),
                input in prop::collection::btree_map(key(), any::<i32>(), 0..6),
            ) {
                let mut transforms = Transforms::from_rules(&rules);
                transforms.resolve(&["A".into()], &["e".into()]);
                let mut data: Data = input.into_iter().map(|(k, v)| (k, Value::from(v))).collect();
                let result = transforms.apply("A", "e", Direction::ToWeb, &mut data);
                if let Some(last) = rules.last() {
                    if result.is_ok() {
                        for field in &last.require {
                            prop_assert!(data.contains_key(field));
                        }
                        for (field, value) in &last.set {
                            prop_assert_eq!(data.get(field), Some(value));
                        }
                    }
                } else {
                    prop_assert!(result.is_ok());
                }
            }
        }
    }
}
