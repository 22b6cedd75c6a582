//! When a message counts as confirmed: the one rule, used by confirm ingest and by a CHECK that
//! meets the confirms which came before it (the usual order: consumers answer in milliseconds,
//! checks wait seconds to minutes).
//!
//! - A rejection by any consumer settles the message as `rejected`, in any order.
//! - Otherwise the CHECK decides: without `expect` one confirm suffices; with `expect` every
//!   named consumer must have confirmed (`processed` or `duplicate`).
//! - A row known only from confirms has not seen its CHECK, so nobody knows yet which consumers
//!   it needs: a confirm stores its answer and the CHECK, when it comes, weighs them all.

use std::collections::HashMap;

use recheck::message::Outcome;

/// What a row knows of the consumers its message needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Expected<'a> {
    /// No CHECK seen yet (the row was created by a confirm): only a rejection settles it.
    Unknown,
    /// The CHECK named nobody: any one confirm.
    Any,
    /// The CHECK's `expect`, comma-separated as stored.
    All(&'a str),
}

impl<'a> Expected<'a> {
    /// From a row: whether it has seen its CHECK, and its stored `expect`.
    pub(crate) fn of(checked: bool, expect: Option<&'a str>) -> Self {
        match expect.filter(|e| !e.is_empty()) {
            _ if !checked => Expected::Unknown,
            None => Expected::Any,
            Some(names) => Expected::All(names),
        }
    }

    /// Whether the consumers' answers (consumer → outcome, as stored) confirm the message.
    pub(crate) fn confirmed_by(self, seen: &HashMap<String, Outcome>) -> bool {
        let confirms = |o: &Outcome| *o != Outcome::Rejected;
        match self {
            Expected::Unknown => false,
            Expected::Any => seen.values().any(confirms),
            Expected::All(names) => names.split(',').all(|want| seen.get(want).is_some_and(confirms)),
        }
    }

    /// Needs the other consumers' stored answers to decide (several names).
    pub(crate) fn needs_others(self) -> bool {
        matches!(self, Expected::All(_))
    }
}

/// The consumers whose answers confirm, sorted: who a check-time confirmation names.
pub(crate) fn confirmers(seen: &HashMap<String, Outcome>) -> String {
    let mut names: Vec<&str> =
        seen.iter().filter(|(_, o)| **o != Outcome::Rejected).map(|(c, _)| c.as_str()).collect();
    names.sort_unstable();
    names.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(answers: &[(&str, Outcome)]) -> HashMap<String, Outcome> {
        answers.iter().map(|(c, o)| (c.to_string(), *o)).collect()
    }

    #[test]
    fn the_check_decides_what_confirms() {
        let a = seen(&[("a", Outcome::Processed)]);
        let ab = seen(&[("a", Outcome::Processed), ("b", Outcome::Duplicate)]);
        // Before the CHECK nobody knows whether b is needed too.
        assert!(!Expected::of(false, None).confirmed_by(&ab));
        assert!(!Expected::of(false, Some("a")).confirmed_by(&a));
        assert!(Expected::of(true, None).confirmed_by(&a));
        assert!(Expected::of(true, Some("")).confirmed_by(&a));
        assert!(!Expected::of(true, Some("a,b")).confirmed_by(&a));
        assert!(Expected::of(true, Some("a,b")).confirmed_by(&ab));
        assert!(!Expected::of(true, None).confirmed_by(&seen(&[("a", Outcome::Rejected)])));
        assert!(!Expected::of(true, None).confirmed_by(&HashMap::new()));
        assert_eq!(confirmers(&seen(&[("b", Outcome::Processed), ("a", Outcome::Duplicate)])), "a, b");
    }
}
