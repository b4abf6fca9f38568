//! What a timeline history file and a backup history file must hold. The
//! archive is write-once, so a garbage file stored under such a name could
//! never be replaced by the real one; both are checked before they are
//! stored, and by `verify`. Pure functions.

use crate::lsn::Lsn;
use crate::timeline::{parse_history, Ancestor};

use super::SegmentName;

/// History files are a line per ancestor; anything this large is not one.
pub const MAX_HISTORY_BYTES: u64 = 1 << 20;

/// Checks the content of `<tli>.history`: UTF-8, at least one ancestor,
/// ancestors on increasing timelines below `tli`, switch points in order.
pub fn check_history(tli: u32, bytes: &[u8]) -> Result<Vec<Ancestor>, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "it is not text".to_string())?;
    let ancestors = parse_history(text)?;
    if ancestors.is_empty() {
        return Err(format!(
            "it names no parent timeline (a history file of timeline {tli} has at least one line)"
        ));
    }
    let mut prev: Option<&Ancestor> = None;
    for a in &ancestors {
        if a.tli >= tli {
            return Err(format!(
                "it names timeline {} as an ancestor of timeline {tli}",
                a.tli
            ));
        }
        if let Some(p) = prev {
            if a.tli <= p.tli || a.end < p.end {
                return Err(format!(
                    "its ancestors are out of order: timeline {} at {} after timeline {} at {}",
                    a.tli, a.end, p.tli, p.end
                ));
            }
        }
        prev = Some(a);
    }
    Ok(ancestors)
}

/// Checks the content of `<segment>.<offset>.backup`: it starts with
/// `START WAL LOCATION: <lsn> (file <segment>)` matching its own name, and
/// records a stop location.
pub fn check_backup_history(segment: SegmentName, offset: u32, bytes: &[u8]) -> Result<(), String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "it is not text".to_string())?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
            .ok_or_else(|| format!("it has no {name:?} line"))
    };
    let start = field("START WAL LOCATION:")?;
    let (lsn, file) = start
        .split_once(" (file ")
        .ok_or_else(|| format!("its start location {start:?} names no file"))?;
    let lsn: Lsn = lsn
        .parse()
        .map_err(|e| format!("its start location {lsn:?}: {e}"))?;
    let file = file.trim_end_matches(')');
    if file != segment.to_string() {
        return Err(format!(
            "it says the backup started in {file}, but its name says {segment}"
        ));
    }
    // Segments are at least 1 MiB, so the offset agrees with the LSN below that.
    if lsn.0 % (1 << 20) != u64::from(offset % (1 << 20)) {
        return Err(format!(
            "its start location {lsn} does not match the offset {offset:08X} in its name"
        ));
    }
    let stop = field("STOP WAL LOCATION:")?;
    let stop_lsn = stop.split_whitespace().next().unwrap_or_default();
    stop_lsn
        .parse::<Lsn>()
        .map_err(|e| format!("its stop location {stop_lsn:?}: {e}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_files() {
        let cases: Vec<(u32, &[u8], Result<usize, &str>)> = vec![
            (2, b"1\t0/3000060\tno recovery target specified\n", Ok(1)),
            (
                3,
                b"1\t0/3000060\tx\n\n2\t0/5000000\tat restore point \"y\"\n",
                Ok(2),
            ),
            (2, b"", Err("names no parent")),
            (2, b"\n# only a comment\n", Err("names no parent")),
            (
                2,
                b"garbage here\n",
                Err("does not start with a timeline number"),
            ),
            (2, b"1\tnope\n", Err("no switch point")),
            (2, b"2\t0/3000060\tx\n", Err("as an ancestor of timeline 2")),
            (
                4,
                b"2\t0/5000000\tx\n1\t0/3000000\tx\n",
                Err("out of order"),
            ),
            (2, &[0xff, 0xfe, 0x00], Err("not text")),
        ];
        for (tli, bytes, want) in cases {
            match (check_history(tli, bytes), want) {
                (Ok(a), Ok(n)) => assert_eq!(a.len(), n),
                (Err(e), Err(w)) => assert!(e.contains(w), "{e}"),
                (got, want) => panic!("{bytes:?}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn backup_history_files() {
        let seg = SegmentName::parse("000000010000000000000002").unwrap();
        let real = b"START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\n\
            STOP WAL LOCATION: 0/2000138 (file 000000010000000000000002)\n\
            CHECKPOINT LOCATION: 0/2000060\nBACKUP METHOD: streamed\nBACKUP FROM: primary\n\
            START TIME: 2026-12-03 09:00:00 UTC\nLABEL: walden\nSTART TIMELINE: 1\n\
            STOP TIME: 2026-12-03 09:00:01 UTC\nSTOP TIMELINE: 1\n";
        assert_eq!(check_backup_history(seg, 0x28, real), Ok(()));
        let other = SegmentName::parse("000000010000000000000003").unwrap();
        for (s, bytes, needle) in [
            (seg, &b""[..], "no \"START WAL LOCATION:\""),
            (seg, &b"hello\n"[..], "no \"START WAL LOCATION:\""),
            (other, &real[..], "its name says 000000010000000000000003"),
            (
                seg,
                &b"START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\n"[..],
                "no \"STOP WAL LOCATION:\"",
            ),
            (
                seg,
                &b"START WAL LOCATION: zz (file 000000010000000000000002)\nSTOP WAL LOCATION: 0/1\n"[..],
                "start location",
            ),
        ] {
            let err = check_backup_history(s, 0x28, bytes).unwrap_err();
            assert!(err.contains(needle), "{err}");
        }
    }
}
