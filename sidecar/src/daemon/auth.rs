//! Which bearer tokens `/v1` accepts. The token file is re-read on every
//! request; when its content changes, the token it replaced stays valid for
//! a grace period, so callers that still hold it (an operator replica, a
//! request in flight) are not refused while a rotation propagates.

use std::time::{Duration, Instant};

use subtle::ConstantTimeEq;

/// Tokens seen in the token file, newest first.
#[derive(Debug, Default)]
pub struct Tokens {
    current: String,
    /// The token `current` replaced, and when the change was noticed.
    previous: Option<(String, Instant)>,
}

fn same(a: &str, b: &str) -> bool {
    !a.is_empty() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

impl Tokens {
    /// Records the file's content as read at `now`. An unreadable or empty
    /// file (`""`) refuses everything, the previous token included.
    pub fn observe(&mut self, file: &str, now: Instant) {
        if file.is_empty() {
            *self = Tokens::default();
            return;
        }
        if file != self.current {
            let replaced = std::mem::replace(&mut self.current, file.to_string());
            self.previous = (!replaced.is_empty()).then_some((replaced, now));
        }
    }

    /// Whether `presented` is the current token, or the one it replaced
    /// less than `grace` ago.
    pub fn accepts(&self, presented: &str, now: Instant, grace: Duration) -> bool {
        if same(presented, &self.current) {
            return true;
        }
        match &self.previous {
            Some((old, since)) => same(presented, old) && now.duration_since(*since) < grace,
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_replaced_token_is_accepted_within_the_grace_only() {
        let grace = Duration::from_secs(60);
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        /// (name, file contents observed at second n, presented, at second, accepted)
        type Case<'a> = (&'a str, &'a [(&'a str, u64)], &'a str, u64, bool);
        let cases: [Case; 10] = [
            ("current token", &[("a", 0)], "a", 1, true),
            ("wrong token", &[("a", 0)], "b", 1, false),
            ("empty presented", &[("a", 0)], "", 1, false),
            ("no file content", &[("", 0)], "", 1, false),
            ("new token at once", &[("a", 0), ("b", 10)], "b", 10, true),
            ("old token in grace", &[("a", 0), ("b", 10)], "a", 69, true),
            (
                "old token after grace",
                &[("a", 0), ("b", 10)],
                "a",
                70,
                false,
            ),
            (
                "only one previous token",
                &[("a", 0), ("b", 10), ("c", 20)],
                "a",
                21,
                false,
            ),
            (
                "re-reading the same file keeps the grace start",
                &[("a", 0), ("b", 10), ("b", 60)],
                "a",
                70,
                false,
            ),
            (
                "emptied file refuses the old token too",
                &[("a", 0), ("", 10)],
                "a",
                11,
                false,
            ),
        ];
        for (name, seen, presented, when, want) in cases {
            let mut tokens = Tokens::default();
            for (file, s) in seen {
                tokens.observe(file, at(*s));
            }
            assert_eq!(tokens.accepts(presented, at(when), grace), want, "{name}");
        }
    }
}
