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

/// At most this much of a bad value is echoed back in an error.
const ECHO_MAX: usize = 80;

/// A value for an error message: whole if short, else its start and its length.
pub fn echo(value: &str) -> String {
    if value.len() <= ECHO_MAX {
        return format!("{value:?}");
    }
    let mut end = ECHO_MAX;
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    format!("{:?}... ({} bytes)", &value[..end], value.len())
}

/// Checks a restore point name as PostgreSQL stores one (`pg_create_restore_point`
/// keeps at most 63 bytes), so a name that can never match fails now.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("target name is empty".into());
    }
    if name.chars().any(char::is_control) {
        return Err(format!(
            "target name {} contains a control character (a newline?); restore point names never do",
            echo(name)
        ));
    }
    if name.len() > 63 {
        return Err(format!(
            "target name {} is longer than 63 bytes; PostgreSQL's restore point names are at most 63",
            echo(name)
        ));
    }
    Ok(())
}

/// Checks `--target-timeline`: `latest`, `current`, or a timeline number (1 or more).
pub fn check_timeline(value: &str) -> Result<(), String> {
    if value == "latest" || value == "current" {
        return Ok(());
    }
    match value.parse::<u32>() {
        Ok(n) if n >= 1 => Ok(()),
        _ => Err(format!(
            "target timeline {} is not latest, current or a timeline number (1 or more)",
            echo(value)
        )),
    }
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
    ///
    /// Every recovery setting is written, the unused ones empty: an empty
    /// value in `postgresql.auto.conf` overrides whatever `postgresql.conf`
    /// says, so the server recovers with exactly these settings. The empty
    /// targets come before the chosen one, because PostgreSQL refuses a
    /// second non-empty target while it applies them in file order.
    pub fn render(&self, comment: &str) -> String {
        let mut out = format!("\n# {comment}\n");
        let mut set = |k: &str, v: String| out.push_str(&format!("{k} = {v}\n"));
        set("restore_command", conf_quote(&self.restore_command));
        set("recovery_target_timeline", conf_quote(&self.timeline));
        let chosen = match &self.target {
            Target::EndOfArchive => None,
            Target::Time(t) => Some((
                "recovery_target_time",
                t.format("%Y-%m-%d %H:%M:%S%.6f+00").to_string(),
            )),
            Target::Lsn(l) => Some(("recovery_target_lsn", l.to_string())),
            Target::Name(n) => Some(("recovery_target_name", n.clone())),
        };
        for key in TARGET_KEYS {
            if chosen.as_ref().is_none_or(|(k, _)| *k != key) {
                set(key, "''".into());
            }
        }
        if let Some((key, value)) = &chosen {
            set(key, conf_quote(value));
        }
        set(
            "recovery_target_inclusive",
            if self.inclusive || chosen.is_none() {
                "on".into()
            } else {
                "off".into()
            },
        );
        set(
            "recovery_target_action",
            conf_quote(if self.standby || chosen.is_none() {
                "pause"
            } else {
                &self.action
            }),
        );
        set(
            "primary_conninfo",
            conf_quote(self.primary_conninfo.as_deref().unwrap_or("")),
        );
        for key in [
            "primary_slot_name",
            "recovery_end_command",
            "archive_cleanup_command",
        ] {
            set(key, "''".into());
        }
        out
    }
}

/// How the comment above a restore's settings begins.
pub const COMMENT_PREFIX: &str = "# Added by walden restore";

/// The mutually exclusive recovery targets.
const TARGET_KEYS: [&str; 5] = [
    "recovery_target",
    "recovery_target_lsn",
    "recovery_target_name",
    "recovery_target_time",
    "recovery_target_xid",
];

/// Settings a restore decides alone: a line of the backup's
/// `postgresql.auto.conf` setting one of these is removed.
const RECOVERY_KEYS: [&str; 13] = [
    "recovery_target",
    "recovery_target_lsn",
    "recovery_target_name",
    "recovery_target_time",
    "recovery_target_xid",
    "recovery_target_inclusive",
    "recovery_target_timeline",
    "recovery_target_action",
    "restore_command",
    "primary_conninfo",
    "primary_slot_name",
    "recovery_end_command",
    "archive_cleanup_command",
];

/// The setting a configuration line assigns, lower-cased (`None` for comments and blanks).
fn setting_name(line: &str) -> Option<String> {
    let line = line.trim_start();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let end = line
        .find(|c: char| c == '=' || c.is_whitespace())
        .unwrap_or(line.len());
    Some(line[..end].to_ascii_lowercase())
}

/// The restored server's `postgresql.auto.conf` and what was taken out of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AutoConf {
    pub text: String,
    /// Lines of the backup's file that set recovery settings, removed.
    pub removed: Vec<String>,
}

/// Builds `postgresql.auto.conf` from the backup's copy: every inherited
/// recovery setting is removed (a server restored to a target and then backed
/// up would otherwise hand its old target to every restore of that backup),
/// then this restore's settings are appended.
pub fn rewrite_auto_conf(existing: &str, recovery: &RecoverySettings, comment: &str) -> AutoConf {
    let mut text = String::with_capacity(existing.len() + 1024);
    let mut removed = Vec::new();
    for line in existing.lines() {
        if line.trim_start().starts_with(COMMENT_PREFIX) {
            continue;
        }
        match setting_name(line) {
            Some(name) if RECOVERY_KEYS.contains(&name.as_str()) => {
                removed.push(line.trim().to_string())
            }
            _ => {
                text.push_str(line);
                text.push('\n');
            }
        }
    }
    while text.ends_with("\n\n") {
        text.pop();
    }
    text.push_str(&recovery.render(comment));
    AutoConf { text, removed }
}

/// Lines of `postgresql.conf` that set recovery settings: they stay in the
/// file but the restore's `postgresql.auto.conf` overrides every one of them.
pub fn overridden_in_conf(conf: &str) -> Vec<String> {
    conf.lines()
        .filter(|l| setting_name(l).is_some_and(|n| RECOVERY_KEYS.contains(&n.as_str())))
        .map(|l| l.trim().to_string())
        .collect()
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

    /// The settings a rendered block assigns, in order.
    fn assigned(text: &str) -> Vec<(String, String)> {
        text.lines()
            .filter_map(|l| l.split_once(" = "))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// (settings, signal file, the one non-empty target, inclusive, action, conninfo)
    type RenderCase = (
        RecoverySettings,
        &'static str,
        Option<(&'static str, &'static str)>,
        &'static str,
        &'static str,
        &'static str,
    );

    #[test]
    fn renders_every_recovery_setting_with_the_chosen_target_last() {
        let t: DateTime<Utc> = "2026-11-24T01:30:00.5Z".parse().unwrap();
        let cases: Vec<RenderCase> = vec![
            (base(), "recovery.signal", None, "on", "'pause'", "''"),
            (
                RecoverySettings {
                    target: Target::Time(t),
                    ..base()
                },
                "recovery.signal",
                Some(("recovery_target_time", "'2026-11-24 01:30:00.500000+00'")),
                "on",
                "'promote'",
                "''",
            ),
            (
                RecoverySettings {
                    target: Target::Lsn(Lsn(0x300_0060)),
                    inclusive: false,
                    ..base()
                },
                "recovery.signal",
                Some(("recovery_target_lsn", "'0/3000060'")),
                "off",
                "'promote'",
                "''",
            ),
            (
                RecoverySettings {
                    target: Target::Name("it's here".into()),
                    action: "shutdown".into(),
                    ..base()
                },
                "recovery.signal",
                Some(("recovery_target_name", "'it''s here'")),
                "on",
                "'shutdown'",
                "''",
            ),
            (
                RecoverySettings {
                    standby: true,
                    primary_conninfo: Some("host=db port=5432".into()),
                    ..base()
                },
                "standby.signal",
                None,
                "on",
                "'pause'",
                "'host=db port=5432'",
            ),
        ];
        for (settings, signal, chosen, inclusive, action, conninfo) in cases {
            let text = settings.render("walden restore");
            assert_eq!(settings.signal_file(), signal);
            let got = assigned(&text);
            let value = |k: &str| {
                let v: Vec<&str> = got
                    .iter()
                    .filter(|(n, _)| n == k)
                    .map(|(_, v)| v.as_str())
                    .collect();
                assert_eq!(v.len(), 1, "{k} set once in:\n{text}");
                v[0].to_string()
            };
            assert_eq!(value("restore_command"), "'walden wal-fetch %f %p'");
            assert_eq!(value("recovery_target_timeline"), "'latest'");
            assert_eq!(value("recovery_target_inclusive"), inclusive);
            assert_eq!(value("recovery_target_action"), action);
            assert_eq!(value("primary_conninfo"), conninfo);
            for k in [
                "primary_slot_name",
                "recovery_end_command",
                "archive_cleanup_command",
            ] {
                assert_eq!(value(k), "''", "{k}");
            }
            let targets: Vec<&(String, String)> = got
                .iter()
                .filter(|(k, _)| TARGET_KEYS.contains(&k.as_str()))
                .collect();
            assert_eq!(targets.len(), TARGET_KEYS.len(), "{text}");
            match chosen {
                None => assert!(targets.iter().all(|(_, v)| v == "''"), "{text}"),
                Some((k, v)) => {
                    let last = targets.last().unwrap();
                    assert_eq!((last.0.as_str(), last.1.as_str()), (k, v), "{text}");
                    assert!(targets[..targets.len() - 1].iter().all(|(_, v)| v == "''"));
                }
            }
        }
    }

    #[test]
    fn inherited_recovery_settings_are_removed_and_reported() {
        let inherited = "# Do not edit this file manually!\n\
            shared_buffers = '64MB'\n\
            \n\
            # Added by walden restore: backup X, target time 2026-01-01\n\
            restore_command = 'WALDEN_STORAGE=file:///old walden wal-fetch %f %p'\n\
            Recovery_Target_Time = '2026-01-01 00:00:00+00'\n\
            recovery_target_inclusive=on\n\
            recovery_target_action = 'promote'\n\
            primary_conninfo = 'host=old'\n\
            primary_slot_name = 'slot'\n\
            recovery_end_command = 'rm -rf /'\n\
            archive_cleanup_command = 'pg_archivecleanup /x %r'\n\
            # recovery_target_lsn = '0/1' (a comment stays)\n\
            work_mem = '8MB'\n";
        let settings = RecoverySettings {
            target: Target::Lsn(Lsn(0x500_0000)),
            ..base()
        };
        let out = rewrite_auto_conf(inherited, &settings, "walden restore");
        assert_eq!(out.removed.len(), 8, "{:?}", out.removed);
        assert!(out.removed[1].starts_with("Recovery_Target_Time"));
        assert!(out
            .text
            .starts_with("# Do not edit this file manually!\nshared_buffers = '64MB'\n"));
        assert!(
            !out.text.contains("backup X"),
            "the old restore's comment goes with its settings:\n{}",
            out.text
        );
        assert!(out
            .text
            .contains("# recovery_target_lsn = '0/1' (a comment stays)\nwork_mem = '8MB'\n"));
        let got = assigned(&out.text);
        let lsn: Vec<_> = got
            .iter()
            .filter(|(k, _)| k == "recovery_target_lsn")
            .collect();
        assert_eq!(lsn.len(), 1);
        assert_eq!(lsn[0].1, "'0/5000000'");
        assert!(!out.text.contains("old"), "{}", out.text);
        assert!(!out.text.to_lowercase().contains("2026-01-01 00:00:00"));

        let conf = "#recovery_target_time = ''\nrecovery_target_name = 'x'\nport = 5432\n";
        assert_eq!(overridden_in_conf(conf), vec!["recovery_target_name = 'x'"]);
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
    fn refuses_targets_postgres_would_refuse_later() {
        assert_eq!(check_name("before-upgrade"), Ok(()));
        assert_eq!(check_name(&"x".repeat(63)), Ok(()));
        for (bad, needle) in [
            ("", "empty"),
            ("two\nlines", "control character"),
            (&"y".repeat(5000), "longer than 63 bytes"),
        ] {
            let err = check_name(bad).unwrap_err();
            assert!(err.contains(needle), "{err}");
            assert!(err.len() < 300, "the whole value is echoed: {err}");
        }
        for ok in ["latest", "current", "1", "12"] {
            assert_eq!(check_timeline(ok), Ok(()), "{ok}");
        }
        for bad in ["abc", "0", "-1", "", "0x2"] {
            assert!(
                check_timeline(bad).unwrap_err().contains("not latest"),
                "{bad}"
            );
        }
        assert_eq!(echo("short"), "\"short\"");
        assert!(echo(&"é".repeat(100)).ends_with("... (200 bytes)"));
    }

    #[test]
    fn quoting_survives_hostile_values() {
        assert_eq!(conf_quote(r"a'b\c"), r"'a''b\\c'");
        assert_eq!(shell_quote("s3://bucket/prefix"), "s3://bucket/prefix");
        assert_eq!(shell_quote("a b'c"), r"'a b'\''c'");
        assert_eq!(shell_quote(""), "''");
    }
}
