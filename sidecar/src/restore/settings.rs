//! Recovery settings written into a restored data directory, and the parsing
//! of recovery targets. Pure functions: what goes into `postgresql.auto.conf`
//! is decided here and tested as data.

use chrono::{DateTime, NaiveDateTime, Utc};

use crate::catalog::Target;

/// Parses a target time. A zone is required: a time without one means
/// different moments on different machines, which is not a safe target.
pub fn parse_time(s: &str) -> Result<DateTime<Utc>, String> {
    let s = s.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    for fmt in [
        "%Y-%m-%d %H:%M:%S%.f%#z",
        "%Y-%m-%d %H:%M:%S%.f%:z",
        "%Y-%m-%dT%H:%M:%S%.f%#z",
    ] {
        if let Ok(t) = DateTime::parse_from_str(s, fmt) {
            return Ok(t.with_timezone(&Utc));
        }
    }
    if let Some(naive) = s.strip_suffix(" UTC").or_else(|| s.strip_suffix(" utc")) {
        if let Ok(t) = NaiveDateTime::parse_from_str(naive, "%Y-%m-%d %H:%M:%S%.f") {
            return Ok(t.and_utc());
        }
    }
    let zoneless = NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S%.f").is_ok()
        || NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f").is_ok();
    if zoneless {
        return Err(format!(
            "target time {s:?} has no time zone; add one, e.g. {s}Z or {s}+00:00"
        ));
    }
    Err(format!("target time {s:?} is not a time; expected RFC 3339, e.g. 2026-11-24T01:30:00Z or '2026-11-24 01:30:00.123456+00'"))
}

/// How the restored server recovers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecoverySettings {
    pub restore_command: String,
    pub target: Target,
    /// Stop just after the target (`true`, PostgreSQL's default) or just before it.
    pub inclusive: bool,
    /// `latest`, `current`, or a timeline number.
    pub timeline: String,
    /// What to do at the target: `promote`, `pause` or `shutdown`.
    pub action: String,
    /// A follower: `standby.signal` instead of `recovery.signal`.
    pub standby: bool,
    pub primary_conninfo: Option<String>,
}

/// Quotes a value for postgresql.conf: single quotes, `'` doubled, `\` escaped.
pub fn conf_quote(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "''"))
}

/// Quotes a word for `sh` (restore_command runs through the shell).
pub fn shell_quote(value: &str) -> String {
    if !value.is_empty()
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./:=@,+".contains(&b))
    {
        value.to_string()
    } else {
        format!("'{}'", value.replace('\'', "'\\''"))
    }
}

impl RecoverySettings {
    /// The signal file PostgreSQL looks for.
    pub fn signal_file(&self) -> &'static str {
        if self.standby {
            "standby.signal"
        } else {
            "recovery.signal"
        }
    }

    /// Lines appended to `postgresql.auto.conf` (read last, so they win).
    pub fn render(&self, comment: &str) -> String {
        let mut out = format!("\n# {comment}\n");
        let mut set = |k: &str, v: String| out.push_str(&format!("{k} = {v}\n"));
        set("restore_command", conf_quote(&self.restore_command));
        set("recovery_target_timeline", conf_quote(&self.timeline));
        match &self.target {
            Target::EndOfArchive => {}
            Target::Time(t) => set(
                "recovery_target_time",
                conf_quote(&t.format("%Y-%m-%d %H:%M:%S%.6f+00").to_string()),
            ),
            Target::Lsn(l) => set("recovery_target_lsn", conf_quote(&l.to_string())),
            Target::Name(n) => set("recovery_target_name", conf_quote(n)),
        }
        if self.target != Target::EndOfArchive {
            set(
                "recovery_target_inclusive",
                if self.inclusive {
                    "on".into()
                } else {
                    "off".into()
                },
            );
            if !self.standby {
                set("recovery_target_action", conf_quote(&self.action));
            }
        }
        if let Some(c) = &self.primary_conninfo {
            set("primary_conninfo", conf_quote(c));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lsn::Lsn;

    fn base() -> RecoverySettings {
        RecoverySettings {
            restore_command: "walden wal-fetch %f %p".into(),
            target: Target::EndOfArchive,
            inclusive: true,
            timeline: "latest".into(),
            action: "promote".into(),
            standby: false,
            primary_conninfo: None,
        }
    }

    #[test]
    fn renders_what_each_kind_of_restore_needs() {
        let t: DateTime<Utc> = "2026-11-24T01:30:00.5Z".parse().unwrap();
        let cases: Vec<(RecoverySettings, &str, Vec<&str>, Vec<&str>)> = vec![
            (
                base(),
                "recovery.signal",
                vec![
                    "restore_command = 'walden wal-fetch %f %p'",
                    "recovery_target_timeline = 'latest'",
                ],
                vec!["recovery_target_action", "recovery_target_inclusive"],
            ),
            (
                RecoverySettings {
                    target: Target::Time(t),
                    ..base()
                },
                "recovery.signal",
                vec![
                    "recovery_target_time = '2026-11-24 01:30:00.500000+00'",
                    "recovery_target_inclusive = on",
                    "recovery_target_action = 'promote'",
                ],
                vec!["recovery_target_lsn ="],
            ),
            (
                RecoverySettings {
                    target: Target::Lsn(Lsn(0x300_0060)),
                    inclusive: false,
                    ..base()
                },
                "recovery.signal",
                vec![
                    "recovery_target_lsn = '0/3000060'",
                    "recovery_target_inclusive = off",
                ],
                vec!["recovery_target_time ="],
            ),
            (
                RecoverySettings {
                    target: Target::Name("it's here".into()),
                    ..base()
                },
                "recovery.signal",
                vec!["recovery_target_name = 'it''s here'"],
                vec![],
            ),
            (
                RecoverySettings {
                    standby: true,
                    primary_conninfo: Some("host=db port=5432".into()),
                    ..base()
                },
                "standby.signal",
                vec!["primary_conninfo = 'host=db port=5432'"],
                vec!["recovery_target_action"],
            ),
        ];
        for (settings, signal, present, absent) in cases {
            let text = settings.render("walden restore");
            assert_eq!(settings.signal_file(), signal);
            for p in present {
                assert!(text.contains(p), "missing {p:?} in:\n{text}");
            }
            for a in absent {
                assert!(!text.contains(a), "unexpected {a:?} in:\n{text}");
            }
        }
    }

    #[test]
    fn parses_target_times_and_refuses_ambiguous_ones() {
        let want: DateTime<Utc> = "2026-11-24T01:30:00Z".parse().unwrap();
        for ok in [
            "2026-11-24T01:30:00Z",
            "2026-11-24T02:30:00+01:00",
            "2026-11-24 01:30:00+00",
            "2026-11-24 01:30:00.000+00:00",
            "2026-11-24 01:30:00 UTC",
        ] {
            assert_eq!(parse_time(ok), Ok(want), "{ok}");
        }
        assert!(parse_time("2026-11-24 01:30:00")
            .unwrap_err()
            .contains("no time zone"));
        assert!(parse_time("yesterday").unwrap_err().contains("not a time"));
        assert!(parse_time("2026-13-45T99:00:00Z").is_err());
    }

    #[test]
    fn quoting_survives_hostile_values() {
        assert_eq!(conf_quote(r"a'b\c"), r"'a''b\\c'");
        assert_eq!(shell_quote("s3://bucket/prefix"), "s3://bucket/prefix");
        assert_eq!(shell_quote("a b'c"), r"'a b'\''c'");
        assert_eq!(shell_quote(""), "''");
    }
}
