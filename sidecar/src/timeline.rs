//! Timeline histories: which timeline a WAL position belongs to.
//!
//! PostgreSQL writes `<TLI>.history` when a server is promoted: one line per
//! ancestor timeline, `parentTLI<TAB>switchpoint<TAB>reason`, meaning that the
//! parent ended (and the child began) at the switch point. Retention and
//! verification need this to order positions by where they sit in a history
//! instead of by segment name: timeline 2 can begin at a lower LSN than later
//! writes on timeline 1.

use std::collections::BTreeMap;

use crate::lsn::Lsn;
use crate::object::unseal;
use crate::storage::{Storage, StorageError};
use crate::wal::WalFile;

/// One ancestor of a timeline: it ran until `end` (exclusive), then its child took over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ancestor {
    pub tli: u32,
    pub end: Lsn,
}

/// Every known history file, by the timeline it describes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Histories(pub BTreeMap<u32, Vec<Ancestor>>);

#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("{object}: {reason}")]
    Unreadable { object: String, reason: String },
}

/// Parses the content of a history file; comment and blank lines are skipped.
pub fn parse_history(text: &str) -> Result<Vec<Ancestor>, String> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut fields = line.split_whitespace();
        let tli = fields
            .next()
            .and_then(|f| f.parse::<u32>().ok())
            .ok_or_else(|| format!("line {line:?} does not start with a timeline number"))?;
        let end = fields
            .next()
            .and_then(|f| f.parse::<Lsn>().ok())
            .ok_or_else(|| format!("line {line:?} has no switch point"))?;
        out.push(Ancestor { tli, end });
    }
    Ok(out)
}

impl Histories {
    /// The ancestors of `tli`, oldest first (empty for timeline 1 or an unknown one).
    pub fn ancestors(&self, tli: u32) -> &[Ancestor] {
        self.0.get(&tli).map(Vec::as_slice).unwrap_or(&[])
    }

    /// Where `tli` begins: its parent's switch point (0 for a root timeline).
    pub fn begin(&self, tli: u32) -> Lsn {
        self.ancestors(tli).last().map(|a| a.end).unwrap_or(Lsn(0))
    }

    /// True when position (`tli`, `lsn`) lies on the history of timeline `target`:
    /// on `target` itself, or on an ancestor before it switched away.
    pub fn on_line(&self, tli: u32, lsn: Lsn, target: u32) -> bool {
        tli == target
            || self
                .ancestors(target)
                .iter()
                .any(|a| a.tli == tli && lsn <= a.end)
    }

    /// The timeline that serves the WAL starting at `lsn` on the line of `target`.
    pub fn tli_at(&self, lsn: Lsn, target: u32) -> u32 {
        self.ancestors(target)
            .iter()
            .find(|a| lsn < a.end)
            .map(|a| a.tli)
            .unwrap_or(target)
    }

    /// Reads every `wal/<TLI>.history.zst` of the archive, verified.
    pub async fn load(storage: &dyn Storage) -> Result<Self, HistoryError> {
        let (histories, bad) = Self::load_checked(storage).await?;
        match bad.into_iter().next() {
            Some((object, reason)) => Err(HistoryError::Unreadable { object, reason }),
            None => Ok(histories),
        }
    }

    /// Like [`Histories::load`], but a damaged or malformed history file is
    /// returned as (object, reason) beside the readable ones instead of failing.
    pub async fn load_checked(
        storage: &dyn Storage,
    ) -> Result<(Self, Vec<(String, String)>), HistoryError> {
        let mut bad = Vec::new();
        let mut out = BTreeMap::new();
        for obj in storage.list("wal/").await? {
            let Some(WalFile::History(tli)) = WalFile::from_object_key(&obj.key) else {
                continue;
            };
            let object = format!("{}/{}", storage.url(), obj.key);
            let download = storage.get(&obj.key).await?;
            let mut bytes = Vec::new();
            if let Err(e) = unseal(&object, download, &mut bytes).await {
                bad.push((object, e.to_string()));
                continue;
            }
            match crate::wal::files::check_history(tli, &bytes) {
                Ok(ancestors) => {
                    out.insert(tli, ancestors);
                }
                Err(reason) => bad.push((object, reason)),
            }
        }
        Ok((Self(out), bad))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_history_and_answers_line_questions() {
        let h2 = parse_history("1\t0/3000060\tbefore 2026-01-01 00:00:00+00\n").unwrap();
        let h3 = parse_history(
            "# comment\n1\t0/3000060\tno recovery target specified\n\n2\t0/5000000\tat restore point \"x\"\n",
        )
        .unwrap();
        assert_eq!(
            h3,
            vec![
                Ancestor {
                    tli: 1,
                    end: Lsn(0x300_0060)
                },
                Ancestor {
                    tli: 2,
                    end: Lsn(0x500_0000)
                }
            ]
        );
        let h = Histories(BTreeMap::from([(2, h2), (3, h3)]));
        assert_eq!(h.begin(1), Lsn(0));
        assert_eq!(h.begin(3), Lsn(0x500_0000));
        assert!(h.on_line(1, Lsn(0x200_0000), 3));
        assert!(
            !h.on_line(1, Lsn(0x400_0000), 3),
            "after the switch: another branch"
        );
        assert!(h.on_line(2, Lsn(0x400_0000), 3));
        assert!(!h.on_line(3, Lsn(0x600_0000), 2));
        assert_eq!(h.tli_at(Lsn(0x100_0000), 3), 1);
        assert_eq!(h.tli_at(Lsn(0x300_0060), 3), 2);
        assert_eq!(h.tli_at(Lsn(0x900_0000), 3), 3);
        assert!(parse_history("x\t0/1\n").is_err());
        assert!(parse_history("1\tnope\n").is_err());
    }
}
