//! The restore marker: a small JSON file `walden restore` writes into the
//! data directory it restores, naming the source archive and the target.
//!
//! It lets a restore that runs again on a kept volume (a Fork or Follower pod
//! recreated, an operator upgrade rolling its StatefulSet) recognise its own
//! finished work and step aside (`--if-restored skip`), instead of failing
//! forever on a non-empty directory or, worse, restoring over the writes
//! made since. The marker is written `in-progress` into the empty directory
//! before anything else and rewritten `complete` after `pg_control` is in
//! place, so a restore that was killed half-way is recognised and redone:
//! everything in such a directory was written by walden, since the restore
//! began in an empty directory and PostgreSQL cannot start without
//! `pg_control`. Base backups never copy the marker (`backup::walk`).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::extract::PG_CONTROL;
use super::RestoreError;

/// File name of the marker, at the top of the data directory.
pub const MARKER: &str = "walden.restore.json";
/// The comment `restore` writes above its settings in postgresql.auto.conf.
pub const CONF_COMMENT: &str = "# Added by walden restore:";

/// What to do when the destination is not empty.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum IfRestored {
    /// Refuse any non-empty directory (one-off restores).
    #[default]
    Fail,
    /// Step aside when it holds a finished restore of the same source and
    /// target; redo a half-finished one (init containers).
    Skip,
}

/// Which restore a directory holds: the same identity means "this restore".
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Identity {
    /// Storage URL of the archive.
    pub source: String,
    /// The recovery target as `restore` prints it ("time …", "LSN …").
    pub target: String,
    /// Whether the target itself is recovered (not `--target-exclusive`).
    pub inclusive: bool,
    pub timeline: String,
    /// The backup asked for (`--backup`), `LATEST` when none.
    pub backup: String,
    pub standby: bool,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    InProgress,
    Complete,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Marker {
    pub version: u32,
    pub state: State,
    #[serde(flatten)]
    pub identity: Identity,
    /// The backup actually restored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restored_backup: Option<String>,
    /// Tablespace directories this restore writes into.
    #[serde(default)]
    pub tablespaces: Vec<PathBuf>,
}

/// What the destination holds, as far as the decision needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Found {
    /// Absent or empty.
    Free,
    /// A marker (and whether `global/pg_control` exists).
    Marker { marker: Marker, pg_control: bool },
    /// A marker that cannot be read.
    BadMarker(String),
    /// Anything else: whether `global/pg_control` exists, and the target the
    /// last "Added by walden restore" comment of postgresql.auto.conf names.
    Other {
        pg_control: bool,
        conf_target: Option<String>,
    },
}

/// The decision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Plan {
    Restore,
    /// Remove what the half-finished restore wrote, then restore.
    Redo(Marker),
    /// A finished restore of the same source and target: nothing to do.
    Skip(Marker),
    /// A finished walden restore without a marker (restored before markers
    /// existed) of the same target: write the marker, nothing else.
    Adopt,
    Refuse(String),
}

/// Decides what a restore does with `found` (pure).
pub fn plan(found: &Found, wanted: &Identity, if_restored: IfRestored) -> Plan {
    let not_empty = || {
        "is not empty: restore only into an empty or new directory, so nothing is overwritten"
            .to_string()
    };
    match (found, if_restored) {
        (Found::Free, _) => Plan::Restore,
        (_, IfRestored::Fail) => Plan::Refuse(not_empty()),
        (Found::BadMarker(why), IfRestored::Skip) => Plan::Refuse(format!(
            "holds a restore marker ({MARKER}) that cannot be read ({why}); nothing was changed"
        )),
        (Found::Marker { marker, .. }, IfRestored::Skip) if marker.state == State::InProgress => {
            Plan::Redo(marker.clone())
        }
        (Found::Marker { marker, pg_control }, IfRestored::Skip) => {
            if marker.identity != *wanted {
                Plan::Refuse(format!(
                    "holds a finished restore of {} to {} (backup {}); this restore asks for {} to {} (backup {}): \
                     a different restore needs a new, empty volume",
                    marker.identity.source,
                    describe(&marker.identity),
                    marker.identity.backup,
                    wanted.source,
                    describe(wanted),
                    wanted.backup
                ))
            } else if !pg_control {
                Plan::Refuse(format!(
                    "holds a finished restore, but {PG_CONTROL} is gone: it was changed after the restore; nothing was changed"
                ))
            } else {
                Plan::Skip(marker.clone())
            }
        }
        (
            Found::Other {
                pg_control: true,
                conf_target: Some(t),
            },
            IfRestored::Skip,
        ) if *t == wanted.target => Plan::Adopt,
        (Found::Other { .. }, IfRestored::Skip) => Plan::Refuse(format!(
            "{} and holds no finished walden restore of {} to {}",
            not_empty(),
            wanted.source,
            describe(wanted)
        )),
    }
}

fn describe(id: &Identity) -> String {
    let mut s = id.target.clone();
    if !id.inclusive {
        s.push_str(" (exclusive)");
    }
    s.push_str(&format!(", timeline {}", id.timeline));
    if id.standby {
        s.push_str(", as a standby");
    }
    s
}

fn local(path: &Path) -> impl Fn(std::io::Error) -> RestoreError + '_ {
    move |source| RestoreError::Local {
        path: path.display().to_string(),
        source,
    }
}

/// Looks at the destination (reads only).
pub fn inspect(dest: &Path) -> Result<Found, RestoreError> {
    match std::fs::read_dir(dest) {
        Ok(mut entries) => {
            if entries.next().is_none() {
                return Ok(Found::Free);
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Found::Free),
        Err(e) => return Err(local(dest)(e)),
    }
    let pg_control = dest.join(PG_CONTROL).is_file();
    let path = dest.join(MARKER);
    match std::fs::read(&path) {
        Ok(bytes) => Ok(match serde_json::from_slice::<Marker>(&bytes) {
            Ok(marker) => Found::Marker { marker, pg_control },
            Err(e) => Found::BadMarker(e.to_string()),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let conf = dest.join("postgresql.auto.conf");
            let conf_target = match std::fs::read_to_string(&conf) {
                Ok(text) => conf_comment_target(&text),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => return Err(local(&conf)(e)),
            };
            Ok(Found::Other {
                pg_control,
                conf_target,
            })
        }
        Err(e) => Err(local(&path)(e)),
    }
}

/// The target named by the last "Added by walden restore" comment.
pub fn conf_comment_target(conf: &str) -> Option<String> {
    conf.lines()
        .rev()
        .find(|l| l.starts_with(CONF_COMMENT))
        .and_then(|l| l.rsplit_once(", target "))
        .map(|(_, t)| t.trim().to_string())
}

/// Writes the marker atomically and durably: a crash leaves the previous
/// marker or this one, which is what a resumed restore trusts.
pub fn write(dest: &Path, marker: &Marker) -> Result<(), RestoreError> {
    let body = serde_json::to_vec_pretty(marker)
        .map_err(|e| RestoreError::Internal(format!("encoding the restore marker: {e}")))?;
    crate::durable::replace(&dest.join(MARKER), &body, 0o600).map_err(|e| RestoreError::Local {
        path: e.path.display().to_string(),
        source: e.source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(target: &str) -> Identity {
        Identity {
            source: "s3://b/pg".into(),
            target: target.into(),
            inclusive: true,
            timeline: "latest".into(),
            backup: "LATEST".into(),
            standby: false,
        }
    }

    fn marker(state: State, identity: Identity) -> Marker {
        Marker {
            version: 1,
            state,
            identity,
            restored_backup: Some("20260101T000000Z".into()),
            tablespaces: vec![],
        }
    }

    #[test]
    fn plan_table() {
        let want = id("time 2026-01-01T10:00:00+00:00");
        let other = id("time 2026-01-01T11:00:00+00:00");
        let done = |identity: Identity, pg_control| Found::Marker {
            marker: marker(State::Complete, identity),
            pg_control,
        };
        let half = |identity: Identity| Found::Marker {
            marker: marker(State::InProgress, identity),
            pg_control: false,
        };
        let other_dir = |pg_control, conf: Option<&str>| Found::Other {
            pg_control,
            conf_target: conf.map(str::to_string),
        };
        use IfRestored::{Fail, Skip};
        let cases: Vec<(&str, Found, IfRestored, &str)> = vec![
            ("empty", Found::Free, Fail, "restore"),
            ("empty, skip", Found::Free, Skip, "restore"),
            (
                "finished, fail mode",
                done(want.clone(), true),
                Fail,
                "refuse",
            ),
            ("finished, same", done(want.clone(), true), Skip, "skip"),
            (
                "finished, other target",
                done(other.clone(), true),
                Skip,
                "refuse",
            ),
            (
                "finished, other source",
                done(
                    Identity {
                        source: "s3://b/other".into(),
                        ..want.clone()
                    },
                    true,
                ),
                Skip,
                "refuse",
            ),
            (
                "finished, now exclusive",
                done(
                    Identity {
                        inclusive: false,
                        ..want.clone()
                    },
                    true,
                ),
                Skip,
                "refuse",
            ),
            (
                "finished, pg_control gone",
                done(want.clone(), false),
                Skip,
                "refuse",
            ),
            ("half-finished", half(want.clone()), Skip, "redo"),
            (
                "half-finished, other target",
                half(other.clone()),
                Skip,
                "redo",
            ),
            (
                "half-finished, fail mode",
                half(want.clone()),
                Fail,
                "refuse",
            ),
            (
                "unreadable marker",
                Found::BadMarker("eof".into()),
                Skip,
                "refuse",
            ),
            (
                "pre-marker restore of the same target",
                other_dir(true, Some("time 2026-01-01T10:00:00+00:00")),
                Skip,
                "adopt",
            ),
            (
                "pre-marker restore of another target",
                other_dir(true, Some("time 2026-01-01T11:00:00+00:00")),
                Skip,
                "refuse",
            ),
            (
                "pre-marker restore without pg_control",
                other_dir(false, Some("time 2026-01-01T10:00:00+00:00")),
                Skip,
                "refuse",
            ),
            (
                "someone else's files",
                other_dir(true, None),
                Skip,
                "refuse",
            ),
        ];
        for (name, found, mode, want_plan) in cases {
            let got = plan(&found, &want, mode);
            let kind = match &got {
                Plan::Restore => "restore",
                Plan::Redo(_) => "redo",
                Plan::Skip(_) => "skip",
                Plan::Adopt => "adopt",
                Plan::Refuse(_) => "refuse",
            };
            assert_eq!(kind, want_plan, "{name}: {got:?}");
        }
        match plan(&done(other, true), &want, Skip) {
            Plan::Refuse(msg) => {
                assert!(
                    msg.contains("11:00:00") && msg.contains("10:00:00"),
                    "{msg}"
                )
            }
            p => panic!("{p:?}"),
        }
    }

    #[test]
    fn the_conf_comment_names_the_last_target() {
        let conf = "max_connections = 50\n\n# Added by walden restore: backup A (LSN 0/1 .. 0/2), target time 2026-01-01T10:00:00+00:00\nrestore_command = 'x'\n\n# Added by walden restore: backup B (LSN 0/3 .. 0/4), target the end of the archive\n";
        assert_eq!(
            conf_comment_target(conf).as_deref(),
            Some("the end of the archive")
        );
        assert_eq!(conf_comment_target("max_connections = 50\n"), None);
    }

    #[test]
    fn markers_round_trip_and_inspect_sees_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(
            inspect(&dir.path().join("absent")).expect("inspect"),
            Found::Free
        );
        assert_eq!(inspect(dir.path()).expect("inspect"), Found::Free);
        let m = marker(State::Complete, id("the end of the archive"));
        write(dir.path(), &m).expect("write");
        assert_eq!(
            inspect(dir.path()).expect("inspect"),
            Found::Marker {
                marker: m,
                pg_control: false
            }
        );
        assert!(!crate::durable::temp_path(&dir.path().join(MARKER)).exists());
        std::fs::write(dir.path().join(MARKER), "{").expect("garble");
        assert!(matches!(
            inspect(dir.path()).expect("inspect"),
            Found::BadMarker(_)
        ));
    }
}
