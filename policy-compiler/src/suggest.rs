//! Allow rules for a monitored segment, proposed from what it received in monitor mode
//! (`policy-compiler suggest DIR --flows FILE... --segment S`): the discovery phase of a
//! rollout, for a person to review and commit.
//!
//! - Only flows the segment received as `audit` (or allowed by an older policy) and that the
//!   policy under review still passes only as audit: what it already allows is not suggested,
//!   and denied attempts never reached the segment.
//! - One `allow:` entry per set of sources with the same ports: a source segment by name; an
//!   address in no segment as the host itself (`10.99.0.10/32`), never `world`, which would
//!   admit every address in no segment.
//! - Observed destination ports; consecutive ports become a range (`tcp/8080-8082`), never more
//!   than was seen. Packets that look like replies (an ephemeral destination port, an ICMP
//!   reply or error) and protocols without ports (only `ports: [any]` could allow them) are
//!   listed as comments, not suggested.
//! - Counts and first/last seen as YAML comments, `reason:` a TODO for the reviewer. The text
//!   is to be appended to the segment's `allow:` list (appending keeps existing rule ids).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::{self, Write as _};
use std::net::IpAddr;

use crate::error::closest;
use crate::evaluate::{Flow, Verdict};
use crate::flow_log::{ObservedFlows, Seen, reply_hint, traffic_label};
use crate::model::{Mode, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, Policy, RuleKind, WORLD};
use crate::prefix::Prefix;

/// Addresses named per comment line.
const SHOWN_ADDRESSES: usize = 3;
const NO_PORTS: &str = "a protocol without ports: only `ports: [any]` could allow it, which \
    opens every protocol and port";

fn has_ports(proto: u8) -> bool {
    matches!(proto, PROTO_TCP | PROTO_UDP | PROTO_ICMP | PROTO_ICMPV6)
}

#[derive(thiserror::Error, Clone, Debug, PartialEq, Eq)]
pub enum SuggestError {
    #[error("'{segment}' is not a segment of {policy}{}", hint_text(.hint))]
    UnknownSegment {
        segment: String,
        policy: String,
        hint: String,
    },
    #[error(
        "`world` has no segment file: its rules are `world.allow` in defaults.yaml\n  hint: \
         suggest works on segments; to see what enforcing world would deny, run `policy-compiler \
         impact`"
    )]
    World,
    #[error(
        "segment '{segment}' is in mode {mode}, not monitor: it has no audited flows to learn from\
         \n  hint: set `mode: monitor` in {file}, let the enforcer run with `--flow-log FILE` \
         through a normal working period, then run suggest on that log"
    )]
    NotMonitored {
        segment: String,
        mode: &'static str,
        file: String,
    },
}

fn hint_text(hint: &str) -> String {
    format!("\n  hint: {hint}")
}

/// Who a suggested rule admits.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SuggestedSource {
    /// Every member of a segment.
    Segment(String),
    /// One address in no segment, as a /32 or /128.
    Host(IpAddr),
}

impl SuggestedSource {
    /// As written in `from:` (CIDRs quoted, so IPv6 colons cannot confuse YAML).
    fn yaml(&self) -> String {
        match self {
            SuggestedSource::Segment(name) => name.clone(),
            SuggestedSource::Host(address) => format!("\"{}\"", host_prefix(*address)),
        }
    }
}

impl fmt::Display for SuggestedSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SuggestedSource::Segment(name) => f.write_str(name),
            SuggestedSource::Host(address) => write!(f, "{}", host_prefix(*address)),
        }
    }
}

/// The prefix holding only `address`.
pub fn host_prefix(address: IpAddr) -> Prefix {
    let width = if address.is_ipv4() { 32 } else { 128 };
    Prefix::containing(address, width)
}

/// One `ports:` entry: TCP/UDP destination ports or ICMP types `first..=last` of `proto`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SuggestedPorts {
    pub proto: u8,
    pub first: u16,
    pub last: u16,
    /// The ports or types seen inside the range.
    pub observed: BTreeSet<u16>,
    pub seen: Seen,
    pub sources: BTreeSet<IpAddr>,
    pub destinations: BTreeSet<IpAddr>,
}

impl SuggestedPorts {
    /// In the policy's notation: `tcp/5432`, `tcp/8080-8082`, `icmp/echo-request`.
    pub fn entry(&self) -> String {
        if self.first == self.last {
            traffic_label(self.proto, Some(self.first))
        } else {
            format!("{}/{}-{}", proto_label(self.proto), self.first, self.last)
        }
    }

    pub fn contains(&self, proto: u8, port: Option<u16>) -> bool {
        proto == self.proto && port.is_some_and(|port| self.first <= port && port <= self.last)
    }
}

fn proto_label(proto: u8) -> &'static str {
    match proto {
        PROTO_TCP => "tcp",
        PROTO_UDP => "udp",
        PROTO_ICMP => "icmp",
        _ => "icmpv6",
    }
}

/// One proposed `allow:` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SuggestedRule {
    pub from: Vec<SuggestedSource>,
    /// Per source: how often it was seen, and from which addresses.
    pub source_seen: Vec<(Seen, BTreeSet<IpAddr>)>,
    pub ports: Vec<SuggestedPorts>,
}

/// Audited traffic that is reported but not suggested.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SkippedTraffic {
    /// The source's segment (`world` for none).
    pub from: String,
    /// `tcp/45123`, `icmp/echo-reply`, `protocol 47`.
    pub traffic: String,
    pub why: &'static str,
    pub seen: Seen,
    pub sources: BTreeSet<IpAddr>,
    pub destinations: BTreeSet<IpAddr>,
    pub source_ports: BTreeSet<u16>,
}

/// The rules proposed for one segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Suggestion {
    pub segment: String,
    /// The segment's file, where the rules go.
    pub file: String,
    /// Whether the segment already has an `allow:` list to append to.
    pub has_rules: bool,
    pub policy_source: String,
    pub revision: String,
    pub log_files: Vec<String>,
    pub log_events: u64,
    /// Events to the segment that the policy under review passes only as audit.
    pub audited_events: u64,
    /// Events to the segment that were denied when logged (they never reached it).
    pub denied_events: u64,
    pub rules: Vec<SuggestedRule>,
    pub skipped: Vec<SkippedTraffic>,
    /// Every distinct observed packet the rules are meant to admit.
    pub flows: Vec<Flow>,
}

#[derive(Default)]
struct PortObservation {
    seen: Option<Seen>,
    sources: BTreeSet<IpAddr>,
    destinations: BTreeSet<IpAddr>,
}

#[derive(Default)]
struct SkippedObservation {
    why: &'static str,
    seen: Option<Seen>,
    sources: BTreeSet<IpAddr>,
    destinations: BTreeSet<IpAddr>,
    source_ports: BTreeSet<u16>,
}

impl Suggestion {
    /// The rules that would admit what `segment` received as audit in `observed`.
    pub fn for_segment(
        policy: &Policy,
        policy_source: &str,
        observed: &ObservedFlows,
        segment: &str,
    ) -> Result<Suggestion, SuggestError> {
        if segment == WORLD {
            return Err(SuggestError::World);
        }
        let Some(target) = policy.segment(segment) else {
            let names: Vec<&str> = policy.segments().iter().map(|s| s.name.as_str()).collect();
            let hint = match closest(segment, names.iter().copied()) {
                Some(name) => format!("did you mean '{name}'?"),
                None => format!("the segments are: {}", names.join(", ")),
            };
            return Err(SuggestError::UnknownSegment {
                segment: segment.to_string(),
                policy: policy_source.to_string(),
                hint,
            });
        };
        if target.mode != Mode::Monitor {
            return Err(SuggestError::NotMonitored {
                segment: segment.to_string(),
                mode: target.mode.as_str(),
                file: target.file.clone(),
            });
        }

        let mut audited_events = 0;
        let mut denied_events = 0;
        let mut by_source: BTreeMap<SuggestedSource, BTreeMap<(u8, u16), PortObservation>> =
            BTreeMap::new();
        let mut skipped: BTreeMap<(String, u8, Option<u16>), SkippedObservation> = BTreeMap::new();
        let mut flows = BTreeSet::new();
        for (key, observed_flow) in &observed.flows {
            // The destination's allow-list decides, whichever hook saw the packet.
            let decision = policy.evaluate(&key.flow);
            if decision.dst_segment != segment || decision.verdict != Verdict::Audit {
                continue;
            }
            let seen = &observed_flow.seen;
            if key.logged == Verdict::Deny {
                denied_events += seen.events;
                continue;
            }
            audited_events += seen.events;
            let flow = key.flow;
            let skip_because = match flow.port {
                Some(_) if has_ports(flow.proto) => reply_hint(&flow),
                _ => Some(NO_PORTS),
            };
            if let Some(why) = skip_because {
                let entry = skipped
                    .entry((decision.src_segment.clone(), flow.proto, flow.port))
                    .or_insert_with(|| SkippedObservation {
                        why,
                        ..SkippedObservation::default()
                    });
                seen.merge_into(&mut entry.seen);
                entry.sources.insert(flow.src);
                entry.destinations.insert(flow.dst);
                entry.source_ports.extend(observed_flow.source_ports.iter());
                continue;
            }
            let Some(port) = flow.port else { continue };
            let source = if decision.src_segment == WORLD {
                SuggestedSource::Host(flow.src)
            } else {
                SuggestedSource::Segment(decision.src_segment.clone())
            };
            let observation = by_source
                .entry(source)
                .or_default()
                .entry((flow.proto, port))
                .or_default();
            seen.merge_into(&mut observation.seen);
            observation.sources.insert(flow.src);
            observation.destinations.insert(flow.dst);
            flows.insert((flow.src, flow.dst, flow.proto, port));
        }

        // Sources with the same ports share a rule.
        let mut rules: Vec<SuggestedRule> = Vec::new();
        for (source, ports) in by_source {
            let ranges = port_ranges(&ports);
            let seen_by_source = ports.values().fold(None, |mut total, observation| {
                if let Some(seen) = &observation.seen {
                    seen.merge_into(&mut total);
                }
                total
            });
            let addresses: BTreeSet<IpAddr> = ports
                .values()
                .flat_map(|observation| observation.sources.iter().copied())
                .collect();
            let Some(seen_by_source) = seen_by_source else {
                continue;
            };
            let same = rules.iter_mut().find(|rule| {
                rule.ports.len() == ranges.len()
                    && rule
                        .ports
                        .iter()
                        .zip(&ranges)
                        .all(|(a, b)| (a.proto, a.first, a.last) == (b.proto, b.first, b.last))
            });
            match same {
                Some(rule) => {
                    rule.from.push(source);
                    rule.source_seen.push((seen_by_source, addresses));
                    for (mine, theirs) in rule.ports.iter_mut().zip(ranges) {
                        mine.seen.merge(&theirs.seen);
                        mine.observed.extend(theirs.observed);
                        mine.sources.extend(theirs.sources);
                        mine.destinations.extend(theirs.destinations);
                    }
                }
                None => rules.push(SuggestedRule {
                    from: vec![source],
                    source_seen: vec![(seen_by_source, addresses)],
                    ports: ranges,
                }),
            }
        }

        let skipped = skipped
            .into_iter()
            .filter_map(|((from, proto, port), observation)| {
                Some(SkippedTraffic {
                    from,
                    traffic: traffic_label(proto, port),
                    why: observation.why,
                    seen: observation.seen?,
                    sources: observation.sources,
                    destinations: observation.destinations,
                    source_ports: observation.source_ports,
                })
            })
            .collect();

        Ok(Suggestion {
            segment: segment.to_string(),
            file: target.file.clone(),
            has_rules: target
                .rules
                .iter()
                .filter_map(|&index| policy.rule(index))
                .any(|rule| matches!(rule.kind, RuleKind::Allow { .. }) && !rule.is_essential()),
            policy_source: policy_source.to_string(),
            revision: policy.revision().to_string(),
            log_files: observed
                .files
                .iter()
                .map(|file| file.file.clone())
                .collect(),
            log_events: observed.events,
            audited_events,
            denied_events,
            rules,
            skipped,
            flows: flows
                .into_iter()
                .map(|(src, dst, proto, port)| Flow {
                    src,
                    dst,
                    proto,
                    port: Some(port),
                })
                .collect(),
        })
    }

    /// No rule to propose (there may still be skipped traffic to look at).
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Whether a rule of the suggestion admits packets of `proto`/`port` from `source`.
    pub fn admits(&self, source: &SuggestedSource, proto: u8, port: Option<u16>) -> bool {
        self.rules.iter().any(|rule| {
            rule.from.contains(source) && rule.ports.iter().any(|ports| ports.contains(proto, port))
        })
    }

    /// The rules as YAML list entries (indented for a segment's `allow:` list), with the
    /// evidence as comments.
    pub fn to_yaml(&self) -> String {
        let mut out = String::new();
        let files = self
            .log_files
            .iter()
            .map(|file| one_line(file))
            .collect::<Vec<_>>()
            .join(", ");
        let _ = writeln!(
            out,
            "# Suggested allow rules for {} (mode: monitor), from {} in {files}.",
            self.segment,
            plural(self.log_events, "flow event")
        );
        let _ = writeln!(
            out,
            "# Judged again with {} (revision {}): {} to {} pass only as audit{}.",
            one_line(&self.policy_source),
            short(&self.revision),
            plural(self.audited_events, "received event"),
            self.segment,
            if self.denied_events > 0 {
                format!(
                    "; not considered: {} denied when logged",
                    plural(self.denied_events, "event")
                )
            } else {
                String::new()
            }
        );
        let _ = writeln!(
            out,
            "# Counts are flow events (at most one per flow and second), not packets."
        );
        let place = if self.has_rules {
            format!(
                "append these entries to the end of the `allow:` list of {} (appending keeps \
                 the ids of the existing rules)",
                one_line(&self.file)
            )
        } else {
            format!(
                "put these entries under a new `allow:` in {} (replacing an empty `allow: []`)",
                one_line(&self.file)
            )
        };
        let _ = writeln!(
            out,
            "# Review every rule and replace each TODO reason, then {place}."
        );
        for rule in &self.rules {
            let _ = writeln!(out);
            for (source, (seen, addresses)) in rule.from.iter().zip(&rule.source_seen) {
                let what = match source {
                    SuggestedSource::Segment(name) => {
                        format!("{name} ({})", addresses_text(addresses))
                    }
                    SuggestedSource::Host(address) => format!(
                        "{address}, in no segment (the host alone: `world` would admit every \
                         address in no segment)"
                    ),
                };
                let _ = writeln!(out, "  # from {what}: {}", seen.describe());
            }
            let from: Vec<String> = rule.from.iter().map(SuggestedSource::yaml).collect();
            let _ = writeln!(out, "  - from: [{}]", from.join(", "));
            let _ = writeln!(out, "    ports:");
            let width = rule
                .ports
                .iter()
                .map(|ports| ports.entry().len())
                .max()
                .unwrap_or(0);
            for ports in &rule.ports {
                let mut comment = ports.seen.describe();
                if ports.first != ports.last {
                    comment.push_str("; ports seen: ");
                    let observed: Vec<String> = ports.observed.iter().map(u16::to_string).collect();
                    comment.push_str(&observed.join(", "));
                }
                let _ = writeln!(
                    out,
                    "      - {:<width$}  # {comment}; to {}",
                    ports.entry(),
                    addresses_text(&ports.destinations)
                );
            }
            let entries: Vec<String> = rule.ports.iter().map(SuggestedPorts::entry).collect();
            let from_text: Vec<String> = rule.from.iter().map(ToString::to_string).collect();
            let reason = format!(
                "TODO: why {} needs {} (seen in monitor mode)",
                from_text.join(", "),
                entries.join(", ")
            );
            // A JSON string is a valid YAML double-quoted scalar.
            let reason = serde_json::to_string(&reason).unwrap_or_else(|_| "\"TODO\"".into());
            let _ = writeln!(out, "    reason: {reason}");
        }
        if self.rules.is_empty() {
            let _ = writeln!(out, "\n# No rule to suggest.");
        }
        if !self.skipped.is_empty() {
            let _ = writeln!(
                out,
                "\n# Not suggested (audited, but probably not a service; add by hand if it is):"
            );
            for skipped in &self.skipped {
                let source_ports = if skipped.source_ports.is_empty() {
                    String::new()
                } else {
                    let ports: Vec<String> =
                        skipped.source_ports.iter().map(u16::to_string).collect();
                    format!(", source port {}", ports.join(", "))
                };
                let _ = writeln!(
                    out,
                    "#   {} from {} ({}{source_ports}) to {}: {}",
                    skipped.traffic,
                    skipped.from,
                    addresses_text(&skipped.sources),
                    addresses_text(&skipped.destinations),
                    skipped.seen.describe()
                );
                let _ = writeln!(out, "#     {}", skipped.why);
            }
        }
        out
    }
}

/// Observed ports of one source, consecutive ones merged into ranges, in the order
/// tcp, udp, icmp, icmpv6.
fn port_ranges(ports: &BTreeMap<(u8, u16), PortObservation>) -> Vec<SuggestedPorts> {
    let mut ranges: Vec<SuggestedPorts> = Vec::new();
    for proto in [PROTO_TCP, PROTO_UDP, PROTO_ICMP, PROTO_ICMPV6] {
        for ((_, port), observation) in ports.range((proto, 0)..=(proto, u16::MAX)) {
            let Some(seen) = &observation.seen else {
                continue;
            };
            // ICMP types are not a scale: echo-request (8) next to 9 is no range.
            let joins = matches!(proto, PROTO_TCP | PROTO_UDP);
            match ranges.last_mut() {
                Some(last)
                    if joins
                        && last.proto == proto
                        && u32::from(last.last) + 1 == u32::from(*port) =>
                {
                    last.last = *port;
                    last.observed.insert(*port);
                    last.seen.merge(seen);
                    last.sources.extend(observation.sources.iter().copied());
                    last.destinations
                        .extend(observation.destinations.iter().copied());
                }
                _ => ranges.push(SuggestedPorts {
                    proto,
                    first: *port,
                    last: *port,
                    observed: BTreeSet::from([*port]),
                    seen: *seen,
                    sources: observation.sources.clone(),
                    destinations: observation.destinations.clone(),
                }),
            }
        }
    }
    ranges
}

/// `10.40.0.20, 10.40.0.21 +2 more`.
fn addresses_text(addresses: &BTreeSet<IpAddr>) -> String {
    let mut shown: Vec<String> = addresses
        .iter()
        .take(SHOWN_ADDRESSES)
        .map(ToString::to_string)
        .collect();
    if addresses.len() > SHOWN_ADDRESSES {
        shown.push(format!("+{} more", addresses.len() - SHOWN_ADDRESSES));
    }
    shown.join(", ")
}

/// Text for a YAML comment: a line break would end the comment.
fn one_line(text: &str) -> String {
    text.replace(['\n', '\r'], " ")
}

fn plural(n: u64, what: &str) -> String {
    match n {
        1 => format!("1 {what}"),
        _ => format!("{n} {what}s"),
    }
}

fn short(revision: &str) -> &str {
    revision.get(..12).unwrap_or(revision)
}
