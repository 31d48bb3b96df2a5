//! What enforcing would break: the observed flows (from the enforcer's flow log) that pass
//! today only because their destination is monitored, and would be denied once it is enforced
//! (`policy-compiler impact DIR --flows FILE...`).
//!
//! Every flow of the log is judged again by the reference evaluator with the policy under
//! review, segments derived from its addresses (the log may come from an older revision), on
//! the hook that saw it. A flow is impact when that judgement is `audit`: in
//! [`Policy::evaluate`] a segment's mode decides only what happens to a packet no rule allows
//! (`monitor`: audit, `enforce`: deny), so "audit now" and "denied once enforced" are the same
//! set of packets (a test checks this against a copy of the policy with every mode switched).
//! On egress with `egress: monitor` the kernel also passes as audit what the destination's
//! allow-list denies; such flows are impact of enforcing egress and are marked so.
//! Flows the policy already allows, or already denies, are not impact.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::IpAddr;

use serde::Serialize;

use crate::evaluate::{Decision, Flow, Verdict};
use crate::flow_log::{
    Direction, FileSummary, ObservedFlows, Seen, UnreadableLine, reply_hint, traffic_label,
};
use crate::model::{Mode, Policy, WORLD, proto_name};

/// Addresses shown per flow in the table and markdown (JSON has them all).
const SHOWN_ADDRESSES: usize = 3;

/// Why a packet passes as audit today.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AuditedBy {
    /// The destination segment (or `world`) is in `mode: monitor`.
    Mode,
    /// `egress: monitor`: seen on egress, denied by the destination's allow-list.
    Egress,
}

/// What the policy does now with an observed packet, on the hook that saw it (as
/// [`crate::stateful`] judges a packet no state covers).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rejudged {
    /// Allowed by a rule, or not judged (an unenforced destination or egress).
    Passes,
    Denied,
    Audited(AuditedBy),
}

/// The reference verdict on `flow` seen in `direction`, and the evaluator's decision.
pub fn rejudge(policy: &Policy, flow: &Flow, direction: Direction) -> (Decision, Rejudged) {
    let decision = policy.evaluate(flow);
    let egress = policy.settings().egress;
    let rejudged = if direction == Direction::Egress && egress == Mode::Unenforced {
        Rejudged::Passes
    } else {
        match decision.verdict {
            Verdict::Allow => Rejudged::Passes,
            Verdict::Audit => Rejudged::Audited(AuditedBy::Mode),
            Verdict::Deny if direction == Direction::Egress && egress == Mode::Monitor => {
                Rejudged::Audited(AuditedBy::Egress)
            }
            Verdict::Deny => Rejudged::Denied,
        }
    };
    (decision, rejudged)
}

/// An address and how often it was seen.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AddressSeen {
    pub address: IpAddr,
    #[serde(flatten)]
    pub seen: Seen,
}

/// Packets of one kind from one source segment to one destination segment that would be
/// denied.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ImpactFlow {
    /// The source's segment (`world` for none), from the policy under review.
    pub from: String,
    pub to: String,
    /// `tcp`, `udp`, `icmp`, `icmpv6`, or the protocol number.
    pub proto: String,
    /// TCP/UDP destination port or ICMP type; null for other protocols.
    pub port: Option<u16>,
    /// In the policy's notation: `tcp/5432`, `icmp/echo-request`, `protocol 47`.
    pub traffic: String,
    pub audited_by: AuditedBy,
    /// The port or type looks like a reply whose connection start the enforcer missed (see
    /// [`crate::flow_log::reply_hint`]).
    pub likely_reply: bool,
    #[serde(flatten)]
    pub seen: Seen,
    pub sources: Vec<AddressSeen>,
    pub destinations: Vec<AddressSeen>,
}

/// The would-be denials to one destination segment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SegmentImpact {
    pub segment: String,
    pub mode: Mode,
    pub events: u64,
    pub flows: Vec<ImpactFlow>,
}

/// The policy judged against.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PolicySide {
    /// As given on the command line.
    pub source: String,
    pub revision: String,
    /// Segments in `mode: monitor` (`world` too when its mode is monitor), and `egress` when
    /// egress is monitored.
    pub monitored: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Totals {
    pub flows: usize,
    pub events: u64,
}

/// The report of `policy-compiler impact`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Impact {
    pub policy: PolicySide,
    pub files: Vec<FileSummary>,
    /// Readable events in all files.
    pub events: u64,
    pub unreadable_lines: u64,
    /// The first unreadable lines, with file and line.
    pub unreadable: Vec<UnreadableLine>,
    /// Revisions of the policies that judged the logged events.
    pub log_revisions: Vec<String>,
    pub would_be_denied: Totals,
    pub segments: Vec<SegmentImpact>,
}

#[derive(Default)]
struct Row {
    seen: Option<Seen>,
    sources: BTreeMap<IpAddr, Seen>,
    destinations: BTreeMap<IpAddr, Seen>,
    likely_reply: bool,
}

fn add_address(addresses: &mut BTreeMap<IpAddr, Seen>, address: IpAddr, seen: &Seen) {
    match addresses.get_mut(&address) {
        Some(known) => known.merge(seen),
        None => {
            addresses.insert(address, *seen);
        }
    }
}

/// Protocols in the order the policy's notation lists them, then the others by number.
fn proto_rank(proto: u8) -> (u8, u8) {
    match proto_name(proto) {
        Some("tcp") => (0, 0),
        Some("udp") => (1, 0),
        Some("icmp") => (2, 0),
        Some("icmpv6") => (3, 0),
        _ => (4, proto),
    }
}

impl Impact {
    /// Judges every observed flow with `policy`; `policy_source` labels the output.
    pub fn of(policy: &Policy, policy_source: &str, observed: &ObservedFlows) -> Impact {
        // (destination, source, protocol rank, port, audited by) -> row
        type RowKey = (String, String, (u8, u8), Option<u16>, AuditedBy);
        let mut rows: BTreeMap<RowKey, (u8, Row)> = BTreeMap::new();
        for (key, observed_flow) in &observed.flows {
            let (decision, rejudged) = rejudge(policy, &key.flow, key.direction);
            let Rejudged::Audited(audited_by) = rejudged else {
                continue;
            };
            let row_key = (
                decision.dst_segment,
                decision.src_segment,
                proto_rank(key.flow.proto),
                key.flow.port,
                audited_by,
            );
            let (_, row) = rows
                .entry(row_key)
                .or_insert_with(|| (key.flow.proto, Row::default()));
            let seen = &observed_flow.seen;
            seen.merge_into(&mut row.seen);
            add_address(&mut row.sources, key.flow.src, seen);
            add_address(&mut row.destinations, key.flow.dst, seen);
            row.likely_reply = reply_hint(&key.flow).is_some();
        }

        let mut segments: Vec<SegmentImpact> = Vec::new();
        for ((to, from, _, port, audited_by), (proto, row)) in rows {
            let Some(seen) = row.seen else { continue };
            let addresses = |map: BTreeMap<IpAddr, Seen>| {
                map.into_iter()
                    .map(|(address, seen)| AddressSeen { address, seen })
                    .collect()
            };
            let flow = ImpactFlow {
                from,
                to: to.clone(),
                proto: proto_name(proto).map_or_else(|| proto.to_string(), str::to_string),
                port,
                traffic: traffic_label(proto, port),
                audited_by,
                likely_reply: row.likely_reply,
                seen,
                sources: addresses(row.sources),
                destinations: addresses(row.destinations),
            };
            match segments.iter_mut().find(|segment| segment.segment == to) {
                Some(segment) => {
                    segment.events += flow.seen.events;
                    segment.flows.push(flow);
                }
                None => segments.push(SegmentImpact {
                    mode: match policy.segment(&to) {
                        Some(segment) => segment.mode,
                        None => policy.world_mode(),
                    },
                    segment: to,
                    events: flow.seen.events,
                    flows: vec![flow],
                }),
            }
        }
        // `world` after the segments.
        segments.sort_by(|a, b| {
            (a.segment == WORLD, &a.segment).cmp(&(b.segment == WORLD, &b.segment))
        });

        let mut monitored: Vec<String> = policy
            .segments()
            .iter()
            .filter(|segment| segment.mode == Mode::Monitor)
            .map(|segment| segment.name.clone())
            .collect();
        if policy.world_mode() == Mode::Monitor {
            monitored.push(WORLD.to_string());
        }
        if policy.settings().egress == Mode::Monitor {
            monitored.push("egress".to_string());
        }
        Impact {
            policy: PolicySide {
                source: policy_source.to_string(),
                revision: policy.revision().to_string(),
                monitored,
            },
            files: observed.files.clone(),
            events: observed.events,
            unreadable_lines: observed.unreadable_count,
            unreadable: observed.unreadable.clone(),
            log_revisions: observed.revisions.iter().cloned().collect(),
            would_be_denied: Totals {
                flows: segments.iter().map(|segment| segment.flows.len()).sum(),
                events: segments.iter().map(|segment| segment.events).sum(),
            },
            segments,
        }
    }

    /// Nothing observed would be denied.
    pub fn is_empty(&self) -> bool {
        self.segments.is_empty()
    }

    /// `2 flows (7 events) to 1 segment would be denied once enforced`, or why nothing would.
    pub fn summary(&self) -> String {
        if self.policy.monitored.is_empty() {
            return format!(
                "nothing to enforce: no segment of {} is in monitor mode",
                self.policy.source
            );
        }
        if self.is_empty() {
            return format!(
                "nothing observed would be denied: {} already allows or denies every one of \
                 the {}",
                self.policy.source,
                plural(self.events as usize, "flow event")
            );
        }
        format!(
            "{} ({}) to {} would be denied once enforced",
            plural(self.would_be_denied.flows, "flow"),
            plural(self.would_be_denied.events as usize, "event"),
            plural(self.segments.len(), "segment")
        )
    }

    fn header(&self) -> String {
        let files: Vec<&str> = self.files.iter().map(|file| file.file.as_str()).collect();
        let mut header = format!(
            "{} read from {}",
            plural(self.events as usize, "flow event"),
            files.join(", ")
        );
        if self.unreadable_lines > 0 {
            let _ = write!(
                header,
                " ({} skipped)",
                plural(self.unreadable_lines as usize, "unreadable line")
            );
        }
        header
    }

    /// A table for the terminal.
    pub fn to_table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "impact of enforcing {} (revision {}; monitored: {})",
            self.policy.source,
            short(&self.policy.revision),
            if self.policy.monitored.is_empty() {
                "nothing".to_string()
            } else {
                self.policy.monitored.join(", ")
            }
        );
        let _ = writeln!(out, "{}", self.header());
        let header = [
            "FROM",
            "TRAFFIC",
            "EVENTS",
            "FIRST SEEN",
            "LAST SEEN",
            "SOURCES -> DESTINATIONS",
        ];
        let mut notes = false;
        for segment in &self.segments {
            let _ = writeln!(
                out,
                "\n{} (mode: {}): {} ({}) would be denied",
                segment.segment,
                segment.mode.as_str(),
                plural(segment.flows.len(), "flow"),
                plural(segment.events as usize, "event")
            );
            let rows: Vec<[String; 6]> = segment
                .flows
                .iter()
                .map(|flow| {
                    let mut traffic = flow.traffic.clone();
                    if flow.audited_by == AuditedBy::Egress {
                        traffic.push_str(" (egress)");
                    }
                    if flow.likely_reply {
                        traffic.push_str(" (reply?)");
                        notes = true;
                    }
                    [
                        flow.from.clone(),
                        traffic,
                        flow.seen.events.to_string(),
                        flow.seen.first_seen.to_string(),
                        flow.seen.last_seen.to_string(),
                        format!(
                            "{} -> {}",
                            address_list(&flow.sources, str::to_string),
                            address_list(&flow.destinations, str::to_string)
                        ),
                    ]
                })
                .collect();
            let widths: Vec<usize> = (0..5)
                .map(|column| {
                    rows.iter()
                        .map(|row| row[column].chars().count())
                        .chain([header[column].len()])
                        .max()
                        .unwrap_or(0)
                })
                .collect();
            let line = |cells: [&str; 6]| {
                format!(
                    "  {:<w0$}  {:<w1$}  {:>w2$}  {:<w3$}  {:<w4$}  {}",
                    cells[0],
                    cells[1],
                    cells[2],
                    cells[3],
                    cells[4],
                    cells[5],
                    w0 = widths[0],
                    w1 = widths[1],
                    w2 = widths[2],
                    w3 = widths[3],
                    w4 = widths[4],
                )
            };
            let _ = writeln!(out, "{}", line(header));
            for row in &rows {
                let cells = [&row[0], &row[1], &row[2], &row[3], &row[4], &row[5]];
                let _ = writeln!(out, "{}", line(cells.map(String::as_str)));
            }
        }
        if self
            .segments
            .iter()
            .any(|s| s.flows.iter().any(|f| f.audited_by == AuditedBy::Egress))
        {
            let _ = writeln!(
                out,
                "\n(egress): seen on egress and passed by `egress: monitor`; denied once egress \
                 is enforced"
            );
        }
        if notes {
            let _ = writeln!(out, "\n{REPLY_NOTE}");
        }
        let _ = writeln!(out, "\n{}", self.summary());
        out
    }

    /// Markdown, e.g. for a pull request that switches a segment to `mode: enforce`.
    pub fn to_markdown(&self) -> String {
        let code = |text: &str| format!("`{text}`");
        let mut out = String::new();
        let _ = writeln!(out, "### Impact of enforcing the monitored segments\n");
        let _ = writeln!(
            out,
            "{} (revision {}); {}\n",
            code(&self.policy.source),
            code(short(&self.policy.revision)),
            self.header()
        );
        if self.is_empty() {
            let _ = writeln!(out, "✅ {}.", capitalized(&self.summary()));
            return out;
        }
        let mut notes = false;
        for segment in &self.segments {
            let _ = writeln!(
                out,
                "#### {} ({}): {} ({}) would be denied\n",
                code(&segment.segment),
                segment.mode.as_str(),
                plural(segment.flows.len(), "flow"),
                plural(segment.events as usize, "event")
            );
            let _ = writeln!(
                out,
                "| From | Traffic | Events | First seen | Last seen | Sources | Destinations |"
            );
            let _ = writeln!(out, "|---|---|---|---|---|---|---|");
            for flow in &segment.flows {
                let mut traffic = code(&flow.traffic);
                if flow.audited_by == AuditedBy::Egress {
                    traffic.push_str(" (egress)");
                }
                if flow.likely_reply {
                    traffic.push_str(" (reply?)");
                    notes = true;
                }
                let _ = writeln!(
                    out,
                    "| {} | {traffic} | {} | {} | {} | {} | {} |",
                    code(&flow.from),
                    flow.seen.events,
                    flow.seen.first_seen,
                    flow.seen.last_seen,
                    address_list(&flow.sources, code),
                    address_list(&flow.destinations, code)
                );
            }
            let _ = writeln!(out);
        }
        if notes {
            let _ = writeln!(out, "{REPLY_NOTE}\n");
        }
        let _ = writeln!(out, "_{}._", capitalized(&self.summary()));
        out
    }

    pub fn to_json(&self) -> String {
        // Plain data with string keys: serialization cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }
}

const REPLY_NOTE: &str = "(reply?): the port or type looks like a reply whose connection start \
    the enforcer did not see (a connection older than the daemon, or idle past its state); once \
    enforced, such packets are denied in the same situation";

/// `10.40.0.20 (5), 10.40.0.21 (2) +3 more`.
fn address_list(addresses: &[AddressSeen], quote: impl Fn(&str) -> String) -> String {
    let mut shown: Vec<String> = addresses
        .iter()
        .take(SHOWN_ADDRESSES)
        .map(|address| {
            format!(
                "{} ({})",
                quote(&address.address.to_string()),
                address.seen.events
            )
        })
        .collect();
    if addresses.len() > SHOWN_ADDRESSES {
        shown.push(format!("+{} more", addresses.len() - SHOWN_ADDRESSES));
    }
    shown.join(", ")
}

fn plural(n: usize, what: &str) -> String {
    match n {
        1 => format!("1 {what}"),
        _ => format!("{n} {what}s"),
    }
}

fn capitalized(text: &str) -> String {
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

fn short(revision: &str) -> &str {
    revision.get(..12).unwrap_or(revision)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Mode changes only what happens to packets no rule allows: a copy of the policy with
    /// every monitored segment enforced denies exactly what the original audits.
    #[test]
    fn audit_now_is_exactly_deny_once_enforced() {
        let sources = [
            (
                "p/icu.yaml".to_string(),
                "segment: icu\nmembers: [10.70.0.0/24, \"fd00:70::/64\"]\nmode: monitor\n\
                 intra: deny\nallow:\n  - from: [ehr]\n    ports: [tcp/443]\n  - from: \
                 10.99.0.0/16\n    ports: [udp/161, icmp/echo-request]\n  - from: [icu]\n    \
                 ports: [tcp/22]\n"
                    .to_string(),
            ),
            (
                "p/ehr.yaml".to_string(),
                "segment: ehr\nmembers: [10.20.0.0/24]\nallow:\n  - from: any\n    ports: \
                 [tcp/80]\n"
                    .to_string(),
            ),
            (
                "p/defaults.yaml".to_string(),
                "world:\n  mode: monitor\n  allow:\n    - from: [ehr]\n      ports: [tcp/443]\n"
                    .to_string(),
            ),
        ];
        let monitored = Policy::from_sources(&sources).unwrap();
        let mut enforced = monitored.clone();
        for segment in &mut enforced.segments {
            segment.mode = Mode::Enforce;
        }
        enforced.world_mode = Mode::Enforce;
        let addresses = [
            "10.70.0.5",
            "10.70.0.6",
            "10.20.0.5",
            "10.99.1.1",
            "10.1.1.1",
            "fd00:70::5",
            "fd00:99::1",
        ];
        let ports: [(u8, Option<u16>); 9] = [
            (6, Some(443)),
            (6, Some(22)),
            (6, Some(80)),
            (17, Some(161)),
            (1, Some(8)),
            (1, Some(3)),
            (58, Some(128)),
            (58, Some(135)),
            (47, None),
        ];
        let mut audited = 0;
        for src in addresses {
            for dst in addresses {
                let (src, dst): (IpAddr, IpAddr) = (src.parse().unwrap(), dst.parse().unwrap());
                if src.is_ipv4() != dst.is_ipv4() {
                    continue;
                }
                for (proto, port) in ports {
                    let flow = Flow {
                        src,
                        dst,
                        proto,
                        port,
                    };
                    let before = monitored.evaluate(&flow);
                    let after = enforced.evaluate(&flow);
                    let (_, rejudged) = rejudge(&monitored, &flow, Direction::Ingress);
                    let would_be_denied = matches!(rejudged, Rejudged::Audited(_));
                    assert_eq!(
                        would_be_denied,
                        before.verdict != Verdict::Deny && after.verdict == Verdict::Deny,
                        "{flow:?}: {before:?} -> {after:?}"
                    );
                    if before.verdict == Verdict::Allow {
                        assert_eq!(before, after);
                    }
                    audited += usize::from(would_be_denied);
                }
            }
        }
        assert!(
            audited > 20,
            "only {audited} audited flows: the test proves little"
        );
    }
}
