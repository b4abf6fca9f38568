//! What the walden daemon and the operator must agree on, in one place, so
//! that a change on one side that the other does not follow fails to
//! compile instead of failing in a pod:
//!
//! - [`api`]: the bodies of the daemon's HTTP API (`/v1/status`, backups, promotion);
//! - [`pod`]: the port, paths and environment variable names of the pods the operator builds;
//! - [`proof`]: the report `walden restore-test` leaves as its termination message.
//!
//! Only serde and chrono: both sides and the tests can depend on it cheaply.

pub mod api;
pub mod duration;
pub mod pod;
pub mod proof;

/// `s` cut to at most `max` bytes (on a character boundary), marked with `…`:
/// for messages that must fit a termination log, a condition or an Event.
pub fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::truncate;

    #[test]
    fn truncate_table() {
        for (s, max, want) in [
            ("short", 10, "short"),
            ("exactly10!", 10, "exactly10!"),
            ("a longer message", 8, "a longer…"),
            ("ééé", 3, "é…"),
            ("", 0, ""),
        ] {
            assert_eq!(truncate(s, max), want, "{s:?} {max}");
        }
    }
}
