//! Reading the flow log the enforcer writes (`enforcer run --flow-log FILE`; `enforcer observe
//! --output json` prints the same lines), for `impact` and `suggest`.
//!
//! One JSON event per line, with the fields of the enforcer's `FlowEvent` (a stable interface):
//! `time`, `iface`, `direction`, `src`, `dst`, `sport`, `dport`, `proto`, `icmp_type`,
//! `src_segment`, `dst_segment`, `verdict`, `reason`, `rule`, `revision`. They are parsed with
//! a struct of this crate: the compiler must not depend on the enforcer (it runs in plain CI).
//!
//! Events are folded into distinct flows while reading (source, destination, protocol, port,
//! direction, logged verdict), so memory grows with the number of distinct flows, not with the
//! size of the log. The segment names in a line are not used: the log may come from an older
//! policy, so `impact` and `suggest` derive segments from the addresses with the policy under
//! review. A line that is not an event is counted and reported with file and line, never fatal
//! unless no line at all is readable.
//!
//! Counts are events, not packets: the kernel reports at most one event per flow and second.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::io::BufRead;
use std::net::IpAddr;
use std::path::Path;

use serde::{Deserialize, Serialize, Serializer};

use crate::evaluate::{Flow, Verdict};
use crate::model::{PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, icmp_type_name, proto_name};

/// Unreadable lines kept with their place and error (all of them are counted).
pub const KEPT_UNREADABLE_LINES: usize = 100;
/// Source ports kept per flow, to show where a reply-like packet came from.
const KEPT_SOURCE_PORTS: usize = 4;
/// The first port of the ephemeral range Linux uses by default (32768-60999); the IANA range
/// that Windows uses (49152-65535) lies inside it.
pub const EPHEMERAL_PORTS_START: u16 = 32768;

#[derive(thiserror::Error, Debug)]
pub enum FlowLogError {
    #[error("cannot read the flow log {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is given twice: its events would be counted twice")]
    Duplicate { path: String },
    #[error(
        "no line of {files} is a flow event ({count} unreadable line(s)); the first: {first}\n  \
         hint: pass the file `enforcer run --flow-log FILE` writes (or its rotated FILE.1 ...), \
         or what `enforcer observe --output json` prints"
    )]
    NothingReadable {
        files: String,
        count: u64,
        first: UnreadableLine,
    },
}

/// A line that is not a flow event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct UnreadableLine {
    pub file: String,
    /// 1-based.
    pub line: u64,
    pub error: String,
}

impl fmt::Display for UnreadableLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}", self.file, self.line, self.error)
    }
}

/// Where a packet was seen by the enforcer that reported it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Ingress,
    Egress,
}

/// A time of the log (RFC 3339, UTC), ordered by the instant it names; shown with `Z` and as
/// many fraction digits as written. Small and `Copy`: every distinct flow keeps two.
#[derive(Clone, Copy, Debug)]
pub struct Timestamp {
    /// Year, month, day, hour, minute, second, nanosecond.
    instant: (u16, u8, u8, u8, u8, u8, u32),
    /// Digits of the fraction as written (0 to 9), for display only.
    fraction_digits: u8,
}

impl Timestamp {
    /// `2024-05-01T10:00:00.123Z` (any number of fraction digits up to 9, or none; `Z` or
    /// `+00:00`, as the enforcer writes UTC).
    pub fn parse(text: &str) -> Result<Timestamp, String> {
        let invalid = || format!("time '{text}' is not RFC 3339 UTC (2024-05-01T10:00:00.123Z)");
        let body = text
            .strip_suffix('Z')
            .or_else(|| text.strip_suffix('z'))
            .or_else(|| text.strip_suffix("+00:00"))
            .ok_or_else(invalid)?;
        let (date, time) = body
            .split_once('T')
            .or_else(|| body.split_once('t'))
            .ok_or_else(invalid)?;
        let (seconds, fraction) = match time.split_once('.') {
            Some((seconds, fraction)) => (seconds, Some(fraction)),
            None => (time, None),
        };
        let number = |part: &str, digits: usize| -> Result<u32, String> {
            if part.len() != digits || !part.bytes().all(|b| b.is_ascii_digit()) {
                return Err(invalid());
            }
            part.parse().map_err(|_| invalid())
        };
        let date: Vec<&str> = date.split('-').collect();
        let clock: Vec<&str> = seconds.split(':').collect();
        let ([year, month, day], [hour, minute, second]) = (date.as_slice(), clock.as_slice())
        else {
            return Err(invalid());
        };
        let (year, month, day) = (number(year, 4)?, number(month, 2)?, number(day, 2)?);
        let (hour, minute, second) = (number(hour, 2)?, number(minute, 2)?, number(second, 2)?);
        let nanos = match fraction {
            None => 0,
            Some(digits) if (1..=9).contains(&digits.len()) => {
                number(digits, digits.len())? * 10u32.pow(9 - digits.len() as u32)
            }
            Some(_) => return Err(invalid()),
        };
        let valid = (1..=12).contains(&month)
            && (1..=31).contains(&day)
            && hour < 24
            && minute < 60
            && second <= 60;
        if !valid {
            return Err(invalid());
        }
        Ok(Timestamp {
            instant: (
                year as u16,
                month as u8,
                day as u8,
                hour as u8,
                minute as u8,
                second as u8,
                nanos,
            ),
            fraction_digits: fraction.map_or(0, |digits| digits.len() as u8),
        })
    }
}

impl PartialEq for Timestamp {
    fn eq(&self, other: &Self) -> bool {
        self.instant == other.instant
    }
}

impl Eq for Timestamp {}

impl PartialOrd for Timestamp {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Timestamp {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.instant.cmp(&other.instant)
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (year, month, day, hour, minute, second, nanos) = self.instant;
        write!(
            f,
            "{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}"
        )?;
        if self.fraction_digits > 0 {
            let digits = usize::from(self.fraction_digits);
            let fraction = format!("{nanos:09}");
            write!(f, ".{}", &fraction[..digits])?;
        }
        f.write_str("Z")
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// How often and when something was seen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Seen {
    pub events: u64,
    pub first_seen: Timestamp,
    pub last_seen: Timestamp,
}

impl Seen {
    pub fn once(time: Timestamp) -> Seen {
        Seen {
            events: 1,
            first_seen: time,
            last_seen: time,
        }
    }

    pub fn merge(&mut self, other: &Seen) {
        self.events += other.events;
        self.first_seen = self.first_seen.min(other.first_seen);
        self.last_seen = self.last_seen.max(other.last_seen);
    }

    /// Merges into `slot`, or fills it.
    pub fn merge_into(&self, slot: &mut Option<Seen>) {
        match slot {
            Some(seen) => seen.merge(self),
            None => *slot = Some(*self),
        }
    }

    /// `12 events, first seen T1, last seen T2`.
    pub fn describe(&self) -> String {
        let events = if self.events == 1 {
            "1 event".to_string()
        } else {
            format!("{} events", self.events)
        };
        if self.first_seen == self.last_seen {
            format!("{events}, seen {}", self.first_seen)
        } else {
            format!(
                "{events}, first seen {}, last seen {}",
                self.first_seen, self.last_seen
            )
        }
    }
}

/// What tells flows of the log apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ObservedKey {
    /// The packet as the policy sees it: addresses, protocol, destination port or ICMP type.
    pub flow: Flow,
    pub direction: Direction,
    /// The verdict of the enforcer that logged it (under the policy it had then).
    pub logged: Verdict,
}

/// One distinct flow of the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ObservedFlow {
    pub seen: Seen,
    /// A few of its TCP/UDP source ports (to show where a reply-like packet came from).
    pub source_ports: SourcePorts,
}

/// Up to [`KEPT_SOURCE_PORTS`] distinct ports, in a fixed array: a set would allocate for
/// each of possibly millions of flows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SourcePorts {
    ports: [u16; KEPT_SOURCE_PORTS],
    len: u8,
}

impl SourcePorts {
    /// Keeps `port`, in order, unless it is known or the array is full.
    pub fn insert(&mut self, port: u16) {
        let len = usize::from(self.len);
        if len < KEPT_SOURCE_PORTS
            && let Err(at) = self.ports[..len].binary_search(&port)
        {
            self.ports.copy_within(at..len, at + 1);
            self.ports[at] = port;
            self.len += 1;
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = u16> + '_ {
        self.ports[..usize::from(self.len)].iter().copied()
    }
}

/// What was read from one file.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct FileSummary {
    pub file: String,
    pub events: u64,
    pub unreadable_lines: u64,
}

/// The distinct flows of one or more flow log files.
#[derive(Clone, Debug, Default)]
pub struct ObservedFlows {
    pub files: Vec<FileSummary>,
    pub flows: HashMap<ObservedKey, ObservedFlow>,
    /// Readable events, every file.
    pub events: u64,
    pub unreadable_count: u64,
    /// The first [`KEPT_UNREADABLE_LINES`] unreadable lines.
    pub unreadable: Vec<UnreadableLine>,
    /// Revisions of the policies that judged the events (from the `revision` field).
    pub revisions: BTreeSet<String>,
}

/// The line as the enforcer writes it. Every field is required (the optional ones as `null`),
/// so a line of some other JSON format is not taken for an event.
#[derive(Deserialize)]
#[allow(dead_code)] // Fields read only to require them; see above.
struct LoggedEvent {
    time: String,
    iface: String,
    direction: Direction,
    src: IpAddr,
    dst: IpAddr,
    sport: Option<u16>,
    dport: Option<u16>,
    proto: String,
    icmp_type: Option<u8>,
    src_segment: String,
    dst_segment: String,
    verdict: Verdict,
    reason: String,
    rule: Option<String>,
    revision: String,
}

impl ObservedFlows {
    /// Reads flow log files (`-` is standard input), in the order given; rotated files
    /// (`FILE.1`, ...) are files like any other. Fails on a file that cannot be read, on a
    /// file given twice, and when files have lines but none is an event.
    pub fn read_files(paths: &[impl AsRef<Path>]) -> Result<ObservedFlows, FlowLogError> {
        let mut observed = ObservedFlows::default();
        let mut opened = BTreeSet::new();
        for path in paths {
            let path = path.as_ref();
            let shown = path.display().to_string();
            if shown == "-" {
                let stdin = std::io::stdin();
                observed
                    .add_reader("<stdin>", stdin.lock())
                    .map_err(|source| FlowLogError::Io {
                        path: "<stdin>".into(),
                        source,
                    })?;
                continue;
            }
            let io_error = |source| FlowLogError::Io {
                path: shown.clone(),
                source,
            };
            let canonical = std::fs::canonicalize(path).map_err(io_error)?;
            if !opened.insert(canonical) {
                return Err(FlowLogError::Duplicate { path: shown });
            }
            let file = std::fs::File::open(path).map_err(io_error)?;
            observed
                .add_reader(&shown, std::io::BufReader::new(file))
                .map_err(io_error)?;
        }
        observed.check_readable()?;
        Ok(observed)
    }

    /// Adds the lines of `text`, named `name` in messages.
    pub fn add_text(&mut self, name: &str, text: &str) {
        // Reading from a slice cannot fail.
        let _ = self.add_reader(name, text.as_bytes());
    }

    /// Adds the lines read from `reader`, named `name` in messages. Blank lines are skipped.
    pub fn add_reader(&mut self, name: &str, mut reader: impl BufRead) -> std::io::Result<()> {
        let mut summary = FileSummary {
            file: name.to_string(),
            ..FileSummary::default()
        };
        let mut buffer = Vec::new();
        let mut number = 0u64;
        loop {
            buffer.clear();
            if reader.read_until(b'\n', &mut buffer)? == 0 {
                break;
            }
            number += 1;
            // Bytes, not `lines()`: one line of binary garbage must not end the file.
            let line = String::from_utf8_lossy(&buffer);
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            match self.add_line(line) {
                Ok(()) => summary.events += 1,
                Err(error) => {
                    summary.unreadable_lines += 1;
                    self.unreadable_count += 1;
                    if self.unreadable.len() < KEPT_UNREADABLE_LINES {
                        self.unreadable.push(UnreadableLine {
                            file: name.to_string(),
                            line: number,
                            error,
                        });
                    }
                }
            }
        }
        self.files.push(summary);
        Ok(())
    }

    /// An error when there were lines but none was an event.
    pub fn check_readable(&self) -> Result<(), FlowLogError> {
        match self.unreadable.first() {
            Some(first) if self.events == 0 => Err(FlowLogError::NothingReadable {
                files: self
                    .files
                    .iter()
                    .map(|file| file.file.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                count: self.unreadable_count,
                first: first.clone(),
            }),
            _ => Ok(()),
        }
    }

    fn add_line(&mut self, line: &str) -> Result<(), String> {
        let event: LoggedEvent =
            serde_json::from_str(line).map_err(|e| format!("not a flow event: {e}"))?;
        let time = Timestamp::parse(&event.time)?;
        let proto = protocol_number(&event.proto)?;
        let port = match proto {
            PROTO_TCP | PROTO_UDP => Some(event.dport.ok_or_else(|| {
                format!("a {} event without `dport`", event.proto.to_lowercase())
            })?),
            PROTO_ICMP | PROTO_ICMPV6 => Some(u16::from(event.icmp_type.ok_or_else(|| {
                format!(
                    "an {} event without `icmp_type`",
                    event.proto.to_lowercase()
                )
            })?)),
            _ => None,
        };
        if event.src.is_ipv4() != event.dst.is_ipv4() {
            return Err(format!(
                "source {} and destination {} are of different IP versions",
                event.src, event.dst
            ));
        }
        let key = ObservedKey {
            flow: Flow {
                src: event.src,
                dst: event.dst,
                proto,
                port,
            },
            direction: event.direction,
            logged: event.verdict,
        };
        let seen = Seen::once(time);
        let flow = self.flows.entry(key).or_insert(ObservedFlow {
            seen: Seen { events: 0, ..seen },
            source_ports: SourcePorts::default(),
        });
        flow.seen.merge(&seen);
        if let Some(sport) = event.sport {
            flow.source_ports.insert(sport);
        }
        self.revisions.insert(event.revision);
        self.events += 1;
        Ok(())
    }
}

/// `tcp`, `udp`, `icmp`, `icmpv6`, or a protocol number.
fn protocol_number(text: &str) -> Result<u8, String> {
    match text.to_ascii_lowercase().as_str() {
        "tcp" => Ok(PROTO_TCP),
        "udp" => Ok(PROTO_UDP),
        "icmp" => Ok(PROTO_ICMP),
        "icmpv6" => Ok(PROTO_ICMPV6),
        other => other.parse().map_err(|_| {
            format!("unknown proto '{text}' (tcp, udp, icmp, icmpv6 or a number 0-255)")
        }),
    }
}

/// The packet in the policy's notation: `tcp/5432`, `icmp/echo-request`, `icmp/42`,
/// `protocol 47`.
pub fn traffic_label(proto: u8, port: Option<u16>) -> String {
    match (proto_name(proto), port) {
        (Some(name), Some(port)) => match icmp_type_name(proto, port) {
            Some(type_name) => format!("{name}/{type_name}"),
            None => format!("{name}/{port}"),
        },
        _ => format!("protocol {proto}"),
    }
}

/// Why a logged packet is probably not the first packet of a connection to a service, so its
/// port must not become an allow rule: the enforcer reports the first packet it sees of a
/// flow, which is the reply when it missed the start (a connection older than the daemon, or
/// idle longer than its state). The log has no TCP flags, so this goes by port and type.
pub fn reply_hint(flow: &Flow) -> Option<&'static str> {
    const ICMP_REPLIES_AND_ERRORS: [u16; 6] = [0, 3, 4, 11, 12, 14];
    const ICMPV6_REPLIES_AND_ERRORS: [u16; 5] = [1, 2, 3, 4, 129];
    let port = flow.port?;
    match flow.proto {
        PROTO_TCP | PROTO_UDP if port >= EPHEMERAL_PORTS_START => Some(
            "the destination port is in the ephemeral range (32768-65535): most likely a \
             reply to a connection whose first packet the enforcer did not see; allow it only \
             if a service listens on it",
        ),
        PROTO_ICMP if ICMP_REPLIES_AND_ERRORS.contains(&port) => Some(
            "an ICMP reply or error: it answers a packet of the other side and passes by \
             connection state when that packet was seen",
        ),
        PROTO_ICMPV6 if ICMPV6_REPLIES_AND_ERRORS.contains(&port) => Some(
            "an ICMPv6 reply or error: it answers a packet of the other side and passes by \
             connection state when that packet was seen",
        ),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EVENT: &str = r#"{"time":"2024-05-01T10:00:00.123Z","iface":"eth0","direction":"ingress","src":"10.40.0.20","dst":"10.70.0.10","sport":40000,"dport":5432,"proto":"tcp","icmp_type":null,"src_segment":"pharmacy","dst_segment":"icu-telemetry","verdict":"audit","reason":"audit","rule":null,"revision":"abc"}"#;

    #[test]
    fn times_order_by_instant() {
        let t = |text| Timestamp::parse(text).unwrap();
        assert!(t("2024-05-01T10:00:00.123Z") < t("2024-05-01T10:00:00.2Z"));
        assert!(t("2024-05-01T10:00:00Z") < t("2024-05-01T10:00:00.001Z"));
        assert_eq!(
            t("2024-05-01T10:00:00.5Z"),
            t("2024-05-01T10:00:00.500+00:00")
        );
        assert!(t("2023-12-31T23:59:59.999Z") < t("2024-01-01T00:00:00.000Z"));
        for shown in [
            "2024-05-01T10:00:00.123Z",
            "2024-05-01T10:00:00Z",
            "2024-05-01T10:00:00.000000001Z",
        ] {
            assert_eq!(t(shown).to_string(), shown);
        }
        assert_eq!(
            t("2024-05-01t10:00:00.5+00:00").to_string(),
            "2024-05-01T10:00:00.5Z"
        );
        for bad in [
            "2024-05-01 10:00:00Z",
            "2024-05-01T10:00:00",
            "2024-05-01T10:00:00+02:00",
            "2024-13-01T10:00:00Z",
            "2024-05-01T10:00:00.Z",
            "yesterday",
        ] {
            assert!(Timestamp::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn folds_events_into_flows_and_counts_unreadable_lines() {
        let later = EVENT
            .replace("10:00:00.123Z", "11:00:00.000Z")
            .replace("40000", "40001");
        let icmp = EVENT.replace(
            r#""sport":40000,"dport":5432,"proto":"tcp","icmp_type":null"#,
            r#""sport":null,"dport":null,"proto":"icmp","icmp_type":8"#,
        );
        let gre = EVENT.replace(
            r#""sport":40000,"dport":5432,"proto":"tcp""#,
            r#""sport":null,"dport":null,"proto":"47""#,
        );
        let text = format!(
            "{later}\n\n{EVENT}\nnot json\n{}\n{icmp}\n{gre}\n{}\n",
            EVENT.replace("\"time\"", "\"tiem\""),
            &EVENT[..40]
        );
        let mut observed = ObservedFlows::default();
        observed.add_text("flows.jsonl", &text);
        assert_eq!(observed.events, 4);
        assert_eq!(observed.unreadable_count, 3);
        let lines: Vec<u64> = observed.unreadable.iter().map(|u| u.line).collect();
        assert_eq!(lines, [4, 5, 8]);
        assert!(
            observed.unreadable[1]
                .to_string()
                .starts_with("flows.jsonl:5: not a flow event")
        );
        assert_eq!(observed.flows.len(), 3);
        let tcp = observed
            .flows
            .iter()
            .find(|(key, _)| key.flow.proto == PROTO_TCP)
            .unwrap();
        assert_eq!(tcp.0.flow.port, Some(5432));
        assert_eq!(tcp.0.direction, Direction::Ingress);
        assert_eq!(tcp.0.logged, Verdict::Audit);
        assert_eq!(tcp.1.seen.events, 2);
        assert_eq!(
            tcp.1.seen.first_seen.to_string(),
            "2024-05-01T10:00:00.123Z"
        );
        assert_eq!(tcp.1.seen.last_seen.to_string(), "2024-05-01T11:00:00.000Z");
        assert_eq!(
            tcp.1.source_ports.iter().collect::<Vec<_>>(),
            [40000, 40001]
        );
        assert!(
            observed
                .flows
                .keys()
                .any(|key| key.flow.proto == PROTO_ICMP && key.flow.port == Some(8))
        );
        assert!(
            observed
                .flows
                .keys()
                .any(|key| key.flow.proto == 47 && key.flow.port.is_none())
        );
        assert_eq!(observed.revisions, BTreeSet::from(["abc".to_string()]));
        observed.check_readable().unwrap();

        let mut garbage = ObservedFlows::default();
        garbage.add_text("other.log", "hello\n{\"time\":1}\n");
        let error = garbage.check_readable().unwrap_err().to_string();
        assert!(
            error.contains("no line of other.log is a flow event (2 unreadable"),
            "{error}"
        );
        assert!(error.contains("other.log:1: not a flow event"), "{error}");
        // Empty logs are not an error: there is just nothing in them.
        ObservedFlows::default().check_readable().unwrap();
    }

    #[test]
    fn replies_are_recognised_by_port_and_type() {
        let flow = |proto, port| Flow {
            src: "10.0.0.1".parse().unwrap(),
            dst: "10.0.0.2".parse().unwrap(),
            proto,
            port,
        };
        assert!(reply_hint(&flow(PROTO_TCP, Some(5432))).is_none());
        assert!(reply_hint(&flow(PROTO_TCP, Some(32767))).is_none());
        assert!(reply_hint(&flow(PROTO_TCP, Some(32768))).is_some());
        assert!(reply_hint(&flow(PROTO_UDP, Some(60999))).is_some());
        assert!(reply_hint(&flow(PROTO_ICMP, Some(8))).is_none());
        assert!(reply_hint(&flow(PROTO_ICMP, Some(0))).is_some());
        assert!(reply_hint(&flow(PROTO_ICMPV6, Some(128))).is_none());
        assert!(reply_hint(&flow(PROTO_ICMPV6, Some(129))).is_some());
        assert!(reply_hint(&flow(47, None)).is_none());
        assert_eq!(traffic_label(PROTO_ICMP, Some(8)), "icmp/echo-request");
        assert_eq!(traffic_label(PROTO_ICMP, Some(42)), "icmp/42");
        assert_eq!(traffic_label(PROTO_TCP, Some(104)), "tcp/104");
        assert_eq!(traffic_label(47, None), "protocol 47");
    }
}
