//! The unix-socket protocol between `walden wal-push`/`wal-fetch` (thin
//! clients) and `walden daemon`.
//!
//! One connection per call. The client writes one JSON line (a [`Request`]);
//! the daemon answers with one JSON line (a [`Response`]). A successful fetch
//! is followed by exactly `len` bytes of verified WAL content, so the client
//! (which runs as PostgreSQL's user) writes the destination itself: the daemon
//! needs no write access to the data directory. Anything else — a closed
//! connection, a short body, an unparsable line — is a failure, never "absent".

use serde::{Deserialize, Serialize};

/// Longest request or response line either side accepts.
pub const MAX_LINE: usize = 64 << 10;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    /// Archive the WAL file at `path` (absolute; the daemon reads it).
    WalPush { path: String },
    /// Restore the WAL file `name`; its content follows the response.
    WalFetch { name: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    /// Archived durably / restored and verified.
    Ok,
    /// The file is definitively not in the archive (fetch only).
    NotFound,
    /// Anything else; PostgreSQL must retry (push) or stop recovery (fetch).
    Error,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    pub status: Status,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Bytes of content following the line (fetch, status ok).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub len: Option<u64>,
}

impl Response {
    pub fn ok() -> Self {
        Self {
            status: Status::Ok,
            message: None,
            len: None,
        }
    }

    pub fn content(len: u64) -> Self {
        Self {
            status: Status::Ok,
            message: None,
            len: Some(len),
        }
    }

    pub fn not_found(message: String) -> Self {
        Self {
            status: Status::NotFound,
            message: Some(message),
            len: None,
        }
    }

    pub fn error(message: String) -> Self {
        Self {
            status: Status::Error,
            message: Some(message),
            len: None,
        }
    }

    /// The response as one line, newline included.
    pub fn to_line(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec(self).unwrap_or_else(|_| {
            br#"{"status":"error","message":"cannot encode the response"}"#.to_vec()
        });
        v.push(b'\n');
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_round_trip() {
        let r = Request::WalPush {
            path: "/pg/pg_wal/000000010000000000000001".into(),
        };
        let s = serde_json::to_string(&r).unwrap();
        assert_eq!(
            s,
            r#"{"op":"wal-push","path":"/pg/pg_wal/000000010000000000000001"}"#
        );
        assert_eq!(serde_json::from_str::<Request>(&s).unwrap(), r);
        let line = Response::not_found("absent".into()).to_line();
        assert_eq!(
            std::str::from_utf8(&line).unwrap(),
            "{\"status\":\"not-found\",\"message\":\"absent\"}\n"
        );
        let back: Response = serde_json::from_slice(&Response::content(7).to_line()).unwrap();
        assert_eq!(back.len, Some(7));
    }
}
