//! The tamper-evident audit log (`enforcer run --audit-log FILE`): one JSON object per line,
//! appended, each carrying the SHA-256 of the previous line.
//!
//! Every record is `{"seq":N,"time":"…","kind":"…", <kind-specific fields>, "prev":"<hex>"}`:
//! `seq` counts from 1, `prev` is the SHA-256 (lowercase hex) of the previous line's exact bytes
//! without its newline, [`GENESIS`] for the first line of a file. The hash is over the line as
//! written, so verification needs no canonical re-serialisation: [`verify`] hashes each line
//! and compares it with the `prev` of the next.
//!
//! What a chain cannot show: records deleted from the end (and an edit of the very last
//! record, which no later record vouches for) look like a shorter, intact log. [`verify`]
//! reports the last `seq` and hash so that an external system can keep them, and takes the
//! `seq` it must reach (`--expect-seq`) and a `SEQ:HASH` it must contain (`--anchor`).
//!
//! Anyone who can write the file can also rewrite the whole chain from the edit onwards: the
//! chain makes edits evident to whoever kept a later hash, it does not prevent them. Ship the
//! log (or the periodic hashes) off the host for that.
use std::{
    fs::{File, OpenOptions},
    io::{Read as _, Seek as _, SeekFrom, Write as _},
    os::{fd::AsRawFd as _, unix::fs::OpenOptionsExt as _},
    path::{Path, PathBuf},
    sync::Mutex,
    time::SystemTime,
};

use serde::Serialize;
use serde_json::Value;
use sha2::{Digest as _, Sha256};

/// The `prev` of the first record of a file.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Fields every record has; kind-specific fields may not use these names.
pub const RESERVED_FIELDS: [&str; 4] = ["seq", "time", "kind", "prev"];

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit log {path}: {context}: {source}")]
    Io {
        path: PathBuf,
        context: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "audit log {path} is in use by another process (an enforcer daemon already writes it; \
         give each daemon its own --audit-log)"
    )]
    Locked { path: PathBuf },
    #[error("audit record `{kind}`: fields must be a JSON object")]
    NotAnObject { kind: String },
    #[error("audit record `{kind}`: field `{field}` is reserved (seq, time, kind, prev)")]
    ReservedField { kind: String, field: String },
}

fn io_error(path: &Path, context: &'static str) -> impl FnOnce(std::io::Error) -> AuditError {
    let path = path.to_path_buf();
    move |source| AuditError::Io {
        path,
        context,
        source,
    }
}

/// SHA-256 of `line` (without its newline), lowercase hex.
pub fn line_hash(line: &[u8]) -> String {
    let digest = Sha256::digest(line);
    let mut hex = String::with_capacity(64);
    for byte in digest {
        hex.push_str(&format!("{byte:02x}"));
    }
    hex
}

/// Now, as the `time` field spells it (RFC 3339, UTC, milliseconds).
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

struct Chain {
    file: File,
    next_seq: u64,
    prev: String,
}

/// An open audit log. Appends are serialised, written with one `write` and synced to disk.
pub struct AuditLog {
    path: PathBuf,
    chain: Mutex<Chain>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("path", &self.path)
            .finish()
    }
}

impl AuditLog {
    /// Opens `path` for appending (created with mode 0640, and its directory, when missing) and
    /// continues the chain from its last line. Takes an exclusive lock: two daemons writing one
    /// file would fork the chain. A last line cut short (a crash in the middle of a write) is
    /// terminated and chained to as it is; `verify` reports it.
    pub fn open(path: &Path) -> Result<AuditLog, AuditError> {
        if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io_error(path, "creating its directory"))?;
        }
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o640)
            .open(path)
            .map_err(io_error(path, "opening"))?;
        // SAFETY: flock on a file descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let error = std::io::Error::last_os_error();
            return Err(if error.kind() == std::io::ErrorKind::WouldBlock {
                AuditError::Locked {
                    path: path.to_path_buf(),
                }
            } else {
                io_error(path, "locking")(error)
            });
        }
        let (last_line, lines, terminated) =
            last_line(&mut file).map_err(io_error(path, "reading"))?;
        if !terminated {
            file.write_all(b"\n")
                .map_err(io_error(path, "terminating a cut-short last line"))?;
        }
        let (next_seq, prev) = match last_line {
            None => (1, GENESIS.to_string()),
            Some(line) => {
                let seq = serde_json::from_slice::<Value>(&line)
                    .ok()
                    .and_then(|record| record.get("seq").and_then(Value::as_u64))
                    .unwrap_or(lines);
                (seq + 1, line_hash(&line))
            }
        };
        Ok(AuditLog {
            path: path.to_path_buf(),
            chain: Mutex::new(Chain {
                file,
                next_seq,
                prev,
            }),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends a record of `kind` with `fields` (a JSON object whose keys are not
    /// [`RESERVED_FIELDS`]). Returns its `seq`. On a failed write the file is cut back to where
    /// it was, so the chain stays intact.
    pub fn append(&self, kind: &str, fields: Value) -> Result<u64, AuditError> {
        let Value::Object(fields) = fields else {
            return Err(AuditError::NotAnObject {
                kind: kind.to_string(),
            });
        };
        if let Some(field) = fields
            .keys()
            .find(|key| RESERVED_FIELDS.contains(&key.as_str()))
        {
            return Err(AuditError::ReservedField {
                kind: kind.to_string(),
                field: field.clone(),
            });
        }
        let mut chain = self.chain.lock().unwrap_or_else(|p| p.into_inner());
        let mut line = format!(
            "{{\"seq\":{},\"time\":{},\"kind\":{}",
            chain.next_seq,
            json(&now_rfc3339()),
            json(&kind)
        );
        for (key, value) in &fields {
            line.push(',');
            line.push_str(&json(key));
            line.push(':');
            line.push_str(&value.to_string());
        }
        line.push_str(&format!(",\"prev\":{}}}", json(&chain.prev)));
        let before = chain
            .file
            .metadata()
            .map_err(io_error(&self.path, "reading its length"))?
            .len();
        let mut bytes = line.clone().into_bytes();
        bytes.push(b'\n');
        let written = chain
            .file
            .write_all(&bytes)
            .and_then(|()| chain.file.sync_data());
        if let Err(error) = written {
            let _ = chain.file.set_len(before);
            return Err(io_error(&self.path, "appending a record")(error));
        }
        let seq = chain.next_seq;
        chain.prev = line_hash(line.as_bytes());
        chain.next_seq += 1;
        Ok(seq)
    }
}

/// JSON text of a value (strings and keys cannot fail to serialise).
fn json<T: Serialize + ?Sized>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_else(|_| "null".to_string())
}

/// The last line of `file` (without its newline), how many lines the file has when that line
/// cannot be parsed (else 0), and whether the file ends with a newline (an empty file does).
fn last_line(file: &mut File) -> std::io::Result<(Option<Vec<u8>>, u64, bool)> {
    let len = file.metadata()?.len();
    if len == 0 {
        return Ok((None, 0, true));
    }
    // Read a growing tail until it holds a whole last line.
    let mut window: u64 = 64 * 1024;
    loop {
        let start = len.saturating_sub(window);
        file.seek(SeekFrom::Start(start))?;
        let mut tail = Vec::new();
        std::io::Read::by_ref(file)
            .take(len - start)
            .read_to_end(&mut tail)?;
        let terminated = tail.last() == Some(&b'\n');
        let body = if terminated {
            &tail[..tail.len() - 1]
        } else {
            &tail[..]
        };
        match body.iter().rposition(|&b| b == b'\n') {
            Some(newline) => {
                let line = body[newline + 1..].to_vec();
                let lines = count_lines_if_unparsable(file, &line)?;
                return Ok((Some(line), lines, terminated));
            }
            None if start == 0 => {
                let line = body.to_vec();
                return Ok((Some(line), 1, terminated));
            }
            None => window = window.saturating_mul(4),
        }
    }
}

fn count_lines_if_unparsable(file: &mut File, line: &[u8]) -> std::io::Result<u64> {
    if serde_json::from_slice::<Value>(line)
        .ok()
        .and_then(|record| record.get("seq").and_then(Value::as_u64))
        .is_some()
    {
        return Ok(0);
    }
    file.seek(SeekFrom::Start(0))?;
    let mut all = Vec::new();
    file.read_to_end(&mut all)?;
    let newlines = all.iter().filter(|&&b| b == b'\n').count() as u64;
    Ok(newlines + u64::from(all.last() != Some(&b'\n')))
}

/// What kind of tampering [`verify`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Tampering {
    /// A record's bytes changed: its hash no longer matches the next record's `prev`, or its own
    /// `seq` no longer follows while its `prev` still matches.
    Edited,
    /// Not a JSON audit record (edited, or a write cut short).
    Malformed,
    /// `seq` jumps forward: records are missing.
    Deleted,
    /// `seq` goes back or repeats: records moved or added.
    Reordered,
    /// A `prev` that matches no record: a record that was never written by the chain.
    Inserted,
    /// The log ends before the expected `seq`, or misses an anchored hash.
    Truncated,
}

/// The first problem [`verify`] found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// 1-based line number of the record at fault.
    pub line: usize,
    pub seq: Option<u64>,
    pub tampering: Tampering,
    pub message: String,
}

/// The result of [`verify`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Verification {
    pub records: usize,
    pub last_seq: Option<u64>,
    /// SHA-256 of the last line ([`GENESIS`] for an empty log): keep it elsewhere to detect a
    /// later truncation or rewrite.
    pub last_hash: String,
    pub problem: Option<Problem>,
}

impl Verification {
    pub fn intact(&self) -> bool {
        self.problem.is_none()
    }
}

/// What the log must contain beyond an intact chain.
#[derive(Clone, Debug, Default)]
pub struct Expectations {
    /// The log reaches at least this `seq` (an external system saw it).
    pub seq: Option<u64>,
    /// Record `seq` has this SHA-256.
    pub anchor: Option<(u64, String)>,
}

/// Checks the chain of the audit log at `path`. `Err` only when it cannot be read.
pub fn verify(path: &Path, expect: &Expectations) -> Result<Verification, AuditError> {
    let bytes = std::fs::read(path).map_err(io_error(path, "reading"))?;
    Ok(verify_bytes(&bytes, expect))
}

/// [`verify`] on the contents of a log.
pub fn verify_bytes(bytes: &[u8], expect: &Expectations) -> Verification {
    let body = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    let lines: Vec<&[u8]> = if body.is_empty() {
        Vec::new()
    } else {
        body.split(|&b| b == b'\n').collect()
    };
    let seqs: Vec<Option<u64>> = lines
        .iter()
        .map(|line| {
            serde_json::from_slice::<Value>(line)
                .ok()
                .and_then(|record| record.get("seq").and_then(Value::as_u64))
        })
        .collect();
    let mut prev_hash = GENESIS.to_string();
    let mut prev_seq: Option<u64> = None;
    let mut anchor_seen = false;
    let fail = |problem: Problem| Verification {
        records: lines.len(),
        last_seq: None,
        last_hash: line_hash(lines.last().copied().unwrap_or_default()),
        problem: Some(problem),
    };
    for (index, line) in lines.iter().enumerate() {
        let number = index + 1;
        let record = serde_json::from_slice::<Value>(line).ok();
        let fields = record.as_ref().and_then(|record| {
            Some((
                record.get("seq")?.as_u64()?,
                record.get("prev")?.as_str()?.to_string(),
                record.get("kind")?.as_str()?,
            ))
        });
        let Some((seq, prev, _kind)) = fields else {
            return fail(Problem {
                line: number,
                seq: None,
                tampering: Tampering::Malformed,
                message: format!(
                    "line {number} is not an audit record (a JSON object with seq, kind and \
                     prev): edited, or a write cut short"
                ),
            });
        };
        let expected_seq = prev_seq.map_or(1, |s| s + 1);
        if prev != prev_hash {
            let problem = if seq == expected_seq && number > 1 {
                Problem {
                    line: number - 1,
                    seq: prev_seq,
                    tampering: Tampering::Edited,
                    message: format!(
                        "line {} (seq {}) was edited: its SHA-256 is {} but line {number} \
                         (seq {seq}) records prev {prev}",
                        number - 1,
                        prev_seq.unwrap_or_default(),
                        prev_hash
                    ),
                }
            } else if seq == expected_seq {
                Problem {
                    line: number,
                    seq: Some(seq),
                    tampering: Tampering::Edited,
                    message: format!(
                        "line 1 (seq {seq}) was edited: its prev is {prev}, not the genesis \
                         value (or records before it were removed)"
                    ),
                }
            } else {
                let later = seqs[index..].contains(&Some(expected_seq));
                broken_chain(number, seq, expected_seq, prev_seq, later)
            };
            return fail(problem);
        }
        if seq != expected_seq {
            // The link to the previous line holds, so this record itself was changed.
            return fail(Problem {
                line: number,
                seq: Some(seq),
                tampering: Tampering::Edited,
                message: format!(
                    "line {number} was edited: it says seq {seq} where seq {expected_seq} \
                     follows the previous record, whose hash it does carry"
                ),
            });
        }
        let hash = line_hash(line);
        if let Some((anchor_seq, anchor_hash)) = &expect.anchor
            && *anchor_seq == seq
        {
            anchor_seen = true;
            if !anchor_hash.eq_ignore_ascii_case(&hash) {
                return fail(Problem {
                    line: number,
                    seq: Some(seq),
                    tampering: Tampering::Edited,
                    message: format!(
                        "line {number} (seq {seq}) has SHA-256 {hash}, not the anchored \
                         {anchor_hash}: it, or the chain up to it, was rewritten"
                    ),
                });
            }
        }
        prev_hash = hash;
        prev_seq = Some(seq);
    }
    let mut verification = Verification {
        records: lines.len(),
        last_seq: prev_seq,
        last_hash: prev_hash,
        problem: None,
    };
    let last = prev_seq.unwrap_or(0);
    if let Some(expected) = expect.seq
        && last < expected
    {
        verification.problem = Some(Problem {
            line: lines.len(),
            seq: prev_seq,
            tampering: Tampering::Truncated,
            message: format!(
                "the log ends at seq {last} but seq {expected} was expected: records at the end \
                 were deleted"
            ),
        });
    } else if let Some((anchor_seq, _)) = &expect.anchor
        && !anchor_seen
    {
        verification.problem = Some(Problem {
            line: lines.len(),
            seq: prev_seq,
            tampering: Tampering::Truncated,
            message: format!("the anchored record seq {anchor_seq} is not in the log"),
        });
    }
    verification
}

/// The chain breaks at `line` whose `seq` is not the expected one.
/// `expected_later`: the expected record is further down the file.
fn broken_chain(
    line: usize,
    seq: u64,
    expected: u64,
    prev_seq: Option<u64>,
    expected_later: bool,
) -> Problem {
    let after = prev_seq.map_or("the start".to_string(), |s| format!("seq {s}"));
    let (tampering, what) = if seq > expected && expected_later {
        (
            Tampering::Reordered,
            format!(
                "records were reordered: seq {seq} comes after {after}, and seq {expected} \
                 appears further down"
            ),
        )
    } else if seq > expected {
        let missing = if seq - 1 == expected {
            format!("seq {expected} is missing")
        } else {
            format!("seq {expected} to {} are missing", seq - 1)
        };
        (
            Tampering::Deleted,
            format!("records were deleted before line {line}: {missing}"),
        )
    } else if prev_seq == Some(seq) {
        (
            Tampering::Inserted,
            format!("a record was inserted before line {line}: seq {seq} appears twice"),
        )
    } else {
        (
            Tampering::Reordered,
            format!("records were reordered or inserted: seq {seq} comes after {after}"),
        )
    };
    Problem {
        line,
        seq: Some(seq),
        tampering,
        message: format!(
            "chain broken at line {line} (seq {seq}, expected {expected}): {what}; its prev does \
             not match the SHA-256 of line {}",
            line.saturating_sub(1)
        ),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir().join(format!(
                "enforcer-audit-{name}-{}-{:?}",
                std::process::id(),
                std::thread::current().id()
            ));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A log of `n` records, as lines.
    fn log_of(dir: &TempDir, n: u64) -> (PathBuf, Vec<String>) {
        let path = dir.0.join("audit.jsonl");
        let log = AuditLog::open(&path).unwrap();
        for i in 0..n {
            let seq = log
                .append("quarantine_add", json!({"address": format!("10.0.0.{i}")}))
                .unwrap();
            assert_eq!(seq, i + 1);
        }
        drop(log);
        let text = std::fs::read_to_string(&path).unwrap();
        (path, text.lines().map(str::to_string).collect())
    }

    fn verify_lines(lines: &[String]) -> Verification {
        let mut text = lines.join("\n");
        text.push('\n');
        verify_bytes(text.as_bytes(), &Expectations::default())
    }

    #[test]
    fn an_appended_chain_verifies_and_continues_after_reopening() {
        let dir = TempDir::new("chain");
        let (path, lines) = log_of(&dir, 3);
        assert_eq!(lines.len(), 3);
        let first: Value = serde_json::from_str(&lines[0]).unwrap();
        assert_eq!(first["seq"], 1);
        assert_eq!(first["kind"], "quarantine_add");
        assert_eq!(first["prev"], GENESIS);
        let second: Value = serde_json::from_str(&lines[1]).unwrap();
        assert_eq!(second["prev"], line_hash(lines[0].as_bytes()));
        // Field order on the line: seq, time, kind, the record's fields, prev.
        assert!(
            lines[0].starts_with("{\"seq\":1,\"time\":\""),
            "{}",
            lines[0]
        );
        assert!(lines[0].contains("\"kind\":\"quarantine_add\",\"address\":"));

        let log = AuditLog::open(&path).unwrap();
        assert_eq!(log.append("daemon_start", json!({})).unwrap(), 4);
        drop(log);
        let verification = verify(&path, &Expectations::default()).unwrap();
        assert!(verification.intact(), "{verification:?}");
        assert_eq!(verification.records, 4);
        assert_eq!(verification.last_seq, Some(4));
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            verification.last_hash,
            line_hash(text.lines().last().unwrap().as_bytes())
        );
    }

    #[test]
    fn reserved_and_non_object_fields_are_refused() {
        let dir = TempDir::new("reserved");
        let log = AuditLog::open(&dir.0.join("a.jsonl")).unwrap();
        assert!(matches!(
            log.append("x", json!({"seq": 9})),
            Err(AuditError::ReservedField { .. })
        ));
        assert!(matches!(
            log.append("x", json!([1])),
            Err(AuditError::NotAnObject { .. })
        ));
        assert_eq!(log.append("x", json!({"ok": true})).unwrap(), 1);
    }

    #[test]
    fn a_second_writer_is_refused() {
        let dir = TempDir::new("lock");
        let path = dir.0.join("a.jsonl");
        let _first = AuditLog::open(&path).unwrap();
        assert!(matches!(
            AuditLog::open(&path),
            Err(AuditError::Locked { .. })
        ));
    }

    #[test]
    fn an_edited_record_is_found_and_named() {
        let dir = TempDir::new("edit");
        let (_, mut lines) = log_of(&dir, 5);
        lines[2] = lines[2].replace("10.0.0.2", "10.0.0.99");
        let problem = verify_lines(&lines).problem.expect("tampering found");
        assert_eq!(problem.tampering, Tampering::Edited);
        assert_eq!(problem.line, 3, "{problem:?}");
        assert_eq!(problem.seq, Some(3));
        assert!(
            problem.message.contains("line 3 (seq 3) was edited"),
            "{}",
            problem.message
        );
    }

    #[test]
    fn an_edited_seq_is_found() {
        let dir = TempDir::new("editseq");
        let (_, mut lines) = log_of(&dir, 3);
        lines[2] = lines[2].replacen("\"seq\":3", "\"seq\":7", 1);
        let problem = verify_lines(&lines).problem.expect("tampering found");
        assert_eq!((problem.line, problem.tampering), (3, Tampering::Edited));
    }

    #[test]
    fn a_deleted_record_is_found() {
        let dir = TempDir::new("delete");
        let (_, mut lines) = log_of(&dir, 5);
        lines.remove(1);
        let problem = verify_lines(&lines).problem.expect("tampering found");
        assert_eq!(problem.tampering, Tampering::Deleted);
        assert_eq!(problem.line, 2);
        assert!(
            problem.message.contains("seq 2 is missing"),
            "{}",
            problem.message
        );
    }

    #[test]
    fn reordered_records_are_found() {
        let dir = TempDir::new("reorder");
        let (_, mut lines) = log_of(&dir, 5);
        lines.swap(2, 3);
        let problem = verify_lines(&lines).problem.expect("tampering found");
        assert_eq!(problem.line, 3, "{problem:?}");
        assert_eq!(problem.tampering, Tampering::Reordered);
        let mut lines = log_of(&TempDir::new("reorder2"), 5).1;
        let moved = lines.remove(1);
        lines.insert(3, moved);
        let problem = verify_lines(&lines).problem.expect("tampering found");
        assert_eq!(problem.line, 2, "{problem:?}");
        assert_eq!(problem.tampering, Tampering::Reordered);
    }

    #[test]
    fn an_inserted_record_is_found() {
        let dir = TempDir::new("insert");
        let (_, mut lines) = log_of(&dir, 4);
        // A forged record that even carries the right prev and the next seq.
        let forged = format!(
            "{{\"seq\":3,\"time\":\"2024-01-01T00:00:00.000Z\",\"kind\":\"quarantine_remove\",\
             \"address\":\"10.0.0.1\",\"prev\":\"{}\"}}",
            line_hash(lines[1].as_bytes())
        );
        lines.insert(2, forged);
        let problem = verify_lines(&lines).problem.expect("tampering found");
        assert_eq!(problem.line, 4, "{problem:?}");
        assert_eq!(problem.tampering, Tampering::Inserted);
        // A line of garbage.
        let (_, mut lines) = log_of(&TempDir::new("insert2"), 3);
        lines.insert(1, "hello".to_string());
        let problem = verify_lines(&lines).problem.expect("tampering found");
        assert_eq!((problem.line, problem.tampering), (2, Tampering::Malformed));
    }

    #[test]
    fn truncation_needs_an_expectation() {
        let dir = TempDir::new("truncate");
        let (_, mut lines) = log_of(&dir, 5);
        let full = verify_lines(&lines);
        lines.truncate(3);
        assert!(verify_lines(&lines).intact(), "a chain alone cannot see it");
        let mut text = lines.join("\n");
        text.push('\n');
        let expect = Expectations {
            seq: Some(5),
            anchor: None,
        };
        let problem = verify_bytes(text.as_bytes(), &expect).problem.unwrap();
        assert_eq!(problem.tampering, Tampering::Truncated);
        let expect = Expectations {
            seq: None,
            anchor: Some((5, full.last_hash.clone())),
        };
        assert!(!verify_bytes(text.as_bytes(), &expect).intact());
        let expect = Expectations {
            seq: None,
            anchor: Some((3, line_hash(lines[2].as_bytes()))),
        };
        assert!(verify_bytes(text.as_bytes(), &expect).intact());
    }

    #[test]
    fn a_write_cut_short_is_terminated_and_reported() {
        let dir = TempDir::new("cut");
        let (path, _) = log_of(&dir, 2);
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(b"{\"seq\":3,\"ti").unwrap();
        drop(file);
        let log = AuditLog::open(&path).unwrap();
        assert_eq!(log.append("daemon_start", json!({})).unwrap(), 4);
        drop(log);
        let verification = verify(&path, &Expectations::default()).unwrap();
        let problem = verification.problem.unwrap();
        assert_eq!((problem.line, problem.tampering), (3, Tampering::Malformed));
    }

    #[test]
    fn an_empty_log_is_intact() {
        let verification = verify_bytes(b"", &Expectations::default());
        assert!(verification.intact());
        assert_eq!(verification.last_hash, GENESIS);
        assert_eq!(verification.records, 0);
    }
}
